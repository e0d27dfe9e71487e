"""Report figures: each plot renders a real PNG from synthetic sweep / selection / act_scales inputs."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
from matplotlib import image as mpimg

from shadowquant.errors import PipelineError
from shadowquant.plots import (layer_depth, layer_kind, plot_outlier_ratios, plot_sweep_vs_shadow,
                               plot_sweep_vs_threshold, write_table_html)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
THRESHOLDS = [1, 2, 4, 8, 16, 24, 32, 64, 128, 152, 10000000]


def sweep_rows(statistics=("signed", "absmax")) -> list[dict]:
    rows = [{"statistic": "float", "threshold": math.nan, "accuracy": 0.42, "perplexity": 18.5,
             "agreement": math.nan, "kl": math.nan, "num_shadow_inputs": math.nan, "num_shadow_outputs": math.nan,
             "num_shadow_sides": math.nan, "shadow_flop_fraction": math.nan, "num_samples": 200,
             "num_tokens": 9000}]
    for s_index, statistic in enumerate(statistics):
        for t_index, t in enumerate(THRESHOLDS):
            shadow = max(0, 120 - 11 * t_index - 3 * s_index) if t < 1e6 else 0
            rows.append({"statistic": statistic, "threshold": float(t),
                         "accuracy": 0.42 - 0.0018 * t_index - 0.01 * (t >= 1e6) + 0.002 * s_index,
                         "perplexity": 18.5 + 0.3 * t_index + 5 * (t >= 1e6), "agreement": 0.99 - 0.01 * t_index,
                         "kl": 0.001 * (t_index + 1), "num_shadow_inputs": shadow // 2,
                         "num_shadow_outputs": shadow - shadow // 2, "num_shadow_sides": shadow,
                         "shadow_flop_fraction": shadow / 240, "num_samples": 200, "num_tokens": 9000})
    return rows


def write_sweep(tmp_path, rows, name="sweep.csv"):
    path = tmp_path / name
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def write_selection(tmp_path, statistic="signed", threshold=24.0, metric="accuracy", **extra):
    path = tmp_path / "selection.json"
    float_value = {"accuracy": 0.42, "perplexity": 18.5, "agreement": 1.0, "kl": 0.0}.get(metric, 0.42)
    path.write_text(json.dumps({"statistic": statistic, "threshold": threshold, "metric": metric, "max_drop": 0.01,
                                "float_value": float_value, "selected_value": 0.40, "num_shadow_sides": 65,
                                "reason": "fewest shadow sides within budget", **extra}))
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


@pytest.mark.parametrize("plot", [plot_sweep_vs_threshold, plot_sweep_vs_shadow])
def test_sweep_plots_render(tmp_path, plot):
    out = tmp_path / "out" / "figure.png"
    plot(write_sweep(tmp_path, sweep_rows()), write_selection(tmp_path), out)
    assert_png(out)


@pytest.mark.parametrize("plot", [plot_sweep_vs_threshold, plot_sweep_vs_shadow])
def test_sweep_plots_single_statistic_nonfinite_perplexity_and_kl_selection(tmp_path, plot):
    rows = sweep_rows(statistics=("absmax",))
    rows[-1]["perplexity"] = math.inf
    rows[-2]["perplexity"] = math.nan
    sweep = write_sweep(tmp_path, rows)
    assert "inf" in sweep.read_text()
    out = tmp_path / "figure.png"
    plot(sweep, write_selection(tmp_path, statistic="absmax", threshold=8.0, metric="kl"), out)
    assert_png(out)


def test_sweep_plot_adds_a_panel_for_a_third_selection_metric(tmp_path):
    sweep = write_sweep(tmp_path, sweep_rows())
    two, three = tmp_path / "two.png", tmp_path / "three.png"
    plot_sweep_vs_threshold(sweep, write_selection(tmp_path, metric="perplexity"), two)
    plot_sweep_vs_threshold(sweep, write_selection(tmp_path, metric="agreement"), three)
    assert mpimg.imread(three).shape[1] > 1.3 * mpimg.imread(two).shape[1]


def test_sweep_plot_without_selection(tmp_path):
    out = tmp_path / "figure.png"
    plot_sweep_vs_threshold(write_sweep(tmp_path, sweep_rows()), None, out)
    assert_png(out)


def test_selection_not_in_sweep_is_an_error(tmp_path):
    with pytest.raises(PipelineError, match="threshold 99 is not a row"):
        plot_sweep_vs_threshold(write_sweep(tmp_path, sweep_rows()), write_selection(tmp_path, threshold=99.0),
                                tmp_path / "figure.png")
    assert not (tmp_path / "figure.png").exists()


@pytest.mark.parametrize("mutate,match", [
    (lambda rows: [{k: v for k, v in r.items() if k != "perplexity"} for r in rows], "missing column"),
    (lambda rows: rows[:1], "no sweep point"),
    (lambda rows: [*rows[:1], {**rows[1], "threshold": -1.0}], "threshold must be a positive"),
])
def test_bad_sweep_tables(tmp_path, mutate, match):
    with pytest.raises(PipelineError, match=match):
        plot_sweep_vs_threshold(write_sweep(tmp_path, mutate(sweep_rows())), None, tmp_path / "figure.png")


def test_bad_selection(tmp_path):
    sweep = write_sweep(tmp_path, sweep_rows())
    with pytest.raises(PipelineError, match="unknown metric 'bleu'"):
        plot_sweep_vs_shadow(sweep, write_selection(tmp_path, metric="bleu"), tmp_path / "figure.png")
    with pytest.raises(PipelineError, match="'threshold' must be a number, got 'auto'"):
        plot_sweep_vs_shadow(sweep, write_selection(tmp_path, threshold="auto"), tmp_path / "figure.png")
    with pytest.raises(PipelineError, match="not found"):
        plot_sweep_vs_shadow(sweep, tmp_path / "missing.json", tmp_path / "figure.png")


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
    write_table_html(write_sweep(tmp_path, sweep_rows()), out, title="Sweep <all>")
    text = out.read_text()
    assert text.startswith("<!DOCTYPE html>") and "Sweep &lt;all&gt;" in text
    assert text.count("<tr") == 1 + 1 + 2 * len(THRESHOLDS)  # header, float row, points
    assert "10000000" in text and ">inf<" not in text


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
            "evaluation_summary.rst", "act_scales_table.rst"} <= names
    for name in sorted(names):
        text = (report_dir / name).read_text(encoding="utf-8")
        assert "{{" not in text and "{%" not in text  # Snakemake renders captions through Jinja first
        publish_parts(text, writer="html", settings_overrides={"halt_level": 1, "report_level": 1})
