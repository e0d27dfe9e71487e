"""Simulated inference of a runtime profile: every quantized Linear as the phone's engine runs it.

Per Linear (see runtime.py for the profiles, docs/runtime.md for the arithmetic and its sources):

- input: quantized with its quantizer's bit width and rounding, with the scale of the Linear the
  quantizer belongs to (q/k/v share q_proj's), always clamped; the step is `range / (2^(bits-1) - 1)`
  in float32, not rounded to 5 decimals; an fp16 quantizer multiplies and rounds in float16.
- weight: int8 per tensor (the same quantize_per_tensor as the export), stored [in, out].
- bias: int32 with step `input step * weight step`, added before the output requantization, or
  float32 added after dequantization, as the profile says.
- output: requantized to the output bit width (round half to even; the HTP's requantization is
  closed source), clamped, dequantized and handed on in the profile's dtype (float16 or float32); an
  NPU output (`hvx_dequantize`) is dequantized as LLaMADequantize's HVX code does: the level converted
  to float16 (int16 levels beyond 2048 rounded), times the float32 step, or for a float16 output times
  the float16 step (subnormal below 2^-14), in float16.
- the shadow op (down_proj of a shadow layer, mllm's CPULinearINT8Shadow): the int8 result of the
  clamped input, plus, where clip_input is 0, `(r - clamp(r)) * s_in * W'` for every input element
  whose `r = roundf(x / s_in)` (half away from zero) is beyond int8; where clip_output is 0, every
  output channel whose int8 value sits at -128 or 127 is replaced by `roundf(x . W' / s_out) * s_out`
  from the float input (this overwrites the input correction on that channel). Nothing is clamped.

Around the Linears (`apply_runtime_model`, from the profile's data): the RMSNorms that run on the NPU
use LLaMAPackage's hard-coded epsilon, gate's SiLU is the profile's float16 variant, and the attention
is the CPU's float16 one (`fp16_cpu_attention`).

`CpuCounter` counts the multiply-adds the shadow op would run on the CPU (each input outlier costs
out_features, each output outlier in_features) and the multiply-adds of every quantized Linear, over
the valid (unpadded) positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shadowquant.runtimes.decision import LayerQuant
from shadowquant.errors import PipelineError
from shadowquant.runtimes.fakequant import layer_weight_range, quantize_per_tensor
from shadowquant.runtimes.profiles import RoleSpec, RuntimeProfile, SideSpec

DTYPES = {"float32": torch.float32, "float16": torch.float16}


def runtime_step(scale: float, bits: int) -> float:
    """The runtime's step of a range: the float32 range (as stored in the model file) divided by
    2^(bits-1) - 1 in double precision, kept as float32, as mllm computes `scale / (pow(2, 7) - 1)`."""
    value = float(scale)
    if not value > 0:
        raise PipelineError(f"scale {scale!r} must be a positive number")
    stored = float(torch.tensor(value, dtype=torch.float32))
    return float(torch.tensor(stored / (2 ** (bits - 1) - 1), dtype=torch.float32))


def quantize(x: torch.Tensor, step: float, side: SideSpec, half: bool = False) -> torch.Tensor:
    """Integer levels (as float32) of `x` under one quantizer, clamped to its range.

    `half`: the quantizer works in float16 (mllm's NPU quantize of an fp16 input, LLaMAQuantize's HVX
    path): the float32 reciprocal of the step is rounded to fp16, and the product and the + 0.5 are fp16
    too, so levels beyond 1024 round (ties to even) before the floor and beyond 2048 lose integers.
    """
    inv32 = torch.tensor(1.0, dtype=torch.float32) / torch.tensor(step, dtype=torch.float32)
    if half:
        scaled = x.to(torch.float16) * inv32.to(torch.float16).to(x.device)
    else:
        scaled = x.float() * inv32.to(x.device)
    q = torch.floor(scaled + 0.5) if side.rounding == "half_up" else torch.round(scaled)
    return q.float().clamp_(side.qmin, side.qmax)


def dequantize(q: torch.Tensor, step: float, side: SideSpec) -> torch.Tensor:
    """Levels `q` (integers as float32) to values, as the side's dequantizer computes them: exactly
    (`q * step` in float32) or, for `hvx_dequantize`, through float16 levels (and a float16 step and
    product when the output is float16). The result is float32 or float16 as computed."""
    if not side.hvx_dequantize:
        return q * step
    q16 = q.to(torch.float16)
    if side.dtype == "float16":
        return q16 * torch.tensor(step, dtype=torch.float16, device=q.device)
    return q16.float() * torch.tensor(step, dtype=torch.float32, device=q.device)


def int32_bias(bias: torch.Tensor, input_step: float, weight_scale) -> tuple[torch.Tensor, torch.Tensor]:
    """(int32 bias, float32 0-dim `bias.scale`): the bias in the accumulator's units, input step * weight
    step, as the runtime adds it before requantizing. One definition for the simulation and the export."""
    scale = torch.tensor(input_step, dtype=torch.float32) * torch.as_tensor(weight_scale, dtype=torch.float32).cpu()
    q = torch.round(bias.detach().float() / scale.to(bias.device))
    return q.to(torch.int32), scale.reshape(())


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """C's roundf: halves away from zero."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


class CpuCounter:
    """Multiply-adds of the shadow op and of all quantized Linears, over valid positions only."""

    def __init__(self):
        self.mask: torch.Tensor | None = None  # [batch, positions] of the running forward, 1 = valid
        self.shadow_macs = 0
        self.total_macs = 0
        self.input_outliers = 0
        self.output_outliers = 0

    def valid(self, x: torch.Tensor) -> torch.Tensor | None:
        """A boolean mask broadcastable over x's leading dims, or None when every position counts."""
        if self.mask is None or self.mask.shape != x.shape[:-1]:
            return None
        return self.mask.bool()

    def positions(self, x: torch.Tensor) -> int:
        valid = self.valid(x)
        return int(valid.sum()) if valid is not None else x[..., 0].numel()

    def count(self, flags: torch.Tensor) -> int:
        valid = self.valid(flags)
        if valid is not None:
            flags = flags & valid.unsqueeze(-1)
        return int(flags.sum())

    @property
    def share(self) -> float:
        return self.shadow_macs / self.total_macs if self.total_macs else 0.0

    def attach(self, model: nn.Module):
        """Follow the attention mask of every forward of `model` (padded positions never count)."""

        def remember(module, args, kwargs):
            mask = kwargs.get("attention_mask")
            self.mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

        return model.register_forward_pre_hook(remember, with_kwargs=True)


class RuntimeLinear(nn.Module):
    """One Linear run as the runtime profile says (see the module docstring)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, weight_scale: torch.Tensor | None,
                 quant: LayerQuant, input_scale: float, spec: RoleSpec, bias_mode: str,
                 counter: CpuCounter | None = None, quantize_inputs: bool = True, quantize_outputs: bool = True):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self.weight_scale = weight_scale  # None: weights kept in float (error breakdown)
        self.bias_mode = bias_mode
        self.counter = counter
        self.quantize_inputs = quantize_inputs
        self.quantize_outputs = quantize_outputs
        self.configure(quant, input_scale, spec)
        if bias is not None and bias_mode == "none":
            raise PipelineError("this runtime profile loads no bias, but the model's Linear has one; choose a "
                                "profile with bias (qwen-npu, qwen-npu-rotated) or ideal")

    def configure(self, quant: LayerQuant, input_scale: float, spec: RoleSpec) -> None:
        """Set the static ranges, clip flags and role spec (weights stay as they are)."""
        self.quant = quant
        self.spec = spec
        self.input_step = runtime_step(input_scale, spec.input.bits)
        self.output_step = runtime_step(quant.output_scale, spec.output.bits)
        if self.quantize_inputs and input_scale < spec.input.min_range:
            raise PipelineError(f"input range {input_scale:g} is below {spec.input.min_range:g}, the smallest an fp16 "
                                f"int{spec.input.bits} quantizer can use (its step's reciprocal overflows fp16)")

    def _int32_bias(self) -> torch.Tensor:
        q, scale = int32_bias(self.bias, self.input_step, self.weight_scale)
        return q.float() * scale.to(q.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if self.counter is not None:
            self.counter.total_macs += self.counter.positions(x) * self.in_features * self.out_features
        if self.spec.shadow:
            return self._shadow_forward(x).to(dtype)
        x_in = (quantize(x, self.input_step, self.spec.input, half=self.spec.input.dtype == "float16") * self.input_step
                if self.quantize_inputs else x.float())
        weight = self.weight.float()
        bias = self.bias.float() if self.bias is not None else None
        if bias is not None and self.bias_mode == "int32" and self.weight_scale is not None:
            bias = self._int32_bias()
        y = F.linear(x_in, weight, bias if self.bias_mode != "float32" else None)
        if self.quantize_outputs:
            y = dequantize(quantize(y, self.output_step, self.spec.output), self.output_step, self.spec.output)
        if bias is not None and self.bias_mode == "float32":
            y = y.float() + bias  # DequantizeAdd: float bias after dequantization
        if self.quantize_outputs:
            y = y.to(DTYPES[self.spec.output.dtype])
        return y.to(dtype)

    def _shadow_forward(self, x: torch.Tensor) -> torch.Tensor:
        """mllm's NPU int8 Linear followed by the CPU shadow op (CPULinearINT8Shadow)."""
        s_in, s_out = self.input_step, self.output_step
        weight = self.weight.float()
        x32 = x.float()
        # The error breakdown may leave a side in float; the shadow op then corrects only the other one.
        x_in = quantize(x32, s_in, self.spec.input) * s_in if self.quantize_inputs else x32
        acc = F.linear(x_in, weight)
        q_out = quantize(acc, s_out, self.spec.output) if self.quantize_outputs else None
        out = q_out * s_out if q_out is not None else acc
        counter = self.counter
        if self.quantize_inputs and not self.quant.clip_input:
            r = round_half_away(x32 / s_in)
            beyond = (r > 127) | (r < -128)
            excess = torch.where(beyond, r - r.clamp(-128, 127), torch.zeros_like(r))
            out = out + F.linear(excess * s_in, weight)
            if counter is not None:
                n = counter.count(beyond)
                counter.input_outliers += n
                counter.shadow_macs += n * self.out_features
        if q_out is not None and not self.quant.clip_output:
            at_limit = (q_out <= -128) | (q_out >= 127)
            exact = round_half_away(F.linear(x32, weight) / s_out) * s_out
            out = torch.where(at_limit, exact, out)
            if counter is not None:
                n = counter.count(at_limit)
                counter.output_outliers += n
                counter.shadow_macs += n * self.in_features
        if self.bias is not None:
            out = out + self.bias.float()
        return out

    def extra_repr(self) -> str:
        q, s = self.quant, self.spec
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"input=int{s.input.bits}({self.input_step:g}), output=int{s.output.bits}({self.output_step:g}), "
                f"shadow_op={s.shadow}, clip_input={q.clip_input}, clip_output={q.clip_output}")


def sibling(layer: str, role: str) -> str:
    """The Linear `role` beside `layer` (same parent module): k_proj -> q_proj of the same attention."""
    parent, _, _ = layer.rpartition(".")
    return f"{parent}.{role}" if parent else role


def side_scale(decisions: dict[str, LayerQuant], layer: str, side: str, spec: SideSpec) -> float:
    """The static range a quantizer reads: its own Linear's, or the sharing Linear's (scale_from)."""
    owner, owner_side = (layer, side) if spec.scale_from is None else (sibling(layer, spec.scale_from[0]),
                                                                        spec.scale_from[1])
    if owner not in decisions:
        raise PipelineError(f"layer {layer}: its {side} quantizer reads the scale of {owner}, which has no decision")
    quant = decisions[owner]
    return quant.input_scale if owner_side == "input" else quant.output_scale


def apply_runtime(model: nn.Module, decisions: dict[str, LayerQuant], layer_names: list[str],
                  profile: RuntimeProfile, shadow_layers=frozenset(), quantize_weights: bool = True,
                  quantize_inputs: bool = True, quantize_outputs: bool = True, weight_range="max") -> CpuCounter:
    """Replace each named nn.Linear of `model` in place by a RuntimeLinear; returns the CPU counter,
    already following the model's attention masks."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if dtypes - {torch.float32}:
        raise PipelineError(f"runtime profile '{profile.name}' is simulated on the float32 model, but this one is "
                            f"{', '.join(sorted(str(d).removeprefix('torch.') for d in dtypes))}: load it with "
                            "dtype float32 (the config's dtype is forced to float32 under an NPU profile)")
    shadow_layers = frozenset(shadow_layers)
    counter = CpuCounter()
    layers = []
    for name in layer_names:
        module = model.get_submodule(name)
        if not isinstance(module, nn.Linear):
            raise PipelineError(f"module '{name}' is a {type(module).__name__}, not an nn.Linear; cannot quantize it")
        if name not in decisions:
            raise PipelineError(f"no quantization decision for layer {name}; the decision must come from this "
                                "model's act_scales.json")
        spec = profile.spec(name, shadow_layers)
        layers.append((name, module, spec, side_scale(decisions, name, "input", spec.input)))
    with torch.no_grad():
        for name, module, spec, input_scale in layers:
            weight, weight_scale = module.weight.detach(), None
            if quantize_weights:
                q_w, weight_scale = quantize_per_tensor(weight, layer_weight_range(weight_range, name))
                weight = (q_w.float() * weight_scale).to(module.weight.dtype)
            bias = None if module.bias is None else module.bias.detach().clone()
            layer = RuntimeLinear(weight.clone(), bias, weight_scale, decisions[name], input_scale, spec,
                                  profile.bias, counter, quantize_inputs, quantize_outputs)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
    apply_runtime_model(model, profile, shadow_layers)
    counter.attach(model)
    return counter


def reconfigure(model: nn.Module, decisions: dict[str, LayerQuant], layer_names: list[str], profile: RuntimeProfile,
                shadow_layers=frozenset()) -> None:
    """Give the RuntimeLinears of `model` (apply_runtime's) another point's ranges and shadow layers."""
    shadow_layers = frozenset(shadow_layers)
    for name in layer_names:
        module = model.get_submodule(name)
        if not isinstance(module, RuntimeLinear):
            raise PipelineError(f"module '{name}' is not a RuntimeLinear; run apply_runtime first")
        spec = profile.spec(name, shadow_layers)
        module.configure(decisions[name], side_scale(decisions, name, "input", spec.input), spec)
    apply_runtime_model(model, profile, shadow_layers)


def apply_runtime_from_export(model: nn.Module, export: dict[str, torch.Tensor], layer_names: list[str],
                              profile: RuntimeProfile, shadow_layers) -> CpuCounter:
    """Replace each named Linear by a RuntimeLinear built from the int8 export itself (weights, bias, ranges,
    clip flags), so what runs is exactly what ships. Returns the CPU counter."""
    decisions, steps = {}, {}
    with torch.no_grad():
        for name in layer_names:
            needed = [f"{name}.{key}" for key in ("weight", "weight.scale", "input_scale", "output_scale")]
            missing = [key for key in needed if key not in export]
            if missing:
                raise PipelineError(f"the int8 export has no {', '.join(missing[:3])}; it does not belong to this "
                                    "model or is incomplete: re-run the export")
            module = model.get_submodule(name)
            scale = export[f"{name}.weight.scale"].float()
            module.weight.copy_((export[f"{name}.weight"].t().float() * scale).to(module.weight.dtype))
            steps[name] = float(scale)
            if module.bias is not None and f"{name}.bias" in export:
                bias = export[f"{name}.bias"].float()
                # int32 in accumulator units; every Linear has a bias.scale (the C++ Linear loads it), so the
                # dtype, not the scale, says which
                if export[f"{name}.bias"].dtype == torch.int32:
                    bias = bias * export[f"{name}.bias.scale"].float()
                module.bias.copy_(bias.to(module.bias.dtype))
            decisions[name] = LayerQuant(float(export[f"{name}.input_scale"]), float(export[f"{name}.output_scale"]),
                                         bool(export.get(f"{name}.clip_input", torch.tensor(True))),
                                         bool(export.get(f"{name}.clip_output", torch.tensor(True))))
    return apply_runtime(model, decisions, layer_names, profile, shadow_layers, weight_range=steps)


# ---------------------------------------------------------------- around the Linears

SILU_VARIANTS = ("float", "fp16-sigmoid", "fp16-poly")
ATTENTIONS = ("float", "fp16-cpu")
FP16_CPU_ATTENTION = "shadowquant_fp16_cpu"
_POLY_SEGMENTS = 16  # LLaMAPackage SiLU's float16 path: 16 unit segments of [-8, 8), one quartic each
_POLY_COEFFS: torch.Tensor | None = None


def _poly_coeffs() -> torch.Tensor:
    """[16, 5] quartic coefficients (c0..c4 in x) of sigmoid on each unit segment of [-8, 8): a least-squares
    fit made here, standing in for the op package's table (whose fit is of the same shape and accuracy)."""
    global _POLY_COEFFS
    if _POLY_COEFFS is None:
        import numpy as np

        rows = []
        for segment in range(_POLY_SEGMENTS):
            x = np.linspace(-8.0 + segment, -7.0 + segment, 257)
            rows.append(np.polyfit(x, 1.0 / (1.0 + np.exp(-x)), 4)[::-1])
        _POLY_COEFFS = torch.tensor(np.array(rows), dtype=torch.float32)
    return _POLY_COEFFS


def silu_fp16_poly(x: torch.Tensor) -> torch.Tensor:
    """SiLU as LLaMAPackage's float16 SiLU computes it: the segment index is read from the float16 mantissa
    of (x + 8) * 0.99902344 + 16 (4 leading bits, exact only inside [-8, 8): outside, the index wraps and a
    wrong segment's quartic is evaluated, there is no saturation), the quartic in float32, x * it to float16."""
    x16 = x.to(torch.float16)
    shifted = (x16.float() + 8.0).to(torch.float16)
    scaled = (shifted.float() * 0.99902344).to(torch.float16)
    v = (scaled.float() + 16.0).to(torch.float16)
    index = (v.view(torch.int16).to(torch.int32) >> 6) & 0xF
    coeffs = _poly_coeffs().to(x.device)[index.long()]
    xf = x16.float()
    poly = coeffs[..., 4]
    for power in (3, 2, 1, 0):
        poly = poly * xf + coeffs[..., power]
    return (xf * poly).to(torch.float16)


class RuntimeSiLU(nn.Module):
    """gate_proj's activation as the runtime computes it (RuntimeProfile.silu); the result is float32,
    float16-valued for the float16 variants (LLaMAMul's float16 product with up follows in the model)."""

    def __init__(self, variant: str):
        super().__init__()
        if variant not in SILU_VARIANTS:
            raise PipelineError(f"unknown SiLU variant {variant!r}; valid: {', '.join(SILU_VARIANTS)}")
        self.variant = variant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.variant == "float":
            return F.silu(x)
        if self.variant == "fp16-poly":
            return silu_fp16_poly(x).to(x.dtype)
        x16 = x.to(torch.float16)
        sigmoid16 = torch.sigmoid(x16.float()).to(torch.float16)  # QNN Sigmoid, float16 out
        return (sigmoid16 * x16).to(x.dtype)  # LLaMAMul in float16

    def extra_repr(self) -> str:
        return self.variant


def fp16_lane_matmul(a: torch.Tensor, b: torch.Tensor, lanes: int = 8) -> torch.Tensor:
    """a @ b of float16 values with float16 accumulation in `lanes` lanes (lane j sums the products of
    k = j, j + lanes, ..., each step rounded to float16, as a fused multiply-add), the lanes then summed in
    float32: llamafile's tinyBLAS with float16x8_t on ARM (mllm's CPU Matmul of an fp16 operand). float32 out.

    A product of two float16 values is exact in float32, and torch's float16 `addcmul_` computes
    acc + a * b in float32 and rounds once to float16: one step of the lanes in one pass, in place (the
    sequential rounding is most of an NPU point's time). tests/test_runtime_numerics.py checks it against
    fp16_lane_matmul_plain to the bit."""
    pad = (-a.shape[-1]) % lanes
    if pad:
        a = F.pad(a, (0, pad))
        b = F.pad(b, (0, 0, 0, pad))
    # a: [..., steps, M, lanes, 1], b: [..., steps, 1, lanes, N]; one step's products: [..., M, lanes, N].
    a = a.to(torch.float16).unflatten(-1, (-1, lanes)).movedim(-2, -3).contiguous().unsqueeze(-1)
    b = b.to(torch.float16).unflatten(-2, (-1, lanes)).unsqueeze(-3)
    acc = a[..., 0, :, :, :] * b[..., 0, :, :, :]
    for step in range(1, a.shape[-4]):
        acc.addcmul_(a[..., step, :, :, :], b[..., step, :, :, :])
    return acc.float().sum(-2)


def fp16_lane_matmul_plain(a: torch.Tensor, b: torch.Tensor, lanes: int = 8) -> torch.Tensor:
    """fp16_lane_matmul in its plain form (float32 products and sums, a new tensor per step), the reference the
    float16 in-place version is checked against to the bit (tests) and timed against (bench/bench_lane_matmul.py)."""
    pad = (-a.shape[-1]) % lanes
    a = F.pad(a, (0, pad)).float().unflatten(-1, (-1, lanes))  # [..., M, steps, lanes]
    b = F.pad(b, (0, 0, 0, pad)).float().unflatten(-2, (-1, lanes))  # [..., steps, lanes, N]
    acc = None
    for step in range(a.shape[-2]):
        prod = a[..., :, step, :].unsqueeze(-1) * b[..., step, :, :].unsqueeze(-3)  # [..., M, lanes, N], exact
        acc = prod.to(torch.float16) if acc is None else (acc.float() + prod).to(torch.float16)
    return acc.float().sum(-2)


ATTENTION_ROW_TILE = 16  # query rows per tile of the CPU attention: keys no row of a tile sees are skipped


def attention_key_extents(attention_mask, q_len: int, k_len: int, tile: int = ATTENTION_ROW_TILE):
    """(first row, end row, key extent) per tile of `tile` query rows: the extent is one past the last key any
    row of the tile may attend to in any batch element or head (0: the tile sees no key). None means causal
    (the queries are the last q_len positions); a bool mask allows True; a float mask allows what is above
    its dtype's minimum (Hugging Face's additive masks put that minimum where a key is hidden)."""
    if attention_mask is None:
        allowed = causal_mask(q_len, k_len)
    else:
        mask = attention_mask[..., :k_len]
        hidden = ~mask if mask.dtype == torch.bool else mask <= torch.finfo(mask.dtype).min
        allowed = ~hidden.reshape(-1, *hidden.shape[-2:]).all(0)
        allowed = allowed.expand(q_len, k_len).cpu()
    extents = []
    for start in range(0, q_len, tile):
        seen = allowed[start:start + tile].any(0).nonzero()
        extents.append((start, min(start + tile, q_len), int(seen[-1]) + 1 if len(seen) else 0))
    return extents


def fp16_cpu_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """mllm's CPU attention of the NPU models (QwenQKVmm): k (RoPE of the float16 k, stored float16 in the
    KV cache, CPUKVCacheNPU) and v in float16; QK^T with q rounded to float16 and PV with the float32
    probabilities rounded to float16, both accumulated in float16 (fp16_lane_matmul); scale and softmax
    in float32. A Hugging Face attention function (transformers' AttentionInterface).

    Computed a tile of query rows at a time over the keys the tile may see (attention_key_extents): a
    score each row is masked from is never computed (the mask decides its value alone) and its probability
    is an exact zero, so a causal mask halves the work and the values stay those of fp16_cpu_attention_full
    (the sign of an exact zero aside, which no later operation reads; tests compare the two)."""
    groups = query.shape[1] // key.shape[1]
    q16 = query.to(torch.float16)
    k16 = key.to(torch.float16).repeat_interleave(groups, dim=1).transpose(-1, -2).contiguous()
    v16 = value.to(torch.float16).repeat_interleave(groups, dim=1)
    q_len, k_len = query.shape[-2], key.shape[-2]
    extents = attention_key_extents(attention_mask, q_len, k_len)
    scores = query.new_zeros(*q16.shape[:-1], k_len, dtype=torch.float32)
    for start, end, extent in extents:
        if extent:
            scores[..., start:end, :extent] = fp16_lane_matmul(q16[..., start:end, :], k16[..., :extent])
    probs = _masked_softmax(scores * scaling, attention_mask, q_len, k_len).to(torch.float16)
    out = query.new_zeros(*q16.shape[:-1], v16.shape[-1], dtype=torch.float32)
    for start, end, extent in extents:
        if extent:
            out[..., start:end, :] = fp16_lane_matmul(probs[..., start:end, :extent], v16[..., :extent, :])
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def causal_mask(q_len: int, k_len: int, device=None) -> torch.Tensor:
    """[q_len, k_len] bool, True where a query (the last q_len of k_len positions) may see a key."""
    return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(k_len - q_len)


def _masked_softmax(scores: torch.Tensor, attention_mask, q_len: int, k_len: int) -> torch.Tensor:
    """float32 softmax of the scaled scores under the mask (None: causal); a row that sees no key is 0."""
    if attention_mask is None:
        scores = scores.masked_fill(~causal_mask(q_len, k_len, scores.device), float("-inf"))
    elif attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask[..., :k_len], float("-inf"))
    else:
        scores = scores + attention_mask[..., :k_len].float()
    return torch.softmax(scores, dim=-1).nan_to_num(0.0)


def fp16_cpu_attention_full(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """fp16_cpu_attention over every query row and key (no tiles): the reference the tiled one is checked
    against (tests) and timed against (bench/bench_lane_matmul.py)."""
    groups = query.shape[1] // key.shape[1]
    k16 = key.to(torch.float16).repeat_interleave(groups, dim=1)
    v16 = value.to(torch.float16).repeat_interleave(groups, dim=1)
    scores = fp16_lane_matmul(query.to(torch.float16), k16.transpose(-1, -2)) * scaling
    q_len, k_len = scores.shape[-2:]
    probs = _masked_softmax(scores, attention_mask, q_len, k_len)
    out = fp16_lane_matmul(probs.to(torch.float16), v16)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(FP16_CPU_ATTENTION, fp16_cpu_attention)


def decoder_layers(model: nn.Module) -> list[tuple[int, nn.Module]]:
    """(index, module) of the LLaMA-shaped decoder layers: those with input_layernorm, post_attention_layernorm,
    self_attn and mlp."""
    from shadowquant.runtimes.profiles import layer_index

    found = []
    for name, module in model.named_modules():
        if all(hasattr(module, a) for a in ("input_layernorm", "post_attention_layernorm", "self_attn", "mlp")):
            index = layer_index(name + ".")
            if index is not None:
                found.append((index, module))
    return found


def _set_eps(norm: nn.Module, eps: float | None) -> None:
    """Give an RMSNorm (`variance_epsilon` or `eps`) the epsilon `eps`, or back its model's (None)."""
    attr = "variance_epsilon" if hasattr(norm, "variance_epsilon") else "eps" if hasattr(norm, "eps") else None
    if attr is None:
        raise PipelineError(f"{type(norm).__name__} has no epsilon attribute the runtime simulation knows")
    if not hasattr(norm, "_shadowquant_model_eps"):
        norm._shadowquant_model_eps = getattr(norm, attr)
    setattr(norm, attr, norm._shadowquant_model_eps if eps is None else eps)


def apply_runtime_model(model: nn.Module, profile: RuntimeProfile, shadow_layers=frozenset()) -> None:
    """The profile's arithmetic around the Linears, in place (again after a change of shadow layers):
    the NPU RMSNorms' epsilon (post_attention_layernorm always, input_layernorm except in layer 0 and
    after a shadow layer), gate's SiLU variant in normal layers, the CPU's float16 attention."""
    import copy

    shadow_layers = frozenset(shadow_layers)
    layers = decoder_layers(model)  # none in a bare tree of Linears: only the Linears are simulated
    if profile.attention not in ATTENTIONS:
        raise PipelineError(f"unknown attention {profile.attention!r}; valid: {', '.join(ATTENTIONS)}")
    if profile.attention == "fp16-cpu":
        _register_attention()
    for index, layer in layers:
        npu_input_norm = not profile.cpu_layer(index, shadow_layers)
        _set_eps(layer.input_layernorm, profile.npu_norm_eps if npu_input_norm else None)
        _set_eps(layer.post_attention_layernorm, profile.npu_norm_eps)
        mlp = layer.mlp
        if hasattr(mlp, "act_fn"):
            if not hasattr(mlp, "_shadowquant_act"):
                mlp._shadowquant_act = mlp.act_fn
            is_silu = isinstance(mlp._shadowquant_act, nn.SiLU) or "SiLU" in type(mlp._shadowquant_act).__name__
            variant = "float" if index in shadow_layers else profile.silu
            mlp.act_fn = RuntimeSiLU(variant) if is_silu and variant != "float" else mlp._shadowquant_act
        attn = layer.self_attn
        if not hasattr(attn, "_shadowquant_attn"):
            attn._shadowquant_attn = attn.config._attn_implementation
            attn.config = copy.copy(attn.config)  # this layer's own: the model's masks stay as they are
        attn.config._attn_implementation = (FP16_CPU_ATTENTION if profile.attention == "fp16-cpu"
                                             else attn._shadowquant_attn)
