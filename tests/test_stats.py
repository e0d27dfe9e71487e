"""Streaming statistics against the brute-force reference definition."""

import numpy as np
import pytest
import torch

from shadowquant.calibrate.stats import SideStats, estimated_cut, order_index, reference_statistics, top_count


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
    outside = _stream(chunks)
    _check(outside, reference_statistics(torch.cat(chunks)))
    assert inside == outside


def _activations(rows, features, seed, outlier_features=(), scale=40.0):
    """Activation-like data: Gaussian, a few features carrying large values in most rows."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, features, generator=g)
    for f in outlier_features:
        x[:, f] *= scale * torch.rand(rows, generator=g)
    return x


@pytest.mark.parametrize("rows,features,batches,outliers", [
    (256, 96, 12, (3, 50)),     # capacity small against the block count: first cut from block maxima
    (100, 40, 6, (7,)),         # rows not a multiple of the block height: short last blocks
    (64, 3000, 5, (0, 2999)),   # wide rows: a chunk holds whole blocks of rows
    (333, 17, 9, ()),           # no outlier features: candidates scattered over many blocks
])
def test_blocked_activations_match_reference(rows, features, batches, outliers, monkeypatch):
    monkeypatch.setattr("shadowquant.calibrate.stats.CHUNK_ELEMENTS", 1 << 14)  # many chunks per activation
    data = [_activations(rows, features, seed=b, outlier_features=outliers) for b in range(batches)]
    _check(_stream(data), reference_statistics(torch.cat([d.reshape(-1) for d in data])))


def test_every_candidate_path_is_exact(monkeypatch):
    """Force each path of the candidate search in turn: block gathers, full passes, negative-side
    searches, sampled and exact compactions; each must give the reference's order statistics."""
    import shadowquant.calibrate.stats as st

    data = [_activations(128, 64, seed=10 + b, outlier_features=(5,)) * (1 + b % 3) - (b % 2) * 3 for b in range(8)]
    ref = reference_statistics(torch.cat([d.reshape(-1) for d in data]))
    calls = {"gather": 0, "estimated": 0}
    gather, estimated = st._Chunk._gather, st.estimated_cut

    def counting_gather(self, blocks):
        calls["gather"] += 1
        return gather(self, blocks)

    def counting_estimate(*args, **kwargs):
        calls["estimated"] += 1
        return estimated(*args, **kwargs)

    monkeypatch.setattr(st._Chunk, "_gather", counting_gather)
    monkeypatch.setattr(st, "estimated_cut", counting_estimate)
    for dense_fraction, slack in ((2.0, 1.125), (0.0, 1.125), (0.5, 3.0), (0.5, 1.0)):
        monkeypatch.setattr(st, "DENSE_BLOCK_FRACTION", dense_fraction)  # 2.0: never a full pass; 0.0: always
        monkeypatch.setattr(st, "CUT_SLACK", slack)  # 3.0: estimates keep too much, exact topk takes over
        _check(_stream(data), ref)
    assert calls["gather"] > 0 and calls["estimated"] > 0


def test_estimated_cut_keeps_about_the_slack():
    g = torch.Generator().manual_seed(11)
    values = torch.randn(200_000, generator=g)
    cut = estimated_cut(values, 5000, absolute=False)
    kept = int((values > cut).sum())
    assert 5000 <= kept <= 1.5 * 5000
    assert estimated_cut(values[:100], 5000, absolute=False) is None  # fewer values than wanted


def test_half_precision_input_is_counted_in_float32():
    g = torch.Generator().manual_seed(12)
    x = (torch.randn(96, 40, generator=g) * 3).to(torch.bfloat16)
    _check(_stream([x]), reference_statistics(x.float()))
