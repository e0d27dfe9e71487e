"""The automatic choice of the exported point on hand-built sweep tables."""

import json
import math

import pandas as pd
import pytest

from shadowquant.errors import PipelineError
from shadowquant.evaluate.selection import (choose, loss, read_selection, resolve_export_point, select_stage,
                                   selected_variant)

COLUMNS = ["point", "rule", "statistic", "accuracy", "perplexity", "perplexity_increase", "kl", "agreement",
           "num_shadow_sides", "shadow_flop_fraction"]
FLOAT = ("float", "float", "float", 0.50, 20.0, None, None, None, None, None)


def table(*points):
    """Rows: point, accuracy, perplexity, increase, kl, agreement, shadow sides, shadow FLOP share."""
    rows = [FLOAT]
    for point, *values in points:
        statistic, _, rest = point.partition("-")
        rows.append((point, "ratio" if rest.startswith("t") else "sensitivity", statistic, *values))
    return pd.DataFrame(rows, columns=COLUMNS)


SWEEP = table(
    ("absmax-t1", 0.50, 20.5, 0.025, 0.05, 0.95, 40, 0.30),
    ("absmax-t16", 0.47, 22.0, 0.100, 0.10, 0.90, 10, 0.05),
    ("absmax-k10", 0.49, 21.0, 0.050, 0.08, 0.92, 10, 0.04),
    ("absmax-k5", 0.45, 24.0, 0.200, 0.20, 0.85, 5, 0.01),
    ("absmax-t10000000", 0.30, 90.0, 3.500, 2.00, 0.40, 0, 0.0),
)


@pytest.mark.parametrize("metric,budget,expected", [
    ("perplexity", 0.05, "absmax-k10"),  # relative increase 0.05 qualifies (bound inclusive)
    ("perplexity", 0.03, "absmax-t1"),
    ("perplexity", 0.20, "absmax-k5"),
    ("perplexity", 10.0, "absmax-t10000000"),
    ("kl", 0.10, "absmax-k10"),  # 10 sides both; the smaller shadow FLOP share breaks the tie
    ("kl", 0.06, "absmax-t1"),
    ("agreement", 0.08, "absmax-k10"),  # loss = 1 - agreement
    ("agreement", 0.15, "absmax-k5"),
    ("accuracy", 0.01, "absmax-k10"),  # loss = float accuracy - accuracy, larger is better
    ("accuracy", 0.0, "absmax-t1"),
])
def test_fewest_shadow_sides_within_budget_in_each_metric_direction(metric, budget, expected):
    choice = choose(SWEEP, metric, budget)
    assert choice["point"] == expected and choice["budget_met"]
    assert choice["loss"] <= budget + 1e-12


def test_ties_in_sides_and_flops_go_to_the_smaller_loss():
    tied = table(("absmax-t8", 0.5, 21.0, 0.05, 0.1, 0.9, 5, 0.1), ("absmax-k5", 0.5, 20.5, 0.025, 0.1, 0.9, 5, 0.1))
    assert choose(tied, "perplexity", 0.1)["point"] == "absmax-k5"


def test_a_missed_budget_takes_the_most_accurate_point_and_says_so():
    choice = choose(SWEEP, "perplexity", 0.01)
    assert choice["point"] == "absmax-t1" and choice["budget_met"] is False
    assert choice["within_budget"] == 0 and "BUDGET MISSED" in choice["reason"]


def test_perplexity_loss_falls_back_to_the_ratio_when_the_table_has_no_increase_column():
    row = {"perplexity": 22.0}
    assert loss(row, {"perplexity": 20.0}, "perplexity") == pytest.approx(0.1)
    assert loss({"kl": float("nan")}, {}, "kl") is None


def test_an_explicit_point_is_taken_as_is_and_an_unknown_one_is_named():
    assert choose(SWEEP, "perplexity", 0.0, point="absmax-t16")["point"] == "absmax-t16"
    with pytest.raises(PipelineError, match="export.point 'absmax-t4' is not a point of the sweep; swept points: "):
        choose(SWEEP, "perplexity", 0.05, point="absmax-t4")


def test_bad_tables_and_metrics_are_errors():
    with pytest.raises(PipelineError, match="no float row"):
        choose(SWEEP.iloc[1:], "perplexity", 0.05)
    with pytest.raises(PipelineError, match="unknown selection metric 'bleu'"):
        choose(SWEEP, "bleu", 0.05)
    with pytest.raises(PipelineError, match="no W8A8 point"):
        choose(SWEEP.iloc[:1], "perplexity", 0.05)


def test_select_stage_writes_a_selection_the_export_resolves(tmp_path):
    sweep = tmp_path / "sweep.csv"
    SWEEP.to_csv(sweep, index=False)
    out = tmp_path / "selection.json"
    select_stage(sweep, out, "perplexity", 0.05)
    assert json.loads(out.read_text())["point"] == "absmax-k10"
    assert resolve_export_point("auto", out) == "absmax-k10"
    assert resolve_export_point("signed-t152", None) == "signed-t152"
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(PipelineError, match="bad.json: selection lacks point"):
        read_selection(tmp_path / "bad.json")
    assert math.isclose(read_selection(out)["budget"], 0.05)


# A rotated variant of the same model: its own float (equal within tolerance) and better W8A8 points.
ROTATED = table(
    ("absmax-t1", 0.50, 20.3, 0.015, 0.04, 0.96, 40, 0.30),
    ("absmax-t16", 0.49, 20.8, 0.040, 0.06, 0.93, 10, 0.05),
    ("absmax-k10", 0.49, 20.9, 0.045, 0.07, 0.93, 10, 0.04),
    ("absmax-k5", 0.48, 21.6, 0.080, 0.09, 0.91, 5, 0.01),
    ("absmax-t10000000", 0.40, 40.0, 1.000, 1.00, 0.60, 0, 0.0),
)


def write_variants(tmp_path):
    paths = []
    for name, sweep in (("none", SWEEP), ("rotate", ROTATED)):
        paths.append(tmp_path / f"{name}.csv")
        sweep.to_csv(paths[-1], index=False)
    return paths


@pytest.mark.parametrize("budget,expected", [
    (0.10, ("rotate", "absmax-k5")),  # 5 sides only qualify after rotation
    (0.05, ("rotate", "absmax-k10")),  # 10 sides both; rotate's k10 (0.045) qualifies, none's (0.05) too: FLOPs tie
    (0.02, ("rotate", "absmax-t1")),
    (0.01, ("rotate", "absmax-t1")),  # missed everywhere: the smallest loss, which is rotate's
])
def test_the_selection_chooses_across_transform_variants(tmp_path, budget, expected):
    out = tmp_path / "selection.json"
    choice = select_stage(write_variants(tmp_path), out, "perplexity", budget, variants=["none", "rotate"])
    assert (choice["transform"], choice["point"]) == expected
    assert choice["budget_met"] == (budget >= 0.015)
    assert choice["candidates"] == 10
    assert read_selection(out)["transform"] == expected[0]


def test_each_point_is_measured_against_its_own_variants_float(tmp_path):
    rotated = ROTATED.drop(columns=["perplexity_increase"])  # loss from perplexity / its own float
    rotated.loc[0, "perplexity"] = 10.0  # a (wrong) float of 10 makes every rotated point 2x worse
    paths = write_variants(tmp_path)
    rotated.to_csv(paths[1], index=False)
    choice = select_stage(paths, tmp_path / "s.json", "perplexity", 0.05, variants=["none", "rotate"])
    assert choice["transform"] == "none"


def test_a_variant_without_float_row_or_an_unknown_variant_is_refused(tmp_path):
    paths = write_variants(tmp_path)
    ROTATED.iloc[1:].to_csv(paths[1], index=False)
    with pytest.raises(PipelineError, match="no float row for rotate"):
        select_stage(paths, tmp_path / "s.json", "perplexity", 0.05, variants=["none", "rotate"])
    with pytest.raises(PipelineError, match="2 sweep tables for 1 transform variants"):
        select_stage(paths, tmp_path / "s.json", "perplexity", 0.05, variants=["none"])
    with pytest.raises(PipelineError, match="export.transform 'smooth' is not a swept variant; swept: none, rotate"):
        select_stage(write_variants(tmp_path), tmp_path / "s.json", "perplexity", 0.05, variants=["none", "rotate"],
                     transform="smooth")


def test_the_exported_variant_is_the_named_one_or_the_selections(tmp_path):
    out = tmp_path / "selection.json"
    select_stage(write_variants(tmp_path), out, "perplexity", 0.10, variants=["none", "rotate"])
    assert selected_variant(["none", "rotate"], None, out) == 1
    assert selected_variant(["none", "rotate"], "none", out) == 0
    assert selected_variant(["rotate"], None, None) == 0
    with pytest.raises(PipelineError, match="set export.transform"):
        selected_variant(["none", "rotate"], None, None)
    with pytest.raises(PipelineError, match="export.transform 'smooth' is not a swept variant"):
        selected_variant(["none", "rotate"], "smooth", None)
