"""Q4_0 blocks as mllm's CPU backend stores them (ggml's layout), written and read back.

A tensor is flattened row-major and cut into blocks of 32 values. Each block is 18 bytes: the
float16 step `d`, then 16 bytes holding 32 unsigned 4-bit codes, value j in the low nibble of
byte j and value j + 16 in the high nibble. Decoding is (code - 8) * d.

The encoder follows mllm's quantize_row_q4_0_reference
(mllm/backends/cpu/third_party/ggml/QuantizeQ4.cpp, the function its quantizer calls):
`max` is the signed value of largest magnitude (the first one on ties), d = max / -8 in float32,
codes = min(15, trunc(x * (1/d) + 8.5)) computed in float32 with the unrounded d, and d is
stored rounded to float16. Blocks straddling two rows would mix rows in the CPU matmul, so a
tensor whose last dimension is not a multiple of 32 is refused.
"""

from __future__ import annotations

import numpy as np

from shadowquant.errors import PipelineError
from shadowquant.decoding.ggml_blocks import BLOCK_VALUES, block_nbytes, block_view, check_block_shape

BLOCK_BYTES = 18
BLOCK_DTYPE = np.dtype([("d", "<f2"), ("qs", "u1", (16,))])


def q4_0_nbytes(num_values: int) -> int:
    """Bytes of `num_values` values in Q4_0 (a multiple of 32)."""
    return block_nbytes(num_values, BLOCK_BYTES, "Q4_0")


def check_q4_0_shape(name: str, shape: tuple[int, ...]) -> None:
    """Refuse a tensor whose rows do not split into whole Q4_0 blocks."""
    check_block_shape(name, shape, "Q4_0")


def q4_0_blocks(data: bytes | np.ndarray) -> np.ndarray:
    """The structured block array (fields `d`, `qs`) of Q4_0 bytes."""
    return block_view(data, BLOCK_DTYPE, "Q4_0")


def quantize_q4_0(values: np.ndarray) -> bytes:
    """Q4_0 bytes of `values` (any shape, flattened row-major; the count a multiple of 32)."""
    x = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    if x.size % BLOCK_VALUES:
        raise PipelineError(f"{x.size} values do not fill whole Q4_0 blocks of {BLOCK_VALUES}")
    if not np.isfinite(x).all():
        raise PipelineError("cannot store non-finite values as Q4_0")
    blocks = x.reshape(-1, BLOCK_VALUES)
    first_max = np.argmax(np.abs(blocks), axis=1)  # argmax takes the first of equal magnitudes, as the C loop
    signed_max = blocks[np.arange(blocks.shape[0]), first_max]
    d = (signed_max / np.float32(-8.0)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inverse = np.where(d != 0, np.float32(1.0) / d, np.float32(0.0)).astype(np.float32)
    scaled = (blocks * inverse[:, None]).astype(np.float32) + np.float32(8.5)
    codes = np.minimum(15, np.trunc(scaled)).astype(np.uint8)
    out = np.empty(blocks.shape[0], dtype=BLOCK_DTYPE)
    out["d"] = d.astype(np.float16)
    out["qs"] = codes[:, :16] | (codes[:, 16:] << 4)
    return out.tobytes()


def dequantize_q4_0(data: bytes | np.ndarray, num_values: int | None = None) -> np.ndarray:
    """The float32 values stored in Q4_0 bytes (flat)."""
    blocks = q4_0_blocks(data)
    if num_values is not None and num_values != blocks.size * BLOCK_VALUES:
        raise PipelineError(f"Q4_0 data holds {blocks.size * BLOCK_VALUES} values, expected {num_values}")
    low = (blocks["qs"] & 0x0F).astype(np.int8) - 8
    high = (blocks["qs"] >> 4).astype(np.int8) - 8
    codes = np.concatenate([low, high], axis=1).astype(np.float32)
    return (codes * blocks["d"].astype(np.float32)[:, None]).reshape(-1)
