"""mllm model files (docs/method.md sections 5 and 6): streaming writers, a validating reader, a converter.

Writers take the metadata of every tensor up front (name, dtype, shape) and a
`load(name)` callable, so the index is computed before any tensor is loaded and
the data is then written one tensor at a time: peak memory is about one tensor.
"""

from __future__ import annotations

import math
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence, Union

import numpy as np
import torch
from tqdm import tqdm

from shadowquant.atomic import atomic_path
from shadowquant.errors import PipelineError
from shadowquant.decoding.q4_0 import BLOCK_BYTES as Q4_0_BLOCK_BYTES, BLOCK_VALUES as Q4_0_BLOCK_VALUES, dequantize_q4_0
from shadowquant.decoding.q8_0 import BLOCK_BYTES as Q8_0_BLOCK_BYTES, BLOCK_VALUES as Q8_0_BLOCK_VALUES, dequantize_q8_0
from shadowquant.export.dtypes import (
    DTYPE_BFLOAT16,
    DTYPE_FLOAT16,
    DTYPE_FLOAT32,
    DTYPE_INT16,
    DTYPE_INT32,
    DTYPE_INT64,
    DTYPE_INT8,
    DTYPE_ITEMSIZE,
    DTYPE_NAMES,
    DTYPE_Q4_0,
    DTYPE_Q8_0,
    DTYPE_UINT16,
    DTYPE_UINT32,
    DTYPE_UINT64,
    DTYPE_UINT8,
)
from shadowquant.export.safetensors_header import read_tensor_table

# ---- dtype codes (export/dtypes.py) -----------------------------------------------------------


V1_DTYPES = frozenset({DTYPE_FLOAT32, DTYPE_FLOAT16, DTYPE_INT8, DTYPE_INT16, DTYPE_INT32})
# What the reader accepts in v1: the writers' codes and the Q4_0 / Q8_0 blocks of a CPU decoding model.
V1_READ_DTYPES = V1_DTYPES | {DTYPE_Q4_0, DTYPE_Q8_0}
# Block formats: code -> (bytes per block, values per block).
BLOCK_DTYPES: dict[int, tuple[int, int]] = {DTYPE_Q4_0: (Q4_0_BLOCK_BYTES, Q4_0_BLOCK_VALUES),
                                            DTYPE_Q8_0: (Q8_0_BLOCK_BYTES, Q8_0_BLOCK_VALUES)}
V2_DTYPES = V1_DTYPES | {DTYPE_BFLOAT16, DTYPE_UINT8, DTYPE_UINT16, DTYPE_UINT32, DTYPE_INT64, DTYPE_UINT64}

# numpy dtype a stored code is read back as; bfloat16 has none and is widened to float32.
_NUMPY_OF_CODE: dict[int, np.dtype] = {
    DTYPE_FLOAT32: np.dtype("<f4"),
    DTYPE_FLOAT16: np.dtype("<f2"),
    DTYPE_INT8: np.dtype("i1"),
    DTYPE_INT16: np.dtype("<i2"),
    DTYPE_INT32: np.dtype("<i4"),
    DTYPE_UINT8: np.dtype("u1"),
    DTYPE_UINT16: np.dtype("<u2"),
    DTYPE_UINT32: np.dtype("<u4"),
    DTYPE_INT64: np.dtype("<i8"),
    DTYPE_UINT64: np.dtype("<u8"),
}

# torch dtype -> stored code, per version. bfloat16 is widened to float32 in v1 (the QNN
# backend has no bfloat16) and kept in v2; bool becomes int8 in both (clip flags are int8).
_V1_CODE_OF_TORCH: dict[torch.dtype, int] = {
    torch.float32: DTYPE_FLOAT32,
    torch.bfloat16: DTYPE_FLOAT32,
    torch.float16: DTYPE_FLOAT16,
    torch.int8: DTYPE_INT8,
    torch.bool: DTYPE_INT8,
    torch.int16: DTYPE_INT16,
    torch.int32: DTYPE_INT32,
}
_V2_CODE_OF_TORCH: dict[torch.dtype, int] = {
    **_V1_CODE_OF_TORCH,
    torch.bfloat16: DTYPE_BFLOAT16,
    torch.uint8: DTYPE_UINT8,
    torch.int64: DTYPE_INT64,
}
for _name, _code in (("uint16", DTYPE_UINT16), ("uint32", DTYPE_UINT32), ("uint64", DTYPE_UINT64)):
    if hasattr(torch, _name):  # unsigned wide types exist in torch >= 2.3
        _V2_CODE_OF_TORCH[getattr(torch, _name)] = _code

_TORCH_OF_NUMPY: dict[np.dtype, torch.dtype] = {
    np.dtype(np.float32): torch.float32,
    np.dtype(np.float16): torch.float16,
    np.dtype(np.float64): torch.float64,
    np.dtype(np.int8): torch.int8,
    np.dtype(np.int16): torch.int16,
    np.dtype(np.int32): torch.int32,
    np.dtype(np.int64): torch.int64,
    np.dtype(np.uint8): torch.uint8,
    np.dtype(np.bool_): torch.bool,
}
for _name in ("uint16", "uint32", "uint64"):
    if hasattr(torch, _name):
        _TORCH_OF_NUMPY[np.dtype(_name)] = getattr(torch, _name)

# safetensors header dtype strings.
_TORCH_OF_SAFETENSORS: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _st, _name in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"),
                   ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _name):
        _TORCH_OF_SAFETENSORS[_st] = getattr(torch, _name)

# ---- layouts -------------------------------------------------------------------------------

V1_MAGIC = 20012
V1_HEADER = struct.Struct("<iQ")  # magic, index_size
V1_ENTRY_FIXED = struct.Struct("<QQi")  # data_size, data_offset, dtype (after int32 name_len + name)
V1_MAX_NAME_BYTES = 4096  # far above any real parameter name; bounds garbage in foreign files

V2_MAGIC = 0x519A
V2_VERSION = 2
V2_MODEL_NAME_BYTES = 512
V2_PARAM_NAME_BYTES = 256
V2_MAX_DIMS = 16
V2_HEADER = struct.Struct(f"<II{V2_MODEL_NAME_BYTES}sIQ")  # 532 bytes
V2_DESCRIPTOR = struct.Struct(f"<IIQQQ{V2_MAX_DIMS}i{V2_PARAM_NAME_BYTES}s")  # 352 bytes

Tensor = Union[torch.Tensor, np.ndarray]
DtypeLike = Union[torch.dtype, np.dtype, type, str]


@dataclass(frozen=True)
class TensorSpec:
    """What a writer needs before loading a tensor: its name, source dtype and shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class MllmEntry:
    """One tensor of an mllm file. `shape` is None for v1 (the format stores none)."""

    name: str
    dtype: int
    offset: int
    size: int
    shape: tuple[int, ...] | None = None

    @property
    def numel(self) -> int:
        if self.dtype in BLOCK_DTYPES:
            block_bytes, block_values = BLOCK_DTYPES[self.dtype]
            return self.size // block_bytes * block_values
        return self.size // DTYPE_ITEMSIZE[self.dtype]

    @property
    def dtype_name(self) -> str:
        return DTYPE_NAMES[self.dtype]


# ---- dtype mapping -------------------------------------------------------------------------


def as_torch_dtype(dtype: DtypeLike) -> torch.dtype:
    """Normalise a torch or numpy dtype (or numpy dtype name) to a torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        np_dtype = np.dtype(dtype)
    except TypeError as exc:
        raise PipelineError(f"unknown dtype {dtype!r}: give a torch or numpy dtype") from exc
    if np_dtype not in _TORCH_OF_NUMPY:
        raise PipelineError(f"numpy dtype {np_dtype} has no torch equivalent for mllm export")
    return _TORCH_OF_NUMPY[np_dtype]


def stored_dtype_code(dtype: DtypeLike, version: int, name: str = "<tensor>") -> int:
    """The dtype code a tensor of `dtype` is stored with in an mllm file of `version`."""
    torch_dtype = as_torch_dtype(dtype)
    table = _V1_CODE_OF_TORCH if version == 1 else _V2_CODE_OF_TORCH
    if torch_dtype not in table:
        valid = ", ".join(sorted(str(d).removeprefix("torch.") for d in table))
        raise PipelineError(
            f"tensor {name!r}: dtype {str(torch_dtype).removeprefix('torch.')} cannot be stored in an "
            f"mllm v{version} file (supported: {valid})"
        )
    return table[torch_dtype]


# ---- writing -------------------------------------------------------------------------------

SpecLike = Union[TensorSpec, tuple]
Loader = Callable[[str], Tensor]


def _as_spec(item: SpecLike) -> TensorSpec:
    if isinstance(item, TensorSpec):
        return item
    name, dtype, shape = item
    return TensorSpec(str(name), as_torch_dtype(dtype), tuple(int(d) for d in shape))


def _specs_and_loader(
    tensors: Iterable[SpecLike] | Mapping[str, Tensor] | Iterable[tuple[str, Tensor]],
    load: Loader | None,
) -> tuple[list[TensorSpec], Loader]:
    """Accept either (specs, load) or in-memory (name, tensor) pairs / a mapping."""
    if load is not None:
        return [_as_spec(item) for item in tensors], load
    pairs = list(tensors.items()) if isinstance(tensors, Mapping) else list(tensors)
    by_name: dict[str, Tensor] = {}
    specs = []
    for name, tensor in pairs:
        if not isinstance(tensor, (torch.Tensor, np.ndarray)):
            raise PipelineError(
                f"tensor {name!r}: got {type(tensor).__name__}, expected a torch.Tensor or numpy array "
                "(or pass specs plus a load(name) callable)"
            )
        by_name[name] = tensor
        specs.append(TensorSpec(name, as_torch_dtype(tensor.dtype), tuple(tensor.shape)))
    return specs, by_name.__getitem__


def _check_names(specs: Sequence[TensorSpec]) -> None:
    seen: set[str] = set()
    for spec in specs:
        if not spec.name:
            raise PipelineError("empty tensor name: every mllm tensor needs a non-empty name")
        if spec.name in seen:
            raise PipelineError(f"tensor {spec.name!r} appears twice: mllm tensor names must be unique")
        seen.add(spec.name)


def aligned_offset(offset: int, code: int) -> int:
    """`offset` rounded up to the alignment of dtype `code`: its element size (a block format: its float16
    step). mllm maps the file and reads every tensor in place; the index's length depends on the names,
    so the data does not start aligned by itself."""
    unit = 2 if code in BLOCK_DTYPES else DTYPE_ITEMSIZE[code]
    return -(-offset // unit) * unit


def _plan_entries(specs: Sequence[TensorSpec], version: int, data_start: int) -> list[MllmEntry]:
    """Lay out every tensor's bytes from `data_start`, each at its dtype's alignment (metadata only)."""
    entries = []
    offset = data_start
    for spec in specs:
        code = stored_dtype_code(spec.dtype, version, spec.name)
        size = spec.numel * DTYPE_ITEMSIZE[code]
        offset = aligned_offset(offset, code)
        entries.append(MllmEntry(spec.name, code, offset, size, spec.shape if version == 2 else None))
        offset += size
    return entries


def _tensor_bytes(tensor: Tensor, spec: TensorSpec, code: int) -> np.ndarray:
    """The stored bytes of one tensor as a flat uint8 array (converted to the stored dtype)."""
    if isinstance(tensor, np.ndarray):
        with warnings.catch_warnings():  # a read-only array (e.g. a memmap) is only read here
            warnings.simplefilter("ignore", UserWarning)
            tensor = torch.from_numpy(np.ascontiguousarray(tensor))
    if not isinstance(tensor, torch.Tensor):
        raise PipelineError(f"tensor {spec.name!r}: load() returned {type(tensor).__name__}, expected a tensor")
    if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
        raise PipelineError(
            f"tensor {spec.name!r}: loaded {str(tensor.dtype).removeprefix('torch.')} {tuple(tensor.shape)} "
            f"but the index was written for {str(spec.dtype).removeprefix('torch.')} {spec.shape}"
        )
    tensor = tensor.detach().to("cpu")
    if code == DTYPE_FLOAT32 and tensor.dtype != torch.float32:
        tensor = tensor.to(torch.float32)  # bfloat16 in v1
    elif code == DTYPE_INT8 and tensor.dtype == torch.bool:
        tensor = tensor.to(torch.int8)
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy()


def _write_file(
    path: str | os.PathLike,
    prefix: bytes,
    specs: Sequence[TensorSpec],
    entries: Sequence[MllmEntry],
    load: Loader,
) -> None:
    """Write the header/index bytes, then each tensor's data in order, atomically."""
    total = sum(entry.size for entry in entries)
    with atomic_path(path) as tmp, open(tmp, "wb") as out:
        out.write(prefix)
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"write {Path(path).name}", leave=False) as bar:
            for spec, entry in zip(specs, entries):
                if out.tell() < entry.offset:  # alignment padding
                    out.write(bytes(entry.offset - out.tell()))
                if out.tell() != entry.offset:  # only a bug in the layout code could do this
                    raise PipelineError(f"{path}: tensor {spec.name!r} would land at {out.tell()}, not {entry.offset}")
                data = _tensor_bytes(load(spec.name), spec, entry.dtype)
                if data.nbytes != entry.size:
                    raise PipelineError(f"tensor {spec.name!r}: {data.nbytes} bytes, index says {entry.size}")
                out.write(data)
                del data
                bar.update(entry.size)


def write_mllm_v1(
    path: str | os.PathLike,
    tensors: Iterable[SpecLike] | Mapping[str, Tensor] | Iterable[tuple[str, Tensor]],
    load: Loader | None = None,
) -> list[MllmEntry]:
    """Write an mllm v1 file, streaming one tensor at a time.

    Either `tensors` is a list of specs (TensorSpec or (name, dtype, shape)) and
    `load(name)` returns each tensor when its turn comes, or `load` is None and
    `tensors` holds (name, tensor) pairs / a name->tensor mapping.
    """
    specs, load = _specs_and_loader(tensors, load)
    _check_names(specs)
    encoded = [spec.name.encode("utf-8") for spec in specs]
    index_size = sum(4 + len(name) + V1_ENTRY_FIXED.size for name in encoded)
    entries = _plan_entries(specs, 1, V1_HEADER.size + index_size)
    parts = [V1_HEADER.pack(V1_MAGIC, index_size)]
    for name, entry in zip(encoded, entries):
        parts.append(struct.pack("<i", len(name)) + name + V1_ENTRY_FIXED.pack(entry.size, entry.offset, entry.dtype))
    _write_file(path, b"".join(parts), specs, entries, load)
    return entries


def write_mllm_v1_encoded(
    path: str | os.PathLike,
    items: Sequence[tuple[str, int, int]],
    load_bytes: Callable[[str], bytes],
) -> list[MllmEntry]:
    """Write an mllm v1 file of already-encoded tensors: `items` are (name, dtype code, byte size) and
    `load_bytes(name)` returns each one's bytes when its turn comes (Q4_0 blocks, for instance)."""
    _check_names([TensorSpec(name, torch.uint8, (size,)) for name, _, size in items])
    encoded = [name.encode("utf-8") for name, _, _ in items]
    index_size = sum(4 + len(name) + V1_ENTRY_FIXED.size for name in encoded)
    offset = V1_HEADER.size + index_size
    entries, parts = [], [V1_HEADER.pack(V1_MAGIC, index_size)]
    for name, (text, code, size) in zip(encoded, items):
        if code not in V1_READ_DTYPES:
            raise PipelineError(f"tensor {text!r}: dtype code {code} is not an mllm v1 code")
        offset = aligned_offset(offset, code)
        entries.append(MllmEntry(text, code, offset, size))
        parts.append(struct.pack("<i", len(name)) + name + V1_ENTRY_FIXED.pack(size, offset, code))
        offset += size
    with atomic_path(path) as tmp, open(tmp, "wb") as out:
        out.write(b"".join(parts))
        for entry in tqdm(entries, desc=f"write {Path(path).name}", unit="tensor", leave=False):
            data = load_bytes(entry.name)
            out.write(bytes(entry.offset - out.tell()))  # alignment padding
            if len(data) != entry.size:
                raise PipelineError(f"tensor {entry.name!r}: {len(data)} bytes, index says {entry.size}")
            out.write(data)
    return entries


def write_mllm_v2(
    path: str | os.PathLike,
    tensors: Iterable[SpecLike] | Mapping[str, Tensor] | Iterable[tuple[str, Tensor]],
    load: Loader | None = None,
    model_name: str = "",
) -> list[MllmEntry]:
    """Write an mllm v2 file (532-byte header, 352-byte descriptors, then data), streaming.

    Arguments as for `write_mllm_v1`. Descriptor ids are 0..n-1 in file order.
    """
    specs, load = _specs_and_loader(tensors, load)
    _check_names(specs)
    model_name_bytes = model_name.encode("utf-8")
    if len(model_name_bytes) >= V2_MODEL_NAME_BYTES:
        raise PipelineError(
            f"model name {model_name[:40]!r}... is {len(model_name_bytes)} bytes: mllm v2 allows at most "
            f"{V2_MODEL_NAME_BYTES - 1}"
        )
    for spec in specs:
        if len(spec.name.encode("utf-8")) >= V2_PARAM_NAME_BYTES:
            raise PipelineError(
                f"tensor {spec.name!r} has a {len(spec.name.encode('utf-8'))}-byte name: mllm v2 allows at most "
                f"{V2_PARAM_NAME_BYTES - 1}"
            )
        if len(spec.shape) > V2_MAX_DIMS:
            raise PipelineError(
                f"tensor {spec.name!r} has {len(spec.shape)} dimensions: mllm v2 allows at most {V2_MAX_DIMS}"
            )
        if any(d < 0 or d > 2**31 - 1 for d in spec.shape):
            raise PipelineError(f"tensor {spec.name!r}: shape {spec.shape} does not fit int32 dims")
    desc_offset = V2_HEADER.size
    entries = _plan_entries(specs, 2, desc_offset + V2_DESCRIPTOR.size * len(specs))
    parts = [V2_HEADER.pack(V2_MAGIC, V2_VERSION, model_name_bytes, len(specs), desc_offset)]
    for param_id, entry in enumerate(entries):
        dims = list(entry.shape) + [0] * (V2_MAX_DIMS - len(entry.shape))
        parts.append(
            V2_DESCRIPTOR.pack(
                param_id, entry.dtype, entry.size, entry.offset, len(entry.shape), *dims, entry.name.encode("utf-8")
            )
        )
    _write_file(path, b"".join(parts), specs, entries, load)
    return entries


# ---- reading -------------------------------------------------------------------------------


@dataclass(frozen=True)
class MllmFile:
    """The parsed, validated index of an mllm file; `read(name)` loads one tensor's data."""

    path: Path
    version: int
    entries: tuple[MllmEntry, ...]
    file_size: int
    model_name: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {entry.name: entry for entry in self.entries})

    @property
    def names(self) -> list[str]:
        return [entry.name for entry in self.entries]

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def entry(self, name: str) -> MllmEntry:
        try:
            return self._by_name[name]
        except KeyError:
            raise PipelineError(f"{self.path}: no tensor named {name!r}") from None

    def read_raw(self, name: str) -> bytes:
        """The stored bytes of tensor `name`."""
        entry = self.entry(name)
        with open(self.path, "rb") as handle:
            handle.seek(entry.offset)
            data = handle.read(entry.size)
        if len(data) != entry.size:
            raise PipelineError(f"{self.path}: truncated while reading tensor {name!r}")
        return data

    def read(self, name: str) -> np.ndarray:
        """Tensor `name` as a numpy array: 1-D for v1, its stored shape for v2.

        bfloat16 (v2) has no numpy type and comes back widened to float32.
        """
        entry = self.entry(name)
        raw = bytearray(entry.size)
        with open(self.path, "rb") as handle:
            handle.seek(entry.offset)
            if handle.readinto(raw) != entry.size:
                raise PipelineError(f"{self.path}: truncated while reading tensor {name!r}")
        if entry.dtype == DTYPE_Q4_0:
            return dequantize_q4_0(raw)
        if entry.dtype == DTYPE_Q8_0:
            return dequantize_q8_0(raw)
        if entry.dtype == DTYPE_BFLOAT16:
            halves = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
            array = halves.view(np.float32)
        else:
            array = np.frombuffer(raw, dtype=_NUMPY_OF_CODE[entry.dtype])
        return array.reshape(entry.shape) if entry.shape is not None else array


def _fail(path: Path, what: str) -> PipelineError:
    return PipelineError(f"{path}: {what}")


def _check_data_range(path: Path, name: str, code: int, offset: int, size: int, data_start: int,
                      file_size: int, valid_codes: frozenset[int]) -> None:
    if code not in valid_codes:
        known = ", ".join(f"{c} {DTYPE_NAMES[c]}" for c in sorted(valid_codes))
        raise _fail(path, f"tensor {name!r} has dtype code {code}, not one this reader knows ({known})")
    if offset < data_start or offset + size > file_size:
        raise _fail(
            path,
            f"tensor {name!r} data [{offset}, {offset + size}) lies outside the data region "
            f"[{data_start}, {file_size}): truncated or corrupt file",
        )
    unit = BLOCK_DTYPES[code][0] if code in BLOCK_DTYPES else DTYPE_ITEMSIZE[code]
    if size % unit:
        raise _fail(path, f"tensor {name!r}: {size} bytes is not a multiple of the {DTYPE_NAMES[code]} element size")


def _read_v1(path: Path, handle, file_size: int) -> MllmFile:
    header = handle.read(V1_HEADER.size)
    if len(header) < V1_HEADER.size:
        raise _fail(path, f"truncated mllm v1 file: {file_size} bytes, the header alone is {V1_HEADER.size}")
    _, index_size = V1_HEADER.unpack(header)
    data_start = V1_HEADER.size + index_size
    if data_start > file_size:
        raise _fail(path, f"truncated mllm v1 file: index of {index_size} bytes but the file has {file_size}")
    index = handle.read(index_size)
    entries: list[MllmEntry] = []
    seen: set[str] = set()
    pos = 0
    while pos < index_size:
        if pos + 4 > index_size:
            raise _fail(path, f"mllm v1 index ends inside an entry at byte {V1_HEADER.size + pos}")
        (name_len,) = struct.unpack_from("<i", index, pos)
        pos += 4
        if not 0 < name_len <= V1_MAX_NAME_BYTES or pos + name_len + V1_ENTRY_FIXED.size > index_size:
            raise _fail(path, f"mllm v1 index entry {len(entries)} has an impossible name length {name_len}")
        try:
            name = index[pos:pos + name_len].decode("utf-8")
        except UnicodeDecodeError:
            raise _fail(path, f"mllm v1 index entry {len(entries)} has a name that is not UTF-8") from None
        pos += name_len
        size, offset, code = V1_ENTRY_FIXED.unpack_from(index, pos)
        pos += V1_ENTRY_FIXED.size
        if name in seen:
            raise _fail(path, f"tensor {name!r} appears twice in the index")
        seen.add(name)
        _check_data_range(path, name, code, offset, size, data_start, file_size, V1_READ_DTYPES)
        entries.append(MllmEntry(name, code, offset, size))
    return MllmFile(path, 1, tuple(entries), file_size)


def _read_v2(path: Path, handle, file_size: int) -> MllmFile:
    header = handle.read(V2_HEADER.size)
    if len(header) < V2_HEADER.size:
        raise _fail(path, f"truncated mllm v2 file: {file_size} bytes, the header alone is {V2_HEADER.size}")
    _, version, raw_model_name, num_params, desc_offset = V2_HEADER.unpack(header)
    if version != V2_VERSION:
        raise _fail(path, f"mllm v2 magic but version {version}; this reader knows version {V2_VERSION}")
    data_start = desc_offset + num_params * V2_DESCRIPTOR.size
    if desc_offset < V2_HEADER.size or data_start > file_size:
        raise _fail(
            path,
            f"truncated mllm v2 file: {num_params} descriptors at byte {desc_offset} need {data_start} bytes, "
            f"the file has {file_size}",
        )
    try:
        model_name = raw_model_name.split(b"\0", 1)[0].decode("utf-8")
    except UnicodeDecodeError:
        raise _fail(path, "mllm v2 model name is not UTF-8") from None
    handle.seek(desc_offset)
    descriptors = handle.read(num_params * V2_DESCRIPTOR.size)
    entries: list[MllmEntry] = []
    seen: set[str] = set()
    for index in range(num_params):
        fields = V2_DESCRIPTOR.unpack_from(descriptors, index * V2_DESCRIPTOR.size)
        _, code, size, offset, ndim = fields[:5]
        dims, raw_name = fields[5:5 + V2_MAX_DIMS], fields[-1]
        if b"\0" not in raw_name or raw_name[0] == 0:
            raise _fail(path, f"mllm v2 descriptor {index} has no NUL-terminated name")
        try:
            name = raw_name.split(b"\0", 1)[0].decode("utf-8")
        except UnicodeDecodeError:
            raise _fail(path, f"mllm v2 descriptor {index} has a name that is not UTF-8") from None
        if ndim > V2_MAX_DIMS or any(d < 0 for d in dims[:ndim]):
            raise _fail(path, f"tensor {name!r} has an impossible shape (ndim {ndim}, dims {dims[:ndim]})")
        if name in seen:
            raise _fail(path, f"tensor {name!r} appears twice in the descriptors")
        seen.add(name)
        _check_data_range(path, name, code, offset, size, data_start, file_size, V2_DTYPES)
        shape = tuple(dims[:ndim])
        if math.prod(shape) * DTYPE_ITEMSIZE[code] != size:
            raise _fail(path, f"tensor {name!r}: shape {shape} of {DTYPE_NAMES[code]} does not make {size} bytes")
        entries.append(MllmEntry(name, code, offset, size, shape))
    return MllmFile(path, 2, tuple(entries), file_size, model_name)


def read_mllm(path: str | os.PathLike) -> MllmFile:
    """Parse and validate the index of an mllm v1 or v2 file without reading tensor data."""
    path = Path(path)
    try:
        handle = open(path, "rb")
    except OSError as exc:
        raise _fail(path, f"cannot open: {exc.strerror or exc}") from None
    with handle:
        file_size = os.fstat(handle.fileno()).st_size
        head = handle.read(4)
        handle.seek(0)
        if len(head) < 4:
            raise _fail(path, f"not an mllm file: only {file_size} bytes")
        if struct.unpack("<i", head)[0] == V1_MAGIC:
            return _read_v1(path, handle, file_size)
        if struct.unpack("<I", head)[0] == V2_MAGIC:
            return _read_v2(path, handle, file_size)
        raise _fail(
            path,
            f"not an mllm file: first bytes {head.hex()} match neither the v1 magic {V1_MAGIC} nor the v2 magic "
            f"{V2_MAGIC:#x}",
        )


# ---- safetensors ---------------------------------------------------------------------------


def read_safetensors_specs(path: str | os.PathLike) -> list[TensorSpec]:
    """Name, dtype and shape of every tensor of a safetensors file, in data order (header only)."""
    path = Path(path)
    records = []
    for name, info in read_tensor_table(path, "write the export again").items():
        if info["dtype"] not in _TORCH_OF_SAFETENSORS:
            raise _fail(path, f"tensor {name!r} has dtype {info['dtype']}, which cannot go into an mllm file")
        records.append((info["data_offsets"][0], TensorSpec(name, _TORCH_OF_SAFETENSORS[info["dtype"]],
                                                            tuple(info["shape"]))))
    records.sort(key=lambda record: record[0])
    return [spec for _, spec in records]


def convert_safetensors_to_mllm(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    version: int = 1,
    model_name: str | None = None,
) -> list[MllmEntry]:
    """Convert a safetensors file to mllm v1/v2, one tensor in memory at a time.

    Tensor order is the file's data order. int8 and bool land as int8 (16),
    bfloat16 as float32 in v1 (kept as bfloat16 in v2). `model_name` (v2 only)
    defaults to the source file's stem.
    """
    from safetensors import SafetensorError, safe_open

    if version not in (1, 2):
        raise PipelineError(f"mllm version {version!r} is not supported: use 1 or 2")
    src = Path(src)
    specs = read_safetensors_specs(src)

    def load(name: str) -> torch.Tensor:
        # One handle per tensor: get_tensor maps the file zero-copy and the mapping stays
        # resident until its handle closes, so a single long-lived handle would end up
        # holding the whole file in RSS. Here only the tensor being written is mapped.
        with safe_open(str(src), framework="pt", device="cpu") as source:
            return source.get_tensor(name)

    try:
        with safe_open(str(src), framework="pt", device="cpu") as source:
            if set(source.keys()) != {spec.name for spec in specs}:
                raise _fail(src, "safetensors tensor list disagrees with its header")
        if version == 1:
            return write_mllm_v1(dst, specs, load)
        return write_mllm_v2(dst, specs, load, model_name if model_name is not None else src.stem)
    except SafetensorError as exc:
        raise _fail(src, f"unreadable safetensors file: {exc}") from None
