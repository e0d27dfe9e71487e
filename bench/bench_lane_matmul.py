"""The CPU attention's float16 arithmetic, side by side in one run on the default model's attention shapes: the
lane accumulation (runtime_linear.fp16_lane_matmul) in place against its plain form (fp16_lane_matmul_plain),
and the whole causal attention in tiles of query rows (fp16_cpu_attention) against every row over every key
(fp16_cpu_attention_full).

    python bench/bench_lane_matmul.py [--batch 8] [--seq 128] [--heads 9] [--head-dim 64] [--threads 1]
                                      [--repeat 5]

Prints, for QK^T, PV and the attention, the best of `--repeat` times of each and their ratio, and checks that
both give the same values (the simulation's numbers do not move). Under the NPU profiles these two products are most of a
sweep point's evaluation time.
"""

from __future__ import annotations

import argparse
import timeit

import torch

from shadowquant.runtimes.runtime_linear import (fp16_cpu_attention, fp16_cpu_attention_full, fp16_lane_matmul,
                                                 fp16_lane_matmul_plain)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a sweep job's)")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    b, h, s, d = args.batch, args.heads, args.seq, args.head_dim
    q = torch.randn(b, h, s, d, generator=generator).half()
    k = torch.randn(b, h, d, s, generator=generator).half()
    probs = torch.softmax(torch.randn(b, h, s, s, generator=generator), -1).half()
    v = torch.randn(b, h, s, d, generator=generator).half()
    print(f"{'product':<8} {'shape':<28} {'plain s':>9} {'in place s':>11} {'speed-up':>9}  same")
    for name, x, y in (("QK^T", q, k), ("PV", probs, v)):
        plain = min(timeit.repeat(lambda: fp16_lane_matmul_plain(x, y), number=1, repeat=args.repeat))
        fast = min(timeit.repeat(lambda: fp16_lane_matmul(x, y), number=1, repeat=args.repeat))
        same = torch.equal(fp16_lane_matmul(x, y).view(torch.int32), fp16_lane_matmul_plain(x, y).view(torch.int32))
        shape = f"{list(x.shape)} @ {list(y.shape)[-2:]}"
        print(f"{name:<8} {shape:<28} {plain:>9.3f} {fast:>11.3f} {plain / fast:>8.2f}x  {same}")
    # The whole attention under a causal mask (None, as the evaluation's forward passes it): full vs tiled.
    module = type("Attention", (), {"num_key_value_groups": h // args.kv_heads})()
    query = torch.randn(b, h, s, d, generator=generator)
    key, value = (torch.randn(b, args.kv_heads, s, d, generator=generator) for _ in range(2))
    run_full = lambda: fp16_cpu_attention_full(module, query, key, value, None, d ** -0.5)[0]  # noqa: E731
    run_tiled = lambda: fp16_cpu_attention(module, query, key, value, None, d ** -0.5)[0]  # noqa: E731
    full = min(timeit.repeat(run_full, number=1, repeat=args.repeat))
    tiled = min(timeit.repeat(run_tiled, number=1, repeat=args.repeat))
    shape = f"{list(query.shape)} causal"
    print(f"{'attention':<9}{shape:<28} {full:>9.3f} {tiled:>11.3f} {full / tiled:>8.2f}x  "
          f"{torch.equal(run_full(), run_tiled())}")


if __name__ == "__main__":
    main()
