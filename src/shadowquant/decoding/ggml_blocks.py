"""What ggml's block formats (Q4_0, Q8_0) share: 32 values per block, whole blocks per row, and the
byte view of stored blocks as a structured array (fields `d` and `qs`)."""

from __future__ import annotations

import numpy as np

from shadowquant.errors import PipelineError

BLOCK_VALUES = 32


def block_nbytes(num_values: int, block_bytes: int, fmt: str) -> int:
    """Bytes of `num_values` values stored in blocks of `block_bytes` (a multiple of 32 values)."""
    if num_values % BLOCK_VALUES:
        raise PipelineError(f"{num_values} values do not fill whole {fmt} blocks of {BLOCK_VALUES}")
    return num_values // BLOCK_VALUES * block_bytes


def check_block_shape(name: str, shape: tuple[int, ...], fmt: str) -> None:
    """Refuse a tensor whose rows do not split into whole blocks: the CPU matmul reads whole blocks per row."""
    if not shape or shape[-1] % BLOCK_VALUES:
        raise PipelineError(f"{name}: shape {tuple(shape)} cannot be stored as {fmt}: its last dimension must be a "
                            f"multiple of {BLOCK_VALUES} (mllm's CPU matmul reads whole blocks per row)")


def block_view(data: bytes | np.ndarray, block_dtype: np.dtype, fmt: str) -> np.ndarray:
    """The structured block array of stored bytes, refused unless they are whole blocks."""
    raw = np.frombuffer(data, dtype=np.uint8) if isinstance(data, (bytes, bytearray, memoryview)) else data
    raw = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1)
    if raw.size % block_dtype.itemsize:
        raise PipelineError(f"{raw.size} bytes are not whole {fmt} blocks of {block_dtype.itemsize} bytes")
    return raw.view(block_dtype)
