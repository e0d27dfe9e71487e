"""The tensor table of a .safetensors file, read from its header alone (no torch), with a completeness check.

Model directories (fetch) and int8 exports (conversion) both need it; an interrupted download or a
half-written export shows up here as a size that disagrees with the header.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

from shadowquant.errors import PipelineError


def read_tensor_table(path: str | os.PathLike, remedy: str) -> dict[str, dict[str, Any]]:
    """`{name: {"dtype", "shape", "data_offsets"}}` in header order; `remedy` ends every error message."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            file_size = os.fstat(handle.fileno()).st_size
            head = handle.read(8)
            (header_size,) = struct.unpack("<Q", head) if len(head) == 8 else (-1,)
            if header_size < 2 or header_size > file_size - 8:
                raise PipelineError(f"{path}: not a valid safetensors file (truncated or corrupt header, "
                                    f"{file_size} bytes); {remedy}")
            raw_header = handle.read(header_size)
    except OSError as exc:
        raise PipelineError(f"{path}: cannot open ({exc.strerror or exc}); {remedy}") from None
    try:
        header = json.loads(raw_header)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise PipelineError(f"{path}: not a valid safetensors file (the header is not JSON); {remedy}") from None
    if not isinstance(header, dict):
        raise PipelineError(f"{path}: not a valid safetensors file (the header is not a JSON object); {remedy}")
    tensors = {}
    data_end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            entry = {"dtype": str(info["dtype"]), "shape": [int(d) for d in info["shape"]],
                     "data_offsets": [int(info["data_offsets"][0]), int(info["data_offsets"][1])]}
        except (TypeError, KeyError, ValueError, IndexError):
            raise PipelineError(f"{path}: tensor {name!r} has a malformed header entry; {remedy}") from None
        tensors[name] = entry
        data_end = max(data_end, entry["data_offsets"][1])
    if 8 + header_size + data_end != file_size:
        raise PipelineError(f"{path}: safetensors file is truncated or corrupt ({file_size} bytes, its header "
                            f"describes {8 + header_size + data_end}); {remedy}")
    return tensors
