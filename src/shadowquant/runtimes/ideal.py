"""The idealized W8A8 of the original profiling tools (runtime profile `ideal`): every Linear int8, any
side a shadow side restored exactly; no phone runs it. A point is the ratio rule at a threshold
("signed-t152") or the k most valuable shadow sides of the sensitivity ranking ("absmax-k15"), either
optionally clipping the other sides at their MSE-optimal scale ("-mse")."""

from __future__ import annotations

import math

from shadowquant.runtimes.decision import (LayerQuant, decide, decide_shadow_set, parse_point, point_clip,
                                  point_label)
from shadowquant.errors import PipelineError
from shadowquant.runtimes.base import DecisionSources, PointPlan, Runtime, number, part_switches


def point_decisions(act_scales: dict, point: str, layers: list[str] | None = None, ranking=None,
                    source: str = "act_scales.json", clip_scales: dict | None = None) -> dict[str, LayerQuant]:
    """Decisions of a sweep point: the ratio rule at t, or the first k sides of `ranking` shadowed; a '-mse'
    point clips the other sides at `clip_scales` (MSE-optimal) instead of their maximum."""
    statistic, rule, value = parse_point(point)
    if point_clip(point) == "mse":
        if clip_scales is None:
            raise PipelineError(f"point '{point}' needs the MSE clip scales (clip_scales.json); none were given")
    else:
        clip_scales = None
    if rule == "ratio":
        decisions = decide(act_scales, value, statistic, layers=layers, source=source)
        if clip_scales is None:
            return decisions
        shadow = [(n, side) for n, q in decisions.items() for side, clip in (("input", q.clip_input),
                                                                              ("output", q.clip_output)) if not clip]
        return decide_shadow_set(act_scales, statistic, shadow, layers=layers, source=source, clip_scales=clip_scales)
    unfit = IdealRuntime.unfit(point)
    if unfit:
        raise PipelineError(f"point '{point}' {unfit}")
    if ranking is None:
        raise PipelineError(f"point '{point}' needs the sensitivity ranking (sensitivity.csv); none was given")
    k = int(value)
    if k > len(ranking):
        raise PipelineError(f"point '{point}' asks for {k} shadow sides but the ranking has only {len(ranking)}; "
                            "lower sweep.shadow_sides")
    return decide_shadow_set(act_scales, statistic, ranking[:k], layers=layers, source=source,
                             clip_scales=clip_scales)


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


class IdealRuntime(Runtime):
    shadow_unit = "sides"
    runs_on_phone = False

    @staticmethod
    def unfit(point: str) -> str:
        """Why this runtime cannot run `point` ("" when it can)."""
        if parse_point(point)[1] == "layers":
            return ("is a set of shadow layers, which only an NPU runtime profile runs; under runtime.profile ideal "
                    "use absmax-k<sides> or absmax-t<threshold>")
        return ""

    def check_config(self, statistics, export_point: str, source: str) -> None:
        if export_point != "auto" and self.unfit(export_point):
            raise PipelineError(f"{source}: export.point = {export_point!r} {self.unfit(export_point)}")

    def check_point(self, point: str) -> None:
        if self.unfit(point):
            raise PipelineError(f"point '{point}' {self.unfit(point)}")

    def breakdown_statistic(self, statistics) -> str:
        statistics = sorted(statistics)
        return "absmax" if "absmax" in statistics else statistics[0]

    def breakdown_point(self, statistic: str) -> str:
        # Every side shadowed (t = 1): the original tools' view of the W8A8 error.
        return point_label(statistic, "ratio", 1)

    def sweep_thresholds(self, sweep: dict) -> list[float]:
        # The breakdown's point (t = 1) is a sweep point: evaluated with it.
        return sorted({float(t) for t in sweep["thresholds"]} | ({1.0} if sweep["breakdown"] else set()))

    def sweep_labels(self, sweep: dict, export_point: str) -> list[str]:
        statistics = sorted(sweep["statistics"])
        clips = sweep["clip_scales"]
        return sorted(
            {point_label(s, "ratio", t, c) for s in statistics for t in self.sweep_thresholds(sweep) for c in clips
             # At t <= 1 no side is clipped: the '-mse' point would repeat the 'max' one.
             if c == "max" or t > 1}
            | {point_label(s, "sensitivity", k, c) for s in statistics for k in sorted(set(sweep["shadow_sides"]))
               for c in clips}
            | ({export_point} if export_point != "auto" else set()))

    def decide(self, act_scales: dict, point: str, layers: list[str], sources: DecisionSources,
               source: str = "act_scales.json") -> PointPlan:
        statistic, rule, value = parse_point(point)
        ranking = sources.ranking(statistic) if rule == "sensitivity" else None
        clips = sources.clips(statistic) if point_clip(point) == "mse" else None
        decisions = point_decisions(act_scales, point, layers=layers, ranking=ranking, source=source,
                                    clip_scales=clips)
        return PointPlan(point, statistic, rule, value, decisions)

    def apply(self, model, plan: PointPlan, layers: list[str], part: str = "all", weight_range="max"):
        from shadowquant.runtimes.fakequant import apply_w8a8

        apply_w8a8(model, plan.decisions, layers, **part_switches(part), weight_range=weight_range)
        return None

    def apply_from_export(self, model, tensors: dict, layers: list[str], meta: dict):
        from shadowquant.runtimes.fakequant import apply_w8a8_from_export

        return apply_w8a8_from_export(model, tensors, layers)

    def export_layers(self, model, family: str) -> list[str]:
        from shadowquant.model.families import linear_layer_names

        return linear_layer_names(model)

    def export_tensors(self, model, plan: PointPlan, layers: list[str], weight_range="max") -> tuple[dict, bool]:
        from shadowquant.export.int8 import int8_state_dict

        return int8_state_dict(model.state_dict(), plan.decisions, layers, weight_range=weight_range), False

    def describe(self, model, plan: PointPlan, tied: bool, point: str, variant: str) -> dict:
        return {"runtime": self.name, "description": self.profile.description, "point": point, "transform": variant,
                "note": "the idealized W8A8 of the original tools: no mllm NPU model runs exactly this file's "
                        "arithmetic; choose an NPU runtime profile (runtime.profile) for a phone"}

    def point_record(self, plan: PointPlan, layers: list[str], model, counter, part: str, weight_range) -> dict:
        from shadowquant.runtimes.fakequant import weight_range_name

        counts = plan.counts(layers)
        return dict(
            point=plan.point, rule=plan.rule, statistic=plan.statistic, clip=point_clip(plan.point), part=part,
            weight_range=weight_range_name(weight_range), threshold=plan.threshold,
            shadow_budget=int(plan.value) if plan.rule == "sensitivity" else None,
            num_shadow_inputs=counts["num_shadow_inputs"], num_shadow_outputs=counts["num_shadow_outputs"],
            num_shadow_sides=counts["num_shadow_sides"],
            shadow_flop_fraction=shadow_flop_fraction(model, layers, plan.decisions), runtime=self.name,
            shadow_inputs=counts["shadow_inputs"], shadow_outputs=counts["shadow_outputs"])

    def log_point(self, log, label: str, metrics: dict) -> None:
        log.info("%s: perplexity %.4f (%+.2f %%), KL %.4f, agreement %.4f, %d shadow sides", label,
                 metrics["perplexity"], 100 * (metrics["perplexity_increase"] or 0.0), metrics["kl"] or 0.0,
                 metrics["agreement"] or 0.0, metrics["num_shadow_sides"])

    def rank(self, manifest, samples, act_scales, out_csv, num_samples: int, seq_len: int, *, statistics,
             measure_top: int, measure_samples: int, cost: str, runtime_scales=None, device: str = "auto",
             dtype: str = "auto", weight_range="max") -> list[dict]:
        from shadowquant.calibrate.sensitivity import sensitivity_stage

        return sensitivity_stage(manifest, samples, act_scales, out_csv, list(statistics), num_samples, seq_len,
                                 measure_top, measure_samples, cost, device=device, dtype=dtype,
                                 weight_range=weight_range)

    def selection_cost(self, row: dict, loss: float) -> tuple:
        return (int(row["num_shadow_sides"]), float(row.get("shadow_flop_fraction") or 0.0), loss, row["point"],
                row["transform"])

    def selection_reason(self, best: dict, within: int, candidates: int, loss_description: str,
                         budget: float) -> str:
        return (f"fewest shadow sides ({int(best['num_shadow_sides'])}) among {within} of {candidates} "
                f"points whose {loss_description} is at most {budget:g}; ties broken by shadow FLOPs, then loss")

    def selection_fields(self, row: dict) -> dict:
        return {"runtime": self.name, "cpu_share": number(row.get("cpu_share")),
                "num_shadow_layers": None if number(row.get("num_shadow_layers")) is None
                else int(number(row.get("num_shadow_layers"))), "shadow_layers": None}

    def cost_note(self, selection: dict) -> str:
        cost = f"{int(selection.get('num_shadow_sides', 0) or 0)} shadow sides"
        flops = number(selection.get("shadow_flop_fraction"))
        if flops is not None and math.isfinite(flops):
            cost += f", {flops:.1%} of Linear FLOPs with a shadow"
        return cost

    def shadow_line(self, row: dict) -> str:
        return (f"Runtime profile ideal (no phone runs it): {int(row['num_shadow_inputs'])} shadow inputs, "
                f"{int(row['num_shadow_outputs'])} shadow outputs; {row['shadow_flop_fraction']:.1%} of quantized "
                "Linear FLOPs need shadow execution.")
