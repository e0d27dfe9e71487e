"""Int8 export of docs/method.md section 4: int8 weights, static scales and clip flags."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch
from safetensors.torch import save_file

from shadowquant.atomic import atomic_path
from shadowquant.runtimes.decision import LayerQuant
from shadowquant.errors import PipelineError
from shadowquant.runtimes.fakequant import layer_weight_range, quantize_per_tensor  # one definition for both
from shadowquant.runtimes.profiles import QKV_ROLES, RuntimeProfile, layer_role
from shadowquant.runtimes.runtime_linear import int32_bias, runtime_step, side_scale

def int8_state_dict(state: dict[str, torch.Tensor], decisions: dict[str, LayerQuant],
                    profiled: Iterable[str], weight_range: str = "max") -> dict[str, torch.Tensor]:
    """Build the export tensors from a float state dict and the per-layer decisions.

    `weight_range` is the per-tensor weight clip range ("max" or "mse"); it must be the one the
    simulation used (apply_w8a8), so the exported model reproduces the simulated logits. Biases use "max".
    """
    profiled = list(profiled)
    missing = [n for n in profiled if n not in decisions]
    if missing:
        raise PipelineError(f"no scales for layers {', '.join(missing[:5])}; the act_scales do not match this model")
    out: dict[str, torch.Tensor] = {}
    quantized_params = set()
    for layer in profiled:
        if "head" in layer:
            continue
        for kind in ("weight", "bias"):
            key = f"{layer}.{kind}"
            if key in state:
                quantized_params.add(key)
    for key, tensor in state.items():
        if key in quantized_params:
            is_weight = key.endswith(".weight")
            # Quantized in the simulation's [out, in] layout (the same "mse" search order), then
            # transposed to [in, out]: QNN runs Linear as a 1x1 Conv2d.
            layer_range = layer_weight_range(weight_range, key.removesuffix(".weight")) if is_weight else "max"
            q, scale = quantize_per_tensor(tensor.detach(), layer_range)
            out[key] = (q.t() if is_weight else q).contiguous()
            out[f"{key}.scale"] = scale
        else:
            # Clone so tied tensors (embeddings / lm_head) become separate, as safetensors requires.
            out[key] = tensor.detach().clone().contiguous()
    for layer in profiled:
        q = decisions[layer]
        out[f"{layer}.input_scale"] = torch.tensor(q.input_scale, dtype=torch.float32)
        out[f"{layer}.output_scale"] = torch.tensor(q.output_scale, dtype=torch.float32)
        out[f"{layer}.clip_input"] = torch.tensor(q.clip_input, dtype=torch.bool)
        out[f"{layer}.clip_output"] = torch.tensor(q.clip_output, dtype=torch.bool)
    return out


def runtime_state_dict(state: dict[str, torch.Tensor], decisions: dict[str, LayerQuant], quantized: Iterable[str],
                       profile: RuntimeProfile, shadow_layers, weight_range="max",
                       tied_head: bool = False) -> dict[str, torch.Tensor]:
    """The export tensors an NPU runtime profile's model loads (runtimes.profiles.loaded_tensors), from the float state.

    Int8 weights `[in, out]` with `weight.scale` (as for ideal); every Linear's `input_scale` is the
    range its quantizer reads (the shared one for k/v/gate), `output_scale` its own; the bias as the
    profile stores it (int32 + `bias.scale` = input step * weight step, or float32); clip flags only for
    the shadow role of the shadow layers, the only place the runtime reads them; lm_head.weight only
    where the C++ model reads it (never for a tied head under a 'tied-or-own' profile).

    What the C++ model loads although the model has no such parameter is written too, with a value that
    changes nothing: every Linear's `bias.scale` (QNNLinearINT8 asks for it bias or not; input step *
    weight step, the accumulator's step), and zero q/k/v biases under the Qwen profiles (int32 or float32
    as the profile stores them), which that model always builds (runtimes.profiles.loaded_tensors).
    """
    quantized = list(quantized)
    missing = [n for n in quantized if n not in decisions]
    if missing:
        raise PipelineError(f"no scales for layers {', '.join(missing[:5])}; the act_scales do not match this model")
    shadow_layers = frozenset(shadow_layers)
    specs = {layer: profile.spec(layer, shadow_layers) for layer in quantized}
    inputs = {layer: side_scale(decisions, layer, "input", specs[layer].input) for layer in quantized}
    out: dict[str, torch.Tensor] = {}
    weight_scales = {}
    for layer in quantized:
        key = f"{layer}.weight"
        if key not in state:
            raise PipelineError(f"the model has no {key}; the layer list does not belong to this model")
        q, scale = quantize_per_tensor(state[key].detach(), layer_weight_range(weight_range, layer))
        out[key], out[f"{key}.scale"] = q.t().contiguous(), scale
        weight_scales[layer] = scale
    for key, tensor in state.items():
        layer, _, kind = key.rpartition(".")
        if layer in specs and kind == "weight":
            continue
        if layer in specs and kind == "bias":
            if profile.bias == "none":
                raise PipelineError(f"{key}: runtime profile '{profile.name}' loads no bias; choose qwen-npu, "
                                    "qwen-npu-rotated or ideal for a model with biases")
            if profile.bias == "int32":
                step = runtime_step(inputs[layer], specs[layer].input.bits)
                out[key], out[f"{key}.scale"] = int32_bias(tensor, step, weight_scales[layer])
            else:
                out[key] = tensor.detach().float().clone().contiguous()
            continue
        if key == "lm_head.weight" and tied_head and profile.lm_head == "tied-or-own":
            continue  # the C++ model multiplies by the tied embedding itself
        out[key] = tensor.detach().clone().contiguous()
    for layer in quantized:
        out[f"{layer}.input_scale"] = torch.tensor(inputs[layer], dtype=torch.float32)
        out[f"{layer}.output_scale"] = torch.tensor(decisions[layer].output_scale, dtype=torch.float32)
        if f"{layer}.bias.scale" not in out:
            step = runtime_step(inputs[layer], specs[layer].input.bits)
            out[f"{layer}.bias.scale"] = (torch.tensor(step, dtype=torch.float32)
                                          * weight_scales[layer].detach().float().cpu()).reshape(())
        if layer_role(layer) in QKV_ROLES and profile.bias in ("int32", "float32") and f"{layer}.bias" not in out:
            rows = state[f"{layer}.weight"].shape[0]  # out_features of the [out, in] float weight
            out[f"{layer}.bias"] = torch.zeros(rows, dtype=torch.int32 if profile.bias == "int32" else torch.float32)
        if specs[layer].shadow:
            out[f"{layer}.clip_input"] = torch.tensor(decisions[layer].clip_input, dtype=torch.bool)
            out[f"{layer}.clip_output"] = torch.tensor(decisions[layer].clip_output, dtype=torch.bool)
    return out


def save_export(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def save_export_pth(tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    """The reference-compatible pickle-based .pth (only ever written, never read back here)."""
    with atomic_path(path, suffix=".pth") as tmp:
        torch.save(tensors, tmp)
