"""Report figures: each plot renders a real PNG from synthetic sweep / selection / act_scales inputs."""

from __future__ import annotations

import json
import math
import re

import pandas as pd
import pytest
from matplotlib import image as mpimg

from shadowquant.errors import PipelineError
from shadowquant.report.plots import (format_loss, layer_depth, layer_kind, plot_breakdown, plot_fronts, plot_outlier_ratios,
                               plot_sensitivity, plot_sweep_vs_shadow, plot_sweep_vs_threshold, selection_note,
                               write_table_html)
from shadowquant.evaluate.selection import choose

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Shaped like the default run of issue 10 (SmolLM2-135M, absmax): the ratio rule's losses per threshold and
# the sensitivity rule's per shadow budget k, as (shadow sides, shadow FLOP fraction, perplexity increase, KL).
RATIO_POINTS = {1: (420, 1.0, 0.13, 0.089), 2: (300, 0.8, 0.15, 0.10), 4: (150, 0.45, 0.20, 0.14),
                8: (60, 0.2, 0.30, 0.2), 16: (15, 0.04, 0.53, 0.364), 32: (8, 0.02, 0.9, 0.6),
                64: (4, 0.01, 1.5, 0.9), 152: (1, 0.002, 3.0, 1.4), 10000000: (0, 0.0, 12.8, 2.28)}
SENSITIVITY_POINTS = {0: (0, 0.0, 12.8, 2.28), 5: (5, 0.03, 0.6, 0.4), 10: (10, 0.05, 0.25, 0.16),
                      15: (15, 0.07, 0.17, 0.12), 30: (30, 0.12, 0.14, 0.1), 120: (120, 0.4, 0.13, 0.09)}
FLOAT_PERPLEXITY, FLOAT_ACCURACY = 22.2, 0.438


def interval(value: float, relative: float = 0.08, floor: float = 0.01) -> tuple[float, float]:
    """A made-up 95 % interval around value, wider for small values like a bootstrap over records."""
    half = relative * abs(value) + floor
    return value - half, value + half


def point_row(point, rule, statistic, threshold, budget, sides, flops, increase, kl) -> dict:
    perplexity = FLOAT_PERPLEXITY * (1 + increase)
    accuracy = FLOAT_ACCURACY - 0.02 * min(increase, 10)
    agreement = max(0.2, 1 - 0.6 * kl)
    row = {"point": point, "rule": rule, "statistic": statistic, "threshold": threshold, "shadow_budget": budget,
           "accuracy": accuracy, "perplexity": perplexity, "perplexity_increase": increase, "kl": kl,
           "agreement": agreement, "num_shadow_inputs": sides // 2, "num_shadow_outputs": sides - sides // 2,
           "num_shadow_sides": sides, "shadow_flop_fraction": flops, "num_samples": 256, "num_tokens": 32512}
    for column, value in (("accuracy", accuracy), ("perplexity", perplexity), ("perplexity_increase", increase),
                          ("kl", kl), ("agreement", agreement)):
        row[f"{column}_ci_low"], row[f"{column}_ci_high"] = interval(value)
    return row


def sweep_rows(statistics=("absmax", "signed"), sensitivity=True) -> list[dict]:
    """The float row, the ratio rule per statistic (signed a little worse) and the sensitivity rule (absmax)."""
    float_row = point_row("float", "float", "float", math.nan, math.nan, 0, 0.0, 0.0, 0.0)
    float_row.update(kl=math.nan, agreement=math.nan, num_shadow_inputs=math.nan, num_shadow_outputs=math.nan,
                     num_shadow_sides=math.nan, shadow_flop_fraction=math.nan, **{
                         f"{c}_ci_{e}": math.nan for c in ("perplexity_increase", "kl", "agreement")
                         for e in ("low", "high")})
    rows = [float_row]
    for s_index, statistic in enumerate(statistics):
        for t, (sides, flops, increase, kl) in RATIO_POINTS.items():
            worse = 1 + 0.3 * s_index
            rows.append(point_row(f"{statistic}-t{t}", "ratio", statistic, float(t), math.nan,
                                  sides + 2 * s_index * (sides > 0), flops, increase * worse, kl * worse))
    if sensitivity:
        for k, (sides, flops, increase, kl) in SENSITIVITY_POINTS.items():
            rows.append(point_row(f"absmax-k{k}", "sensitivity", "absmax", math.nan, float(k), sides, flops,
                                  increase, kl))
    return rows


def write_sweep(tmp_path, rows, name="sweep.csv"):
    path = tmp_path / name
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def write_selection(tmp_path, rows=None, metric="perplexity", budget=0.2, point=None, name="selection.json"):
    """selection.json as the select rule writes it: the real choice over the hand-made table."""
    path = tmp_path / name
    path.write_text(json.dumps(choose(pd.DataFrame(rows or sweep_rows()), metric, budget, point)))
    return path


KINDS = {"self_attn.q_proj": (576, 576), "self_attn.k_proj": (576, 192), "self_attn.v_proj": (576, 192),
         "self_attn.o_proj": (576, 576), "mlp.gate_proj": (576, 1536), "mlp.up_proj": (576, 1536),
         "mlp.down_proj": (1536, 576)}


def sensitivity_rows(layers: int = 30) -> list[dict]:
    """Every side of a 30-layer model; down_proj inputs of a few layers and the first layers dominate."""
    rows = []
    for depth in range(layers):
        for k_index, (kind, (fan_in, fan_out)) in enumerate(KINDS.items()):
            for side, cost in (("input", fan_in), ("output", fan_out)):
                spike = 0.9 / (1 + depth) if (kind == "mlp.down_proj" and side == "input") else 0.0
                spike += 0.3 / (1 + depth % 5) if (kind == "self_attn.o_proj" and side == "output") else 0.0
                delta = spike + 0.002 * ((7 * depth + 3 * k_index + (side == "output")) % 11) - 0.004
                rows.append({"layer": f"model.layers.{depth}.{kind}", "side": side, "statistic": "absmax",
                             "ratio": 10 + depth + k_index, "clip_scale": 0.05, "shadow_scale": 0.5, "cost": cost,
                             "flop_share": cost / 2e5, "delta_kl": delta, "delta_nll": 0.9 * delta})
    ranked = sorted(range(len(rows)), key=lambda i: -rows[i]["delta_kl"] / rows[i]["cost"])
    for rank, index in enumerate(ranked, start=1):
        rows[index]["rank"] = rank
    return rows


def write_sensitivity(tmp_path, rows, name="sensitivity.csv"):
    path = tmp_path / name
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def breakdown(with_intervals: bool = True) -> dict:
    """The breakdown of issue 10: weights +9 %, inputs +3 %, outputs +1 %, all +14 % over float 21.1."""
    parts = {"float": {"perplexity": 21.1, "perplexity_increase": 0.0, "kl": 0.0, "agreement": 1.0}}
    for part, increase, kl in (("weights", 0.09, 0.05), ("inputs", 0.03, 0.02), ("outputs", 0.01, 0.006),
                               ("all", 0.14, 0.09)):
        parts[part] = {"perplexity": 21.1 * (1 + increase), "perplexity_increase": increase, "kl": kl,
                       "agreement": 1 - kl}
    for values in parts.values():
        for key in ("perplexity", "perplexity_increase", "kl", "agreement"):
            low, high = interval(values[key], floor=0.004) if with_intervals else (None, None)
            values[f"{key}_ci_low"], values[f"{key}_ci_high"] = low, high
    return {"statistic": "absmax", "num_tokens": 16256, "parts": parts}


def write_breakdown(tmp_path, data=None, name="breakdown.json"):
    path = tmp_path / name
    path.write_text(json.dumps(breakdown() if data is None else data))
    return path


def act_scales(layers: list[str], absmax: bool = True) -> dict:
    data = {"ori": {}, "top_0_1": {}, "all_stat": {}}
    if absmax:
        data.update(absmax_ori={}, absmax_top_0_1={})
    for i, name in enumerate(layers):
        data["ori"][name] = {"input": 5.0 + 40 * (i % 5), "output": 3.0 + i}
        data["top_0_1"][name] = {"input": 1.0 + 0.1 * i, "output": 0.5}
        data["all_stat"][name] = {side: {"mean": 0.0, "std": 1.0} for side in ("input", "output")}
        if absmax:
            data["absmax_ori"][name] = {"input": 6.0 + 40 * (i % 5), "output": 4.0 + i}
            data["absmax_top_0_1"][name] = {"input": 1.2, "output": 0.6}
    data["meta"] = {"num_samples": 8, "num_tokens": 512}
    return data


LLAMA_MIXTRAL_FALCON = [
    *(f"model.layers.{i}.self_attn.{p}" for i in range(3) for p in ("q_proj", "k_proj", "v_proj", "o_proj")),
    *(f"model.layers.{i}.mlp.experts.{e}.w{w}" for i in range(3) for e in range(2) for w in (1, 2, 3)),
    *(f"model.layers.{i}.mlp.gate" for i in range(3)),
    "transformer.h.1.mlp.dense_4h_to_h", "model.decoder.layers.2.fc1", "lm_head",
]


def assert_png(path, min_bytes=10_000):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > min_bytes
    pixels = mpimg.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 300 and pixels.shape[1] > 500
    assert pixels.std() > 0.05  # not a blank canvas
    # Nothing but the PNG is left behind (atomic write).
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []


SWEEP_PLOTS = [plot_sweep_vs_threshold, plot_sweep_vs_shadow, plot_fronts]


def red_pixels(path) -> int:
    """Pixels in the colour of the BUDGET MISSED note (#c00000), give or take anti-aliasing."""
    pixels = mpimg.imread(path)[..., :3]
    return int(((pixels[..., 0] > 0.6) & (pixels[..., 1] < 0.15) & (pixels[..., 2] < 0.15)).sum())


@pytest.mark.parametrize("plot", SWEEP_PLOTS)
def test_sweep_plots_render(tmp_path, plot):
    out = tmp_path / "out" / "figure.png"
    plot(write_sweep(tmp_path, sweep_rows()), write_selection(tmp_path), out)
    assert_png(out)


@pytest.mark.parametrize("plot", SWEEP_PLOTS)
def test_missed_budget_is_shown_in_red(tmp_path, plot):
    sweep = write_sweep(tmp_path, sweep_rows())
    met, missed = tmp_path / "met.png", tmp_path / "missed.png"
    plot(sweep, write_selection(tmp_path, budget=0.2, name="met.json"), met)
    plot(sweep, write_selection(tmp_path, budget=0.05, name="missed.json"), missed)
    assert_png(missed)
    assert red_pixels(met) < 100  # anti-aliased edges of the red series only
    assert red_pixels(missed) > 2000  # a bold red note, not a stray pixel


def test_selection_note():
    rows = sweep_rows()
    met = choose(pd.DataFrame(rows), "perplexity", 0.2)
    assert met["point"] == "absmax-k15" and met["budget_met"]
    assert selection_note(met) == ("selected absmax-k15 (sensitivity rule): 15 shadow sides, 7.0% of Linear FLOPs "
                                   "with a shadow\nrelative perplexity increase over float +17.0% "
                                   "[95 % CI +14.6%, +19.4%] within the budget +20.0%")
    missed = choose(pd.DataFrame(rows), "kl", 0.01)
    assert not missed["budget_met"]
    note = selection_note(missed)
    assert note.startswith("BUDGET MISSED: no point keeps the mean KL(float || W8A8) per token (nats) within "
                           "0.01 nats\n")
    assert note.endswith("took the most accurate point, absmax-t1 (ratio rule): 0.089 nats [95 % CI 0.0719 nats, "
                         "0.106 nats]; 420 shadow sides, 100.0% of Linear FLOPs with a shadow")
    # An old selection without intervals or FLOP share still reads.
    bare = {k: v for k, v in missed.items() if k not in ("loss_ci_low", "loss_ci_high", "shadow_flop_fraction")}
    assert selection_note(bare).endswith("absmax-t1 (ratio rule): 0.089 nats; 420 shadow sides")


def test_format_loss():
    assert [format_loss("perplexity", 0.0412), format_loss("kl", 0.01234), format_loss("agreement", 0.035),
            format_loss("accuracy", -0.016), format_loss("kl", None), format_loss("kl", math.nan)] \
        == ["+4.1%", "0.0123 nats", "3.5%", "-1.6 pts", "n/a", "n/a"]


@pytest.mark.parametrize("plot", SWEEP_PLOTS)
def test_sweep_plots_without_intervals(tmp_path, plot):
    """An old table: no CI columns, no perplexity_increase (computed from perplexity), no KL / agreement."""
    rows = [{k: v for k, v in row.items() if "_ci_" not in k and k not in ("perplexity_increase", "kl", "agreement")}
            for row in sweep_rows()]
    out = tmp_path / "figure.png"
    plot(write_sweep(tmp_path, rows), None, out)
    assert_png(out)


@pytest.mark.parametrize("plot", SWEEP_PLOTS)
def test_sweep_plots_empty_intervals_and_nonfinite_points(tmp_path, plot):
    rows = sweep_rows(statistics=("absmax",))
    for row in rows:
        row.update({k: math.nan for k in row if "_ci_" in k})
    rows[1]["perplexity"] = math.inf
    rows[1]["perplexity_increase"] = math.inf
    rows[2]["kl"] = math.nan
    sweep = write_sweep(tmp_path, rows)
    assert "inf" in sweep.read_text()
    out = tmp_path / "figure.png"
    plot(sweep, write_selection(tmp_path, rows, metric="kl", budget=0.15), out)
    assert_png(out)


def test_agreement_selection_adds_a_panel(tmp_path):
    sweep = write_sweep(tmp_path, sweep_rows())
    two, three = tmp_path / "two.png", tmp_path / "three.png"
    plot_fronts(sweep, write_selection(tmp_path, metric="perplexity", name="p.json"), two)
    plot_fronts(sweep, write_selection(tmp_path, metric="agreement", budget=0.1, name="a.json"), three)
    assert mpimg.imread(three).shape[1] > 1.3 * mpimg.imread(two).shape[1]


def test_threshold_plot_without_ratio_points(tmp_path):
    rows = [r for r in sweep_rows() if r["rule"] != "ratio"]
    out = tmp_path / "figure.png"
    plot_sweep_vs_threshold(write_sweep(tmp_path, rows), write_selection(tmp_path, rows), out)
    assert_png(out, min_bytes=5_000)


def test_selection_not_in_sweep_is_an_error(tmp_path):
    selection = write_selection(tmp_path)
    rows = [r for r in sweep_rows() if r["point"] != "absmax-k15"]
    with pytest.raises(PipelineError, match="selected point absmax-k15 is not a row of"):
        plot_fronts(write_sweep(tmp_path, rows), selection, tmp_path / "figure.png")
    assert not (tmp_path / "figure.png").exists()


def assert_one_line(error, *fragments):
    text = str(error.value)
    assert "\n" not in text
    for fragment in fragments:
        assert fragment in text


@pytest.mark.parametrize("column", ["point", "rule", "statistic", "num_shadow_sides", "perplexity"])
@pytest.mark.parametrize("plot", SWEEP_PLOTS)
def test_sweep_missing_column(tmp_path, plot, column):
    rows = [{k: v for k, v in row.items() if k != column} for row in sweep_rows()]
    with pytest.raises(PipelineError) as error:
        plot(write_sweep(tmp_path, rows), None, tmp_path / "figure.png")
    assert_one_line(error, "sweep.csv", f"lacks column(s) {column}")


@pytest.mark.parametrize("mutate,match", [
    (lambda rows: rows[:1], "no W8A8 point"),
    (lambda rows: rows[1:], "no float row"),
    (lambda rows: [*rows[:1], {**rows[1], "threshold": -1.0}],
     "threshold must be a positive number, got -1 for point absmax-t1"),
    (lambda rows: [*rows[:1], {**rows[1], "rule": "knapsack"}], "unknown rule 'knapsack'"),
    (lambda rows: [*rows[:1], {**rows[1], "num_shadow_sides": math.nan}], "num_shadow_sides is empty for point"),
    (lambda rows: [{k: v for k, v in r.items() if k != "threshold"} for r in rows], "lacks column threshold"),
])
def test_bad_sweep_tables(tmp_path, mutate, match):
    with pytest.raises(PipelineError, match=match) as error:
        plot_fronts(write_sweep(tmp_path, mutate(sweep_rows())), None, tmp_path / "figure.png")
    assert_one_line(error, "sweep.csv")


def test_unreadable_inputs(tmp_path):
    sweep = write_sweep(tmp_path, sweep_rows())
    (tmp_path / "binary.csv").write_bytes(b"\xff\xfe\x00\x81" * 100)
    (tmp_path / "folder.csv").mkdir()
    (tmp_path / "empty.csv").write_text("")
    for name, match in (("missing.csv", "sweep table not found"), ("binary.csv", "not a readable CSV"),
                        ("folder.csv", "not a readable CSV"), ("empty.csv", "sweep table is empty")):
        with pytest.raises(PipelineError, match=match) as error:
            plot_fronts(tmp_path / name, None, tmp_path / "figure.png")
        assert_one_line(error, name)
    for plot, match in ((plot_sensitivity, "sensitivity table not found"), (plot_breakdown, "breakdown file not found")):
        with pytest.raises(PipelineError, match=match):
            plot(tmp_path / "missing", tmp_path / "figure.png")
    with pytest.raises(PipelineError, match="selection file not found"):
        plot_fronts(sweep, tmp_path / "missing.json", tmp_path / "figure.png")


@pytest.mark.parametrize("change,match", [
    ({"metric": "bleu"}, "unknown metric 'bleu'; valid: perplexity, kl, agreement, accuracy"),
    ({"budget": "auto"}, "'budget' must be a number, got 'auto'"),
    ({"budget_met": "no"}, "'budget_met' must be true or false"),
    ({"loss": None}, "'loss' must be a number"),
])
def test_bad_selection(tmp_path, change, match):
    path = write_selection(tmp_path)
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    with pytest.raises(PipelineError, match=match) as error:
        plot_sweep_vs_shadow(write_sweep(tmp_path, sweep_rows()), path, tmp_path / "figure.png")
    assert_one_line(error, "selection.json")


def test_selection_missing_keys(tmp_path):
    path = tmp_path / "selection.json"
    path.write_text(json.dumps({"statistic": "absmax", "threshold": 16, "metric": "accuracy", "max_drop": 0.01}))
    with pytest.raises(PipelineError) as error:
        plot_fronts(write_sweep(tmp_path, sweep_rows()), path, tmp_path / "figure.png")
    assert_one_line(error, "selection.json", "lacks key(s) point, rule, budget, loss, budget_met")


def test_sensitivity_plot(tmp_path):
    path = write_sensitivity(tmp_path, sensitivity_rows())
    top25, top5 = tmp_path / "top25.png", tmp_path / "top5.png"
    plot_sensitivity(path, top25)
    plot_sensitivity(path, top5, top=5)
    assert_png(top25)
    assert_png(top5)
    assert mpimg.imread(top25).shape[0] > mpimg.imread(top5).shape[0]  # one bar row per side


def test_sensitivity_plot_few_sides_two_statistics_no_rank(tmp_path):
    rows = [{k: v for k, v in row.items() if k != "rank"} for row in sensitivity_rows(layers=2)]
    rows += [{**row, "statistic": "signed", "delta_kl": row["delta_kl"] * 1.2} for row in rows]
    rows.append({**rows[0], "layer": "lm_head", "delta_kl": -0.002})  # outside the blocks, and negative
    out = tmp_path / "sensitivity.png"
    plot_sensitivity(write_sensitivity(tmp_path, rows), out, top=100)
    assert_png(out)


@pytest.mark.parametrize("mutate,match", [
    (lambda rows: [{k: v for k, v in r.items() if k != "delta_kl"} for r in rows], "lacks column(s) delta_kl"),
    (lambda rows: [{k: v for k, v in r.items() if k not in ("cost", "side")} for r in rows],
     "lacks column(s) side, cost"),
    (lambda rows: [{**rows[0], "side": "weight"}, *rows[1:]], "side 'weight' of layer model.layers.0.self_attn"),
    (lambda rows: [{**rows[0], "delta_kl": "n/a"}, *rows[1:]], "delta_kl is empty or not a number for layer"),
])
def test_bad_sensitivity(tmp_path, mutate, match):
    with pytest.raises(PipelineError, match=re.escape(match)) as error:
        plot_sensitivity(write_sensitivity(tmp_path, mutate(sensitivity_rows(layers=2))), tmp_path / "figure.png")
    assert_one_line(error, "sensitivity.csv")
    header_only = tmp_path / "header.csv"
    header_only.write_text("layer,side,delta_kl,cost\n")
    with pytest.raises(PipelineError, match="has no row"):
        plot_sensitivity(header_only, tmp_path / "figure.png")


@pytest.mark.parametrize("with_intervals", [True, False])
def test_breakdown_plot(tmp_path, with_intervals):
    out = tmp_path / "breakdown.png"
    plot_breakdown(write_breakdown(tmp_path, breakdown(with_intervals)), out)
    assert_png(out)


@pytest.mark.parametrize("mutate,match", [
    (lambda d: {**d, "parts": None}, "missing object 'parts'"),
    (lambda d: {**d, "parts": {k: v for k, v in d["parts"].items() if k not in ("inputs", "all")}},
     "'parts' lacks inputs, all"),
    (lambda d: {**d, "parts": {**d["parts"], "outputs": {"perplexity_increase": 0.01}}},
     "parts.outputs.kl must be a number, got None"),
    (lambda d: [1, 2], "expected a JSON object"),
])
def test_bad_breakdown(tmp_path, mutate, match):
    with pytest.raises(PipelineError, match=re.escape(match)) as error:
        plot_breakdown(write_breakdown(tmp_path, mutate(breakdown())), tmp_path / "figure.png")
    assert_one_line(error, "breakdown.json")


def test_layer_depth_and_kind():
    assert layer_depth("model.layers.12.mlp.down_proj") == 12
    assert layer_depth("model.decoder.layers.3.fc1") == 3
    assert layer_depth("transformer.h.5.mlp.dense_4h_to_h") == 5
    assert layer_depth("model.layers.0.mlp.experts.2.w1") == 0
    assert layer_depth("lm_head") is None
    assert layer_depth("model.h2.layers_x.3.fc1") is None
    assert [layer_kind(n) for n in ("model.layers.0.mlp.experts.2.w1", "lm_head", "transformer.h.5.mlp.dense")] \
        == ["w1", "lm_head", "dense"]


@pytest.mark.parametrize("absmax", [True, False])
def test_outlier_ratios_render(tmp_path, absmax):
    path = tmp_path / "act_scales.json"
    path.write_text(json.dumps(act_scales(LLAMA_MIXTRAL_FALCON, absmax=absmax)))
    out = tmp_path / "ratios.png"
    plot_outlier_ratios(path, out, threshold=152)
    assert_png(out)
    rows = mpimg.imread(out).shape[0]
    if absmax:  # a second row of panels for the absmax statistic
        other = tmp_path / "other"
        other.mkdir()
        (other / "act_scales.json").write_text(json.dumps(act_scales(LLAMA_MIXTRAL_FALCON, absmax=False)))
        plot_outlier_ratios(other / "act_scales.json", other / "ratios.png")
        assert rows > 1.4 * mpimg.imread(other / "ratios.png").shape[0]


def test_outlier_ratios_skip_undefined_ratios(tmp_path):
    data = act_scales(["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj", "lm_head"])
    data["top_0_1"]["model.layers.0.mlp.down_proj"]["output"] = -0.25  # all-negative output: no log ratio
    data["ori"]["lm_head"]["input"] = None
    path = tmp_path / "act_scales.json"
    path.write_text(json.dumps(data))
    plot_outlier_ratios(path, tmp_path / "ratios.png")
    assert_png(tmp_path / "ratios.png")


def test_outlier_ratios_bad_input(tmp_path):
    path = tmp_path / "act_scales.json"
    path.write_text(json.dumps({"ori": {"lm_head": {"input": 1.0, "output": 2.0}}}))
    with pytest.raises(PipelineError, match="missing or empty key 'top_0_1'"):
        plot_outlier_ratios(path, tmp_path / "ratios.png")
    data = act_scales(["lm_head", "model.layers.0.mlp.up_proj"])
    del data["absmax_top_0_1"]["lm_head"]
    path.write_text(json.dumps(data))
    with pytest.raises(PipelineError, match="'absmax_top_0_1' has no input/output entry for layer 'lm_head'"):
        plot_outlier_ratios(path, tmp_path / "ratios.png")
    path.write_text("{not json")
    with pytest.raises(PipelineError, match="not valid JSON"):
        plot_outlier_ratios(path, tmp_path / "ratios.png")


def test_table_html(tmp_path):
    out = tmp_path / "sweep.html"
    rows = sweep_rows()
    rows[1]["perplexity"] = math.inf
    write_table_html(write_sweep(tmp_path, rows), out, title="Sweep <all>")
    text = out.read_text()
    assert text.startswith("<!DOCTYPE html>") and "Sweep &lt;all&gt;" in text
    assert text.count("<tr") == 1 + len(rows)  # header, float row, points
    assert "absmax-k15" in text and ">10000000<" in text and ">inf<" in text
    sensitivity = tmp_path / "sensitivity.html"
    rows = sensitivity_rows(layers=2)
    write_table_html(write_sensitivity(tmp_path, rows), sensitivity, "Sensitivity", sort_by="rank")
    text = sensitivity.read_text()
    assert text.count("<tr") == 1 + 2 * 7 * 2
    first = min(rows, key=lambda row: row["rank"])
    assert text.index(f"<td>{first['layer']}</td>") < min(text.index(f"<td>{row['layer']}</td>") for row in rows
                                                          if row["layer"] != first["layer"])


def test_outlier_ratios_threshold_far_above_every_ratio(tmp_path):
    path = tmp_path / "act_scales.json"
    path.write_text(json.dumps(act_scales(LLAMA_MIXTRAL_FALCON)))
    near, far = tmp_path / "near.png", tmp_path / "far.png"
    plot_outlier_ratios(path, near, threshold=100)
    plot_outlier_ratios(path, far, threshold=10000000)  # no line: it would squash the data to the bottom
    assert_png(far)
    assert mpimg.imread(near).shape == mpimg.imread(far).shape


def test_report_captions_are_clean_rst():
    from pathlib import Path

    from docutils.core import publish_parts

    report_dir = Path(__file__).resolve().parents[1] / "workflow" / "report"
    names = {p.name for p in report_dir.glob("*.rst")}
    assert {"workflow.rst", "sweep_threshold.rst", "sweep_shadow.rst", "outlier_ratios.rst", "sweep_table.rst",
            "evaluation_summary.rst", "act_scales_table.rst", "fronts.rst", "sensitivity.rst",
            "sensitivity_table.rst", "breakdown.rst"} <= names
    for name in sorted(names):
        text = (report_dir / name).read_text(encoding="utf-8")
        assert "{{" not in text and "{%" not in text  # Snakemake renders captions through Jinja first
        publish_parts(text, writer="html", settings_overrides={"halt_level": 1, "report_level": 1})


def run_adapter(script: str, tmp_path, inputs: dict, outputs: dict, params: dict | None = None):
    """Run a workflow/scripts adapter as Snakemake would, with a stand-in `snakemake` object."""
    import runpy
    from pathlib import Path
    from types import SimpleNamespace

    log = tmp_path / f"{script}.log"
    snakemake = SimpleNamespace(input=SimpleNamespace(**inputs), output=SimpleNamespace(**outputs),
                                params=SimpleNamespace(**(params or {})), log=[str(log)], threads=1, rule=script)
    path = Path(__file__).resolve().parents[1] / "workflow" / "scripts" / f"{script}.py"
    runpy.run_path(str(path), init_globals={"snakemake": snakemake})
    return log


def test_plot_adapters(tmp_path):
    sweep, selection = write_sweep(tmp_path, sweep_rows()), write_selection(tmp_path, budget=0.05)
    plots = tmp_path / "plots"
    run_adapter("plot_sweep", tmp_path, {"sweep": sweep, "selection": selection},
                {"threshold": plots / "sweep_threshold.png", "shadow": plots / "sweep_shadow.png",
                 "table": plots / "sweep.html"}, {"variant": "none"})
    inputs = {"sweep": sweep, "selection": selection, "sensitivity": write_sensitivity(tmp_path, sensitivity_rows()),
              "breakdown": write_breakdown(tmp_path)}
    outputs = {"fronts": plots / "fronts.png", "sensitivity": plots / "sensitivity.png",
               "breakdown": plots / "breakdown.png", "table": plots / "sensitivity.html"}
    run_adapter("plot_quality", tmp_path, inputs, outputs, {"top": 25, "variant": "none"})
    for name in ("sweep_threshold", "sweep_shadow", "fronts", "sensitivity", "breakdown"):
        assert (plots / f"{name}.png").read_bytes()[:8] == PNG_SIGNATURE
    assert (plots / "sensitivity.html").read_text().count("<tr") == 1 + 420
    # A bad input ends the rule with the one-line error in its log.
    with pytest.raises(SystemExit):
        run_adapter("plot_quality", tmp_path, {**inputs, "breakdown": tmp_path / "absent.json"}, outputs,
                    {"top": 25, "variant": "none"})
    assert f"error: {tmp_path / 'absent.json'}: breakdown file not found" in (tmp_path / "plot_quality.log").read_text()


def test_sensitivity_plot_falls_back_to_the_proxy_where_a_side_was_not_measured(tmp_path):
    from shadowquant.report.plots import load_sensitivity

    rows = sensitivity_rows()
    for index, row in enumerate(rows):
        row["benefit"] = row["delta_kl"]
        if index % 3:
            row["delta_kl"] = None  # only every third side measured exactly
    path = write_sensitivity(tmp_path, rows)
    table = load_sensitivity(path)
    assert table["delta_kl"].notna().all() and table["measured"].sum() == len(range(0, len(rows), 3))
    out = tmp_path / "sensitivity.png"
    plot_sensitivity(path, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_mse_points_form_their_own_series(tmp_path):
    from shadowquant.report.plots import _series, load_sweep

    rows = [{"point": "float", "rule": "float", "statistic": "float", "clip": "", "num_shadow_sides": "",
             "perplexity": 20.0}]
    for clip in ("max", "mse"):
        for k in (5, 15):
            rows.append({"point": f"absmax-k{k}" + ("-mse" if clip == "mse" else ""), "rule": "sensitivity",
                         "statistic": "absmax", "clip": clip, "num_shadow_sides": k, "perplexity": 25.0 - k / 10})
    path = tmp_path / "sweep.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    table = load_sweep(path)
    keys = [key for key, _ in _series(table[table["rule"] != "float"])]
    assert keys == [("sensitivity", "absmax"), ("sensitivity", "absmax+mse clip")]


def test_a_variants_figures_mark_the_selection_only_when_it_chose_that_variant(tmp_path):
    from shadowquant.report.plots import selection_for_variant

    selection = write_selection(tmp_path, budget=0.05)  # a single-variant selection: transform 'none'
    assert selection_for_variant(selection, "none") == selection
    assert selection_for_variant(selection, "rotate") is None
    assert selection_for_variant(None, "none") is None
