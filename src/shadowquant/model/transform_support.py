"""Which exact transforms a model admits, from its family and Hugging Face config alone (torch-free).

The workflow asks this while the Snakefile is parsed (transform.variants 'auto' must name its run
directory before any model is loaded); shadowquant.model.transforms asks it again on the loaded model.
"""

from __future__ import annotations

from typing import Any, Mapping

from shadowquant.model.families import LAYERNORM, get_family

TRANSFORM_ORDER = ("rotate", "equalize", "smooth")


def _get(config: Any, key: str, default: Any) -> Any:
    if config is None:
        return default
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


def has_final_norm(config: Any, family: str) -> bool:
    """Whether the model ends in a norm before lm_head (OPT drops it when post-LayerNorm or for old
    checkpoints marked _remove_final_layer_norm: the record's pre_norm_flag and no_final_norm_flag)."""
    record = get_family(family)
    pre_norm = record.pre_norm_flag is None or bool(_get(config, record.pre_norm_flag, True))
    removed = record.no_final_norm_flag is not None and bool(_get(config, record.no_final_norm_flag, False))
    return pre_norm and not removed


def transform_support(family: str, config: Any = None, final_norm: bool | None = None) -> tuple[tuple[str, ...], str]:
    """(The transforms that are exact for this model, why the others are not; '' when all are).

    `config`: the model's Hugging Face config (object or config.json dict); None gives the family's
    general answer. `final_norm`: whether the loaded model has a final norm (None: from the config)."""
    record = get_family(family)
    model_type = _get(config, "model_type", family)
    if model_type in record.sandwich_norm_model_types:
        # Gemma 2 adds norms on the sublayer outputs: an orthogonal Q1 does not commute with their
        # scales, and its MLP input norm is named differently.
        return ("equalize",), (f"model_type {model_type!r}: its norms on the attention and MLP outputs do not "
                               "commute with it")
    if record.pre_norm_flag is not None and not _get(config, record.pre_norm_flag, True):
        return ("equalize",), (f"{record.pre_norm_flag}=False: the residual stream is a LayerNorm output, "
                               "whose scale and bias no fold can move")
    if final_norm is None:
        final_norm = has_final_norm(config, family)
    if record.norm == LAYERNORM and not final_norm:
        return ("equalize", "smooth"), "no final LayerNorm: lm_head reads the stream's mean, which rotate drops"
    if record.norm == LAYERNORM and not _get(config, "layer_norm_elementwise_affine", True):
        return ("rotate", "equalize"), ("LayerNorms without weights (layer_norm_elementwise_affine=False) cannot "
                                        "absorb smooth's scales")
    return TRANSFORM_ORDER, ""


# What transform.variants 'auto' prefers: rotation then smoothing (measured best on the default model:
# int8 weights +8.3 % -> -0.5 % perplexity); equalize only where neither is exact.
PREFERRED_STEPS = ("rotate", "smooth")


def auto_variant(family: str, config: Any = None) -> tuple[str, str]:
    """(The variant transform.variants 'auto' takes for this model, a one-line reason)."""
    valid, why_not = transform_support(family, config)
    steps = [step for step in PREFERRED_STEPS if step in valid] or [step for step in ("equalize",) if step in valid]
    variant = "+".join(steps) or "none"
    if variant == "rotate+smooth":
        return variant, f"family {family}: rotate and smooth are exact (the best measured variant)"
    return variant, f"family {family}: {variant} is the best exact variant ({why_not})"
