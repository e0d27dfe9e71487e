"""The layer ranking of an NPU runtime profile (sensitivity.csv): each shadow-capable decoder layer alone as
the shadow layer, measured against the runtime with none (runtimes/npu.py's `NpuRuntime.rank`)."""

from __future__ import annotations

import copy
import logging

from torch import nn
from tqdm import tqdm

from shadowquant.runtime import get_profile, layer_index
from shadowquant.runtime_linear import apply_runtime, reconfigure
from shadowquant.runtimes.npu import layer_ratios, read_runtime_scales, runtime_decisions
from shadowquant.sensitivity import compare_to_reference, reference_logprobs, stage_inputs, write_sensitivity_table

log = logging.getLogger(__name__)


def layer_ranking(model: nn.Module, layers: list[str], sequences: list[list[int]], act_scales: dict,
                  runtime_scales: dict, profile, batch_size: int = 4, weight_range="max",
                  progress: bool = True) -> list[dict]:
    """Rows of sensitivity.csv under an NPU runtime profile, one per shadow-capable layer, ranked.

    The model is simulated with no shadow layer, then with each layer alone as the shadow layer (its
    down_proj shadow op at the one-layer share of the CPU cap); the benefit is the measured decrease of
    KL to float, the cost the measured CPU share, both on the given calibration records.
    """
    reference = reference_logprobs(model, sequences, batch_size, progress)
    quantized = copy.deepcopy(model)
    none = runtime_decisions(act_scales, runtime_scales, profile, layers, frozenset())
    counter = apply_runtime(quantized, none, layers, profile, frozenset(), weight_range=weight_range)
    base = compare_to_reference(quantized, sequences, reference, batch_size).summary()
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
        measured = compare_to_reference(quantized, sequences, reference, batch_size).summary()
        layer = shadow_layer_names[index]
        module = model.get_submodule(layer)
        rows.append({"layer": layer, "side": "layer", "statistic": "absmax", "ratio": ratios[index],
                     "clip_scale": none[layer].input_scale, "shadow_scale": decisions[layer].input_scale,
                     "cost": counter.share, "flop_share": module.in_features * module.out_features / total_macs,
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
    model, sequences, layers, scales = stage_inputs(manifest, samples, act_scales, num_samples, seq_len, device,
                                                     dtype)
    runtime = get_profile(profile, scales.get("meta", {}).get("family"))
    rows = layer_ranking(model, layers, sequences, scales, read_runtime_scales(runtime_scales, runtime), runtime,
                         batch_size=batch_size, weight_range=weight_range)
    write_sensitivity_table(out_csv, rows)
    return rows
