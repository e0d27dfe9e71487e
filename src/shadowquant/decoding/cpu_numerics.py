"""What mllm's CPU backend computes for the decoding model, simulated in torch (and, for the dot
products, written out as NumPy references of ggml's scalar loops).

A Linear with Q4_0 or Q8_0 weights (CPULinear -> mat_mul, mllm/backends/cpu/compute/Matmul.cpp)
does not multiply floats. `type_traits[Q4_0 or Q8_0].vec_dot_type` is Q8_0, so every row of the
float32 input (one token's activations) is first quantized to Q8_0 blocks of 32 along the input
dimension by quantize_row_q8_0 (q8_0.py: d = amax / 127 stored as float16, codes rounded to
nearest from x * (1 / d)), then each output is vec_dot_q4_0_q8_0 / vec_dot_q8_0_q8_0: per block
the integer sum of code products, times float(d_w) * float(d_x), accumulated in float32
(VecDotQ4.cpp, VecDotQ8.cpp). A bias is added afterwards in float32. Float32 weights take
vec_dot_fp32 on float32 input; there is nothing to simulate.

Attention of mllm's CPU Qwen model (models/qwen/modeling_qwen.hpp -> MultiHeadAttention in
models/transformer/modeling_transformer.hpp, attn_implementation "flash_attention_2" by default):
q, k, v come out of their Linears in float32; RoPE runs in float32; the KVCache op
(backends/cpu/op/CPUKVCache.cpp, KVCache_TYPE = 16 in Types.hpp) holds K and V as float16 and
aliases the RoPE output (K) and the v_proj output (V) onto the cache, so those ops write their
float32 results rounded to float16 (MLLM_FP32_TO_FP16, round to nearest even). The attention
(CPUFlashAttention2Func -> FA_2_GQA_Q_FP32_KV_FP16_..._ACC_FP32_IMPL in compute/FlashAttention2.hpp)
reads Q in float32, widens K and V from float16, and computes the scores, the softmax (expf, the
high-precision path) and P @ V in float32, output float32. So exactly two tensors are float16:
K after RoPE and V, each per layer; everything else in the attention is float32.

`mllm_cpu_numerics(model, ...)` applies both to a Hugging Face LLaMA-shaped model in place, for
evaluation: Q8_0 input quantization on the chosen Linears (forward pre-hooks) and float16 K/V
(an attention function registered with transformers' AttentionInterface that rounds the key and
value states it receives, i.e. after RoPE and after the cache update, so the cache and a
teacher-forced forward see the same values). The weights themselves are whatever the model holds:
load the decoded Q4_0 / Q8_0 values into it first.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator

import numpy as np
import torch

from shadowquant.errors import PipelineError
from shadowquant.decoding.q4_0 import BLOCK_BYTES as Q4_BLOCK_BYTES, q4_0_blocks
from shadowquant.decoding.q8_0 import BLOCK_BYTES as Q8_BLOCK_BYTES, BLOCK_VALUES, VARIANTS, q8_0_blocks, quantize_q8_0

# ---- NumPy references of ggml's dot products -------------------------------------------------


def vec_dot_q4_0_q8_0(weight_row: bytes | np.ndarray, x_row: bytes | np.ndarray) -> np.float32:
    """ggml's scalar vec_dot_q4_0_q8_0 on one row of Q4_0 weight blocks and one row of Q8_0 activation
    blocks: per block sumi = sum_j (lo_j - 8) * y_j + (hi_j - 8) * y_{j+16} in int32, then
    sumf += sumi * (float(d_w) * float(d_x)) in float32, block by block."""
    wb, xb = q4_0_blocks(weight_row), q8_0_blocks(x_row)
    if wb.size != xb.size:
        raise PipelineError(f"{wb.size} Q4_0 blocks against {xb.size} Q8_0 blocks")
    sumf = np.float32(0.0)
    for i in range(wb.size):
        qs = wb[i]["qs"].astype(np.int32)
        y = xb[i]["qs"].astype(np.int32)
        sumi = 0
        for j in range(16):
            sumi += int((qs[j] & 0x0F) - 8) * int(y[j]) + int((qs[j] >> 4) - 8) * int(y[j + 16])
        scale = np.float32(np.float32(wb[i]["d"]) * np.float32(xb[i]["d"]))
        sumf = np.float32(sumf + np.float32(np.float32(sumi) * scale))
    return sumf


def vec_dot_q8_0_q8_0(weight_row: bytes | np.ndarray, x_row: bytes | np.ndarray) -> np.float32:
    """ggml's scalar vec_dot_q8_0_q8_0: per block sumi = sum_j w_j * y_j in int32, then
    sumf += sumi * (float(d_w) * float(d_x)) in float32."""
    wb, xb = q8_0_blocks(weight_row), q8_0_blocks(x_row)
    if wb.size != xb.size:
        raise PipelineError(f"{wb.size} Q8_0 weight blocks against {xb.size} Q8_0 blocks")
    sumf = np.float32(0.0)
    for i in range(wb.size):
        sumi = int(np.dot(wb[i]["qs"].astype(np.int64), xb[i]["qs"].astype(np.int64)))
        scale = np.float32(np.float32(wb[i]["d"]) * np.float32(xb[i]["d"]))
        sumf = np.float32(sumf + np.float32(np.float32(sumi) * scale))
    return sumf


def linear_reference(weight: bytes, weight_format: str, out_features: int, in_features: int, x: np.ndarray,
                     bias: np.ndarray | None = None, variant: str = "neon") -> np.ndarray:
    """mllm's CPU Linear on a Q4_0 or Q8_0 weight (`weight_format` "q4_0" / "q8_0", rows of `in_features`
    values), written with the scalar loops above: every row of `x` [M, in_features] is quantized to Q8_0
    (`variant`, q8_0.py), each output is one vec_dot, the bias is added in float32. Slow; for tests."""
    if in_features % BLOCK_VALUES:
        raise PipelineError(f"in_features {in_features} is not a multiple of {BLOCK_VALUES}")
    dot = {"q4_0": vec_dot_q4_0_q8_0, "q8_0": vec_dot_q8_0_q8_0}.get(weight_format)
    if dot is None:
        raise PipelineError(f"unknown weight format {weight_format!r}: use q4_0 or q8_0")
    row_bytes = in_features // BLOCK_VALUES * (Q4_BLOCK_BYTES if weight_format == "q4_0" else Q8_BLOCK_BYTES)
    if len(weight) != out_features * row_bytes:
        raise PipelineError(f"{len(weight)} weight bytes, expected {out_features * row_bytes}")
    x = np.asarray(x, dtype=np.float32).reshape(-1, in_features)
    out = np.empty((x.shape[0], out_features), dtype=np.float32)
    for m in range(x.shape[0]):
        xq = quantize_q8_0(x[m], variant)
        for n in range(out_features):
            out[m, n] = dot(weight[n * row_bytes:(n + 1) * row_bytes], xq)
    if bias is not None:
        out = (out + np.asarray(bias, dtype=np.float32)[None, :]).astype(np.float32)
    return out


# ---- torch simulation --------------------------------------------------------------------------


def fake_quantize_q8_0(x: torch.Tensor, variant: str = "neon") -> torch.Tensor:
    """`x` after mllm's activation quantization: Q8_0 blocks of 32 along the last dimension, returned as
    float32 code * float(float16(d)), bit for bit what q8_0.py's encoder and decoder give."""
    if variant not in VARIANTS:
        raise PipelineError(f"unknown Q8_0 variant {variant!r}: use one of {', '.join(VARIANTS)}")
    if x.shape[-1] % BLOCK_VALUES:
        raise PipelineError(f"last dimension {x.shape[-1]} is not a multiple of {BLOCK_VALUES}: mllm's CPU "
                            "matmul quantizes its input in whole Q8_0 blocks")
    shape, dtype = x.shape, x.dtype
    blocks = x.detach().to(torch.float32).reshape(-1, BLOCK_VALUES)
    amax = blocks.abs().amax(dim=1, keepdim=True)
    d = amax / 127.0
    zero = torch.zeros((), dtype=torch.float32, device=x.device)
    if variant == "avx2":
        inverse = torch.where(amax != 0, 127.0 / torch.where(amax != 0, amax, 1.0), zero)
    else:
        inverse = torch.where(d != 0, 1.0 / torch.where(d != 0, d, 1.0), zero)
    scaled = blocks * inverse
    if variant == "reference":
        wide = scaled.to(torch.float64)
        codes = torch.copysign(torch.floor(wide.abs() + 0.5), wide).to(torch.float32)
    else:
        codes = torch.round(scaled)  # half to even
    codes = codes.clamp_(-128, 127)
    out = codes * d.to(torch.float16).to(torch.float32)
    return out.reshape(shape).to(dtype)


def _q8_0_input_hook(variant: str):
    def hook(module, args):
        return (fake_quantize_q8_0(args[0], variant),) + tuple(args[1:])
    return hook


def _f16_input_hook(module, args):
    return (args[0].to(torch.float16).to(args[0].dtype),) + tuple(args[1:])


# The input each weight format's vec_dot sees (type_traits[...].vec_dot_type in VecDotType.cpp).
INPUT_FORMAT_OF_WEIGHT = {"q4_0": "q8_0", "q8_0": "q8_0", "q4_k": "q8_k", "q6_k": "q8_k", "f16": "f16",
                          "f32": None}


def install_input_quantization(model: torch.nn.Module, formats: dict[str, str | None],
                               variant: str = "neon") -> list:
    """Forward pre-hooks on the Linears named in `formats` ({module name: weight format}) that give each
    the input mllm's CPU matmul computes with: Q8_0 blocks for q4_0 / q8_0 weights, float16 for f16
    weights (the float16 accumulation of ARMv8.2 ggml is not simulated), unchanged for f32. Returns the
    hook handles (call .remove() on each, or use mllm_cpu_numerics)."""
    modules = dict(model.named_modules())
    handles = []
    for name, weight_format in formats.items():
        if name not in modules:
            raise PipelineError(f"the model has no module {name!r}")
        if weight_format not in INPUT_FORMAT_OF_WEIGHT:
            raise PipelineError(f"{name}: unknown weight format {weight_format!r}")
        kind = INPUT_FORMAT_OF_WEIGHT[weight_format]
        if kind == "q8_0":
            handles.append(modules[name].register_forward_pre_hook(_q8_0_input_hook(variant)))
        elif kind == "f16":
            handles.append(modules[name].register_forward_pre_hook(_f16_input_hook))
        elif kind is not None:
            raise PipelineError(f"{name}: input quantization for {weight_format} weights ({kind}) is not simulated")
    return handles


_FORMAT_OF_CODE = {0: "f32", 1: "f16", 2: "q4_0", 8: "q8_0", 12: "q4_k", 14: "q6_k"}  # mllm DataType codes


def formats_from_dtypes(model: torch.nn.Module, dtypes: dict[str, int]) -> dict[str, str]:
    """{Linear name: weight format} for mllm_cpu_numerics from a decoding file's {tensor name: mllm dtype code}
    (e.g. from read_mllm(path).entries): every nn.Linear of
    `model` whose `<name>.weight` the file stores. A Linear the file lacks is refused."""
    out = {}
    for name in linear_names(model):
        code = dtypes.get(f"{name}.weight")
        if code is None:
            raise PipelineError(f"the decoding file has no {name}.weight")
        if code not in _FORMAT_OF_CODE:
            raise PipelineError(f"{name}.weight: mllm dtype code {code} is not simulated")
        out[name] = _FORMAT_OF_CODE[code]
    return out


def linear_names(model: torch.nn.Module) -> list[str]:
    """Names of every nn.Linear of `model` (the decoder's projections and the head)."""
    return [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]


# ---- float16 K/V -------------------------------------------------------------------------------

FP16_KV_PREFIX = "mllm_fp16kv_"


def _round_f16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float16).to(t.dtype)


def register_fp16_kv_attention(base: str) -> str:
    """Register (once) an attention implementation that runs transformers' `base` ("sdpa", "eager", ...)
    on the key and value states rounded to float16, and the attention-mask function of `base` under the
    same name. Returns the name to set as config._attn_implementation."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    name = FP16_KV_PREFIX + base
    if name in ALL_ATTENTION_FUNCTIONS._global_mapping:
        return name
    if base == "eager":
        def inner(module, *args, **kwargs):  # the model's own eager function (it lives in its module)
            return sys.modules[type(module).__module__].eager_attention_forward(module, *args, **kwargs)
        mask = ALL_MASK_ATTENTION_FUNCTIONS._global_mapping["eager"]
    else:
        known = ALL_ATTENTION_FUNCTIONS._global_mapping
        if base not in known or base not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
            raise PipelineError(f"attention implementation {base!r} cannot be wrapped for float16 K/V")
        def inner(module, *args, **kwargs):  # looked up per call, so a later re-registration of `base` counts
            return ALL_ATTENTION_FUNCTIONS._global_mapping[base](module, *args, **kwargs)
        mask = ALL_MASK_ATTENTION_FUNCTIONS._global_mapping[base]

    def attention(module, query, key, value, attention_mask, **kwargs):
        return inner(module, query, _round_f16(key), _round_f16(value), attention_mask, **kwargs)

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, mask)
    return name


def _configs(model: torch.nn.Module) -> list:
    seen, configs = set(), []
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation") and id(config) not in seen:
            seen.add(id(config))
            configs.append(config)
    return configs


@contextlib.contextmanager
def fp16_kv(model: torch.nn.Module) -> Iterator[None]:
    """Within the block, `model`'s attention sees K (after RoPE) and V rounded to float16, as mllm's CPU
    KV cache stores them; Q, scores, softmax and P @ V stay float32. Restores the implementation after."""
    configs = _configs(model)
    if not configs:
        raise PipelineError("the model has no config with an attention implementation")
    previous = [config._attn_implementation for config in configs]
    try:
        for config, base in zip(configs, previous):
            base = base or "eager"
            if base.startswith(FP16_KV_PREFIX):
                continue
            config._attn_implementation = register_fp16_kv_attention(base)
        yield
    finally:
        for config, base in zip(configs, previous):
            config._attn_implementation = base


@contextlib.contextmanager
def mllm_cpu_numerics(model: torch.nn.Module, formats: dict[str, str | None] | None = None,
                      kv_float16: bool = True, variant: str = "neon") -> Iterator[None]:
    """Run `model` as mllm's CPU backend computes within the block: inputs of the Linears in `formats`
    ({name: weight format}; default every Linear as q4_0, i.e. Q8_0 inputs) quantized as their vec_dot
    needs, and (`kv_float16`) K/V rounded to float16. The weights are not touched."""
    if formats is None:
        formats = {name: "q4_0" for name in linear_names(model)}
    handles = install_input_quantization(model, formats, variant)
    try:
        with fp16_kv(model) if kv_float16 else contextlib.nullcontext():
            yield
    finally:
        for handle in handles:
            handle.remove()

