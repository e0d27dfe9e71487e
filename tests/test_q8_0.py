"""Q8_0 blocks (q8_0.py) and their place in the mllm reader."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from shadowquant.errors import PipelineError
from shadowquant.export.mllm import DTYPE_Q8_0, read_mllm, write_mllm_v1_encoded
from shadowquant.decoding.q8_0 import (BLOCK_BYTES, check_q8_0_shape, dequantize_q8_0, fake_quantize_q8_0,
                              q8_0_nbytes, quantize_q8_0)


def test_layout_constants():
    assert BLOCK_BYTES == 34 and DTYPE_Q8_0 == 8  # mllm/DataType.hpp block_q8_0; Types.hpp enum
    assert q8_0_nbytes(64) == 68
    with pytest.raises(PipelineError):
        q8_0_nbytes(33)


def test_hand_computed_block():
    # amax 127 -> d = 1.0 exactly (float16 0x3C00) and x * (1/d) = x: the codes are the roundings of x.
    x = np.zeros(32, np.float32)
    x[:8] = [127.0, -3.5, 2.5, 0.5, -0.5, 1.49, -126.6, 3.0]
    d_bytes = b"\x00\x3c"
    even = [127, -4, 2, 0, 0, 1, -127, 3] + [0] * 24  # ARM (vcvtnq) and AVX2: halves to even
    away = [127, -4, 3, 1, -1, 1, -127, 3] + [0] * 24  # the scalar reference's roundf: halves away from zero
    assert quantize_q8_0(x, "neon") == d_bytes + np.array(even, np.int8).tobytes()
    assert quantize_q8_0(x, "avx2") == d_bytes + np.array(even, np.int8).tobytes()
    assert quantize_q8_0(x, "reference") == d_bytes + np.array(away, np.int8).tobytes()
    # a block of zeros: d = 0, codes 0; a negative extreme gives -127, never -128
    assert quantize_q8_0(np.zeros(32, np.float32)) == bytes(34)
    y = np.full(32, 0.25, np.float32)
    y[3] = -2.0
    block = quantize_q8_0(y, "neon")
    assert block[:2] == np.float16(np.float32(2.0) / np.float32(127.0)).tobytes()
    codes = np.frombuffer(block[2:], np.int8)
    assert codes[3] == -127 and (np.delete(codes, 3) == 16).all()  # 0.25 * 63.5 = 15.875 -> 16


def test_round_trip_error_bound():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((64, 256)) * rng.lognormal(0, 2, (64, 1))).astype(np.float32)
    data = quantize_q8_0(x)
    assert len(data) == q8_0_nbytes(x.size)
    back = dequantize_q8_0(data, x.size).reshape(x.shape)
    blocks = np.abs(x).reshape(-1, 32).max(axis=1) / 127
    bound = (blocks * (0.5 + 127 * 2.0 ** -11))[:, None] * 1.0001  # half a step plus the float16 rounding of d
    assert (np.abs(back - x).reshape(-1, 32) <= bound).all()
    assert np.array_equal(fake_quantize_q8_0(x, "avx2"), back)


def test_refusals():
    with pytest.raises(PipelineError):
        quantize_q8_0(np.zeros(31, np.float32))
    with pytest.raises(PipelineError):
        quantize_q8_0(np.array([np.nan] + [0.0] * 31, np.float32))
    with pytest.raises(PipelineError):
        quantize_q8_0(np.zeros(32, np.float32), "sse")
    with pytest.raises(PipelineError):
        check_q8_0_shape("w", (4, 48))
    check_q8_0_shape("w", (4, 64))
    with pytest.raises(PipelineError):
        dequantize_q8_0(b"\x00" * 35)


def test_mllm_reader_decodes_q8_0(tmp_path):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((8, 64)).astype(np.float32)
    data = quantize_q8_0(w)
    path = tmp_path / "m.mllm"
    write_mllm_v1_encoded(path, [("w", DTYPE_Q8_0, len(data))], lambda name: data)
    stored = read_mllm(path)
    entry = stored.entry("w")
    assert entry.dtype == DTYPE_Q8_0 and entry.dtype_name == "q8_0" and entry.numel == w.size
    assert stored.read_raw("w") == data
    assert np.array_equal(stored.read("w"), dequantize_q8_0(data))


# ---- byte identity with mllm's own quantize_row_q8_0 (needs mllm's source tree) -----------------

_HARNESS = r"""
#include <cstdio>
#include <cstdlib>
#include <vector>
#include "QuantizeQ8.hpp"
void quantize_row_q8_0_reference(float *__restrict x, block_q8_0 *__restrict y, int k);
int main(int argc, char **argv) {
    int n = atoi(argv[2]);
    std::vector<float> x(n);
    FILE *f = fopen(argv[1], "rb"); if (fread(x.data(), 4, n, f) != (size_t)n) return 1; fclose(f);
    std::vector<block_q8_0> y(n / 32), z(n / 32);
    quantize_row_q8_0(x.data(), y.data(), n);
    quantize_row_q8_0_reference(x.data(), z.data(), n);
    f = fopen(argv[3], "wb"); fwrite(y.data(), sizeof(block_q8_0), n / 32, f); fclose(f);
    f = fopen(argv[4], "wb"); fwrite(z.data(), sizeof(block_q8_0), n / 32, f); fclose(f);
    return 0;
}
"""


@pytest.mark.skipif(not os.environ.get("MLLM_V1_SOURCE") or shutil.which("g++") is None,
                    reason="set MLLM_V1_SOURCE to an mllm v1 checkout (and have g++) to compare with mllm's quantizer")
def test_byte_identical_to_mllm_quantize_row_q8_0(tmp_path):
    root = Path(os.environ["MLLM_V1_SOURCE"])
    ggml = root / "mllm/backends/cpu/third_party/ggml"
    includes = [f"-I{p}" for p in (ggml, root / "mllm", root / "mllm/backends/cpu", root / "third_party",
                                   root / "third_party/fmt/include")]
    (tmp_path / "h.cpp").write_text(_HARNESS)
    rng = np.random.default_rng(2)
    ties = (rng.integers(-253, 254, (300, 32)) / 2).astype(np.float32)
    ties[:, 0] = 127.0  # d = 1: x * id lands exactly on halves
    x = np.concatenate([(rng.standard_normal(32 * 2000) * rng.lognormal(0, 2, 32 * 2000)).astype(np.float32),
                        np.zeros(32, np.float32), ties.reshape(-1)])
    x.tofile(tmp_path / "x.f32")
    for flags, variant in ((["-mavx2", "-mfma"], "avx2"), ([], "reference")):  # x86: AVX2 path, scalar fallback
        exe = tmp_path / f"h_{variant}"
        subprocess.run(["g++", "-O2", "-mf16c", "-std=gnu++17", "-DFMT_HEADER_ONLY=1", *flags, *includes,
                        str(tmp_path / "h.cpp"), str(ggml / "QuantizeQ8.cpp"), "-o", str(exe)], check=True)
        subprocess.run([str(exe), str(tmp_path / "x.f32"), str(x.size), str(tmp_path / "row.bin"),
                        str(tmp_path / "ref.bin")], check=True)
        assert (tmp_path / "row.bin").read_bytes() == quantize_q8_0(x, variant)
        assert (tmp_path / "ref.bin").read_bytes() == quantize_q8_0(x, "reference")
