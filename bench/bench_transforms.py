"""Held-out perplexity of the exact transforms (issue 11): float, weights-only int8, W8A8 all shadow.

Usage: OMP_NUM_THREADS=1 PYTHONPATH=src python bench/bench_transforms.py MODEL_DIR OUT.json
           [--configs none rotate equalize smooth rotate+equalize ...] [--search [--grid A ...]] [--w8a8]
           [--skip-float]
Calibration = prepare_samples(pydoc, 32, seed 42, offset 0); held-out = 128 records after it;
both tokenized to at most 128 tokens. Results are written to OUT.json after every configuration.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from shadowquant.atomic import write_json
from shadowquant.inputs.corpus import build_pydoc_corpus, prepare_samples
from shadowquant.runtimes.decision import decide
from shadowquant.runtimes.fakequant import apply_w8a8, fake_quant_weight
from shadowquant.model.families import quantized_layer_names
from shadowquant.evaluate.metrics import evaluate, summarize
from shadowquant.model.loading import load_model
from shadowquant.calibrate.profiling import profile_model, tokenize_samples
from shadowquant.model.transforms import ALPHA_GRID, apply_transforms, search_alpha


def fake_quant_weights(model, family) -> None:
    with torch.no_grad():
        for name in quantized_layer_names(model, family):
            linear = model.get_submodule(name)
            linear.weight.copy_(fake_quant_weight(linear.weight))
            if linear.bias is not None:
                linear.bias.copy_(fake_quant_weight(linear.bias))


def perplexity(model, sequences) -> dict:
    result = summarize(evaluate(model, sequences, batch_size=8, desc="eval"))
    return {"perplexity": result["perplexity"], "num_tokens": result["num_tokens"]}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("out")
    parser.add_argument("--configs", nargs="+", default=["none", "rotate", "equalize", "smooth", "rotate+equalize"])
    parser.add_argument("--search", action="store_true", help="search smooth's alpha (else 0.5)")
    parser.add_argument("--skip-float", action="store_true", help="do not evaluate the untransformed float model")
    parser.add_argument("--grid", nargs="+", type=float, default=list(ALPHA_GRID), help="alphas searched")
    parser.add_argument("--w8a8", action="store_true", help="also W8A8 at the all-shadow decision (t = 1, absmax)")
    args = parser.parse_args()

    corpus = Path(tempfile.mkdtemp()) / "pydoc.jsonl"
    build_pydoc_corpus(corpus)
    model, tokenizer, family = load_model(args.model_dir, device="cpu", dtype="float32")
    calibration = tokenize_samples(tokenizer, prepare_samples(corpus, 32, seed=42, offset=0), 128)
    held_out = tokenize_samples(tokenizer, prepare_samples(corpus, 128, seed=42, offset=32), 128)
    results = {"model": args.model_dir, "calibration_tokens": sum(map(len, calibration)), "configs": {}}
    results["float"] = perplexity(model, held_out) if not args.skip_float else None
    print("float", results["float"], flush=True)
    del model

    for config in args.configs:
        transforms = [] if config == "none" else config.split("+")
        model, _, _ = load_model(args.model_dir, device="cpu", dtype="float32")
        entry = {}
        alpha = 0.5
        if "smooth" in transforms and args.search:
            start = time.perf_counter()
            alpha, scores = search_alpha(model, family, transforms, calibration, grid=tuple(args.grid))
            entry["alpha_search"] = {"scores": {str(a): s for a, s in scores.items()},
                                     "seconds": round(time.perf_counter() - start, 1)}
        start = time.perf_counter()
        summary = apply_transforms(model, family, transforms, seed=0, calibration=calibration, alpha=alpha)
        entry["transform_seconds"] = round(time.perf_counter() - start, 2)
        entry["summary"] = summary
        entry["float"] = perplexity(model, held_out)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        fake_quant_weights(model, family)
        entry["weights_only"] = perplexity(model, held_out)
        print(config, entry["float"], entry["weights_only"], entry["transform_seconds"], flush=True)
        if args.w8a8:
            model.load_state_dict(state)
            act_scales = profile_model(model, calibration, tokenizer.pad_token_id, batch_size=8, progress=False)
            names = quantized_layer_names(model, family)
            decisions = decide(act_scales, 1.0, "absmax", layers=names)
            apply_w8a8(model, decisions, names)
            entry["w8a8_all_shadow"] = perplexity(model, held_out)
            print(config, "w8a8", entry["w8a8_all_shadow"], flush=True)
        results["configs"][config] = entry
        write_json(args.out, results)
        del model, state
    return 0


if __name__ == "__main__":
    sys.exit(main())
