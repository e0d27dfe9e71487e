"""Q8_0 blocks as mllm's CPU backend stores them (ggml's layout), written and read back.

A tensor is flattened row-major and cut into blocks of 32 values. Each block is 34 bytes
(mllm/DataType.hpp, `block_q8_0`, packed): the float16 step `d`, then 32 signed 8-bit codes.
Decoding is code * d. mllm's dtype code for Q8_0 is 8 (`MLLM_TYPE_Q8_0` in mllm/Types.hpp).

The encoder follows mllm's quantize_row_q8_0 (mllm/backends/cpu/third_party/ggml/QuantizeQ8.cpp):
amax = the block's largest magnitude, d = amax / 127 in float32, stored rounded to float16
(round to nearest even, as F16C's and ARM's conversions do). The codes come from the unrounded d,
computed in float32, with one of the three code paths of that file (`variant`):

- "neon" (ARM, the phone): codes = round_half_even(x * (1 / d)) (vmulq_n_f32, vcvtnq_s32_f32);
- "avx2" (x86 with AVX2, how mllm's `quantize` tool built for a PC writes a model):
  codes = round_half_even(x * (127 / amax)) (_mm256_round_ps to nearest);
- "reference" (the scalar fallback, quantize_row_q8_0_reference): codes = roundf(x * (1 / d)),
  halves away from zero.

They differ only where x * id lands on (or one float32 step from) a half, a few codes in a
million. A block of zeros has d = 0 and codes 0. Blocks straddling two rows would mix rows in
the CPU matmul, so a tensor whose last dimension is not a multiple of 32 is refused.
"""

from __future__ import annotations

import numpy as np

from shadowquant.errors import PipelineError
from shadowquant.decoding.ggml_blocks import BLOCK_VALUES, block_nbytes, block_view, check_block_shape

BLOCK_BYTES = 34
BLOCK_DTYPE = np.dtype([("d", "<f2"), ("qs", "i1", (BLOCK_VALUES,))])
VARIANTS = ("neon", "avx2", "reference")
assert BLOCK_DTYPE.itemsize == BLOCK_BYTES


def q8_0_nbytes(num_values: int) -> int:
    """Bytes of `num_values` values in Q8_0 (a multiple of 32)."""
    return block_nbytes(num_values, BLOCK_BYTES, "Q8_0")


def check_q8_0_shape(name: str, shape: tuple[int, ...]) -> None:
    """Refuse a tensor whose rows do not split into whole Q8_0 blocks."""
    check_block_shape(name, shape, "Q8_0")


def _blocks(values: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    if x.size % BLOCK_VALUES:
        raise PipelineError(f"{x.size} values do not fill whole Q8_0 blocks of {BLOCK_VALUES}")
    if not np.isfinite(x).all():
        raise PipelineError("cannot store non-finite values as Q8_0")
    return x.reshape(-1, BLOCK_VALUES)


def q8_0_codes(values: np.ndarray, variant: str = "neon") -> tuple[np.ndarray, np.ndarray]:
    """(d as float16 per block, int8 codes per block [n_blocks, 32]) of `values` (flattened row-major)."""
    if variant not in VARIANTS:
        raise PipelineError(f"unknown Q8_0 variant {variant!r}: use one of {', '.join(VARIANTS)}")
    blocks = _blocks(values)
    amax = np.abs(blocks).max(axis=1)
    d = (amax / np.float32(127.0)).astype(np.float32)
    with np.errstate(divide="ignore"):
        if variant == "avx2":
            inverse = np.where(amax != 0, np.float32(127.0) / amax, np.float32(0.0)).astype(np.float32)
        else:
            inverse = np.where(d != 0, np.float32(1.0) / d, np.float32(0.0)).astype(np.float32)
    scaled = (blocks * inverse[:, None]).astype(np.float32)
    if variant == "reference":
        wide = scaled.astype(np.float64)  # |x| + 0.5 is exact in float64: roundf, halves away from zero
        rounded = np.copysign(np.floor(np.abs(wide) + 0.5), wide)
    else:
        rounded = np.rint(scaled)  # round half to even, as vcvtnq_s32_f32 / _MM_ROUND_NEAREST
    codes = np.clip(rounded, -128, 127).astype(np.int8)
    return d.astype(np.float16), codes


def quantize_q8_0(values: np.ndarray, variant: str = "avx2") -> bytes:
    """Q8_0 bytes of `values` (any shape, flattened row-major; the count a multiple of 32). The default
    variant is what mllm's quantize tool writes on an x86 host."""
    d, codes = q8_0_codes(values, variant)
    out = np.empty(d.size, dtype=BLOCK_DTYPE)
    out["d"] = d
    out["qs"] = codes
    return out.tobytes()


def q8_0_blocks(data: bytes | np.ndarray) -> np.ndarray:
    """The structured block array (fields `d`, `qs`) of Q8_0 bytes."""
    return block_view(data, BLOCK_DTYPE, "Q8_0")


def dequantize_q8_0(data: bytes | np.ndarray, num_values: int | None = None) -> np.ndarray:
    """The float32 values stored in Q8_0 bytes (flat), as dequantize_row_q8_0: code * float(d)."""
    blocks = q8_0_blocks(data)
    if num_values is not None and num_values != blocks.size * BLOCK_VALUES:
        raise PipelineError(f"Q8_0 data holds {blocks.size * BLOCK_VALUES} values, expected {num_values}")
    return (blocks["qs"].astype(np.float32) * blocks["d"].astype(np.float32)[:, None]).reshape(-1)


def fake_quantize_q8_0(values: np.ndarray, variant: str = "neon") -> np.ndarray:
    """`values` (float32, same shape) after a Q8_0 round trip: what mllm computes with."""
    d, codes = q8_0_codes(values, variant)
    return (codes.astype(np.float32) * d.astype(np.float32)[:, None]).reshape(np.shape(values))
