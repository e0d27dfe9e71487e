"""The unrotated decoding model (issue 25): the prefill model's KV cache, the original model's logits."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from shadowquant.decoding.weights import decoding_state_dict, kv_basis
from shadowquant.errors import PipelineError
from shadowquant.model.families import get_family
from shadowquant.model.loading import load_model
from shadowquant.model.transforms import apply_transforms

CALIBRATION = [list(range(5, 45)), list(range(100, 170)), [1, 7, 9, 250, 251, 3, 12, 40]]
ROTATE_SMOOTH = ["rotate", "smooth"]


def _inputs() -> torch.Tensor:
    return torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(1))


def _perturb(model, family: str) -> None:
    """Random norm scales and Linear biases (the tiny models start at 1 and 0), so folding them matters."""
    generator = torch.Generator().manual_seed(3)
    offset = get_family(family).norm_offset
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))
            elif name.endswith("norm"):
                module.weight.copy_(0.5 + torch.rand(module.weight.shape, generator=generator) - offset)


def _models(tiny_model_dir, family: str, transforms: list[str]):
    original, _, family = load_model(tiny_model_dir(family), device="cpu", dtype="float32", family=family)
    _perturb(original, family)
    transformed = copy.deepcopy(original)
    apply_transforms(transformed, family, transforms, seed=0, calibration=CALIBRATION)
    decoding = copy.deepcopy(original)
    decoding.load_state_dict(decoding_state_dict(original, transformed, family))
    return original, transformed, decoding


@torch.no_grad()
def _run(model):
    out = model(input_ids=_inputs(), use_cache=True)
    cache = out.past_key_values
    return out.logits, [(layer.keys, layer.values) for layer in cache.layers]


def _assert_same_cache(got, expected) -> None:
    assert len(got) == len(expected)
    for (k, v), (k_ref, v_ref) in zip(got, expected):
        for tensor, reference in ((k, k_ref), (v, v_ref)):
            torch.testing.assert_close(tensor, reference, rtol=1e-5, atol=1e-5 * float(reference.abs().max()))


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma"])
def test_decoding_model_shares_the_prefill_kv_cache_and_the_original_logits(family, tiny_model_dir):
    original, transformed, decoding = _models(tiny_model_dir, family, ROTATE_SMOOTH)
    logits, cache = _run(decoding)
    prefill_logits, prefill_cache = _run(transformed)
    original_logits, original_cache = _run(original)
    _assert_same_cache(cache, prefill_cache)
    torch.testing.assert_close(logits, original_logits, rtol=0, atol=1e-4)
    torch.testing.assert_close(logits, prefill_logits, rtol=0, atol=1e-4)
    # The prefill's V is in another basis than the original's (R2, smoothing); its K is the original's.
    assert not torch.allclose(prefill_cache[0][1], original_cache[0][1], atol=1e-3)
    _assert_same_cache([(k, k) for k, _ in prefill_cache], [(k, k) for k, _ in original_cache])
    # Everything but v/o is the original model's, bit for bit (no Q1, norms unfolded).
    state, decoded = original.state_dict(), decoding.state_dict()
    changed = {name for name in state if not torch.equal(state[name], decoded[name])}
    assert changed and all(".v_proj." in name or ".o_proj." in name for name in changed)
    assert any(name.endswith("v_proj.weight") for name in changed)
    assert any(name.endswith("o_proj.weight") for name in changed)
    if family == "qwen2":
        assert any(name.endswith("v_proj.bias") for name in changed)
    basis = kv_basis(original, transformed, family)
    assert basis.q1 is not None and basis.max_residual() < 1e-5
    assert all(layer.q is None and layer.k is None and layer.v is not None for layer in basis.layers)


@pytest.mark.parametrize("transforms", [["smooth"], ["equalize"], ["rotate"], ["rotate", "equalize", "smooth"], []])
def test_other_transforms_keep_the_kv_cache_too(transforms, tiny_model_dir):
    original, transformed, decoding = _models(tiny_model_dir, "qwen2", transforms)
    logits, cache = _run(decoding)
    _, prefill_cache = _run(transformed)
    original_logits, _ = _run(original)
    _assert_same_cache(cache, prefill_cache)
    torch.testing.assert_close(logits, original_logits, rtol=0, atol=1e-4)
    basis = kv_basis(original, transformed, "qwen2")
    assert (basis.q1 is not None) == ("rotate" in transforms)
    if "equalize" not in transforms:  # only equalize rescales q/k: without it they stay the original's
        state, decoded = original.state_dict(), decoding.state_dict()
        assert all(torch.equal(state[n], decoded[n]) for n in state if ".q_proj." in n or ".k_proj." in n)
    if not transforms:
        state, decoded = original.state_dict(), decoding.state_dict()
        assert all(torch.equal(state[n], decoded[n]) for n in state)


def test_unsupported_family_is_refused(tiny_model_dir):
    model, _, _ = load_model(tiny_model_dir("phi"), device="cpu", dtype="float32", family="phi")
    with pytest.raises(PipelineError, match=r"family 'phi' is not supported.*valid families: llama, qwen1, qwen2"):
        decoding_state_dict(model, copy.deepcopy(model), "phi")
    with pytest.raises(PipelineError, match=r"model_type 'phi', not one of family 'llama'"):
        decoding_state_dict(model, copy.deepcopy(model), "llama")


def test_models_of_different_checkpoints_are_refused(tiny_model_dir):
    original, _, _ = load_model(tiny_model_dir("qwen2"), device="cpu", dtype="float32", family="qwen2")
    other = copy.deepcopy(original)
    with torch.no_grad():
        for param in other.parameters():
            param.add_(0.01 * torch.randn(param.shape, generator=torch.Generator().manual_seed(5)))
    apply_transforms(other, "qwen2", ROTATE_SMOOTH, seed=0, calibration=CALIBRATION)
    with pytest.raises(PipelineError, match=r"not an orthogonal rotation of the original's"):
        decoding_state_dict(original, other, "qwen2")
