"""The sweep, by simulated W8A8 inference on held-out text: the float baseline, one evaluation per point
(the ratio rule at a threshold, or the k sensitivity-chosen shadow sides), the parts of the error
breakdown, and the sweep table. Choosing a point from the table is selection.py's job."""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

from shadowquant.atomic import atomic_path, write_json
from shadowquant.inputs.corpus import read_jsonl_texts
from shadowquant.runtimes.decision import load_act_scales
from shadowquant.errors import PipelineError
from shadowquant.jsonfile import read_json_object
from shadowquant.model.families import quantized_layer_names
from shadowquant.evaluate.metrics import evaluate, per_record, result_from_per_record, save_baseline, summarize
from shadowquant.model.loading import load_model_from_manifest
from shadowquant.calibrate.profiling import tokenize_samples
from shadowquant.runtimes import DecisionSources, get_runtime

log = logging.getLogger(__name__)

METRIC_KEYS = ("accuracy", "perplexity", "perplexity_increase", "kl", "agreement")
SWEEP_COLUMNS = ["point", "runtime", "rule", "statistic", "clip", "weight_range", "threshold", "shadow_budget",
                 *[f"{m}{suffix}" for m in METRIC_KEYS for suffix in ("", "_ci_low", "_ci_high")],
                 "num_shadow_layers", "shadow_layers", "cpu_share", "input_outliers", "output_outliers",
                 "num_shadow_inputs", "num_shadow_outputs", "num_shadow_sides", "shadow_flop_fraction",
                 "num_samples", "num_tokens"]
def json_number(value):
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
    metrics = {k: json_number(v) for k, v in summarize(result, num_resamples=num_resamples).items()}
    metrics.update(point="float", rule="float", statistic="float", threshold=None, shadow_budget=None,
                   per_record=per_record(result))
    write_json(out_json, metrics)
    log.info("float: perplexity %.4f over %d tokens", metrics["perplexity"], metrics["num_tokens"])
    return metrics


@dataclass(frozen=True)
class PointEvaluation:
    """What every sweep point of a run is evaluated with: the run's files and the evaluation settings.

    `runtime` names the runtime profile simulated (runtime.py); an NPU profile needs `runtime_scales`
    (runtime_scales.json) and, for its 'absmax-l<k>' points, the layer ranking in `sensitivity`; the ideal
    profile's '-k' points need `sensitivity`, its '-mse' points `clip_scales`."""

    manifest: str | Path
    samples: str | Path
    act_scales: str | Path
    baseline: str | Path
    float_json: str | Path
    seq_len: int
    runtime: str
    batch_size: int = 4
    device: str = "auto"
    dtype: str = "auto"
    num_resamples: int = 1000
    weight_range: str | dict = "max"
    sensitivity: str | Path | None = None
    clip_scales: str | Path | None = None
    runtime_scales: str | Path | None = None


def evaluate_point(evaluation: PointEvaluation, point: str, out_json, part: str = "all") -> dict:
    """One sweep point (or one part of the error breakdown): quantize, evaluate against the float baseline,
    and summarize with bootstrap intervals paired with the float run on the same records."""
    metrics = evaluate_points(evaluation, [point], part=part)[0]
    write_json(out_json, metrics)
    return metrics


def evaluate_point_group(evaluation: PointEvaluation, points: list[str], out_json) -> list[dict]:
    """A group of sweep points evaluated with one model load, written as {"points": [...]} for split_point."""
    results = evaluate_points(evaluation, list(points))
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


def evaluate_points(evaluation: PointEvaluation, points: list[str], part: str = "all") -> list[dict]:
    """Sweep points with one model load (`sweep.points_per_job`): each point quantizes a fresh copy of the
    float model, so every result equals the one-point job's. Worth it where loading dominates (a
    billion-parameter model on a GPU evaluates a point in seconds but loads in tens of seconds)."""
    if not points:
        raise PipelineError("no sweep point to evaluate")
    e = evaluation
    started = time.perf_counter()
    float_model, tokenizer, family = load_model_from_manifest(e.manifest, e.device, e.dtype)
    log.info("model loaded in %.1f s", time.perf_counter() - started)
    names = quantized_layer_names(float_model, family)
    scales = load_act_scales(e.act_scales)
    sequences = evaluation_sequences(tokenizer, e.samples, e.seq_len)
    float_result = result_from_per_record(read_point_json(e.float_json)["per_record"], source=str(e.float_json))
    runtime = get_runtime(e.runtime, family)
    # The ranking and the clip and runtime scales are read once, not once per point.
    sources = DecisionSources(e.sensitivity, e.clip_scales, e.runtime_scales)
    results = []
    for index, point in enumerate(points):
        plan = runtime.decide(scales, point, names, sources, source=str(e.act_scales))
        # The last point may quantize the loaded model itself; the others each take a copy.
        model = float_model if index == len(points) - 1 else copy.deepcopy(float_model)
        counter = runtime.apply(model, plan, names, part, e.weight_range)
        label = point if part == "all" else f"{point} {part} only"
        result = evaluate(model, sequences, batch_size=e.batch_size, baseline=e.baseline,
                          desc=runtime.progress_label(label))
        metrics = {k: json_number(v) for k, v in summarize(result, float_result, num_resamples=e.num_resamples).items()}
        metrics.update(runtime.point_record(plan, names, model, counter, part, e.weight_range),
                       per_record=per_record(result))
        runtime.log_point(log, label, metrics)
        results.append(metrics)
        del model
    return results


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
    point (the runtime's breakdown_point), whose label the result names."""
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
