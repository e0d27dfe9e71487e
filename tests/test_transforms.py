"""Exact transforms (rotate, equalize, smooth): same logits, same checkpoint layout, clear refusals."""

from __future__ import annotations

import json

import pytest
import torch

from shadowquant.errors import PipelineError
from shadowquant.hadamard import fixing_ones, hadamard_matrix, random_orthogonal
from shadowquant.models import load_model
from shadowquant.safetensors_header import read_tensor_table
from shadowquant.transforms import (
    SUPPORTED,
    TRANSFORM_ORDER,
    apply_transforms,
    input_channel_absmax,
    save_transformed,
    search_alpha,
)

RMSNORM_FAMILIES = ("llama", "qwen1", "qwen2", "gemma", "mixtral")
# Float32 logits of the tiny models are O(1); the transforms are exact in exact arithmetic and
# computed in float64, so only float32 rounding of weights and forward pass remains (~1e-6 seen).
ATOL = 1e-4
CALIBRATION = [list(range(5, 45)), list(range(100, 170)), [1, 7, 9, 250, 251, 3, 12, 40]]


def _inputs() -> torch.Tensor:
    return torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(1))


def _perturb_norms(model, family: str) -> None:
    """Random positive norm scales, so folding them is not a no-op (tiny models start at 1)."""
    generator = torch.Generator().manual_seed(3)
    offset = 1.0 if family == "gemma" else 0.0
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith("norm"):  # input_layernorm, post_attention_layernorm, model.norm
                scale = 0.5 + torch.rand(module.weight.shape, generator=generator)
                module.weight.copy_(scale - offset)


def _loaded(tiny_model_dir, family):
    model, tokenizer, family = load_model(tiny_model_dir(family), device="cpu", dtype="float32", family=family)
    _perturb_norms(model, family)
    return model, tokenizer


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=_inputs(), use_cache=False).logits


def _checkpoint_shapes(directory) -> dict[str, list[int]]:
    return {name: info["shape"] for name, info in read_tensor_table(directory / "model.safetensors", "rebuild the test model").items()}


@pytest.mark.parametrize("family", RMSNORM_FAMILIES)
@pytest.mark.parametrize("transforms", [["rotate"], ["equalize"], ["smooth"], list(TRANSFORM_ORDER)])
def test_transformed_model_gives_the_same_logits(family, transforms, tiny_model_dir):
    model, _ = _loaded(tiny_model_dir, family)
    before = _logits(model)
    q_before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    summary = apply_transforms(model, family, transforms, seed=0, calibration=CALIBRATION)
    assert summary["transforms"] == [t for t in TRANSFORM_ORDER if t in transforms]
    torch.testing.assert_close(_logits(model), before, rtol=0, atol=ATOL)
    if transforms != ["equalize"]:  # equalize leaves q_proj alone
        assert not torch.allclose(model.model.layers[0].self_attn.q_proj.weight, q_before)


@pytest.mark.parametrize("family", RMSNORM_FAMILIES)
def test_saved_directory_reloads_with_the_same_logits_and_layout(family, tiny_model_dir, tmp_path):
    model, tokenizer = _loaded(tiny_model_dir, family)
    before = _logits(model)
    summary = apply_transforms(model, family, list(TRANSFORM_ORDER), seed=0, calibration=CALIBRATION)
    out = save_transformed(model, tokenizer, tmp_path / "transformed", family, summary)
    reloaded, _, _ = load_model(out, device="cpu", dtype="float32", family=family)
    torch.testing.assert_close(_logits(reloaded), before, rtol=0, atol=ATOL)
    original = _checkpoint_shapes(tiny_model_dir(family))
    saved = _checkpoint_shapes(out)
    extra = {"lm_head.weight": original["model.embed_tokens.weight"]} if summary["untied_lm_head"] else {}
    assert saved == {**original, **extra}
    assert json.loads((out / "transform.json").read_text())["transforms"] == list(TRANSFORM_ORDER)


def test_rotate_unties_a_tied_head_when_the_final_norm_is_folded(tiny_model_dir, tmp_path):
    model, tokenizer = _loaded(tiny_model_dir, "gemma")  # gemma ties lm_head to the embeddings
    assert model.lm_head.weight is model.model.embed_tokens.weight
    before = _logits(model)
    summary = apply_transforms(model, "gemma", ["rotate"], seed=0)
    assert summary["untied_lm_head"] and model.config.tie_word_embeddings is False
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    # Gemma's norm multiplies by (1 + w): folded norms hold w = 0.
    assert all(torch.all(m.weight == 0) for n, m in model.named_modules() if n.endswith("norm"))
    out = save_transformed(model, tokenizer, tmp_path / "untied", "gemma", summary)
    assert set(_checkpoint_shapes(out)) - set(_checkpoint_shapes(tiny_model_dir("gemma"))) == {"lm_head.weight"}
    reloaded, _, _ = load_model(out, device="cpu", dtype="float32")
    torch.testing.assert_close(_logits(reloaded), before, rtol=0, atol=ATOL)


def test_rotate_keeps_the_tie_when_the_final_norm_is_one(tiny_model_dir, tmp_path):
    model, tokenizer, _ = load_model(tiny_model_dir("gemma"), device="cpu", dtype="float32")  # norms: w = 0
    before = _logits(model)
    summary = apply_transforms(model, "gemma", ["rotate"], seed=0)
    assert summary["untied_lm_head"] is False
    assert model.lm_head.weight is model.model.embed_tokens.weight
    torch.testing.assert_close(_logits(model), before, rtol=0, atol=ATOL)
    out = save_transformed(model, tokenizer, tmp_path / "tied", "gemma")
    assert _checkpoint_shapes(out) == _checkpoint_shapes(tiny_model_dir("gemma"))  # no lm_head.weight
    reloaded, _, _ = load_model(out, device="cpu", dtype="float32")
    torch.testing.assert_close(_logits(reloaded), before, rtol=0, atol=ATOL)


def test_same_seed_gives_identical_weights_and_another_seed_does_not(tiny_model_dir):
    states = []
    for seed in (0, 0, 1):
        model, _ = _loaded(tiny_model_dir, "llama")
        apply_transforms(model, "llama", ["smooth", "rotate"], seed=seed, calibration=CALIBRATION)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert not torch.equal(states[0]["model.embed_tokens.weight"], states[2]["model.embed_tokens.weight"])


def test_equalize_evens_out_the_ranges_of_up_rows_and_down_columns(tiny_model_dir):
    model, _ = _loaded(tiny_model_dir, "llama")
    apply_transforms(model, "llama", ["equalize"])
    mlp = model.model.layers[1].mlp
    torch.testing.assert_close(mlp.up_proj.weight.abs().amax(dim=1), mlp.down_proj.weight.abs().amax(dim=0))


def test_full_smoothing_flattens_every_input_channel_to_one(tiny_model_dir):
    # alpha = 1 moves all of max|x_j| into the weights: each smoothed input channel peaks at 1.
    model, _ = _loaded(tiny_model_dir, "qwen2")
    apply_transforms(model, "qwen2", ["smooth"], calibration=CALIBRATION, alpha=1.0)
    layer = model.model.layers[0]
    linears = [layer.self_attn.q_proj, layer.mlp.gate_proj, layer.mlp.down_proj]
    maxima = input_channel_absmax(model, linears, CALIBRATION)
    for linear in linears:
        torch.testing.assert_close(maxima[id(linear)], torch.ones_like(maxima[id(linear)]), rtol=1e-4, atol=1e-4)


def test_search_alpha_picks_from_the_grid_and_leaves_the_model_alone(tiny_model_dir):
    model, _ = _loaded(tiny_model_dir, "llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    best, scores = search_alpha(model, "llama", ["smooth"], CALIBRATION, grid=(0.25, 0.75))
    assert best in (0.25, 0.75) and set(scores) == {0.25, 0.75}
    assert scores[best] == min(scores.values())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("family", ["opt", "phi", "falcon"])
def test_layernorm_families_are_refused_in_one_line(family, tiny_model_dir):
    model, _, _ = load_model(tiny_model_dir(family), device="cpu", dtype="float32")
    assert SUPPORTED[family] == ()
    with pytest.raises(PipelineError) as info:
        apply_transforms(model, family, ["rotate"])
    message = str(info.value)
    assert "\n" not in message and repr(family) in message and "valid transforms for" in message


def test_gemma2_offers_only_equalization():
    import transformers

    config = transformers.Gemma2Config(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                       num_key_value_heads=1, head_dim=8, vocab_size=32)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with pytest.raises(PipelineError, match=r"'rotate' is not supported for family 'gemma'.*gemma2.*: equalize; "
                                            r"set config key transform.variants to \[none, equalize\]$"):
        apply_transforms(model, "gemma", ["rotate"])
    ids = torch.arange(3, 20).view(1, -1)
    with torch.no_grad():
        before = model(input_ids=ids).logits
        apply_transforms(model, "gemma", ["equalize"])
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=ATOL)


def test_bad_transform_requests_are_refused(tiny_model_dir):
    model, _, _ = load_model(tiny_model_dir("llama"), device="cpu", dtype="float32")
    with pytest.raises(PipelineError, match=r"unknown transform 'spin'; valid transforms: rotate, equalize, smooth"):
        apply_transforms(model, "llama", ["spin"])
    with pytest.raises(PipelineError, match="more than once"):
        apply_transforms(model, "llama", ["rotate", "rotate"])
    with pytest.raises(PipelineError, match="needs calibration"):
        apply_transforms(model, "llama", ["smooth"])
    with pytest.raises(PipelineError, match=r"alpha = 1.5"):
        apply_transforms(model, "llama", ["smooth"], calibration=CALIBRATION, alpha=1.5)
    with pytest.raises(PipelineError, match="unknown model family 'bloom'"):
        apply_transforms(model, "bloom", ["rotate"])


@pytest.mark.parametrize("n", [1, 2, 12, 20, 36, 64, 576, 896])
def test_hadamard_matrices_are_hadamard(n):
    h = hadamard_matrix(n)
    assert torch.equal(h.abs(), torch.ones_like(h))
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))


@pytest.mark.parametrize("n", [7, 64, 576])
def test_fixing_ones_keeps_the_mean_direction(n):
    q, _ = random_orthogonal(n, torch.Generator().manual_seed(0))
    fixed = fixing_ones(q)
    ones = torch.ones(n, dtype=torch.float64)
    torch.testing.assert_close(fixed @ fixed.T, torch.eye(n, dtype=torch.float64))
    torch.testing.assert_close(fixed @ ones, ones)
    torch.testing.assert_close(fixed.T @ ones, ones)


def test_orthogonal_fallback_where_no_hadamard_is_built():
    assert hadamard_matrix(7) is None
    q, kind = random_orthogonal(7, torch.Generator().manual_seed(0))
    assert kind == "random_orthogonal_qr"
    torch.testing.assert_close(q @ q.T, torch.eye(7, dtype=torch.float64))
    again, _ = random_orthogonal(7, torch.Generator().manual_seed(0))
    assert torch.equal(q, again)
    q, kind = random_orthogonal(576, torch.Generator().manual_seed(0))
    assert kind == "randomized_hadamard"
    torch.testing.assert_close(q @ q.T, torch.eye(576, dtype=torch.float64))
