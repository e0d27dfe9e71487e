"""Choosing the exported point from the sweep table (pandas only, no torch): budget against float,
then the cheapest point on device."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from shadowquant.atomic import write_json
from shadowquant.errors import PipelineError

log = logging.getLogger(__name__)

# Metric -> True when larger is better.
HIGHER_IS_BETTER = {"accuracy": True, "agreement": True, "perplexity": False, "kl": False}


def budget_bound(metric: str, float_value: float, max_drop: float) -> float:
    """The worst metric value the selection still accepts."""
    if metric == "kl":
        return max_drop  # the float model's own KL is 0
    return float_value - max_drop if HIGHER_IS_BETTER[metric] else float_value + max_drop


def within_budget(value, float_value, metric: str, max_drop: float) -> bool:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    bound = budget_bound(metric, float_value, max_drop)
    return value >= bound - 1e-12 if HIGHER_IS_BETTER[metric] else value <= bound + 1e-12


def choose(table, metric: str, max_drop: float, statistic: str | None = None,
           threshold: float | None = None) -> dict:
    """Fewest shadow sides among the points within budget of float (ties: the better metric).

    `statistic` / `threshold` restrict the candidates (explicit config values override "auto").
    """
    import pandas as pd

    floats = table[table["statistic"] == "float"]
    if floats.empty:
        raise PipelineError("sweep table has no float row; re-run the float evaluation")
    # The float model agrees with itself completely and has no divergence from itself.
    float_value = {"kl": 0.0, "agreement": 1.0}.get(metric, None)
    if float_value is None:
        float_value = float(floats.iloc[0][metric])
    points = table[table["statistic"] != "float"]
    if statistic is not None:
        points = points[points["statistic"] == statistic]
    if threshold is not None:
        points = points[points["threshold"] == float(threshold)]
    if points.empty:
        raise PipelineError(f"the sweep has no point for statistic {statistic or 'any'} and threshold "
                            f"{threshold if threshold is not None else 'any'}; add it to sweep.thresholds/statistics")
    sign = -1 if HIGHER_IS_BETTER[metric] else 1
    ok = points[[within_budget(v, float_value, metric, max_drop) for v in points[metric]]]
    if ok.empty:
        ranked = points.assign(_key=[sign * v if not pd.isna(v) else math.inf for v in points[metric]])
        best = ranked.sort_values("_key").iloc[0]
        raise PipelineError(
            f"no swept point keeps {metric} within {max_drop} of float ({float_value:.4f}); the closest is "
            f"statistic {best['statistic']} threshold {best['threshold']:g} with {metric} {best[metric]:.4f}; "
            f"raise sweep.max_accuracy_drop or add smaller thresholds")
    ranked = ok.assign(_key=[sign * v for v in ok[metric]]).sort_values(["num_shadow_sides", "_key", "threshold"],
                                                                         ascending=[True, True, False])
    best = ranked.iloc[0]
    reason = (f"fewest shadow sides ({int(best['num_shadow_sides'])}) among {len(ok)} of {len(points)} swept points "
              f"whose {metric} is within {max_drop} of float ({float_value:.4f}); ties broken by the better {metric}")
    return {
        "statistic": str(best["statistic"]), "threshold": float(best["threshold"]), "metric": metric,
        "max_drop": max_drop, "float_value": float_value, "selected_value": float(best[metric]),
        "num_shadow_sides": int(best["num_shadow_sides"]), "reason": reason,
        "candidates": int(len(points)), "within_budget": int(len(ok)),
    }


def select_stage(sweep_csv, out, metric: str, max_drop: float, statistic: str = "auto",
                 threshold="auto") -> dict:
    import pandas as pd

    table = pd.read_csv(sweep_csv)
    choice = choose(table, metric, max_drop, None if statistic == "auto" else statistic,
                    None if threshold == "auto" else float(threshold))
    write_json(out, choice)
    log.info("selected %s threshold %g: %s", choice["statistic"], choice["threshold"], choice["reason"])
    return choice


def resolve_export_pair(statistic: str, threshold, selection: str | Path | None) -> tuple[str, float]:
    """The (statistic, threshold) the export uses: explicit config values, else the selection's."""
    if statistic != "auto" and threshold != "auto":
        return statistic, float(threshold)
    if selection is None:
        raise PipelineError("export.threshold or statistic is 'auto' but no selection.json was given")
    choice = json.loads(Path(selection).read_text())
    return choice["statistic"], float(choice["threshold"])
