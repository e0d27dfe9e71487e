"""The simulation agrees with the exported file: a model rebuilt from model-int8 tensors gives the same logits."""

import json

import pytest
import torch

from shadowquant.runtimes.decision import decide
from shadowquant.export.int8 import int8_state_dict
from shadowquant.runtimes.fakequant import apply_w8a8, apply_w8a8_from_export
from shadowquant.model.families import quantized_layer_names
from shadowquant.model.loading import load_model
from shadowquant.model.families import linear_layer_names as linear_names
from shadowquant.calibrate.profiling import profile_model, tokenize_samples
from shadowquant.calibrate.sensitivity import decisions_for_shadow_set


@pytest.mark.parametrize("family,threshold", [("llama", 4.0), ("llama", 152.0), ("opt", 4.0), ("falcon", 4.0),
                                              ("mixtral", 4.0)])
def test_exported_tensors_reproduce_the_simulated_logits(family, threshold, tiny_model_dir, tiny_text_corpus):
    texts = [json.loads(line)["text"] for line in tiny_text_corpus.read_text().splitlines()[:6]]
    simulated, tokenizer, fam = load_model(tiny_model_dir(family), device="cpu", dtype="float32")
    sequences = tokenize_samples(tokenizer, texts, 40)
    scales = profile_model(simulated, sequences, tokenizer.pad_token_id, batch_size=2, progress=False)
    decisions = decide(scales, threshold, "signed")
    export = int8_state_dict(simulated.state_dict(), decisions, linear_names(simulated))
    names = quantized_layer_names(simulated, fam)
    rebuilt, _, _ = load_model(tiny_model_dir(family), device="cpu", dtype="float32")
    apply_w8a8_from_export(rebuilt, export, names)
    apply_w8a8(simulated, decisions, names)
    ids = torch.tensor([sequences[0]])
    with torch.inference_mode():
        a = simulated(input_ids=ids).logits
        b = rebuilt(input_ids=ids).logits
    assert torch.equal(a, b)
    assert export[f"{names[0]}.weight"].dtype == torch.int8


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_mse_weight_range_and_per_side_shadow_set_export_reproduces_simulation(family, tiny_model_dir,
                                                                               tiny_text_corpus):
    texts = [json.loads(line)["text"] for line in tiny_text_corpus.read_text().splitlines()[:6]]
    simulated, tokenizer, fam = load_model(tiny_model_dir(family), device="cpu", dtype="float32")
    sequences = tokenize_samples(tokenizer, texts, 40)
    scales = profile_model(simulated, sequences, tokenizer.pad_token_id, batch_size=2, progress=False)
    names = quantized_layer_names(simulated, fam)
    # A sensitivity-style selection: a few sides shadowed, the rest clipped (per-side flags).
    shadow = [(names[0], "input"), (names[1], "output"), (names[-1], "input")]
    decisions = decisions_for_shadow_set(scales, "absmax", shadow, names)
    profiled = linear_names(simulated)
    full = {**decide(scales, 1e7, "absmax", profiled), **decisions}  # unquantized Linears keep their scales
    export = int8_state_dict(simulated.state_dict(), full, profiled, weight_range="mse")
    max_export = int8_state_dict(simulated.state_dict(), full, profiled)
    assert not bool(export[f"{names[0]}.clip_input"]) and bool(export[f"{names[0]}.clip_output"])
    rebuilt, _, _ = load_model(tiny_model_dir(family), device="cpu", dtype="float32")
    apply_w8a8_from_export(rebuilt, export, names)
    apply_w8a8(simulated, decisions, names, weight_range="mse")
    ids = torch.tensor([sequences[0]])
    with torch.inference_mode():
        a = simulated(input_ids=ids).logits
        b = rebuilt(input_ids=ids).logits
    assert torch.equal(a, b)
    # The search changed some weight scale (else this test would not tell "mse" from "max").
    assert any(float(export[f"{n}.weight.scale"]) != float(max_export[f"{n}.weight.scale"]) for n in names)


@pytest.mark.parametrize("family,transforms", [("llama", ["rotate", "equalize"]), ("qwen2", ["rotate"])])
def test_a_transformed_models_export_reproduces_its_simulated_logits(family, transforms, tiny_model_dir,
                                                                     tiny_text_corpus, tmp_path):
    from shadowquant.model.transforms import apply_transforms, save_transformed

    model, tokenizer, fam = load_model(tiny_model_dir(family), device="cpu", dtype="float32")
    summary = apply_transforms(model, fam, transforms, seed=3)
    transformed_dir = save_transformed(model, tokenizer, tmp_path / "transformed", fam, summary)
    texts = [json.loads(line)["text"] for line in tiny_text_corpus.read_text().splitlines()[:6]]
    simulated, tokenizer, fam = load_model(transformed_dir, device="cpu", dtype="float32")
    sequences = tokenize_samples(tokenizer, texts, 40)
    scales = profile_model(simulated, sequences, tokenizer.pad_token_id, batch_size=2, progress=False)
    decisions = decide(scales, 4.0, "absmax")
    export = int8_state_dict(simulated.state_dict(), decisions, linear_names(simulated))
    names = quantized_layer_names(simulated, fam)
    rebuilt, _, _ = load_model(transformed_dir, device="cpu", dtype="float32")
    apply_w8a8_from_export(rebuilt, export, names)
    apply_w8a8(simulated, decisions, names)
    ids = torch.tensor([sequences[0]])
    with torch.inference_mode():
        assert torch.equal(simulated(input_ids=ids).logits, rebuilt(input_ids=ids).logits)
