"""Scales chosen for what they cost on the runtime (runtime_scales.json), from calibration records.

- Shadow sides (both sides of the shadow role, down_proj, in a shadow layer): a histogram of |x| over
  the float32 bit patterns' upper 16 bits (relative resolution 2^-7, flat memory) per side gives, for
  a grid of CPU fractions f, the smallest range that leaves at most a fraction f of the elements beyond
  int8. Rare rows (the attention sink) then go to the CPU instead of stretching the scale; which f a
  point may use follows from the CPU-share cap (runtimes/npu.py: shadow_range).
- Clamped int8 sides: the maximum or the MSE-optimal clip, whichever the Fisher estimate of the loss
  (1/2 E[(g . dy)^2] with dy the quantization error of that side and g the gradient of the log-prob of
  tokens drawn from the float model) says costs less; both scored on the same draws. int16 sides keep
  their maximum (their step is 258 times finer; clipping them buys nothing measurable), and a
  quantizer that reads another Linear's scale (k/v/gate inputs) has no choice of its own.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from shadowquant.atomic import write_json
from shadowquant.runtimes.decision import STAT_KEYS
from shadowquant.errors import PipelineError
from shadowquant.runtimes.profiles import RuntimeProfile, get_profile, layer_index, layer_role
from shadowquant.runtimes.runtime_linear import quantize, runtime_step
from shadowquant.calibrate.sensitivity import fisher_pass, histogram_mse_clip, observe_sides

log = logging.getLogger(__name__)

STATISTIC = "absmax"  # symmetric integer ranges want magnitudes
# CPU fractions of a shadow side's elements for which a range is tabulated (0: the maximum).
SHADOW_FRACTIONS = (0.0, 1e-6, 2e-6, 5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2)
PATTERN_BINS = 1 << 15  # upper 16 bits of a non-negative float32
MSE_BINS = 2048


def _pattern_bins(values: torch.Tensor) -> torch.Tensor:
    return values.detach().float().abs().contiguous().view(torch.int32) >> 16


def _bin_upper_edge(index: int) -> float:
    """The largest float32 whose upper 16 bits are `index` (a histogram bin's upper edge)."""
    bits = torch.tensor([(index << 16) | 0xFFFF], dtype=torch.int32)
    return float(bits.view(torch.float32)[0])


def shadow_ranges(counts: torch.Tensor, maximum: float, fractions=SHADOW_FRACTIONS) -> list[float]:
    """For each fraction f, the smallest bin edge with at most f of the elements above it (<= maximum)."""
    total = float(counts.sum())
    if total <= 0:
        raise PipelineError("no calibration elements reached a shadow side")
    above = torch.flip(torch.cumsum(torch.flip(counts.double(), [0]), 0), [0]) - counts.double()  # beyond bin i
    ranges = []
    for f in fractions:
        if f <= 0:
            ranges.append(float(maximum))
            continue
        allowed = f * total
        index = int(torch.nonzero(above <= allowed)[0])
        ranges.append(min(float(maximum), _bin_upper_edge(index)))
    return ranges


def owned_sides(profile: RuntimeProfile, layers: list[str]) -> list[tuple[str, str]]:
    """The (layer, side) quantizers of normal layers that own their scale (no scale_from)."""
    out = []
    for layer in layers:
        spec = profile.spec(layer)
        for side, side_spec in (("input", spec.input), ("output", spec.output)):
            if side_spec.scale_from is None:
                out.append((layer, side))
    return out


def shadow_role_layers(profile: RuntimeProfile, layers: list[str]) -> list[str]:
    """The Linears that can run the shadow op (down_proj of every decoder layer)."""
    return [layer for layer in layers if layer_role(layer) == profile.shadow_role and layer_index(layer) is not None]


def calibration_histograms(model: nn.Module, layers: list[str], sequences: list[list[int]], maxima: dict,
                           int8_sides: list, shadow_layers: list[str], progress: bool = True):
    """One forward per record: linear |x| histograms (MSE clip) of the clamped int8 sides and bit-pattern
    histograms of the shadow sides."""
    linear = {key: torch.zeros(MSE_BINS, dtype=torch.float64) for key in int8_sides}
    pattern = {(layer, side): torch.zeros(PATTERN_BINS, dtype=torch.float64)
               for layer in shadow_layers for side in ("input", "output")}

    def add(key, t):
        if key in linear:
            top = maxima[key]
            values = t.detach().float().abs().flatten()
            linear[key] += torch.histc(values.clamp(max=top), bins=MSE_BINS, min=0.0, max=top).double().cpu()
        if key in pattern:
            pattern[key] += torch.bincount(_pattern_bins(t).flatten(), minlength=PATTERN_BINS)[:PATTERN_BINS].double().cpu()

    wanted = [layer for layer in layers if layer in {key[0] for key in linear} | {key[0] for key in pattern}]
    observe_sides(model, wanted, sequences, add, "runtime scale histograms", progress)
    return linear, pattern


def fisher_scores(model: nn.Module, candidates: dict, sequences: list[list[int]], samples: int = 2, seed: int = 0,
                  progress: bool = True) -> dict:
    """{(layer, side): [score per candidate step]}: the Fisher quadratic form (sensitivity.fisher_pass) of dy,
    the quantization error of that side alone at the candidate step (int8, clamped)."""
    from shadowquant.runtimes.profiles import SideSpec

    spec = SideSpec(bits=8)
    by_layer: dict[str, list] = {}
    for (layer, side), steps in candidates.items():
        by_layer.setdefault(layer, []).append((side, steps))

    def quantization_errors(layer):
        def perturb(module, x, y):
            changes = []
            for side, steps in by_layer[layer]:
                for index, step in enumerate(steps):
                    if side == "input":
                        dx = quantize(x, step, spec) * step - x.float()
                        dy = F.linear(dx, module.weight.float())
                    else:
                        dy = quantize(y, step, spec) * step - y.float()
                    changes.append(((layer, side, index), dy.double()))
            return changes
        return perturb

    keys = [(layer, side, index) for (layer, side), steps in candidates.items() for index in range(len(steps))]
    scores = fisher_pass(model, {layer: quantization_errors(layer) for layer in by_layer}, sequences, samples, seed,
                         keys=keys, desc="Fisher max/mse choice", progress=progress)
    return {(layer, side): [scores[(layer, side, index)] for index in range(len(steps))]
            for (layer, side), steps in candidates.items()}


def runtime_scales(model: nn.Module, layers: list[str], profile: RuntimeProfile, act_scales: dict,
                   calibration: list[list[int]], fisher: list[list[int]], cpu_cap: float,
                   progress: bool = True) -> dict:
    """The content of runtime_scales.json (see the module docstring)."""
    if not profile.roles:
        raise PipelineError(f"runtime scales are for a profile of the runtime's Linear roles; runtime profile "
                            f"'{profile.name}' has none (its '-mse' points use clip_scales)")
    if not (math.isfinite(cpu_cap) and 0 <= cpu_cap < 1):
        raise PipelineError(f"runtime.cpu_cap {cpu_cap!r} must be a fraction in [0, 1)")
    ori_key, _ = STAT_KEYS[STATISTIC]
    try:
        maxima = {(layer, side): float(act_scales[ori_key][layer][side]) for layer in layers
                  for side in ("input", "output")}
    except KeyError as exc:
        raise PipelineError(f"act_scales.json has no {STATISTIC} maximum for {exc}; profile this model again") from None
    owned = owned_sides(profile, layers)
    int8_owned = [key for key in owned if (profile.spec(key[0]).input if key[1] == "input"
                                           else profile.spec(key[0]).output).bits == 8]
    shadow_layers = shadow_role_layers(profile, layers)
    linear, pattern = calibration_histograms(model, layers, calibration, maxima, int8_owned, shadow_layers,
                                             progress)
    mse = {key: histogram_mse_clip(counts, maxima[key]) for key, counts in linear.items()}
    candidates = {key: [runtime_step(maxima[key], 8), runtime_step(mse[key], 8)] for key in int8_owned
                  if mse[key] < maxima[key]}
    scores = fisher_scores(model, candidates, fisher, progress=progress) if candidates else {}
    clamp: dict = {}
    for layer in layers:
        spec = profile.spec(layer)
        for side, side_spec in (("input", spec.input), ("output", spec.output)):
            key = (layer, side)
            entry = {"max": maxima[key]}
            if side_spec.scale_from is not None:
                entry.update(choice="shared", scale=maxima[key], shared_with=list(side_spec.scale_from))
            elif side_spec.bits != 8:
                entry.update(choice=f"int{side_spec.bits}", scale=maxima[key])
            elif key not in scores:
                entry.update(choice="max", scale=maxima[key], mse=mse[key])
            else:
                at_max, at_mse = scores[key]
                choice = "mse" if at_mse < at_max else "max"
                entry.update(choice=choice, scale=mse[key] if choice == "mse" else maxima[key], mse=mse[key],
                             fisher_max=at_max, fisher_mse=at_mse)
            clamp.setdefault(layer, {})[side] = entry
    shadow = {}
    for layer in shadow_layers:
        shadow[layer] = {side: {"elements": float(pattern[(layer, side)].sum()),
                                "ranges": shadow_ranges(pattern[(layer, side)], maxima[(layer, side)])}
                         for side in ("input", "output")}
    macs = {layer: model.get_submodule(layer).in_features * model.get_submodule(layer).out_features
            for layer in layers}
    chosen = sum(1 for sides in clamp.values() for entry in sides.values() if entry["choice"] == "mse")
    log.info("%s: %d clamped int8 sides scored, %d take the MSE clip; shadow ranges for %d down_proj layers",
             profile.name, len(candidates), chosen, len(shadow))
    return {"profile": profile.name, "statistic": STATISTIC, "cpu_cap": cpu_cap,
            "shadow_fractions": list(SHADOW_FRACTIONS), "clamp": clamp, "shadow": shadow, "macs": macs,
            "num_calibration_records": len(calibration), "num_fisher_records": len(fisher)}


def runtime_scales_stage(manifest, samples, act_scales, out_json, profile: str, cpu_cap: float, num_samples: int,
                         seq_len: int, fisher_samples: int, fisher_seq_len: int, device: str = "auto",
                         dtype: str = "auto") -> dict:
    """runtime_scales.json from the first `num_samples` calibration records (histograms) and the first
    `fisher_samples` (the Fisher max/mse choice)."""
    from shadowquant.calibrate.sensitivity import stage_inputs

    model, calibration, layers, scales = stage_inputs(manifest, samples, act_scales, num_samples, seq_len, device,
                                                       dtype)
    runtime = get_profile(profile, scales.get("meta", {}).get("family"))
    fisher = [seq[:fisher_seq_len] for seq in calibration[:fisher_samples]]
    result = runtime_scales(model, layers, runtime, scales, calibration, fisher, cpu_cap)
    write_json(out_json, result)
    return result
