"""The phone bundle: every file mllm's NPU demo loads beside the int8 prefill model, and its checks.

results/<name>/bundle/ holds
- prefill-int8.mllm  the QNN prefill model (a copy of the export's model.mllm)
- decode.mllm        the CPU decoding model: the candidate bundle.decode chose (decoding/candidates.py; Q4_0 / Q8_0
                     per tensor, from the prefill variant's weights or the unrotated ones with the same KV cache)
- vocab.mllm, merges.txt  the tokenizer in mllm's format (bundle/tokenizer.py)
- runtime.json       the export's runtime.json plus a `bundle` section (files, tokenizer, demo)
- README.txt         how to build the demo in mllm and the commands to run it
- cpp/               the demo program and tokenizer for mllm, written for this model (bundle/cpp.py)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from shadowquant.atomic import atomic_path, write_json, write_text
from shadowquant.bundle.cpp import (
    CMAKE_FILE,
    CPP_DIR,
    DEMO_SOURCE,
    TARGET,
    TOKENIZER_HEADER,
    commands,
    demo_tokenizer,
    demo_tokenizer_facts,
    write_cpp_folder,
)
from shadowquant.errors import PipelineError
from shadowquant.jsonfile import read_json_object
from shadowquant.export.mllm import DTYPE_INT8, DTYPE_NAMES, read_mllm
from shadowquant.bundle.tokenizer import (
    GPT2_PATTERN,
    FileTokenizer,
    MllmV1Tokenizer,
    TokenizerSpec,
    merges_mllm_skips,
    read_merges,
    read_vocab,
    reference_ids,
    round_trip,
    tokenizer_files,
    write_merges,
    write_vocab,
)
from shadowquant.runtimes import runtime_of

log = logging.getLogger(__name__)

PREFILL = "prefill-int8.mllm"
DECODE = "decode.mllm"
VOCAB = "vocab.mllm"
MERGES = "merges.txt"
RUNTIME = "runtime.json"
README = "README.txt"
CPP_DEMO = f"{CPP_DIR}/{DEMO_SOURCE}"
CPP_TOKENIZER = f"{CPP_DIR}/{TOKENIZER_HEADER}"
CPP_CMAKE = f"{CPP_DIR}/{CMAKE_FILE}"
CPP_BUNDLE_FILES = (CPP_DEMO, CPP_TOKENIZER, CPP_CMAKE)
BUNDLE_FILES = (PREFILL, DECODE, VOCAB, MERGES, RUNTIME, README) + CPP_BUNDLE_FILES

# Qwen2's pre-tokenizer (its tokenizer.json), which mllm's QWenTokenizer hard-codes (tokenizers/Unicode.hpp).
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")
# mllm's C++ tokenizer classes by the pre-tokenization they hard-code, and the demo each belongs to.
MLLM_TOKENIZERS = {
    "QWenTokenizer": ((QWEN2_PATTERN,), "models/qwen/tokenization_qwen.hpp"),
    "SmolLMTokenizer": ((r"\p{N}", GPT2_PATTERN), "models/smollm/tokenization_smollm.hpp"),
}


# ------------------------------------------------------------------------------- tokenizer


def write_tokenizer(model_dir: str | os.PathLike, vocab_out, merges_out, spec_out) -> dict:
    """vocab.mllm and merges.txt from the model's tokenizer.json, and the pre-tokenization beside them."""
    source = Path(model_dir) / "tokenizer.json"
    entries, merges, spec = tokenizer_files(source)
    write_vocab(vocab_out, entries)
    write_merges(merges_out, merges)
    skipped = merges_mllm_skips(merges)
    cls, note = mllm_tokenizer_class(spec)
    summary = {"source": str(source), "vocab_entries": len(entries), "merges": len(merges),
               "merges_mllm_skips": skipped, "spec": spec.as_dict(), "mllm_class": cls, "mllm_class_note": note}
    write_json(spec_out, summary)
    log.info("%d tokens, %d merges (%d start with '#', which mllm's reader skips); mllm class: %s",
             len(entries), len(merges), len(skipped), cls or "none matches")
    return summary


def mllm_tokenizer_class(spec: TokenizerSpec) -> tuple[str | None, str]:
    """The mllm C++ tokenizer class whose hard-coded pre-tokenization equals `spec`'s, and a note."""
    for name, (patterns, source) in MLLM_TOKENIZERS.items():
        if tuple(spec.split_patterns) == patterns:
            note = f"{name} ({source}) splits text as this tokenizer does"
            if spec.normalizer == "NFC":
                note += "; it applies no NFC normalization, so text must be NFC already"
            return name, note
    known = "; ".join(f"{n}: {' then '.join(p)}" for n, (p, _) in MLLM_TOKENIZERS.items())
    return None, (f"no mllm tokenizer class splits text as this tokenizer does ({' then '.join(spec.split_patterns)}); "
                  f"mllm's classes split as {known}: a class with this model's pattern must be added")


def heldout_texts(corpus, num_texts: int, seed: int, offset: int) -> list[str]:
    """Up to `num_texts` paragraphs of the corpus records after the first `offset` of its seeded shuffle
    (the calibration records), in that order."""
    from shadowquant.inputs.corpus import count_records, select_records, selection_indices

    n_records = count_records(corpus)
    if n_records <= offset:
        raise PipelineError(f"{corpus}: {n_records} records, none left after the {offset} calibration records")
    records = select_records(corpus, selection_indices(n_records, n_records - offset, seed, offset))
    texts = []
    for record in records:
        texts.extend(p.strip() for p in record.split("\n\n") if p.strip())
        if len(texts) >= num_texts:
            break
    return texts[:num_texts]


def check_tokenizer(vocab, merges, spec_json, model_dir, corpus, out_json, num_texts: int = 1000, seed: int = 42,
                    offset: int = 0) -> dict:
    """The bundle's tokenizer files against the Hugging Face tokenizer on held-out text: read with every
    merge (the files are exact when all texts agree; anything else fails the rule), as the bundle's C++
    demo tokenizes (cpp/shadowquant_tokenizer.hpp: merges by rank, no NFC; with the chat template's
    pieces on every turn of a conversation, which must agree too), as mllm's reader reads them, and as
    mllm v1's tokenizer then tokenizes (greedy longest match; reported, since no file can change it)."""
    from shadowquant.model.loading import load_tokenizer

    spec = TokenizerSpec.from_dict(json.loads(Path(spec_json).read_text(encoding="utf-8"))["spec"])
    texts = heldout_texts(corpus, num_texts, seed, offset)
    hf_tokenizer = load_tokenizer(model_dir)
    expected = reference_ids(hf_tokenizer, texts)
    exact = round_trip(FileTokenizer(vocab, merges, spec, as_mllm=False), texts, expected)
    cpp = demo_tokenizer(vocab, merges, spec)
    demo = round_trip(cpp, texts, expected)
    facts = demo_tokenizer_facts(hf_tokenizer, cpp, model_dir)
    as_mllm = round_trip(FileTokenizer(vocab, merges, spec, as_mllm=True), texts, expected)
    runtime = round_trip(MllmV1Tokenizer(vocab, merges, spec), texts, expected)
    result = {"texts": len(texts), "all_merges": exact, "demo_tokenizer": demo, "demo": facts,
              "demo_tokenizer_class": f"shadowquant::BpeTokenizer ({CPP_DIR}/{TOKENIZER_HEADER}), used by "
                                      f"{CPP_DIR}/{DEMO_SOURCE}",
              "as_mllm_reads": as_mllm, "mllm_v1_tokenizer": runtime,
              "merges_mllm_skips": merges_mllm_skips(read_merges(merges, as_mllm=False))}
    write_json(out_json, result)
    chat_ok = sum(c["identical"] for c in facts["chat_check"])
    log.info("tokenizer files vs Hugging Face on %d held-out texts: %d identical (all merges), %d as the demo's "
             "C++ tokenizer runs (chat template: %s), %d identical as mllm reads the merges, %d identical as mllm "
             "v1's tokenizer runs", len(texts), exact["identical"], demo["identical"],
             f"{chat_ok} of {len(facts['chat_check'])} conversations identical" if facts["chat"] else "none usable",
             as_mllm["identical"], runtime["identical"])
    if chat_ok != len(facts["chat_check"]):
        raise PipelineError(f"{vocab}: the demo's chat prompt gives other ids than the Hugging Face chat template "
                            f"on {len(facts['chat_check']) - chat_ok} of {len(facts['chat_check'])} conversations; "
                            f"see {out_json}")
    if exact["identical"] != len(texts):
        first = exact["mismatches"][0]
        raise PipelineError(f"{vocab}: the tokenizer files give other ids than the Hugging Face tokenizer on "
                            f"{len(texts) - exact['identical']} of {len(texts)} held-out texts (first: text "
                            f"{first['record']} at token {first['first_difference']}); see {out_json}")
    return result


# ------------------------------------------------------------------------------- assembly


def copy_into_bundle(src, dst) -> None:
    """A real copy: the bundle folder is pushed to a phone as it is, and a link would share the
    timestamp Snakemake sets on its outputs with the export it came from."""
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# The quality figures runtime.json records for a model (decoding model, and each model of the demo evaluation).
QUALITY_KEYS = ("perplexity", "perplexity_increase", "perplexity_increase_ci_low", "perplexity_increase_ci_high", "kl",
                "agreement")


def quality_of(metrics: dict, extra=()) -> dict:
    return {k: metrics.get(k) for k in (*QUALITY_KEYS, *extra)}


def increase_text(m: dict) -> str:
    """'+6.0% [+5.1%, +6.9%] over float': a perplexity increase with its interval, as README.txt writes it."""
    return (f"{m['perplexity_increase']:+.1%} [{m['perplexity_increase_ci_low']:+.1%}, "
            f"{m['perplexity_increase_ci_high']:+.1%}] over float")


def demo_headline(demo_result: dict) -> list[str]:
    """README lines for the demo evaluation (evaluate.demo_evaluation): what a generation gets, the NPU prefill
    handing over to the CPU decoding model, beside each model alone, on the same continuation tokens."""
    setup, demo = demo_result["setup"], demo_result["demo"]
    lines = [f"  What a generation gets, as the demo runs it: the NPU model prefills the first {setup['prefill_fraction']:g} "
             f"of each of {demo['num_samples']} held-out records",
             f"  (chunks of {setup['chunk_size']}), hands its KV cache over in {setup['handover']}, and the CPU decoding "
             f"model writes the rest ({demo['num_tokens']} tokens scored):"]
    for key, label in (("demo", "NPU prefill + CPU decoding"), ("prefill_only", "NPU prefill model alone"),
                       ("decode_only", "CPU decoding model alone")):
        m = demo_result[key]
        lines.append(f"    {label + ':':<28} perplexity {m['perplexity']:.3f} ({increase_text(m)}), "
                     f"KL {m['kl']:.4f}, agreement {m['agreement']:.3f}")
    return lines


def readme_text(name: str, runtime: dict, tokenizer: dict, sizes: dict, decode_choice: dict | None,
                check: dict | None = None, demo_result: dict | None = None) -> str:
    cfg = runtime.get("cpp_config", {})
    demo = (check or {}).get("demo") or {}
    run = commands(runtime, demo)
    shadow = runtime.get("shadow_layers", cfg.get("shadow_layers", []))
    bundle = runtime.get("bundle", {})
    decoding = f"{bundle.get('decoding_candidate', 'prefill:q4_0')}, {bundle.get('decoding_dtype', 'q4_0')}"
    lines = [
        f"shadowquant phone bundle for {name} (runtime profile {runtime['runtime']})",
        "",
    ]
    if runtime.get("mllm_v1_blocker"):  # the NPU model of this profile does not load in mllm v1 as it is
        lines += [f"WARNING (NPU mode): {runtime['mllm_v1_blocker']}.", ""]
    lines += ["Files"]
    for file, size in sizes.items():
        lines.append(f"  {file:<28} {size / 1e6:10.3f} MB")
    lines += [
        "",
        f"{CPP_DIR}/ is a demo program for mllm (branch v1), written for this model: {DEMO_SOURCE} builds",
        f"QWenNPUConfig / QWenConfig with this model's values and shadow layers {sorted(shadow)} (the file lists every",
        f"cpp_config value), and {TOKENIZER_HEADER} is the model's tokenizer (merges applied by rank, every",
        "merge line, the added tokens and the model's pre-tokenization). Nothing in mllm is edited.",
        "",
        "1. Copy the folder into mllm:",
        f"     {run['copy']}",
        "2. Add one line at the end of <mllm>/examples/CMakeLists.txt (on a line of its own: the file ends without",
        "   a newline):",
        f"     {run['cmake_line']}",
        f"   e.g. {run['cmake_append']}",
        "3. Build the target " + TARGET + ":",
        "     phone (NPU; needs the QNN SDK, mllm's build with -DQNN=ON):",
        f"       {run['build_npu']}",
        "     any computer, CPU only (no QNN SDK):",
        f"       {run['build_cpu']}",
        "4. Run it in this folder (on the phone: push the folder and the binary):",
        f"     NPU prefill (int8, QNN) then CPU decoding ({decoding}), as mllm's demo_qwen_npu does:",
        f"       {run['run_npu']}",
        "     CPU only (the decoding model does the prompt too):",
        f"       {run['run_cpu']}",
        "   Options: --prompt TEXT, --chat (the prompt as the user turn of the model's chat template), --system TEXT,",
        "   --chat-file FILE (<<<system>>> / <<<user>>> / <<<assistant>>> lines), --max-new-tokens N, --threads N,",
        "   --print-ids (the prompt's token ids), --tokenize-file FILE (ids of NUL-separated texts),",
        "   --score FILE (perplexity of a text under the CPU model).",
        "",
        "Tokenizer",
    ]
    if check and check.get("demo_tokenizer"):
        d = check["demo_tokenizer"]
        lines.append(f"  The demo's tokenizer gives the model's ids on {d['identical']} of {d['records']} held-out "
                     f"paragraphs ({d['tokens']} tokens).")
    if demo.get("chat"):
        chats = demo.get("chat_check", [])
        lines.append(f"  Chat prompts: {sum(c['identical'] for c in chats)} of {len(chats)} conversations (1 to 3 user "
                     "turns, with and without a system turn) give apply_chat_template's ids.")
    elif check is not None:
        lines.append("  The model's tokenizer has no chat template the demo can bake in: --chat is unavailable.")
    if tokenizer.get("spec", {}).get("normalizer"):
        lines.append(f"  The model's tokenizer normalizes text ({tokenizer['spec']['normalizer']}); the demo does not: "
                     "give it normalized text.")
    if check and check.get("mllm_v1_tokenizer"):
        v1 = check["mllm_v1_tokenizer"]
        lines.append(f"  mllm v1's own tokenizer classes match words greedily instead of applying the merges (on "
                     f"{v1['records']} held-out paragraphs the model's ids for {v1['identical']}), and their merges "
                     f"reader skips the {len(tokenizer.get('merges_mllm_skips', []))} merges starting with '#': the "
                     "demo does not use them.")
    lines += ["", "Values in the demo's config (runtime.json cpp_config):"]
    for key, value in cfg.items():
        lines.append(f"  {key} = {json.dumps(value)}")
    lines.append("")
    if decode_choice or demo_result:
        lines.append("Quality on held-out text (95 % bootstrap intervals, paired with float):")
    if demo_result:
        lines += demo_headline(demo_result)
    if decode_choice:
        m, c = decode_choice["metrics"], decode_choice
        lines += [
            f"  decoding model {c['chosen']} ({c['dtype_mix']}; {c['recipe_description']}; "
            f"weights: {c['source_description']}):",
            f"    perplexity {m['perplexity']:.3f} ({increase_text(m)}), KL to "
            f"float {m['kl']:.4f}, top-1 agreement {m['agreement']:.3f}",
            f"    chosen: {c['why']}",
            "    (measured with mllm's CPU numerics: Q8_0 activations at every Q4_0 / Q8_0 matmul, K/V in float16;",
            "    every candidate evaluated is in results/<name>/decode_candidates.csv)",
            "",
        ]
    return "\n".join(lines)


def assemble_bundle(name: str, prefill, decode, vocab, merges, tokenizer_json, runtime_json, tokenizer_check,
                    decode_choice, float_json, out_prefill, out_runtime, out_readme, out_report,
                    out_cpp_dir=None, demo_evaluation=None) -> dict:
    """Copy the prefill model in, write the C++ demo folder (bundle/cpp.py; `out_cpp_dir`, by default
    cpp/ in the bundle), the bundle's runtime.json and README.txt, inspect the whole bundle and write the
    report (sizes, tokenizer check, decoding model quality). `demo_evaluation`: demo_evaluation.json of this
    bundle's two models, the quality a generation gets (README.txt's and runtime.json's headline)."""
    from shadowquant.evaluate.sweep import read_point_json

    runtime = json.loads(Path(runtime_json).read_text(encoding="utf-8"))
    runtime_of(runtime).require_phone(f"{runtime_json} (the bundle)")
    tokenizer = json.loads(Path(tokenizer_json).read_text(encoding="utf-8"))
    check = json.loads(Path(tokenizer_check).read_text(encoding="utf-8"))
    choice = read_json_object(decode_choice, "decoding model choice", "re-run the bundle")
    demo_result = (read_json_object(demo_evaluation, "demo evaluation", "run snakemake demo again")
                   if demo_evaluation is not None else None)
    decode_metrics = {**choice["metrics"], "candidate": choice["chosen"], "why": choice["why"],
                      "dtype_mix": choice["dtype_mix"], "file_bytes": choice["file_bytes"]}
    float_metrics = {k: v for k, v in read_point_json(float_json).items() if k != "per_record"}
    copy_into_bundle(prefill, out_prefill)
    bundle_dir = Path(out_prefill).parent
    files = {PREFILL: out_prefill, DECODE: decode, VOCAB: vocab, MERGES: merges}
    for file, path in files.items():
        if Path(path).parent.resolve() != bundle_dir.resolve():
            raise PipelineError(f"{path}: bundle file {file} must be written into {bundle_dir}")
    demo = check.get("demo") or {}
    cpp_paths = write_cpp_folder(out_cpp_dir or bundle_dir / CPP_DIR, name, runtime,
                                 TokenizerSpec.from_dict(tokenizer["spec"]), demo)
    if Path(cpp_paths[DEMO_SOURCE]).parent.resolve() != (bundle_dir / CPP_DIR).resolve():
        raise PipelineError(f"{out_cpp_dir}: the C++ demo must be written into {bundle_dir / CPP_DIR}")
    files.update({f"{CPP_DIR}/{file}": path for file, path in cpp_paths.items()})
    sizes = {file: Path(path).stat().st_size for file, path in files.items()}
    config_name = f"{name}-shadowquant"
    run = commands(runtime, demo)
    runtime["bundle"] = {
        "files": {file: {"bytes": sizes[file], "sha256": sha256(path)} for file, path in files.items()},
        "prefill_model": PREFILL, "decoding_model": DECODE, "decoding_candidate": choice["chosen"],
        "decoding_source": choice["source"], "decoding_recipe": choice["recipe"], "decoding_dtype": choice["dtype_mix"],
        "decoding_tensors_by_dtype": choice["tensors_by_dtype"], "decoding_why": choice["why"],
        "decoding_quality": quality_of(choice["metrics"]),
        "generation_quality": None if demo_result is None else {
            key: quality_of(demo_result[key], ("num_tokens",)) for key in ("demo", "prefill_only", "decode_only",
                                                                           "float")},
        "vocab": VOCAB, "merges": MERGES, "config_name": config_name,
        "tokenizer": {"mllm_class": tokenizer["mllm_class"], "note": tokenizer["mllm_class_note"],
                      "spec": tokenizer["spec"], "merges_mllm_skips": len(tokenizer["merges_mllm_skips"])},
        "demo_command": run["run_npu"],
        "cpp": {"folder": CPP_DIR, "files": [f"{CPP_DIR}/{file}" for file in cpp_paths], "target": TARGET,
                "commands": run, "chat_template": demo.get("chat"), "stop_ids": demo.get("stop_ids", []),
                "prefix_ids": demo.get("prefix_ids", []),
                "tokenizer_check": {k: (check.get("demo_tokenizer") or {}).get(k)
                                    for k in ("records", "identical", "tokens")},
                "chat_check": demo.get("chat_check", [])},
    }
    write_json(out_runtime, runtime)
    sizes[RUNTIME] = Path(out_runtime).stat().st_size
    text = readme_text(name, runtime, tokenizer, sizes, choice, check, demo_result)
    write_text(out_readme, text)
    sizes[README] = Path(out_readme).stat().st_size
    report = inspect_bundle(bundle_dir)
    result = {"bundle": str(bundle_dir), "sizes": sizes, "total_bytes": sum(sizes.values()),
              "tokenizer_check": check, "decoding_model": decode_metrics,
              "decoding_candidates": choice.get("candidates", []), "float": float_metrics,
              "inspection": report.as_dict()}
    write_json(out_report, result)
    if report.problems:
        raise PipelineError(f"{bundle_dir}: {report.problems[0]} ({len(report.problems)} problems; see {out_report})")
    return result


# ------------------------------------------------------------------------------- inspection


@dataclass
class BundleReport:
    directory: Path
    problems: list[str] = field(default_factory=list)
    facts: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"directory": str(self.directory), "ok": not self.problems, "problems": self.problems,
                "facts": self.facts}


def _clip_layers(prefill) -> set[int]:
    """Layers whose down_proj (the shadow role) carries clip flags in the prefill file."""
    layers = set()
    for name in prefill.names:
        if name.endswith(".clip_input") and ".layers." in name:
            layers.add(int(name.split(".layers.")[1].split(".")[0]))
    return layers


def inspect_bundle(directory: str | os.PathLike) -> BundleReport:
    """Check a bundle as a whole: every file there and readable, one vocabulary size, the shadow layers
    of runtime.json equal to the clip flags in the prefill file, and the decoding model holding a
    tensor for every weight of the prefill model (same names), and both models holding every tensor their
    C++ model loads, with its dtype and byte size (inspector.prefill_loaded, inspector.decode_loaded; the
    decoding model's weights may be Q4_0 or Q8_0, each checked with the size its own dtype needs)."""
    from shadowquant.decoding.candidates import decode_dtype_problems, dtype_mix
    from shadowquant.export.inspector import decode_loaded, loaded_problems, prefill_loaded

    directory = Path(directory)
    report = BundleReport(directory)
    problems = report.problems
    missing = [f for f in BUNDLE_FILES if not (directory / f).is_file()]
    if missing:
        problems.append(f"missing {', '.join(missing)}")
        return report
    try:
        runtime = json.loads((directory / RUNTIME).read_text(encoding="utf-8"))
        prefill, decode = read_mllm(directory / PREFILL), read_mllm(directory / DECODE)
        vocab = read_vocab(directory / VOCAB)
        merges = read_merges(directory / MERGES, as_mllm=False)
    except (PipelineError, ValueError, OSError) as exc:
        problems.append(str(exc))
        return report
    cfg = runtime.get("cpp_config", {})
    vocab_size = int(cfg.get("vocab_size", 0))
    hidden = int(cfg.get("hidden_size", 0))
    max_id = max(e.id for e in vocab)
    report.facts.update(vocab_entries=len(vocab), max_token_id=max_id, merges=len(merges), vocab_size=vocab_size,
                        prefill_tensors=len(prefill.names), decode_tensors=len(decode.names))
    if max_id >= vocab_size:
        problems.append(f"{VOCAB}: token id {max_id} is outside the model's vocabulary of {vocab_size} rows")
    for label, stored in ((PREFILL, prefill), (DECODE, decode)):
        if "model.embed_tokens.weight" in stored:
            rows = stored.entry("model.embed_tokens.weight").numel // max(hidden, 1)
            if rows != vocab_size:
                problems.append(f"{label}: model.embed_tokens.weight has {rows} rows, runtime.json's vocab_size is "
                                f"{vocab_size}")
        else:
            problems.append(f"{label}: no model.embed_tokens.weight")
    shadow = set(int(i) for i in runtime.get("shadow_layers", []))
    if set(int(i) for i in cfg.get("shadow_layers", shadow)) != shadow:
        problems.append(f"{RUNTIME}: shadow_layers {sorted(shadow)} differ from cpp_config.shadow_layers")
    flagged = _clip_layers(prefill)
    report.facts.update(shadow_layers=sorted(shadow), clip_flag_layers=sorted(flagged))
    if flagged != shadow:
        problems.append(f"{PREFILL}: clip flags for layers {sorted(flagged)}, runtime.json's shadow layers are "
                        f"{sorted(shadow)}")
    # The decoding model needs every float-carrying weight the prefill model multiplies with, by name.
    weights = [n for n in prefill.names if n.endswith(".weight") and prefill.entry(n).dtype == DTYPE_INT8]
    absent = [n for n in weights if n not in decode]
    if absent:
        problems.append(f"{DECODE}: no {absent[0]} (and {len(absent) - 1} more weights of the prefill model)")
    # Q4_0 and Q8_0 weights in any mix (the chosen candidate's recipe), norms and biases float32.
    problems.extend(decode_dtype_problems(decode, DECODE))
    report.facts.update(decode_dtypes={DTYPE_NAMES[code]: sum(e.dtype == code for e in decode.entries)
                                       for code in sorted({e.dtype for e in decode.entries})})
    for n in weights:
        if n in decode and decode.entry(n).numel != prefill.entry(n).numel:
            problems.append(f"{DECODE}: {n} holds {decode.entry(n).numel} values, the prefill model's "
                            f"{prefill.entry(n).numel}")
            break
    # What each C++ model allocates, name by name (the loader drops a size mismatch silently): the NPU
    # model, and the CPU decoding model (QWenForCausalLM: q/k/v biases whatever the model).
    loaded = {}
    for label, stored, expectation in ((PREFILL, prefill, lambda: prefill_loaded(runtime)),
                                       (DECODE, decode, lambda: decode_loaded(runtime, decode))):
        try:
            wanted = expectation()
        except PipelineError as exc:
            problems.append(f"{RUNTIME}: {exc}")
            wanted = {}
        loaded[label] = len(wanted)
        found = loaded_problems(stored, wanted)
        absent = [problem.name for problem in found if problem.what == "missing"]
        if absent:
            problems.append(f"{label}: no {absent[0]} (and {len(absent) - 1} more), which the C++ model loads")
        problems.extend(f"{label}: {problem.name}: {problem.what}" for problem in found if problem.what != "missing")
    report.facts.update(prefill_loaded=loaded[PREFILL], decode_loaded=loaded[DECODE])
    recorded = runtime.get("bundle", {}).get("files", {})
    named = runtime.get("bundle", {}).get("decoding_dtype")
    mix = dtype_mix({e.name: e.dtype_name for e in decode.entries})
    report.facts.update(decode_dtype_mix=mix)
    if named is not None and named != mix:
        problems.append(f"{DECODE}: holds {mix} weights, runtime.json's bundle.decoding_dtype says {named}")
    for file, info in recorded.items():
        actual = (directory / file).stat().st_size
        if actual != info.get("bytes"):
            problems.append(f"{file}: {actual} bytes, runtime.json records {info.get('bytes')}")
    return report


def format_bundle_report(report: BundleReport) -> str:
    lines = [f"bundle {report.directory}"]
    for key, value in report.facts.items():
        lines.append(f"  {key}: {value}")
    lines.append("OK" if not report.problems else f"{len(report.problems)} problem(s):")
    lines += [f"  - {p}" for p in report.problems]
    return "\n".join(lines)


def exported_variant(runtime_json, variants) -> int:
    """Index into `variants` of the transform the prefill model was exported from (runtime.json; None when
    `variants` has only the one)."""
    variants = list(variants)
    if runtime_json is None:
        if len(variants) != 1:
            raise PipelineError(f"the export may come from any of {', '.join(variants)}; its runtime.json says which")
        return 0
    runtime = json.loads(Path(runtime_json).read_text(encoding="utf-8"))
    transform = runtime.get("transform", "none")
    variants = list(variants)
    if transform not in variants:
        raise PipelineError(f"{runtime_json}: exported from transform {transform!r}, which is not among the swept "
                            f"variants ({', '.join(variants)}); re-run the export")
    return variants.index(transform)
