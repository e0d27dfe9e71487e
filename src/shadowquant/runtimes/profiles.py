"""Runtime profiles: what the target engine computes for every quantized Linear, as data in one place.

A profile says, per Linear role (the last component of the module name, e.g. `down_proj`), the
input and output bit widths, which Linear's scale a shared quantizer reads, how the quantizer rounds,
the dtype the dequantized output is handed on in, which roles can run the shadow op, how a bias is
stored, and what else the runtime loads (lm_head). The simulation (runtime_linear), the decisions
(runtimes/), the export, the inspector and the reports read it; no stage asks for a family.

The mllm facts behind the profiles are listed in docs/runtime.md (read from mllm's v1 branch:
backends/qnn/op/QNNLinearINT8.cpp, QNNQuantize.cpp, QNNDequantize(Add).cpp, backends/cpu/op/
CPUQuantize.cpp and CPULinearINT8Shadow.cpp, models/qwen/modeling_qwen_npu_v2.hpp and
configuration_qwen.hpp, models/phonelm/modeling_phonelm_npu.hpp); the arithmetic around the Linears
(hvx_dequantize, npu_norm_eps, silu, attention, cpu_layer_roles) from the op package's LLaMADequantize.cpp,
RMSNorm.cpp and SiLU.cpp, backends/qnn/op/QNNSiLUHigh.cpp, backends/cpu/op/CPUKVCacheNPU.cpp, CPURoPE.cpp,
CPUSoftMax.cpp and compute/Matmul.cpp with third_party/ggml/GemmLlamafile.cpp.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from shadowquant.errors import PipelineError
from shadowquant.export.dtypes import (DTYPE_FLOAT16, DTYPE_FLOAT32, DTYPE_INT8, DTYPE_INT32, DTYPE_ITEMSIZE, DTYPE_Q4_0,
                                       DTYPE_Q8_0)
from shadowquant.model.families import FAMILIES, NPU_FAMILIES

IDEAL = "ideal"
FP16_MAX = 65504.0
# Rounding of a quantizer: "even" is round half to even (torch.round, mllm's CPU Quantize),
# "half_up" is floor(x / step + 0.5) (mllm's NPU LLaMAQuantize).
ROUNDINGS = ("even", "half_up")
# The runtime's shadow op keeps this many positions per call (CPULinearINT8Shadow's buffers).
SHADOW_MAX_POSITIONS = 1024


@dataclass(frozen=True)
class SideSpec:
    """One quantizer: its bit width, whose scale it reads and how it rounds."""

    bits: int = 8
    # (role, side) whose static scale this quantizer uses; None: the Linear's own scale of this side.
    scale_from: tuple[str, str] | None = None
    rounding: str = "even"
    # The dtype the quantizer's input arrives in ("float16": it quantizes in float16 arithmetic) or,
    # for an output, the dtype the dequantized value is handed on in.
    dtype: str = "float32"
    # For an output: dequantized by the HTP op package's LLaMADequantize (HVX): the integer level is
    # converted to float16 first (11 significant bits: int16 levels beyond 2048 are rounded), then
    # multiplied by the float32 step (float32 out) or, for float16 out, by the step rounded to float16
    # (subnormal below 2^-14) in float16. False: level * step exactly (the CPU, or int8 to float32).
    hvx_dequantize: bool = False

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1))

    @property
    def min_range(self) -> float:
        """The smallest range an fp16 quantizer can use: the NPU rounds the float32 reciprocal of the step
        to fp16, which overflows (inf, NaN levels) once the step is below 1 / 65504."""
        return self.qmax / FP16_MAX if self.dtype == "float16" else 0.0


@dataclass(frozen=True)
class RoleSpec:
    """How the runtime runs one Linear role."""

    input: SideSpec = SideSpec()
    output: SideSpec = SideSpec()
    shadow: bool = False  # runs the CPU shadow op (only in shadow layers, for the roles that have one)


@dataclass(frozen=True)
class RuntimeProfile:
    name: str
    description: str
    roles: dict[str, RoleSpec]  # normal layers
    shadow_roles: dict[str, RoleSpec] = field(default_factory=dict)  # overrides in shadow layers
    # Overrides in layer 0 and in every layer after a shadow layer, where input_layernorm and the q/k/v
    # quantizer run on the CPU (the other layers run them on the NPU, inside the previous graph).
    cpu_layer_roles: dict[str, RoleSpec] = field(default_factory=dict)
    # The rest of the arithmetic around the Linears (runtime_linear.apply_runtime_model):
    # epsilon of the RMSNorms that run on the NPU (None: the model's own everywhere); the CPU's RMSNorm
    # (input_layernorm of the CPU layers above, the final norm) uses the model's.
    npu_norm_eps: float | None = None
    # SiLU of gate_proj's output in a normal layer, where it arrives in float16: "float" (exact),
    # "fp16-sigmoid" (QNN Sigmoid then LLaMAMul, both float16: use_high_precision_silu), or "fp16-poly"
    # (LLaMAPackage SiLU's float16 path: piecewise quartic sigmoid on 16 segments of [-8, 8), no
    # saturation outside). In a shadow layer the float32 path runs (taken as exact).
    silu: str = "float"
    # The CPU's attention: "float" (float32 throughout), or "fp16-cpu": k after RoPE and the KV cache in
    # float16, q rounded to float16 for QK^T, the probabilities rounded to float16 for PV, both products
    # accumulated in float16 in 8 lanes (llamafile's tinyBLAS on ARM with fp16 arithmetic), softmax in float32.
    attention: str = "float"
    families: tuple[str, ...] = ()  # families whose Linear roles the profile knows
    # "any": every side can be a shadow side (the idealized simulation); else the role whose both
    # sides are shadow in a shadow layer.
    shadow_role: str | None = None
    bias: str = "int8"  # "int8" per tensor (ideal), "int32" (+ bias.scale), "float32", "none"
    lm_head: str = "float"  # "tied-or-own": tied embedding when tied; "own": always lm_head.weight
    cpp_model: str = ""  # the mllm model (and config) that runs the file
    # Why mllm v1 (the commit the bundle names) cannot load this profile's model as it is; "" when it can.
    mllm_v1_blocker: str = ""
    shadow_set_location: str = ""  # where the runtime takes its shadow-layer set from

    def spec(self, layer: str, shadow_layers: frozenset[int] | set[int] = frozenset()) -> RoleSpec:
        """The RoleSpec of a Linear by module name, in a shadow layer or not."""
        role = layer_role(layer)
        index = layer_index(layer)
        if index is not None and index in shadow_layers and role in self.shadow_roles:
            return self.shadow_roles[role]
        if index is not None and self.cpu_layer(index, shadow_layers) and role in self.cpu_layer_roles:
            return self.cpu_layer_roles[role]
        if role not in self.roles:
            raise PipelineError(f"runtime profile '{self.name}' has no Linear role '{role}' (layer {layer}); "
                                f"it knows {', '.join(self.roles)}: set runtime.profile to ideal for this model")
        return self.roles[role]

    @staticmethod
    def cpu_layer(index: int, shadow_layers) -> bool:
        """Whether decoder layer `index` starts on the CPU: layer 0 and every layer after a shadow layer run
        input_layernorm and the q/k/v quantizer on the CPU (QwenNPU_CPUDecoder)."""
        return index == 0 or (index - 1) in shadow_layers

    def can_shadow(self, layer: str, shadow_layers) -> bool:
        """Whether this Linear's clip flags mean anything at run time (it runs the shadow op)."""
        if self.shadow_role == "any":
            return True
        return self.spec(layer, frozenset(shadow_layers)).shadow


_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)\.")


def layer_index(layer: str) -> int | None:
    """The decoder layer a module belongs to (`model.layers.11.mlp.down_proj` -> 11), or None."""
    match = _LAYER_INDEX.search(layer)
    return int(match[1]) if match else None


def layer_role(layer: str) -> str:
    return layer.rsplit(".", 1)[-1]


INT16 = SideSpec(bits=16)
_QKV_INPUT = SideSpec(bits=16, scale_from=("q_proj", "input"), rounding="half_up")
_MLP_INPUT = SideSpec(bits=8, scale_from=("up_proj", "input"), rounding="half_up")

# Every NPU output goes through LLaMADequantize (hvx_dequantize): int16 levels lose integers beyond 2048.
_I16_TO_F32 = SideSpec(bits=16, dtype="float32", hvx_dequantize=True)
_I16_TO_F16 = SideSpec(bits=16, dtype="float16", hvx_dequantize=True)
_I8_TO_F32 = SideSpec(bits=8, dtype="float32", hvx_dequantize=True)
_I8_TO_F16 = SideSpec(bits=8, dtype="float16", hvx_dequantize=True)
QWEN_NPU_ROLES = {
    # q/k/v: one int16 quantizer with q_proj.input_scale (on the NPU); int16 outputs, q to fp32, k/v to fp16.
    "q_proj": RoleSpec(_QKV_INPUT, _I16_TO_F32),
    "k_proj": RoleSpec(_QKV_INPUT, _I16_TO_F16),
    "v_proj": RoleSpec(_QKV_INPUT, _I16_TO_F16),
    # o_proj: int8, quantized on the CPU (round half to even), dequantized to fp32.
    "o_proj": RoleSpec(SideSpec(bits=8, rounding="even"), _I8_TO_F32),
    # gate/up: one int8 quantizer with up_proj.input_scale; outputs dequantized to fp16.
    "gate_proj": RoleSpec(_MLP_INPUT, _I8_TO_F16),
    "up_proj": RoleSpec(_MLP_INPUT, _I8_TO_F16),
    # down_proj: int16 from the fp16 SiLU * up product (quantized in fp16), int16 out to fp32.
    "down_proj": RoleSpec(SideSpec(bits=16, rounding="half_up", dtype="float16"), _I16_TO_F32),
}
QWEN_NPU_SHADOW_ROLES = {
    # In a shadow layer gate/up go to fp32 and down_proj is int8 with the CPU shadow op.
    "gate_proj": RoleSpec(_MLP_INPUT, _I8_TO_F32),
    "up_proj": RoleSpec(_MLP_INPUT, _I8_TO_F32),
    "down_proj": RoleSpec(SideSpec(bits=8, rounding="half_up"), SideSpec(bits=8, dtype="float32"), shadow=True),
}
# Layer 0 and the layers after a shadow layer quantize the q/k/v input on the CPU (CPUQuantize: round half
# to even); the others on the NPU (LLaMAQuantize: floor(x / step + 0.5)).
_QKV_CPU_INPUT = SideSpec(bits=16, scale_from=("q_proj", "input"), rounding="even")
QWEN_NPU_CPU_LAYER_ROLES = {
    "q_proj": RoleSpec(_QKV_CPU_INPUT, _I16_TO_F32),
    "k_proj": RoleSpec(_QKV_CPU_INPUT, _I16_TO_F16),
    "v_proj": RoleSpec(_QKV_CPU_INPUT, _I16_TO_F16),
}
# LLaMAPackage's RMSNorm (ops/RMSNorm.cpp) hard-codes its epsilon; the C++ config's rms_norm_eps reaches
# only the CPU's RMSNorm.
NPU_RMSNORM_EPS = 1e-6
_QWEN_NOTE = ("models/qwen/configuration_qwen.hpp: QWenNPUConfig's shadow_layers set of the config "
              "(billionsType) the demo builds; nothing is read from the model file")

_PHONELM_INPUT = SideSpec(bits=8, scale_from=("q_proj", "input"), rounding="half_up")
PHONELM_ROLES = {
    "q_proj": RoleSpec(_PHONELM_INPUT, SideSpec()),
    "k_proj": RoleSpec(_PHONELM_INPUT, SideSpec()),
    "v_proj": RoleSpec(_PHONELM_INPUT, SideSpec()),
    "o_proj": RoleSpec(SideSpec(rounding="even"), SideSpec()),
    "gate_proj": RoleSpec(_MLP_INPUT, SideSpec()),
    "up_proj": RoleSpec(_MLP_INPUT, SideSpec()),
    # ReLU and Mul stay int8 in normal layers: down_proj's input step is gate_proj's output step.
    "down_proj": RoleSpec(SideSpec(scale_from=("gate_proj", "output")), SideSpec()),
}
PHONELM_SHADOW_ROLES = {
    "down_proj": RoleSpec(SideSpec(rounding="half_up"), SideSpec(), shadow=True),
}

# mllm v1 at 013e4cec: QNNDequantize::load (backends/qnn/op/QNNDequantize.cpp) allocates a q/k/v `bias_`
# tensor that was never given a backend (the constructor sets only scale_'s), so loading any model that
# builds a q/k/v Dequantize (the int32-bias Qwen configs, PhoneLM's NPU model) dereferences a null
# pointer; the DequantizeAdd of the '-rotated' configs sets its backends.
MLLM_V1_LOAD_CRASH = ("mllm v1 (013e4cec) cannot load this model: QNNDequantize::load allocates the q/k/v "
                      "bias_ tensor without a backend (backends/qnn/op/QNNDequantize.cpp; add "
                      "`bias_.setBackend(Backend::global_backends[MLLM_CPU].get());` to its constructor), "
                      "a null dereference; runtime.profile qwen-npu-rotated runs the same arithmetic with "
                      "float32 bias and loads")

QWEN_NPU = RuntimeProfile(
    name="qwen-npu",
    description="mllm's Qwen NPU model (modeling_qwen_npu_v2), int32 bias (use_i32_bias, the default configs)",
    roles=QWEN_NPU_ROLES, shadow_roles=QWEN_NPU_SHADOW_ROLES, cpu_layer_roles=QWEN_NPU_CPU_LAYER_ROLES,
    npu_norm_eps=NPU_RMSNORM_EPS, silu="fp16-sigmoid", attention="fp16-cpu",
    families=NPU_FAMILIES, shadow_role="down_proj", bias="int32", lm_head="tied-or-own",
    cpp_model="mllm/models/qwen/modeling_qwen_npu_v2.hpp (QWenForCausalLM_NPU)",
    shadow_set_location=_QWEN_NOTE, mllm_v1_blocker=MLLM_V1_LOAD_CRASH)

PROFILES: dict[str, RuntimeProfile] = {
    "qwen-npu": QWEN_NPU,
    # The '-rotated' configs: the same model with float32 bias added after dequantization.
    "qwen-npu-rotated": replace(
        QWEN_NPU, name="qwen-npu-rotated", bias="float32",
        mllm_v1_blocker="",
        description="mllm's Qwen NPU model with float32 bias added after dequantization (the '-rotated' configs)",
        cpp_model="mllm/models/qwen/modeling_qwen_npu_v2.hpp (QWenForCausalLM_NPU, use_i32_bias = false)"),
    "phonelm-npu": RuntimeProfile(
        name="phonelm-npu",
        description="mllm's PhoneLM NPU model (modeling_phonelm_npu): every Linear int8, no bias",
        roles=PHONELM_ROLES, shadow_roles=PHONELM_SHADOW_ROLES, families=NPU_FAMILIES,
        shadow_role="down_proj", bias="none", lm_head="own",
        cpp_model="mllm/models/phonelm/modeling_phonelm_npu.hpp (PhoneLMForCausalLM_NPU)",
        shadow_set_location="models/phonelm/modeling_phonelm_npu.hpp: the global phonelmShadowLayers set",
        mllm_v1_blocker=MLLM_V1_LOAD_CRASH.replace("qwen-npu-rotated runs the same arithmetic with float32 bias "
                                                   "and loads", "qwen-npu-rotated loads (another arithmetic)")),
    IDEAL: RuntimeProfile(
        name=IDEAL,
        description=("idealized W8A8 of the original profiling tools: every Linear int8, any side a shadow "
                     "side restored exactly; no phone runs this"),
        roles={}, families=FAMILIES,
        shadow_role="any", bias="int8", lm_head="float"),
}
PROFILE_NAMES = tuple(PROFILES)
# What 'auto' takes for LLaMA-shaped families: the configuration mllm v1's shipped Qwen demos run, and
# the only NPU one whose model loads at the commit the bundle names (MLLM_V1_LOAD_CRASH).
DEFAULT_PROFILE = "qwen-npu-rotated"


def get_profile(name: str, family: str | None = None) -> RuntimeProfile:
    """The profile named `name`; with `family`, checked that the profile can run that family."""
    if name not in PROFILES:
        raise PipelineError(f"runtime.profile {name!r} is not known; valid values: {', '.join(PROFILES)}")
    profile = PROFILES[name]
    if family is not None and family not in profile.families:
        raise PipelineError(f"runtime.profile {name!r} runs {'/'.join(profile.families)} models (mllm has no NPU "
                            f"model for family {family!r}); set runtime.profile to ideal")
    return profile



# The Linears whose bias mllm's Qwen models build: q/k/v (the NPU model's `use_i32_bias` Linears or its
# DequantizeAdd ops; the CPU model's MultiHeadAttention with qkv_bias = true). Always allocated and loaded,
# so a model without q/k/v biases gets zero ones in both files.
QKV_ROLES = ("q_proj", "k_proj", "v_proj")
_PARENTS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
            "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def _cpp_linear_shapes(dims: dict) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of every Linear of a decoder layer as mllm's C++ models build them:
    head_dim = hidden_size / num_attention_heads (modeling_qwen_npu_v2.hpp:46, modeling_qwen.hpp:62,
    modeling_phonelm*.hpp), whatever head_dim the Hugging Face config has."""
    hidden, inter = int(dims["hidden_size"]), int(dims["intermediate_size"])
    heads = int(dims["num_attention_heads"])
    head_dim = hidden // heads
    q_out, kv_out = heads * head_dim, int(dims["num_key_value_heads"]) * head_dim
    return {"q_proj": (hidden, q_out), "k_proj": (hidden, kv_out), "v_proj": (hidden, kv_out),
            "o_proj": (q_out, hidden), "gate_proj": (hidden, inter), "up_proj": (hidden, inter),
            "down_proj": (inter, hidden)}


def loaded_tensors(profile: RuntimeProfile, dims: dict, shadow_layers) -> dict[str, tuple[int, int]]:
    """{name: (mllm dtype code, byte size)} of every tensor the profile's C++ NPU model asks its loader for,
    whether the op uses the value or not (mllm v1: models/qwen/modeling_qwen_npu_v2.hpp,
    models/phonelm/modeling_phonelm_npu.hpp; the ops' load()):

    - every QNN Linear (backends/qnn/op/QNNLinearINT8.cpp, load): `weight` int8 [in, out], `weight.scale`,
      `bias.scale` (asked for unconditionally, bias or not) and `output_scale`, float32 scalars; `bias` int32
      [out] only when built with a bias: q/k/v under `use_i32_bias` (qwen-npu);
    - the Dequantize ops (QNNDequantize.cpp / QNNDequantizeAdd.cpp) ask for `<Linear>.output_scale`; the
      DequantizeAdd of q/k/v (qwen-npu-rotated) also for a float32 `<Linear>.bias` [out];
    - every Quantize op (CPUQuantize.cpp / QNNQuantize.cpp) `<Linear>.input_scale`: one for q/k/v
      (q_proj's), o_proj, one for gate/up (up_proj's), down_proj (not in a PhoneLM normal layer, whose
      down_proj quantizer is commented out); the CPU shadow op (CPULinearINT8Shadow.cpp) of a shadow
      layer's down_proj asks for its weight, scales and the int8 one-element `clip_input`, `clip_output`;
    - RMSNorm (CPU in layer 0 and after a shadow layer, else on the NPU; the same name), the CPU
      Embedding, the final norm and the head: `lm_head.weight` (HeadLinear/Linear) unless the C++ config
      ties it, in which case a Parameter asks for `model.embed_tokens.weight` again. These ops take the
      dtype from the file; the list says float32, what the export writes and the CPU ops compute with.

    `dims` is runtime.json's `cpp_config` (hidden_size, intermediate_size, num_attention_heads,
    num_key_value_heads, num_hidden_layers, vocab_size, tie_embedding_words). The loader rejects a tensor
    whose byte size differs from what the op allocated (mmap) or reads part of it (file IO), and skips a
    missing name without a word, leaving the op's memory uninitialised, so the inspector checks all three.
    """
    if not profile.cpp_model:
        raise PipelineError(f"runtime profile '{profile.name}' has no C++ model; its files are checked Linear by Linear")
    shapes = _cpp_linear_shapes(dims)
    hidden, vocab = int(dims["hidden_size"]), int(dims["vocab_size"])
    shadow_layers = frozenset(int(i) for i in shadow_layers)
    out: dict[str, tuple[int, int]] = {"model.embed_tokens.weight": (DTYPE_FLOAT32, 4 * vocab * hidden)}
    for index in range(int(dims["num_hidden_layers"])):
        base = f"model.layers.{index}"
        out[f"{base}.input_layernorm.weight"] = (DTYPE_FLOAT32, 4 * hidden)
        for role, (fan_in, fan_out) in shapes.items():
            name = f"{base}.{_PARENTS[role]}.{role}"
            spec = profile.spec(name, shadow_layers)
            out[f"{name}.weight"] = (DTYPE_INT8, fan_in * fan_out)
            if role in QKV_ROLES and profile.bias == "int32":
                out[f"{name}.bias"] = (DTYPE_INT32, 4 * fan_out)  # the Linear's
            elif role in QKV_ROLES and profile.bias == "float32":
                out[f"{name}.bias"] = (DTYPE_FLOAT32, 4 * fan_out)  # the DequantizeAdd's
            out[f"{name}.weight.scale"] = (DTYPE_FLOAT32, 4)
            out[f"{name}.bias.scale"] = (DTYPE_FLOAT32, 4)
            out[f"{name}.output_scale"] = (DTYPE_FLOAT32, 4)
            source = spec.input.scale_from
            if source is None:
                out[f"{name}.input_scale"] = (DTYPE_FLOAT32, 4)
            elif source[1] == "input":
                out[f"{base}.{_PARENTS[source[0]]}.{source[0]}.input_scale"] = (DTYPE_FLOAT32, 4)
            if spec.shadow:
                out[f"{name}.clip_input"] = (DTYPE_INT8, 1)
                out[f"{name}.clip_output"] = (DTYPE_INT8, 1)
        out[f"{base}.post_attention_layernorm.weight"] = (DTYPE_FLOAT32, 4 * hidden)
    out["model.norm.weight"] = (DTYPE_FLOAT32, 4 * hidden)
    if profile.lm_head == "own" or not dims.get("tie_embedding_words", False):
        out["lm_head.weight"] = (DTYPE_FLOAT32, 4 * vocab * hidden)
    return out


def decode_loaded_tensors(profile: RuntimeProfile, dims: dict, dtype_of, tied: bool = False
                          ) -> dict[str, tuple[int, int]]:
    """{name: (mllm dtype code, byte size)} of every tensor mllm's CPU decoding model asks its loader for,
    from the decoding file: QWenForCausalLM (models/qwen/modeling_qwen.hpp) under the Qwen profiles,
    whose MultiHeadAttention is built with q/k/v bias on whatever the model (so a model without q/k/v
    biases needs zero ones), and PhoneLMForCausalLM (models/phonelm/modeling_phonelm.hpp, no bias) under
    phonelm-npu. Every CPU op there (CPULinear, CPUEmbedding, CPURMSNorm, CPUParameter) takes the dtype
    from the file, so the byte size follows the name's dtype: `dtype_of(name)` (decoding.candidates.decode_dtype for
    mllm's quantizer's Q4_0 recipe, decoding.candidates.file_dtype_of for a written file of any recipe), Q4_0 18
    bytes per 32 values, Q8_0 34, float32 4 bytes a value.

    `tied`: a C++ config with tie_embedding_words builds the head as a Parameter reading
    `model.embed_tokens.weight` (the embedding's blocks) and asks for no `lm_head.weight`. The decoding
    file always stores `lm_head.weight` beside the embedding, so the untied list (the default) holds both.
    """
    from shadowquant.decoding.q4_0 import q4_0_nbytes
    from shadowquant.decoding.q8_0 import q8_0_nbytes

    # The dtypes mllm's CPU ops read from a decoding file (mllm/Types.hpp codes) and their byte sizes.
    nbytes_of = {DTYPE_Q4_0: q4_0_nbytes, DTYPE_Q8_0: q8_0_nbytes,
                 DTYPE_FLOAT32: lambda n: n * DTYPE_ITEMSIZE[DTYPE_FLOAT32],
                 DTYPE_FLOAT16: lambda n: n * DTYPE_ITEMSIZE[DTYPE_FLOAT16]}

    if not profile.cpp_model:
        raise PipelineError(f"runtime profile '{profile.name}' has no C++ model; it has no decoding model either")
    shapes = _cpp_linear_shapes(dims)
    hidden, vocab = int(dims["hidden_size"]), int(dims["vocab_size"])
    qkv_bias = profile.bias != "none"
    numels = {"model.embed_tokens.weight": vocab * hidden}
    for index in range(int(dims["num_hidden_layers"])):
        base = f"model.layers.{index}"
        for role, (fan_in, fan_out) in shapes.items():
            name = f"{base}.{_PARENTS[role]}.{role}"
            numels[f"{name}.weight"] = fan_in * fan_out
            if qkv_bias and role in QKV_ROLES:
                numels[f"{name}.bias"] = fan_out
        numels[f"{base}.input_layernorm.weight"] = hidden
        numels[f"{base}.post_attention_layernorm.weight"] = hidden
    numels["model.norm.weight"] = hidden
    if not tied:
        numels["lm_head.weight"] = vocab * hidden
    out = {}
    for name, numel in numels.items():
        code = int(dtype_of(name))
        if code not in nbytes_of:
            raise PipelineError(f"{name}: dtype code {code} is not one a decoding model stores; valid codes: "
                                f"{', '.join(str(c) for c in sorted(nbytes_of))}")
        try:
            out[name] = (code, nbytes_of[code](numel))
        except PipelineError as exc:
            raise PipelineError(f"{name}: {exc}") from None
    return out


# Where mllm's NPU model cannot represent a model, the idealized simulation still can.
IDEAL_HINT = ": set runtime.profile to ideal for this model"


def rope_parameters(hf_config) -> dict:
    """The RoPE parameters of a Hugging Face config: transformers 5 keeps them in `rope_parameters`
    (rope_theta included); older configs have `rope_theta` and `rope_scaling` as attributes."""
    params = getattr(hf_config, "rope_parameters", None)
    if isinstance(params, dict) and params.get("rope_theta") is not None:
        return dict(params)
    scaling = dict(getattr(hf_config, "rope_scaling", None) or {})
    theta = getattr(hf_config, "rope_theta", None)
    if theta is None:
        raise PipelineError("the model config has no rope_theta (neither rope_parameters['rope_theta'] nor "
                            "rope_theta): the C++ model's RoPE base cannot be set")
    scaling.setdefault("rope_type", scaling.get("type", "default"))
    return {**scaling, "rope_theta": theta}


def _config_value(hf_config, key: str):
    value = getattr(hf_config, key, None)
    if value is None:
        raise PipelineError(f"the model config has no {key}; mllm's C++ model needs it")
    return value


def cpp_config(hf_config, profile: RuntimeProfile, tied: bool) -> dict:
    """What the C++ model's config must hold for this export (runtime.json's `cpp_config`): every value
    read from the Hugging Face config, and refused where mllm's Qwen models (QWenConfig/QWenNPUConfig,
    modeling_qwen.hpp, modeling_qwen_npu_v2.hpp) cannot represent the model."""
    hidden = int(_config_value(hf_config, "hidden_size"))
    heads = int(_config_value(hf_config, "num_attention_heads"))
    head_dim = int(getattr(hf_config, "head_dim", None) or hidden // heads)
    # Every mllm Qwen model computes head_dim = hidden_size / num_attention_heads.
    if head_dim * heads != hidden:
        raise PipelineError(f"the model config has head_dim {head_dim} with {heads} heads and hidden_size {hidden}; "
                            f"mllm's Qwen models use hidden_size / num_attention_heads = {hidden / heads:g}"
                            f"{IDEAL_HINT}")
    rope = rope_parameters(hf_config)
    rope_type = rope.get("rope_type") or "default"
    if rope_type != "default":
        raise PipelineError(f"the model uses RoPE scaling rope_type {rope_type!r} ({rope}); mllm's Qwen models "
                            f"implement only plain RoPE (rope_type 'default'){IDEAL_HINT}")
    partial = float(rope.get("partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", 1.0)) or 1.0)
    if partial != 1.0:
        raise PipelineError(f"the model rotates {partial:g} of each head (partial_rotary_factor); mllm's Qwen models "
                            f"rotate whole heads{IDEAL_HINT}")
    act = getattr(hf_config, "hidden_act", "silu")
    if act != "silu":
        raise PipelineError(f"the model's hidden_act is {act!r}; mllm's Qwen models compute SiLU{IDEAL_HINT}")
    # Qwen2's q/k/v biases have no config key; LLaMA's attention_bias also gives o_proj one.
    for key, what in (("mlp_bias", "gate/up/down biases"), ("attention_bias", "an o_proj bias")):
        if getattr(hf_config, key, False):
            raise PipelineError(f"the model config has {key} = true ({what}); mllm's Qwen models have no place "
                                f"for it{IDEAL_HINT}")
    eps = getattr(hf_config, "rms_norm_eps", None)
    if eps is None:
        raise PipelineError("the model config has no rms_norm_eps; mllm's Qwen models use RMSNorm")
    config = {
        "hidden_size": hidden,
        "intermediate_size": int(_config_value(hf_config, "intermediate_size")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(getattr(hf_config, "num_key_value_heads", None) or heads),
        "head_dim": head_dim,
        "num_hidden_layers": int(_config_value(hf_config, "num_hidden_layers")),
        "vocab_size": int(_config_value(hf_config, "vocab_size")),
        "rope_theta": float(rope["rope_theta"]),
        "rms_norm_eps": float(eps),
        "max_position_embeddings": int(_config_value(hf_config, "max_position_embeddings")),
        "tie_embedding_words": bool(tied),
        "use_i32_bias": profile.bias == "int32",
        # QNN SiLU as sigmoid(x) * x (the profile's SiLU): the fp16 polynomial breaks outside [-8, 8).
        "use_high_precision_silu": profile.silu != "fp16-poly",
    }
    for key in ("bos_token_id", "eos_token_id"):
        value = getattr(hf_config, key, None)
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if value is not None:
            config[key] = int(value)
    return config
