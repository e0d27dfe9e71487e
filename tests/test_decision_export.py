"""Clip rule (docs/method.md section 2) and int8 export names, dtypes, layout and values (section 4)."""

import math

import pytest
import torch

from shadowquant.runtimes.decision import LayerQuant, decide, decide_side, shadow_summary
from shadowquant.errors import PipelineError
from shadowquant.export.int8 import int8_state_dict, quantize_per_tensor


def _scales(layers):
    return {
        "ori": {n: {"input": v[0], "output": v[1]} for n, v in layers.items()},
        "top_0_1": {n: {"input": v[2], "output": v[3]} for n, v in layers.items()},
        "absmax_ori": {n: {"input": abs(v[0]) * 2, "output": abs(v[1]) * 2} for n, v in layers.items()},
        "absmax_top_0_1": {n: {"input": abs(v[2]), "output": abs(v[3])} for n, v in layers.items()},
    }


@pytest.mark.parametrize("ori,top,t,expected", [
    (10.0, 1.0, 11.0, (10.0, True)),   # 11 > 10: clip to ori
    (10.0, 1.0, 10.0, (1.0, False)),   # equal is not greater: shadow with top
    (10.0, 1.0, 1.0, (1.0, False)),
    (5.0, 5.0, 1.0, (5.0, False)),
    (5.0, 5.0, 1.0000001, (5.0, True)),
])
def test_clip_rule(ori, top, t, expected):
    assert decide_side(ori, top, t) == expected


def test_decide_counts_shadow_sides_and_larger_t_means_fewer():
    data = _scales({"a": (10.0, 3.0, 1.0, 2.0), "b": (100.0, 4.0, 1.0, 2.0)})
    counts = [shadow_summary(decide(data, t), t, "signed")["num_shadow_sides"] for t in (1, 2, 4, 16, 152)]
    assert counts == sorted(counts, reverse=True)
    d = decide(data, 4)
    assert d["a"] == LayerQuant(1.0, 3.0, False, True)
    assert d["b"] == LayerQuant(1.0, 4.0, False, True)


def test_absmax_statistic_uses_added_keys():
    data = _scales({"a": (10.0, 3.0, 1.0, 2.0)})
    d = decide(data, 1000, "absmax")
    assert d["a"].input_scale == 20.0 and d["a"].clip_input


def test_missing_layers_and_bad_scales_are_errors():
    data = _scales({"a": (10.0, 3.0, 1.0, 2.0)})
    with pytest.raises(PipelineError, match="missing layers b"):
        decide(data, 4, layers=["a", "b"])
    bad = _scales({"a": (-1.0, 3.0, -2.0, 2.0)})
    with pytest.raises(PipelineError, match="not a positive finite"):
        decide(bad, 1000)
    with pytest.raises(PipelineError, match="threshold"):
        decide(data, -1)
    with pytest.raises(PipelineError, match="statistic"):
        decide(data, 4, "median")


def test_quantize_per_tensor_matches_formula():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(7, 5, generator=g)
    q, s = quantize_per_tensor(w)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.dim() == 0
    expected_s = w.abs().max() / 127
    assert torch.allclose(s, expected_s, rtol=1e-7)
    assert torch.equal(q, torch.round(w / s).to(torch.int8))
    assert int(q.abs().max()) == 127
    zero_q, zero_s = quantize_per_tensor(torch.zeros(3))
    assert float(zero_s) == pytest.approx(1e-5 / 127) and not zero_q.any()


def test_export_names_dtypes_transposition_and_values():
    torch.manual_seed(0)
    state = {
        "embed.weight": torch.randn(10, 4),
        "layers.0.q.weight": torch.randn(6, 4),
        "layers.0.q.bias": torch.randn(6),
        "layers.0.norm.weight": torch.ones(4),
        "lm_head.weight": torch.randn(10, 4),
    }
    state["lm_head.weight"] = state["embed.weight"]  # tied, as in SmolLM2
    decisions = {"layers.0.q": LayerQuant(2.5, 7.0, True, False), "lm_head": LayerQuant(3.0, 30.0, False, True)}
    out = int8_state_dict(state, decisions, ["layers.0.q", "lm_head"])
    w = out["layers.0.q.weight"]
    assert w.dtype == torch.int8 and tuple(w.shape) == (4, 6)  # [in, out]
    ref_q, ref_s = quantize_per_tensor(state["layers.0.q.weight"].t())
    assert torch.equal(w, ref_q) and torch.equal(out["layers.0.q.weight.scale"], ref_s)
    assert out["layers.0.q.bias"].dtype == torch.int8 and "layers.0.q.bias.scale" in out
    # Scales are not divided by 127; clip flags are bool scalars.
    assert out["layers.0.q.input_scale"].item() == 2.5 and out["layers.0.q.input_scale"].dtype == torch.float32
    assert out["layers.0.q.output_scale"].item() == 7.0
    assert out["layers.0.q.clip_input"].dtype == torch.bool and out["layers.0.q.clip_input"].item() is True
    assert out["layers.0.q.clip_output"].item() is False
    # lm_head keeps float weights but gets scales and flags; other tensors are copied unchanged.
    assert out["lm_head.weight"].dtype == torch.float32 and "lm_head.weight.scale" not in out
    assert math.isclose(out["lm_head.output_scale"].item(), 30.0)
    assert torch.equal(out["embed.weight"], state["embed.weight"])
    assert out["embed.weight"].data_ptr() != out["lm_head.weight"].data_ptr()
    assert torch.equal(out["layers.0.norm.weight"], state["layers.0.norm.weight"])


def test_export_requires_a_decision_for_every_layer():
    with pytest.raises(PipelineError, match="no scales"):
        int8_state_dict({"a.weight": torch.ones(2, 2)}, {}, ["a"])


def test_point_labels_round_trip_and_bad_labels_are_named():
    from shadowquant.runtimes.decision import parse_point, point_label

    assert point_label("absmax", "ratio", 1e7) == "absmax-t10000000"
    assert point_label("signed", "ratio", 1.5) == "signed-t1.5"
    assert point_label("absmax", "sensitivity", 15) == "absmax-k15"
    for label in ("absmax-t152", "signed-t1.5", "absmax-k0", "signed-k30"):
        assert point_label(*parse_point(label)) == label
    for bad in ("absmax-k1.5", "other-t4", "absmax-x4", "absmax-t", "absmax"):
        with pytest.raises(PipelineError, match=rf"point '{bad}' is not valid: expected"):
            parse_point(bad)


def test_a_shadow_set_shadows_exactly_its_sides_and_clips_the_rest():
    from shadowquant.runtimes.decision import decide_shadow_set
    from shadowquant.runtimes.ideal import point_decisions

    data = _scales({"a": (10.0, 8.0, 1.0, 2.0), "b": (5.0, 4.0, 1.0, 1.0)})
    decisions = decide_shadow_set(data, "absmax", [("a", "output")])
    assert decisions["a"] == LayerQuant(20.0, 2.0, True, False)  # absmax: max |x| = 2 * ori in _scales
    assert decisions["b"] == LayerQuant(10.0, 8.0, True, True)
    # The empty set clips everything; every side shadowed is the ratio rule at t = 1.
    assert all(q.clip_input and q.clip_output for q in decide_shadow_set(data, "absmax", []).values())
    every = [(n, s) for n in data["ori"] for s in ("input", "output")]
    assert decide_shadow_set(data, "absmax", every) == decide(data, 1.0, "absmax")
    ranking = [("b", "input"), ("a", "output")]
    assert point_decisions(data, "absmax-k1", ranking=ranking) == decide_shadow_set(data, "absmax", ranking[:1])
    assert point_decisions(data, "absmax-t4") == decide(data, 4.0, "absmax")
    with pytest.raises(PipelineError, match="not Linear sides of this model"):
        decide_shadow_set(data, "absmax", [("c", "input")])
    with pytest.raises(PipelineError, match="asks for 3 shadow sides but the ranking has only 2"):
        point_decisions(data, "absmax-k3", ranking=ranking)
    with pytest.raises(PipelineError, match="needs the sensitivity ranking"):
        point_decisions(data, "absmax-k1")


def test_mse_points_clip_the_clipped_sides_at_their_clip_scale_only():
    from shadowquant.runtimes.decision import point_clip
    from shadowquant.runtimes.ideal import point_decisions

    data = _scales({"a": (10.0, 8.0, 1.0, 2.0), "b": (5.0, 4.0, 1.0, 1.0)})
    clips = {("a", "input"): 7.0, ("a", "output"): 3.0, ("b", "input"): 6.0, ("b", "output"): 5.0}
    assert point_clip("absmax-t4-mse") == "mse" and point_clip("absmax-t4") == "max"
    ratio = decide(data, 4.0, "absmax")
    with_mse = point_decisions(data, "absmax-t4-mse", clip_scales=clips)
    for name in data["ori"]:
        for side in ("input", "output"):
            clipped = getattr(ratio[name], f"clip_{side}")
            assert getattr(with_mse[name], f"clip_{side}") == clipped
            expected = clips[(name, side)] if clipped else getattr(ratio[name], f"{side}_scale")
            assert getattr(with_mse[name], f"{side}_scale") == expected
    ranking = [("a", "output")]
    front = point_decisions(data, "absmax-k1-mse", ranking=ranking, clip_scales=clips)
    assert front["a"] == LayerQuant(7.0, 2.0, True, False) and front["b"] == LayerQuant(6.0, 5.0, True, True)
    assert point_decisions(data, "absmax-t4", clip_scales=clips) == ratio  # the max points ignore them
    with pytest.raises(PipelineError, match="needs the MSE clip scales"):
        point_decisions(data, "absmax-t4-mse")
