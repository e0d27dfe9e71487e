"""Choosing the exported point from the sweep table (pandas only, no torch).

Every metric is turned into a *loss* against float, so one budget key fits them all:

- perplexity: the relative increase `ppl / ppl_float - 1` (0.03 = 3 % worse than float);
- kl: the mean KL(float || W8A8) per predicted token, in nats (float's own is 0);
- agreement: `1 - agreement`, the share of positions whose top-1 token differs from float's;
- accuracy: `accuracy_float - accuracy`, the absolute drop of last-token accuracy.

With several transform variants (`transform.variants`) the tables are stacked with a `transform` column and
every point's loss is taken against its own variant's float row (the transforms are exact, so the floats
agree); the choice is then across variants as well.

A point is within budget when its loss is at most `sweep.budget`. Among those the cheapest on the
device wins, as the runtime the table's `runtime` column names orders them (runtimes/): under an NPU
runtime profile the smallest CPU share (the measured share of Linear multiply-adds the shadow op runs on
the CPU), then the fewest shadow layers, then the smaller loss; under the ideal profile the fewest shadow
sides, then the smaller shadow FLOP share, then the smaller loss. When no
point meets the budget, the point with the smallest loss is taken and the selection says so
(`budget_met: false`), so a run still produces a model, and the report shows the miss plainly.
"""

from __future__ import annotations

import logging
from pathlib import Path

from shadowquant.atomic import write_json
from shadowquant.errors import PipelineError
from shadowquant.jsonfile import read_json_object
from shadowquant.runtimes import runtime_of
from shadowquant.runtimes.base import number

log = logging.getLogger(__name__)

METRICS = ("perplexity", "kl", "agreement", "accuracy")
# Metric -> True when larger is better (for plots and tables).
HIGHER_IS_BETTER = {"accuracy": True, "agreement": True, "perplexity": False, "kl": False}
LOSS_DESCRIPTION = {
    "perplexity": "relative perplexity increase over float",
    "kl": "mean KL(float || W8A8) per token (nats)",
    "agreement": "share of tokens whose top-1 differs from float",
    "accuracy": "drop of last-token accuracy below float",
}


def loss(row, float_row, metric: str) -> float | None:
    """The loss of a sweep row against the float row (see the module docstring); None when unknown."""
    if metric == "perplexity":
        increase = number(row.get("perplexity_increase"))
        if increase is not None:
            return increase
        value, reference = number(row.get("perplexity")), number(float_row.get("perplexity"))
        return None if value is None or not reference else value / reference - 1.0
    if metric == "kl":
        return number(row.get("kl"))
    if metric == "agreement":
        value = number(row.get("agreement"))
        return None if value is None else 1.0 - value
    if metric == "accuracy":
        value, reference = number(row.get("accuracy")), number(float_row.get("accuracy"))
        return None if value is None or reference is None else reference - value
    raise PipelineError(f"unknown selection metric '{metric}'; valid: {', '.join(METRICS)}")


def loss_interval(row, float_row, metric: str) -> tuple[float | None, float | None]:
    """The bootstrap interval of the loss where the sweep table has one (perplexity increase, kl, agreement)."""
    if metric == "perplexity":
        return number(row.get("perplexity_increase_ci_low")), number(row.get("perplexity_increase_ci_high"))
    if metric == "kl":
        return number(row.get("kl_ci_low")), number(row.get("kl_ci_high"))
    if metric == "agreement":
        high, low = number(row.get("agreement_ci_low")), number(row.get("agreement_ci_high"))
        return (None if low is None else 1.0 - low), (None if high is None else 1.0 - high)
    reference = number(float_row.get("accuracy"))
    high, low = number(row.get("accuracy_ci_low")), number(row.get("accuracy_ci_high"))
    if reference is None:
        return None, None
    return (None if low is None else reference - low), (None if high is None else reference - high)


def choose(table, metric: str, budget: float, point: str | None = None, transform: str | None = None) -> dict:
    """The selection of the module docstring; `point` (a label such as 'absmax-t152') forces that point,
    `transform` restricts a stacked table (column `transform`) to that variant."""
    if metric not in METRICS:
        raise PipelineError(f"unknown selection metric '{metric}'; valid: {', '.join(METRICS)}")
    table = table.copy()
    if "transform" not in table.columns:
        table["transform"] = "none"
    table["transform"] = table["transform"].astype(str)
    if transform is not None:
        variants = sorted(set(table["transform"]))
        table = table[table["transform"] == transform]
        if table.empty:
            raise PipelineError(f"export.transform '{transform}' is not a swept variant; swept: {', '.join(variants)}")
    floats = {}
    for row in table[table["point"] == "float"].to_dict("records"):
        floats.setdefault(row["transform"], row)
    points = table[table["point"] != "float"]
    missing = sorted(set(points["transform"]) - set(floats))
    if not floats or missing:
        raise PipelineError(f"sweep table has no float row{' for ' + ', '.join(missing) if missing else ''}; "
                            "re-run the float evaluation")
    if point is not None:
        points = points[points["point"] == point]
        if points.empty:
            valid = ", ".join(sorted(set(table.loc[table["point"] != "float", "point"])))
            raise PipelineError(f"export.point '{point}' is not a point of the sweep; swept points: {valid}")
    if points.empty:
        raise PipelineError("the sweep table has no W8A8 point; add sweep.thresholds or sweep.shadow_sides")
    rows = []
    for row in points.to_dict("records"):
        value = loss(row, floats[row["transform"]], metric)
        rows.append((row, value))
    known = [(row, value) for row, value in rows if value is not None]
    if not known:
        raise PipelineError(f"no sweep point has a {metric} value; re-run the sweep")
    within = [(row, value) for row, value in known if value <= budget + 1e-12]

    runtime = table_runtime(points)

    def cost_key(item):
        row, value = item
        return runtime.selection_cost(row, value)

    if point is not None:
        best, best_loss = min(known, key=lambda item: (item[1], *cost_key(item)))
        reason = f"forced by export.point = {point}"
    elif within:
        best, best_loss = min(within, key=cost_key)
        reason = runtime.selection_reason(best, len(within), len(rows), LOSS_DESCRIPTION[metric], budget)
    else:
        best, best_loss = min(known, key=lambda item: (item[1], *cost_key(item)))
        reason = (f"BUDGET MISSED: no point keeps the {LOSS_DESCRIPTION[metric]} within {budget:g}; taking the most "
                  f"accurate point ({best_loss:.4g}); raise sweep.budget or add shadow "
                  f"{runtime.shadow_unit} / smaller thresholds")
    float_row = floats[best["transform"]]
    low, high = loss_interval(best, float_row, metric)
    threshold = number(best.get("threshold"))
    shadow_budget = number(best.get("shadow_budget"))
    return {
        "point": str(best["point"]), "transform": str(best["transform"]), "rule": str(best["rule"]),
        "statistic": str(best["statistic"]),
        "threshold": threshold, "shadow_budget": None if shadow_budget is None else int(shadow_budget),
        "metric": metric, "budget": float(budget), "loss": float(best_loss), "loss_ci_low": low, "loss_ci_high": high,
        "budget_met": bool(best_loss <= budget + 1e-12), "float_value": number(float_row.get(metric)),
        "selected_value": number(best.get(metric)), "num_shadow_sides": int(best["num_shadow_sides"]),
        "shadow_flop_fraction": number(best.get("shadow_flop_fraction")),
        **runtime.selection_fields(best), "reason": reason,
        "candidates": len(rows), "within_budget": len(within),
    }


def table_runtime(points):
    """The runtime a sweep table's points were simulated under, from its `runtime` column (tables of the
    idealized W8A8 written before the column existed have none); one runtime per table."""
    names = set(points["runtime"].dropna().astype(str)) if "runtime" in points.columns else set()
    if len(names) > 1:
        raise PipelineError(f"the sweep tables mix runtime profiles ({', '.join(sorted(names))}); sweep one profile")
    return runtime_of({"runtime": names.pop() if names else None})


def stack_sweeps(sweep_csvs, variants):
    """The sweep tables of the transform variants as one table with a `transform` column."""
    import pandas as pd

    sweep_csvs, variants = list(sweep_csvs), list(variants)
    if len(sweep_csvs) != len(variants):
        raise PipelineError(f"{len(sweep_csvs)} sweep tables for {len(variants)} transform variants "
                            f"({', '.join(variants)}); give one table per variant")
    tables = []
    for path, variant in zip(sweep_csvs, variants):
        table = pd.read_csv(path)
        table.insert(0, "transform", variant)
        tables.append(table)
    return pd.concat(tables, ignore_index=True)


def select_stage(sweep_csvs, out, metric: str, budget: float, point: str = "auto", variants=("none",),
                 transform: str | None = None) -> dict:
    """selection.json from one sweep table per transform variant (`sweep_csvs` in the order of `variants`)."""
    if isinstance(sweep_csvs, (str, Path)):
        sweep_csvs = [sweep_csvs]
    table = stack_sweeps(sweep_csvs, variants)
    choice = choose(table, metric, budget, None if point == "auto" else point, transform)
    write_json(out, choice)
    log.info("selected %s (transform %s): %s", choice["point"], choice["transform"], choice["reason"])
    if not choice["budget_met"]:
        log.warning("the selected point misses the budget: %s %.4g > %g", metric, choice["loss"], budget)
    return choice


def read_selection(path: str | Path) -> dict:
    """selection.json as written by select_stage, with a clear error for anything else."""
    choice = read_json_object(path, "selection", "delete it and run the select_point rule again")
    missing = [key for key in ("point", "rule", "statistic", "metric", "budget", "loss", "budget_met")
               if key not in choice]
    if missing:
        raise PipelineError(f"{path}: selection lacks {', '.join(missing)}; delete it and run the selection again")
    return choice


def selected_variant(variants, transform: str | None, selection: str | Path | None) -> int:
    """Index into `variants` of the exported model's transform: `export.transform`, else the selection's,
    else the only variant."""
    variants = list(variants)
    if transform is None and selection is not None:
        transform = read_selection(selection).get("transform", "none")
    if transform is None:
        if len(variants) != 1:
            raise PipelineError(f"export.point is explicit and {len(variants)} transform variants are swept "
                                f"({', '.join(variants)}); set export.transform to one of them")
        return 0
    if transform not in variants:
        raise PipelineError(f"export.transform '{transform}' is not a swept variant; valid: {', '.join(variants)}")
    return variants.index(transform)


def resolve_export_point(point: str, selection: str | Path | None) -> str:
    """The point label the export uses: the explicit `export.point`, else the selection's."""
    if point != "auto":
        return point
    if selection is None:
        raise PipelineError("export.point is 'auto' but no selection.json was given")
    return read_selection(selection)["point"]
