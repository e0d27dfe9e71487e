"""sweep.weight_range: the per-tensor int8 weight clip range, chosen by measured weights-only perplexity."""

import copy
import json

import pytest
import torch

from shadowquant.errors import PipelineError
from shadowquant.runtimes.fakequant import fake_quant_weight
from shadowquant.model.families import quantized_layer_names
from shadowquant.model.loading import load_model
from shadowquant.calibrate.profiling import tokenize_samples
from shadowquant.stages import fetch_model
from shadowquant.calibrate.weight_range import (choose_weight_range, fake_quant_weights, resolve_weight_range,
                                      weight_range_stage)


@pytest.fixture
def tiny(tiny_model_dir, tiny_text_corpus):
    model, tokenizer, family = load_model(tiny_model_dir("llama"), device="cpu", dtype="float32")
    texts = [json.loads(line)["text"] for line in tiny_text_corpus.read_text().splitlines()[:4]]
    return model, family, tokenizer, tokenize_samples(tokenizer, texts, 32)


def test_the_choice_is_the_range_with_the_lower_weights_only_perplexity(tiny):
    model, family, _, sequences = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    choice, scores, steps = choose_weight_range(model, family, sequences)
    assert set(steps) == set(quantized_layer_names(model, family))
    assert set(scores) == {"max", "mse"} and choice == min(scores, key=lambda r: (scores[r], r != "max"))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # left unchanged


def test_a_tie_keeps_the_reference_max_range(tiny):
    """Weights of one magnitude are exact in int8 under both ranges: equal perplexity, 'max' wins."""
    model, family, _, sequences = tiny
    with torch.no_grad():
        for name in quantized_layer_names(model, family):
            weight = model.get_submodule(name).weight
            weight.copy_(torch.where(weight >= 0, 0.02, -0.02))
    choice, scores, _ = choose_weight_range(model, family, sequences)
    assert scores["max"] == scores["mse"] and choice == "max"


def test_fake_quant_weights_quantizes_every_quantized_linear(tiny):
    model, family, _, _ = tiny
    steps = fake_quant_weights(model, family, "mse")
    for name in quantized_layer_names(model, family):
        weight = model.get_submodule(name).weight
        assert torch.equal(weight, fake_quant_weight(weight, steps[name]))  # on its step's grid


def test_stage_and_resolution(tiny_model_dir, tiny_text_corpus, tmp_path):
    manifest = tmp_path / "manifest.json"
    fetch_model(str(tiny_model_dir("llama")), manifest)
    out = tmp_path / "weight_range.json"
    result = weight_range_stage(manifest, tiny_text_corpus, out, num_samples=3, seq_len=24, device="cpu",
                                dtype="float32")
    assert json.loads(out.read_text()) == result and result["num_sequences"] == 3
    assert resolve_weight_range("auto", out) == result["weight_range"]
    assert resolve_weight_range("mse", None) == "mse"
    with pytest.raises(PipelineError, match="no weight_range.json"):
        resolve_weight_range("auto", None)
    out.write_text(json.dumps({"weight_range": "median"}))
    with pytest.raises(PipelineError, match="'weight_range' is 'median', not one of max, mse"):
        resolve_weight_range("auto", out)


def test_precomputed_mse_steps_quantize_exactly_as_the_search(tiny, tmp_path):
    """weight_range.json keeps the 'mse' steps: the sweep and the export reuse them instead of searching."""
    from shadowquant.runtimes.decision import decide
    from shadowquant.export.int8 import int8_state_dict
    from shadowquant.runtimes.fakequant import apply_w8a8
    from shadowquant.model.families import linear_layer_names
    from shadowquant.calibrate.profiling import profile_model

    model, family, tokenizer, sequences = tiny
    steps = fake_quant_weights(copy.deepcopy(model), family, "mse")
    names = quantized_layer_names(model, family)
    assert set(steps) == set(names)
    out = tmp_path / "weight_range.json"
    out.write_text(json.dumps({"weight_range": "mse", "mse_steps": steps}))
    resolved = resolve_weight_range("auto", out)
    assert resolved == steps
    scales = profile_model(model, sequences, tokenizer.pad_token_id, batch_size=2, progress=False)
    decisions = decide(scales, 4.0, "absmax")
    searched = apply_w8a8(copy.deepcopy(model), decisions, names, weight_range="mse")
    cached = apply_w8a8(copy.deepcopy(model), decisions, names, weight_range=resolved)
    ids = torch.tensor([sequences[0]])
    with torch.inference_mode():
        assert torch.equal(searched(input_ids=ids).logits, cached(input_ids=ids).logits)
    profiled = linear_layer_names(model)
    by_search = int8_state_dict(model.state_dict(), decisions, profiled, weight_range="mse")
    by_steps = int8_state_dict(model.state_dict(), decisions, profiled, weight_range=resolved)
    assert by_search.keys() == by_steps.keys()
    assert all(torch.equal(by_search[k], by_steps[k]) for k in by_search)
    with pytest.raises(PipelineError, match="no precomputed weight step for layer"):
        apply_w8a8(copy.deepcopy(model), decisions, names, weight_range={names[0]: 0.01})
