"""The runtime's arithmetic around the quantized Linears, one effect at a time, side by side.

    python bench/bench_runtime_numerics.py [--run results/smollm2-135m.rotate+smooth]
                                           [--results results/smollm2-135m] [--samples 64] [--seq-len 128]
                                           [--points absmax-l0 absmax-l2] [--profile qwen-npu]

For each point, the profile's simulation with none of these effects ("without"), each effect alone on top
of it, and the profile as runtime.py defines it ("profile"), evaluated on the same held-out records:
perplexity increase over float and over "without", both with a 95 % bootstrap interval paired on the
records, KL to float and top-1 agreement. The effects (data of runtimes.profiles.RuntimeProfile / SideSpec):

  a  hvx-dequant   NPU outputs dequantized through float16 levels (LLaMADequantize's HVX code)
  b  npu-eps       the NPU RMSNorms with LLaMAPackage's epsilon 1e-6 instead of the model's
  c  silu-sigmoid  gate's SiLU as float16 sigmoid * x (use_high_precision_silu)
  c  silu-poly     gate's SiLU as the float16 piecewise-quartic op (no saturation outside [-8, 8))
  d  attention     the CPU attention in float16 (fp16 k/v cache, fp16-accumulated QK^T and PV)
  e  cpu-rounding  round half to even for the q/k/v input of layer 0 and after each shadow layer
     null          every input range 2^-20 wider: the noise floor of such a comparison

It also prints how many of gate_proj's outputs fall outside [-8, 8) (where the polynomial SiLU breaks).
It reads the run's act_scales.json, runtime_scales.json, sensitivity.csv and weight_range.json.
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import replace
from pathlib import Path

import torch

from shadowquant.runtimes.decision import load_act_scales, read_ranking
from shadowquant.model.families import quantized_layer_names
from shadowquant.evaluate.metrics import evaluate, summarize
from shadowquant.model.loading import load_model_from_manifest
from shadowquant.runtimes.profiles import get_profile
from shadowquant.runtimes.npu import read_runtime_scales, runtime_decisions, shadow_layers_of_point
from shadowquant.runtimes.runtime_linear import apply_runtime, decoder_layers
from shadowquant.evaluate.sweep import evaluation_sequences

EFFECTS = ("hvx-dequant", "npu-eps", "silu-sigmoid", "silu-poly", "attention", "cpu-rounding", "null")
# The null effect: every input range 2^-20 wider, a change of nothing the runtime does. Its size is the
# noise floor: a tiny change flips some int8 roundings, and their effect on perplexity is of this order.
NULL_RANGE_FACTOR = 1.0 + 2.0 ** -20


def _no_hvx(roles: dict) -> dict:
    return {role: replace(spec, output=replace(spec.output, hvx_dequantize=False)) for role, spec in roles.items()}


def without_effects(profile):
    """The profile with none of the arithmetic above (the simulation before these effects were added)."""
    return replace(profile, roles=_no_hvx(profile.roles), shadow_roles=_no_hvx(profile.shadow_roles),
                   cpu_layer_roles={}, npu_norm_eps=None, silu="float", attention="float")


def with_effect(base, profile, effect: str):
    """`base` (without_effects) plus one effect, with the values `profile` (or mllm) gives it."""
    if effect == "hvx-dequant":
        return replace(base, roles=profile.roles, shadow_roles=profile.shadow_roles)
    if effect == "npu-eps":
        return replace(base, npu_norm_eps=1e-6)
    if effect == "silu-sigmoid":
        return replace(base, silu="fp16-sigmoid")
    if effect == "silu-poly":
        return replace(base, silu="fp16-poly")
    if effect == "attention":
        return replace(base, attention="fp16-cpu")
    if effect == "null":
        return base
    if effect == "cpu-rounding":
        cpu = {role: profile.cpu_layer_roles.get(role, base.roles[role]) for role in ("q_proj", "k_proj", "v_proj")}
        cpu = {r: replace(s, output=replace(s.output, hvx_dequantize=False)) for r, s in cpu.items()}
        return replace(base, cpu_layer_roles=cpu)
    raise ValueError(effect)


def gate_outside(model, sequences, limit: float = 8.0) -> tuple[int, int, float]:
    """(elements of gate_proj's output outside [-limit, limit), all elements, max |x|) of the model as it is."""
    counts = [0, 0, 0.0]

    def hook(module, args):
        x = args[0]
        counts[0] += int(((x < -limit) | (x >= limit)).sum())
        counts[1] += x.numel()
        counts[2] = max(counts[2], float(x.abs().max()))

    handles = [layer.mlp.act_fn.register_forward_pre_hook(hook) for _, layer in decoder_layers(model)]
    evaluate(model, sequences, batch_size=8, desc="gate range")
    for handle in handles:
        handle.remove()
    return counts[0], counts[1], counts[2]


def _interval(m: dict, key: str = "perplexity_increase") -> str:
    return f"{100 * m[key]:+.2f} % [{100 * m[key + '_ci_low']:+.2f}, {100 * m[key + '_ci_high']:+.2f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="results/smollm2-135m.rotate+smooth", help="a variant's results folder")
    parser.add_argument("--results", default="results/smollm2-135m", help="the model's results folder")
    parser.add_argument("--manifest", default=None, help="the variant's model manifest (default: from --run)")
    parser.add_argument("--samples", type=int, default=64, help="held-out records (the first N)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--points", nargs="+", default=["absmax-l0", "absmax-l2"])
    parser.add_argument("--profile", default="qwen-npu")
    parser.add_argument("--ranking", type=int, nargs="+", default=None,
                        help="layer indices in rank order, instead of the run's sensitivity.csv")
    parser.add_argument("--effects", nargs="+", default=list(EFFECTS), choices=EFFECTS)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--resamples", type=int, default=1000)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run, results = Path(args.run), Path(args.results)
    manifest = Path(args.manifest) if args.manifest else _manifest(run)
    from shadowquant.calibrate.weight_range import resolve_weight_range

    weight_range = resolve_weight_range("auto", run / "weight_range.json")
    profile = get_profile(args.profile)
    model, tokenizer, family = load_model_from_manifest(manifest, "cpu", "float32")
    names = quantized_layer_names(model, family)
    texts = results / "evaluation.jsonl"
    work = Path("/tmp") / f"bench_numerics_{int(time.time())}"
    work.mkdir()
    (work / "eval.jsonl").write_text("".join(texts.read_text().splitlines(True)[:args.samples]))
    sequences = evaluation_sequences(tokenizer, work / "eval.jsonl", args.seq_len)
    started = time.perf_counter()
    float_result = evaluate(model, sequences, batch_size=8, collect_baseline=True, desc="float")
    print(f"float: {len(sequences)} records, {float_result.baseline is not None} baseline, "
          f"{time.perf_counter() - started:.0f} s", flush=True)
    act_scales = load_act_scales(run / "act_scales.json")
    scales = read_runtime_scales(run / "runtime_scales.json", profile)
    if args.ranking is not None:
        ranking = [f"model.layers.{i}.mlp.down_proj" for i in args.ranking]
    elif (run / "sensitivity.csv").exists():
        ranking = [layer for layer, _ in read_ranking(run / "sensitivity.csv", "absmax")]
    else:
        ranking = None
    base = without_effects(profile)
    configs = [("without", base)] + [(e, with_effect(base, profile, e)) for e in args.effects] + [("profile", profile)]
    rows = []
    for point in args.points:
        shadow = shadow_layers_of_point(point, act_scales, profile, names, ranking)
        decisions = runtime_decisions(act_scales, scales, profile, names, shadow)
        before = None
        for label, prof in configs:
            started = time.perf_counter()
            quant = copy.deepcopy(model)
            used = decisions if label != "null" else {
                name: replace(q, input_scale=q.input_scale * NULL_RANGE_FACTOR) for name, q in decisions.items()}
            apply_runtime(quant, used, names, prof, shadow, weight_range=weight_range)
            if label == "without" and "silu-poly" in args.effects:
                outside = gate_outside(quant, sequences)
                print(f"{point}: gate_proj outputs outside [-8, 8): {outside[0]} of {outside[1]} "
                      f"({100 * outside[0] / outside[1]:.4f} %), max |x| {outside[2]:.2f}", flush=True)
            result = evaluate(quant, sequences, batch_size=8, baseline=float_result.baseline, desc=label)
            over_float = summarize(result, float_result, num_resamples=args.resamples)
            over_before = summarize(result, before, num_resamples=args.resamples) if before is not None else None
            if before is None:
                before = result
            rows.append((point, sorted(shadow), label, over_float, over_before))
            print(f"{point} {label}: perplexity {over_float['perplexity']:.4f} ({_interval(over_float)} over float"
                  + (f", {_interval(over_before)} over without" if over_before else "")
                  + f"), {time.perf_counter() - started:.0f} s", flush=True)
            del quant
    print(f"\n{len(sequences)} held-out records x {args.seq_len} tokens, {rows[0][3]['num_tokens']} predicted tokens, "
          f"profile {profile.name}; brackets: 95 % bootstrap intervals paired on the records")
    print(f"{'point':<10} {'shadow':<8} {'effect':<13} {'perplexity':>10} {'over float':<26} "
          f"{'over without':<26} {'KL':>7} {'top-1':>6}")
    for point, shadow, label, m, b in rows:
        print(f"{point:<10} {' '.join(map(str, shadow)) or '-':<8} {label:<13} {m['perplexity']:>10.4f} "
              f"{_interval(m):<26} {(_interval(b) if b else '-'):<26} {m['kl']:>7.4f} {m['agreement']:>6.3f}")


def _manifest(run: Path) -> Path:
    """The variant's model manifest: resources/models/<name>/transformed/<variant>/ or the fetched one."""
    name, _, variant = run.name.partition(".")
    base = run.parent.parent / "resources/models" / name
    return base / "transformed" / variant / "manifest.json" if variant else base / "manifest.json"


if __name__ == "__main__":
    main()
