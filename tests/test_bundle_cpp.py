"""The bundle's cpp/ folder: the generated demo source (every config value, the shadow layers, the tokenizer's
added tokens and chat pieces), the Python twin of its tokenizer against Hugging Face (held-out paragraphs and
every turn of a conversation through the chat template), and the C++ tokenizer header compiled standalone
(mllm's Unicode functions stubbed with the categories of the test texts) giving the Hugging Face ids."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from shadowquant.bundle.cpp import (
    CHECK_CONVERSATION,
    CPP_FILES,
    chat_pieces,
    chat_text,
    demo_source,
    demo_tokenizer,
    demo_tokenizer_facts,
    write_cpp_folder,
)
from shadowquant.bundle.cpp_tokenizer import TOKENIZER_HPP
from shadowquant.errors import PipelineError
from shadowquant.bundle.tokenizer import reference_ids, round_trip, tokenizer_files, write_merges, write_vocab

CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
          "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory):
    """The tiny byte-level BPE (BOS prepended) with ChatML's added tokens and template, and its mllm files."""
    from transformers import AutoTokenizer

    from shadowquant.model.tiny import train_tokenizer

    out = tmp_path_factory.mktemp("chat_tokenizer")
    tokenizer = train_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(out)
    entries, merges, spec = tokenizer_files(out / "tokenizer.json")
    write_vocab(out / "vocab.mllm", entries)
    write_merges(out / "merges.txt", merges)
    return AutoTokenizer.from_pretrained(out), out, spec


def paragraphs(n: int) -> list[str]:
    from shadowquant.model.tiny import pydoc_texts

    found = [p.strip() for text in pydoc_texts() for p in text.split("\n\n") if p.strip()]
    return found[-n:]


RUNTIME = {
    "runtime": "qwen-npu", "transform": "rotate+smooth", "point": "absmax-l2", "shadow_layers": [1, 3],
    "chunk_size": 64, "max_chunk_size": 256,
    "cpp_config": {"hidden_size": 96, "intermediate_size": 160, "num_attention_heads": 6, "num_key_value_heads": 2,
                   "head_dim": 16, "num_hidden_layers": 4, "vocab_size": 322, "rope_theta": 100000.0,
                   "rms_norm_eps": 1e-05, "max_position_embeddings": 2048, "tie_embedding_words": True,
                   "use_i32_bias": True, "use_high_precision_silu": True, "bos_token_id": 1, "eos_token_id": 2,
                   "shadow_layers": [1, 3]},
}


def test_the_demo_tokenizer_gives_the_hugging_face_ids(chat_tokenizer):
    hf, out, spec = chat_tokenizer
    texts = paragraphs(300)
    result = round_trip(demo_tokenizer(out / "vocab.mllm", out / "merges.txt", spec), texts, reference_ids(hf, texts))
    assert result["identical"] == 300, result["mismatches"][:2]


def test_every_turn_of_a_conversation_gives_the_chat_templates_ids(chat_tokenizer):
    hf, out, spec = chat_tokenizer
    facts = demo_tokenizer_facts(hf, demo_tokenizer(out / "vocab.mllm", out / "merges.txt", spec))
    pieces = facts["chat"]
    assert pieces["system"] and pieces["start_user"].startswith("<|im_start|>system\nYou are a helpful")
    assert pieces["user_to_assistant"] == "<|im_end|>\n<|im_start|>assistant\n"
    assert pieces["end_user"] == "<|im_end|>\n<|im_start|>assistant\n"
    assert len(facts["chat_check"]) == 6 and all(c["identical"] for c in facts["chat_check"])
    assert {c["turns"] for c in facts["chat_check"]} == {1, 2, 3, 4, 5, 6}
    assert facts["prefix_ids"] == [hf.bos_token_id]  # the tiny tokenizer prepends <s> to a plain text
    assert hf.eos_token_id in facts["stop_ids"]
    with pytest.raises(PipelineError, match="end with a user turn"):
        chat_text(pieces, CHECK_CONVERSATION[:3])


def test_a_template_that_is_not_fixed_pieces_gives_no_chat_mode(chat_tokenizer):
    hf, _, _ = chat_tokenizer
    hf = hf.__class__.from_pretrained(chat_tokenizer[1])
    hf.chat_template = "{% for m in messages %}{{ m['content'] | upper }}{% endfor %}"
    assert chat_pieces(hf) is None
    hf.chat_template = None
    assert chat_pieces(hf) is None


def test_the_generated_source_holds_every_value(chat_tokenizer):
    hf, out, spec = chat_tokenizer
    facts = demo_tokenizer_facts(hf, demo_tokenizer(out / "vocab.mllm", out / "merges.txt", spec))
    source = demo_source("tiny", RUNTIME, spec, facts)
    cfg = RUNTIME["cpp_config"]
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                "num_hidden_layers", "vocab_size", "max_position_embeddings", "bos_token_id", "eos_token_id"):
        assert f"c.{key} = {cfg[key]};" in source
    assert "c.rope_theta = 100000.0f;" in source and "c.rms_norm_eps = 1e-05;" in source
    assert "c.tie_embedding_words = true;" in source  # the prefill model's value ...
    assert "config.tie_embedding_words = false;" in source  # ... and the decoding model always has its own head
    assert "c.use_i32_bias = true;" in source and "c.use_high_precision_silu = true;" in source
    assert "c.shadow_layers = {1, 3};" in source
    for key, value in cfg.items():  # every cpp_config key is written out
        assert f"//   {key} = {json.dumps(value)}" in source
    assert '"<|im_start|>", "<|im_end|>"' in source
    assert "kChatUserToAssistant = \"<|im_end|>\\n<|im_start|>assistant\\n\";" in source
    assert f"prefix_ids() {{ return {{{hf.bos_token_id}}}; }}" in source
    assert "{shadowquant::Split::Gpt2, \"\"}" in source
    assert "const int kChunkSize = 64;" in source
    assert "#ifdef USE_QNN" in source and "v2::QWenForCausalLM_NPU(config, chunk)" in source
    assert "#define SQ_QWEN_MODEL 1" in source
    other = demo_source("tiny", {**RUNTIME, "runtime": "phonelm-npu"}, spec, facts)  # tokenizer modes only
    assert "#define SQ_QWEN_MODEL 0" in other and "runtime profile phonelm-npu runs in mllm's own demo" in other
    with pytest.raises(PipelineError, match="head_dim"):
        demo_source("tiny", {**RUNTIME, "cpp_config": {**cfg, "head_dim": 32}}, spec, facts)


def test_the_folder_and_its_cmake_file(chat_tokenizer, tmp_path):
    hf, out, spec = chat_tokenizer
    paths = write_cpp_folder(tmp_path / "cpp", "tiny", RUNTIME, spec, {"chat": None})
    assert sorted(paths) == sorted(CPP_FILES)
    cmake = (tmp_path / "cpp" / "CMakeLists.txt").read_text()
    assert "add_executable(shadowquant_demo" in cmake and "func_link_libs(shadowquant_demo)" in cmake
    assert "kHasChat = false" in (tmp_path / "cpp" / "shadowquant_demo.cpp").read_text()


def _unicode_stub(texts: list[str]) -> str:
    """tokenizers/Unicode.hpp as the header uses it, with the categories of the characters of `texts`
    (from Python's regex module, as the Hugging Face pre-tokenizer sees them)."""
    import regex

    rows = []
    for ch in sorted(set("".join(texts))):
        letter = bool(regex.match(r"\p{L}", ch))
        number = bool(regex.match(r"\p{N}", ch))
        space = bool(regex.match(r"\s", ch))
        if letter or number or space:
            rows.append(f"        case {ord(ch)}: f.is_letter = {int(letter)}; f.is_number = {int(number)}; "
                        f"f.is_whitespace = {int(space)}; break;")
    return "\n".join([
        "#pragma once",
        "#include <cstdint>",
        "#include <string>",
        "#include <vector>",
        "struct codepoint_flags { bool is_letter = false, is_number = false, is_whitespace = false; };",
        "inline uint32_t unicode_cpt_from_utf8(const std::string &s, size_t &offset) {",
        "    unsigned char c = s[offset];",
        "    int n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : 4;",
        "    uint32_t cp = n == 1 ? c : n == 2 ? (c & 0x1F) : n == 3 ? (c & 0x0F) : (c & 0x07);",
        "    for (int i = 1; i < n; ++i) cp = (cp << 6) | (static_cast<unsigned char>(s[offset + i]) & 0x3F);",
        "    offset += n;",
        "    return cp;",
        "}",
        "inline codepoint_flags unicode_cpt_flags(uint32_t cp) {",
        "    codepoint_flags f;",
        "    switch (cp) {",
        *rows,
        "    default: break;",
        "    }",
        "    return f;",
        "}",
        "inline std::vector<std::string> unicode_regex_split(const std::string &t, const std::vector<std::string> &) {",
        "    return {t};",
        "}",
        "",
    ])


DRIVER = r'''#include <fstream>
#include <iostream>
#include <sstream>
#include "shadowquant_tokenizer.hpp"
#include "steps.inc"
int main(int argc, char **argv) {
    shadowquant::BpeTokenizer tok(argv[1], argv[2], split_steps(), added_tokens());
    std::ifstream in(argv[3], std::ios::binary);
    std::stringstream all;
    all << in.rdbuf();
    std::string text = all.str();
    size_t start = 0;
    while (start <= text.size()) {
        size_t end = text.find('\0', start);
        if (end == std::string::npos) end = text.size();
        auto ids = tok.encode(text.substr(start, end - start));
        for (size_t i = 0; i < ids.size(); ++i) std::cout << (i ? " " : "") << ids[i];
        std::cout << "\n";
        start = end + 1;
    }
}
'''


def test_the_cpp_tokenizer_header_compiles_and_gives_the_hugging_face_ids(chat_tokenizer, tmp_path):
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    hf, out, spec = chat_tokenizer
    texts = paragraphs(200) + ["It's 2024: we'll see   you\t\n\nthere!", "ünïcödé façade — “quotes” 12345",
                               "<|im_start|>user\nhi<|im_end|>\n", "   ", "a  b\n\n\n c"]
    (tmp_path / "tokenizers").mkdir()
    (tmp_path / "tokenizers" / "Unicode.hpp").write_text(_unicode_stub(texts), encoding="utf-8")
    (tmp_path / "shadowquant_tokenizer.hpp").write_text(TOKENIZER_HPP, encoding="utf-8")
    source = demo_source("tiny", RUNTIME, spec, {"chat": None})
    steps = re.search(r"inline std::vector<shadowquant::SplitStep> split_steps\(\).*?\n}\n.*?added_tokens\(\) \{.*?\n}\n",
                      source, re.S).group(0)
    (tmp_path / "steps.inc").write_text(steps, encoding="utf-8")
    (tmp_path / "driver.cpp").write_text(DRIVER, encoding="utf-8")
    binary = tmp_path / "driver"
    subprocess.run([compiler, "-std=c++17", "-O1", "-Wall", "-Werror", f"-I{tmp_path}", "-o", str(binary),
                    str(tmp_path / "driver.cpp")], check=True)
    (tmp_path / "texts.bin").write_bytes("\0".join(texts).encode("utf-8"))
    lines = subprocess.run([str(binary), str(out / "vocab.mllm"), str(out / "merges.txt"), str(tmp_path / "texts.bin")],
                           check=True, capture_output=True, text=True).stdout.split("\n")
    expected = reference_ids(hf, texts)
    got = [[int(i) for i in line.split()] for line in lines[:len(texts)]]
    wrong = [i for i, (a, b) in enumerate(zip(got, expected)) if a != b]
    assert not wrong, [(texts[i][:40], got[i][:8], expected[i][:8]) for i in wrong[:3]]
