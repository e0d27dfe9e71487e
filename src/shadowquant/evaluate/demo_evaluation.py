"""What the user of the phone bundle gets: each held-out record run as mllm's NPU demo runs a generation.

mllm's NPU demo (examples/demo_qwen_npu.cpp, the bundle's cpp/shadowquant_demo.cpp) prefills the prompt
with the int8 NPU model in chunks of runtime.json's `chunk_size`, hands its KV cache (K after RoPE and V,
float16) to the CPU decoding model and produces every further token with that model. Here a record of L
tokens is split the same way:

- prefill: its first p = floor(L * prefill_fraction) tokens (at least 1, at most L - 1; half by default),
  in chunks of `chunk_size`, through the NPU simulation of the int8 export (apply_runtime_from_export,
  as final_evaluation builds it). The prediction of token p comes from the prefill model's last
  position, as in the demo (the demo samples the first new token from the prefill's logits).
- handover: the prefill model's cache of positions 0..p-1, rounded to float16 (the NPU and the CPU
  caches both hold float16; `handover` "float32" keeps it unrounded, for checks).
- decode: the decoding model (the float model of its manifest with the decoding file's weights,
  decoding.candidates.load_decode_weights) under mllm_cpu_numerics with the file's per-tensor formats (Q8_0
  activations of Q4_0 / Q8_0 weights, float16 K/V), continuing from the handed-over cache over tokens
  p..L-2, predicting tokens p+1..L-1. Teacher-forced: one forward over those tokens with the cache,
  which equals feeding them one at a time up to float rounding (every Linear, norm and activation acts
  per position; the attention of each query sees the same keys).

Scored: tokens p..L-1 of each record (L - p per record), for four models on the same tokens:
- float: the float model of the prefill's manifest on the whole record (the reference of KL and
  agreement, and the pair of every perplexity increase);
- demo: prefill (token p) + decode (tokens p+1..L-1), as above;
- prefill_only: the NPU simulation over the whole record (it continues from its own cache in chunks
  after position p; as one pass over the record up to float rounding: the simulation is causal and
  acts per position);
- decode_only: the decoding model, under the same numerics, on the whole record in one forward.

The two single models were evaluated on these records already, over whole records, by the sweep (the
exported point: evaluation.json's `w8a8_per_record`, the point's JSON) and by the decoding candidate's
evaluation (decode_choice.json's `per_record`); metrics.evaluate keeps every record's sums over the
same continuation tokens, so the stage reads them there (`prefill_json`, `decode_choice`) instead of
running both models once more (two thirds of the work). Those came from batched forwards and equal what
this module would compute up to float rounding (a test compares the two); without the files the stage
computes them itself.

Each is summarized as metrics.summarize does (perplexity, KL to float, top-1 agreement with float,
last-token accuracy, 95 % percentile bootstrap intervals over records, the perplexity increase paired
with float), and demo is compared with prefill_only and decode_only by paired differences (the same
resampled records for both sides).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import torch

from shadowquant.atomic import write_json, write_text
from shadowquant.errors import PipelineError
from shadowquant.evaluate.metrics import (PREFILL_FRACTION, EvalResult, continuation_from_per_record, exact_kl,
                                          interval_text, per_record, prefill_length, record_sums, result_of_sums,
                                          summarize)

log = logging.getLogger(__name__)

MODELS = ("float", "demo", "prefill_only", "decode_only")
LABELS = {"float": "float", "demo": "demo (NPU prefill + CPU decode)", "prefill_only": "NPU prefill model only",
          "decode_only": "CPU decoding model only"}
HANDOVER_DTYPES = {"float16": torch.float16, "float32": torch.float32}
DECODE_CHOICE_KEY = "manifest"
# evaluation.json's per-record sums of the exported point (the sweep's evaluation of the prefill model).
PREFILL_KEY = "w8a8_per_record"


# ---------------------------------------------------------------- the split and one record


def _cache_layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(key, value) per layer of a transformers cache (5.x `layers`, or the older key_cache / value_cache)."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))


def hand_over(cache, dtype: torch.dtype = torch.float16, to_dtype: torch.dtype = torch.float32):
    """A new DynamicCache holding `cache`'s keys (after RoPE) and values rounded to `dtype`, as the
    receiving model's `to_dtype`: the KV cache the decoding model continues from."""
    from transformers import DynamicCache

    out = DynamicCache()
    for index, (key, value) in enumerate(_cache_layers(cache)):
        out.update(key.to(dtype).to(to_dtype), value.to(dtype).to(to_dtype), index)
    return out


def _with_cache(model, cache) -> dict:
    """The keyword arguments that continue `cache`: transformers 5.x names it `cache` (`past_key_values`
    is deprecated there), earlier versions `past_key_values`."""
    import inspect

    forward = inspect.signature(model.forward).parameters
    return {"cache" if "cache" in forward else "past_key_values": cache, "use_cache": True}


def _last_logit_only(model) -> dict:
    """The keyword argument that has the model compute the logits of the last position only (the prompt's other
    positions predict nothing the demo uses): `logits_to_keep` where the forward takes it."""
    import inspect

    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


@torch.inference_mode()
def run_chunks(model, ids: torch.Tensor, chunk_size: int, cache=None, last_only: bool = False):
    """`model` over the token ids [B, n] in chunks of `chunk_size`, continuing `cache` (a new one when None):
    (logits [B, n, V] float32, or with `last_only` [B, 1, V] of the last position, the cache)."""
    from transformers import DynamicCache

    if chunk_size < 1:
        raise PipelineError(f"chunk size {chunk_size!r} must be a positive number of tokens")
    cache = DynamicCache() if cache is None else cache
    keep = _last_logit_only(model) if last_only else {}
    logits = []
    for start in range(0, ids.shape[1], chunk_size):
        out = model(input_ids=ids[:, start:start + chunk_size], **_with_cache(model, cache), **keep)
        cache = out.past_key_values if getattr(out, "cache", None) is None else out.cache
        logits.append(out.logits[:, -1:].float() if last_only else out.logits.float())
    return (logits[-1] if last_only else torch.cat(logits, dim=1)), cache


@torch.inference_mode()
def demo_batch_logits(prefill_model, decode_model, batch: list[list[int]], chunk_size: int,
                      fraction: float = PREFILL_FRACTION, handover: str = "float16", decode_numerics=None,
                      prefill_only: bool = True) -> dict:
    """Records of one length L as the demo runs each: "demo" logits [B, L - p, V] of the positions p-1..L-2
    (predicting tokens p..L-1), with `prefill_only` also the prefill model's own continuation ("prefill_only",
    same positions), and "prefill_length" p. One length, so the batch needs no padding and every row is what
    the record alone gives, up to float rounding. `decode_numerics`: a context manager factory run around the
    decoding model's forward (mllm_cpu_numerics), or None for plain float."""
    import contextlib

    if handover not in HANDOVER_DTYPES:
        raise PipelineError(f"unknown handover dtype {handover!r}; valid: {', '.join(HANDOVER_DTYPES)}")
    length = len(batch[0])
    if any(len(ids) != length for ids in batch):
        raise PipelineError(f"a demo batch needs records of one length, got {sorted({len(ids) for ids in batch})}")
    p = prefill_length(length, fraction)
    device = next(prefill_model.parameters()).device
    tokens = torch.tensor(batch, dtype=torch.long, device=device)
    # the prefill's last position predicts token p, as in the demo; its other positions feed only the cache
    first, cache = run_chunks(prefill_model, tokens[:, :p], chunk_size, last_only=True)
    decode_dtype = next(decode_model.parameters()).dtype
    handed = hand_over(cache, HANDOVER_DTYPES[handover], decode_dtype)
    handed_device = next(decode_model.parameters()).device
    if handed_device != device:
        for layer in handed.layers:
            layer.keys, layer.values = layer.keys.to(handed_device), layer.values.to(handed_device)
    parts = [first]
    if length - 1 > p:
        with decode_numerics() if decode_numerics is not None else contextlib.nullcontext():
            out = decode_model(input_ids=tokens[:, p:-1].to(handed_device), **_with_cache(decode_model, handed))
        parts.append(out.logits.float().to(first.device))
    out = {"demo": torch.cat(parts, dim=1), "prefill_length": p}
    if prefill_only:  # the NPU simulation continues over the rest of the record from its own cache
        rest = [run_chunks(prefill_model, tokens[:, p:-1], chunk_size, cache)[0]] if length - 1 > p else []
        out["prefill_only"] = torch.cat([first, *rest], dim=1)
    return out


def demo_logits(prefill_model, decode_model, ids: list[int], chunk_size: int, fraction: float = PREFILL_FRACTION,
                handover: str = "float16", decode_numerics=None, prefill_only: bool = True) -> dict:
    """One record as the demo runs it: demo_batch_logits of a batch of one, its logits [L - p, V]."""
    out = demo_batch_logits(prefill_model, decode_model, [ids], chunk_size, fraction, handover, decode_numerics,
                            prefill_only)
    return {key: value[0] if isinstance(value, torch.Tensor) else value for key, value in out.items()}


@torch.inference_mode()
def whole_record_logits(model, ids: list[int], first: int, numerics=None) -> torch.Tensor:
    """`model` on the whole record in one forward: logits [L - first, V] of positions first-1..L-2."""
    import contextlib

    device = next(model.parameters()).device
    tokens = torch.tensor([ids[:-1]], dtype=torch.long, device=device)
    with numerics() if numerics is not None else contextlib.nullcontext():
        logits = model(input_ids=tokens, use_cache=False).logits[0]
    return logits[first - 1:].float()


def record_scores(logits: torch.Tensor, targets: torch.Tensor, float_logits: torch.Tensor | None) -> dict:
    """Per-record sums (metrics.EvalResult's fields) of logits [n, V] predicting `targets` [n]."""
    targets = targets.to(logits.device)
    nll = torch.logsumexp(logits, dim=-1) - logits.gather(-1, targets[:, None]).squeeze(-1)
    kl = agree = None
    if float_logits is not None:
        float_logits = float_logits.to(logits.device)
        kl, agree = exact_kl(float_logits, logits), logits.argmax(-1) == float_logits.argmax(-1)
    return record_sums(bool(logits[-1].argmax() == targets[-1]), nll, kl, agree)


def score_records(float_model, prefill_model, decode_model, sequences: list[list[int]], chunk_size: int,
                  fraction: float = PREFILL_FRACTION, handover: str = "float16", decode_numerics=None,
                  float_logits_of=None, progress: bool = True, singles=("prefill_only", "decode_only"),
                  batch_size: int = 8) -> dict[str, EvalResult]:
    """EvalResults of float, demo and the `singles` (prefill_only, decode_only; the demo evaluation takes them
    from the sweep's and the decoding candidate's own evaluations instead) on the continuation tokens of every
    record (module docstring), records of one length in batches. The float logits of record i, positions p-1..L-2, come
    from `float_logits_of(i, p)` when given (the saved float baseline), else from `float_model` on the whole
    record, else (both None, for tests) from the prefill model itself. `batch_size`: records of one length run
    together, up to that many."""
    from tqdm import tqdm

    if not sequences:
        raise PipelineError("no records to evaluate (empty evaluation set)")
    for index, seq in enumerate(sequences):
        if len(seq) < 2:
            raise PipelineError(f"record {index} has {len(seq)} token(s); the demo evaluation needs at least 2 "
                                "(a prefill token and a token to predict)")
    unknown = set(singles) - set(MODELS[2:])
    if unknown:
        raise PipelineError(f"unknown single model(s) {', '.join(sorted(unknown))}; valid: {', '.join(MODELS[2:])}")
    if batch_size < 1:
        raise PipelineError(f"batch size {batch_size!r} must be a positive number of records")
    names = ("float", "demo", *[name for name in MODELS[2:] if name in singles])
    rows: dict[str, list[dict | None]] = {name: [None] * len(sequences) for name in names}
    needs_prefill_only = "prefill_only" in singles or (float_logits_of is None and float_model is None)
    # Records of one length share a batch (no padding); most records are cut at seq_len, so batches fill.
    by_length: dict[int, list[int]] = {}
    for index, ids in enumerate(sequences):
        by_length.setdefault(len(ids), []).append(index)
    batches = [group[i:i + batch_size] for _, group in sorted(by_length.items(), reverse=True)
               for i in range(0, len(group), batch_size)]
    with tqdm(total=len(sequences), desc="demo", unit="record", disable=not progress) as bar:
        for batch in batches:
            out = demo_batch_logits(prefill_model, decode_model, [sequences[i] for i in batch], chunk_size, fraction,
                                    handover, decode_numerics, prefill_only=needs_prefill_only)
            p = out["prefill_length"]
            for row, index in enumerate(batch):
                ids = sequences[index]
                targets = torch.tensor(ids[p:], dtype=torch.long)
                if float_logits_of is not None:
                    float_logits = float_logits_of(index, p)
                elif float_model is not None:
                    float_logits = whole_record_logits(float_model, ids, p)
                else:
                    float_logits = out["prefill_only"][row]
                rows["float"][index] = record_scores(float_logits, targets, None)
                logits = {"demo": out["demo"][row],
                          "prefill_only": out["prefill_only"][row] if needs_prefill_only else None}
                if "decode_only" in singles:
                    logits["decode_only"] = whole_record_logits(decode_model, ids, p, decode_numerics)
                for name in names[1:]:
                    rows[name][index] = record_scores(logits[name], targets, float_logits)
            bar.update(len(batch))
    return {name: result_of_sums(rows[name]) for name in names}


def baseline_logits(baseline, sequences: list[list[int]], float_head, softcap: float | None = None):
    """`float_logits_of(i, p)` for score_records from a saved float baseline (metrics.save_baseline) of exactly
    these records: the float logits of record i's positions p-1..L-2, recomputed from its lm_head inputs with
    the float lm_head `float_head` (and the model's logit cap `softcap`, metrics.final_logit_softcap)."""
    from shadowquant.evaluate.metrics import check_baseline_matches, head_logits, load_baseline, tokens_sha256

    baseline = load_baseline(baseline) if isinstance(baseline, (str, Path)) else baseline
    check_baseline_matches(baseline, sequences, tokens_sha256(sequences))
    offsets = baseline.offsets()

    def logits_of(index: int, p: int) -> torch.Tensor:
        start = offsets[index]
        hidden = baseline.hidden[start + p - 1:start + len(sequences[index]) - 1]
        return head_logits(float_head, hidden, softcap).float()

    return logits_of


# ---------------------------------------------------------------- summaries


def paired_differences(a: EvalResult, b: EvalResult, num_resamples: int = 1000, seed: int = 0,
                       level: float = 0.95) -> dict:
    """a minus b on the same records: KL and agreement differences and the perplexity ratio a / b - 1, each
    with a paired percentile bootstrap interval (one draw of records for both; None without resamples)."""
    if list(a.num_tokens) != list(b.num_tokens):
        raise PipelineError("paired differences need the same records and tokens on both sides")
    arrays = {side: {key: np.asarray(getattr(r, key), dtype=np.float64)
                     for key in ("nll_sum", "num_tokens", "kl_sum", "agreement_count")}
              for side, r in (("a", a), ("b", b))}
    tokens = arrays["a"]["num_tokens"]

    def stats(index) -> dict[str, np.ndarray]:
        total = tokens[index].sum(axis=-1)
        out = {"perplexity_ratio": np.expm1((arrays["a"]["nll_sum"][index].sum(axis=-1)
                                             - arrays["b"]["nll_sum"][index].sum(axis=-1)) / total)}
        for key, name in (("kl_sum", "kl"), ("agreement_count", "agreement")):
            out[name] = (arrays["a"][key][index].sum(axis=-1) - arrays["b"][key][index].sum(axis=-1)) / total
        return out

    n = len(tokens)
    point = {key: float(value) for key, value in stats(np.arange(n)).items()}
    result = {key: {"value": value, "ci_low": None, "ci_high": None} for key, value in point.items()}
    if num_resamples:
        draws = np.random.default_rng(seed).integers(0, n, size=(num_resamples, n))
        tail = (1.0 - level) / 2.0
        for key, values in stats(draws).items():
            low, high = np.quantile(values, [tail, 1.0 - tail])
            result[key].update(ci_low=float(low), ci_high=float(high))
    return result


def summarize_all(results: dict[str, EvalResult], num_resamples: int = 1000) -> dict:
    """Every model's summary (paired with float) and per-record data, and demo's paired differences."""
    def clean(value):
        return None if isinstance(value, float) and not math.isfinite(value) else value

    out = {}
    for name in MODELS:
        summary = summarize(results[name], None if name == "float" else results["float"],
                            num_resamples=num_resamples)
        if name == "float":
            summary.update(kl=0.0, agreement=1.0, perplexity_increase=0.0)
        out[name] = {**{k: clean(v) for k, v in summary.items()}, "per_record": per_record(results[name])}
    out["differences"] = {f"demo_vs_{other}": paired_differences(results["demo"], results[other], num_resamples)
                          for other in ("prefill_only", "decode_only")}
    return out


def _difference(entry: dict, key: str) -> str:
    value, low, high = entry["value"], entry["ci_low"], entry["ci_high"]
    if key == "perplexity_ratio":
        return f"{value:+.2%}" + (f" [{low:+.2%}, {high:+.2%}]" if low is not None else "")
    return f"{value:+.4f}" + (f" [{low:+.4f}, {high:+.4f}]" if low is not None else "")


ROWS = (("perplexity", "perplexity"), ("perplexity_increase", "perplexity increase over float"),
        ("kl", "KL(float || model) per token"), ("agreement", "top-1 agreement with float"),
        ("accuracy", "last-token accuracy"))


def model_cells(result: dict) -> tuple[list[str], list[list[str]]]:
    """The header and the rows of the table of the four models (columns) and the metrics (rows) of a demo
    evaluation's result, each value with its interval."""
    return (["metric", *(LABELS[m] for m in MODELS)],
            [[label, *(interval_text(result[m], key) for m in MODELS)] for key, label in ROWS])


def model_table(result: dict) -> list[str]:
    """model_cells as markdown lines."""
    header, rows = model_cells(result)
    return ["| " + " | ".join(header) + " |", "| --- |" + " --- |" * (len(header) - 1),
            *("| " + " | ".join(row) + " |" for row in rows)]


def markdown_summary(result: dict) -> str:
    setup = result["setup"]
    f = result["float"]
    lines = [
        f"# What the user gets: {result['model']} as mllm's NPU demo runs it",
        "",
        f"Each of {f['num_samples']} held-out records is split as the demo splits a generation: its first "
        f"{setup['prefill_fraction']:g} of the tokens ({setup['prefill_tokens']} in all) are prefilled by the "
        f"simulated int8 NPU model ({setup['runtime']}, point {setup['point']}, transform {setup['transform']}) in "
        f"chunks of {setup['chunk_size']}, its KV cache (K after RoPE, V) is handed over in {setup['handover']}, "
        f"and the rest is produced by the CPU decoding model `{setup['decode_model']}` (weights of "
        f"`{setup['decode_manifest']}`, under mllm's CPU numerics: {setup['decode_formats']}, float16 K/V), "
        "teacher-forced over the continuation. The first token after the prefill is predicted by the prefill "
        "model's last position, as in the demo.",
        "",
        f"Scored: the {f['num_tokens']} continuation tokens only, the same tokens for every column; brackets are "
        "95 % bootstrap intervals over records (increase, KL and agreement paired with float on the same "
        "records). prefill-only is the NPU simulation over the whole record, decode-only the decoding model "
        f"over the whole record (their sums: prefill-only from {setup['prefill_only_from']}, decode-only from "
        f"{setup['decode_only_from']}).",
        "",
        *model_table(result),
    ]
    lines += ["", "Demo minus each single model, paired on the same records (95 % bootstrap intervals):", "",
              "| difference | perplexity ratio - 1 | KL | agreement |", "| --- | --- | --- | --- |"]
    for name, entry in result["differences"].items():
        other = LABELS[name.removeprefix("demo_vs_")]
        lines.append(f"| demo vs {other} | " + " | ".join(
            _difference(entry[key], key) for key in ("perplexity_ratio", "kl", "agreement")) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the stage


def read_decode_choice(decode_choice) -> dict:
    """decode_choice.json (the bundle's decoding-model choice) as a mapping; a missing or unreadable file is refused."""
    path = Path(decode_choice)
    if not path.is_file():
        raise PipelineError(f"{path}: no decoding-model choice; build it first (the bundle's decoding-model choice "
                            "writes it) or evaluate against the exported variant's manifest")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PipelineError(f"{path}: not readable JSON ({exc}); delete it and re-run the decoding-model choice") from None
    return data if isinstance(data, dict) else {}


def manifest_of_choice(data: dict, path, default) -> str:
    """The manifest a read decode_choice.json (`data`, from `path`) names for the decoding model; a choice made for
    another prefill model (its `prefill_manifest`, where it names one, is not `default`) is refused."""
    manifest = data.get(DECODE_CHOICE_KEY)
    if not isinstance(manifest, str) or not manifest:
        raise PipelineError(f"{path}: has no '{DECODE_CHOICE_KEY}' (the manifest of the decoding model's weights); "
                            "re-run the decoding-model choice")
    if not Path(manifest).is_file():
        raise PipelineError(f"{path}: its manifest {manifest} does not exist; re-run the decoding-model choice")
    prefill = data.get("prefill_manifest")
    if prefill and Path(prefill).resolve() != Path(default).resolve():
        raise PipelineError(f"{path}: the decoding model was chosen for the prefill model of {prefill}, but the "
                            f"export is of {default}; re-run the decoding-model choice")
    return manifest


def decode_manifest_of(decode_choice, default) -> str:
    """The manifest the decoding model's architecture and unstored tensors come from: decode_choice.json's
    `manifest`, or `default` (the exported variant's) when no choice file is used."""
    if decode_choice is None:
        return str(default)
    return manifest_of_choice(read_decode_choice(decode_choice), decode_choice, default)


def chunk_size_of(runtime_json) -> int:
    """The NPU prefill's chunk size, runtime.json's `chunk_size`."""
    path = Path(runtime_json)
    if not path.is_file():
        raise PipelineError(f"{path}: runtime.json not found; run the export first")
    runtime = json.loads(path.read_text(encoding="utf-8"))
    chunk = runtime.get("chunk_size")
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
        raise PipelineError(f"{path}: chunk_size {chunk!r} is not a positive number of tokens; re-run the export")
    return chunk


def load_decoding_model(manifest, decode_path, device: str = "auto"):
    """The decoding model: `manifest`'s float model (float32) with every weight the decoding file stores,
    and {Linear: weight format} for mllm_cpu_numerics from the file's dtypes."""
    from shadowquant.decoding.cpu_numerics import formats_from_dtypes
    from shadowquant.decoding.candidates import load_decode_weights
    from shadowquant.export.mllm import read_mllm
    from shadowquant.model.loading import load_model_from_manifest

    if not Path(decode_path).is_file():
        raise PipelineError(f"{decode_path}: decoding model file not found; build the bundle's decoding model first")
    model, _, _ = load_model_from_manifest(manifest, device, "float32")
    replaced = load_decode_weights(model, decode_path)
    formats = formats_from_dtypes(model, {e.name: e.dtype for e in read_mllm(decode_path).entries})
    log.info("decoding model: %s with %d tensors of %s", manifest, len(replaced), decode_path)
    return model, formats


def single_model_results(prefill_json, decode_choice, choice: dict | None, fraction: float,
                         records: int | None) -> dict[str, EvalResult]:
    """The continuation sums of the single models evaluated elsewhere on the same records (module docstring):
    prefill_only from `prefill_json` (evaluation.json's `w8a8_per_record`), decode_only from decode_choice.json
    (`choice`, read from `decode_choice`; its `per_record`); each only where its file is given. `records`: the
    first that many."""
    from shadowquant.jsonfile import read_json_object

    sources = []
    if prefill_json is not None:
        sources.append(("prefill_only", prefill_json, PREFILL_KEY,
                        read_json_object(prefill_json, f"the {LABELS['prefill_only']}'s evaluation",
                                         "re-run the step that wrote it")))
    if choice is not None:
        sources.append(("decode_only", decode_choice, "per_record", choice))
    found = {}
    for name, path, key, data in sources:
        if key not in data:
            raise PipelineError(f"{path}: has no '{key}' (per-record sums of the {LABELS[name]}); delete it and re-run "
                                "the step that wrote it")
        result = continuation_from_per_record(data[key], f"{path} ({key})", fraction)
        if records is not None:
            result = EvalResult(**{k: v[:records] for k, v in vars(result).items() if isinstance(v, list)})
        found[name] = result
    return found


def evaluate_demo(manifest, export, runtime_json, samples, decode_path, out_json, out_md, seq_len: int,
                  decode_choice=None, prefill_json=None, prefill_fraction: float = PREFILL_FRACTION,
                  handover: str = "float16", baseline=None, device: str = "auto", dtype: str = "float32",
                  num_resamples: int = 1000, name=None, records: int | None = None, batch_size: int = 8) -> dict:
    """The demo evaluation (module docstring) of the export of `manifest` (the exported variant's) with the
    decoding model `decode_path` on the manifest decode_choice.json names (None: `manifest`); `name`: the
    model's name in the summary (default: the manifest's folder). `baseline`: the float baseline of the
    manifest's float run on the same records (float-baseline.safetensors), which spares the float model's
    forward; without it the float model runs each record. `prefill_json` (evaluation.json) and
    `decode_choice` give the single models' continuation sums; where one is None that model runs here.
    `records`: only the first that many records (a quick look; the baseline is still checked against all).
    `batch_size`: records of one length run together, up to that many."""
    import copy
    from collections import Counter

    from safetensors.torch import load_file

    from shadowquant.decoding.cpu_numerics import mllm_cpu_numerics
    from shadowquant.model.families import quantized_layer_names
    from shadowquant.evaluate.final_evaluation import export_metadata
    from shadowquant.model.loading import load_model_from_manifest
    from shadowquant.runtimes import runtime_of
    from shadowquant.evaluate.sweep import evaluation_sequences

    if handover not in HANDOVER_DTYPES:
        raise PipelineError(f"unknown handover dtype {handover!r}; valid: {', '.join(HANDOVER_DTYPES)}")
    chunk_size = chunk_size_of(runtime_json)
    choice = None if decode_choice is None else read_decode_choice(decode_choice)
    decode_manifest = str(manifest) if choice is None else manifest_of_choice(choice, decode_choice, manifest)
    if not Path(export).is_file():
        raise PipelineError(f"{export}: int8 export not found; run the export first")
    meta = export_metadata(export)
    float_model, tokenizer, family = load_model_from_manifest(manifest, device, dtype)
    simulated = runtime_of(meta, family)
    simulated.require_phone(f"{export} (the demo evaluation)")
    shadow = {int(i) for i in meta.get("shadow_layers", "").split()}
    sequences = evaluation_sequences(tokenizer, samples, seq_len)
    float_logits_of = None
    if baseline is not None:
        from shadowquant.evaluate.metrics import final_logit_softcap, output_head

        float_logits_of = baseline_logits(baseline, sequences, copy.deepcopy(output_head(float_model)),
                                          final_logit_softcap(float_model))
        prefill_model, float_model = float_model, None  # the float logits come from the baseline
    else:
        prefill_model = copy.deepcopy(float_model)
    tensors = load_file(str(export), device=str(next(prefill_model.parameters()).device))
    simulated.apply_from_export(prefill_model, tensors, quantized_layer_names(prefill_model, family), meta)
    del tensors
    decode_model, formats = load_decoding_model(decode_manifest, decode_path, device)
    if records is not None:
        if records < 1:
            raise PipelineError(f"records {records!r} must be a positive number of records")
        sequences = sequences[:records]

    def numerics():
        return mllm_cpu_numerics(decode_model, formats)

    reused = single_model_results(prefill_json, decode_choice, choice, prefill_fraction, records)
    results = score_records(float_model, prefill_model, decode_model, sequences, chunk_size, prefill_fraction,
                            handover, numerics, float_logits_of, singles=[m for m in MODELS[2:] if m not in reused],
                            batch_size=batch_size)
    for key, result in reused.items():
        if list(result.num_tokens) != list(results["demo"].num_tokens):
            source = prefill_json if key == "prefill_only" else decode_choice
            raise PipelineError(f"{source}: its continuation sums are of other records than {samples} at seq_len "
                                f"{seq_len} ({len(result.num_tokens)} records, {sum(result.num_tokens)} tokens vs "
                                f"{len(sequences)}, {sum(results['demo'].num_tokens)}); re-run the step that wrote it")
    results.update(reused)
    runtime = json.loads(Path(runtime_json).read_text(encoding="utf-8"))
    result = {
        "model": name or Path(manifest).parent.name,
        "setup": {
            "runtime": simulated.name, "point": runtime.get("point"), "transform": runtime.get("transform", "none"),
            "shadow_layers": sorted(shadow), "chunk_size": chunk_size, "prefill_fraction": prefill_fraction,
            "prefill_tokens": sum(prefill_length(len(s), prefill_fraction) for s in sequences),
            "handover": handover, "first_token": "prefill model's last position", "batch_size": batch_size,
            "decode": "teacher-forced over the continuation with the handed-over cache",
            "prefill_manifest": str(manifest), "decode_manifest": str(decode_manifest),
            "decode_model": str(decode_path), "decode_choice": None if decode_choice is None else str(decode_choice),
            "decode_candidate": None if choice is None else choice.get("chosen"),
            "float_reference": "float baseline file" if baseline is not None else "float model",
            "prefill_only_from": str(prefill_json) if "prefill_only" in reused else "this evaluation",
            "decode_only_from": str(decode_choice) if "decode_only" in reused else "this evaluation",
            "decode_formats": ", ".join(f"{n} {fmt}" for fmt, n in sorted(Counter(formats.values()).items())),
        },
        **summarize_all(results, num_resamples),
    }
    write_json(out_json, result)
    write_text(out_md, markdown_summary(result))
    for key in MODELS[1:]:
        m = result[key]
        log.info("%s: perplexity %.4f (%+.2f %%), KL %.4f, agreement %.4f", key, m["perplexity"],
                 100 * (m["perplexity_increase"] or 0.0), m["kl"], m["agreement"])
    return result
