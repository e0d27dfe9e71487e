"""The transform variants side by side, on hand-built sweep tables and breakdowns."""

import json

import pandas as pd
import pytest

from shadowquant.errors import PipelineError
from shadowquant.evaluate.selection import select_stage
from shadowquant.evaluate.transform_comparison import compare_transforms

COLUMNS = ["point", "rule", "statistic", "perplexity", "perplexity_increase", "perplexity_increase_ci_low",
           "perplexity_increase_ci_high", "kl", "agreement", "num_shadow_sides", "shadow_flop_fraction"]


def sweep(float_ppl, t1, k5, t16):
    return pd.DataFrame([
        ("float", "float", "float", float_ppl, None, None, None, None, None, None, None),
        ("absmax-t1", "ratio", "absmax", float_ppl * (1 + t1), t1, t1 - 0.01, t1 + 0.01, 0.05, 0.95, 40, 0.3),
        ("absmax-k5", "sensitivity", "absmax", float_ppl * (1 + k5), k5, k5 - 0.01, k5 + 0.01, 0.10, 0.9, 5, 0.01),
        ("absmax-t16", "ratio", "absmax", float_ppl * (1 + t16), t16, t16 - 0.02, t16 + 0.02, 0.2, 0.8, 10, 0.05),
    ], columns=COLUMNS)


def breakdown(weights, all_):
    part = lambda value: {"perplexity_increase": value, "perplexity_increase_ci_low": value - 0.005,
                          "perplexity_increase_ci_high": value + 0.005}
    return {"statistic": "absmax", "num_tokens": 100,
            "parts": {"float": part(0.0), "weights": part(weights), "inputs": part(0.01), "outputs": part(0.01),
                      "all": part(all_)}}


@pytest.fixture
def inputs(tmp_path):
    variants = ["none", "rotate"]
    sweeps = [tmp_path / "none.csv", tmp_path / "rotate.csv"]
    sweep(20.0, 0.13, 0.36, 0.53).to_csv(sweeps[0], index=False)
    sweep(20.0001, 0.05, 0.08, 0.20).to_csv(sweeps[1], index=False)
    breakdowns = [tmp_path / "none.json", tmp_path / "rotate.json"]
    breakdowns[0].write_text(json.dumps(breakdown(0.083, 0.13)))
    breakdowns[1].write_text(json.dumps(breakdown(0.0103, 0.05)))
    selection = tmp_path / "selection.json"
    select_stage(sweeps, selection, "perplexity", 0.1, variants=variants)
    return variants, sweeps, breakdowns, selection


def test_one_row_per_variant_with_weights_all_shadow_selected_and_the_exported_mark(inputs, tmp_path):
    variants, sweeps, breakdowns, selection = inputs
    out = tmp_path / "out"
    compare_transforms(sweeps, breakdowns, variants, selection, "perplexity", 0.1, out.with_suffix(".csv"),
                       out.with_suffix(".md"), out.with_suffix(".html"))
    table = pd.read_csv(out.with_suffix(".csv"))
    assert list(table["transform"]) == variants
    assert list(table["weights_only"]) == [0.083, 0.0103]
    assert list(table["all_shadow_sides"]) == [40, 40]
    # Within budget 0.1: none needs all 40 sides (t1, +13 % misses it: most accurate taken), rotate 5.
    assert list(table["selected_point"]) == ["absmax-t1", "absmax-k5"]
    assert list(table["selected_budget_met"]) == [False, True]
    assert list(table["exported"]) == [False, True]
    markdown = out.with_suffix(".md").read_text()
    assert "| rotate **(exported)** | max | 20.000 | +1.0 % [+0.5, +1.5] | +5.0 % [+4.5, +5.5] (absmax-t1, 40 sides) | " \
           "+8.0 % [+7.0, +9.0] absmax-k5 (5) |" in markdown
    assert "absmax-t1 (40, budget missed)" in markdown
    assert "<table" in out.with_suffix(".html").read_text()


def test_a_breakdown_without_the_weights_part_is_refused(inputs, tmp_path):
    variants, sweeps, breakdowns, selection = inputs
    broken = breakdown(0.01, 0.05)
    del broken["parts"]["weights"]
    breakdowns[1].write_text(json.dumps(broken))
    with pytest.raises(PipelineError, match="rotate.json: breakdown lacks part 'weights'"):
        compare_transforms(sweeps, breakdowns, variants, selection, "perplexity", 0.1, tmp_path / "a.csv",
                           tmp_path / "a.md", tmp_path / "a.html")
    assert not (tmp_path / "a.csv").exists()
