"""The threshold sweep: float baseline, one simulated W8A8 evaluation per (statistic, threshold),
the sweep table, and the automatic selection of the exported pair."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from shadowquant.atomic import atomic_path, write_json
from shadowquant.decision import decide, load_act_scales, summarize as summarize_decisions
from shadowquant.errors import PipelineError

log = logging.getLogger(__name__)

# Metric -> True when larger is better.
HIGHER_IS_BETTER = {"accuracy": True, "agreement": True, "perplexity": False, "kl": False}
SWEEP_COLUMNS = ["statistic", "threshold", "accuracy", "perplexity", "agreement", "kl", "num_shadow_inputs",
                 "num_shadow_outputs", "num_shadow_sides", "shadow_flop_fraction", "num_samples", "num_tokens"]


def _finite_or_none(value):
    return value if value is None or math.isfinite(value) else None


def load_evaluation_model(manifest: str | Path, device: str, dtype: str):
    from shadowquant.models import load_model
    from shadowquant.stages import read_manifest

    info = read_manifest(manifest)
    return load_model(info["path"], device=device, dtype=dtype, trust_remote_code=info.get("trust_remote_code", False),
                      family=info.get("family"))


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

    model, tokenizer, _ = load_evaluation_model(manifest, device, dtype)
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

    model, tokenizer, family = load_evaluation_model(manifest, device, dtype)
    decisions = decide(load_act_scales(act_scales), float(threshold), statistic, source=str(act_scales))
    names = quantize_model(model, family, decisions)
    sequences = evaluation_sequences(tokenizer, samples, seq_len)
    with torch.inference_mode():
        result = evaluate(model, sequences, batch_size=batch_size, baseline=baseline,
                          desc=f"{statistic} t={threshold:g}")
    quantized = {n: decisions[n] for n in names}
    counts = summarize_decisions(quantized, float(threshold), statistic)
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


def budget_bound(metric: str, float_value: float, max_drop: float) -> float:
    """The worst metric value the selection still accepts."""
    if metric == "kl":
        return max_drop  # the float model's own KL is 0
    return float_value - max_drop if HIGHER_IS_BETTER[metric] else float_value + max_drop


def within_budget(value, float_value, metric: str, max_drop: float) -> bool:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    bound = budget_bound(metric, float_value, max_drop)
    return value >= bound - 1e-12 if HIGHER_IS_BETTER[metric] else value <= bound + 1e-12


def choose(table, metric: str, max_drop: float, statistic: str | None = None,
           threshold: float | None = None) -> dict:
    """Fewest shadow sides among the points within budget of float (ties: the better metric).

    `statistic` / `threshold` restrict the candidates (explicit config values override "auto").
    """
    import pandas as pd

    floats = table[table["statistic"] == "float"]
    if floats.empty:
        raise PipelineError("sweep table has no float row; re-run the float evaluation")
    # The float model agrees with itself completely and has no divergence from itself.
    float_value = {"kl": 0.0, "agreement": 1.0}.get(metric, None)
    if float_value is None:
        float_value = float(floats.iloc[0][metric])
    points = table[table["statistic"] != "float"]
    if statistic is not None:
        points = points[points["statistic"] == statistic]
    if threshold is not None:
        points = points[points["threshold"] == float(threshold)]
    if points.empty:
        raise PipelineError(f"the sweep has no point for statistic {statistic or 'any'} and threshold "
                            f"{threshold if threshold is not None else 'any'}; add it to sweep.thresholds/statistics")
    sign = -1 if HIGHER_IS_BETTER[metric] else 1
    ok = points[[within_budget(v, float_value, metric, max_drop) for v in points[metric]]]
    if ok.empty:
        ranked = points.assign(_key=[sign * v if not pd.isna(v) else math.inf for v in points[metric]])
        best = ranked.sort_values("_key").iloc[0]
        raise PipelineError(
            f"no swept point keeps {metric} within {max_drop} of float ({float_value:.4f}); the closest is "
            f"statistic {best['statistic']} threshold {best['threshold']:g} with {metric} {best[metric]:.4f}; "
            f"raise sweep.max_accuracy_drop or add smaller thresholds")
    ranked = ok.assign(_key=[sign * v for v in ok[metric]]).sort_values(["num_shadow_sides", "_key", "threshold"],
                                                                         ascending=[True, True, False])
    best = ranked.iloc[0]
    reason = (f"fewest shadow sides ({int(best['num_shadow_sides'])}) among {len(ok)} of {len(points)} swept points "
              f"whose {metric} is within {max_drop} of float ({float_value:.4f}); ties broken by the better {metric}")
    return {
        "statistic": str(best["statistic"]), "threshold": float(best["threshold"]), "metric": metric,
        "max_drop": max_drop, "float_value": float_value, "selected_value": float(best[metric]),
        "num_shadow_sides": int(best["num_shadow_sides"]), "reason": reason,
        "candidates": int(len(points)), "within_budget": int(len(ok)),
    }


def select_stage(sweep_csv, out, metric: str, max_drop: float, statistic: str = "auto",
                 threshold="auto") -> dict:
    import pandas as pd

    table = pd.read_csv(sweep_csv)
    choice = choose(table, metric, max_drop, None if statistic == "auto" else statistic,
                    None if threshold == "auto" else float(threshold))
    write_json(out, choice)
    log.info("selected %s threshold %g: %s", choice["statistic"], choice["threshold"], choice["reason"])
    return choice


def resolve_export_pair(statistic: str, threshold, selection: str | Path | None) -> tuple[str, float]:
    """The (statistic, threshold) the export uses: explicit config values, else the selection's."""
    if statistic != "auto" and threshold != "auto":
        return statistic, float(threshold)
    if selection is None:
        raise PipelineError("export.threshold or statistic is 'auto' but no selection.json was given")
    choice = json.loads(Path(selection).read_text())
    return choice["statistic"], float(choice["threshold"])
