"""Importance-weighted and GPTQ Q4_0 (imatrix.py): plain Q4_0 bytes, lower weighted error."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shadowquant.errors import PipelineError
from shadowquant.decoding.imatrix import (collect_importance, gptq_q4_0, output_error, quantize_q4_0_imatrix,
                                 weighted_error)
from shadowquant.decoding.q4_0 import dequantize_q4_0, quantize_q4_0


def _weight_and_importance(seed=0, rows=64, cols=256):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
    w[rng.random(w.shape) < 0.01] *= 8  # outliers, as real weights have
    imp = rng.lognormal(0, 1.5, cols).astype(np.float32)  # a few channels carry most of the activation energy
    return w, imp


def _slow_make_qx_quants(x, w):
    """llama.cpp's make_qx_quants(32, 8, x, L, 1, w), one block, written as the C loop."""
    amax, mx = 0.0, 0.0
    for v in x:
        if abs(v) > amax:
            amax, mx = abs(v), v
    if amax < 1e-15:
        return 0.0, [0] * 32
    def codes(iscale):
        return [max(-8, min(7, int(np.rint(np.float32(iscale) * np.float32(v))))) for v in x]
    iscale = np.float32(-8 / np.float32(mx))
    ls = codes(iscale)
    sumlx = np.float32(sum(np.float32(wi * xi * li) for wi, xi, li in zip(w, x, ls)))
    suml2 = np.float32(sum(np.float32(wi * li * li) for wi, li in zip(w, ls)))
    scale = sumlx / suml2 if suml2 else 0.0
    best, best_l = scale * sumlx, ls
    for s in range(-9, 10):
        if s == 0:
            continue
        iscale = np.float32(-(np.float32(8) + np.float32(0.1) * np.float32(s)) / np.float32(mx))
        ls = codes(iscale)
        sumlx = np.float32(sum(np.float32(wi * xi * li) for wi, xi, li in zip(w, x, ls)))
        suml2 = np.float32(sum(np.float32(wi * li * li) for wi, li in zip(w, ls)))
        if suml2 > 0 and sumlx * sumlx > best * suml2:
            scale, best, best_l = sumlx / suml2, sumlx / suml2 * sumlx, ls
    return scale, [l + 8 for l in best_l]


def test_plain_q4_0_and_matches_the_c_loop():
    w, imp = _weight_and_importance(rows=4, cols=64)
    data = quantize_q4_0_imatrix(w, imp)
    assert len(data) == len(quantize_q4_0(w))
    blocks = np.frombuffer(data, dtype=[("d", "<f2"), ("qs", "u1", (16,))])
    sigma2 = (w * w).sum(axis=1) / w.shape[1]
    for row in range(w.shape[0]):
        for b in range(2):
            x = w[row, 32 * b:32 * b + 32]
            weight = imp[32 * b:32 * b + 32] * np.sqrt(sigma2[row] + x * x)
            d, codes = _slow_make_qx_quants(x, weight)
            block = blocks[row * 2 + b]
            assert block["d"] == np.float16(d)
            got = list(block["qs"] & 0x0F) + list(block["qs"] >> 4)
            assert got == codes


def test_lower_weighted_error_than_reference():
    w, imp = _weight_and_importance()
    ref = dequantize_q4_0(quantize_q4_0(w)).reshape(w.shape)
    ours = dequantize_q4_0(quantize_q4_0_imatrix(w, imp)).reshape(w.shape)
    assert weighted_error(w, ours, imp) < 0.95 * weighted_error(w, ref, imp)
    assert quantize_q4_0_imatrix(w, None) == quantize_q4_0(w)  # no importance: the reference encoder


def test_zero_block_and_refusals():
    w = np.zeros((2, 64), np.float32)
    w[1, 40] = 1.0
    back = dequantize_q4_0(quantize_q4_0_imatrix(w, np.ones(64, np.float32))).reshape(w.shape)
    assert (back[0] == 0).all() and (back[1, :32] == 0).all() and back[1, 40] == pytest.approx(1.0, rel=1e-3)
    with pytest.raises(PipelineError):
        quantize_q4_0_imatrix(np.zeros((2, 48), np.float32), np.ones(48, np.float32))
    with pytest.raises(PipelineError):
        quantize_q4_0_imatrix(np.zeros((2, 64), np.float32), np.ones(32, np.float32))


def test_collect_importance_is_mean_square_input():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(20, 8), torch.nn.Linear(8, 16), torch.nn.ReLU(),
                                torch.nn.Linear(16, 4))
    ids = torch.randint(0, 20, (5, 7))
    stats = collect_importance(model, ids, batch_size=2, hessian=["1"])
    with torch.no_grad():
        x = model[0](ids).reshape(-1, 8).double()
        h = model[2](model[1](model[0](ids))).reshape(-1, 16).double()
    assert np.allclose(stats["1"], (x * x).mean(dim=0).numpy(), rtol=1e-6)
    assert np.allclose(stats["1#H"], (x.T @ x / x.shape[0]).numpy(), rtol=1e-5)
    assert np.allclose(stats["3"], (h * h).mean(dim=0).numpy(), rtol=1e-5)
    assert set(stats) == {"1", "3", "1#H"}


def test_gptq_lowers_output_error():
    rng = np.random.default_rng(3)
    w, _ = _weight_and_importance(seed=3, rows=32, cols=128)
    mix = rng.standard_normal((128, 128)) * 0.3 + np.eye(128)  # correlated inputs
    x = rng.standard_normal((2048, 128)) @ mix * rng.lognormal(0, 1, 128)
    h = x.T @ x / x.shape[0]
    ref = dequantize_q4_0(quantize_q4_0(w)).reshape(w.shape)
    data = gptq_q4_0(w, h)
    assert len(data) == len(quantize_q4_0(w))
    ours = dequantize_q4_0(data).reshape(w.shape)
    assert output_error(w, ours, h) < 0.8 * output_error(w, ref, h)


def test_shared_input_hessian():
    class TwoHeads(torch.nn.Module):  # q/k-like: two Linears read the same tensor
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(10, 8)
            self.a = torch.nn.Linear(8, 4)
            self.b = torch.nn.Linear(8, 4)

        def forward(self, ids):
            h = self.emb(ids)
            return self.a(h) + self.b(torch.relu(self.a(h)).sum(-1, keepdim=True).expand_as(h).contiguous())

    torch.manual_seed(1)
    model = TwoHeads()
    ids = torch.randint(0, 10, (3, 5))
    stats = collect_importance(model, ids, hessian=["a", "b"])
    with torch.no_grad():
        h = model.emb(ids).reshape(-1, 8).double()
        g = torch.relu(model.a(model.emb(ids))).sum(-1, keepdim=True).expand(3, 5, 8).reshape(-1, 8).double()
    # "a" runs twice on the same input (2 x 15 tokens); "b" on another tensor of the same shape
    assert np.allclose(stats["a#H"], (h.T @ h / 15).numpy(), rtol=1e-5)
    assert np.allclose(stats["b#H"], (g.T @ g / 15).numpy(), rtol=1e-5)
