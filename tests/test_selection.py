"""The automatic choice of the exported point on hand-built sweep tables."""

import math

import pandas as pd
import pytest

from shadowquant.errors import PipelineError
from shadowquant.selection import choose


def table(*points, float_row=None):
    """Rows (statistic, threshold, accuracy, perplexity, agreement, kl, shadow sides) after a float row."""
    float_row = float_row or ("float", math.nan, 0.50, 20.0, None, None, None)
    columns = ["statistic", "threshold", "accuracy", "perplexity", "agreement", "kl", "num_shadow_sides"]
    return pd.DataFrame([float_row, *points], columns=columns)


SWEEP = table(
    ("absmax", 1.0, 0.50, 20.5, 0.95, 0.05, 40),
    ("absmax", 16.0, 0.49, 22.0, 0.90, 0.10, 10),
    ("absmax", 1e7, 0.30, 90.0, 0.40, 2.00, 0),
    ("signed", 16.0, 0.495, 21.0, 0.92, 0.08, 10),
)


@pytest.mark.parametrize("metric,max_drop,expected", [
    ("accuracy", 0.011, ("signed", 16.0)),  # both 10-side points qualify; the better accuracy wins the tie
    ("accuracy", 0.001, ("absmax", 1.0)),
    ("accuracy", 0.5, ("absmax", 1e7)),
    ("perplexity", 1.0, ("signed", 16.0)),  # lower is better: 21.0 within 20 + 1, 22.0 not
    ("perplexity", 0.6, ("absmax", 1.0)),
    ("agreement", 0.09, ("signed", 16.0)),  # the float model agrees with itself: bound 1 - 0.09
    ("kl", 0.09, ("signed", 16.0)),  # the float model's KL to itself is 0: bound 0.09
    ("kl", 0.06, ("absmax", 1.0)),
])
def test_fewest_shadow_sides_within_budget_in_each_metric_direction(metric, max_drop, expected):
    choice = choose(SWEEP, metric, max_drop)
    assert (choice["statistic"], choice["threshold"]) == expected
    assert choice["num_shadow_sides"] == int(SWEEP[(SWEEP.statistic == expected[0])
                                                   & (SWEEP.threshold == expected[1])].num_shadow_sides.iloc[0])


def test_a_tie_in_shadow_sides_and_metric_prefers_the_larger_threshold():
    tied = table(("absmax", 8.0, 0.50, 21.0, 0.9, 0.1, 5), ("absmax", 16.0, 0.50, 21.0, 0.9, 0.1, 5))
    assert choose(tied, "accuracy", 0.01)["threshold"] == 16.0


def test_a_missed_budget_names_the_closest_point():
    with pytest.raises(PipelineError, match=r"no swept point keeps perplexity within 0\.1 .* absmax threshold 1 with perplexity 20\.5"):
        choose(SWEEP, "perplexity", 0.1)


def test_explicit_statistic_and_threshold_restrict_the_candidates():
    assert choose(SWEEP, "accuracy", 0.5, statistic="signed")["statistic"] == "signed"
    assert choose(SWEEP, "accuracy", 0.5, threshold=16.0)["threshold"] == 16.0
    with pytest.raises(PipelineError, match="no point for statistic signed and threshold 1"):
        choose(SWEEP, "accuracy", 0.5, statistic="signed", threshold=1.0)


def test_a_table_without_float_row_is_an_error():
    with pytest.raises(PipelineError, match="no float row"):
        choose(SWEEP.iloc[1:], "accuracy", 0.01)
