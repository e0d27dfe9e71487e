"""Model families: which architecture a checkpoint is, and which of its Linear layers are quantized."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Mapping

from shadowquant.errors import PipelineError

if TYPE_CHECKING:  # torch is imported where models are handled: the Snakefile reads this module torch-free
    from torch import nn

FAMILIES = ("llama", "qwen1", "qwen2", "gemma", "phi", "opt", "mixtral", "falcon")

# Hugging Face `config.model_type` -> family. Qwen1.5 checkpoints already use the qwen2
# architecture in transformers, so a declared `qwen1` is accepted for model_type qwen2.
MODEL_TYPE_TO_FAMILY: dict[str, str] = {
    "llama": "llama",
    "qwen2": "qwen2",
    "gemma": "gemma",
    "gemma2": "gemma",
    "phi": "phi",
    "opt": "opt",
    "mixtral": "mixtral",
    "falcon": "falcon",
    # Old Falcon checkpoints name their architecture after the dataset.
    "RefinedWeb": "falcon",
    "RefinedWebModel": "falcon",
}

# Families that may be declared for a model whose detected family is the key.
COMPATIBLE_DECLARATIONS: dict[str, tuple[str, ...]] = {"qwen2": ("qwen2", "qwen1")}

_LLAMA_LIKE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Last name component of the nn.Linear modules that the simulated W8A8 quantizes (METHOD.md section 3).
QUANTIZED_SUFFIXES: dict[str, tuple[str, ...]] = {
    "llama": _LLAMA_LIKE,
    "qwen1": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "phi": ("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"),
    "opt": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
    "falcon": ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
    "mixtral": ("q_proj", "k_proj", "v_proj", "o_proj", "gate", "w1", "w2", "w3"),
}

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
    if declared not in COMPATIBLE_DECLARATIONS.get(detected, (detected,)):
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

    if family not in QUANTIZED_SUFFIXES:
        raise PipelineError(f"unknown model family {family!r}; valid values: {', '.join(FAMILIES)}")
    suffixes = set(QUANTIZED_SUFFIXES[family])
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in suffixes and in_decoder_layer(name)
    ]
    if family == "mixtral" and not any(name.endswith(".w1") for name in names):
        # transformers 5 fuses the experts into 3-D tensors; they must be split into Linears first.
        raise PipelineError(
            "Mixtral experts are not nn.Linear layers; load the model with shadowquant.models.load_model "
            "(which calls prepare_for_quantization) before listing its quantized layers"
        )
    if not names:
        raise PipelineError(
            f"no quantizable Linear layers found for family {family!r} "
            f"(expected names ending in {', '.join(sorted(suffixes))} inside decoder layers)"
        )
    return names
