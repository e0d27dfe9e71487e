"""The per-tensor int8 weight clip range of a model: 'max' (the reference) or 'mse', chosen by measurement.

'max' maps each weight tensor's largest magnitude to 127; 'mse' clips it where the tensor's own squared
rounding error is least (fakequant.mse_weight_step). Which is better for the *model* depends on it: on
SmolLM2-135M as fetched, a few large weights matter and 'mse' costs +73 % perplexity against +8 % for
'max'; after the 'rotate' transform the weights are near Gaussian and 'mse' costs +0.2 % against +0.9 %.
`sweep.weight_range: auto` therefore measures both on calibration records (int8 weights, float
activations) and keeps the lower perplexity, 'max' on a tie. The sweep, the sensitivity ranking and the
export all use the chosen range, so the exported file is what the sweep measured.
"""

from __future__ import annotations

import copy
import logging

import torch

from shadowquant.errors import PipelineError
from shadowquant.runtimes.fakequant import WEIGHT_RANGES, fake_quant_weight, quantize_per_tensor
from shadowquant.jsonfile import read_json_object

log = logging.getLogger(__name__)


def fake_quant_weights(model, family: str, weight_range: str) -> dict[str, float]:
    """Fake-quantize every quantized Linear's weight (clip range `weight_range`) and bias (max) of `model`
    to per-tensor int8 in place (activations stay float); returns {layer: weight step}."""
    from shadowquant.model.families import quantized_layer_names

    steps = {}
    with torch.no_grad():
        for name in quantized_layer_names(model, family):
            linear = model.get_submodule(name)
            q, step = quantize_per_tensor(linear.weight, weight_range)
            linear.weight.copy_((q.float() * step).to(linear.weight.dtype))
            steps[name] = float(step)
            if linear.bias is not None:
                linear.bias.copy_(fake_quant_weight(linear.bias))
    return steps


def choose_weight_range(model, family: str, sequences: list[list[int]], batch_size: int = 4
                        ) -> tuple[str, dict[str, float], dict[str, float]]:
    """('max' or 'mse', {range: weights-only perplexity on `sequences`}, {layer: 'mse' weight step});
    `model` is left unchanged."""
    from shadowquant.evaluate.metrics import evaluate, summarize

    if not sequences:
        raise PipelineError("choosing the weight range needs at least one calibration sequence of 2+ tokens")
    scores, mse_steps = {}, {}
    for weight_range in WEIGHT_RANGES:
        quantized = copy.deepcopy(model)
        steps = fake_quant_weights(quantized, family, weight_range)
        if weight_range == "mse":
            mse_steps = steps
        result = evaluate(quantized, sequences, batch_size=batch_size, desc=f"weights {weight_range}")
        scores[weight_range] = float(summarize(result)["perplexity"])
        del quantized
    best = min(WEIGHT_RANGES, key=lambda r: (scores[r], r != "max"))
    return best, scores, mse_steps


def weight_range_stage(manifest, samples, out_json, num_samples: int, seq_len: int, batch_size: int = 4,
                       device: str = "auto", dtype: str = "auto") -> dict:
    """weight_range.json: the chosen range and the weights-only perplexity of each on calibration records."""
    from shadowquant.atomic import write_json
    from shadowquant.inputs.corpus import read_jsonl_texts
    from shadowquant.model.loading import load_model_from_manifest
    from shadowquant.calibrate.profiling import tokenize_samples

    model, tokenizer, family = load_model_from_manifest(manifest, device, dtype)
    texts = read_jsonl_texts(samples)[:num_samples]
    sequences = [s for s in tokenize_samples(tokenizer, texts, seq_len) if len(s) >= 2]
    choice, scores, mse_steps = choose_weight_range(model, family, sequences, batch_size)
    result = {"weight_range": choice, "weights_only_perplexity": scores, "num_sequences": len(sequences),
              "num_tokens": sum(len(s) - 1 for s in sequences)}
    if choice == "mse":
        # Searched once here; every sweep job and the export reuse them (the search costs 0.2 s per 1 M weights).
        result["mse_steps"] = mse_steps
    write_json(out_json, result)
    log.info("weight range %s (weights-only calibration perplexity: %s)", choice,
             ", ".join(f"{r} {p:.4f}" for r, p in scores.items()))
    return result


def resolve_weight_range(setting: str, chosen_json=None):
    """The weight range to use: `sweep.weight_range` when explicit, else the one weight_range.json chose
    ('max', or for 'mse' its precomputed {layer: step} map, which quantizes exactly as 'mse' would)."""
    if setting != "auto":
        if setting not in WEIGHT_RANGES:
            raise PipelineError(f"weight range {setting!r} is not valid; valid values: auto, "
                                f"{', '.join(WEIGHT_RANGES)}")
        return setting
    if chosen_json is None:
        raise PipelineError("sweep.weight_range is 'auto' but no weight_range.json was given")
    data = read_json_object(chosen_json, "weight range choice", "delete it and run the choose_weight_range rule")
    if data.get("weight_range") not in WEIGHT_RANGES:
        raise PipelineError(f"{chosen_json}: 'weight_range' is {data.get('weight_range')!r}, not one of "
                            f"{', '.join(WEIGHT_RANGES)}; delete it and run the choose_weight_range rule")
    steps = data.get("mse_steps")
    if data["weight_range"] == "mse" and isinstance(steps, dict) and steps:
        return {layer: float(step) for layer, step in steps.items()}
    return data["weight_range"]
