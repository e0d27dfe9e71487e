"""The family registry, family detection and the names of the Linear layers that are profiled and quantized."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest
import torch
import transformers
from torch import nn

from shadowquant.errors import PipelineError
from shadowquant.model.families import (
    FAMILIES,
    GGUF_MODEL_TYPES,
    LAYERNORM,
    MODEL_TYPE_TO_FAMILY,
    RMSNORM,
    detect_family,
    get_family,
    linear_layer_names,
    quantized_layer_names,
)
from shadowquant.model.loading import load_model
from shadowquant.model.transform_support import has_final_norm, transform_support
from shadowquant.model.transforms import supported_transforms

# Quantized Linears per decoder layer (docs/method.md section 3); Mixtral: 4 attention + router + 3 per expert.
NUM_EXPERTS = 4
PER_LAYER = {"llama": 7, "qwen1": 7, "qwen2": 7, "gemma": 7, "phi": 6, "opt": 6, "falcon": 4,
             "mixtral": 4 + 1 + 3 * NUM_EXPERTS}


@pytest.mark.parametrize(
    "model_type, family",
    [("llama", "llama"), ("qwen2", "qwen2"), ("gemma", "gemma"), ("gemma2", "gemma"), ("phi", "phi"),
     ("opt", "opt"), ("mixtral", "mixtral"), ("falcon", "falcon"), ("RefinedWebModel", "falcon")],
)
def test_detects_family_from_config_dict(model_type, family):
    assert detect_family({"model_type": model_type}) == family


def test_detects_family_from_config_object():
    assert detect_family(transformers.OPTConfig()) == "opt"
    assert detect_family(transformers.FalconConfig()) == "falcon"


def test_declared_family_must_agree():
    assert detect_family({"model_type": "llama"}, "llama") == "llama"
    with pytest.raises(PipelineError, match=r"'phi'.*'llama'"):
        detect_family({"model_type": "llama"}, "phi")


def test_qwen1_is_accepted_for_the_qwen2_architecture():
    assert detect_family({"model_type": "qwen2"}, "qwen1") == "qwen1"
    assert detect_family({"model_type": "qwen2"}) == "qwen2"
    with pytest.raises(PipelineError):
        detect_family({"model_type": "llama"}, "qwen1")


def test_unsupported_architecture_lists_supported_families():
    with pytest.raises(PipelineError) as info:
        detect_family({"model_type": "gpt2"})
    message = str(info.value)
    assert "'gpt2'" in message and all(family in message for family in FAMILIES)
    with pytest.raises(PipelineError, match="qwen2"):
        detect_family({"model_type": "qwen"})  # original remote-code Qwen
    with pytest.raises(PipelineError, match="model_type"):
        detect_family({})


def test_unknown_declared_family_is_rejected():
    with pytest.raises(PipelineError, match="valid values"):
        detect_family({"model_type": "llama"}, "llama2")


@pytest.mark.parametrize("family", FAMILIES)
def test_quantized_layer_names_per_family(family, tiny_model_dir):
    model, _, _ = load_model(tiny_model_dir(family), family=family)
    names = quantized_layer_names(model, family)
    modules = dict(model.named_modules())
    assert all(isinstance(modules[name], nn.Linear) for name in names)
    assert not any("lm_head" in name for name in names)
    assert all(name.rsplit(".", 1)[-1] in get_family(family).quantized_suffixes for name in names)
    per_layer = Counter(re.search(r"(?:layers|h)\.(\d+)\.", name).group(1) for name in names)
    assert per_layer == {"0": PER_LAYER[family], "1": PER_LAYER[family]}
    # Every quantized layer is profiled; what is profiled but not quantized is only lm_head
    # (and, for OPT, nothing else: its in/out projections are absent when dims agree).
    linear = linear_layer_names(model)
    assert set(names) <= set(linear)
    assert set(linear) - set(names) == {"lm_head"}


def test_falcon_dense_is_found_inside_attention(tiny_model_dir):
    model, _, _ = load_model(tiny_model_dir("falcon"))
    names = quantized_layer_names(model, "falcon")
    assert "transformer.h.0.self_attention.dense" in names
    assert "transformer.h.1.mlp.dense_4h_to_h" in names


def test_mixtral_names_follow_the_classic_layout(tiny_model_dir):
    model, _, _ = load_model(tiny_model_dir("mixtral"))
    names = quantized_layer_names(model, "mixtral")
    assert "model.layers.0.mlp.gate" in names
    assert [n for n in names if n.startswith("model.layers.1.mlp.experts.3.")] == [
        "model.layers.1.mlp.experts.3.w1", "model.layers.1.mlp.experts.3.w2", "model.layers.1.mlp.experts.3.w3"]


def test_fused_mixtral_is_refused():
    config = transformers.MixtralConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, vocab_size=32,
                                        num_local_experts=2, num_experts_per_tok=1)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(PipelineError, match="prepare_for_quantization"):
        quantized_layer_names(model, "mixtral")


def test_linears_outside_decoder_layers_are_not_quantized():
    # OPT with a narrower word embedding has project_in/project_out Linears outside the layers.
    config = transformers.OPTConfig(hidden_size=16, ffn_dim=32, num_attention_heads=2, num_hidden_layers=1,
                                    word_embed_proj_dim=8, vocab_size=32, max_position_embeddings=32)
    model = transformers.AutoModelForCausalLM.from_config(config)
    names = quantized_layer_names(model, "opt")
    linear = linear_layer_names(model)
    assert "model.decoder.project_in" in linear and "model.decoder.project_out" in linear
    assert not any("project" in name for name in names)
    assert len(names) == 6


def test_linear_layer_names_follow_named_modules_order(tiny_model_dir):
    model, _, _ = load_model(tiny_model_dir("llama"))
    expected = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    assert linear_layer_names(model) == expected
    assert expected[-1] == "lm_head"


def test_unknown_family_for_quantized_names():
    with pytest.raises(PipelineError, match="valid values"):
        quantized_layer_names(nn.Linear(2, 2), "bloom")


def test_gemma2_uses_the_gemma_layer_names():
    config = transformers.Gemma2Config(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                       num_attention_heads=2, num_key_value_heads=1, head_dim=8, vocab_size=32)
    model = transformers.AutoModelForCausalLM.from_config(config)
    assert detect_family(model.config) == "gemma"
    assert len(quantized_layer_names(model, "gemma")) == 2 * PER_LAYER["gemma"]


def test_every_model_type_of_a_record_is_accepted_for_its_family():
    for family in FAMILIES:
        for model_type in get_family(family).model_types:
            assert detect_family({"model_type": model_type}, family) == family
    assert set(MODEL_TYPE_TO_FAMILY.values()) == set(FAMILIES) - {"qwen1"}  # qwen1 is only declared
    assert set(GGUF_MODEL_TYPES.values()) <= set(MODEL_TYPE_TO_FAMILY)
    with pytest.raises(PipelineError, match="unknown model family 'bloom'; valid values: llama, qwen1, "):
        get_family("bloom")


def _module(root: nn.Module, path: str | None) -> nn.Module | None:
    try:
        return root.get_submodule(path) if path else None
    except AttributeError:
        return None


@pytest.mark.parametrize("family", FAMILIES)
def test_each_record_describes_its_tiny_model(family, tiny_model_dir):
    """The record's layout names the tiny model's modules, its norm kind is the model's norm class, and what the
    Snakefile decides from config.json (transform_support) is what transform_model finds on the loaded model."""
    record = get_family(family)
    model_dir = tiny_model_dir(family)
    model, _, _ = load_model(model_dir, device="cpu", dtype="float32", family=family)
    config = json.loads((model_dir / "config.json").read_text())
    assert config["model_type"] in record.model_types
    layout = record.layout
    final_norm = _module(model, layout.final_norm)
    assert (final_norm is not None) == has_final_norm(config, family)
    assert isinstance(final_norm, nn.LayerNorm) == (record.norm == LAYERNORM)
    assert record.norm in (RMSNORM, LAYERNORM)
    blocks = _module(model, layout.layers)
    assert len(blocks) == config["num_hidden_layers"]
    for block in blocks:
        assert any(_module(block, path) is not None for path in layout.attention_norm)
        assert any(_module(block, path) is not None for path in layout.mlp_norm)
        qkv = (layout.qkv,) if isinstance(layout.qkv, str) else layout.qkv
        experts = _module(block, layout.experts) if layout.experts else [block]
        mlp = [_module(expert, path) for expert in experts for path in layout.mlp if path is not None]
        linears = [_module(block, path) for path in (*qkv, layout.o, *filter(None, [layout.router]))] + mlp
        assert all(isinstance(linear, nn.Linear) for linear in linears)
    assert transform_support(family, config)[0] == supported_transforms(model, family)
