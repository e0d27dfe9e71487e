"""The NPU layer ranking (sensitivity.csv under an NPU runtime profile) side by side in one run: each shadow
layer's run started at that layer from the no-shadow run's recorded layer outputs (layer_ranking's `replay`,
the pipeline's way) against a full forward per shadow layer, on the same records.

    python bench/bench_layer_ranking.py [--run results/smollm2-135m.rotate+smooth]
        [--calibration results/smollm2-135m/calibration.jsonl] [--num-samples 4] [--seq-len 128] [--threads 1]

Needs a finished default run (`make run`): the variant's act_scales.json, runtime_scales.json and
weight_range.json, and its transformed model. Prints both times, their ratio, and whether the rows (benefit,
NLL, CPU share) are the same to the bit.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from shadowquant.calibrate.sensitivity import stage_inputs
from shadowquant.runtimes.npu import layer_ranking, read_runtime_scales
from shadowquant.runtimes.profiles import get_profile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="results/smollm2-135m.rotate+smooth", help="the variant's results folder")
    parser.add_argument("--calibration", default="results/smollm2-135m/calibration.jsonl")
    parser.add_argument("--manifest", default="resources/models/smollm2-135m/transformed/rotate+smooth/manifest.json")
    parser.add_argument("--profile", default="qwen-npu-rotated")
    parser.add_argument("--num-samples", type=int, default=4, help="calibration records (the pipeline: 8)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a sensitivity job's)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run = Path(args.run)
    model, sequences, layers, scales = stage_inputs(args.manifest, args.calibration, run / "act_scales.json",
                                                    args.num_samples, args.seq_len, "cpu", "auto")
    profile = get_profile(args.profile, scales.get("meta", {}).get("family"))
    runtime_scales = read_runtime_scales(run / "runtime_scales.json", profile)
    weight_range = json.loads((run / "weight_range.json").read_text())["weight_range"]
    seconds, rows = {}, {}
    for replay in (False, True):
        start = time.perf_counter()
        rows[replay] = layer_ranking(model, layers, sequences, scales, runtime_scales, profile,
                                     weight_range=weight_range, progress=False, replay=replay)
        seconds[replay] = time.perf_counter() - start
    print(f"{'layer ranking':<28} {'layers':>6} {'records':>7} {'seconds':>8}")
    print(f"{'full forward per layer':<28} {len(rows[False]):>6} {len(sequences):>7} {seconds[False]:>8.1f}")
    print(f"{'replayed up to the layer':<28} {len(rows[True]):>6} {len(sequences):>7} {seconds[True]:>8.1f}")
    print(f"speed-up {seconds[False] / seconds[True]:.2f}x; same rows to the bit: {rows[True] == rows[False]}")


if __name__ == "__main__":
    main()
