"""The threshold sweep, by simulated W8A8 inference: the float baseline, one evaluation per
(statistic, threshold), and the sweep table. Choosing a point from the table is selection.py's job."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from shadowquant.atomic import atomic_path, write_json
from shadowquant.decision import decide, load_act_scales, shadow_summary
from shadowquant.errors import PipelineError
from shadowquant.models import load_model_from_manifest

log = logging.getLogger(__name__)

SWEEP_COLUMNS = ["statistic", "threshold", "accuracy", "perplexity", "agreement", "kl", "num_shadow_inputs",
                 "num_shadow_outputs", "num_shadow_sides", "shadow_flop_fraction", "num_samples", "num_tokens"]


def _finite_or_none(value):
    return value if value is None or math.isfinite(value) else None


def evaluation_sequences(tokenizer, samples: str | Path, seq_len: int) -> list[list[int]]:
    """Tokenized evaluation texts; texts shorter than two tokens cannot be scored and are dropped."""
    from shadowquant.corpus import read_jsonl_texts
    from shadowquant.profiling import tokenize_samples

    sequences = [s for s in tokenize_samples(tokenizer, read_jsonl_texts(samples), seq_len) if len(s) >= 2]
    if not sequences:
        raise PipelineError(f"{samples}: no evaluation record has two or more tokens; use longer texts")
    return sequences


def shadow_flop_fraction(model, layer_names: list[str], decisions) -> float:
    """Device-cost proxy: the share of quantized Linear FLOPs (in x out per token) whose input is shadowed."""
    modules = dict(model.named_modules())
    total = shadow = 0
    for name in layer_names:
        flops = modules[name].in_features * modules[name].out_features
        total += flops
        if not decisions[name].clip_input:
            shadow += flops
    return shadow / total if total else 0.0


def quantize_model(model, family: str, decisions) -> list[str]:
    """Replace the family's quantized Linears by simulated W8A8 ones (lm_head stays float)."""
    from shadowquant.fakequant import apply_w8a8
    from shadowquant.families import quantized_layer_names

    names = quantized_layer_names(model, family)
    apply_w8a8(model, decisions, names)
    return names


def evaluate_float(manifest, samples, out_json, out_baseline, seq_len: int, batch_size: int = 4,
                   device: str = "auto", dtype: str = "auto", top_k: int = 32) -> dict:
    """The float model once: its metrics, and the compact baseline every threshold job compares with."""
    from shadowquant.metrics import evaluate, save_baseline, summarize

    import torch

    model, tokenizer, _ = load_model_from_manifest(manifest, device, dtype)
    sequences = evaluation_sequences(tokenizer, samples, seq_len)
    with torch.inference_mode():
        result = evaluate(model, sequences, batch_size=batch_size, collect_top_k=top_k, desc="float")
    save_baseline(out_baseline, result.baseline)
    metrics = {k: _finite_or_none(v) if isinstance(v, float) else v for k, v in summarize(result).items()}
    metrics.update(statistic="float", threshold=None)
    write_json(out_json, metrics)
    log.info("float: %s", metrics)
    return metrics


def evaluate_threshold(manifest, samples, act_scales, baseline, out_json, statistic: str, threshold: float,
                       seq_len: int, batch_size: int = 4, device: str = "auto", dtype: str = "auto") -> dict:
    """One sweep point: load the model once, apply the decision, evaluate against the float baseline."""
    import torch

    from shadowquant.metrics import evaluate, summarize

    model, tokenizer, family = load_model_from_manifest(manifest, device, dtype)
    decisions = decide(load_act_scales(act_scales), float(threshold), statistic, source=str(act_scales))
    names = quantize_model(model, family, decisions)
    sequences = evaluation_sequences(tokenizer, samples, seq_len)
    with torch.inference_mode():
        result = evaluate(model, sequences, batch_size=batch_size, baseline=baseline,
                          desc=f"{statistic} t={threshold:g}")
    quantized = {n: decisions[n] for n in names}
    counts = shadow_summary(quantized, float(threshold), statistic)
    metrics = {k: _finite_or_none(v) if isinstance(v, float) else v for k, v in summarize(result).items()}
    metrics.update(
        statistic=statistic, threshold=float(threshold),
        num_shadow_inputs=counts["num_shadow_inputs"], num_shadow_outputs=counts["num_shadow_outputs"],
        num_shadow_sides=counts["num_shadow_sides"],
        shadow_flop_fraction=shadow_flop_fraction(model, names, decisions),
        shadow_inputs=counts["shadow_inputs"], shadow_outputs=counts["shadow_outputs"],
    )
    write_json(out_json, metrics)
    log.info("%s t=%g: accuracy %.4f perplexity %s shadow sides %d", statistic, threshold, metrics["accuracy"],
             metrics["perplexity"], metrics["num_shadow_sides"])
    return metrics


def aggregate(float_json, point_jsons: list, out_csv) -> None:
    """The sweep table: the float row first, then each (statistic, threshold) point."""
    import pandas as pd

    rows = [json.loads(Path(float_json).read_text())]
    rows += [json.loads(Path(p).read_text()) for p in point_jsons]
    table = pd.DataFrame(rows).reindex(columns=SWEEP_COLUMNS)
    table = pd.concat([table.iloc[:1], table.iloc[1:].sort_values(["statistic", "threshold"])])
    # Counts stay integers although the float row has none.
    for column in ("num_shadow_inputs", "num_shadow_outputs", "num_shadow_sides", "num_samples", "num_tokens"):
        table[column] = table[column].astype("Int64")
    with atomic_path(out_csv, suffix=".csv") as tmp:
        table.to_csv(tmp, index=False)
