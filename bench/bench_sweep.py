"""Sweep job cost against plain forward passes over the same evaluation set, measured side by side.

    python bench/bench_sweep.py [--model DIR | --random-model llama-1b|llama-tiny] [--samples 64]
                                [--seq-len 128] [--threads N] [--device cuda] [--dtype bfloat16]
                                [--points-per-job 4]

Prints, for the same tokens: (a) plain batched forward passes, (b) the float baseline job's work
(forward + metrics + lm_head-input capture), (c) one threshold job's work (W8A8 simulation + metrics
against the baseline), and the ratios (b)/(a) and (c)/(a). Model loading is timed separately:
each sweep job loads the model once. The last lines compare `sweep.points_per_job`: the share of a
one-point job spent loading, and N points as N jobs (N loads) against one job (one load, plus a copy of
the float model per point), from the times measured above.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from shadowquant.inputs.corpus import pydoc_records
from shadowquant.runtimes.decision import decide
from shadowquant.runtimes.fakequant import apply_w8a8
from shadowquant.model.families import quantized_layer_names
from shadowquant.evaluate.metrics import evaluate
from shadowquant.model.loading import load_model
from shadowquant.calibrate.profiling import collate, plan_batches, profile_model, tokenize_samples

from bench_profile import RANDOM_MODELS, build_random_llama, resolve_model  # bench/ is on sys.path


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="local model directory (default: as bench_profile.py)")
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threshold", type=float, default=8.0)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--random-model", choices=sorted(RANDOM_MODELS), help="build a random-weight Llama instead")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory for --random-model")
    p.add_argument("--points-per-job", type=int, default=4)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench_sweep.") as scratch:
        if args.random_model:
            model_dir, _ = build_random_llama(args.random_model, Path(scratch) / "model", args.tokenizer, args.dtype)
        else:
            model_dir = resolve_model(args.model, Path(scratch))
        return run(args, model_dir)


def run(args, model_dir: Path) -> int:
    load_s, (model, tok, family) = _timed(lambda: load_model(model_dir, device=args.device, dtype=args.dtype))
    texts = [t for t in pydoc_records() if len(t) > 1500]
    sequences = tokenize_samples(tok, texts[: args.samples], args.seq_len)
    calib = tokenize_samples(tok, texts[args.samples: args.samples + 8], args.seq_len)
    scales = profile_model(model, calib, tok.pad_token_id, batch_size=4, progress=False)

    def plain():
        with torch.inference_mode():
            for batch in plan_batches([len(s) for s in sequences], args.batch_size):
                ids, mask = collate([sequences[i] for i in batch], tok.pad_token_id, model.device)
                model(input_ids=ids, attention_mask=mask, use_cache=False)

    def float_job():  # evaluate runs in inference mode
        return evaluate(model, sequences, args.batch_size, collect_baseline=True, desc="float")

    plain()  # warm-up
    t_plain, _ = _timed(plain)
    t_float, result = _timed(float_job)
    t_copy, _ = _timed(lambda: copy.deepcopy(model))  # what a grouped job pays per extra point
    t_quantize, _ = _timed(lambda: apply_w8a8(model, decide(scales, args.threshold, "signed"),
                                              quantized_layer_names(model, family)))

    def threshold_job():
        return evaluate(model, sequences, args.batch_size, baseline=result.baseline, desc="w8a8")

    t_quant, _ = _timed(threshold_job)
    tokens = sum(map(len, sequences))
    print(f"model {model_dir} ({family}), {len(sequences)} samples, {tokens} tokens, batch {args.batch_size}, "
          f"{args.threads} threads, device {args.device}")
    print(f"{'measurement':<38}{'seconds':>9}{'x forward':>11}")
    print(f"{'model load (once per job)':<38}{load_s:>9.2f}{'':>11}")
    print(f"{'(a) plain forward passes':<38}{t_plain:>9.2f}{1.0:>11.2f}")
    print(f"{'(b) float baseline job (metrics+capture)':<38}{t_float:>9.2f}{t_float / t_plain:>11.2f}")
    print(f"{'(c) threshold job (W8A8 + metrics)':<38}{t_quant:>9.2f}{t_quant / t_plain:>11.2f}")
    point = t_quantize + t_quant
    n = args.points_per_job
    separate = n * (load_s + point)
    grouped = load_s + n * point + (n - 1) * t_copy
    print(f"one-point job: load {load_s:.2f} s + quantize {t_quantize:.2f} s + evaluate {t_quant:.2f} s; "
          f"loading is {100 * load_s / (load_s + point):.0f} % of it")
    print(f"{n} points: {n} jobs {separate:.2f} s, one job {grouped:.2f} s (copy of the float model "
          f"{t_copy:.2f} s per extra point): {separate / grouped:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
