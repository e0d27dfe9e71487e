"""The float16 lane accumulation of the CPU attention (runtime_linear.fp16_lane_matmul), in place, against its
plain form (fp16_lane_matmul_plain), side by side in one run on the default model's attention shapes.

    python bench/bench_lane_matmul.py [--batch 8] [--seq 128] [--heads 9] [--head-dim 64] [--threads 1]
                                      [--repeat 5]

Prints, for QK^T and PV, the best of `--repeat` times of each and their ratio, and checks that both give the
same bits (the simulation's numbers do not move). Under the NPU profiles these two products are most of a
sweep point's evaluation time.
"""

from __future__ import annotations

import argparse
import timeit

import torch

from shadowquant.runtimes.runtime_linear import fp16_lane_matmul, fp16_lane_matmul_plain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--heads", type=int, default=9)
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
    print(f"{'product':<8} {'shape':<28} {'plain s':>9} {'in place s':>11} {'speed-up':>9}  same bits")
    for name, x, y in (("QK^T", q, k), ("PV", probs, v)):
        plain = min(timeit.repeat(lambda: fp16_lane_matmul_plain(x, y), number=1, repeat=args.repeat))
        fast = min(timeit.repeat(lambda: fp16_lane_matmul(x, y), number=1, repeat=args.repeat))
        same = torch.equal(fp16_lane_matmul(x, y).view(torch.int32), fp16_lane_matmul_plain(x, y).view(torch.int32))
        shape = f"{list(x.shape)} @ {list(y.shape)[-2:]}"
        print(f"{name:<8} {shape:<28} {plain:>9.3f} {fast:>11.3f} {plain / fast:>8.2f}x  {same}")


if __name__ == "__main__":
    main()
