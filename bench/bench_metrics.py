"""Cost of the exact full-vocabulary KL: evaluations of the same model on the same tokens, side by side.

    python bench/bench_metrics.py [--model DIR] [--samples 256] [--seq-len 128] [--threads 2] [--rounds 2]
                                  [--reference-metrics OLD_METRICS_PY]

Per round, on the same sequences (pydoc records, each truncated to --seq-len tokens):
(a) evaluate without baseline (forward, accuracy, NLL), (b) the float job (a + lm_head-input capture
for the baseline), (c) a "quantized" job against that baseline (a + lm_head recomputation + exact KL;
the float model itself stands in for the quantized one: the cost is the same), (d) the lm_head
recomputation alone over the baseline's positions. With --reference-metrics, a metrics.py of the
previous top-k format (`git show d860b66:src/shadowquant/evaluate/metrics.py > /tmp/topk_metrics.py`) is
timed the same way with top-32: (b') its float job, (c') its KL job. Rounds interleave the
measurements so that load from other processes falls on all of them alike; the minimum wall and CPU
times (CPU: all threads of this process) are printed.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

import torch

from shadowquant.inputs.corpus import pydoc_records
from shadowquant.evaluate.metrics import evaluate, final_logit_softcap, head_logits, summarize
from shadowquant.model.loading import load_model
from shadowquant.calibrate.profiling import tokenize_samples

from bench_profile import resolve_model  # bench/ is on sys.path when run as a script


def _timed(fn):
    """Wall and CPU seconds (all threads): on a shared machine the CPU time is the steadier measure."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return (time.perf_counter() - wall, time.process_time() - cpu), out


def _load_reference(path: str):
    spec = importlib.util.spec_from_file_location("reference_metrics", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="local model directory (default: as bench_profile.py)")
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--reference-metrics", default=None, help="a top-k-format metrics.py to time beside")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench_metrics.") as scratch:
        return run(args, resolve_model(args.model, Path(scratch)))


def run(args, model_dir: Path) -> int:
    model, tok, family = load_model(model_dir, device="cpu", dtype="float32")
    texts = [t for t in pydoc_records() if len(t) > 1000]
    sequences = tokenize_samples(tok, texts[: args.samples], args.seq_len)
    reference = _load_reference(args.reference_metrics) if args.reference_metrics else None
    head, softcap = model.get_output_embeddings(), final_logit_softcap(model)
    baseline = evaluate(model, sequences[:8], args.batch_size, collect_baseline=True, desc="warm-up").baseline

    def head_only():
        with torch.inference_mode():
            for start in range(0, baseline.hidden.shape[0], 1024):
                head_logits(head, baseline.hidden[start:start + 1024], softcap)

    jobs = {
        "(a) forward + NLL, no baseline": lambda: evaluate(model, sequences, args.batch_size, desc="a"),
        "(b) float job, capture lm_head input": lambda: evaluate(model, sequences, args.batch_size,
                                                                 collect_baseline=True, desc="b"),
        "(c) job with exact KL": lambda: evaluate(model, sequences, args.batch_size, baseline=baseline, desc="c"),
        "(d) lm_head recomputation alone": head_only,
    }
    if reference is not None:
        topk = {}
        jobs["(b') top-32 float job"] = lambda: topk.update(
            baseline=reference.evaluate(model, sequences, args.batch_size, collect_top_k=32, desc="b'").baseline)
        jobs["(c') job with top-32 KL bound"] = lambda: reference.evaluate(
            model, sequences, args.batch_size, baseline=topk["baseline"], desc="c'")
    best: dict[str, tuple[float, float]] = {}
    for _ in range(args.rounds):
        for name, job in jobs.items():
            seconds, out = _timed(job)
            best[name] = tuple(min(pair) for pair in zip(best.get(name, seconds), seconds))
            print(f"{name}: {seconds[0]:.2f} s wall, {seconds[1]:.2f} s CPU", file=sys.stderr, flush=True)
            if name.startswith("(b)"):
                baseline = out.baseline
            if name.startswith("(c)"):
                summary = summarize(out)
    tokens = sum(len(s) - 1 for s in sequences)
    print(f"model {model_dir} ({family}), {len(sequences)} records, {tokens} predicted tokens, "
          f"batch {args.batch_size}, {args.threads} threads, best of {args.rounds} rounds")
    print(f"baseline: {baseline.hidden.numel() * baseline.hidden.element_size() / 1e6:.1f} MB hidden states; "
          f"KL of the model to itself {summary['kl']:.2e}, agreement {summary['agreement']}")
    plain = best["(a) forward + NLL, no baseline"]
    print(f"{'measurement':<40}{'wall s':>9}{'x (a)':>8}{'CPU s':>9}{'x (a)':>8}")
    for name, (wall, cpu) in best.items():
        print(f"{name:<40}{wall:>9.2f}{wall / plain[0]:>8.3f}{cpu:>9.2f}{cpu / plain[1]:>8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
