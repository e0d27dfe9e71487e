"""The same points under two runtime profiles, side by side, on a finished run's model and records.

    python bench/bench_runtime.py [--run results/smollm2-135m.rotate+smooth] [--results results/smollm2-135m]
                                  [--samples 128] [--profiles ideal qwen-npu] [--points ...]

For each profile it evaluates the points on the same held-out records against the same float baseline
(exact KL over the full vocabulary, top-1 agreement, perplexity with a 95 % bootstrap interval paired
with float) and prints one table: what the original tools' idealized W8A8 says next to what the phone's
engine computes. Under an NPU profile it also prints the measured CPU share of each point, and the
error breakdown (weights / inputs / outputs alone) of its point without shadow layers: where the loss
that remains comes from. It reads the run's act_scales.json, runtime_scales.json, sensitivity.csv and
weight_range.json (a finished `make run` has them all); the ideal profile's '-mse' clip scales are made here.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from shadowquant.evaluate import sweep
from shadowquant.calibrate.sensitivity import clip_scales_stage
from shadowquant.calibrate.weight_range import resolve_weight_range

IDEAL_POINTS = ["absmax-t1", "absmax-t10000000", "absmax-t10000000-mse"]
NPU_POINTS = ["absmax-l0", "absmax-l1", "absmax-l4", "absmax-t1"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="results/smollm2-135m.rotate+smooth", help="a variant's results folder")
    parser.add_argument("--results", default="results/smollm2-135m", help="the model's results folder")
    parser.add_argument("--samples", type=int, default=128, help="held-out records (the first N)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--profiles", nargs="+", default=["ideal", "qwen-npu"])
    parser.add_argument("--breakdown", action="store_true", help="also the weights/inputs/outputs parts (NPU)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run, results = Path(args.run), Path(args.results)
    manifest = _manifest(run)
    weight_range = resolve_weight_range("auto", run / "weight_range.json")
    work = Path(tempfile.mkdtemp(prefix="bench_runtime_"))
    records = (results / "evaluation.jsonl").read_text().splitlines(True)[:args.samples]
    (work / "eval.jsonl").write_text("".join(records))
    sweep.evaluate_float(manifest, work / "eval.jsonl", work / "float.json", work / "base.safetensors",
                         seq_len=args.seq_len, batch_size=8)
    if "ideal" in args.profiles:  # the '-mse' points' clip scales, as the ideal profile's clip_scales rule makes them
        clip_scales_stage(manifest, results / "calibration.jsonl", run / "act_scales.json", work / "clip_scales.json",
                          ["absmax"], 8, 256)
    rows = []
    for profile in args.profiles:
        npu = profile != "ideal"
        for point in NPU_POINTS if npu else IDEAL_POINTS:
            started = time.perf_counter()
            m = _point(manifest, run, work, point, profile, weight_range, args.seq_len)
            rows.append((profile, point, m, time.perf_counter() - started))
        if npu and args.breakdown:
            for part in ("weights", "inputs", "outputs"):
                m = _point(manifest, run, work, "absmax-l0", profile, weight_range, args.seq_len, part)
                rows.append((profile, f"absmax-l0 {part} only", m, 0.0))
    print(f"\n{len(records)} held-out records, {rows[0][2]['num_tokens']} predicted tokens; brackets: 95 % bootstrap "
          "interval of the perplexity increase, paired with float")
    print(f"{'profile':<10} {'point':<34} {'perplexity increase':<28} {'KL':>7} {'top-1':>6} {'layers':<12} "
          f"{'CPU share':>10}")
    for profile, point, m, _ in rows:
        increase = (f"{100 * m['perplexity_increase']:+.2f} % [{100 * m['perplexity_increase_ci_low']:+.2f}, "
                    f"{100 * m['perplexity_increase_ci_high']:+.2f}]")
        layers = m.get("shadow_layers") if profile != "ideal" else f"{m['num_shadow_sides']} sides"
        share = f"{100 * m['cpu_share']:.4f} %" if m.get("cpu_share") is not None else "-"
        print(f"{profile:<10} {point:<34} {increase:<28} {m['kl']:>7.4f} {m['agreement']:>6.3f} "
              f"{str(layers or 'none'):<12} {share:>10}")


def _manifest(run: Path) -> Path:
    """The variant's model manifest: resources/models/<name>/transformed/<variant>/ or the fetched one."""
    name, _, variant = run.name.partition(".")
    base = Path("resources/models") / name
    return base / "transformed" / variant / "manifest.json" if variant else base / "manifest.json"


def _point(manifest, run, work, point, profile, weight_range, seq_len, part="all"):
    npu = profile != "ideal"
    evaluation = sweep.PointEvaluation(
        manifest=manifest, samples=work / "eval.jsonl", act_scales=run / "act_scales.json",
        baseline=work / "base.safetensors", float_json=work / "float.json", seq_len=seq_len, runtime=profile,
        batch_size=8, weight_range=weight_range, sensitivity=run / "sensitivity.csv" if npu else None,
        clip_scales=None if npu else work / "clip_scales.json",
        runtime_scales=run / "runtime_scales.json" if npu else None)
    return sweep.evaluate_point(evaluation, point=point, out_json=work / f"{profile}-{point}-{part}.json", part=part)


if __name__ == "__main__":
    main()
