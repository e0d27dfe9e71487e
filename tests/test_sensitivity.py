"""Error breakdown, per-side sensitivity, the greedy shadow front and the weight clip-range search."""

import json
import math

import pytest
import torch
from torch import nn

from shadowquant.calibrate import sensitivity as S
from shadowquant.runtimes.decision import LayerQuant
from shadowquant.errors import PipelineError
from shadowquant.runtimes.fakequant import W8A8Linear, fake_quant_weight, quantize_per_tensor
from shadowquant.model.families import quantized_layer_names
from shadowquant.model.loading import load_model
from shadowquant.calibrate.profiling import profile_model, tokenize_samples


@pytest.fixture(scope="module")
def llama_setup(tiny_model_dir, tiny_text_corpus):
    texts = [json.loads(line)["text"] for line in tiny_text_corpus.read_text().splitlines()[:6]]
    model, tokenizer, family = load_model(tiny_model_dir("llama"), device="cpu", dtype="float32")
    sequences = tokenize_samples(tokenizer, texts, 32)
    scales = profile_model(model, sequences, tokenizer.pad_token_id, batch_size=2, progress=False)
    layers = quantized_layer_names(model, family)
    reference = S.reference_logprobs(model, sequences, progress=False)
    return model, sequences, scales, layers, reference


def _with_equal_scales(scales: dict, side: tuple[str, str], value: float) -> dict:
    """A copy of act_scales where one side's absmax max and quantile are both `value`."""
    scales = json.loads(json.dumps(scales))
    for key in ("absmax_ori", "absmax_top_0_1"):
        scales[key][side[0]][side[1]] = value
    return scales


# ---------------------------------------------------------------- breakdown


def test_all_parts_off_is_float_bit_for_bit(llama_setup):
    model, sequences, scales, layers, reference = llama_setup
    decisions = S.decisions_for_shadow_set(scales, "absmax", S.all_sides(layers), layers)
    off = S.quantized_copy(model, decisions, layers, quantize_weights=False, quantize_inputs=False,
                           quantize_outputs=False)
    ids = torch.tensor([sequences[0]])
    with torch.inference_mode():
        assert torch.equal(off(input_ids=ids).logits, model(input_ids=ids).logits)
    assert S.compare_to_reference(off, sequences, reference).summary()["kl"] == 0.0
    assert all(isinstance(m, nn.Linear) for m in (model.get_submodule(n) for n in layers))  # float model untouched


def test_compare_kl_matches_brute_force(llama_setup):
    model, sequences, scales, layers, reference = llama_setup
    decisions = S.decisions_for_shadow_set(scales, "absmax", [], layers)
    quantized = S.quantized_copy(model, decisions, layers)
    result = S.compare_to_reference(quantized, sequences[:1], reference[:1])
    with torch.inference_mode():
        ids = torch.tensor([sequences[0]])
        p = torch.softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
        q = torch.softmax(quantized(input_ids=ids).logits[0, :-1].double(), -1)
    brute = float((p * (p.log() - q.log())).sum())
    assert result.kl_sum[0] == pytest.approx(brute, rel=1e-4)
    assert result.kl_sum[0] > 0


# ---------------------------------------------------------------- sensitivity


def test_side_with_identical_clip_and_shadow_has_zero_sensitivity(llama_setup):
    model, sequences, scales, layers, reference = llama_setup
    side = (layers[2], "input")
    # max == quantile and far above every activation: clipping clamps nothing, same step as shadow.
    scales = _with_equal_scales(scales, side, 1000.0)
    other = (layers[3], "output")
    base, measured = S.side_sensitivity(model, layers, sequences, scales, sides=[side, f"{other[0]}:{other[1]}"],
                                        reference=reference, progress=False)
    assert measured[side]["delta_kl"] == 0.0 and measured[side]["delta_nll"] == 0.0
    assert measured[other]["delta_kl"] != 0.0  # the measurement is not blind
    proxy = S.sensitivity_proxy(model, layers, sequences[:2], scales, samples=1, progress=False)
    assert proxy[side] == 0.0
    assert set(proxy) == set(S.all_sides(layers)) and all(v >= 0 for v in proxy.values())
    assert any(v > 0 for v in proxy.values())


def test_side_sensitivity_rejects_unknown_side(llama_setup):
    model, sequences, scales, layers, reference = llama_setup
    with pytest.raises(PipelineError, match="not a side"):
        S.side_sensitivity(model, layers, sequences, scales, sides=[("model.nope", "input")], reference=reference,
                           progress=False)


def test_costs_and_rows(llama_setup):
    model, _, scales, layers, _ = llama_setup
    costs = S.side_costs(model, layers)
    q_proj = model.get_submodule(layers[0])
    assert costs[(layers[0], "input")]["shadow_elements"] == q_proj.in_features
    assert costs[(layers[0], "output")]["shadow_elements"] == q_proj.out_features
    assert sum(c["shadow_flop_share"] for k, c in costs.items() if k[1] == "input") == pytest.approx(1.0)
    rows = S.sensitivity_rows(model, layers, scales)
    assert len(rows) == 2 * len(layers) and all(r.ratio >= 1.0 for r in rows)


def test_mse_clip_scales_are_within_range(llama_setup):
    model, sequences, scales, layers, _ = llama_setup
    clips = S.mse_clip_scales(model, layers, sequences, scales, bins=256, progress=False)
    for (layer, side), clip in clips.items():
        assert 0 < clip <= scales["absmax_ori"][layer][side]
    decisions = S.decisions_for_shadow_set(scales, "absmax", [], layers, clip_scales=clips)
    assert decisions[layers[0]].input_scale == clips[(layers[0], "input")]


def test_histogram_clip_keeps_uniform_range_and_cuts_rare_outliers():
    uniform = torch.ones(512, dtype=torch.float64)
    assert 9.5 <= S.histogram_mse_clip(uniform, 10.0) <= 10.0  # no outliers: about the whole range
    heavy = torch.zeros(512, dtype=torch.float64)
    heavy[:20] = 1e5  # bulk below 0.4: its rounding error outweighs clipping the single value at 10
    heavy[-1] = 1.0  # one value at 10
    assert S.histogram_mse_clip(heavy, 10.0) < 5.0


# ---------------------------------------------------------------- decisions


def test_decisions_for_shadow_set(llama_setup):
    _, _, scales, layers, _ = llama_setup
    decisions = S.decisions_for_shadow_set(scales, "absmax", [(layers[0], "input"), f"{layers[1]}:output"], layers)
    assert set(decisions) == set(layers)
    first, second = decisions[layers[0]], decisions[layers[1]]
    assert first == LayerQuant(scales["absmax_top_0_1"][layers[0]]["input"], scales["absmax_ori"][layers[0]]["output"],
                               False, True)
    assert second.clip_input and not second.clip_output
    assert all(q.clip_input and q.clip_output for n, q in decisions.items() if n not in layers[:2])


@pytest.mark.parametrize("bad,match", [
    ([("model.layers.9.mlp.up_proj", "input")], "not a quantized layer"),
    (["model.layers.0.mlp.up_proj:middle"], "side must be one of"),
    (["no-side-here"], "not valid"),
    ([("a", "b", "c")], "not valid"),
])
def test_decisions_for_shadow_set_rejects_unknown_sides(llama_setup, bad, match):
    _, _, scales, layers, _ = llama_setup
    with pytest.raises(PipelineError, match=match) as info:
        S.decisions_for_shadow_set(scales, "absmax", bad, layers)
    assert "\n" not in str(info.value)


def test_decisions_need_the_statistic(llama_setup):
    _, _, scales, layers, _ = llama_setup
    with pytest.raises(PipelineError, match="unknown statistic"):
        S.decisions_for_shadow_set(scales, "median", [], layers)
    signed_only = {k: v for k, v in scales.items() if not k.startswith("absmax")}
    with pytest.raises(PipelineError, match="re-run profiling"):
        S.decisions_for_shadow_set(signed_only, "absmax", [], layers)


# ---------------------------------------------------------------- greedy front


def _row(layer, side, benefit, cost):
    return {"layer": layer, "side": side, "delta_kl": benefit, "shadow_elements": cost}


TABLE = [
    _row("a", "input", 4.0, 4),   # ratio 1
    _row("b", "input", 3.0, 1),   # ratio 3
    _row("c", "output", 2.0, 0),  # free
    _row("d", "input", 6.0, 2),   # ratio 3, larger benefit than b: first on the tie
    _row("e", "output", 0.0, 1),  # no benefit
    _row("f", "output", -1.0, 0),  # harmful, free
]


def test_greedy_front_order_monotone_and_ties():
    front = S.greedy_front(TABLE)
    assert [p.num_shadow_sides for p in front] == list(range(7))
    assert front[0].shadow_sides == () and front[0].cost == 0
    order = [side[0] for side in front[-1].shadow_sides]
    assert order == ["c", "d", "b", "a", "f", "e"]
    costs = [p.cost for p in front]
    assert costs == sorted(costs)
    assert front[4].benefit == pytest.approx(15.0) and front[4].cost == 7
    for k, point in enumerate(front):
        assert point.shadow_sides == front[-1].shadow_sides[:k]


def test_greedy_front_respects_budget():
    for budget in (0, 1, 2, 3, 5, 100):
        front = S.greedy_front(TABLE, max_cost=budget)
        assert all(p.cost <= budget for p in front)
        costs = [p.cost for p in front]
        assert costs == sorted(costs)
    # Budget 3: c (0), d (2) fit, b (1) fits, a (4) skipped, then the no-benefit ones that fit.
    assert [s[0] for s in S.greedy_front(TABLE, max_cost=3)[3].shadow_sides] == ["c", "d", "b"]
    assert S.greedy_front(TABLE, max_cost=0)[-1].shadow_sides == (("c", "output"), ("f", "output"))


def test_greedy_front_accepts_rows_and_rejects_bad_tables():
    rows = [S.SideSensitivity("x", "input", 2.0, 1.0, 2.0, 8, 0.5, proxy_kl=0.3, delta_kl=0.1)]
    assert S.greedy_front(rows, benefit_key="proxy_kl")[1].benefit == pytest.approx(0.3)
    with pytest.raises(PipelineError, match="no finite"):
        S.greedy_front([_row("x", "input", None, 1)])
    with pytest.raises(PipelineError, match="more than once"):
        S.greedy_front([_row("x", "input", 1, 1), _row("x", "input", 2, 1)])
    with pytest.raises(PipelineError, match=">= 0"):
        S.greedy_front([_row("x", "input", 1, -1)])
    with pytest.raises(PipelineError, match="lacks"):
        S.greedy_front([{"layer": "x", "side": "input"}])


def test_rank_correlation():
    assert S.rank_correlation([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert S.rank_correlation([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert S.rank_correlation([1, 1, 2], [1, 1, 2]) == pytest.approx(1.0)
    with pytest.raises(PipelineError):
        S.rank_correlation([1], [1])


# ---------------------------------------------------------------- weight clip range and part switches


def _mse(t, weight_range):
    return float(((fake_quant_weight(t, weight_range).double() - t.double()) ** 2).sum())


def test_weight_range_mse_never_worse_than_max():
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(64, 48, generator=g), torch.rand(100, generator=g) - 0.5, torch.zeros(4, 4)]
    outlier = torch.randn(64, 64, generator=g) * 0.02
    outlier[3, 5] = 1.0
    tensors.append(outlier)
    for t in tensors:
        assert _mse(t, "mse") <= _mse(t, "max")
        q, s = quantize_per_tensor(t, "mse")
        assert q.dtype == torch.int8 and int(q.abs().max()) <= 127
        # Same scale for the transposed layout (the export quantizes W^T).
        if t.dim() == 2:
            q_t, s_t = quantize_per_tensor(t.t(), "mse")
            assert float(s_t) == float(s) and torch.equal(q_t.t(), q)
    assert _mse(outlier, "mse") < _mse(outlier, "max")  # the search clips the lone outlier
    with pytest.raises(PipelineError, match="weight_range"):
        quantize_per_tensor(tensors[0], "p99")


def test_part_switches():
    torch.manual_seed(1)
    linear = nn.Linear(16, 8)
    quant = LayerQuant(0.5, 0.2, True, True)
    x = torch.randn(3, 16) * 2
    full = W8A8Linear.from_linear(linear, quant)
    weights_only = W8A8Linear.from_linear(linear, quant, quantize_inputs=False, quantize_outputs=False)
    assert torch.equal(weights_only(x), nn.functional.linear(x, full.weight, full.bias))
    float_weights = W8A8Linear.from_linear(linear, quant, quantize_weights=False, quantize_outputs=False)
    assert torch.equal(float_weights.weight, linear.weight)
    with pytest.raises(PipelineError, match="keeps its weights in float"):
        float_weights.int8_weight()
    full.set_quant(LayerQuant(100.0, 100.0, False, False))
    assert not torch.equal(full(x), W8A8Linear.from_linear(linear, quant)(x))
    assert math.isclose(float(full.input_quant_step), 100.0 / 127, rel_tol=1e-2)


def test_sensitivity_table_measures_the_proxy_top(llama_setup):
    model, sequences, scales, layers, _ = llama_setup
    rows, info = S.sensitivity_table(model, layers, sequences[:3], scales, measure_top=3, measure_sequences=2,
                                     proxy_samples=1, progress=False)
    assert len(rows) == 2 * len(layers) and all(r.proxy_kl is not None for r in rows)
    measured = [r for r in rows if r.delta_kl is not None]
    top = sorted(rows, key=lambda r: -r.proxy_kl)[:3]
    assert {(r.layer, r.side) for r in measured} == {(r.layer, r.side) for r in top}
    assert all(r.benefit == (r.delta_kl if r.delta_kl is not None else r.proxy_kl) for r in rows)
    assert info["measured_sides"] == 3 and info["measure_sequences"] == 2 and info["rank_correlation"] is not None
    front = S.greedy_front(rows, benefit_key="benefit")
    decisions = S.decisions_for_shadow_set(scales, "absmax", front[2].shadow_sides, layers)
    assert sum((not q.clip_input) + (not q.clip_output) for q in decisions.values()) == 2
    with pytest.raises(PipelineError, match="positive finite"):
        S.decisions_for_shadow_set(scales, "absmax", [], layers, clip_scales={(layers[0], "input"): 0.0})
