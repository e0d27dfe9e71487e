"""The NPU runtime profiles (qwen-npu, qwen-npu-rotated, phonelm-npu): a point is a set of shadow layers.

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

import contextlib
import copy
import json
import logging
from pathlib import Path

from shadowquant.runtimes.decision import STAT_KEYS, LayerQuant, parse_point, point_clip, point_label
from shadowquant.errors import PipelineError
from shadowquant.runtimes.profiles import SHADOW_MAX_POSITIONS, RuntimeProfile, cpp_config, get_profile, layer_index, layer_role
from shadowquant.runtimes.base import DecisionSources, PointPlan, Runtime, number, part_switches

log = logging.getLogger(__name__)


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


def point_unfit(point: str, profile: RuntimeProfile) -> str:
    """Why an NPU profile cannot run `point` ("" when it can): it shadows layers by the absmax statistic."""
    statistic, rule, _ = parse_point(point)
    fix = "use absmax-l<shadow layers> or absmax-t<threshold>"
    if statistic != "absmax":
        return (f"uses the {statistic} statistic, which runtime.profile {profile.name!r} does not use (signed is the "
                f"original tools' statistic, for runtime.profile ideal); {fix}")
    if rule == "sensitivity" or point_clip(point) == "mse":
        return (f"chooses shadow sides or MSE clips, a point of runtime.profile ideal that runtime.profile "
                f"{profile.name!r} cannot run; {fix}")
    return ""


def shadow_layers_of_point(point: str, act_scales: dict, profile: RuntimeProfile, layers: list[str],
                           ranking: list[str] | None = None) -> frozenset[int]:
    """The shadow layers of a runtime point (see the module docstring)."""
    statistic, rule, value = parse_point(point)
    unfit = point_unfit(point, profile)
    if unfit:
        raise PipelineError(f"point '{point}' {unfit}")
    if rule == "ratio":
        # Shadow when not (top * t > max), i.e. max / top >= t: the original rule, at the layer level.
        return frozenset(i for i, ratio in layer_ratios(act_scales, profile, layers).items() if ratio >= value)
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


# ---------------------------------------------------------------- the layer ranking (sensitivity.csv)


def first_changed_layer(decisions: dict, base: dict, layers: list[str], profile, shadow: frozenset) -> int:
    """The first decoder layer whose simulation differs between the no-shadow decisions `base` and `decisions`
    of the shadow set `shadow`: a shadow layer changes itself and the layers after it (their input norm and
    the Linears' specs), never an earlier one; a changed decision or spec of an earlier Linear counts too."""
    changed = [layer_index(name) for name in layers
               if decisions[name] != base[name] or profile.spec(name, shadow) != profile.spec(name, frozenset())]
    return min([*shadow, *(i for i in changed if i is not None)])


class LayerReplay:
    """Records the output of every decoder layer of the no-shadow run, batch by batch; a later run with a
    shadow set that leaves layers 0..start-1 as they were skips them: layer start-1 returns its recorded
    output, the earlier ones their input. The layers from `start` on compute from the same bits as a full
    forward would give them, so the logits and the CPU counts of those layers are the full run's."""

    def __init__(self, model):
        from shadowquant.runtimes.runtime_linear import decoder_layers

        self.layers = [layer for _, layer in sorted(decoder_layers(model), key=lambda item: item[0])]
        self.outputs: list[list] = [[] for _ in self.layers]

    @contextlib.contextmanager
    def record(self):
        """Context: every decoder layer's output is kept, in call order."""
        handles = [layer.register_forward_hook(lambda module, args, output, i=i: self.outputs[i].append(output))
                   for i, layer in enumerate(self.layers)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @contextlib.contextmanager
    def skip_before(self, start: int):
        """Context: layers 0..start-1 replay the recorded run (start 0: nothing is skipped)."""
        if start <= 0:
            yield
            return
        recorded = iter(self.outputs[start - 1])
        for layer in self.layers[:start - 1]:
            layer.forward = lambda hidden_states, *args, **kwargs: hidden_states
        self.layers[start - 1].forward = lambda *args, **kwargs: next(recorded)
        try:
            yield
            if next(recorded, None) is not None:
                raise PipelineError("the layer ranking ran fewer batches than the recorded run; run it again")
        finally:
            for layer in self.layers[:start]:
                del layer.forward  # the class's forward again


def layer_ranking(model, layers: list[str], sequences: list[list[int]], act_scales: dict,
                  runtime_scales: dict, profile, batch_size: int = 4, weight_range="max",
                  progress: bool = True, replay: bool = True) -> list[dict]:
    """Rows of sensitivity.csv under an NPU runtime profile, one per shadow-capable layer, ranked.

    The model is simulated with no shadow layer, then with each layer alone as the shadow layer (its
    down_proj shadow op at the one-layer share of the CPU cap); the benefit is the measured decrease of
    KL to float, the cost the measured CPU share, both on the given calibration records. With `replay`
    (LayerReplay) a shadow layer's run starts at that layer from the no-shadow run's recorded outputs:
    the same numbers at about half the work (a test compares it with full runs).
    """
    from tqdm import tqdm

    from shadowquant.runtimes.runtime_linear import apply_runtime, reconfigure
    from shadowquant.calibrate.sensitivity import compare_to_reference, reference_logprobs

    reference = reference_logprobs(model, sequences, batch_size, progress)
    quantized = copy.deepcopy(model)
    none = runtime_decisions(act_scales, runtime_scales, profile, layers, frozenset())
    counter = apply_runtime(quantized, none, layers, profile, frozenset(), weight_range=weight_range)
    recorder = LayerReplay(quantized)
    with recorder.record() if replay else contextlib.nullcontext():
        base = compare_to_reference(quantized, sequences, reference, batch_size).summary()
    # Every shadow set runs the same Linears on the same positions: the no-shadow run's total is each run's.
    total = counter.total_macs
    ratios = layer_ratios(act_scales, profile, layers)
    shadow_layer_names = {layer_index(layer): layer for layer in layers
                          if layer_index(layer) in ratios and layer.endswith(f".{profile.shadow_role}")}
    total_macs = sum(model.get_submodule(layer).in_features * model.get_submodule(layer).out_features
                     for layer in layers)
    rows = []
    for index in tqdm(sorted(ratios), desc="layer ranking", unit="layer", disable=not progress):
        shadow = frozenset({index})
        decisions = runtime_decisions(act_scales, runtime_scales, profile, layers, shadow)
        reconfigure(quantized, decisions, layers, profile, shadow)
        counter.shadow_macs = counter.total_macs = counter.input_outliers = counter.output_outliers = 0
        start = first_changed_layer(decisions, none, layers, profile, shadow) if replay else 0
        with recorder.skip_before(start):
            measured = compare_to_reference(quantized, sequences, reference, batch_size).summary()
        layer = shadow_layer_names[index]
        module = model.get_submodule(layer)
        rows.append({"layer": layer, "side": "layer", "statistic": "absmax", "ratio": ratios[index],
                     "clip_scale": none[layer].input_scale, "shadow_scale": decisions[layer].input_scale,
                     "cost": counter.shadow_macs / total if total else 0.0,
                     "flop_share": module.in_features * module.out_features / total_macs,
                     "proxy_kl": None, "delta_kl": base["kl"] - measured["kl"],
                     "delta_nll": base["nll"] - measured["nll"], "benefit": base["kl"] - measured["kl"]})
    reconfigure(quantized, none, layers, profile, frozenset())
    rows.sort(key=lambda row: (-row["benefit"], row["cost"], row["layer"]))
    for rank, row in enumerate(rows, start=1):
        row["rank"] = rank
    log.info("%s: no shadow layer KL %.4f; best single shadow layer %s lowers it by %.4f", profile.name, base["kl"],
             rows[0]["layer"] if rows else "-", rows[0]["benefit"] if rows else 0.0)
    return rows


def layer_sensitivity_stage(manifest, samples, act_scales, runtime_scales, out_csv, profile: str, num_samples: int,
                            seq_len: int, batch_size: int = 4, device: str = "auto", dtype: str = "auto",
                            weight_range="max") -> list[dict]:
    """sensitivity.csv under an NPU runtime profile: the measured layer ranking (layer_ranking)."""
    from shadowquant.calibrate.sensitivity import stage_inputs, write_sensitivity_table

    model, sequences, layers, scales = stage_inputs(manifest, samples, act_scales, num_samples, seq_len, device,
                                                     dtype)
    runtime = get_profile(profile, scales.get("meta", {}).get("family"))
    rows = layer_ranking(model, layers, sequences, scales, read_runtime_scales(runtime_scales, runtime), runtime,
                         batch_size=batch_size, weight_range=weight_range)
    write_sensitivity_table(out_csv, rows)
    return rows


class NpuRuntime(Runtime):
    shadow_unit = "layers"
    needs_runtime_scales = True

    def check_config(self, statistics, export_point: str, source: str) -> None:
        if "signed" in statistics:
            raise PipelineError(f"{source}: sweep.statistics = {statistics} includes 'signed', which only "
                                f"runtime.profile ideal sweeps; runtime.profile {self.name!r} needs [absmax]")
        if export_point != "auto" and point_unfit(export_point, self.profile):
            raise PipelineError(f"{source}: export.point = {export_point!r} {point_unfit(export_point, self.profile)}")

    def check_point(self, point: str) -> None:
        unfit = point_unfit(point, self.profile)
        if unfit:
            raise PipelineError(f"point '{point}' {unfit}")

    def breakdown_statistic(self, statistics) -> str:
        return "absmax"

    def breakdown_point(self, statistic: str) -> str:
        # The runtime with no shadow layer: the plain configuration every shadow layer is measured against.
        return point_label("absmax", "layers", 0)

    def sweep_labels(self, sweep: dict, export_point: str) -> list[str]:
        # Clamped ranges come from runtime_scales.json (max or MSE per side): no '-mse' twins.
        return sorted(
            {point_label("absmax", "ratio", t) for t in self.sweep_thresholds(sweep)}
            | {point_label("absmax", "layers", k) for k in sorted(set(sweep["shadow_layers"]))}
            # No shadow layer: the runtime's plain configuration, the zero-cost point every sweep has.
            | {point_label("absmax", "layers", 0)}
            | ({export_point} if export_point != "auto" else set()))

    def decide(self, act_scales: dict, point: str, layers: list[str], sources: DecisionSources,
               source: str = "act_scales.json") -> PointPlan:
        statistic, rule, value = parse_point(point)
        ranking = ([layer for layer, _ in sources.ranking("absmax")]
                   if rule == "layers" and sources.sensitivity is not None else None)
        shadow = shadow_layers_of_point(point, act_scales, self.profile, layers, ranking)
        if sources.runtime_scales is None:
            raise PipelineError(f"runtime profile '{self.name}' needs runtime_scales.json (the runtime_scales rule or "
                                "command); none was given")
        scales = sources.once("runtime_scales", lambda: read_runtime_scales(sources.runtime_scales, self.profile))
        return PointPlan(point, statistic, rule, value,
                         runtime_decisions(act_scales, scales, self.profile, layers, shadow), shadow)

    def apply(self, model, plan: PointPlan, layers: list[str], part: str = "all", weight_range="max"):
        from shadowquant.runtimes.runtime_linear import apply_runtime

        return apply_runtime(model, plan.decisions, layers, self.profile, plan.shadow_layers,
                             weight_range=weight_range, **part_switches(part))

    def apply_from_export(self, model, tensors: dict, layers: list[str], meta: dict):
        from shadowquant.runtimes.runtime_linear import apply_runtime_from_export

        shadow = {int(i) for i in meta.get("shadow_layers", "").split()}
        return apply_runtime_from_export(model, tensors, layers, self.profile, shadow)

    def export_layers(self, model, family: str) -> list[str]:
        from shadowquant.model.families import quantized_layer_names

        return quantized_layer_names(model, family)

    def export_tensors(self, model, plan: PointPlan, layers: list[str], weight_range="max") -> tuple[dict, bool]:
        from shadowquant.export.int8 import runtime_state_dict

        head, embed = model.get_output_embeddings(), model.get_input_embeddings()
        tied = head is not None and head.weight.data_ptr() == embed.weight.data_ptr()
        return runtime_state_dict(model.state_dict(), plan.decisions, layers, self.profile, plan.shadow_layers,
                                  weight_range, tied), tied

    def export_metadata(self, plan: PointPlan) -> dict[str, str]:
        return {"shadow_layers": " ".join(str(i) for i in sorted(plan.shadow_layers))}

    def export_summary(self, plan: PointPlan, layers: list[str]) -> dict:
        summary = plan.summary(layers)
        summary["shadow_layers"] = sorted(plan.shadow_layers)
        return summary

    def plan_note(self, plan: PointPlan) -> str:
        return f", shadow layers {sorted(plan.shadow_layers)}"

    def describe(self, model, plan: PointPlan, tied: bool, point: str, variant: str) -> dict:
        profile = self.profile
        config = cpp_config(model.config, profile, tied)
        config["shadow_layers"] = sorted(plan.shadow_layers)
        return {
            "runtime": profile.name, "description": profile.description, "cpp_model": profile.cpp_model,
            "point": point, "transform": variant, "shadow_layers": sorted(plan.shadow_layers),
            "shadow_layers_go_to": profile.shadow_set_location,
            "chunk_size": 128, "max_chunk_size": SHADOW_MAX_POSITIONS,
            "chunk_note": f"prefill in chunks of at most {SHADOW_MAX_POSITIONS} positions (the shadow op's buffers)",
            "cpp_config": config,
            **({"mllm_v1_blocker": profile.mllm_v1_blocker} if profile.mllm_v1_blocker else {}),
        }

    def progress_label(self, label: str) -> str:
        return f"{label} ({self.name})"

    def point_record(self, plan: PointPlan, layers: list[str], model, counter, part: str, weight_range) -> dict:
        from shadowquant.runtimes.fakequant import weight_range_name

        counts = plan.counts(layers)
        shadow = plan.shadow_layers
        return dict(
            point=plan.point, runtime=self.name, rule=plan.rule, statistic=plan.statistic, clip="runtime", part=part,
            weight_range=weight_range_name(weight_range), threshold=plan.threshold,
            shadow_budget=int(plan.value) if plan.rule == "layers" else None, num_shadow_layers=len(shadow),
            shadow_layers=" ".join(str(i) for i in sorted(shadow)), cpu_share=counter.share,
            input_outliers=counter.input_outliers, output_outliers=counter.output_outliers,
            num_shadow_inputs=counts["num_shadow_inputs"], num_shadow_outputs=counts["num_shadow_outputs"],
            num_shadow_sides=counts["num_shadow_sides"], shadow_flop_fraction=None,
            shadow_inputs=counts["shadow_inputs"], shadow_outputs=counts["shadow_outputs"])

    def log_point(self, log, label: str, metrics: dict) -> None:
        log.info("%s (%s): perplexity %.4f (%+.2f %%), KL %.4f, agreement %.4f, shadow layers [%s], CPU share %.4f %%",
                 label, self.name, metrics["perplexity"], 100 * (metrics["perplexity_increase"] or 0.0),
                 metrics["kl"] or 0.0, metrics["agreement"] or 0.0, metrics["shadow_layers"],
                 100 * metrics["cpu_share"])

    def rank(self, manifest, samples, act_scales, out_csv, num_samples: int, seq_len: int, *, statistics,
             measure_top: int, measure_samples: int, cost: str, runtime_scales=None, device: str = "auto",
             dtype: str = "auto", weight_range="max") -> list[dict]:
        return layer_sensitivity_stage(manifest, samples, act_scales, runtime_scales, out_csv, self.name,
                                       num_samples, seq_len, device=device, dtype=dtype, weight_range=weight_range)

    def selection_cost(self, row: dict, loss: float) -> tuple:
        return (number(row.get("cpu_share")), int(number(row.get("num_shadow_layers")) or 0), loss, row["point"],
                row["transform"])

    def selection_reason(self, best: dict, within: int, candidates: int, loss_description: str,
                         budget: float) -> str:
        return (f"smallest CPU share ({100 * float(best['cpu_share']):.3g} % of Linear multiply-adds, "
                f"{int(number(best.get('num_shadow_layers')) or 0)} shadow layers) among {within} of "
                f"{candidates} points whose {loss_description} is at most {budget:g}; ties broken by "
                "shadow layers, then loss")

    def selection_fields(self, row: dict) -> dict:
        layers = row.get("shadow_layers")
        layers = [] if layers is None or (isinstance(layers, float) and layers != layers) else \
            [int(v) for v in str(layers).split()]
        return {"runtime": self.name, "cpu_share": number(row.get("cpu_share")),
                "num_shadow_layers": None if number(row.get("num_shadow_layers")) is None
                else int(number(row.get("num_shadow_layers"))), "shadow_layers": layers}

    def cost_note(self, selection: dict) -> str:
        return (f"{int(selection.get('num_shadow_layers') or 0)} shadow layers, "
                f"{100 * float(selection['cpu_share']):.3g} % of Linear multiply-adds on the CPU ({self.name})")

    def shadow_line(self, row: dict) -> str:
        layers = row.get("shadow_layers")
        layers = "none" if layers in (None, "") else ", ".join(str(layers).split())
        # This model only prefills on the phone: say where the number of a whole generation is.
        return (f"Runtime profile {self.name}: shadow layers {layers}; the shadow ops run "
                f"{100 * row['cpu_share']:.3f} % of the quantized Linear multiply-adds on the CPU (measured). "
                "On the phone this model prefills the prompt and the CPU decoding model writes every further "
                "token: the demo evaluation measures the two together as the demo runs them (demo_evaluation.md, "
                "the bundle's README.txt; built by the default target, or by `snakemake bundle`).")

    def comparison_cost(self, row: dict) -> str:
        if number(row.get("selected_cpu_share")) is None:
            return super().comparison_cost(row)
        layers = row["selected_shadow_layers"] or "none"
        return f"shadow layers {layers}, CPU {100 * float(row['selected_cpu_share']):.3f} %"

    def cost_column(self, points) -> tuple[str, str]:
        if "cpu_share" in points.columns and points["cpu_share"].notna().all():
            return "cpu_share", "share of quantized Linear multiply-adds run by the CPU shadow ops (measured)"
        return super().cost_column(points)
