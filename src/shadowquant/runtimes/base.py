"""The runtime as the seam: one interface every stage calls, whatever runtime profile is simulated.

A `Runtime` wraps one profile of runtimes.profiles.PROFILES (the data) and answers, for the workflow and the
stages, everything that differs between the idealized W8A8 (runtimes/ideal.py) and the NPU profiles
(runtimes/npu.py): the sweep's point labels for a config, whether a point suits it, the decisions of a
point, the simulation applied to a model (from scales and from an export), the export tensors, the
ranking stage and the reports' wording. Callers take a runtime from `get_runtime` (by profile name) or
`runtime_of` (from a record that names it: a sweep row, runtime.json, export metadata) and never ask
which one it is (as torchao's `quantize_(model, config)` dispatches to one handler per config type).

This module and the implementations import no torch at import time: the Snakefile uses them while it
is parsed; the methods that run models import torch-using modules inside.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

from shadowquant.runtimes.decision import LayerQuant, read_clip_scales, read_ranking, shadow_summary
from shadowquant.errors import PipelineError
from shadowquant.runtimes.profiles import RuntimeProfile

# Which parts of every quantized Linear are quantized, for the error breakdown.
PARTS = {
    "all": dict(quantize_weights=True, quantize_inputs=True, quantize_outputs=True),
    "weights": dict(quantize_weights=True, quantize_inputs=False, quantize_outputs=False),
    "inputs": dict(quantize_weights=False, quantize_inputs=True, quantize_outputs=False),
    "outputs": dict(quantize_weights=False, quantize_inputs=False, quantize_outputs=True),
}


def part_switches(part: str) -> dict:
    """The quantize_* switches of a breakdown part ('all' quantizes everything)."""
    if part not in PARTS:
        raise PipelineError(f"unknown breakdown part '{part}'; valid: {', '.join(PARTS)}")
    return PARTS[part]


class DecisionSources:
    """The files a point's decisions may read (sensitivity.csv, clip_scales.json, runtime_scales.json),
    each read once, when a point first needs it."""

    def __init__(self, sensitivity: str | Path | None = None, clip_scales: str | Path | None = None,
                 runtime_scales: str | Path | None = None):
        self.sensitivity = sensitivity
        self.clip_scales = clip_scales
        self.runtime_scales = runtime_scales
        self.read: dict = {}

    def once(self, key, read):
        """`read()`, called the first time `key` is asked for; its value after that."""
        if key not in self.read:
            self.read[key] = read()
        return self.read[key]

    def ranking(self, statistic: str) -> list[tuple[str, str]] | None:
        """The (layer, side) pairs of sensitivity.csv for `statistic`, or None without the file."""
        if self.sensitivity is None:
            return None
        return self.once(("ranking", statistic), lambda: read_ranking(self.sensitivity, statistic))

    def clips(self, statistic: str) -> dict | None:
        """The MSE clip scales of clip_scales.json for `statistic`, or None without the file."""
        if self.clip_scales is None:
            return None
        return self.once(("clips", statistic), lambda: read_clip_scales(self.clip_scales, statistic))


@dataclass(frozen=True)
class PointPlan:
    """A point's decisions: per Linear its ranges and clip flags, and the runtime's shadow layers (a set of
    decoder layer indices) where the runtime has them, else None."""

    point: str
    statistic: str
    rule: str
    value: float
    decisions: dict[str, LayerQuant]
    shadow_layers: frozenset[int] | None = None

    @property
    def threshold(self) -> float | None:
        return self.value if self.rule == "ratio" else None

    def summary(self, layers: list[str]) -> dict:
        """decision.shadow_summary of the named Linears (threshold null but for a ratio point)."""
        return shadow_summary({n: self.decisions[n] for n in layers}, self.threshold, self.statistic)

    def counts(self, layers: list[str]) -> dict:
        """The shadow sides' counts, as the sweep tables them (threshold NaN but for a ratio point)."""
        return shadow_summary({n: self.decisions[n] for n in layers},
                              self.value if self.rule == "ratio" else math.nan, self.statistic)


class Runtime(ABC):
    """One runtime profile as the stages see it; runtimes/ideal.py and runtimes/npu.py implement it."""

    # The unit a point shadows: "sides" (any Linear side) or "layers" (decoder layers).
    shadow_unit = ""
    # Whether the runtime's ranges come from runtime_scales.json (the runtime_scales rule).
    needs_runtime_scales = False
    # Whether a phone runs what this runtime simulates (the phone bundle can be built for it).
    runs_on_phone = True

    def __init__(self, profile: RuntimeProfile):
        self.profile = profile

    @property
    def name(self) -> str:
        return self.profile.name

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    # ---------------------------------------------------------------- the config and the sweep (no torch)

    @abstractmethod
    def check_config(self, statistics, export_point: str, source: str) -> None:
        """Refuse sweep statistics and an export point this runtime cannot run, before any work."""
        raise NotImplementedError

    @abstractmethod
    def check_point(self, point: str) -> None:
        """Refuse a point this runtime cannot run (a one-line error says what it can)."""
        raise NotImplementedError

    @abstractmethod
    def breakdown_statistic(self, statistics) -> str:
        """The statistic of the error breakdown, among the swept `statistics`."""
        raise NotImplementedError

    @abstractmethod
    def breakdown_point(self, statistic: str) -> str:
        """The point the error breakdown splits into weights, inputs and outputs."""
        raise NotImplementedError

    def sweep_thresholds(self, sweep: dict) -> list[float]:
        """The ratio-rule thresholds swept for the config's `sweep` section."""
        return sorted({float(t) for t in sweep["thresholds"]})

    @abstractmethod
    def sweep_labels(self, sweep: dict, export_point: str) -> list[str]:
        """The sorted point labels of the sweep for the config's `sweep` section (an explicit export point
        is always among them)."""
        raise NotImplementedError

    def require_phone(self, what: str) -> None:
        """Refuse to build something for a phone (`what` says what and from where) when no phone runs this
        runtime (`runs_on_phone`)."""
        if not self.runs_on_phone:
            raise PipelineError(f"{what}: runtime.profile is '{self.name}', which no phone runs; it needs an NPU "
                                "profile (qwen-npu, qwen-npu-rotated or phonelm-npu) and a family mllm has an NPU "
                                "model for")

    # ---------------------------------------------------------------- decisions (no torch)

    @abstractmethod
    def decide(self, act_scales: dict, point: str, layers: list[str], sources: DecisionSources,
               source: str = "act_scales.json") -> PointPlan:
        """The decisions of `point` for the named Linears."""
        raise NotImplementedError

    # ---------------------------------------------------------------- the simulation and the export (torch)

    @abstractmethod
    def apply(self, model, plan: PointPlan, layers: list[str], part: str = "all", weight_range="max"):
        """Replace the named Linears of `model` in place by this runtime's simulation of `plan`; returns the
        CPU counter where the runtime measures one, else None."""
        raise NotImplementedError

    @abstractmethod
    def apply_from_export(self, model, tensors: dict, layers: list[str], meta: dict):
        """The simulation rebuilt out of the int8 export itself (its tensors and metadata)."""
        raise NotImplementedError

    @abstractmethod
    def export_layers(self, model, family: str) -> list[str]:
        """The Linears the int8 export writes scales for."""
        raise NotImplementedError

    @abstractmethod
    def export_tensors(self, model, plan: PointPlan, layers: list[str], weight_range="max") -> tuple[dict, bool]:
        """(the export's tensors, whether the model's lm_head is tied to its embeddings)."""
        raise NotImplementedError

    def export_metadata(self, plan: PointPlan) -> dict[str, str]:
        """What the export's metadata says beyond the point (e.g. the shadow layers)."""
        return {}

    def export_summary(self, plan: PointPlan, layers: list[str]) -> dict:
        """The shadow summary (shadow.json) of an exported point."""
        return plan.summary(layers)

    def plan_note(self, plan: PointPlan) -> str:
        """What a log line adds about a plan (e.g. ', shadow layers [1, 3]')."""
        return ""

    @abstractmethod
    def describe(self, model, plan: PointPlan, tied: bool, point: str, variant: str) -> dict:
        """runtime.json: the runtime a model file is for and what its C++ model must be built with."""
        raise NotImplementedError

    # ---------------------------------------------------------------- the sweep's evaluation (torch)

    def progress_label(self, label: str) -> str:
        return label

    @abstractmethod
    def point_record(self, plan: PointPlan, layers: list[str], model, counter, part: str, weight_range) -> dict:
        """A sweep point's fields beside its metrics (the columns of sweep.csv this runtime fills)."""
        raise NotImplementedError

    @abstractmethod
    def log_point(self, log, label: str, metrics: dict) -> None:
        raise NotImplementedError

    @abstractmethod
    def rank(self, manifest, samples, act_scales, out_csv, num_samples: int, seq_len: int, *, statistics,
             measure_top: int, measure_samples: int, cost: str, runtime_scales=None, device: str = "auto",
             dtype: str = "auto", weight_range="max") -> list[dict]:
        """sensitivity.csv: the ranking the runtime's sensitivity points take their shadows from."""
        raise NotImplementedError

    # ---------------------------------------------------------------- reports (no torch)

    @abstractmethod
    def selection_cost(self, row: dict, loss: float) -> tuple:
        """The device cost of a sweep row, for the selection's ordering (cheapest first)."""
        raise NotImplementedError

    @abstractmethod
    def selection_reason(self, best: dict, within: int, candidates: int, loss_description: str,
                         budget: float) -> str:
        raise NotImplementedError

    @abstractmethod
    def selection_fields(self, row: dict) -> dict:
        """selection.json's runtime fields of the chosen row."""
        raise NotImplementedError

    @abstractmethod
    def cost_note(self, selection: dict) -> str:
        """The selected point's device cost, for the report's figures."""
        raise NotImplementedError

    @abstractmethod
    def shadow_line(self, row: dict) -> str:
        """The final evaluation's line on what runs on the CPU for the exported point's sweep row."""
        raise NotImplementedError

    def comparison_cost(self, row: dict) -> str:
        """The selected point's shadow cost in a row of the transform comparison (transforms.md)."""
        return f"{row['selected_sides']}"

    def cost_column(self, points) -> tuple[str, str]:
        """(sweep.csv column, axis label) of the device cost the sweep plot draws against."""
        if "shadow_flop_fraction" in points.columns and points["shadow_flop_fraction"].notna().all():
            return "shadow_flop_fraction", "share of quantized Linear FLOPs with a CPU shadow"
        return "num_shadow_sides", "shadow sides (Linear inputs/outputs with CPU shadow execution)"


def number(value) -> float | None:
    """A table cell as a float; None for empty, NaN or not a number."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value
