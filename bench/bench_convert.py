"""Benchmark the streaming safetensors -> mllm converter: throughput and peak memory.

Builds a synthetic int8/float32 safetensors file (~400 MB by default) in a temporary
directory, converts it in a fresh child process and prints MB/s and the child's
peak memory growth next to the largest tensor: streaming means peak ~ one tensor,
not the whole file.

    python bench/bench_convert.py [--size-mb N] [--version 1|2]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import struct
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HIDDEN = 2048
MB = 1e6


def synthetic_layout(size_mb: float) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, safetensors dtype, shape): a float32 embedding, then int8 layers until the size is reached."""
    layout = [("model.embed_tokens.weight", "F32", (8192, HIDDEN))]  # the largest tensor, 67 MB
    total = 8192 * HIDDEN * 4
    layer = 0
    while total < size_mb * MB:
        prefix = f"model.layers.{layer}"
        for proj, shape in (("mlp.up_proj", (HIDDEN, 4 * HIDDEN)), ("mlp.down_proj", (4 * HIDDEN, HIDDEN))):
            name = f"{prefix}.{proj}"
            layout += [
                (f"{name}.weight", "I8", shape),
                (f"{name}.weight.scale", "F32", ()),
                (f"{name}.input_scale", "F32", ()),
                (f"{name}.output_scale", "F32", ()),
                (f"{name}.clip_input", "BOOL", ()),
                (f"{name}.clip_output", "BOOL", ()),
            ]
            total += shape[0] * shape[1]
        layout.append((f"{prefix}.self_attn.o_proj.weight", "F32", (HIDDEN, HIDDEN)))
        layout.append((f"{prefix}.input_layernorm.weight", "F32", (HIDDEN,)))
        total += HIDDEN * HIDDEN * 4 + HIDDEN * 4
        layer += 1
    return layout


_ITEMSIZE = {"F32": 4, "I8": 1, "BOOL": 1}


def write_synthetic_safetensors(path: Path, layout) -> int:
    """Write the file tensor by tensor (never the whole model in memory); return its size."""
    rng = np.random.default_rng(0)
    header, offset = {}, 0
    for name, dtype, shape in layout:
        size = int(np.prod(shape, dtype=np.int64)) * _ITEMSIZE[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw_header = json.dumps(header).encode()
    raw_header += b" " * (-len(raw_header) % 8)  # keep the data 8-byte aligned
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(raw_header)) + raw_header)
        for _, dtype, shape in layout:
            if dtype == "F32":
                data = rng.standard_normal(shape, dtype=np.float32)
            elif dtype == "I8":
                data = rng.integers(-128, 128, shape, dtype=np.int8)
            else:
                data = rng.integers(0, 2, shape, dtype=np.uint8)
            out.write(data.tobytes())
    return path.stat().st_size


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _convert_and_measure(src: str, dst: str, version: int, queue) -> None:
    """Child process: convert once, report time and memory growth over the post-import baseline."""
    from shadowquant.export.mllm import convert_safetensors_to_mllm, read_mllm

    base_maxrss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    base_anon_kb = _status_kb("RssAnon")
    peak_anon_kb = [base_anon_kb]
    done = threading.Event()

    def sample() -> None:  # anonymous RSS excludes the clean file pages of safetensors' mmap
        while not done.is_set():
            peak_anon_kb[0] = max(peak_anon_kb[0], _status_kb("RssAnon"))
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    convert_safetensors_to_mllm(src, dst, version=version)
    elapsed = time.perf_counter() - start
    done.set()
    sampler.join()
    mllm = read_mllm(dst)
    int8_count = sum(entry.dtype == 16 for entry in mllm.entries)
    queue.put(
        {
            "seconds": elapsed,
            "maxrss_growth": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_maxrss_kb) * 1024,
            "anon_growth": (peak_anon_kb[0] - base_anon_kb) * 1024,
            "tensors": len(mllm.entries),
            "int8_tensors": int8_count,
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=400, help="approximate safetensors size (default 400)")
    parser.add_argument("--version", type=int, choices=(1, 2), default=1, help="mllm file version (default 1)")
    args = parser.parse_args()

    layout = synthetic_layout(args.size_mb)
    largest = max(int(np.prod(shape, dtype=np.int64)) * _ITEMSIZE[dtype] for _, dtype, shape in layout)
    with tempfile.TemporaryDirectory(prefix="bench_convert.") as tmp:
        src, dst = Path(tmp) / "model-int8.safetensors", Path(tmp) / "model.mllm"
        src_bytes = write_synthetic_safetensors(src, layout)
        context = multiprocessing.get_context("spawn")  # a fresh process: its peak RSS is the converter's
        queue = context.Queue()
        child = context.Process(target=_convert_and_measure, args=(str(src), str(dst), args.version, queue))
        child.start()
        result = queue.get()
        child.join()
        dst_bytes = dst.stat().st_size

    print(f"source:        {src_bytes / MB:8.1f} MB safetensors, {result['tensors']} tensors "
          f"({result['int8_tensors']} stored as int8)")
    print(f"output:        {dst_bytes / MB:8.1f} MB mllm v{args.version}")
    print(f"time:          {result['seconds']:8.2f} s  ->  {src_bytes / MB / result['seconds']:.0f} MB/s")
    print(f"largest tensor:{largest / MB:8.1f} MB")
    print(f"peak RSS growth (ru_maxrss, incl. mmap'd file pages): {result['maxrss_growth'] / MB:8.1f} MB "
          f"= {result['maxrss_growth'] / largest:.2f} x largest tensor")
    print(f"peak anonymous RSS growth (sampled):                  {result['anon_growth'] / MB:8.1f} MB "
          f"= {result['anon_growth'] / largest:.2f} x largest tensor")


if __name__ == "__main__":
    main()
