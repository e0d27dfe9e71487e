"""16-bit histogram statistics and exact merging, against the collect-and-sort reference."""

import json
import math

import pytest
import torch

from shadowquant.calibrate.stats import HistogramStats, SideStats, new_side_stats, reference_statistics

HALF = [torch.bfloat16, torch.float16]
EXACT = ("n", "ori", "top_0_1", "absmax_ori", "absmax_top_0_1")


def _histogram(chunks, dtype):
    s = HistogramStats(dtype, sum(c.numel() for c in chunks))
    for c in chunks:
        s.update(c.to(dtype))
    return s


def _check(result, values):
    ref = reference_statistics(values.float())
    for key in EXACT:
        assert result[key] == ref[key], key
    # From the exact histogram in float64: far closer than the reference's float64 sum of float32 data.
    assert result["mean"] == pytest.approx(ref["mean"], rel=1e-12, abs=1e-12)
    assert result["std"] == pytest.approx(ref["std"], rel=1e-12, abs=1e-12)


def _data(kind, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    top = torch.finfo(dtype).max
    return {
        "gaussian": torch.randn(20_000, generator=g) * 3,
        "ties": torch.randint(-3, 4, (9_000,), generator=g).float(),
        "negative-only": -(torch.rand(5_000, generator=g) + 0.1),
        "signed-zeros": torch.tensor([0.0, -0.0] * 700 + [-1.0]),
        "near-dtype-max": torch.cat([torch.tensor([top, -top, top / 2] * 300), torch.randn(1_500, generator=g)]),
        "few": torch.tensor([2.0, -7.0, 3.0]),  # n < 1001: top_0_1 is the maximum
        "outliers": torch.cat([torch.randn(30_000, generator=g), torch.full((40,), 40.0), torch.full((3,), -90.0)]),
    }[kind].to(dtype)


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("kind", ["gaussian", "ties", "negative-only", "signed-zeros", "near-dtype-max", "few",
                                  "outliers"])
def test_histogram_equals_reference(kind, dtype):
    x = _data(kind, dtype, seed=len(kind))
    chunks = list(x.split(997))
    _check(_histogram(chunks, dtype).result(), x)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_new_side_stats_picks_the_path_by_dtype(dtype):
    assert isinstance(new_side_stats(dtype, 10), HistogramStats)
    assert isinstance(new_side_stats(torch.float32, 10), SideStats)


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_is_flagged(dtype, bad):
    s = HistogramStats(dtype, 100)
    s.update(torch.tensor([1.0, 2.0]).to(dtype))
    assert s.is_finite()
    s.update(torch.tensor([bad]).to(dtype))
    assert not s.is_finite()
    assert int(s.non_finite_count()) == 1


def test_wrong_dtype_and_too_many_elements_are_errors():
    s = HistogramStats(torch.bfloat16, 4)
    with pytest.raises(RuntimeError, match="float16"):
        s.update(torch.zeros(2, dtype=torch.float16))
    with pytest.raises(RuntimeError, match="planned"):
        s.update(torch.zeros(5, dtype=torch.bfloat16))


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_histograms_merge_and_round_trip_exactly(dtype):
    x = _data("outliers", dtype, seed=3)
    whole = _histogram([x], dtype).result()
    parts = x.split(7_000)
    merged = HistogramStats(dtype, x.numel())
    for p in parts:
        one = HistogramStats(dtype, x.numel())
        one.update(p)
        tensors, scalars = one.state("side")
        restored = HistogramStats(dtype, x.numel())
        restored.load_state("side", tensors, scalars)
        merged.merge(restored)
    assert json.dumps(merged.result()) == json.dumps(whole)


def test_float32_merge_in_order_is_bit_identical():
    """Chunks split at chunk boundaries and merged in order: the same bits as one pass, moments included,
    with each part's buffer sized for the whole."""
    g = torch.Generator().manual_seed(7)
    chunks = [torch.randn(64, 50, generator=g) * (1 + i) for i in range(9)]
    chunks[4][:, 3] *= 40
    total = sum(c.numel() for c in chunks)
    whole = SideStats(total)
    for c in chunks:
        whole.update(c)
    merged = None
    for part in (chunks[:2], chunks[2:7], chunks[7:]):
        s = SideStats(total)
        for c in part:
            s.update(c)
        tensors, scalars = s.state("p")
        restored = SideStats(total)
        restored.load_state("p", tensors, scalars)
        merged = restored if merged is None else (merged.merge(restored) or merged)
    assert json.dumps(merged.result()) == json.dumps(whole.result())
    _ref = reference_statistics(torch.cat([c.reshape(-1) for c in chunks]))
    for key in EXACT:
        assert merged.result()[key] == _ref[key]


def test_merging_different_kinds_is_an_error():
    with pytest.raises(RuntimeError, match="cannot merge"):
        SideStats(10).merge(HistogramStats(torch.bfloat16, 10))
    with pytest.raises(RuntimeError, match="cannot merge"):
        HistogramStats(torch.float16, 10).merge(HistogramStats(torch.bfloat16, 10))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_histogram_on_cuda_equals_reference(dtype):
    x = _data("outliers", dtype, seed=5)
    s = HistogramStats(dtype, x.numel(), "cuda")
    for c in x.cuda().split(4099):
        s.update(c)
    _check(s.result(), x)
