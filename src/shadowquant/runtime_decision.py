"""Sweep points under an NPU runtime profile: a point is a set of shadow layers.

Only the shadow role (down_proj) of a shadow layer runs the shadow op, so the decision is which
layers are shadow layers; their down_proj sides get shadow ranges, every other side is clamped.

- `absmax-t<t>`: the original ratio rule at the layer level: a layer is a shadow layer when the
  ratio max / 99.9 % quantile of its down_proj input or output reaches t (the number and the position
  of the no-clip layers, as the original tools describe it).
- `absmax-l<k>`: the k layers that the measured layer ranking (sensitivity.csv) puts first.

Ranges: a clamped side takes runtime_scales.json's choice (max or MSE clip). The 2k shadow sides of a
point share the CPU-share cap equally: each may leave a fraction `cap * all Linear MACs / (2k *
down_proj MACs)` of its elements beyond int8, and takes the smallest tabulated range within that.
"""

from __future__ import annotations

import json
from pathlib import Path

from shadowquant.decision import STAT_KEYS, LayerQuant, parse_point
from shadowquant.errors import PipelineError
from shadowquant.runtime import RuntimeProfile, layer_index, layer_role


def read_runtime_scales(path: str | Path, profile: RuntimeProfile) -> dict:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PipelineError(f"{path}: runtime scales not found; run the runtime_scales rule first") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise PipelineError(f"{path}: not valid JSON; delete it and run the runtime_scales rule again") from None
    if not isinstance(data, dict) or not all(k in data for k in ("clamp", "shadow", "macs", "cpu_cap")):
        raise PipelineError(f"{path}: expected keys clamp, shadow, macs and cpu_cap (written by the runtime_scales "
                            "rule); delete it and run that rule again")
    if data.get("profile") != profile.name:
        raise PipelineError(f"{path}: computed for runtime profile {data.get('profile')!r}, not {profile.name!r}; "
                            "delete it and run the runtime_scales rule again")
    return data


def layer_ratios(act_scales: dict, profile: RuntimeProfile, layers: list[str], statistic: str = "absmax") -> dict:
    """{layer index: max over its shadow-role sides of max / 99.9 % quantile}."""
    ori_key, top_key = STAT_KEYS[statistic]
    ratios = {}
    for layer in layers:
        index = layer_index(layer)
        if layer_role(layer) != profile.shadow_role or index is None:
            continue
        try:
            ratio = max(float(act_scales[ori_key][layer][side]) / float(act_scales[top_key][layer][side])
                        for side in ("input", "output"))
        except (KeyError, ZeroDivisionError, TypeError, ValueError):
            raise PipelineError(f"act_scales.json: no usable {statistic} statistics for {layer}; profile again") from None
        ratios[index] = ratio
    return ratios


def shadow_layers_of_point(point: str, act_scales: dict, profile: RuntimeProfile, layers: list[str],
                           ranking: list[str] | None = None) -> frozenset[int]:
    """The shadow layers of a runtime point (see the module docstring)."""
    statistic, rule, value = parse_point(point)
    if statistic != "absmax":
        raise PipelineError(f"point '{point}': runtime profile '{profile.name}' uses the absmax statistic "
                            "(signed is the original tools' statistic, for runtime.profile ideal)")
    if rule == "ratio":
        # Shadow when not (top * t > max), i.e. max / top >= t: the original rule, at the layer level.
        return frozenset(i for i, ratio in layer_ratios(act_scales, profile, layers).items() if ratio >= value)
    if rule != "layers":
        raise PipelineError(f"point '{point}' chooses shadow sides, which runtime profile '{profile.name}' cannot "
                            "run; use absmax-l<k> (k shadow layers) or absmax-t<t>")
    if value == 0:
        return frozenset()  # absmax-l0: no shadow layer, no ranking needed
    if ranking is None:
        raise PipelineError(f"point '{point}' needs the layer ranking (sensitivity.csv); none was given")
    # A k beyond the model's layers takes them all (the sweep table's num_shadow_layers says how many).
    indices = [layer_index(layer) for layer in ranking[:int(value)]]
    if any(i is None for i in indices):
        raise PipelineError("the layer ranking names modules outside the decoder layers; run sensitivity again")
    return frozenset(indices)


def shadow_fraction(scales: dict, layer: str, num_shadow_sides: int) -> float:
    """The fraction of one shadow side's elements that may go beyond int8 under the point's cap."""
    total = sum(scales["macs"].values())
    return float(scales["cpu_cap"]) * total / (num_shadow_sides * scales["macs"][layer])


def shadow_range(scales: dict, layer: str, side: str, fraction: float) -> float:
    """The smallest tabulated range that leaves at most `fraction` of the side's elements beyond it."""
    try:
        ranges = scales["shadow"][layer][side]["ranges"]
    except KeyError:
        raise PipelineError(f"runtime_scales.json has no shadow ranges for {layer} {side}; run runtime_scales again") from None
    fractions = scales["shadow_fractions"]
    allowed = [r for f, r in zip(fractions, ranges) if f <= fraction]
    return min(allowed)


def runtime_decisions(act_scales: dict, scales: dict, profile: RuntimeProfile, layers: list[str],
                      shadow_layers: frozenset[int]) -> dict[str, LayerQuant]:
    """Per Linear: clamped ranges from runtime_scales.json; shadow ranges and clip flags 0 for the
    shadow role of the shadow layers."""
    missing = [layer for layer in layers if layer not in scales["clamp"]]
    if missing:
        raise PipelineError(f"runtime_scales.json has no ranges for {', '.join(missing[:3])}; it belongs to another "
                            "model: run the runtime_scales rule again")
    shadow_sides = 2 * len(shadow_layers)
    decisions = {}
    for layer in layers:
        clamp = scales["clamp"][layer]
        if profile.can_shadow(layer, shadow_layers):
            fraction = shadow_fraction(scales, layer, shadow_sides)
            decisions[layer] = LayerQuant(shadow_range(scales, layer, "input", fraction),
                                          shadow_range(scales, layer, "output", fraction), False, False)
        else:
            # An fp16 quantizer cannot use a range whose step's reciprocal overflows fp16 (runtime.SideSpec).
            floor = profile.spec(layer).input.min_range
            decisions[layer] = LayerQuant(max(float(clamp["input"]["scale"]), floor), float(clamp["output"]["scale"]),
                                          True, True)
    return decisions


def point_label_layers(k: int) -> str:
    return f"absmax-l{int(k)}"
