"""The phone bundle: every file mllm's NPU demo loads beside the int8 prefill model, and its checks.

results/<name>/bundle/ holds
- prefill-int8.mllm  the QNN prefill model (a copy of the export's model.mllm)
- decode-q4_0.mllm   the CPU decoding model (decode_model.py), from the same transformed weights
- vocab.mllm, merges.txt  the tokenizer in mllm's format (mllm_tokenizer.py)
- runtime.json       the export's runtime.json plus a `bundle` section (files, tokenizer, demo)
- README.txt         what to build in mllm and the demo command
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
from shadowquant.errors import PipelineError
from shadowquant.mllm import DTYPE_INT8, DTYPE_Q4_0, DTYPE_NAMES, read_mllm
from shadowquant.mllm_tokenizer import (
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

log = logging.getLogger(__name__)

PREFILL = "prefill-int8.mllm"
DECODE = "decode-q4_0.mllm"
VOCAB = "vocab.mllm"
MERGES = "merges.txt"
RUNTIME = "runtime.json"
README = "README.txt"
BUNDLE_FILES = (PREFILL, DECODE, VOCAB, MERGES, RUNTIME, README)

# Qwen2's pre-tokenizer (its tokenizer.json), which mllm's QWenTokenizer hard-codes (tokenizers/Unicode.hpp).
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")
# mllm's C++ tokenizer classes by the pre-tokenization they hard-code, and the demo each belongs to.
MLLM_TOKENIZERS = {
    "QWenTokenizer": ((QWEN2_PATTERN,), "models/qwen/tokenization_qwen.hpp"),
    "SmolLMTokenizer": ((r"\p{N}", GPT2_PATTERN), "models/smollm/tokenization_smollm.hpp"),
}
DEMOS = {
    "qwen-npu": ("demo_qwen_npu", "examples/demo_qwen_npu.cpp"),
    "qwen-npu-rotated": ("demo_qwen_npu", "examples/demo_qwen_npu.cpp"),
    "phonelm-npu": ("demo_phonelm_npu", "examples/demo_phonelm_npu.cpp"),
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
    from shadowquant.corpus import count_records, select_records, selection_indices

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
    merge (the files are exact when all texts agree; anything else fails the rule), as mllm's reader
    reads them, and as mllm v1's tokenizer then tokenizes (greedy longest match; reported, since no
    file can change it)."""
    from shadowquant.models import load_tokenizer

    spec = TokenizerSpec.from_dict(json.loads(Path(spec_json).read_text(encoding="utf-8"))["spec"])
    texts = heldout_texts(corpus, num_texts, seed, offset)
    expected = reference_ids(load_tokenizer(model_dir), texts)
    exact = round_trip(FileTokenizer(vocab, merges, spec, as_mllm=False), texts, expected)
    as_mllm = round_trip(FileTokenizer(vocab, merges, spec, as_mllm=True), texts, expected)
    runtime = round_trip(MllmV1Tokenizer(vocab, merges, spec), texts, expected)
    result = {"texts": len(texts), "all_merges": exact, "as_mllm_reads": as_mllm, "mllm_v1_tokenizer": runtime,
              "merges_mllm_skips": merges_mllm_skips(read_merges(merges, as_mllm=False))}
    write_json(out_json, result)
    log.info("tokenizer files vs Hugging Face on %d held-out texts: %d identical (all merges), %d identical as "
             "mllm reads the merges, %d identical as mllm v1's tokenizer runs", len(texts), exact["identical"],
             as_mllm["identical"], runtime["identical"])
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


def _demo_command(runtime: dict, config_name: str, chunk: int) -> str:
    program, _ = DEMOS.get(runtime["runtime"], ("demo_qwen_npu", "examples/demo_qwen_npu.cpp"))
    return (f"./{program} --vocab {VOCAB} --merge {MERGES} --qnn-model {PREFILL} --decoding-model {DECODE} "
            f"--billion {config_name} --limits {max(chunk * 2, 400)}")


def readme_text(name: str, runtime: dict, tokenizer: dict, sizes: dict, decode_eval: dict | None,
                check: dict | None = None) -> str:
    cfg = runtime.get("cpp_config", {})
    config_name = f"{name}-shadowquant"
    program, demo_source = DEMOS.get(runtime["runtime"], ("demo_qwen_npu", "examples/demo_qwen_npu.cpp"))
    lines = [
        f"shadowquant phone bundle for {name} (runtime profile {runtime['runtime']})",
        "",
        "Files",
    ]
    for file, size in sizes.items():
        lines.append(f"  {file:<20} {size / 1e6:10.2f} MB")
    lines += [
        "",
        "1. In mllm (branch v1), add a configuration with these values; the shadow layer set must be",
        f"   exactly the one below ({runtime.get('shadow_layers_go_to', 'the C++ model config')}):",
        f"   name {config_name}",
    ]
    for key, value in cfg.items():
        lines.append(f"   {key} = {json.dumps(value)}")
    cls = tokenizer.get("mllm_class")
    lines += [
        "",
        f"2. Tokenizer: {tokenizer.get('mllm_class_note')}.",
        f"   {len(tokenizer.get('merges_mllm_skips', []))} merges start with '#' and are skipped by mllm's merges "
        "reader; see ../bundle_check.json for how often that changes the ids.",
    ]
    if check:
        v1 = check["mllm_v1_tokenizer"]
        lines.append(f"   mllm v1's tokenizer matches words greedily instead of applying the merges: on {v1['records']} "
                     f"held-out paragraphs it gives the model's ids for {v1['identical']} "
                     f"({v1['tokens_from_files']} tokens where the model's tokenizer gives {v1['tokens']}).")
    if cls is None:
        lines.append("   Until such a class exists the demo's tokenizer gives other ids than the model was trained on.")
    chunk = int(runtime.get("chunk_size") or 128)
    lines += ["", f"3. Edit {demo_source} in mllm before building {program} with the QNN backend:"]
    if program == "demo_qwen_npu":
        tokenizer_line = (f"   - use {cls} ({MLLM_TOKENIZERS[cls][1]}) instead of QWenTokenizer" if cls not in (None,
                          "QWenTokenizer") else "   - keep QWenTokenizer" if cls else
                          "   - the tokenizer class: see 2.")
        lines += [
            f"   - QWenNPUConfig is built with the literal \"1.5b-rotated\": pass model_billion (so --billion "
            f"{config_name} selects the config of step 1)",
            f"   - the chunk is the literal 256 in QWenForCausalLM_NPU(config, 256) and tokenizeWithPadding(..., 256, "
            f"...): {chunk} is what was measured (at most {runtime.get('max_chunk_size')})",
            tokenizer_line,
        ]
    else:
        lines.append(f"   - build the model with the config of step 1 and prefill in chunks of {chunk} tokens")
    lines += [
        "",
        "4. Push this folder to the phone and run:",
        "",
        f"   {_demo_command(runtime, config_name, chunk)}",
        "",
    ]
    if decode_eval:
        lines += [
            "Quality on held-out text (95 % bootstrap intervals, paired with float):",
            f"  decoding model (Q4_0): perplexity {decode_eval['perplexity']:.3f} "
            f"({decode_eval['perplexity_increase']:+.1%} [{decode_eval['perplexity_increase_ci_low']:+.1%}, "
            f"{decode_eval['perplexity_increase_ci_high']:+.1%}] over float), top-1 agreement "
            f"{decode_eval['agreement']:.3f}",
            "",
        ]
    return "\n".join(lines)


def assemble_bundle(name: str, prefill, decode, vocab, merges, tokenizer_json, runtime_json, tokenizer_check,
                    decode_eval, float_json, out_prefill, out_runtime, out_readme, out_report) -> dict:
    """Copy the prefill model in, write the bundle's runtime.json and README.txt, inspect the whole
    bundle and write the report (sizes, tokenizer check, decoding model quality)."""
    from shadowquant.sweep import read_point_json

    runtime = json.loads(Path(runtime_json).read_text(encoding="utf-8"))
    if runtime.get("runtime") in (None, "ideal"):
        raise PipelineError(f"{runtime_json}: runtime profile 'ideal' has no phone model; set runtime.profile to an "
                            "NPU profile (qwen-npu, qwen-npu-rotated, phonelm-npu) to build a bundle")
    tokenizer = json.loads(Path(tokenizer_json).read_text(encoding="utf-8"))
    check = json.loads(Path(tokenizer_check).read_text(encoding="utf-8"))
    decode_metrics = {k: v for k, v in read_point_json(decode_eval).items() if k != "per_record"}
    float_metrics = {k: v for k, v in read_point_json(float_json).items() if k != "per_record"}
    copy_into_bundle(prefill, out_prefill)
    bundle_dir = Path(out_prefill).parent
    files = {PREFILL: out_prefill, DECODE: decode, VOCAB: vocab, MERGES: merges}
    for file, path in files.items():
        if Path(path).parent.resolve() != bundle_dir.resolve():
            raise PipelineError(f"{path}: bundle file {file} must be written into {bundle_dir}")
    sizes = {file: Path(path).stat().st_size for file, path in files.items()}
    config_name = f"{name}-shadowquant"
    runtime["bundle"] = {
        "files": {file: {"bytes": sizes[file], "sha256": sha256(path)} for file, path in files.items()},
        "prefill_model": PREFILL, "decoding_model": DECODE, "decoding_dtype": "q4_0",
        "vocab": VOCAB, "merges": MERGES, "config_name": config_name,
        "tokenizer": {"mllm_class": tokenizer["mllm_class"], "note": tokenizer["mllm_class_note"],
                      "spec": tokenizer["spec"], "merges_mllm_skips": len(tokenizer["merges_mllm_skips"])},
        "demo_command": _demo_command(runtime, config_name, int(runtime.get("chunk_size") or 128)),
    }
    write_json(out_runtime, runtime)
    sizes[RUNTIME] = Path(out_runtime).stat().st_size
    text = readme_text(name, runtime, tokenizer, sizes, decode_metrics, check)
    write_text(out_readme, text)
    sizes[README] = Path(out_readme).stat().st_size
    report = inspect_bundle(bundle_dir)
    result = {"bundle": str(bundle_dir), "sizes": sizes, "total_bytes": sum(sizes.values()),
              "tokenizer_check": check, "decoding_model": decode_metrics, "float": float_metrics,
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
    tensor for every weight of the prefill model (same names)."""
    from shadowquant.runtime import get_profile, loaded_tensors

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
    not_q4 = [n for n in weights if n in decode and decode.entry(n).dtype != DTYPE_Q4_0]
    if not_q4:
        problems.append(f"{DECODE}: {not_q4[0]} is {DTYPE_NAMES[decode.entry(not_q4[0]).dtype]}, expected q4_0")
    for n in weights:
        if n in decode and decode.entry(n).numel != prefill.entry(n).numel:
            problems.append(f"{DECODE}: {n} holds {decode.entry(n).numel} values, the prefill model's "
                            f"{prefill.entry(n).numel}")
            break
    # What the profile's C++ model allocates, name by name (the loader drops a size mismatch silently).
    try:
        expected = loaded_tensors(get_profile(runtime["runtime"]), cfg, shadow)
    except PipelineError as exc:
        problems.append(f"{RUNTIME}: {exc}")
        expected = {}
    for name, (code, size) in expected.items():
        if name not in prefill:
            problems.append(f"{PREFILL}: no {name}, which the C++ model loads")
        elif prefill.entry(name).size != size or prefill.entry(name).dtype != code:
            entry = prefill.entry(name)
            problems.append(f"{PREFILL}: {name} is {entry.size} bytes of {entry.dtype_name}, the C++ model allocates "
                            f"{size} bytes of {DTYPE_NAMES[code]}")
    recorded = runtime.get("bundle", {}).get("files", {})
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
    """Index into `variants` of the transform the prefill model was exported from (runtime.json)."""
    runtime = json.loads(Path(runtime_json).read_text(encoding="utf-8"))
    transform = runtime.get("transform", "none")
    variants = list(variants)
    if transform not in variants:
        raise PipelineError(f"{runtime_json}: exported from transform {transform!r}, which is not among the swept "
                            f"variants ({', '.join(variants)}); re-run the export")
    return variants.index(transform)


def write_decode_model_of(manifests, runtime_json, variants, out) -> dict:
    """The Q4_0 decoding model of the variant the prefill model was exported from."""
    from shadowquant.decode_model import write_decode_model
    from shadowquant.models import load_model_from_manifest

    manifest = manifests[exported_variant(runtime_json, variants)]
    model, _, _ = load_model_from_manifest(manifest, "cpu", "float32")
    summary = write_decode_model(model.state_dict(), out)
    log.info("decoding model from %s: %d tensors, %.1f MB Q4_0, %.2f MB float32", manifest, summary["tensors"],
             summary["q4_0_bytes"] / 1e6, summary["float32_bytes"] / 1e6)
    return summary
