"""The phone bundle's parts: Q4_0 blocks, mllm's tokenizer files, the decoding model, the bundle inspection,
and mllm's loader re-implemented in C++ reading what we write."""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest
import torch

from shadowquant.bundle.assemble import heldout_texts, mllm_tokenizer_class
from shadowquant.decoding.candidates import decode_dtype, load_decode_weights, write_decode_model
from shadowquant.errors import PipelineError
from shadowquant.export.mllm import (
    DTYPE_FLOAT32,
    DTYPE_INT8,
    DTYPE_Q4_0,
    read_mllm,
    write_mllm_v1,
    write_mllm_v1_encoded,
)
from shadowquant.bundle.tokenizer import (
    FileTokenizer,
    merges_mllm_skips,
    read_merges,
    read_vocab,
    reference_ids,
    round_trip,
    tokenizer_files,
    write_merges,
    write_vocab,
)
from shadowquant.model.loading import load_model
from shadowquant.decoding.q4_0 import BLOCK_BYTES, check_q4_0_shape, dequantize_q4_0, quantize_q4_0
from mllm_loader_helpers import fnv1a64, run_native_loader


# ------------------------------------------------------------------------------------------ Q4_0


def reference_q4_0_block(x: np.ndarray) -> bytes:
    """One block, value by value as mllm's quantize_row_q4_0_reference does it (float32 arithmetic)."""
    amax, vmax = np.float32(0), np.float32(0)
    for v in x:
        if amax < abs(v):
            amax, vmax = np.float32(abs(v)), np.float32(v)
    d = np.float32(vmax / np.float32(-8))
    inv = np.float32(1) / d if d else np.float32(0)
    qs = bytearray(16)
    for j in range(16):
        lo = min(15, int(np.float32(np.float32(x[j] * inv) + np.float32(8.5))))
        hi = min(15, int(np.float32(np.float32(x[16 + j] * inv) + np.float32(8.5))))
        qs[j] = lo | (hi << 4)
    return np.float16(d).tobytes() + bytes(qs)


def test_q4_0_blocks_equal_the_reference_loop_value_by_value():
    rng = np.random.default_rng(0)
    blocks = [rng.standard_normal(32).astype(np.float32) for _ in range(50)]
    blocks.append(np.zeros(32, np.float32))  # d = 0: every code 8
    tie = rng.standard_normal(32).astype(np.float32)
    tie[3], tie[7] = 5.0, -5.0  # equal magnitudes: the first one sets the sign of d
    blocks.append(tie)
    blocks.append(np.full(32, -2.5, np.float32))
    data = np.concatenate(blocks)
    assert quantize_q4_0(data) == b"".join(reference_q4_0_block(b) for b in blocks)


def test_q4_0_layout_and_decoding():
    x = np.arange(32, dtype=np.float32) - 8  # max magnitude 23 (positive): d = -23/8
    raw = quantize_q4_0(x)
    assert len(raw) == BLOCK_BYTES
    d = np.frombuffer(raw[:2], np.float16)[0]
    assert d == np.float16(-23 / 8)
    codes_low, codes_high = raw[2] & 0xF, raw[2] >> 4  # value 0 in the low nibble, value 16 in the high one
    assert codes_low == min(15, int(np.float32(-8 * np.float32(1 / np.float32(-23 / 8)) + 8.5)))
    assert codes_high == min(15, int(np.float32(8 * np.float32(1 / np.float32(-23 / 8)) + 8.5)))
    decoded = dequantize_q4_0(raw)
    assert np.max(np.abs(decoded - x)) <= abs(float(d)) / 2 + 1e-6
    assert decoded[-1] == np.float32(d) * -8  # the block's max is exact up to d's float16 rounding


def test_q4_0_error_is_within_half_a_step_except_the_clamped_end():
    rng = np.random.default_rng(1)
    x = rng.standard_normal(32 * 64).astype(np.float32)
    decoded = dequantize_q4_0(quantize_q4_0(x)).reshape(-1, 32)
    blocks = x.reshape(-1, 32)
    steps = np.abs(np.frombuffer(quantize_q4_0(x), dtype=[("d", "<f2"), ("qs", "u1", (16,))])["d"].astype(np.float32))
    # Codes run from -8 * d (the max itself) to +7 * d: values near -max clamp to code 15.
    err = np.abs(decoded - blocks)
    assert np.all(err <= steps[:, None] * 1.001 + 1e-6)
    assert np.mean(err <= steps[:, None] / 2 + 1e-6) > 0.95


def test_q4_0_refuses_rows_that_are_not_whole_blocks():
    with pytest.raises(PipelineError, match="multiple of 32"):
        check_q4_0_shape("model.layers.0.mlp.up_proj.weight", (64, 48))
    with pytest.raises(PipelineError, match="whole Q4_0 blocks"):
        quantize_q4_0(np.zeros(40, np.float32))


# ------------------------------------------------------------------------------------------ tokenizer


@pytest.fixture(scope="module")
def tokenizer_files_dir(tiny_tokenizer_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("mllm_tokenizer")
    entries, merges, spec = tokenizer_files(tiny_tokenizer_dir / "tokenizer.json")
    write_vocab(out / "vocab.mllm", entries)
    write_merges(out / "merges.txt", merges)
    return out, entries, merges, spec


def test_vocab_file_layout_and_round_trip(tokenizer_files_dir):
    out, entries, _, _ = tokenizer_files_dir
    data = (out / "vocab.mllm").read_bytes()
    assert struct.unpack_from("<ii", data, 0) == (23333, len(entries))
    first_id, first_len = struct.unpack_from("<ii", data, 8)
    assert data[16:16 + first_len] == entries[0].token
    assert struct.unpack_from("<f", data, 16 + first_len)[0] == float(first_id)  # BPE score = id, as mllm's converter
    back = read_vocab(out / "vocab.mllm")
    assert [(e.id, e.token) for e in back] == [(e.id, e.token) for e in entries]


def test_tokenizer_files_give_the_hugging_face_ids(tokenizer_files_dir, tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    out, _, _, spec = tokenizer_files_dir
    hf = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    texts = heldout_texts_from_pydoc(1000)
    result = round_trip(FileTokenizer(out / "vocab.mllm", out / "merges.txt", spec, as_mllm=False), texts,
                        reference_ids(hf, texts))
    assert result["records"] == 1000 and result["identical"] == 1000, result["mismatches"][:2]
    assert result["tokens"] == result["tokens_from_files"] > 50000


def heldout_texts_from_pydoc(n: int) -> list[str]:
    from shadowquant.model.tiny import pydoc_texts

    paragraphs = [p.strip() for text in pydoc_texts() for p in text.split("\n\n") if p.strip()]
    return paragraphs[-n:]


def test_merges_starting_with_hash_are_lost_as_mllm_reads_them(tmp_path):
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b\n# !\n\nab c\n", encoding="utf-8")
    assert read_merges(tmp_path / "merges.txt") == ["a b", "ab c"]
    assert read_merges(tmp_path / "merges.txt", as_mllm=False) == ["#version: 0.2", "a b", "# !", "ab c"]
    assert merges_mllm_skips(["a b", "# !", "#! /"]) == ["# !", "#! /"]


def test_a_hash_merge_changes_the_ids_only_as_mllm_reads_it(tmp_path):
    from shadowquant.bundle.tokenizer import TokenizerSpec, VocabEntry

    tokens = ["#", "!", "#!", "a"]
    write_vocab(tmp_path / "v.mllm", [VocabEntry(i, t.encode(), float(i)) for i, t in enumerate(tokens)])
    write_merges(tmp_path / "m.txt", ["# !"])
    spec = TokenizerSpec(split_patterns=[])
    assert FileTokenizer(tmp_path / "v.mllm", tmp_path / "m.txt", spec, as_mllm=False).encode("#!") == [2]
    assert FileTokenizer(tmp_path / "v.mllm", tmp_path / "m.txt", spec, as_mllm=True).encode("#!") == [0, 1]


def test_mllm_v1_tokenizer_matches_greedily_where_the_merges_split_otherwise(tmp_path):
    from shadowquant.bundle.tokenizer import MllmV1Tokenizer, TokenizerSpec, VocabEntry

    tokens = ["l", "i", "n", "e", "o", "li", "lin", "en", "eno", "line", "no"]
    write_vocab(tmp_path / "v.mllm", [VocabEntry(i, t.encode(), float(i)) for i, t in enumerate(tokens)])
    write_merges(tmp_path / "m.txt", ["l i", "li n", "e n", "en o"])
    spec = TokenizerSpec(split_patterns=[])
    ids = tokens.index
    by_merges = FileTokenizer(tmp_path / "v.mllm", tmp_path / "m.txt", spec).encode("lineno")
    assert by_merges == [ids("lin"), ids("eno")]
    assert MllmV1Tokenizer(tmp_path / "v.mllm", tmp_path / "m.txt", spec).encode("lineno") == [ids("line"), ids("no")]
    assert MllmV1Tokenizer(tmp_path / "v.mllm", tmp_path / "m.txt", spec).encode("line") == [ids("line")]


def test_bad_vocabulary_files_are_refused_in_one_line(tmp_path):
    path = tmp_path / "vocab.mllm"
    path.write_bytes(struct.pack("<ii", 1234, 1))
    with pytest.raises(PipelineError, match="magic 1234, expected 23333"):
        read_vocab(path)
    path.write_bytes(struct.pack("<iiii", 23333, 2, 0, 5) + b"ab")
    with pytest.raises(PipelineError, match="runs past the end"):
        read_vocab(path)


def test_tokenizers_mllm_cannot_read_are_refused(tmp_path, tiny_tokenizer_dir):
    data = json.loads((tiny_tokenizer_dir / "tokenizer.json").read_text())
    data["model"]["type"] = "Unigram"
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(PipelineError, match="tokenizer model 'Unigram' is not supported"):
        tokenizer_files(tmp_path / "tokenizer.json")
    data = json.loads((tiny_tokenizer_dir / "tokenizer.json").read_text())
    data["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁"}
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(PipelineError, match="pre-tokenizer 'Metaspace' is not supported"):
        tokenizer_files(tmp_path / "tokenizer.json")


def test_mllm_tokenizer_class_is_named_only_for_the_same_pre_tokenization(tokenizer_files_dir):
    from shadowquant.bundle.assemble import QWEN2_PATTERN
    from shadowquant.bundle.tokenizer import GPT2_PATTERN, TokenizerSpec

    assert mllm_tokenizer_class(TokenizerSpec([QWEN2_PATTERN], "NFC"))[0] == "QWenTokenizer"
    assert mllm_tokenizer_class(TokenizerSpec([r"\p{N}", GPT2_PATTERN]))[0] == "SmolLMTokenizer"
    cls, note = mllm_tokenizer_class(tokenizer_files_dir[3])  # GPT-2 style without the digit split
    assert cls is None and "must be added" in note


def test_heldout_texts_skip_the_calibration_records(tiny_text_corpus):
    from shadowquant.inputs.corpus import count_records, select_records, selection_indices

    texts = heldout_texts(tiny_text_corpus, 50, seed=42, offset=6)
    calibration = select_records(tiny_text_corpus, selection_indices(count_records(tiny_text_corpus), 6, 42, 0))
    assert len(texts) == 50 and not set(texts) & set(calibration)


# ------------------------------------------------------------------------------------------ decoding model


def test_decoding_model_follows_mllms_quantizer_rules(tiny_model_dir, tmp_path):
    model, _, _ = load_model(tiny_model_dir("llama"), device="cpu", dtype="float32")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    summary = write_decode_model(state, tmp_path / "decode.mllm")
    stored = read_mllm(tmp_path / "decode.mllm")
    assert decode_dtype("model.embed_tokens.weight") == DTYPE_Q4_0
    assert decode_dtype("model.layers.0.input_layernorm.weight") == DTYPE_FLOAT32
    assert decode_dtype("model.layers.0.self_attn.q_proj.bias") == DTYPE_FLOAT32
    for name, tensor in state.items():
        entry = stored.entry(name)
        assert entry.dtype == decode_dtype(name), name
        values = stored.read(name)
        if entry.dtype == DTYPE_FLOAT32:
            assert np.array_equal(values, tensor.numpy().reshape(-1))
        else:
            blocks = tensor.numpy().reshape(-1, 32)
            steps = np.abs(blocks).max(axis=1) / 8
            assert np.all(np.abs(values.reshape(-1, 32) - blocks) <= steps[:, None] * 1.01 + 1e-7), name
    assert "lm_head.weight" in stored and summary["tensors"] == len(stored.names)


def test_a_tied_embedding_gets_an_lm_head_copy(tmp_path):
    embedding = torch.randn(8, 64)
    state = {"model.embed_tokens.weight": embedding, "model.norm.weight": torch.ones(64)}
    write_decode_model(state, tmp_path / "decode.mllm")
    stored = read_mllm(tmp_path / "decode.mllm")
    assert stored.entry("lm_head.weight").dtype == DTYPE_Q4_0
    assert stored.read_raw("lm_head.weight") == stored.read_raw("model.embed_tokens.weight")


def test_decode_weights_load_back_into_the_model(tiny_model_dir, tmp_path):
    model, _, _ = load_model(tiny_model_dir("llama"), device="cpu", dtype="float32")
    write_decode_model(model.state_dict(), tmp_path / "decode.mllm")
    stored = read_mllm(tmp_path / "decode.mllm")
    replaced = load_decode_weights(model, tmp_path / "decode.mllm")
    name = "model.layers.0.mlp.down_proj.weight"
    assert name in replaced
    weight = dict(model.named_parameters())[name]
    assert torch.equal(weight.detach().reshape(-1), torch.from_numpy(stored.read(name)))


def test_a_tied_model_takes_its_embedding_and_head_each_from_its_own_tensor(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=64, num_attention_heads=2, num_key_value_heads=2,
                         num_hidden_layers=1, vocab_size=40, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    # The embedding Q4_0, the head Q8_0: two different roundings of the one tied matrix.
    write_decode_model(model.state_dict(), tmp_path / "decode.mllm", recipe="q4_0i-v8-lm8")
    stored = read_mllm(tmp_path / "decode.mllm")
    load_decode_weights(model, tmp_path / "decode.mllm")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        values = torch.from_numpy(stored.read(name))
        assert torch.equal(dict(model.named_parameters(remove_duplicate=False))[name].detach().reshape(-1), values)
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)


# ------------------------------------------------------------------------------------------ mllm's loader


def test_mllms_loader_reads_every_tensor_we_write(native_loader, tmp_path):
    rng = np.random.default_rng(0)
    sources = {
        "a.weight": torch.from_numpy(rng.integers(-128, 128, (5, 7)).astype(np.int8)),
        "a.weight.scale": torch.tensor(0.25),
        "a.clip_input": torch.tensor(False),
        "a.bias": torch.from_numpy(rng.integers(-2**31, 2**31 - 1, 7).astype(np.int32)),
        "norm.weight": torch.randn(64),
        "emb.weight": torch.randn(3, 64, dtype=torch.float16),
    }
    write_mllm_v1(tmp_path / "model.mllm", sources)
    tensors, index, _ = run_native_loader(native_loader, tmp_path / "model.mllm")
    stored = read_mllm(tmp_path / "model.mllm")
    assert index[0] == index[1] == len(sources) and index[2] == index[3]  # the index loop stops exactly at its end
    assert sorted(tensors) == sorted(sources)
    for name, tensor in sources.items():
        expected = (tensor.to(torch.int8) if tensor.dtype == torch.bool else tensor).contiguous().numpy().tobytes()
        got = tensors[name]
        assert got["read"] == got["length"] == len(expected), name
        assert got["hash"] == fnv1a64(expected) == fnv1a64(stored.read_raw(name)), name
        assert got["dtype"] == stored.entry(name).dtype and got["offset"] == stored.entry(name).offset
    assert tensors["a.weight"]["dtype"] == DTYPE_INT8 and tensors["a.clip_input"]["dtype"] == DTYPE_INT8


def test_mllms_loader_reads_q4_0_blocks_and_reports_what_the_model_would_miss(native_loader, tmp_path):
    weights = np.random.default_rng(2).standard_normal((4, 64)).astype(np.float32)
    blocks = quantize_q4_0(weights)
    write_mllm_v1_encoded(tmp_path / "decode.mllm", [("w", DTYPE_Q4_0, len(blocks))], lambda _: blocks)
    expected = {"w": (DTYPE_Q4_0, len(blocks)), "absent": (DTYPE_FLOAT32, 4), "w_wrong": (DTYPE_Q4_0, 1)}
    tensors, _, statuses = run_native_loader(native_loader, tmp_path / "decode.mllm",
                                             {"w": expected["w"], "absent": expected["absent"]}, tmp_path)
    assert tensors["w"]["hash"] == fnv1a64(blocks) and tensors["w"]["dtype"] == DTYPE_Q4_0
    assert statuses == {"w": "ok", "absent": "missing"}
    _, _, statuses = run_native_loader(native_loader, tmp_path / "decode.mllm", {"w": (DTYPE_Q4_0, 36)}, tmp_path)
    assert statuses == {"w": "size"}
    assert math.isclose(float(dequantize_q4_0(blocks)[0]), float(weights[0, 0]), abs_tol=np.abs(weights[0, :32]).max() / 8)


# ------------------------------------------------------------------------------------------ bundle inspection


def test_the_bundle_inspection_checks_both_models_against_what_their_cpp_models_load(tokenizer_files_dir, tmp_path):
    """Every tensor the NPU model and the CPU decoding model load, by name, dtype and byte size: a prefill
    or decoding file without the q/k/v biases the C++ models always build is a problem."""
    from shadowquant.bundle.assemble import BUNDLE_FILES, DECODE, PREFILL, RUNTIME, VOCAB, MERGES, inspect_bundle
    from shadowquant.runtimes.profiles import PROFILES, loaded_tensors
    from test_inspector import TINY_DIMS, tiny_float_state

    tokens, _, _, _ = tokenizer_files_dir
    dims = {**TINY_DIMS, "vocab_size": len(read_vocab(tokens / "vocab.mllm")), "shadow_layers": []}
    runtime = {"runtime": "qwen-npu", "cpp_config": dims, "shadow_layers": []}
    (tmp_path / RUNTIME).write_text(json.dumps(runtime))
    for name in (VOCAB, MERGES):
        (tmp_path / name).write_bytes((tokens / name).read_bytes())
    prefill = loaded_tensors(PROFILES["qwen-npu"], dims, [])

    def write_prefill(items):
        write_mllm_v1_encoded(tmp_path / PREFILL, [(n, c, s) for n, (c, s) in items.items()],
                              lambda n: bytes(items[n][1]))

    write_prefill(prefill)
    write_decode_model(tiny_float_state(dims), tmp_path / DECODE)
    for name in BUNDLE_FILES:
        if not (tmp_path / name).exists():
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name).write_text("")
    report = inspect_bundle(tmp_path)
    assert report.problems == [] and report.facts["decode_loaded"] == 12 * 2 + 3
    write_decode_model(tiny_float_state(dims), tmp_path / DECODE, qkv_bias=False)
    assert inspect_bundle(tmp_path).problems == [
        f"{DECODE}: no model.layers.0.self_attn.q_proj.bias (and 5 more), which the C++ model loads"]
    write_decode_model(tiny_float_state(dims), tmp_path / DECODE)
    write_prefill({n: v for n, v in prefill.items() if not n.endswith("k_proj.bias")})
    assert inspect_bundle(tmp_path).problems == [
        f"{PREFILL}: no model.layers.0.self_attn.k_proj.bias (and 1 more), which the C++ model loads"]
