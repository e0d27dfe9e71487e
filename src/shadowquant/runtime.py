"""Runtime profiles: what the target engine computes for every quantized Linear, as data in one place.

A profile says, per Linear role (the last component of the module name, e.g. `down_proj`), the
input and output bit widths, which Linear's scale a shared quantizer reads, how the quantizer rounds,
the dtype the dequantized output is handed on in, which roles can run the shadow op, how a bias is
stored, and what else the runtime loads (lm_head). The simulation (runtime_linear), the decisions
(runtime_decision), the export, the inspector and the reports read it; no stage asks for a family.

The mllm facts behind the profiles are listed in docs/runtime.md (read from mllm's v1 branch:
backends/qnn/op/QNNLinearINT8.cpp, QNNQuantize.cpp, QNNDequantize(Add).cpp, backends/cpu/op/
CPUQuantize.cpp and CPULinearINT8Shadow.cpp, models/qwen/modeling_qwen_npu_v2.hpp and
configuration_qwen.hpp, models/phonelm/modeling_phonelm_npu.hpp).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from shadowquant.errors import PipelineError

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
    families: tuple[str, ...] = ()  # families whose Linear roles the profile knows
    # "any": every side can be a shadow side (the idealized simulation); else the role whose both
    # sides are shadow in a shadow layer.
    shadow_role: str | None = None
    bias: str = "int8"  # "int8" per tensor (ideal), "int32" (+ bias.scale), "float32", "none"
    lm_head: str = "float"  # "tied-or-own": tied embedding when tied; "own": always lm_head.weight
    cpp_model: str = ""  # the mllm model (and config) that runs the file
    shadow_set_location: str = ""  # where the runtime takes its shadow-layer set from

    @property
    def ideal(self) -> bool:
        return self.name == IDEAL

    def spec(self, layer: str, shadow_layers: frozenset[int] | set[int] = frozenset()) -> RoleSpec:
        """The RoleSpec of a Linear by module name, in a shadow layer or not."""
        role = layer_role(layer)
        index = layer_index(layer)
        if index is not None and index in shadow_layers and role in self.shadow_roles:
            return self.shadow_roles[role]
        if role not in self.roles:
            raise PipelineError(f"runtime profile '{self.name}' has no Linear role '{role}' (layer {layer}); "
                                f"it knows {', '.join(self.roles)}: set runtime.profile to ideal for this model")
        return self.roles[role]

    def can_shadow(self, layer: str, shadow_layers) -> bool:
        """Whether this Linear's clip flags mean anything at run time (it runs the shadow op)."""
        if self.ideal:
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
_LLAMA_SHAPED = ("llama", "qwen1", "qwen2")

QWEN_NPU_ROLES = {
    # q/k/v: one int16 quantizer with q_proj.input_scale (on the NPU); int16 outputs, q to fp32, k/v to fp16.
    "q_proj": RoleSpec(_QKV_INPUT, SideSpec(bits=16, dtype="float32")),
    "k_proj": RoleSpec(_QKV_INPUT, SideSpec(bits=16, dtype="float16")),
    "v_proj": RoleSpec(_QKV_INPUT, SideSpec(bits=16, dtype="float16")),
    # o_proj: int8, quantized on the CPU (round half to even), dequantized to fp32.
    "o_proj": RoleSpec(SideSpec(bits=8, rounding="even"), SideSpec(bits=8, dtype="float32")),
    # gate/up: one int8 quantizer with up_proj.input_scale; outputs dequantized to fp16.
    "gate_proj": RoleSpec(_MLP_INPUT, SideSpec(bits=8, dtype="float16")),
    "up_proj": RoleSpec(_MLP_INPUT, SideSpec(bits=8, dtype="float16")),
    # down_proj: int16 from the fp16 SiLU * up product (quantized in fp16), int16 out to fp32.
    "down_proj": RoleSpec(SideSpec(bits=16, rounding="half_up", dtype="float16"), SideSpec(bits=16, dtype="float32")),
}
QWEN_NPU_SHADOW_ROLES = {
    # In a shadow layer gate/up go to fp32 and down_proj is int8 with the CPU shadow op.
    "gate_proj": RoleSpec(_MLP_INPUT, SideSpec(bits=8, dtype="float32")),
    "up_proj": RoleSpec(_MLP_INPUT, SideSpec(bits=8, dtype="float32")),
    "down_proj": RoleSpec(SideSpec(bits=8, rounding="half_up"), SideSpec(bits=8, dtype="float32"), shadow=True),
}
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

QWEN_NPU = RuntimeProfile(
    name="qwen-npu",
    description="mllm's Qwen NPU model (modeling_qwen_npu_v2), int32 bias (use_i32_bias, the default configs)",
    roles=QWEN_NPU_ROLES, shadow_roles=QWEN_NPU_SHADOW_ROLES, families=_LLAMA_SHAPED,
    shadow_role="down_proj", bias="int32", lm_head="tied-or-own",
    cpp_model="mllm/models/qwen/modeling_qwen_npu_v2.hpp (QWenForCausalLM_NPU)",
    shadow_set_location=_QWEN_NOTE)

PROFILES: dict[str, RuntimeProfile] = {
    "qwen-npu": QWEN_NPU,
    # The '-rotated' configs: the same model with float32 bias added after dequantization.
    "qwen-npu-rotated": replace(
        QWEN_NPU, name="qwen-npu-rotated", bias="float32",
        description="mllm's Qwen NPU model with float32 bias added after dequantization (the '-rotated' configs)",
        cpp_model="mllm/models/qwen/modeling_qwen_npu_v2.hpp (QWenForCausalLM_NPU, use_i32_bias = false)"),
    "phonelm-npu": RuntimeProfile(
        name="phonelm-npu",
        description="mllm's PhoneLM NPU model (modeling_phonelm_npu): every Linear int8, no bias",
        roles=PHONELM_ROLES, shadow_roles=PHONELM_SHADOW_ROLES, families=_LLAMA_SHAPED,
        shadow_role="down_proj", bias="none", lm_head="own",
        cpp_model="mllm/models/phonelm/modeling_phonelm_npu.hpp (PhoneLMForCausalLM_NPU)",
        shadow_set_location="models/phonelm/modeling_phonelm_npu.hpp: the global phonelmShadowLayers set"),
    IDEAL: RuntimeProfile(
        name=IDEAL,
        description=("idealized W8A8 of the original profiling tools: every Linear int8, any side a shadow "
                     "side restored exactly; no phone runs this"),
        roles={}, families=("llama", "qwen1", "qwen2", "gemma", "phi", "opt", "mixtral", "falcon"),
        shadow_role="any", bias="int8", lm_head="float"),
}
PROFILE_NAMES = tuple(PROFILES)
DEFAULT_PROFILE = "qwen-npu"


def get_profile(name: str, family: str | None = None) -> RuntimeProfile:
    """The profile named `name`; with `family`, checked that the profile can run that family."""
    if name not in PROFILES:
        raise PipelineError(f"runtime.profile {name!r} is not known; valid values: {', '.join(PROFILES)}")
    profile = PROFILES[name]
    if family is not None and family not in profile.families:
        raise PipelineError(f"runtime.profile {name!r} runs {'/'.join(profile.families)} models (mllm has no NPU "
                            f"model for family {family!r}); set runtime.profile to ideal")
    return profile



# mllm dtype codes of the model file (method.md, the mllm v1 format).
FLOAT32, INT8, INT32 = 0, 16, 18
_BYTES = {FLOAT32: 4, INT8: 1, INT32: 4}
# Which quantizers (`<Linear>.input_scale`) the NPU models create: q/k/v share q_proj's, gate/up up_proj's.
_INPUT_SCALE_ROLES = ("q_proj", "o_proj", "up_proj", "down_proj")


def loaded_tensors(profile: RuntimeProfile, dims: dict, shadow_layers) -> dict[str, tuple[int, int]]:
    """{name: (mllm dtype code, byte size)} of every tensor the profile's C++ model loads and uses.

    `dims` is runtime.json's `cpp_config` (hidden_size, intermediate_size, num_attention_heads,
    num_key_value_heads, head_dim, num_hidden_layers, vocab_size, tie_embedding_words, qkv_bias).
    The loader rejects a tensor whose byte size differs from what the op allocated, and skips a
    missing name without a word, so both are checked by the inspector.
    """
    if profile.ideal:
        raise PipelineError("the ideal profile has no C++ model; its files are checked Linear by Linear")
    hidden, inter = int(dims["hidden_size"]), int(dims["intermediate_size"])
    q_out = int(dims["num_attention_heads"]) * int(dims["head_dim"])
    kv_out = int(dims["num_key_value_heads"]) * int(dims["head_dim"])
    shapes = {"q_proj": (hidden, q_out), "k_proj": (hidden, kv_out), "v_proj": (hidden, kv_out),
              "o_proj": (q_out, hidden), "gate_proj": (hidden, inter), "up_proj": (hidden, inter),
              "down_proj": (inter, hidden)}
    parents = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
               "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
    out: dict[str, tuple[int, int]] = {"model.embed_tokens.weight": (FLOAT32, 4 * int(dims["vocab_size"]) * hidden),
                                       "model.norm.weight": (FLOAT32, 4 * hidden)}
    if profile.lm_head == "own" or not dims.get("tie_embedding_words", False):
        out["lm_head.weight"] = (FLOAT32, 4 * int(dims["vocab_size"]) * hidden)
    shadow_layers = set(shadow_layers)
    for index in range(int(dims["num_hidden_layers"])):
        base = f"model.layers.{index}"
        out[f"{base}.input_layernorm.weight"] = (FLOAT32, 4 * hidden)
        out[f"{base}.post_attention_layernorm.weight"] = (FLOAT32, 4 * hidden)
        for role, (fan_in, fan_out) in shapes.items():
            name = f"{base}.{parents[role]}.{role}"
            out[f"{name}.weight"] = (INT8, fan_in * fan_out)
            out[f"{name}.weight.scale"] = (FLOAT32, 4)
            out[f"{name}.output_scale"] = (FLOAT32, 4)
            if role in _INPUT_SCALE_ROLES:
                out[f"{name}.input_scale"] = (FLOAT32, 4)
            if dims.get("qkv_bias") and role in ("q_proj", "k_proj", "v_proj"):
                if profile.bias == "int32":
                    out[f"{name}.bias"] = (INT32, 4 * fan_out)
                    out[f"{name}.bias.scale"] = (FLOAT32, 4)
                elif profile.bias == "float32":
                    out[f"{name}.bias"] = (FLOAT32, 4 * fan_out)
            if index in shadow_layers and role == profile.shadow_role:
                out[f"{name}.clip_input"] = (INT8, 1)
                out[f"{name}.clip_output"] = (INT8, 1)
    return out


def cpp_config(hf_config, profile: RuntimeProfile, tied: bool, qkv_bias: bool) -> dict:
    """What the C++ model's config must hold for this export (runtime.json's `cpp_config`)."""
    heads = int(hf_config.num_attention_heads)
    head_dim = getattr(hf_config, "head_dim", None) or int(hf_config.hidden_size) // heads
    return {
        "hidden_size": int(hf_config.hidden_size),
        "intermediate_size": int(hf_config.intermediate_size),
        "num_attention_heads": heads,
        "num_key_value_heads": int(getattr(hf_config, "num_key_value_heads", None) or heads),
        "head_dim": int(head_dim),
        "num_hidden_layers": int(hf_config.num_hidden_layers),
        "vocab_size": int(hf_config.vocab_size),
        "rope_theta": float(getattr(hf_config, "rope_theta", 10000.0) or 10000.0),
        "rms_norm_eps": float(getattr(hf_config, "rms_norm_eps", 1e-6) or 1e-6),
        "max_position_embeddings": int(getattr(hf_config, "max_position_embeddings", 0) or 0),
        "tie_embedding_words": bool(tied),
        "use_i32_bias": profile.bias == "int32",
        "qkv_bias": bool(qkv_bias),
    }
