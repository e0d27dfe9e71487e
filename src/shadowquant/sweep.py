"""The sweep, by simulated W8A8 inference on held-out text: the float baseline, one evaluation per point
(the ratio rule at a threshold, or the k sensitivity-chosen shadow sides), the parts of the error
breakdown, and the sweep table. Choosing a point from the table is selection.py's job."""

from __future__ import annotations

import copy
import logging
import math
import time
from pathlib import Path

from shadowquant.atomic import atomic_path, write_json
from shadowquant.corpus import read_jsonl_texts
from shadowquant.decision import (load_act_scales, parse_point, point_clip, point_decisions, read_clip_scales,
                                  read_ranking, shadow_summary)
from shadowquant.errors import PipelineError
from shadowquant.fakequant import apply_w8a8, weight_range_name
from shadowquant.jsonfile import read_json_object
from shadowquant.families import quantized_layer_names
from shadowquant.metrics import evaluate, per_record, result_from_per_record, save_baseline, summarize
from shadowquant.models import load_model_from_manifest
from shadowquant.profiling import tokenize_samples
from shadowquant.runtime import IDEAL, get_profile
from shadowquant.runtime_decision import read_runtime_scales, runtime_decisions, shadow_layers_of_point
from shadowquant.runtime_linear import apply_runtime

log = logging.getLogger(__name__)

METRIC_KEYS = ("accuracy", "perplexity", "perplexity_increase", "kl", "agreement")
SWEEP_COLUMNS = ["point", "runtime", "rule", "statistic", "clip", "weight_range", "threshold", "shadow_budget",
                 *[f"{m}{suffix}" for m in METRIC_KEYS for suffix in ("", "_ci_low", "_ci_high")],
                 "num_shadow_layers", "shadow_layers", "cpu_share", "input_outliers", "output_outliers",
                 "num_shadow_inputs", "num_shadow_outputs", "num_shadow_sides", "shadow_flop_fraction",
                 "num_samples", "num_tokens"]
# Which parts of every quantized Linear are quantized, for the error breakdown.
PARTS = {
    "all": dict(quantize_weights=True, quantize_inputs=True, quantize_outputs=True),
    "weights": dict(quantize_weights=True, quantize_inputs=False, quantize_outputs=False),
    "inputs": dict(quantize_weights=False, quantize_inputs=True, quantize_outputs=False),
    "outputs": dict(quantize_weights=False, quantize_inputs=False, quantize_outputs=True),
}


def _clean(value):
    """JSON-friendly numbers: NaN and infinities become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def evaluation_sequences(tokenizer, samples: str | Path, seq_len: int) -> list[list[int]]:
    """Tokenized evaluation texts; texts shorter than two tokens cannot be scored and are dropped."""
    sequences = [s for s in tokenize_samples(tokenizer, read_jsonl_texts(samples), seq_len) if len(s) >= 2]
    if not sequences:
        raise PipelineError(f"{samples}: no evaluation record has two or more tokens; use longer texts")
    return sequences


def shadow_flop_fraction(model, layer_names: list[str], decisions) -> float:
    """Device-cost proxy: the share of quantized Linear FLOPs (in x out per token) whose input is shadowed."""
    total = shadow = 0
    for name in layer_names:
        module = model.get_submodule(name)
        flops = module.in_features * module.out_features
        total += flops
        if not decisions[name].clip_input:
            shadow += flops
    return shadow / total if total else 0.0


def quantize_model(model, family: str, decisions, part: str = "all", weight_range: str = "max") -> list[str]:
    """Replace the family's quantized Linears by simulated W8A8 ones (lm_head stays float)."""
    if part not in PARTS:
        raise PipelineError(f"unknown breakdown part '{part}'; valid: {', '.join(PARTS)}")
    names = quantized_layer_names(model, family)
    apply_w8a8(model, decisions, names, **PARTS[part], weight_range=weight_range)
    return names


def read_point_json(path: str | Path) -> dict:
    """A sweep point's (or float's) JSON with its per-record results."""
    data = read_json_object(path, "sweep result", "delete it and re-run its evaluation")
    if "per_record" not in data:
        raise PipelineError(f"{path}: has no per-record results (written by an older version); delete it and "
                            "re-run its evaluation")
    return data


def evaluate_float(manifest, samples, out_json, out_baseline, seq_len: int, batch_size: int = 4,
                   device: str = "auto", dtype: str = "auto", num_resamples: int = 1000) -> dict:
    """The float model once: its metrics, and the baseline (lm_head inputs) every point compares with."""
    model, tokenizer, _ = load_model_from_manifest(manifest, device, dtype)
    sequences = evaluation_sequences(tokenizer, samples, seq_len)
    result = evaluate(model, sequences, batch_size=batch_size, collect_baseline=True, desc="float")
    save_baseline(out_baseline, result.baseline)
    metrics = {k: _clean(v) for k, v in summarize(result, num_resamples=num_resamples).items()}
    metrics.update(point="float", rule="float", statistic="float", threshold=None, shadow_budget=None,
                   per_record=per_record(result))
    write_json(out_json, metrics)
    log.info("float: perplexity %.4f over %d tokens", metrics["perplexity"], metrics["num_tokens"])
    return metrics


def evaluate_point(manifest, samples, act_scales, baseline, float_json, out_json, point: str, seq_len: int,
                   batch_size: int = 4, device: str = "auto", dtype: str = "auto", num_resamples: int = 1000,
                   sensitivity=None, part: str = "all", clip_scales=None, weight_range: str = "max",
                   runtime: str = IDEAL, runtime_scales=None) -> dict:
    """One sweep point (or one part of the error breakdown): quantize, evaluate against the float baseline,
    and summarize with bootstrap intervals paired with the float run on the same records."""
    metrics = evaluate_points(manifest, samples, act_scales, baseline, float_json, [point], seq_len,
                              batch_size=batch_size, device=device, dtype=dtype, num_resamples=num_resamples,
                              sensitivity=sensitivity, part=part, clip_scales=clip_scales,
                              weight_range=weight_range, runtime=runtime, runtime_scales=runtime_scales)[0]
    write_json(out_json, metrics)
    return metrics


def evaluate_point_group(manifest, samples, act_scales, baseline, float_json, out_json, points: list[str],
                         seq_len: int, batch_size: int = 4, device: str = "auto", dtype: str = "auto",
                         num_resamples: int = 1000, sensitivity=None, clip_scales=None,
                         weight_range: str = "max", runtime: str = IDEAL, runtime_scales=None) -> list[dict]:
    """A group of sweep points evaluated with one model load, written as {"points": [...]} for split_point."""
    results = evaluate_points(manifest, samples, act_scales, baseline, float_json, list(points), seq_len,
                              batch_size=batch_size, device=device, dtype=dtype, num_resamples=num_resamples,
                              sensitivity=sensitivity, clip_scales=clip_scales, weight_range=weight_range,
                              runtime=runtime, runtime_scales=runtime_scales)
    write_json(out_json, {"points": results})
    return results


def split_point(group_json, point: str, out_json) -> dict:
    """One point's result out of a group file, as the one-point job would have written it."""
    group = read_json_object(group_json, "sweep point group", "delete it and run the sweep again")
    matches = [entry for entry in group.get("points", []) if isinstance(entry, dict) and entry.get("point") == point]
    if len(matches) != 1:
        raise PipelineError(f"{group_json}: has no result for point {point}; delete it and run the sweep again")
    write_json(out_json, matches[0])
    return matches[0]


def evaluate_points(manifest, samples, act_scales, baseline, float_json, points: list[str], seq_len: int,
                    batch_size: int = 4, device: str = "auto", dtype: str = "auto", num_resamples: int = 1000,
                    sensitivity=None, part: str = "all", clip_scales=None, weight_range: str = "max",
                    runtime: str = IDEAL, runtime_scales=None) -> list[dict]:
    """Sweep points with one model load (`sweep.points_per_job`): each point quantizes a fresh copy of the
    float model, so every result equals the one-point job's. Worth it where loading dominates (a
    billion-parameter model on a GPU evaluates a point in seconds but loads in tens of seconds).

    `runtime` names the runtime profile simulated (runtime.py); an NPU profile needs `runtime_scales`
    (runtime_scales.json) and, for its 'absmax-l<k>' points, the layer ranking in `sensitivity`."""
    if not points:
        raise PipelineError("no sweep point to evaluate")
    started = time.perf_counter()
    float_model, tokenizer, family = load_model_from_manifest(manifest, device, dtype)
    log.info("model loaded in %.1f s", time.perf_counter() - started)
    names = quantized_layer_names(float_model, family)
    scales = load_act_scales(act_scales)
    sequences = evaluation_sequences(tokenizer, samples, seq_len)
    float_result = result_from_per_record(read_point_json(float_json)["per_record"], source=str(float_json))
    profile = get_profile(runtime, family)
    if not profile.ideal:
        chosen = read_runtime_scales(runtime_scales, profile)
        ranking = [layer for layer, _ in read_ranking(sensitivity, "absmax")] if sensitivity is not None else None
        return [_evaluate_runtime_point(float_model if index == len(points) - 1 else copy.deepcopy(float_model),
                                        names, profile, scales, point, sequences, batch_size, baseline, float_result,
                                        num_resamples, part, weight_range, chosen, ranking)
                for index, point in enumerate(points)]
    # The ranking and clip scales are read once per statistic, not once per point.
    rankings, clip_tables = {}, {}
    results = []
    for index, point in enumerate(points):
        statistic, rule, value = parse_point(point)
        if statistic not in rankings:
            rankings[statistic] = read_ranking(sensitivity, statistic) if sensitivity is not None else None
            clip_tables[statistic] = read_clip_scales(clip_scales, statistic) if clip_scales is not None else None
        ranking, clips = rankings[statistic], clip_tables[statistic]
        decisions = point_decisions(scales, point, ranking=ranking, source=str(act_scales), clip_scales=clips)
        # The last point may quantize the loaded model itself; the others each take a copy.
        model = float_model if index == len(points) - 1 else copy.deepcopy(float_model)
        quantize_model(model, family, decisions, part, weight_range)
        label = point if part == "all" else f"{point} {part} only"
        result = evaluate(model, sequences, batch_size=batch_size, baseline=baseline, desc=label)
        metrics = {k: _clean(v) for k, v in summarize(result, float_result, num_resamples=num_resamples).items()}
        counts = shadow_summary({n: decisions[n] for n in names}, value if rule == "ratio" else math.nan, statistic)
        metrics.update(
            point=point, rule=rule, statistic=statistic, clip=point_clip(point), part=part,
            weight_range=weight_range_name(weight_range), threshold=value if rule == "ratio" else None,
            shadow_budget=int(value) if rule == "sensitivity" else None,
            num_shadow_inputs=counts["num_shadow_inputs"], num_shadow_outputs=counts["num_shadow_outputs"],
            num_shadow_sides=counts["num_shadow_sides"],
            shadow_flop_fraction=shadow_flop_fraction(model, names, decisions), runtime=IDEAL,
            shadow_inputs=counts["shadow_inputs"], shadow_outputs=counts["shadow_outputs"],
            per_record=per_record(result),
        )
        log.info("%s: perplexity %.4f (%+.2f %%), KL %.4f, agreement %.4f, %d shadow sides", label,
                 metrics["perplexity"], 100 * (metrics["perplexity_increase"] or 0.0), metrics["kl"] or 0.0,
                 metrics["agreement"] or 0.0, metrics["num_shadow_sides"])
        results.append(metrics)
        del model
    return results


def _evaluate_runtime_point(model, names, profile, act_scales, point, sequences, batch_size, baseline, float_result,
                            num_resamples, part, weight_range, runtime_scales, ranking) -> dict:
    """One point under an NPU runtime profile: its shadow layers, the simulation, the measured CPU share."""
    statistic, rule, value = parse_point(point)
    shadow = shadow_layers_of_point(point, act_scales, profile, names, ranking)
    decisions = runtime_decisions(act_scales, runtime_scales, profile, names, shadow)
    counter = apply_runtime(model, decisions, names, profile, shadow, weight_range=weight_range, **PARTS[part])
    label = point if part == "all" else f"{point} {part} only"
    result = evaluate(model, sequences, batch_size=batch_size, baseline=baseline, desc=f"{label} ({profile.name})")
    metrics = {k: _clean(v) for k, v in summarize(result, float_result, num_resamples=num_resamples).items()}
    counts = shadow_summary({n: decisions[n] for n in names}, value if rule == "ratio" else math.nan, statistic)
    metrics.update(
        point=point, runtime=profile.name, rule=rule, statistic=statistic, clip="runtime", part=part,
        weight_range=weight_range_name(weight_range), threshold=value if rule == "ratio" else None,
        shadow_budget=int(value) if rule == "layers" else None, num_shadow_layers=len(shadow),
        shadow_layers=" ".join(str(i) for i in sorted(shadow)), cpu_share=counter.share,
        input_outliers=counter.input_outliers, output_outliers=counter.output_outliers,
        num_shadow_inputs=counts["num_shadow_inputs"], num_shadow_outputs=counts["num_shadow_outputs"],
        num_shadow_sides=counts["num_shadow_sides"], shadow_flop_fraction=None,
        shadow_inputs=counts["shadow_inputs"], shadow_outputs=counts["shadow_outputs"],
        per_record=per_record(result),
    )
    log.info("%s (%s): perplexity %.4f (%+.2f %%), KL %.4f, agreement %.4f, shadow layers [%s], CPU share %.4f %%",
             label, profile.name, metrics["perplexity"], 100 * (metrics["perplexity_increase"] or 0.0),
             metrics["kl"] or 0.0, metrics["agreement"] or 0.0, metrics["shadow_layers"], 100 * counter.share)
    return metrics


def aggregate(float_json, point_jsons: list, out_csv) -> None:
    """The sweep table: the float row first, then the ratio points by threshold, then the front by k."""
    import pandas as pd

    rows = [read_point_json(float_json)] + [read_point_json(p) for p in point_jsons]
    table = pd.DataFrame([{k: v for k, v in row.items() if k != "per_record"} for row in rows])
    table = table.reindex(columns=SWEEP_COLUMNS)
    points = table.iloc[1:].sort_values(["statistic", "clip", "rule", "threshold", "shadow_budget"])
    table = pd.concat([table.iloc[:1], points])
    # Counts stay integers although the float row has none.
    for column in ("shadow_budget", "num_shadow_inputs", "num_shadow_outputs", "num_shadow_sides", "num_samples",
                   "num_tokens"):
        table[column] = table[column].astype("Int64")
    with atomic_path(out_csv, suffix=".csv") as tmp:
        table.to_csv(tmp, index=False)


def breakdown(float_json, part_jsons: dict, out_json) -> dict:
    """Where the loss comes from: float, weights only, inputs only, outputs only and all, at the breakdown
    point (decision.breakdown_point), whose label the result names."""
    keys = [f"{m}{s}" for m in METRIC_KEYS for s in ("", "_ci_low", "_ci_high")] + ["num_tokens"]
    parts = {"float": read_point_json(float_json)}
    parts.update({part: read_point_json(path) for part, path in part_jsons.items()})
    statistic = next((p["statistic"] for name, p in parts.items() if name != "float"), None)
    result = {
        "statistic": statistic, "point": parts["all"].get("point") if "all" in parts else None,
        "runtime": parts["all"].get("runtime") if "all" in parts else None,
        "num_tokens": parts["float"]["num_tokens"],
        "parts": {name: {k: data.get(k) for k in keys} for name, data in parts.items()},
    }
    result["parts"]["float"].update(perplexity_increase=0.0, kl=0.0, agreement=1.0)
    write_json(out_json, result)
    return result
