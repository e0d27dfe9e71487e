"""mllm's parameter loader, re-implemented in C++ (tests/native/mllm_param_loader.cpp): build and run it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

NATIVE = Path(__file__).parent / "native" / "mllm_param_loader.cpp"


def build_native_loader(out_dir: Path) -> Path | None:
    """Compile the loader with the system C++ compiler; None when there is none."""
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        return None
    binary = out_dir / "mllm_param_loader"
    subprocess.run([compiler, "-std=c++17", "-O2", "-Wall", "-Werror", "-o", str(binary), str(NATIVE)], check=True)
    return binary


def fnv1a64(data: bytes) -> str:
    """The hash the C++ loader prints for a tensor's bytes."""
    value = 1469598103934665603
    for byte in data:
        value = ((value ^ byte) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return f"{value:016x}"


def run_native_loader(binary: Path, path: Path, expected: dict | None = None, tmp_path: Path | None = None):
    """(tensors by name, index counters, expected-tensor statuses) as the C++ loader reports them."""
    args = [str(binary), str(path)]
    if expected is not None:
        table = tmp_path / "expected.tsv"
        table.write_text("".join(f"{n}\t{c}\t{s}\n" for n, (c, s) in expected.items()))
        args.append(str(table))
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout.splitlines()
    rows = [line.split("\t") for line in out]
    tensors = {f[1]: {"dtype": int(f[2]), "offset": int(f[3]), "length": int(f[4]), "read": int(f[5]),
                      "hash": f[6], "misaligned": int(f[7])} for f in rows if f[0] == "tensor"}
    index = next([int(v) for v in f[1:]] for f in rows if f[0] == "index")
    statuses = {f[1]: f[2] for f in rows if f[0] == "expect"}
    return tensors, index, statuses
