"""Streaming statistics against the brute-force reference definition."""

import numpy as np
import pytest
import torch

from shadowquant.stats import SideStats, order_index, reference_statistics, top_count


def _stream(chunks, capacity_elements=None):
    total = sum(c.numel() for c in chunks)
    s = SideStats(capacity_elements or total)
    for c in chunks:
        s.update(c)
    return s.result()


def _check(result, ref):
    for key in ("n", "ori", "top_0_1", "absmax_ori", "absmax_top_0_1"):
        assert result[key] == ref[key], key  # exact order statistics, no tolerance
    # float32 kernels, float64 merging: far closer than the reference's own float32 mean/std.
    assert result["mean"] == pytest.approx(ref["mean"], abs=1e-6 * ref["std"] + 1e-12)
    assert result["std"] == pytest.approx(ref["std"], rel=1e-6)


@pytest.mark.parametrize("n_chunks,chunk", [(1, 10), (3, 500), (7, 3001), (20, 997)])
def test_matches_reference_on_random_chunks(n_chunks, chunk):
    g = torch.Generator().manual_seed(n_chunks * 1000 + chunk)
    chunks = [torch.randn(chunk, generator=g) * (i + 1) for i in range(n_chunks)]
    _check(_stream(chunks), reference_statistics(torch.cat(chunks)))


def test_ties_and_heavy_repeats():
    g = torch.Generator().manual_seed(1)
    chunks = [torch.randint(-3, 4, (4000,), generator=g).float() for _ in range(5)]
    _check(_stream(chunks), reference_statistics(torch.cat(chunks)))


def test_negative_only_data():
    g = torch.Generator().manual_seed(2)
    chunks = [-(torch.rand(2500, generator=g) + 0.1) for _ in range(4)]
    res = _stream(chunks)
    ref = reference_statistics(torch.cat(chunks))
    _check(res, ref)
    assert res["ori"] < 0 and res["absmax_ori"] > 0


def test_negative_outlier_larger_than_positive_max():
    x = torch.cat([torch.linspace(-1, 1, 5000), torch.tensor([-50.0])])
    res = _stream([x[:2000], x[2000:]])
    assert res["absmax_ori"] == 50.0
    assert res["ori"] == 1.0


def test_outliers_arriving_late_and_early():
    # The buffer must keep the right elements whatever order the largest values arrive in.
    base = torch.arange(100_000, dtype=torch.float32)
    for perm_seed in range(3):
        g = torch.Generator().manual_seed(perm_seed)
        x = base[torch.randperm(base.numel(), generator=g)]
        chunks = list(x.split(7919))
        _check(_stream(chunks), reference_statistics(x))
    _check(_stream(list(base.split(1000))), reference_statistics(base))
    _check(_stream(list(base.flip(0).split(1000))), reference_statistics(base))


def test_capacity_larger_than_needed_is_exact():
    g = torch.Generator().manual_seed(3)
    chunks = [torch.randn(3000, generator=g) for _ in range(3)]
    _check(_stream(chunks, capacity_elements=10**7), reference_statistics(torch.cat(chunks)))


def test_more_elements_than_planned_is_an_error():
    s = SideStats(10)
    with pytest.raises(RuntimeError, match="planned"):
        s.update(torch.zeros(11))


def test_order_index_matches_numpy_sorting():
    rng = np.random.default_rng(0)
    for n in (1, 2, 999, 1000, 1001, 1234, 54321):
        x = rng.standard_normal(n).astype(np.float32)
        s = np.sort(x)
        assert s[order_index(n)] == s[int(n * 0.999) - 1]
        assert top_count(n) == n - order_index(n)


def test_non_finite_is_flagged():
    s = SideStats(100)
    s.update(torch.tensor([1.0, float("nan")]))
    assert not s.is_finite()
    s2 = SideStats(100)
    s2.update(torch.tensor([1.0, float("inf")]))
    assert not s2.is_finite()


def test_state_round_trip_continues_exactly():
    g = torch.Generator().manual_seed(4)
    chunks = [torch.randn(5000, generator=g) for _ in range(6)]
    total = sum(c.numel() for c in chunks)
    a = SideStats(total)
    for c in chunks:
        a.update(c)
    b = SideStats(total)
    for c in chunks[:3]:
        b.update(c)
    tensors, scalars = b.state("x")
    c2 = SideStats(total)
    c2.load_state("x", tensors, scalars)
    for c in chunks[3:]:
        c2.update(c)
    assert c2.result() == a.result()


def test_large_offset_keeps_std_accurate():
    # A mean far larger than the spread must not cancel the variance away.
    g = torch.Generator().manual_seed(5)
    chunks = [1000.0 + 0.01 * torch.randn(300_000, generator=g) for _ in range(3)]
    res = _stream(chunks)
    ref = reference_statistics(torch.cat(chunks))
    assert res["std"] == pytest.approx(ref["std"], rel=1e-3)
    assert res["mean"] == pytest.approx(ref["mean"], rel=1e-9)


def test_works_inside_and_outside_inference_mode():
    # The reused mask buffers must not leak inference tensors into normal mode (or back).
    g = torch.Generator().manual_seed(6)
    chunks = [torch.randn(50_000, generator=g) for _ in range(4)]
    with torch.inference_mode():
        inside = _stream(chunks)
    _check(_stream(chunks), reference_statistics(torch.cat(chunks)))
    assert inside == _stream(chunks)
