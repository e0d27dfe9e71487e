"""The bundle's cpp/ folder: a demo program and a tokenizer for mllm (branch v1), written for this model.

cpp/ holds
- shadowquant_demo.cpp       builds QWenNPUConfig / QWenConfig with this model's values (runtime.json's
                             cpp_config, shadow layers) and runs the bundle: --mode npu (QNN prefill in
                             chunks, CPU decoding, as mllm's examples/demo_qwen_npu.cpp; only with
                             USE_QNN) or --mode cpu (the decoding model does the prompt too)
- shadowquant_tokenizer.hpp  byte-level BPE with the merges applied by rank (mllm v1's BPETokenizer
                             matches the longest vocabulary entry instead)
- CMakeLists.txt             the target, added to mllm by one line in examples/CMakeLists.txt

The tokenizer's facts the demo needs beyond the files (chat template pieces, stop ids, the ids a plain
text starts with) come from the Hugging Face tokenizer in the tokenizer check (`demo_tokenizer_facts`),
which also checks them.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import replace
from pathlib import Path

from shadowquant.atomic import write_text
from shadowquant.bundle.cpp_demo import DEMO_BODY
from shadowquant.bundle.cpp_tokenizer import TOKENIZER_HEADER, TOKENIZER_HPP
from shadowquant.errors import PipelineError
from shadowquant.bundle.tokenizer import GPT2_PATTERN, FileTokenizer, TokenizerSpec
from shadowquant.runtimes.profiles import PROFILES

log = logging.getLogger(__name__)

CPP_DIR = "cpp"
DEMO_SOURCE = "shadowquant_demo.cpp"
CMAKE_FILE = "CMakeLists.txt"
CPP_FILES = (DEMO_SOURCE, TOKENIZER_HEADER, CMAKE_FILE)
TARGET = "shadowquant_demo"
MLLM_FOLDER = "examples/shadowquant"  # where README.txt says to copy cpp/ in mllm
CMAKE_LINE = "add_subdirectory(shadowquant)"
MLLM_COMMIT = "013e4cec"

QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPLIT = QWEN2_SPLIT.replace(r"|\p{N}|", r"|\p{N}{1,3}|")
# Pre-tokenizer patterns the C++ tokenizer implements by hand (shadowquant::Split).
SPLITS = {GPT2_PATTERN: "Gpt2", QWEN2_SPLIT: "Qwen2", LLAMA3_SPLIT: "Llama3", r"\p{N}": "Digit", r"\p{N}+": "Digits"}

# QWenConfig's public fields a cpp_config key sets (models/qwen/configuration_qwen.hpp), and QWenNPUConfig's.
QWEN_FIELDS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers",
               "vocab_size", "rope_theta", "rms_norm_eps", "max_position_embeddings", "tie_embedding_words",
               "bos_token_id", "eos_token_id")
NPU_FIELDS = ("use_i32_bias", "use_high_precision_silu")
# The profiles this demo builds a model for: those run by mllm's Qwen models (the profile table's cpp_model).
QWEN_PROFILES = tuple(name for name, profile in PROFILES.items() if profile.cpp_model.startswith("mllm/models/qwen/"))

# Placeholders for taking a chat template apart.
_PLACEHOLDERS = ("SQSYSTEMTEXT", "SQUSERONETEXT", "SQASSISTANTTEXT", "SQUSERTWOTEXT")
_ROLES = ("system", "user", "assistant", "user")


# ------------------------------------------------------------------------------- tokenizer facts


def demo_tokenizer(vocab, merges, spec: TokenizerSpec) -> FileTokenizer:
    """The Python twin of cpp/shadowquant_tokenizer.hpp: merges by rank, every merge line, added tokens
    first; no NFC (the C++ applies no normalization)."""
    return FileTokenizer(vocab, merges, replace(spec, normalizer=None), as_mllm=False)


def _render(hf_tokenizer, turns: list[tuple[str, str]]) -> str:
    return hf_tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in turns], tokenize=False,
                                            add_generation_prompt=True)


def _template_ids(hf_tokenizer, turns: list[tuple[str, str]]) -> list[int]:
    out = hf_tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in turns], tokenize=True,
                                           add_generation_prompt=True)
    if hasattr(out, "keys") and "input_ids" in out:
        out = out["input_ids"]
    if out and isinstance(out[0], list):
        out = out[0]
    return [int(i) for i in out]


def _cut(text: str, marks) -> list[str] | None:
    """`text` cut at each of `marks` (in order, each exactly once), or None."""
    pieces, pos = [], 0
    for mark in marks:
        if text.count(mark) != 1:
            return None
        at = text.find(mark, pos)
        if at < 0:
            return None
        pieces.append(text[pos:at])
        pos = at + len(mark)
    return pieces + [text[pos:]]


def chat_pieces(hf_tokenizer) -> dict | None:
    """The text the chat template puts around the turns of a conversation ([system] user (assistant
    user)*, with the generation prompt), taken from renders with placeholders and confirmed on real
    conversations; None when the tokenizer has no template or it is not built of such pieces."""
    if not getattr(hf_tokenizer, "chat_template", None):
        return None
    try:
        user_only = _cut(_render(hf_tokenizer, [("user", _PLACEHOLDERS[1])]), _PLACEHOLDERS[1:2])
        three = _cut(_render(hf_tokenizer, list(zip(_ROLES[1:], _PLACEHOLDERS[1:]))), _PLACEHOLDERS[1:])
    except Exception as exc:  # a template may raise for any reason (jinja errors, role checks)
        log.warning("the chat template cannot be rendered (%s); the demo gets no chat mode", exc)
        return None
    if user_only is None or three is None or three[0] != user_only[0] or three[3] != user_only[1]:
        return None
    pieces = {"start_user": user_only[0], "user_to_assistant": three[1], "assistant_to_user": three[2],
              "end_user": user_only[1], "system": False, "start_system": "", "system_to_user": ""}
    try:
        with_system = _cut(_render(hf_tokenizer, list(zip(_ROLES, _PLACEHOLDERS))), _PLACEHOLDERS)
    except Exception:  # noqa: BLE001 - templates without a system role raise
        with_system = None
    if with_system is not None and with_system[2:] == three[1:]:
        pieces.update(system=True, start_system=with_system[0], system_to_user=with_system[1])
    samples = [[("user", "Hi there.")],
               [("user", "Hi."), ("assistant", "Hello! How can I help?"), ("user", "Tell me.")]]
    if pieces["system"]:
        samples.append([("system", "Be brief."), ("user", "One?"), ("assistant", "Two."), ("user", "Three?")])
    for turns in samples:
        if chat_text(pieces, turns) != _render(hf_tokenizer, turns):
            log.warning("the chat template is not built of fixed pieces around the turns; the demo gets no chat mode")
            return None
    return pieces


def chat_text(pieces: dict, turns: list[tuple[str, str]]) -> str:
    """The text the C++ demo builds for `turns` (its chat_text, line by line)."""
    first = 0
    if turns[0][0] == "system":
        if not pieces["system"]:
            raise PipelineError("this chat template takes no system turn")
        out, first = pieces["start_system"] + turns[0][1] + pieces["system_to_user"], 1
    else:
        out = pieces["start_user"]
    for i in range(first, len(turns)):
        user = (i - first) % 2 == 0
        if turns[i][0] != ("user" if user else "assistant"):
            raise PipelineError(f"turn {i} is {turns[i][0]!r}; turns alternate user/assistant")
        out += turns[i][1]
        if i + 1 < len(turns):
            out += pieces["user_to_assistant"] if user else pieces["assistant_to_user"]
    if (len(turns) - first) % 2 == 0:
        raise PipelineError("the conversation must end with a user turn")
    return out + pieces["end_user"]


CHECK_CONVERSATION = [
    ("system", "You are a concise assistant. Answer in one or two sentences."),
    ("user", "What is the capital of France?"),
    ("assistant", "The capital of France is Paris."),
    ("user", "And how many people live there, roughly?"),
    ("assistant", "About 2.1 million people live in the city itself, and over 12 million in its metropolitan area."),
    ("user", "Write a Python function that returns the n-th Fibonacci number."),
]


def demo_tokenizer_facts(hf_tokenizer, tokenizer: FileTokenizer, model_dir=None) -> dict:
    """What the demo needs besides the files, checked against the Hugging Face tokenizer: the chat template's
    pieces (each turn of a 3-turn conversation, with and without the system turn, must give the ids of
    apply_chat_template), the ids a plain text starts with (a BOS the tokenizer adds) and the stop ids."""
    probe = "Hello world"
    plain = list(hf_tokenizer(probe, add_special_tokens=False)["input_ids"])
    special = list(hf_tokenizer(probe)["input_ids"])
    prefix = special[:special.index(plain[0])] if plain and plain[0] in special else []
    stops = set()
    if hf_tokenizer.eos_token_id is not None:
        stops.add(int(hf_tokenizer.eos_token_id))
    if model_dir is not None:
        for name in ("generation_config.json", "config.json"):
            path = Path(model_dir) / name
            if path.is_file():
                value = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
                stops.update(int(v) for v in (value if isinstance(value, list) else [value]) if v is not None)
    pieces = chat_pieces(hf_tokenizer)
    checks = []
    if pieces is not None:
        conversations = [CHECK_CONVERSATION[:k] for k in (2, 4, 6)]
        conversations += [CHECK_CONVERSATION[1:k] for k in (2, 4, 6)] if pieces["system"] else []
        if not pieces["system"]:
            conversations = [CHECK_CONVERSATION[1:k] for k in (2, 4, 6)]
        for turns in conversations:
            theirs = _template_ids(hf_tokenizer, turns)
            ours = tokenizer.encode(chat_text(pieces, turns))
            checks.append({"turns": len(turns), "system": turns[0][0] == "system", "tokens": len(theirs),
                           "identical": ours == theirs})
    return {"prefix_ids": prefix, "stop_ids": sorted(stops), "chat": pieces, "chat_check": checks}


# ------------------------------------------------------------------------------- the generated source


def _cpp_string(text: str) -> str:
    out = []
    for ch in text:
        if ch == "\\":
            out.append("\\\\")
        elif ch == '"':
            out.append('\\"')
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ch == "?":  # no trigraphs
            out.append(f"\\{ord(ch):03o}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _cpp_value(key: str, value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise PipelineError(f"cpp_config.{key} = {value} is not a finite number")
        return repr(value) if key != "rope_theta" else f"{value!r}f"
    raise PipelineError(f"cpp_config.{key} = {value!r} is not a number the C++ config holds")


def split_steps(spec: TokenizerSpec) -> list[tuple[str, str]]:
    """(shadowquant::Split kind, pattern) per pre-tokenizer pattern; Regex for one not hand-written."""
    return [(SPLITS.get(p, "Regex"), p) for p in spec.split_patterns]


def demo_source(name: str, runtime: dict, spec: TokenizerSpec, facts: dict) -> str:
    """cpp/shadowquant_demo.cpp: this model's values (namespace sq_model), then the fixed program."""
    profile = runtime.get("runtime")
    qwen = profile in QWEN_PROFILES
    cfg = dict(runtime.get("cpp_config") or {})
    if not cfg:
        raise PipelineError("runtime.json has no cpp_config")
    shadow = sorted(int(i) for i in runtime.get("shadow_layers", cfg.get("shadow_layers", [])))
    hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    if int(cfg.get("head_dim", hidden // heads)) * heads != hidden:
        raise PipelineError(f"cpp_config.head_dim {cfg.get('head_dim')} is not hidden_size / num_attention_heads; "
                            "mllm's Qwen models cannot hold it")
    chunk = int(runtime.get("chunk_size") or 128)
    lines = [
        f"// shadowquant_demo.cpp for {name}: written by shadowquant from the bundle's runtime.json "
        f"(runtime profile {profile}, transform {runtime.get('transform')}, point {runtime.get('point')}).",
        f"// For mllm branch v1 (written against commit {MLLM_COMMIT}); see ../README.txt.",
        "#include <algorithm>",
        "#include <cmath>",
        "#include <filesystem>",
        "#include <fstream>",
        "#include <iostream>",
        "#include <set>",
        "#include <sstream>",
        "#include <stdexcept>",
        "#include <string>",
        "#include <vector>",
        "",
        '#include "Types.hpp"',
        '#include "backends/cpu/CPUBackend.hpp"',
        '#include "cmdline.h"',
        '#include "models/qwen/configuration_qwen.hpp"',
        '#include "models/qwen/modeling_qwen.hpp"',
        '#include "tokenizers/Tokenizer.hpp"',
        "#ifdef USE_QNN",
        '#include "Context.hpp"',
        '#include "QNNBackend.hpp"',
        '#include "models/qwen/modeling_qwen_npu_v2.hpp"',
        "#endif",
        f'#include "{TOKENIZER_HEADER}"',
        "",
        "using namespace mllm;",
        "",
        "#ifdef USE_QNN",
        '#define SQ_DEFAULT_MODE "npu"',
        "#else",
        '#define SQ_DEFAULT_MODE "cpu"',
        "#endif",
        "",
        f"#define SQ_QWEN_MODEL {int(qwen)}",
        f'#define SQ_NO_MODEL "this demo builds mllm\'s Qwen models ({", ".join(QWEN_PROFILES)}); runtime profile '
        f'{profile} runs in mllm\'s own demo (the tokenizer options work)"',
        "",
        "namespace sq_model {",
        f"const char *const kName = {_cpp_string(name)};",
        f"const int kChunkSize = {chunk}; // runtime.json chunk_size (at most {runtime.get('max_chunk_size')})",
        f"const int kHeads = {heads};",
        "",
        "// runtime.json's cpp_config, key by key:",
    ]
    for key, value in cfg.items():
        shown = json.dumps(value)
        where = ("QWenConfig" if key in QWEN_FIELDS else "QWenNPUConfig" if key in NPU_FIELDS or key == "shadow_layers"
                 else "checked, no field")
        lines.append(f"//   {key} = {shown} ({where})")
    unknown = [k for k in cfg if k not in QWEN_FIELDS + NPU_FIELDS + ("shadow_layers", "head_dim", "qkv_bias")]
    if unknown:
        log.warning("cpp_config keys without a C++ field: %s", ", ".join(unknown))
    if not qwen:
        log.warning("runtime profile %s: the C++ demo's model modes are written for mllm's Qwen models", profile)
    lines += [
        "",
        "#if SQ_QWEN_MODEL",
        "// Every public field of QWenConfig the model's values differ in; the constructor takes a known size",
        "// string (it throws on others), then each value is overwritten.",
        "template <class Config>",
        "void set_config(Config &c, int cache_limit) {",
    ]
    for key in QWEN_FIELDS:
        if key in cfg:
            lines.append(f"    c.{key} = {_cpp_value(key, cfg[key])};")
    layers = int(cfg["num_hidden_layers"])
    lines += [
        f"    c.max_window_layers = {layers};",
        f"    c.sliding_window = {int(cfg.get('max_position_embeddings', 32768))};",
        "    c.cache_limit = cache_limit;",
        "    c.RoPE_type = RoPEType::HFHUBROPE;",
        "}",
        "",
        "#ifdef USE_QNN",
        "void set_npu_config(QWenNPUConfig &c, int cache_limit) {",
        "    set_config(c, cache_limit);",
        "    c.shadow_layers = {" + ", ".join(str(i) for i in shadow) + "}; // runtime.json shadow_layers",
    ]
    for key in NPU_FIELDS:
        if key in cfg:
            lines.append(f"    c.{key} = {_cpp_value(key, cfg[key])};")
    lines += ["}", "#endif", "#endif", ""]
    chat = facts.get("chat")
    lines += [
        "// The tokenizer (tokenizer.json): pre-tokenization, added tokens matched before it.",
        "inline std::vector<shadowquant::SplitStep> split_steps() {",
        "    return {",
    ]
    for kind, pattern in split_steps(spec):
        lines.append(f"        {{shadowquant::Split::{kind}, {_cpp_string(pattern if kind == 'Regex' else '')}}}, "
                     f"// {pattern}")
    lines += [
        "    };",
        "}",
        "inline std::vector<std::string> added_tokens() {",
        "    return {" + ", ".join(_cpp_string(t) for t in spec.added_tokens) + "};",
        "}",
        f"const bool kIgnoreMerges = {'true' if spec.ignore_merges else 'false'};",
        f"// normalizer: {spec.normalizer or 'none'}"
        + ("; the C++ tokenizer applies no NFC: give it NFC text" if spec.normalizer else ""),
        "inline std::vector<int> prefix_ids() { return {" + ", ".join(str(i) for i in facts.get("prefix_ids", []))
        + "}; } // before a plain text",
        "inline std::vector<int> stop_ids() { return {" + ", ".join(str(i) for i in facts.get("stop_ids", [])) + "}; }",
        "",
        "// The chat template's pieces around the turns (taken from the template; see runtime.json bundle.cpp).",
        f"const bool kHasChat = {'true' if chat else 'false'};",
        f"const bool kChatSystem = {'true' if chat and chat['system'] else 'false'};",
    ]
    for key, cname in (("start_system", "kChatStartSystem"), ("system_to_user", "kChatSystemToUser"),
                       ("start_user", "kChatStartUser"), ("user_to_assistant", "kChatUserToAssistant"),
                       ("assistant_to_user", "kChatAssistantToUser"), ("end_user", "kChatEndUser")):
        lines.append(f"const std::string {cname} = {_cpp_string((chat or {}).get(key, ''))};")
    lines += ["} // namespace sq_model", ""]
    return "\n".join(lines) + DEMO_BODY


def cmake_text() -> str:
    return "\n".join([
        "# shadowquant's demo for mllm (branch v1): copy this folder to mllm's examples/shadowquant and add",
        f"# the line `{CMAKE_LINE}` at the end of examples/CMakeLists.txt (its macros are used here).",
        f"add_executable({TARGET} ${{CMAKE_CURRENT_SOURCE_DIR}}/{DEMO_SOURCE})",
        f"target_include_directories({TARGET} PRIVATE ${{CMAKE_CURRENT_SOURCE_DIR}})",
        f"target_link_libraries({TARGET} PUBLIC mllm_llm)",
        f"func_set_compile_opts_defs({TARGET})",
        f"func_link_libs({TARGET})",
        "",
    ])


def write_cpp_folder(out_dir, name: str, runtime: dict, spec: TokenizerSpec, facts: dict) -> dict:
    """Write cpp/ (the demo source, the tokenizer header, CMakeLists.txt); returns {file name: path}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    texts = {DEMO_SOURCE: demo_source(name, runtime, spec, facts), TOKENIZER_HEADER: TOKENIZER_HPP,
             CMAKE_FILE: cmake_text()}
    paths = {}
    for file in CPP_FILES:
        write_text(out_dir / file, texts[file])
        paths[file] = out_dir / file
    return paths


def commands(runtime: dict, facts: dict) -> dict:
    """How to build and run the demo (README.txt and runtime.json's bundle.cpp)."""
    chunk = int(runtime.get("chunk_size") or 128)
    chat = '--chat --prompt "Write a Python function that returns the n-th Fibonacci number."' \
        if facts.get("chat") else '--prompt "def fibonacci(n):"'
    files = "--vocab vocab.mllm --merges merges.txt --model decode.mllm"
    return {
        "copy": f"cp -r cpp <mllm>/{MLLM_FOLDER}",
        "cmake_line": CMAKE_LINE,
        # mllm's examples/CMakeLists.txt ends without a newline: the line must start a line of its own
        "cmake_append": f"printf '\\n{CMAKE_LINE}\\n' >> <mllm>/examples/CMakeLists.txt",
        "build_cpu": f"cd <mllm> && mkdir -p build && cd build && cmake -G Ninja -DCMAKE_BUILD_TYPE=Release -DQNN=OFF .. "
                     f"&& ninja {TARGET}",
        "build_npu": f"cd <mllm>/scripts && ./build_android_qnn.sh   # then make {TARGET} in ../build-arm-qnn",
        "run_npu": f"./{TARGET} --mode npu {files} --qnn-model prefill-int8.mllm --chunk {chunk} {chat} "
                   "--max-new-tokens 128 --threads 4",
        "run_cpu": f"./{TARGET} --mode cpu {files} {chat} --max-new-tokens 128 --threads 4",
        "print_ids": f"./{TARGET} {files} {chat} --print-ids",
        "score": f"./{TARGET} --mode cpu {files} --score some_text.txt",
    }
