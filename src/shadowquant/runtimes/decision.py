"""The clip / shadow decision of docs/method.md section 2, for one threshold and statistic."""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from shadowquant.errors import PipelineError
from shadowquant.jsonfile import read_json_object

SIDES = ("input", "output")
STATISTICS = ("signed", "absmax")
# Keys of act_scales.json: the reference keys carry the signed statistic,
# the absmax variant sits under added keys.
STAT_KEYS = {
    "signed": ("ori", "top_0_1"),
    "absmax": ("absmax_ori", "absmax_top_0_1"),
}


@dataclass(frozen=True)
class LayerQuant:
    """Static W8A8 parameters of one Linear: scales are not divided by 127."""

    input_scale: float
    output_scale: float
    clip_input: bool
    clip_output: bool


def threshold_label(threshold: float) -> str:
    """Filename-safe, stable rendering of a threshold: 152, 10000000, 1.5."""
    t = float(threshold)
    return str(int(t)) if t.is_integer() else repr(t)


# A sweep point: the ratio rule at threshold t ("absmax-t16"), the k most valuable shadow sides of the
# measured sensitivity ranking ("absmax-k15", runtime profile ideal: runtimes/ideal.py), or the k most
# valuable shadow layers of the measured layer ranking ("absmax-l2", NPU runtime profiles: runtimes/npu.py).
RULES = {"t": "ratio", "k": "sensitivity", "l": "layers"}
LETTERS = {rule: letter for letter, rule in RULES.items()}
# A "-mse" suffix clips the clipped sides at their MSE-optimal scale instead of their maximum.
POINT_PATTERN = re.compile(r"^(signed|absmax)-(t|k|l)([0-9]+(?:\.[0-9]+)?)(-mse)?$")
CLIPS = ("max", "mse")


def point_label(statistic: str, rule: str, value: float, clip: str = "max") -> str:
    """'absmax-t16' for the ratio rule at t = 16, 'absmax-k15' for 15 sensitivity-chosen shadow sides;
    'absmax-k15-mse' clips the other sides at their MSE-optimal scale."""
    letter = LETTERS[rule]
    suffix = "" if clip == "max" else f"-{clip}"
    return f"{statistic}-{letter}{threshold_label(value) if rule == 'ratio' else int(value)}{suffix}"


def needs_ranking(label: str) -> bool:
    """Whether a point takes its shadow sides or layers from the ranking (sensitivity.csv)."""
    _, rule, value = parse_point(label)
    return rule in ("sensitivity", "layers") and value > 0


def point_clip(label: str) -> str:
    """'mse' for a point whose clipped sides use the MSE-optimal clip scales, else 'max'."""
    parse_point(label)
    return "mse" if str(label).endswith("-mse") else "max"


def parse_point(label: str) -> tuple[str, str, float]:
    """(statistic, rule, value) of a point label; a one-line error names the valid forms."""
    match = POINT_PATTERN.match(str(label))
    if not match or (match[2] in "kl" and "." in match[3]) or (match[2] == "l" and match[4]):
        raise PipelineError(f"point '{label}' is not valid: expected '<statistic>-t<threshold>' (e.g. absmax-t152, "
                            "the ratio rule), '<statistic>-k<shadow sides>' (e.g. absmax-k15, sensitivity-chosen; "
                            "statistic signed or absmax, either optionally followed by -mse) or 'absmax-l<shadow "
                            "layers>' (e.g. absmax-l2, NPU runtime profiles)")
    return match[1], RULES[match[2]], float(match[3])


def decide_side(ori: float, top: float, threshold: float) -> tuple[float, bool]:
    """Return (scale, clip) for one side: clip when top * t > ori (docs/method.md section 2)."""
    if top * threshold > ori:
        return ori, True
    return top, False


def load_act_scales(path: str | Path) -> dict:
    """act_scales.json (docs/method.md section 1), checked for the keys the decisions read."""
    data = read_json_object(path, "activation scales file", "expected the act_scales.json written by profiling")
    for key in ("ori", "top_0_1"):
        if not isinstance(data.get(key), dict):
            raise PipelineError(f"{path}: missing key '{key}' (expected the act_scales format of docs/method.md section 1)")
    return data


def decide(act_scales: dict, threshold: float, statistic: str = "signed", layers: list[str] | None = None,
           source: str = "act_scales.json") -> dict[str, LayerQuant]:
    """Decide scale and clip flag for every side of every layer of `act_scales`.

    `layers`, when given, must all be present (an act_scales.json from another model is an error).
    """
    if statistic not in STAT_KEYS:
        raise PipelineError(f"unknown statistic '{statistic}'; valid: {', '.join(STAT_KEYS)}")
    if not (isinstance(threshold, (int, float)) and math.isfinite(threshold) and threshold > 0):
        raise PipelineError(f"threshold {threshold!r} must be a positive number")
    ori_key, top_key = STAT_KEYS[statistic]
    if ori_key not in act_scales or top_key not in act_scales:
        raise PipelineError(f"{source}: has no '{ori_key}'/'{top_key}' keys; re-run profiling to get the {statistic} statistic")
    ori_all, top_all = act_scales[ori_key], act_scales[top_key]
    names = list(ori_all) if layers is None else list(layers)
    missing = [n for n in names if n not in ori_all or n not in top_all]
    if missing:
        raise PipelineError(f"{source}: missing layers {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} "
                            f"({len(missing)} of {len(names)}); profile this model again")
    result = {}
    for name in names:
        sides = {}
        for side in SIDES:
            try:
                ori = float(ori_all[name][side])
                top = float(top_all[name][side])
            except (KeyError, TypeError, ValueError):
                raise PipelineError(f"{source}: layer '{name}' has no numeric '{side}' value under '{ori_key}'/'{top_key}'") from None
            scale, clip = decide_side(ori, top, threshold)
            if not (math.isfinite(scale) and scale > 0):
                raise PipelineError(f"{source}: layer '{name}' {side} scale {scale!r} under statistic '{statistic}' "
                                    f"is not a positive finite number; int8 scales must be > 0")
            sides[side] = (scale, clip)
        result[name] = LayerQuant(sides["input"][0], sides["output"][0], sides["input"][1], sides["output"][1])
    return result


def shadow_summary(decisions: dict[str, LayerQuant], threshold: float, statistic: str) -> dict:
    """The JSON summary of a decision: shadow (no-clip) sides and counts."""
    shadow_inputs = [n for n, q in decisions.items() if not q.clip_input]
    shadow_outputs = [n for n, q in decisions.items() if not q.clip_output]
    return {
        "threshold": threshold,
        "statistic": statistic,
        "num_layers": len(decisions),
        "num_shadow_inputs": len(shadow_inputs),
        "num_shadow_outputs": len(shadow_outputs),
        "num_shadow_sides": len(shadow_inputs) + len(shadow_outputs),
        "shadow_inputs": shadow_inputs,
        "shadow_outputs": shadow_outputs,
        "layers": {n: asdict(q) for n, q in decisions.items()},
    }


def decide_shadow_set(act_scales: dict, statistic: str, shadow_sides, layers: list[str] | None = None,
                      source: str = "act_scales.json", clip_scales: dict | None = None) -> dict[str, LayerQuant]:
    """Per-side decisions from a chosen set of shadow sides: each `(layer, side)` in `shadow_sides` is a
    shadow side (scale = 99.9 % quantile, no clamp); every other side is clipped at its maximum, or at
    `clip_scales[(layer, side)]` where given (e.g. an MSE-optimal clip)."""
    shadowed = decide(act_scales, 1.0, statistic, layers=layers, source=source)  # validates the layers
    ori_key, top_key = STAT_KEYS[statistic]
    shadow = {(str(layer), str(side)) for layer, side in shadow_sides}
    unknown = sorted(f"{layer} {side}" for layer, side in shadow if layer not in shadowed or side not in SIDES)
    if unknown:
        raise PipelineError(f"{source}: shadow sides {', '.join(unknown[:3])} are not Linear sides of this model "
                            "(expected a layer of its act_scales.json and side 'input' or 'output')")
    result = {}
    for name in shadowed:
        sides = {}
        for side in SIDES:
            if (name, side) in shadow:
                sides[side] = (float(act_scales[top_key][name][side]), False)
                continue
            ori = float((clip_scales or {}).get((name, side), act_scales[ori_key][name][side]))
            if not (math.isfinite(ori) and ori > 0):
                raise PipelineError(f"{source}: layer '{name}' {side} maximum {ori!r} under statistic '{statistic}' "
                                    "is not a positive finite number; int8 scales must be > 0")
            sides[side] = (ori, True)
        result[name] = LayerQuant(sides["input"][0], sides["output"][0], sides["input"][1], sides["output"][1])
    return result


def read_ranking(path: str | Path, statistic: str) -> list[tuple[str, str]]:
    """The (layer, side) pairs of sensitivity.csv for `statistic`, in rank order (most valuable shadow first)."""
    import csv

    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = [row for row in csv.DictReader(handle) if row.get("statistic") == statistic]
    except FileNotFoundError:
        raise PipelineError(f"{path}: sensitivity table not found; run the sensitivity rule first") from None
    try:
        rows.sort(key=lambda row: int(row["rank"]))
        return [(row["layer"], row["side"]) for row in rows]
    except (KeyError, ValueError):
        raise PipelineError(f"{path}: expected columns layer, side, statistic and an integer rank") from None


def read_clip_scales(path: str | Path, statistic: str) -> dict[tuple[str, str], float]:
    """{(layer, side): MSE-optimal clip scale} of clip_scales.json for `statistic`."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))[statistic]
        return {(layer, side): float(value) for layer, sides in data.items() for side, value in sides.items()}
    except FileNotFoundError:
        raise PipelineError(f"{path}: clip scales not found; run the clip_scales rule first") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
        raise PipelineError(f"{path}: no clip scales for statistic '{statistic}' (expected "
                            "{statistic: {layer: {side: scale}}}); delete it and run the clip_scales rule again") from None
