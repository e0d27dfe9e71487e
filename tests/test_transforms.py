"""Exact transforms (rotate, equalize, smooth): same logits, same checkpoint layout, clear refusals."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from torch import nn

from shadowquant.errors import PipelineError
from shadowquant.model.families import FAMILIES, LAYERNORM, get_family, quantized_layer_names
from shadowquant.model.hadamard import fixing_ones, hadamard_matrix, random_orthogonal
from shadowquant.model.loading import load_model
from shadowquant.export.safetensors_header import read_tensor_table
from shadowquant.model.transforms import (
    TRANSFORM_ORDER,
    apply_transforms,
    input_channel_absmax,
    save_transformed,
    search_alpha,
    supported_transforms,
)

LAYERNORM_FAMILIES = tuple(family for family in FAMILIES if get_family(family).norm == LAYERNORM)
# Float32 logits of the tiny models are O(1); the transforms are exact in exact arithmetic and
# computed in float64, so only float32 rounding of weights and forward pass remains (~1e-6 seen).
ATOL = 1e-4
CALIBRATION = [list(range(5, 45)), list(range(100, 170)), [1, 7, 9, 250, 251, 3, 12, 40]]


def _inputs() -> torch.Tensor:
    return torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(1))


def _perturb_norms(model, family: str) -> None:
    """Random positive norm scales, so folding them is not a no-op (tiny models start at 1).

    LayerNorms also get random biases, and Linears random biases, so that folding the norm
    biases and centring the writers' biases are tested too (tiny models start at 0).
    """
    generator = torch.Generator().manual_seed(3)
    offset = get_family(family).norm_offset
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.copy_(0.5 + torch.rand(module.weight.shape, generator=generator))
                module.bias.copy_(0.3 * torch.randn(module.bias.shape, generator=generator))
            elif isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))
            elif name.endswith("norm"):  # input_layernorm, post_attention_layernorm, model.norm
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


def _max_relative_difference(after: torch.Tensor, before: torch.Tensor) -> float:
    return float((after - before).abs().max() / before.abs().max())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("transforms", [["rotate"], ["equalize"], ["smooth"], list(TRANSFORM_ORDER)])
def test_transformed_model_gives_the_same_logits(family, transforms, tiny_model_dir):
    model, _ = _loaded(tiny_model_dir, family)
    assert supported_transforms(model, family) == TRANSFORM_ORDER
    before = _logits(model)
    q = model.get_submodule(quantized_layer_names(model, family)[0])  # q_proj, or Falcon's query_key_value
    q_before = q.weight.detach().clone()
    summary = apply_transforms(model, family, transforms, seed=0, calibration=CALIBRATION)
    assert summary["transforms"] == [t for t in TRANSFORM_ORDER if t in transforms]
    torch.testing.assert_close(_logits(model), before, rtol=0, atol=ATOL)
    assert _max_relative_difference(_logits(model), before) < 1e-5
    if transforms != ["equalize"] or family == "falcon":  # equalize leaves q_proj alone (Falcon's fuses v)
        assert not torch.allclose(q.weight, q_before)


def _embedding_name(model) -> str:
    embedding = model.get_input_embeddings()
    return next(name for name, module in model.named_modules() if module is embedding) + ".weight"


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_directory_reloads_with_the_same_logits_and_layout(family, tiny_model_dir, tmp_path):
    model, tokenizer = _loaded(tiny_model_dir, family)
    before = _logits(model)
    summary = apply_transforms(model, family, list(TRANSFORM_ORDER), seed=0, calibration=CALIBRATION)
    out = save_transformed(model, tokenizer, tmp_path / "transformed", family, summary)
    reloaded, _, _ = load_model(out, device="cpu", dtype="float32", family=family)
    torch.testing.assert_close(_logits(reloaded), before, rtol=0, atol=ATOL)
    original = _checkpoint_shapes(tiny_model_dir(family))
    saved = _checkpoint_shapes(out)
    extra = {"lm_head.weight": original[_embedding_name(model)]} if summary["untied_lm_head"] else {}
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


@pytest.mark.parametrize("family", LAYERNORM_FAMILIES)
def test_rotation_leaves_layernorms_at_one_and_their_input_centred(family, tiny_model_dir):
    model, _ = _loaded(tiny_model_dir, family)
    before = _logits(model)
    summary = apply_transforms(model, family, ["rotate"], seed=0)
    assert summary["notes"]["rotate"]["r1"] == "randomized_hadamard_fixing_ones"
    assert summary["untied_lm_head"] == (family != "phi")  # phi's lm_head is not tied
    norms = {name: m for name, m in model.named_modules() if isinstance(m, nn.LayerNorm)}
    assert all(torch.all(m.weight == 1) for m in norms.values())
    # Readers with a bias take the norm's bias; Falcon's have none, nor has OPT's lm_head: the bias stays.
    carried = {name for name, m in norms.items() if torch.any(m.bias != 0)}
    expected = {"opt": {"model.decoder.final_layer_norm"}, "phi": set(), "falcon": set(norms)}[family]
    assert carried == expected
    means = []

    def record(module, args):
        means.append(args[0].mean(-1).abs().max() / args[0].abs().max())

    hooks = [m.register_forward_pre_hook(record) for m in norms.values()]
    torch.testing.assert_close(_logits(model), before, rtol=0, atol=ATOL)
    for hook in hooks:
        hook.remove()
    assert max(means) < 1e-6  # writers are mean-centred, and Q1 keeps the stream so


def _tiny_from_config(config_class, **kwargs):
    config = config_class(vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          max_position_embeddings=128, **kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    _perturb_norms(model, config.model_type)
    return model


LAYERNORM_VARIANTS = {
    "opt-project-in-out": (transformers.OPTConfig, dict(ffn_dim=128, word_embed_proj_dim=32)),
    "opt-no-bias": (transformers.OPTConfig, dict(ffn_dim=128, enable_bias=False)),
    "phi-qk-layernorm-gqa": (transformers.PhiConfig, dict(intermediate_size=128, qk_layernorm=True,
                                                          num_key_value_heads=2, tie_word_embeddings=True)),
    "falcon-new-decoder-two-norms": (transformers.FalconConfig, dict(new_decoder_architecture=True, num_kv_heads=2)),
    "falcon-new-decoder-one-norm": (transformers.FalconConfig, dict(new_decoder_architecture=True, num_kv_heads=2,
                                                                    num_ln_in_parallel_attn=1)),
    "falcon-sequential": (transformers.FalconConfig, dict(parallel_attn=False)),
    "falcon-multi-head": (transformers.FalconConfig, dict(multi_query=False)),
    "falcon-alibi-bias": (transformers.FalconConfig, dict(alibi=True, bias=True, tie_word_embeddings=False)),
}


@pytest.mark.parametrize("variant", LAYERNORM_VARIANTS)
@pytest.mark.parametrize("transforms", [["rotate"], list(TRANSFORM_ORDER)])
def test_layernorm_architecture_variants_are_exact(variant, transforms):
    config_class, kwargs = LAYERNORM_VARIANTS[variant]
    model = _tiny_from_config(config_class, **kwargs)
    family = model.config.model_type
    before = _logits(model)
    summary = apply_transforms(model, family, transforms, seed=0, calibration=CALIBRATION)
    torch.testing.assert_close(_logits(model), before, rtol=0, atol=ATOL)
    if "equalize" in transforms and variant.startswith("phi"):
        assert "q/k (self_attn.q_layernorm normalizes q)" in summary["notes"]["equalize"]["skipped"]


@pytest.mark.parametrize("family", ["phi", "falcon"])
def test_gelu_mlps_keep_their_up_down_pair(family, tiny_model_dir):
    # GELU(x / s) != GELU(x) / s: equalize and smooth leave fc1/fc2 alone and say so; OPT's ReLU MLP is scaled.
    model, _ = _loaded(tiny_model_dir, family)
    up = [m for name, m in model.named_modules() if name.endswith(("mlp.fc1", "dense_h_to_4h"))][0]
    up_before = up.weight.detach().clone()
    summary = apply_transforms(model, family, ["equalize", "smooth"], calibration=CALIBRATION)
    for name in ("equalize", "smooth"):
        assert any("not positively homogeneous" in reason for reason in summary["notes"][name]["skipped"])
    # smooth scales fc1's input columns (its norm), never its rows
    ratio = up.weight.detach() / up_before
    torch.testing.assert_close(ratio, ratio[:1].expand_as(ratio))
    opt, _ = _loaded(tiny_model_dir, "opt")
    assert "skipped" not in apply_transforms(opt, "opt", ["equalize"])["notes"]["equalize"]


def test_post_layernorm_opt_offers_only_equalization():
    model = _tiny_from_config(transformers.OPTConfig, ffn_dim=128, do_layer_norm_before=False)
    assert supported_transforms(model, "opt") == ("equalize",)
    with pytest.raises(PipelineError) as info:
        apply_transforms(model, "opt", ["rotate"])
    message = str(info.value)
    assert "\n" not in message and "'opt'" in message and "do_layer_norm_before=False" in message
    assert message.endswith("valid transforms for opt: equalize; set config key transform.variants to [none, equalize]")
    before = _logits(model)
    apply_transforms(model, "opt", ["equalize"])
    torch.testing.assert_close(_logits(model), before, rtol=0, atol=ATOL)


def test_a_bias_under_a_zero_norm_weight_without_reader_bias_is_refused(tiny_model_dir):
    model, _ = _loaded(tiny_model_dir, "falcon")  # query_key_value has no bias
    with torch.no_grad():
        model.transformer.h[1].input_layernorm.weight[5] = 0.0
    with pytest.raises(PipelineError, match=r"^rotate: transformer\.h\.1\.input_layernorm has weight 0 but a "
                                            r"nonzero bias in 1 channel\(s\)[^\n]*$"):
        apply_transforms(model, "falcon", ["rotate"])


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
