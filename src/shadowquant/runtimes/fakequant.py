"""Simulated (fake-quant) W8A8 inference of docs/method.md section 3.

Arithmetic matches the reference `W8A8LinearStatic` of the mllm profiling tools, which works on
float32 torch tensors: a scale from act_scales.json becomes a float32 0-dim tensor, is clamped
at 1e-5, divided by 127 and (input side only) rounded to 5 decimals in float32
(`round(s * 100000) / 100000`, torch.round = round half to even). Doing that rounding in float64
Python arithmetic instead gives a different step for about 0.3 % of scales, so every step here is
computed in float32 torch and handed around as the Python float of that float32 value (exact).

All quantization arithmetic (weights and activations) runs in float32; results are cast back to
the dtype of the Linear (weights) or of the activation. For float32 models this is bit for bit
the reference; for bf16/fp16 models the reference quantized in the model's dtype, here the
rounding decisions are made in float32 and only the dequantized values are rounded to the dtype.

One deliberate deviation: when an input scale is below ~6.35e-4, `scale / 127` rounds to a step
of 0 at 5 decimals and the reference divides by zero (NaN outputs). Such a side keeps its
unrounded step `scale / 127` (what the mllm runtime uses when it does not round).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from shadowquant.runtimes.decision import LayerQuant
from shadowquant.errors import PipelineError

INT8_MAX = 127
INT8_MIN = -128
SCALE_FLOOR = 1e-5  # the reference clamps every scale below at 1e-5
STEP_DECIMALS_FACTOR = 100000  # input steps are rounded to 5 decimals


def _checked_scale(scale: float, what: str) -> float:
    try:
        value = float(scale)
    except (TypeError, ValueError):
        value = float("nan")
    if not (math.isfinite(value) and value > 0):
        raise PipelineError(f"{what} {scale!r} must be a positive finite number")
    return value


def output_step(scale: float) -> float:
    """Output quantization step: `max(scale, 1e-5) / 127` in float32."""
    scale = _checked_scale(scale, "output scale")
    step = torch.tensor(scale, dtype=torch.float32).clamp(min=SCALE_FLOOR) / INT8_MAX
    return float(step)


def input_step(scale: float) -> float:
    """Input quantization step: `max(scale, 1e-5) / 127` rounded to 5 decimals, in float32.

    Falls back to the unrounded step where rounding would give 0 (see the module docstring).
    """
    scale = _checked_scale(scale, "input scale")
    step = torch.tensor(scale, dtype=torch.float32).clamp(min=SCALE_FLOOR) / INT8_MAX
    rounded = torch.round(step * STEP_DECIMALS_FACTOR) / STEP_DECIMALS_FACTOR
    return float(rounded) if float(rounded) > 0 else float(step)


def fake_quant_activation(x: torch.Tensor, step: float | torch.Tensor, clip: bool) -> torch.Tensor:
    """`round(x / step)`, clamped to [-128, 127] only if `clip` (shadow sides keep outliers), times step.

    Computed in float32, returned in x's dtype.
    """
    step_t = torch.as_tensor(step, dtype=torch.float32, device=x.device)
    q = torch.round(x.float() / step_t)
    if clip:
        q = q.clamp(INT8_MIN, INT8_MAX)
    return (q * step_t).to(x.dtype)


WEIGHT_RANGES = ("max", "mse")
MSE_GRID_STEPS = 100  # clip candidates of the "mse" weight range, evenly from MSE_GRID_LOW * max to max
MSE_GRID_LOW = 0.5
MSE_COARSE_STRIDE = 9  # the coarse pass of the search scores every 9th candidate


def _check_weight_range(weight_range) -> None:
    """'max', 'mse', a precomputed 'mse' step (a float, for one tensor) or {layer: step} (a whole model's)."""
    if isinstance(weight_range, Mapping):
        if not all(isinstance(v, (int, float)) and v > 0 for v in weight_range.values()):
            raise PipelineError("precomputed weight steps must be positive numbers")
        return
    if isinstance(weight_range, float) and weight_range > 0:
        return
    if weight_range not in WEIGHT_RANGES:
        raise PipelineError(f"weight_range {weight_range!r} is not valid; valid values: {', '.join(WEIGHT_RANGES)}")


def layer_weight_range(weight_range, layer: str):
    """One layer's weight range out of a model-level one: a precomputed step map gives that layer's step."""
    if isinstance(weight_range, Mapping):
        if layer not in weight_range:
            raise PipelineError(f"no precomputed weight step for layer {layer}; the steps belong to another model: "
                                "delete weight_range.json and run the choose_weight_range rule again")
        return float(weight_range[layer])
    return weight_range


def weight_range_name(weight_range) -> str:
    """'max' or 'mse' (precomputed steps are 'mse' steps)."""
    return weight_range if isinstance(weight_range, str) else "mse"


def mse_weight_step(t32: torch.Tensor) -> torch.Tensor:
    """Per-tensor step `c / 127` whose clip `c` minimizes the int8 quantization MSE of `t32`.

    The candidates are MSE_GRID_STEPS clips evenly spaced from MSE_GRID_LOW * max|t| to max|t|
    (the last one is the "max" range), searched coarse to fine: every MSE_COARSE_STRIDE-th
    candidate first, then every candidate within one stride of the best of those (the error is
    smooth in the clip, so this finds the grid's minimum at a third of the cost). Each is scored
    exactly as it would quantize (float32 steps, round, clamp to +-127), the squared errors summed
    in float64. Ties go to the larger clip. The export quantizes the weight in the same [out, in]
    layout as the simulation, so both sum in the same order and get the same scale.
    """
    magnitudes = t32.detach().abs().flatten()
    top = magnitudes.max().clamp(min=SCALE_FLOOR)
    fractions = torch.linspace(MSE_GRID_LOW, 1.0, MSE_GRID_STEPS, dtype=torch.float64)
    steps = ((top.double() * fractions).float().clamp(min=SCALE_FLOOR) / INT8_MAX)
    steps[-1] = top / INT8_MAX  # exactly the "max" step
    reference = magnitudes.double()
    errors: dict[int, float] = {}

    def score(indices) -> int:
        for index in indices:
            if index not in errors:
                q = torch.round(magnitudes / steps[index]).clamp_(max=INT8_MAX)
                diff = (q * steps[index]).double() - reference
                errors[index] = float(torch.dot(diff, diff))
        best = min(errors[i] for i in indices)
        return max(i for i in indices if errors[i] == best)  # ties: the larger clip

    last = MSE_GRID_STEPS - 1
    coarse = sorted({*range(last, -1, -MSE_COARSE_STRIDE), 0})
    centre = score(coarse)
    fine = range(max(0, centre - MSE_COARSE_STRIDE), min(last, centre + MSE_COARSE_STRIDE) + 1)
    return steps[score(list(fine))].clone()  # not a view into the candidate grid (safetensors saves it alone)


def quantize_per_tensor(t: torch.Tensor, weight_range: str = "max") -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-tensor int8 of a weight or bias: (int8 values, float32 0-dim scale already / 127).

    "max" (the reference): `s = max(max|t|, 1e-5) / 127`, `q = round(t / s)`; |q| <= 127 by construction.
    "mse": `s` from `mse_weight_step` (clip searched for the least squared error), q clamped to +-127.
    The one definition used by the simulation and the int8 export, so both quantize identically.
    """
    _check_weight_range(weight_range)
    t32 = t.detach().float()
    if isinstance(weight_range, float):  # an "mse" step computed before (weight_range.json)
        scale = torch.tensor(weight_range, dtype=torch.float32)
        q = torch.round(t32 / scale).clamp_(-INT8_MAX, INT8_MAX)
    elif weight_range == "max":
        scale = t32.abs().max().clamp(min=SCALE_FLOOR) / INT8_MAX
        q = torch.round(t32 / scale)
    else:
        scale = mse_weight_step(t32)
        q = torch.round(t32 / scale).clamp_(-INT8_MAX, INT8_MAX)
    return q.to(torch.int8), scale


def fake_quant_weight(t: torch.Tensor, weight_range: str = "max") -> torch.Tensor:
    """Per-tensor fake quantization `round(t / s) * s` of a weight or bias, returned in t's dtype."""
    q, scale = quantize_per_tensor(t, weight_range)
    return (q.float() * scale).to(t.dtype)


def dequantized_linear_from_export(weight_int8: torch.Tensor, weight_scale: torch.Tensor | float,
                                   bias_int8: torch.Tensor | None = None,
                                   bias_scale: torch.Tensor | float | None = None,
                                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Float32 (W', b') of an exported Linear: weight stored transposed `[in, out]`, scales already / 127.

    Returns W' as `[out, in]` like nn.Linear, so it can be compared with `W8A8Linear.weight`.
    """
    if weight_int8.dtype != torch.int8 or weight_int8.dim() != 2:
        raise PipelineError(f"exported weight must be a 2-D int8 tensor, got {weight_int8.dtype} "
                            f"of shape {tuple(weight_int8.shape)}")
    weight_scale = torch.as_tensor(weight_scale, dtype=torch.float32)
    weight = weight_int8.t().float() * weight_scale
    if bias_int8 is None:
        return weight, None
    if bias_scale is None:
        raise PipelineError("exported bias has no bias scale beside it (expected '<layer>.bias.scale')")
    if bias_int8.dtype != torch.int8:
        raise PipelineError(f"exported bias must be int8, got {bias_int8.dtype}")
    bias = bias_int8.float() * torch.as_tensor(bias_scale, dtype=torch.float32)
    return weight, bias


class W8A8Linear(nn.Module):
    """A Linear run as simulated static W8A8: fake-quant input -> linear(x', W', b') -> fake-quant output.

    `weight`/`bias` hold W'/b' (dequantized, in the original Linear's dtype) under the original
    parameter names, so the state dict of a converted model has the usual keys.

    For the error breakdown each part can be left in float: `quantize_inputs` / `quantize_outputs`
    (attributes, may be switched on a built layer) and the weights (`from_linear(quantize_weights=False)`
    keeps W, b float; such a layer has no int8 weights to export). All on is the method of docs/method.md.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, weight_scale: torch.Tensor | None,
                 bias_scale: torch.Tensor | None, quant: LayerQuant, quantize_inputs: bool = True,
                 quantize_outputs: bool = True):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self.weight_scale = weight_scale  # None: weights kept in float
        self.bias_scale = bias_scale
        self.quantize_inputs = quantize_inputs
        self.quantize_outputs = quantize_outputs
        # Steps as float32 0-dim buffers, so they follow .to(device) and cost no host copy per call.
        self.register_buffer("input_quant_step", torch.zeros((), dtype=torch.float32), persistent=False)
        self.register_buffer("output_quant_step", torch.zeros((), dtype=torch.float32), persistent=False)
        self.set_quant(quant)

    def set_quant(self, quant: LayerQuant) -> None:
        """Change the static activation scales and clip flags (weights stay as they are)."""
        self.quant = quant
        self.input_quant_step.fill_(input_step(quant.input_scale))
        self.output_quant_step.fill_(output_step(quant.output_scale))

    @classmethod
    def from_linear(cls, linear: nn.Linear, quant: LayerQuant, quantize_weights: bool = True,
                    quantize_inputs: bool = True, quantize_outputs: bool = True,
                    weight_range: str = "max") -> "W8A8Linear":
        """Fake-quantize `linear`'s weight (per tensor, clip range `weight_range`) and bias (per tensor,
        "max") once and attach the static activation scales."""
        if not isinstance(linear, nn.Linear):
            raise PipelineError(f"W8A8Linear needs an nn.Linear, got {type(linear).__name__}")
        _check_weight_range(weight_range)
        with torch.no_grad():
            if not quantize_weights:
                bias = None if linear.bias is None else linear.bias.detach().clone()
                return cls(linear.weight.detach().clone(), bias, None, None, quant, quantize_inputs, quantize_outputs)
            q_w, s_w = quantize_per_tensor(linear.weight, weight_range)
            weight = (q_w.float() * s_w).to(linear.weight.dtype)
            bias = s_b = None
            if linear.bias is not None:
                q_b, s_b = quantize_per_tensor(linear.bias)
                bias = (q_b.float() * s_b).to(linear.bias.dtype)
        return cls(weight, bias, s_w.cpu(), None if s_b is None else s_b.cpu(), quant, quantize_inputs,
                   quantize_outputs)

    def _int8_of(self, dequantized: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
        if scale is None:
            raise PipelineError("W8A8Linear: this layer keeps its weights in float (quantize_weights=False); "
                                "it has no int8 weights to export")
        # W' = dtype(q * s) with |q| <= 127: even in bf16 (8-bit mantissa) W' / s is within 0.25 of q.
        scale = scale.to(dequantized.device)
        q = torch.round(dequantized.detach().float() / scale)
        if not torch.equal((q * scale).to(dequantized.dtype), dequantized.detach()):
            raise PipelineError("W8A8Linear: stored weights are no longer the fake-quantized ones "
                                "(modified after conversion); rebuild the layer")
        return q.to(torch.int8).cpu()

    def int8_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(int8 weight `[out, in]` as in nn.Linear, float32 scale already / 127); export transposes it."""
        return self._int8_of(self.weight, self.weight_scale), self.weight_scale

    def int8_bias(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(int8 bias, float32 scale already / 127), or None without bias."""
        if self.bias is None:
            return None
        return self._int8_of(self.bias, self.bias_scale), self.bias_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantize_inputs:
            x = fake_quant_activation(x, self.input_quant_step, self.quant.clip_input)
        y = F.linear(x, self.weight, self.bias)
        if self.quantize_outputs:
            y = fake_quant_activation(y, self.output_quant_step, self.quant.clip_output)
        return y

    def extra_repr(self) -> str:
        q = self.quant
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"input_scale={q.input_scale:g}, output_scale={q.output_scale:g}, "
                f"clip_input={q.clip_input}, clip_output={q.clip_output}, "
                f"quantized=({'W' if self.weight_scale is not None else ''}{'I' if self.quantize_inputs else ''}"
                f"{'O' if self.quantize_outputs else ''})")


def apply_w8a8(model: nn.Module, decisions: dict[str, LayerQuant], layer_names: list[str],
               quantize_weights: bool = True, quantize_inputs: bool = True, quantize_outputs: bool = True,
               weight_range: str = "max") -> nn.Module:
    """Replace each named nn.Linear of `model` in place by a W8A8Linear; everything else stays float.

    `layer_names` are `named_modules()` names (e.g. `model.layers.0.mlp.up_proj`); lm_head is only
    touched if listed, which the family layer lists never do. The switches leave parts in float
    (error breakdown); `weight_range` ("max" or "mse") is the per-tensor weight clip range, and the
    int8 export must be given the same one. Returns `model`.
    """
    _check_weight_range(weight_range)
    duplicates = sorted({n for n in layer_names if layer_names.count(n) > 1})
    if duplicates:
        raise PipelineError(f"layer list names {', '.join(duplicates[:5])} more than once")
    missing = [n for n in layer_names if n not in decisions]
    if missing:
        raise PipelineError(f"no quantization decision for layers {', '.join(missing[:5])}"
                            f"{' ...' if len(missing) > 5 else ''} ({len(missing)} of {len(layer_names)}); "
                            f"the decision must come from this model's act_scales.json")
    for name in layer_names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise PipelineError(f"model has no module named '{name}'; the layer list does not belong to this model") from None
        if not isinstance(module, nn.Linear):
            raise PipelineError(f"module '{name}' is a {type(module).__name__}, not an nn.Linear; cannot quantize it")
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child_name, W8A8Linear.from_linear(
            module, decisions[name], quantize_weights, quantize_inputs, quantize_outputs,
            layer_weight_range(weight_range, name) if quantize_weights else "max"))
    return model


def apply_w8a8_from_export(model: nn.Module, export: dict[str, torch.Tensor], layer_names: list[str]) -> nn.Module:
    """Replace each named nn.Linear by a W8A8Linear whose weights, scales and clip flags are read from the
    int8 export (docs/method.md section 4), so what runs is exactly what was shipped. Returns `model`."""
    for name in layer_names:
        needed = [f"{name}.{key}" for key in ("weight", "weight.scale", "input_scale", "output_scale",
                                              "clip_input", "clip_output")]
        missing = [key for key in needed if key not in export]
        if missing:
            raise PipelineError(f"the int8 export has no {', '.join(missing[:3])}; it does not belong to this model "
                                "or is incomplete: re-run the export")
        weight, bias = dequantized_linear_from_export(export[f"{name}.weight"], export[f"{name}.weight.scale"],
                                                      export.get(f"{name}.bias"), export.get(f"{name}.bias.scale"))
        quant = LayerQuant(float(export[f"{name}.input_scale"]), float(export[f"{name}.output_scale"]),
                           bool(export[f"{name}.clip_input"]), bool(export[f"{name}.clip_output"]))
        module = model.get_submodule(name)
        dtype = module.weight.dtype if isinstance(module, nn.Linear) else torch.float32
        layer = W8A8Linear(weight.to(dtype), None if bias is None else bias.to(dtype), export[f"{name}.weight.scale"],
                           export.get(f"{name}.bias.scale"), quant)
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child_name, layer)
    return model
