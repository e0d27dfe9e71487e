"""Quick comparison of CPU decoding-model formats (issue 25): perplexity of the float model with its weights
decoded from Q4_0 / Q8_0 blocks, with and without mllm's CPU numerics (Q8_0 activation blocks at every
quantized matmul, float16 K/V; shadowquant.decoding.cpu_numerics).

    python bench/bench_decode_formats.py --model /work/baseline/resources/models/smollm2-135m/hf \
        --eval /work/baseline/results/smollm2-135m/evaluation.jsonl \
        --calib /work/baseline/results/smollm2-135m/calibration.jsonl

Small on purpose (default 32 held-out records x 128 tokens); the numbers are for choosing candidates,
the pipeline's own evaluation is the reference.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from shadowquant.decoding.cpu_numerics import linear_names, mllm_cpu_numerics
from shadowquant.decoding.imatrix import collect_importance, gptq_q4_0, quantize_q4_0_imatrix, weighted_error
from shadowquant.decoding.q4_0 import dequantize_q4_0, quantize_q4_0
from shadowquant.decoding.q8_0 import dequantize_q8_0, quantize_q8_0

EMBED = "model.embed_tokens"
HEAD = "lm_head"


def records(path: Path, tokenizer, count: int, length: int, skip: int = 0) -> torch.Tensor:
    rows = []
    with open(path) as handle:
        for line in handle:
            ids = tokenizer(json.loads(line)["text"])["input_ids"]
            if len(ids) >= length:
                rows.append(ids[:length])
    rows = rows[skip:skip + count]
    if len(rows) < count:
        raise SystemExit(f"{path}: only {len(rows)} records of >= {length} tokens")
    return torch.tensor(rows)


@torch.no_grad()
def evaluate(model, ids: torch.Tensor, batch_size: int, float_top1: torch.Tensor | None = None):
    nll, count, agree, top1 = 0.0, 0, 0, []
    for start in range(0, ids.shape[0], batch_size):
        batch = ids[start:start + batch_size]
        logits = model(batch).logits[:, :-1].float()
        logp = torch.log_softmax(logits, dim=-1)
        target = batch[:, 1:]
        nll -= logp.gather(-1, target[..., None]).sum().item()
        count += target.numel()
        pred = logits.argmax(-1)
        top1.append(pred)
        if float_top1 is not None:
            agree += (pred == float_top1[start:start + batch_size]).sum().item()
    return math.exp(nll / count), torch.cat(top1), (agree / count if float_top1 is not None else None)


def encode(values: np.ndarray, fmt: str, importance=None, hessian=None) -> np.ndarray:
    """Decoded float32 values of `values` stored as `fmt`."""
    if fmt == "q8_0":
        return dequantize_q8_0(quantize_q8_0(values)).reshape(values.shape)
    if fmt == "q4_0":
        return dequantize_q4_0(quantize_q4_0(values)).reshape(values.shape)
    if fmt == "q4_0-imatrix":
        return dequantize_q4_0(quantize_q4_0_imatrix(values, importance)).reshape(values.shape)
    if fmt == "q4_0-gptq":
        return dequantize_q4_0(gptq_q4_0(values, hessian, importance)).reshape(values.shape)
    if fmt == "f32":
        return values
    raise ValueError(fmt)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--eval", type=Path, required=True)
    parser.add_argument("--calib", type=Path, required=True)
    parser.add_argument("--records", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--calib-records", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--candidates", default="q4_0,q4_0+q8_0head,imatrix+q8_0head,q8_0",
                        help="comma list of: q4_0, q4_0+q8_0head, imatrix+q8_0head, gptq+q8_0head, q8_0, "
                             "q4_0+q8_0down+head")
    parser.add_argument("--json", type=Path, help="write the numbers here too")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="sdpa").eval()
    if model.lm_head.weight is model.model.embed_tokens.weight:  # the decoding file stores both: untie
        model.lm_head.weight = torch.nn.Parameter(model.model.embed_tokens.weight.detach().clone())
    float_state = {name: p.detach().clone() for name, p in model.named_parameters()}
    ids = records(args.eval, tokenizer, args.records, args.tokens)
    calib = records(args.calib, tokenizer, args.calib_records, args.tokens)
    names = linear_names(model)
    body = [n for n in names if n != HEAD]

    t0 = time.time()
    float_ppl, float_top1, _ = evaluate(model, ids, args.batch_size)
    print(f"float perplexity {float_ppl:.3f}  ({time.time() - t0:.0f} s per evaluation)", flush=True)

    candidates = args.candidates.split(",")
    need_imp = any(c.startswith(("imatrix", "gptq")) for c in candidates)
    stats = {}
    if need_imp:
        t0 = time.time()
        hess = [n for n in body] if any(c.startswith("gptq") for c in candidates) else []
        stats = collect_importance(model, calib, batch_size=args.batch_size, hessian=hess)
        print(f"importance from {calib.numel()} calibration tokens ({time.time() - t0:.0f} s)", flush=True)

    def plan(candidate: str) -> dict[str, str]:
        """{parameter prefix: format} for the embedding, the head and every body Linear."""
        if candidate == "q4_0":
            return {EMBED: "q4_0", HEAD: "q4_0", **{n: "q4_0" for n in body}}
        if candidate == "q4_0+q8_0head":
            return {EMBED: "q8_0", HEAD: "q8_0", **{n: "q4_0" for n in body}}
        if candidate == "q4_0+q8_0down+head":
            return {EMBED: "q8_0", HEAD: "q8_0", **{n: "q8_0" if "down_proj" in n else "q4_0" for n in body}}
        if candidate == "imatrix+q8_0head":
            return {EMBED: "q8_0", HEAD: "q8_0", **{n: "q4_0-imatrix" for n in body}}
        if candidate == "gptq+q8_0head":
            return {EMBED: "q8_0", HEAD: "q8_0", **{n: "q4_0-gptq" for n in body}}
        if candidate == "q8_0":
            return {EMBED: "q8_0", HEAD: "q8_0", **{n: "q8_0" for n in body}}
        raise SystemExit(f"unknown candidate {candidate!r}")

    # Weighted error of the imatrix encoder on real matrices (the diagonal proxy of the output error).
    if stats:
        ratios = []
        for n in body:
            w = float_state[f"{n}.weight"].numpy()
            imp = stats[n]
            ref = weighted_error(w, encode(w, "q4_0"), imp)
            ours = weighted_error(w, encode(w, "q4_0-imatrix", imp), imp)
            ratios.append((n, ref, ours))
        r = np.array([o / f for _, f, o in ratios])
        example = [x for x in ratios if x[0].endswith("layers.15.mlp.down_proj")] or ratios[:1]
        print(f"imatrix Q4_0 vs reference Q4_0, importance-weighted relative error over {len(r)} matrices: "
              f"ratio mean {r.mean():.3f}, median {np.median(r):.3f}, min {r.min():.3f}, max {r.max():.3f}; "
              f"{example[0][0]}: {example[0][1]:.5f} -> {example[0][2]:.5f}", flush=True)

    rows = []
    for candidate in candidates:
        t0 = time.time()
        formats = plan(candidate)
        with torch.no_grad():
            for prefix, fmt in formats.items():
                w = float_state[f"{prefix}.weight"].numpy()
                decoded = encode(w, fmt, stats.get(prefix), stats.get(f"{prefix}#H"))
                dict(model.named_parameters())[f"{prefix}.weight"].copy_(torch.from_numpy(np.ascontiguousarray(decoded)))
        # Linears of the decoding file: what their vec_dot feeds them (q4_0* / q8_0 -> Q8_0 inputs)
        linear_formats = {n: ("q4_0" if formats[n].startswith("q4_0") else formats[n]) for n in names}
        encode_s = time.time() - t0
        ppl_w, _, agree_w = evaluate(model, ids, args.batch_size, float_top1)
        with mllm_cpu_numerics(model, linear_formats, kv_float16=True):
            ppl_s, _, agree_s = evaluate(model, ids, args.batch_size, float_top1)
        rows.append(dict(candidate=candidate, ppl_weights=ppl_w, ppl_cpu_numerics=ppl_s,
                         agree_weights=agree_w, agree_cpu_numerics=agree_s))
        print(f"{candidate:22s} weights only {ppl_w:8.3f} ({100 * (ppl_w / float_ppl - 1):+6.1f} %, top-1 {agree_w:.3f})"
              f" | + Q8_0 activations, f16 K/V {ppl_s:8.3f} ({100 * (ppl_s / float_ppl - 1):+6.1f} %, top-1 "
              f"{agree_s:.3f})  [{encode_s:.0f} s encode, {time.time() - t0:.0f} s]", flush=True)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(float_state[name])

    # The simulation alone on float weights: what the activation quantization and float16 K/V cost.
    with mllm_cpu_numerics(model, {n: "q8_0" for n in names}, kv_float16=True):
        ppl_f, _, agree_f = evaluate(model, ids, args.batch_size, float_top1)
    print(f"{'float weights':22s} + Q8_0 activations, f16 K/V {ppl_f:8.3f} ({100 * (ppl_f / float_ppl - 1):+6.1f} %, "
          f"top-1 {agree_f:.3f})", flush=True)

    print("\n| candidate | perplexity (weights only) | increase | perplexity (+ mllm CPU numerics) | increase | "
          "top-1 agreement (sim) |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(f"| float | {float_ppl:.3f} | | {ppl_f:.3f} | {100 * (ppl_f / float_ppl - 1):+.1f} % | {agree_f:.3f} |")
    for r in rows:
        print(f"| {r['candidate']} | {r['ppl_weights']:.3f} | {100 * (r['ppl_weights'] / float_ppl - 1):+.1f} % | "
              f"{r['ppl_cpu_numerics']:.3f} | {100 * (r['ppl_cpu_numerics'] / float_ppl - 1):+.1f} % | "
              f"{r['agree_cpu_numerics']:.3f} |")
    if args.json:
        args.json.write_text(json.dumps(dict(model=str(args.model), records=args.records, tokens=args.tokens,
                                             float=float_ppl, float_cpu_numerics=ppl_f, rows=rows), indent=1))


if __name__ == "__main__":
    main()
