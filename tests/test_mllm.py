"""mllm v1/v2 writers, reader validation and the safetensors converter."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from shadowquant.errors import PipelineError
from shadowquant.export.mllm import (
    DTYPE_ITEMSIZE,
    aligned_offset,
    DTYPE_BFLOAT16,
    DTYPE_FLOAT16,
    DTYPE_FLOAT32,
    DTYPE_INT8,
    DTYPE_INT16,
    DTYPE_INT32,
    DTYPE_INT64,
    DTYPE_UINT8,
    TensorSpec,
    convert_safetensors_to_mllm,
    read_mllm,
    read_safetensors_specs,
    write_mllm_v1,
    write_mllm_v2,
)


def parse_v1_index(raw: bytes) -> list[tuple[str, int, int, int]]:
    """Independent struct parse of a v1 file: (name, data_size, data_offset, dtype) per tensor."""
    magic, index_size = struct.unpack_from("<iQ", raw, 0)
    assert magic == 20012
    entries, pos = [], 12
    while pos < 12 + index_size:
        (name_len,) = struct.unpack_from("<i", raw, pos)
        name = raw[pos + 4 : pos + 4 + name_len].decode()
        size, offset, dtype = struct.unpack_from("<QQi", raw, pos + 4 + name_len)
        entries.append((name, size, offset, dtype))
        pos += 4 + name_len + 20
    assert pos == 12 + index_size
    return entries


def mixed_tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(3, 5, generator=generator),
        "f16": torch.randn(4, generator=generator).half(),
        "bf16": torch.randn(2, 3, generator=generator).bfloat16(),
        "i8": torch.tensor([[-128, 0], [5, 127]], dtype=torch.int8),
        "flag": torch.tensor(True),
        "flags": torch.tensor([True, False, True]),
        "i16": torch.tensor([-300, 300], dtype=torch.int16),
        "i32": torch.arange(-3, 4, dtype=torch.int32),
        "scalar": torch.tensor(0.25),
    }


# ---- v1 -------------------------------------------------------------------------------------


def test_v1_exact_bytes_of_one_int8_tensor(tmp_path):
    path = tmp_path / "one.mllm"
    write_mllm_v1(path, [("w", torch.tensor([1, -2, 3], dtype=torch.int8))])
    expected = bytes.fromhex(
        "2c4e0000"  # int32 magic 20012
        "1900000000000000"  # uint64 index_size = 4 + 1 + 8 + 8 + 4 = 25
        "01000000" "77"  # int32 name_len 1, "w"
        "0300000000000000"  # uint64 data_size 3
        "2500000000000000"  # uint64 data_offset 37 = 12 + 25
        "10000000"  # int32 dtype 16 (int8)
        "01fe03"  # data
    )
    assert path.read_bytes() == expected


def test_v1_exact_bytes_bool_becomes_int8_and_bfloat16_becomes_float32(tmp_path):
    path = tmp_path / "two.mllm"
    write_mllm_v1(path, [("c", torch.tensor(True)), ("s", torch.tensor(1.5, dtype=torch.bfloat16))])
    index_size = 2 * (4 + 1 + 20)
    # The float32 lands on the next multiple of 4 after the int8 (62 -> 64): mllm reads it in place.
    expected = (
        struct.pack("<iQ", 20012, index_size)
        + struct.pack("<i", 1) + b"c" + struct.pack("<QQi", 1, 12 + index_size, 16)
        + struct.pack("<i", 1) + b"s" + struct.pack("<QQi", 4, 12 + index_size + 2, 0)
        + b"\x01\x00"
        + struct.pack("<f", 1.5)
    )
    assert path.read_bytes() == expected


def test_v1_round_trip_mixed_dtypes(tmp_path):
    tensors = mixed_tensors()
    path = tmp_path / "mixed.mllm"
    write_mllm_v1(path, tensors)
    mllm = read_mllm(path)
    assert mllm.version == 1
    assert mllm.names == list(tensors)
    codes = {entry.name: entry.dtype for entry in mllm.entries}
    assert codes == {
        "f32": DTYPE_FLOAT32, "f16": DTYPE_FLOAT16, "bf16": DTYPE_FLOAT32, "i8": DTYPE_INT8,
        "flag": DTYPE_INT8, "flags": DTYPE_INT8, "i16": DTYPE_INT16, "i32": DTYPE_INT32, "scalar": DTYPE_FLOAT32,
    }
    for name, tensor in tensors.items():
        got = mllm.read(name)
        assert got.ndim == 1  # v1 stores no shape
        want = tensor.float() if tensor.dtype == torch.bfloat16 else tensor
        want = want.to(torch.int8) if tensor.dtype == torch.bool else want
        np.testing.assert_array_equal(got, want.reshape(-1).numpy())
    # The raw index agrees with the reader, and the data regions tile the file.
    raw = path.read_bytes()
    parsed = parse_v1_index(raw)
    assert [(e.name, e.size, e.offset, e.dtype) for e in mllm.entries] == parsed
    assert parsed[-1][1] + parsed[-1][2] == len(raw)


def test_v1_streams_from_specs_and_a_loader(tmp_path):
    tensors = mixed_tensors()
    specs = [(name, tensor.dtype, tuple(tensor.shape)) for name, tensor in tensors.items()]
    calls = []

    def load(name):
        calls.append(name)
        return tensors[name]

    entries = write_mllm_v1(tmp_path / "s.mllm", specs, load)
    assert calls == list(tensors)  # each tensor loaded once, in order
    assert [e.name for e in entries] == list(tensors)
    assert read_mllm(tmp_path / "s.mllm").entries == tuple(entries)


def test_v1_accepts_numpy_arrays_including_read_only(tmp_path):
    array = np.arange(6, dtype=np.int16)
    array.flags.writeable = False
    write_mllm_v1(tmp_path / "n.mllm", {"a": array, "b": np.array([True, False])})
    mllm = read_mllm(tmp_path / "n.mllm")
    np.testing.assert_array_equal(mllm.read("a"), array)
    assert mllm.entry("b").dtype == DTYPE_INT8


@pytest.mark.parametrize("dtype", [torch.float64, torch.int64, torch.uint8, torch.complex64])
def test_v1_unsupported_dtype_names_tensor_and_dtype(tmp_path, dtype):
    with pytest.raises(PipelineError, match=r"'bad'.*" + str(dtype).removeprefix("torch.")):
        write_mllm_v1(tmp_path / "x.mllm", [("ok", torch.zeros(2)), ("bad", torch.zeros(2, dtype=dtype))])
    assert not list(tmp_path.iterdir())


def test_loader_disagreeing_with_spec_fails_and_leaves_no_file(tmp_path):
    specs = [TensorSpec("a", torch.float32, (2,)), TensorSpec("b", torch.float32, (3,))]
    with pytest.raises(PipelineError, match="'b'.*index was written"):
        write_mllm_v1(tmp_path / "x.mllm", specs, lambda name: torch.zeros(2))
    assert not list(tmp_path.iterdir())  # atomic: no partial file, no temporary


def test_duplicate_and_empty_names_rejected(tmp_path):
    with pytest.raises(PipelineError, match="twice"):
        write_mllm_v1(tmp_path / "x.mllm", [("a", torch.zeros(1)), ("a", torch.zeros(1))])
    with pytest.raises(PipelineError, match="empty"):
        write_mllm_v2(tmp_path / "x.mllm", [("", torch.zeros(1))])


# ---- v2 -------------------------------------------------------------------------------------


def test_v2_round_trip_and_layout(tmp_path):
    tensors = mixed_tensors() | {
        "u8": torch.tensor([0, 255], dtype=torch.uint8),
        "i64": torch.tensor([[-(2**40)], [7]], dtype=torch.int64),
    }
    path = tmp_path / "v2.mllm"
    write_mllm_v2(path, tensors, model_name="tiny-llama")
    mllm = read_mllm(path)
    assert (mllm.version, mllm.model_name, mllm.names) == (2, "tiny-llama", list(tensors))
    codes = {entry.name: entry.dtype for entry in mllm.entries}
    assert codes["bf16"] == DTYPE_BFLOAT16 and codes["flag"] == DTYPE_INT8
    assert codes["u8"] == DTYPE_UINT8 and codes["i64"] == DTYPE_INT64
    for name, tensor in tensors.items():
        got = mllm.read(name)
        assert got.shape == tuple(tensor.shape)
        want = tensor.float() if tensor.dtype == torch.bfloat16 else tensor
        want = want.to(torch.int8) if tensor.dtype == torch.bool else want
        np.testing.assert_array_equal(got, want.numpy())

    raw = path.read_bytes()
    magic, version, name, num_params, desc_offset = struct.unpack_from("<II512sIQ", raw, 0)
    assert (magic, version, num_params, desc_offset) == (0x519A, 2, len(tensors), 532)
    assert name == b"tiny-llama".ljust(512, b"\0")
    data_start = 532 + 352 * len(tensors)
    for index, tensor_name in enumerate(tensors):
        fields = struct.unpack_from("<IIQQQ16i256s", raw, 532 + 352 * index)
        param_id, dtype, size, offset, ndim = fields[:5]
        assert param_id == index and dtype == codes[tensor_name]
        assert fields[5 : 5 + ndim] == tuple(tensors[tensor_name].shape)
        assert all(d == 0 for d in fields[5 + ndim : 21])
        assert fields[-1] == tensor_name.encode().ljust(256, b"\0")
        assert offset == aligned_offset(data_start, dtype) and offset % DTYPE_ITEMSIZE[dtype] == 0
        assert raw[data_start:offset] == bytes(offset - data_start)  # zero padding up to the alignment
        data_start = offset + size
    assert data_start == len(raw)


def test_v2_limits(tmp_path):
    with pytest.raises(PipelineError, match="256-byte name"):
        write_mllm_v2(tmp_path / "x.mllm", [("n" * 256, torch.zeros(1))])
    write_mllm_v2(tmp_path / "ok.mllm", [("n" * 255, torch.zeros(1))])  # 255 + NUL fits
    with pytest.raises(PipelineError, match="17 dimensions"):
        write_mllm_v2(tmp_path / "x.mllm", [("deep", torch.zeros([1] * 17))])
    with pytest.raises(PipelineError, match="model name"):
        write_mllm_v2(tmp_path / "x.mllm", [("a", torch.zeros(1))], model_name="m" * 512)
    with pytest.raises(PipelineError, match="float64"):
        write_mllm_v2(tmp_path / "x.mllm", [("a", torch.zeros(1, dtype=torch.float64))])


# ---- reader validation ------------------------------------------------------------------------


@pytest.fixture
def v1_file(tmp_path):
    path = tmp_path / "good.mllm"
    write_mllm_v1(path, {"a.weight": torch.ones(4, 4, dtype=torch.int8), "a.scale": torch.tensor(0.5)})
    return path


@pytest.fixture
def v2_file(tmp_path):
    path = tmp_path / "good2.mllm"
    write_mllm_v2(path, {"a.weight": torch.ones(4, 4, dtype=torch.int8), "a.scale": torch.tensor(0.5)}, model_name="m")
    return path


@pytest.mark.parametrize("keep", [0, 3, 8, 20, 40, -1])
def test_truncated_v1_is_a_pipeline_error_naming_the_file(v1_file, keep):
    raw = v1_file.read_bytes()
    v1_file.write_bytes(raw[:keep] if keep >= 0 else raw[:-1])
    with pytest.raises(PipelineError, match=str(v1_file)) as excinfo:
        read_mllm(v1_file)
    assert "truncated" in str(excinfo.value) or "not an mllm file" in str(excinfo.value) or "index" in str(excinfo.value)


@pytest.mark.parametrize("keep", [100, 600, 532 + 352 + 10, -1])
def test_truncated_v2_is_a_pipeline_error(v2_file, keep):
    raw = v2_file.read_bytes()
    v2_file.write_bytes(raw[:keep] if keep >= 0 else raw[:-1])
    with pytest.raises(PipelineError, match="truncated"):
        read_mllm(v2_file)


@pytest.mark.parametrize(
    "content", [b"GGUF\x03\x00\x00\x00" + b"\0" * 64, b"PK\x03\x04zipfile", b"", b"\x2c\x4e"]
)
def test_foreign_file_is_a_pipeline_error(tmp_path, content):
    path = tmp_path / "foreign.bin"
    path.write_bytes(content)
    with pytest.raises(PipelineError, match=r"foreign\.bin: not an mllm file"):
        read_mllm(path)


def test_missing_file(tmp_path):
    with pytest.raises(PipelineError, match="cannot open"):
        read_mllm(tmp_path / "absent.mllm")


def test_corrupt_v1_index_fields_are_caught(v1_file):
    raw = bytearray(v1_file.read_bytes())
    name_len = len("a.weight")
    dtype_at = 12 + 4 + name_len + 16
    bad_dtype = raw.copy()
    struct.pack_into("<i", bad_dtype, dtype_at, 99)
    v1_file.write_bytes(bad_dtype)
    with pytest.raises(PipelineError, match="dtype code 99"):
        read_mllm(v1_file)
    odd_size = raw.copy()  # 15 bytes labelled float32
    struct.pack_into("<Q", odd_size, 12 + 4 + name_len, 15)
    struct.pack_into("<i", odd_size, dtype_at, 0)
    v1_file.write_bytes(odd_size)
    with pytest.raises(PipelineError, match="not a multiple"):
        read_mllm(v1_file)
    bad_name = raw.copy()
    struct.pack_into("<i", bad_name, 12, 10**6)
    v1_file.write_bytes(bad_name)
    with pytest.raises(PipelineError, match="name length"):
        read_mllm(v1_file)


def test_wrong_v2_version_and_bad_shape(v2_file):
    raw = bytearray(v2_file.read_bytes())
    wrong_version = raw.copy()
    struct.pack_into("<I", wrong_version, 4, 3)
    v2_file.write_bytes(wrong_version)
    with pytest.raises(PipelineError, match="version 3"):
        read_mllm(v2_file)
    bad_shape = raw.copy()
    struct.pack_into("<i", bad_shape, 532 + 32, 5)  # first dim of the 4x4 weight -> 5x4
    v2_file.write_bytes(bad_shape)
    with pytest.raises(PipelineError, match="does not make 16 bytes"):
        read_mllm(v2_file)


# ---- converter --------------------------------------------------------------------------------


@pytest.fixture
def export_file(tmp_path):
    generator = torch.Generator().manual_seed(1)
    tensors = {
        "model.embed_tokens.weight": torch.randn(10, 4, generator=generator).bfloat16(),
        "model.layers.0.mlp.up_proj.weight": torch.randint(-128, 128, (4, 6), dtype=torch.int8, generator=generator),
        "model.layers.0.mlp.up_proj.weight.scale": torch.tensor(0.02),
        "model.layers.0.mlp.up_proj.input_scale": torch.tensor(3.5),
        "model.layers.0.mlp.up_proj.output_scale": torch.tensor(7.25),
        "model.layers.0.mlp.up_proj.clip_input": torch.tensor(True),
        "model.layers.0.mlp.up_proj.clip_output": torch.tensor(False),
        "model.norm.weight": torch.ones(4, dtype=torch.float16),
    }
    path = tmp_path / "model-int8.safetensors"
    save_file(tensors, str(path))
    return path, tensors


def test_converter_keeps_int8_and_flags_as_dtype_16(export_file, tmp_path):
    src, tensors = export_file
    dst = tmp_path / "model.mllm"
    convert_safetensors_to_mllm(src, dst)
    mllm = read_mllm(dst)
    codes = {entry.name: entry.dtype for entry in mllm.entries}
    prefix = "model.layers.0.mlp.up_proj"
    assert codes[f"{prefix}.weight"] == DTYPE_INT8
    assert codes[f"{prefix}.clip_input"] == codes[f"{prefix}.clip_output"] == DTYPE_INT8
    assert codes[f"{prefix}.weight.scale"] == codes[f"{prefix}.input_scale"] == DTYPE_FLOAT32
    assert codes["model.embed_tokens.weight"] == DTYPE_FLOAT32  # bfloat16 widened
    assert codes["model.norm.weight"] == DTYPE_FLOAT16
    # The same seen by an independent struct parse of the raw file.
    raw_codes = {name: dtype for name, _, _, dtype in parse_v1_index(dst.read_bytes())}
    assert raw_codes == codes
    assert raw_codes[f"{prefix}.weight"] == 16 and raw_codes[f"{prefix}.clip_input"] == 16
    for name, tensor in tensors.items():
        want = tensor.float() if tensor.dtype == torch.bfloat16 else tensor
        want = want.to(torch.int8) if tensor.dtype == torch.bool else want
        np.testing.assert_array_equal(mllm.read(name), want.reshape(-1).numpy())
    # Order is the safetensors data order.
    assert mllm.names == [spec.name for spec in read_safetensors_specs(src)]


def test_converter_v2_keeps_shapes(export_file, tmp_path):
    src, tensors = export_file
    dst = tmp_path / "model-v2.mllm"
    convert_safetensors_to_mllm(src, dst, version=2, model_name="tiny")
    mllm = read_mllm(dst)
    assert mllm.model_name == "tiny"
    for name, tensor in tensors.items():
        assert mllm.entry(name).shape == tuple(tensor.shape)
    assert mllm.entry("model.embed_tokens.weight").dtype == DTYPE_BFLOAT16
    np.testing.assert_array_equal(
        mllm.read("model.embed_tokens.weight"), tensors["model.embed_tokens.weight"].float().numpy()
    )


def test_converter_errors(tmp_path):
    not_safetensors = tmp_path / "junk.safetensors"
    not_safetensors.write_bytes(b"\xff" * 64)
    with pytest.raises(PipelineError, match="junk.safetensors"):
        convert_safetensors_to_mllm(not_safetensors, tmp_path / "out.mllm")
    f64 = tmp_path / "f64.safetensors"
    save_file({"double": torch.zeros(2, dtype=torch.float64)}, str(f64))
    with pytest.raises(PipelineError, match="'double'.*float64"):
        convert_safetensors_to_mllm(f64, tmp_path / "out.mllm")
    with pytest.raises(PipelineError, match="version"):
        convert_safetensors_to_mllm(f64, tmp_path / "out.mllm", version=3)
    assert not (tmp_path / "out.mllm").exists()
