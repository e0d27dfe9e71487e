"""Sweep job cost against plain forward passes over the same evaluation set, measured side by side.

    python bench/bench_sweep.py [--model DIR] [--samples 64] [--seq-len 128] [--threads N]

Prints, for the same tokens: (a) plain batched forward passes, (b) the float baseline job's work
(forward + metrics + lm_head-input capture), (c) one threshold job's work (W8A8 simulation + metrics
against the baseline), and the ratios (b)/(a) and (c)/(a). Model loading is timed separately:
each sweep job loads the model once.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from shadowquant.corpus import pydoc_records
from shadowquant.decision import decide
from shadowquant.metrics import evaluate
from shadowquant.models import load_model
from shadowquant.profiling import collate, plan_batches, profile_model, tokenize_samples
from shadowquant.sweep import quantize_model

from bench_profile import resolve_model  # bench/ is on sys.path when run as a script


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
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench_sweep.") as scratch:
        return run(args, resolve_model(args.model, Path(scratch)))


def run(args, model_dir: Path) -> int:
    load_s, (model, tok, family) = _timed(lambda: load_model(model_dir, device=args.device, dtype="float32"))
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
    quantize_model(model, family, decide(scales, args.threshold, "signed"))

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
    return 0


if __name__ == "__main__":
    sys.exit(main())
