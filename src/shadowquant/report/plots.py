"""Report figures (PNG) and HTML tables.

- the sweep: the loss against float vs the ratio threshold, the absolute metrics vs the shadow cost, and
  the Pareto fronts (loss vs shadow sides) of the seed's ratio rule and of the sensitivity rule;
- where the loss comes from: the per-side sensitivity ranking and the weights / inputs / outputs breakdown;
- the per-layer outlier ratios of profiling.

The loss of a point is the one the selection bounds (`shadowquant.evaluate.selection.loss`): relative perplexity
increase, KL, top-1 disagreement or accuracy drop, each against float, so every loss panel has float at 0
and the budget as a horizontal line. Figures are built on `matplotlib.figure.Figure` directly (Agg canvas,
no pyplot): no display is needed and no global figure state leaks between calls.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from shadowquant.atomic import atomic_path, write_text
from shadowquant.runtimes.decision import SIDES, STAT_KEYS, threshold_label
from shadowquant.errors import PipelineError
from shadowquant.jsonfile import read_json_object
from shadowquant.runtimes import runtime_of
from shadowquant.evaluate.selection import LOSS_DESCRIPTION, METRICS, loss, loss_interval, table_runtime

METRIC_LABELS = {
    "accuracy": "last-token accuracy",
    "perplexity": "perplexity",
    "agreement": "top-1 agreement with float",
    "kl": "mean KL(float || W8A8) (nats)",
}
LOSS_LABELS = {
    "perplexity": "perplexity increase over float",
    "kl": "KL(float || W8A8) per token (nats)",
    "agreement": "top-1 disagreement with float",
    "accuracy": "last-token accuracy drop below float",
}
RULES = ("float", "ratio", "sensitivity", "layers")
TEXT_COLUMNS = ("point", "rule", "statistic", "clip", "runtime", "shadow_layers")
SWEEP_REQUIRED = ("point", "rule", "statistic", "num_shadow_sides", "perplexity")
SELECTION_REQUIRED = ("point", "rule", "statistic", "metric", "budget", "loss", "budget_met")
SENSITIVITY_REQUIRED = ("layer", "side", "delta_kl", "cost")
BREAKDOWN_PARTS = ("weights", "inputs", "outputs", "all")
BREAKDOWN_REQUIRED = ("perplexity_increase", "kl")
BREAKDOWN_LABELS = {"weights": "weights only\n(int8 per tensor)", "inputs": "inputs only\n(fake-quantized)",
                    "outputs": "outputs only\n(fake-quantized)", "all": "all three\n(W8A8)"}
BREAKDOWN_COLOURS = {"weights": "tab:purple", "inputs": "tab:blue", "outputs": "tab:orange", "all": "0.35"}
# Colour per (rule, statistic); a statistic also sets marker and line style, so the series stay apart in grey.
SERIES_COLOURS = {("ratio", "absmax"): "tab:blue", ("ratio", "signed"): "tab:cyan",
                  ("sensitivity", "absmax"): "tab:red", ("sensitivity", "signed"): "tab:orange",
                  ("layers", "absmax"): "tab:red"}
STATISTIC_STYLE = {"absmax": ("s", "-"), "signed": ("o", "--")}
RULE_NAMES = {"ratio": "ratio rule (seed)", "sensitivity": "sensitivity rule", "layers": "measured layer front"}
SIDE_COLOURS = {"input": "tab:blue", "output": "tab:orange", "layer": "tab:red"}
FALLBACK_COLOURS = ("tab:green", "tab:purple", "tab:brown", "tab:pink")
KIND_MARKERS = ("o", "s", "^", "v", "D", "P", "X", "<", ">", "h", "*", "p")
MISSED_COLOUR = "#c00000"
# A largest threshold this far above the next one is the "no shadow" sentinel (10000000 by default):
# it is drawn PULL_IN times the next one, behind an axis break, so the real thresholds keep the width.
SENTINEL_GAP = 100.0
PULL_IN = 3.0
# Losses spanning more than this factor get a symmetric-log axis: the budget region (a few %) and a
# broken configuration (+1000 %) stay readable together, and float's 0 stays on the axis.
SYMLOG_SPAN = 30.0
DEPTH_PATTERN = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)(?:\.|$)")
DPI = 120


# ----------------------------------------------------------------------------- inputs

def _read_csv(path: str | Path, what: str):
    import pandas as pd

    path = Path(path)
    try:
        return pd.read_csv(path)
    except FileNotFoundError:
        raise PipelineError(f"{path}: {what} not found") from None
    except pd.errors.EmptyDataError:
        raise PipelineError(f"{path}: {what} is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError, IsADirectoryError, PermissionError) as exc:
        raise PipelineError(f"{path}: {what} is not a readable CSV file ({type(exc).__name__})") from None


def _read_json(path: str | Path, what: str) -> dict:
    return read_json_object(path, f"{what} file")


def _require_columns(table, path, what: str, required) -> None:
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise PipelineError(f"{path}: {what} lacks column(s) {', '.join(missing)}; expected at least "
                            f"{', '.join(required)}")


def _coerce_numeric(table, text_columns) -> None:
    """Numbers where the column is not text; unparsable or infinite values become NaN (not drawn)."""
    import numpy as np
    import pandas as pd

    for column in table.columns:
        if column in text_columns:
            table[column] = table[column].astype(str)
        else:
            table[column] = pd.to_numeric(table[column], errors="coerce").replace([np.inf, -np.inf], np.nan)


def load_sweep(path: str | Path):
    """sweep.csv with numeric columns coerced, checked for what every sweep figure needs."""
    path = Path(path)
    table = _read_csv(path, "sweep table")
    _require_columns(table, path, "sweep table", SWEEP_REQUIRED)
    _coerce_numeric(table, TEXT_COLUMNS)
    unknown = sorted(set(table["rule"]) - set(RULES))
    if unknown:
        raise PipelineError(f"{path}: unknown rule '{unknown[0]}'; valid: {', '.join(RULES)}")
    if not (table["rule"] == "float").any():
        raise PipelineError(f"{path}: no float row (rule 'float'); every loss is measured against it")
    points = table[table["rule"] != "float"]
    if points.empty:
        raise PipelineError(f"{path}: no W8A8 point (only the float row); nothing to plot")
    ratio = points[points["rule"] == "ratio"]
    if not ratio.empty:
        if "threshold" not in table.columns:
            raise PipelineError(f"{path}: sweep table lacks column threshold, needed by its ratio-rule points")
        bad = ratio[~(ratio["threshold"] > 0)]
        if not bad.empty:
            raise PipelineError(f"{path}: threshold must be a positive number, got {float(bad['threshold'].iloc[0]):g} "
                                f"for point {bad['point'].iloc[0]}")
    unknown_cost = points[points["num_shadow_sides"].isna()]
    if not unknown_cost.empty:
        raise PipelineError(f"{path}: num_shadow_sides is empty for point {unknown_cost['point'].iloc[0]}")
    return table


def selection_for_variant(selection_json: str | Path | None, variant: str) -> str | Path | None:
    """The selection to mark in a transform variant's figures: None when it chose another variant."""
    if selection_json is None:
        return None
    return selection_json if load_selection(selection_json).get("transform", "none") == variant else None


def load_selection(path: str | Path) -> dict:
    """selection.json, checked for the keys the figures use."""
    data = _read_json(path, "selection")
    missing = [key for key in SELECTION_REQUIRED if key not in data]
    if missing:
        raise PipelineError(f"{path}: selection lacks key(s) {', '.join(missing)} (expected the selection "
                            "written by the select rule)")
    if data["metric"] not in METRICS:
        raise PipelineError(f"{path}: unknown metric '{data['metric']}'; valid: {', '.join(METRICS)}")
    for key in ("budget", "loss"):
        if isinstance(data[key], bool) or not isinstance(data[key], (int, float)):
            raise PipelineError(f"{path}: '{key}' must be a number, got {data[key]!r}")
    if not isinstance(data["budget_met"], bool):
        raise PipelineError(f"{path}: 'budget_met' must be true or false, got {data['budget_met']!r}")
    return data


def load_sensitivity(path: str | Path):
    """sensitivity.csv: one row per (layer, side) with its delta_kl and cost."""
    path = Path(path)
    table = _read_csv(path, "sensitivity table")
    _require_columns(table, path, "sensitivity table", SENSITIVITY_REQUIRED)
    if table.empty:
        raise PipelineError(f"{path}: sensitivity table has no row; nothing to plot")
    _coerce_numeric(table, ("layer", "side", "statistic"))
    # 'layer': a row of the layer ranking of an NPU runtime profile (a whole shadow layer).
    bad_side = table[~table["side"].isin(SIDES + ("layer",))]
    if not bad_side.empty:
        raise PipelineError(f"{path}: side '{bad_side['side'].iloc[0]}' of layer {bad_side['layer'].iloc[0]} is "
                            f"not valid; valid: {', '.join(SIDES)}, layer")
    if "benefit" in table.columns:
        # Sides the sensitivity stage did not measure exactly carry the proxy's estimate in `benefit`.
        table["measured"] = table["delta_kl"].notna()
        table["delta_kl"] = table["delta_kl"].fillna(table["benefit"])
    for column in ("delta_kl", "cost"):
        bad = table[table[column].isna()]
        if not bad.empty:
            raise PipelineError(f"{path}: {column} is empty or not a number for layer {bad['layer'].iloc[0]} "
                                f"{bad['side'].iloc[0]}")
    return table


def _optional_number(value) -> float:
    """A JSON number, or NaN for null / absent / anything else (an interval the producer left out)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return math.nan
    return float(value)


def load_breakdown(path: str | Path) -> dict:
    """breakdown.json: the parts weights / inputs / outputs / all, each with perplexity increase and KL."""
    data = _read_json(path, "breakdown")
    parts = data.get("parts")
    if not isinstance(parts, dict):
        raise PipelineError(f"{path}: missing object 'parts' (expected parts {', '.join(BREAKDOWN_PARTS)})")
    missing = [p for p in BREAKDOWN_PARTS if not isinstance(parts.get(p), dict)]
    if missing:
        raise PipelineError(f"{path}: 'parts' lacks {', '.join(missing)}; expected {', '.join(BREAKDOWN_PARTS)}")
    for part in BREAKDOWN_PARTS:
        for key in BREAKDOWN_REQUIRED:
            if math.isnan(_optional_number(parts[part].get(key))):
                raise PipelineError(f"{path}: parts.{part}.{key} must be a number, got {parts[part].get(key)!r}")
    return data


def _float_row(table) -> dict:
    return table[table["rule"] == "float"].iloc[0].to_dict()


def _selected_row(table, selection: dict, sweep_path, selection_path):
    match = table[table["point"] == str(selection["point"])]
    if match.empty:
        raise PipelineError(f"{selection_path}: selected point {selection['point']} is not a row of {sweep_path}")
    return match.iloc[0]


def _losses(group, float_row: dict, metric: str):
    """(loss, ci_low, ci_high) arrays of a group of sweep rows; NaN where unknown."""
    import numpy as np

    def number(value):
        return math.nan if value is None else value

    values, lows, highs = [], [], []
    for row in group.to_dict("records"):
        low, high = loss_interval(row, float_row, metric)
        values.append(number(loss(row, float_row, metric)))
        lows.append(number(low))
        highs.append(number(high))
    return np.array(values, dtype=float), np.array(lows, dtype=float), np.array(highs, dtype=float)


def _loss_metrics(table, selection: dict | None) -> list[str]:
    """Perplexity increase and KL (when measured), plus the selection metric when it is another one."""
    points = table[table["rule"] != "float"]
    float_row = _float_row(table)
    metrics = ["perplexity"]
    for metric in ("kl", selection["metric"] if selection else None):
        if metric and metric not in metrics and _has_values(_losses(points, float_row, metric)[0]):
            metrics.append(metric)
    return metrics


def _has_values(values) -> bool:
    import numpy as np

    return bool(np.isfinite(values).any())


# ----------------------------------------------------------------------------- text

def format_loss(metric: str, value: float | None) -> str:
    """A loss in its unit: perplexity +4.1 %, KL 0.0123 nats, disagreement 3.5 %, accuracy drop 1.6 pts."""
    if value is None or not math.isfinite(value):
        return "n/a"
    if metric == "perplexity":
        return f"{value:+.1%}"
    if metric == "kl":
        return f"{value:.3g} nats"
    if metric == "agreement":
        return f"{value:.1%}"
    return f"{100 * value:.1f} pts"


def selection_note(selection: dict) -> str:
    """What was selected and whether it meets the budget; a missed budget starts with 'BUDGET MISSED'."""
    metric = selection["metric"]
    value = format_loss(metric, float(selection["loss"]))
    low, high = (_optional_number(selection.get(k)) for k in ("loss_ci_low", "loss_ci_high"))
    if math.isfinite(low) and math.isfinite(high):
        value += f" [95 % CI {format_loss(metric, low)}, {format_loss(metric, high)}]"
    cost = runtime_of(selection).cost_note(selection)
    point = f"{selection['point']} ({selection['rule']} rule)"
    budget = format_loss(metric, float(selection["budget"]))
    if selection["budget_met"]:
        return (f"selected {point}: {cost}\n{LOSS_DESCRIPTION[metric]} {value} within the budget {budget}")
    return (f"BUDGET MISSED: no point keeps the {LOSS_DESCRIPTION[metric]} within {budget}\n"
            f"took the most accurate point, {point}: {value}; {cost}")


def _wrap(text: str, width: int) -> str:
    """Each line wrapped to `width` characters: a long title is cut at the figure's edge otherwise."""
    import textwrap

    return "\n".join(textwrap.fill(line, width, break_on_hyphens=False) for line in text.split("\n"))


def _titled_panels(count: int, heading: str, selection: dict | None, height: float = 4.8):
    """A row of `count` panels under the heading and, in a band of its own, the selection note: red and bold
    when the budget was missed, so nobody reads the figure without seeing it. Returns (figure, body, axes)."""
    width = max(6.2 * count, 11.0)
    characters = int(width * 12)  # about what fits at 10 pt
    heading = _wrap(heading, characters)
    if selection is None:
        fig = _new_figure(width, height)
        fig.suptitle(heading, fontsize=10)
        return fig, fig, fig.subplots(1, count, squeeze=False)[0]
    missed = not selection["budget_met"]
    note = _wrap(selection_note(selection), int(characters * (0.9 if missed else 1.0)))
    note_height = 0.2 * (note.count("\n") + 1) + 0.15
    fig = _new_figure(width, height + note_height)
    fig.suptitle(heading, fontsize=10)
    band, body = fig.subfigures(2, 1, height_ratios=[note_height, height])
    band.text(0.5, 0.5, note, ha="center", va="center", fontsize=10.5 if missed else 10,
              color=MISSED_COLOUR if missed else "black", fontweight="bold" if missed else "normal")
    return fig, body, body.subplots(1, count, squeeze=False)[0]


def _sweep_heading(table, what: str) -> str:
    runtimes = sorted(set(table["runtime"].dropna())) if "runtime" in table.columns else []
    text = f"Simulated {'/'.join(runtimes) + ' runtime' if runtimes else 'W8A8'} sweep: {what}"
    details = [f"{int(table[c].dropna().iloc[0])} {unit}" for c, unit in (("num_samples", "records"),
                                                                          ("num_tokens", "tokens"))
              if c in table.columns and table[c].notna().any()]
    if any(table[c].notna().any() for c in table.columns if "_ci_" in c):
        details.append("intervals: 95 % bootstrap CI over records")
    return text + (f" ({'; '.join(details)})" if details else "")


def _short_layer_name(name: str) -> str:
    """'model.layers.3.mlp.down_proj' -> 'layers.3.mlp.down_proj': the model prefix says nothing."""
    match = DEPTH_PATTERN.search(name)
    return name[match.start():].lstrip(".") if match else name


# ----------------------------------------------------------------------------- shared drawing

def _new_figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _save(fig, out_png: str | Path) -> None:
    with atomic_path(out_png, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)


def _series(points):
    """(rule, statistic) groups of the W8A8 points: the ratio rule (the baseline) first. Points whose
    clipped sides use the MSE-optimal clip form their own series ('absmax+mse clip')."""
    if "clip" in points.columns:
        clips = points["clip"].fillna("max")
        points = points.assign(statistic=[s if c != "mse" else f"{s}+mse clip"
                                          for s, c in zip(points["statistic"], clips)])
    groups = points.groupby(["rule", "statistic"], sort=False)
    return sorted(groups, key=lambda item: (RULES.index(item[0][0]), item[0][1]))


def _series_style(rule: str, statistic: str, index: int) -> dict:
    marker, linestyle = STATISTIC_STYLE.get(statistic, ("D", "-."))
    colour = SERIES_COLOURS.get((rule, statistic), FALLBACK_COLOURS[index % len(FALLBACK_COLOURS)])
    return {"color": colour, "marker": marker, "linestyle": linestyle, "markersize": 5, "linewidth": 1.5,
            "label": f"{RULE_NAMES.get(rule, rule)}, {statistic}"}


def _draw_series(ax, x, y, low, high, style: dict, band: bool) -> None:
    """A line with markers and its 95 % interval: a shaded band or error bars; no interval where none is known."""
    import numpy as np

    x, y, low, high = (np.asarray(a, dtype=float) for a in (x, y, low, high))
    order = np.argsort(x, kind="stable")
    x, y, low, high = x[order], y[order], low[order], high[order]
    shown = np.isfinite(y)
    ax.plot(x[shown], y[shown], **style)
    known = shown & np.isfinite(low) & np.isfinite(high)
    if not known.any():
        return
    if band:
        ax.fill_between(x, np.where(known, low, y), np.where(known, high, y), where=known, color=style["color"],
                        alpha=0.15, linewidth=0)
    else:
        errors = [np.clip(y[known] - low[known], 0, None), np.clip(high[known] - y[known], 0, None)]
        ax.errorbar(x[known], y[known], yerr=errors, fmt="none", ecolor=style["color"], elinewidth=1.0,
                    capsize=3, alpha=0.8)


def _symlog_ticks(linthresh: float, top: float) -> list[float]:
    """0 and the decades from linthresh up (1-2-5 steps when that gives too few), none inside the linear part
    where their labels would collide with 0's."""
    first, last = math.ceil(math.log10(linthresh)), math.ceil(math.log10(top))
    decades = [10.0 ** d for d in range(first, last + 1)]
    if len(decades) < 4:
        decades = [m * 10.0 ** d for d in range(first - 1, last + 1) for m in (1, 2, 5)
                   if linthresh <= m * 10.0 ** d <= 2 * top]
    return [0.0, *decades]


def _style_loss_axis(ax, metric: str, values) -> None:
    import numpy as np
    from matplotlib.ticker import (
        FixedLocator,
        FuncFormatter,
        NullLocator,
        PercentFormatter,
    )

    ax.set_ylabel(LOSS_LABELS[metric])
    values = np.asarray(values, dtype=float)
    positive = values[np.isfinite(values) & (values > 0)]
    # Disagreement and accuracy drop are bounded shares: a linear axis reads best.
    if metric in ("perplexity", "kl") and positive.size and positive.max() / positive.min() > SYMLOG_SPAN:
        # Linear only below half the smallest loss: float's 0 stays on the axis without a wasted decade.
        linthresh = min(0.1, max(1e-4, positive.min() / 2))
        ax.set_yscale("symlog", linthresh=linthresh, linscale=0.3)
        ax.yaxis.set_major_locator(FixedLocator(_symlog_ticks(linthresh, float(positive.max()))))
        ax.yaxis.set_minor_locator(NullLocator())
        if ax.dataLim.y0 >= 0:  # no negative loss or interval to show: start just below float's 0
            ax.set_ylim(bottom=-0.15 * linthresh)
    if metric != "kl":
        ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=None))
    else:
        ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.grid(True, which="major", alpha=0.3)


def _draw_float_and_budget(ax, metric: str, selection: dict | None) -> None:
    """Float at loss 0 (dashed) and, on the selection metric's panel, the budget and the accepted region."""
    ax.axhline(0.0, color="0.3", linestyle="--", linewidth=1.2, label="float (loss 0)")
    if selection is None or selection["metric"] != metric:
        return
    budget = float(selection["budget"])
    low, high = ax.get_ylim()
    high = max(high, budget + 0.08 * (high - low)) if ax.get_yscale() == "linear" else max(high, 1.5 * budget)
    ax.axhspan(min(low, 0.0), budget, color="tab:green", alpha=0.10, linewidth=0)
    ax.axhline(budget, color="tab:green", linewidth=1.3,
               label=f"budget: {LOSS_DESCRIPTION[metric]} ≤ {format_loss(metric, budget)}")
    ax.set_ylim(low, high)


def _mark_selected(ax, x: float, y: float, selection: dict) -> None:
    if not (math.isfinite(x) and math.isfinite(y)):
        return
    missed = not selection["budget_met"]
    ax.scatter([x], [y], marker="*", s=340, color="gold", edgecolor=MISSED_COLOUR if missed else "black",
               linewidth=1.4 if missed else 0.8, zorder=6,
               label=f"selected: {selection['point']}" + (" (BUDGET MISSED)" if missed else ""))


def _undrawn_note(group, values) -> str:
    import numpy as np

    undrawn = [str(p) for p, v in zip(group["point"], values) if not np.isfinite(v)]
    return ("\nnot finite, not drawn: " + ", ".join(undrawn)) if undrawn else ""


def _shared_legend(fig, axes) -> None:
    """One legend for the figure: entries of all panels, each label once."""
    handles, labels = [], []
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 3), fontsize=9)


def _symlog_count_axis(ax, values, label: str) -> None:
    """Counts from 0 up to hundreds: linear below 1, logarithmic above, so 0 and 420 both fit."""
    from matplotlib.ticker import FixedLocator, NullFormatter

    top = max([1.0, *[float(v) for v in values]])
    ax.set_xscale("symlog", linthresh=1.0, linscale=0.4)
    ticks = [t for t in (0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000) if t <= top * 1.3]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.set_xticklabels([str(t) for t in ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlim(-0.3, top * 1.4)
    ax.set_xlabel(label)


# ----------------------------------------------------------------------------- sweep vs threshold

def _threshold_positions(thresholds) -> tuple[dict[float, float], float | None]:
    """x position of each threshold; a far 'no shadow' sentinel is pulled in next to the others."""
    values = sorted({float(t) for t in thresholds})
    positions = {t: t for t in values}
    if len(values) >= 2 and values[-1] >= SENTINEL_GAP * values[-2]:
        positions[values[-1]] = values[-2] * PULL_IN
        return positions, values[-1]
    return positions, None


def _style_threshold_axis(ax, positions: dict[float, float], sentinel: float | None, sentinel_label: str) -> None:
    from matplotlib.ticker import FixedLocator, NullFormatter

    ax.set_xscale("log")
    real = [t for t in positions if t != sentinel]
    lo, hi = min(real), max(real)
    decades = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
    major = [10.0 ** d for d in decades if lo / 1.5 <= 10.0 ** d <= hi * 1.5]
    if len(major) < 2:  # a narrow sweep: label the thresholds themselves
        major = real
    minor = [m * 10.0 ** d for d in decades for m in range(2, 10) if lo <= m * 10.0 ** d <= hi]
    ticks = major + ([positions[sentinel]] if sentinel is not None else [])
    labels = [f"{t:g}" for t in major] + ([sentinel_label] if sentinel is not None else [])
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.set_xticklabels(labels)
    ax.xaxis.set_minor_locator(FixedLocator(minor))
    ax.xaxis.set_minor_formatter(NullFormatter())
    if sentinel is not None:
        # Axis break between the last real threshold and the pulled-in sentinel.
        x_break = math.sqrt(hi * positions[sentinel])
        ax.plot([x_break, x_break], [0, 0], transform=ax.get_xaxis_transform(), marker=(2, 0, -45),
                markersize=10, color="black", clip_on=False, linestyle="none")
        ax.axvline(x_break, color="0.6", linestyle=":", linewidth=0.8)
    # The same range on every panel, whichever points a metric leaves undrawn.
    ax.set_xlim(min(positions.values()) / 1.4, max(positions.values()) * 1.4)
    ax.set_xlabel("threshold t (log scale; larger t → fewer shadow sides)")


def _sentinel_label(points, sentinel: float | None) -> str:
    if sentinel is None:
        return ""
    sides = points.loc[points["threshold"] == sentinel, "num_shadow_sides"]
    return threshold_label(sentinel) + ("\n(no shadow)" if len(sides) and (sides == 0).all() else "")


def _sweep_inputs(sweep_csv, selection_json):
    """(the sweep table, selection.json or None, the selected row or None, the float row) of a sweep plot."""
    table = load_sweep(sweep_csv)
    selection = load_selection(selection_json) if selection_json is not None else None
    selected = _selected_row(table, selection, sweep_csv, selection_json) if selection is not None else None
    return table, selection, selected, _float_row(table)


def plot_sweep_vs_threshold(sweep_csv: str | Path, selection_json: str | Path | None, out_png: str | Path) -> None:
    """The ratio rule's loss against float vs threshold t (log x), one line per statistic, with 95 % bands."""
    table, selection, selected, float_row = _sweep_inputs(sweep_csv, selection_json)
    points = table[table["rule"] == "ratio"]
    metrics = _loss_metrics(table, selection)
    heading = _sweep_heading(table, "loss of the ratio rule against float vs threshold")
    if selected is not None and selected["rule"] != "ratio" and not points.empty:
        heading += f"\n(the selected point {selection['point']} is not a ratio-rule point: see the fronts)"
    fig, body, axes = _titled_panels(len(metrics), heading, selection)
    for ax, metric in zip(axes, metrics):
        ax.set_title(LOSS_LABELS[metric], fontsize=10)
        if points.empty:
            ax.text(0.5, 0.5, f"no ratio-rule point in {Path(sweep_csv).name}\n(the sweep has no thresholds)",
                    ha="center", va="center", transform=ax.transAxes, fontsize=10)
            ax.set_axis_off()
            continue
        positions, sentinel = _threshold_positions(points["threshold"])
        drawn, note = [], ""
        for index, ((rule, statistic), group) in enumerate(_series(points)):
            values, low, high = _losses(group, float_row, metric)
            _draw_series(ax, [positions[t] for t in group["threshold"]], values, low, high,
                         _series_style(rule, statistic, index), band=True)
            drawn.extend(values)
            note += _undrawn_note(group, values)
        _style_threshold_axis(ax, positions, sentinel, _sentinel_label(points, sentinel))
        _style_loss_axis(ax, metric, drawn)
        _draw_float_and_budget(ax, metric, selection)
        if selected is not None and selected["rule"] == "ratio":
            value = _losses(selected.to_frame().T, float_row, metric)[0][0]
            _mark_selected(ax, positions[float(selected["threshold"])], value, selection)
        ax.set_title(LOSS_LABELS[metric] + note, fontsize=10)
    if not points.empty:
        _shared_legend(body, axes)
    _save(fig, out_png)


# ----------------------------------------------------------------------------- sweep vs shadow cost

def _absolute_bound(metric: str, float_value: float, budget: float) -> float:
    """The budget as a bound on the metric itself (the loss of selection.loss solved for the metric)."""
    return {"perplexity": float_value * (1.0 + budget), "kl": budget, "agreement": 1.0 - budget,
            "accuracy": float_value - budget}[metric]


def plot_sweep_vs_shadow(sweep_csv: str | Path, selection_json: str | Path | None, out_png: str | Path) -> None:
    """Perplexity and accuracy themselves (with 95 % error bars) vs the shadow cost, one series per rule/statistic."""
    import numpy as np
    from matplotlib.ticker import PercentFormatter

    table, selection, selected, float_row = _sweep_inputs(sweep_csv, selection_json)
    points = table[table["rule"] != "float"]
    cost, cost_label = table_runtime(points).cost_column(points)
    metrics = [m for m in ("perplexity", "accuracy", selection["metric"] if selection else None)
               if m and m in table.columns and points[m].notna().any()]
    metrics = list(dict.fromkeys(metrics))
    fig, body, axes = _titled_panels(len(metrics), _sweep_heading(table, "metrics vs shadow cost, every point"),
                                     selection)
    for ax, metric in zip(axes, metrics):
        drawn, note = [], ""
        for index, ((rule, statistic), group) in enumerate(_series(points)):
            low, high = (group[f"{metric}_ci_{end}"] if f"{metric}_ci_{end}" in group.columns
                         else np.full(len(group), np.nan) for end in ("low", "high"))
            _draw_series(ax, group[cost], group[metric], low, high, _series_style(rule, statistic, index), band=False)
            drawn.extend(group[metric].dropna())
            note += _undrawn_note(group, group[metric].to_numpy(dtype=float))
        float_value = _optional_number(float_row.get(metric))
        if metric in ("agreement", "kl") and not math.isfinite(float_value):
            float_value = {"agreement": 1.0, "kl": 0.0}[metric]
        title = METRIC_LABELS[metric]
        if math.isfinite(float_value):
            ax.axhline(float_value, color="0.3", linestyle="--", linewidth=1.2, label="float")
            f_low, f_high = (_optional_number(float_row.get(f"{metric}_ci_{end}")) for end in ("low", "high"))
            if math.isfinite(f_low) and math.isfinite(f_high):
                ax.axhspan(f_low, f_high, color="0.5", alpha=0.15, linewidth=0, label="float 95 % CI")
            title += f" (float: {float_value:.2%})" if metric in ("accuracy", "agreement") \
                else f" (float: {float_value:.4g})"
        positive = [v for v in drawn if v > 0]
        if metric == "perplexity" and positive and max(positive) / min(positive) > 10:
            _plain_log_axis(ax)
        if metric in ("accuracy", "agreement"):
            ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        ax.set_ylabel(METRIC_LABELS[metric])
        ax.grid(True, which="major", alpha=0.3)
        if selection is not None and selection["metric"] == metric and math.isfinite(float_value):
            bound = _absolute_bound(metric, float_value, float(selection["budget"]))
            ax.axhline(bound, color="tab:green", linewidth=1.3,
                       label=f"budget bound: {LOSS_DESCRIPTION[metric]} ≤ "
                             f"{format_loss(metric, float(selection['budget']))}")
        if cost == "cpu_share":
            ax.set_xscale("symlog", linthresh=1e-4, linscale=0.5)
            ax.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=None))
            ax.set_xlim(-2e-5, 1.3 * max(1e-4, float(points[cost].max())))
            ax.set_xlabel(cost_label + " (log above 0.01 %)")
        elif cost == "shadow_flop_fraction":
            ax.set_xscale("symlog", linthresh=0.01, linscale=0.5)
            ax.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=None))
            ax.set_xlim(-0.002, 1.3 * max(0.01, float(points[cost].max())))
            ax.set_xlabel(cost_label + " (log above 1 %)")
        else:
            _symlog_count_axis(ax, points[cost], cost_label)
        if selected is not None:
            _mark_selected(ax, float(selected[cost]), _optional_number(selected.get(metric)), selection)
        ax.set_title(title + note, fontsize=10)
    _shared_legend(body, axes)
    _save(fig, out_png)


# ----------------------------------------------------------------------------- Pareto fronts

def plot_fronts(sweep_csv: str | Path, selection_json: str | Path | None, out_png: str | Path) -> None:
    """Loss against float vs shadow sides: the ratio rule's front beside the sensitivity rule's, 95 % error bars."""
    table, selection, selected, float_row = _sweep_inputs(sweep_csv, selection_json)
    points = table[table["rule"] != "float"]
    metrics = _loss_metrics(table, selection)
    layers = table_runtime(points).shadow_unit == "layers"
    count, unit = ("num_shadow_layers", "shadow layers") if layers else ("num_shadow_sides", "shadow sides")
    axis_label = ("shadow layers (down_proj with the CPU shadow op; log above 1)" if layers
                  else "shadow sides (Linear inputs/outputs kept in float on the CPU; log above 1)")
    heading = _sweep_heading(table, f"Pareto fronts, loss against float vs {unit} (lower left is better)")
    fig, body, axes = _titled_panels(len(metrics), heading, selection, height=5.2)
    for ax, metric in zip(axes, metrics):
        drawn, note = [], ""
        for index, ((rule, statistic), group) in enumerate(_series(points)):
            values, low, high = _losses(group, float_row, metric)
            _draw_series(ax, group[count], values, low, high, _series_style(rule, statistic, index), band=False)
            drawn.extend(values)
            note += _undrawn_note(group, values)
        _symlog_count_axis(ax, points[count], axis_label)
        _style_loss_axis(ax, metric, drawn)
        _draw_float_and_budget(ax, metric, selection)
        if selected is not None:
            value = _losses(selected.to_frame().T, float_row, metric)[0][0]
            _mark_selected(ax, float(selected[count]), value, selection)
        ax.set_title(f"{LOSS_LABELS[metric]} vs {unit}{note}", fontsize=10)
    _shared_legend(body, axes)
    _save(fig, out_png)


# ----------------------------------------------------------------------------- where the loss comes from

def _side_labels(table) -> list[str]:
    several = "statistic" in table.columns and table["statistic"].nunique() > 1
    return [f"{_short_layer_name(layer)} {side}" + (f" ({stat})" if several else "")
            for layer, side, stat in zip(table["layer"], table["side"],
                                         table["statistic"] if "statistic" in table.columns else table["side"])]


def plot_sensitivity(sensitivity_csv: str | Path, out_png: str | Path, top: int = 25) -> None:
    """The `top` sides whose clipping costs the most KL (bars, cost annotated), and ΔKL summed per layer depth."""
    import numpy as np

    if top < 1:
        raise PipelineError(f"plot_sensitivity: top must be at least 1, got {top}")
    table = load_sensitivity(sensitivity_csv)
    worst = table.sort_values("delta_kl", ascending=False, kind="stable").head(top)
    fig = _new_figure(14.0, max(5.5, 0.3 * len(worst) + 2.2))
    bars_ax, depth_ax = fig.subplots(1, 2, width_ratios=[2.1, 1.0])
    y = np.arange(len(worst))[::-1]  # the worst side on top
    bars_ax.barh(y, worst["delta_kl"], color=[SIDE_COLOURS[s] for s in worst["side"]], height=0.72)
    bars_ax.set_yticks(y, _side_labels(worst), fontsize=8)
    span = max(float(worst["delta_kl"].max()), 0.0) - min(float(worst["delta_kl"].min()), 0.0) or 1.0
    for position, row in zip(y, worst.to_dict("records")):
        text = f"{row['delta_kl']:.3g}{'' if row.get('measured', True) else ' (proxy)'}  ·  cost {row['cost']:,.0f}/token"
        if "rank" in row and math.isfinite(_optional_number(row["rank"])):
            text += f"  ·  rank {int(row['rank'])}"
        bars_ax.text(max(row["delta_kl"], 0.0) + 0.01 * span, position, text, va="center", fontsize=7.5)
    bars_ax.set_xlim(min(float(worst["delta_kl"].min()), 0.0) * 1.1, max(float(worst["delta_kl"].max()), 0.0)
                     + 0.6 * span)
    bars_ax.axvline(0.0, color="0.3", linewidth=0.8)
    bars_ax.set_ylim(-0.7, len(worst) - 0.3)
    layer_ranking = bool((table["side"] == "layer").all())
    if layer_ranking:  # an NPU runtime profile ranks whole shadow layers
        bars_ax.set_xlabel("ΔKL (nats/token) saved when this layer alone is a shadow layer (its down_proj shadow "
                           "op), every other layer clamped (measured)")
        bars_ax.set_title(f"the {len(worst)} most valuable of {len(table)} shadow layers (cost: measured CPU share; "
                          "rank: order of the layer front)", fontsize=10)
    else:
        bars_ax.set_xlabel("ΔKL (nats/token) when this side alone is clipped, every other side shadowed "
                           "(measured; '(proxy)': the Fisher estimate)")
        bars_ax.set_title(f"the {len(worst)} most sensitive of {len(table)} sides (cost: shadow elements per token; "
                          "rank: order of the greedy selection)", fontsize=10)
    bars_ax.grid(True, axis="x", alpha=0.3)
    for side in ("layer",) if layer_ranking else SIDES:
        bars_ax.barh([np.nan], [np.nan], color=SIDE_COLOURS[side], label=f"{side} side" if side != "layer"
                     else "shadow layer")
    bars_ax.legend(loc="lower right", fontsize=9)
    _draw_depth_panel(depth_ax, table)
    statistics = sorted(set(table["statistic"])) if "statistic" in table.columns else []
    fig.suptitle(("Sensitivity per shadow layer" if layer_ranking else "Sensitivity per Linear side")
                 + (f" ({', '.join(statistics)} statistic)" if statistics else "")
                 + (": which layers need a shadow op" if layer_ranking else ": which sides need a shadow"),
                 fontsize=10)
    _save(fig, out_png)


def _draw_depth_panel(ax, table) -> None:
    """ΔKL summed over each decoder layer's sides, stacked input / output."""
    import numpy as np

    depths = [layer_depth(name) for name in table["layer"]]
    known = sorted({d for d in depths if d is not None})
    bottom = np.zeros(len(known))
    for side in SIDES + ("layer",):
        if not (table["side"] == side).any():
            continue
        sums = np.array([table.loc[[d == depth and s == side for d, s in zip(depths, table["side"])],
                                   "delta_kl"].sum() for depth in known])
        ax.bar(known, sums, bottom=bottom, color=SIDE_COLOURS[side], width=0.8, label=side)
        bottom += sums
    outside = sum(d is None for d in depths)
    ax.set_title("ΔKL summed per decoder layer" + (f"\n({outside} side(s) outside the blocks not shown)"
                                                   if outside else ""), fontsize=10)
    ax.set_xlabel("layer depth (block index)")
    ax.set_ylabel("sum of ΔKL (nats/token)")
    ax.axhline(0.0, color="0.3", linewidth=0.8)
    ax.grid(True, axis="y", alpha=0.3)
    if known:
        step = max(1, math.ceil(len(known) / 12))
        ax.set_xticks(known[::step])


def plot_breakdown(breakdown_json: str | Path, out_png: str | Path) -> None:
    """Perplexity increase and KL when only weights, only inputs, only outputs, or all three are quantized."""
    from matplotlib.ticker import PercentFormatter

    data = load_breakdown(breakdown_json)
    parts = data["parts"]
    fig = _new_figure(12.0, 5.0)
    axes = fig.subplots(1, 2)
    for ax, (metric, key) in zip(axes, (("perplexity", "perplexity_increase"), ("kl", "kl"))):
        values = [_optional_number(parts[p][key]) for p in BREAKDOWN_PARTS]
        lows = [_optional_number(parts[p].get(f"{key}_ci_low")) for p in BREAKDOWN_PARTS]
        highs = [_optional_number(parts[p].get(f"{key}_ci_high")) for p in BREAKDOWN_PARTS]
        x = list(range(len(BREAKDOWN_PARTS)))
        ax.bar(x, values, color=[BREAKDOWN_COLOURS[p] for p in BREAKDOWN_PARTS], width=0.65)
        tops = []
        for position, value, low, high in zip(x, values, lows, highs):
            if math.isfinite(low) and math.isfinite(high):
                ax.errorbar([position], [value], yerr=[[max(value - low, 0.0)], [max(high - value, 0.0)]],
                            fmt="none", ecolor="black", elinewidth=1.2, capsize=6)
            tops.append(max(value, high) if math.isfinite(high) else value)
        span = max(max(tops), 0.0) - min(min(values), 0.0) or 1.0
        for position, value, top_value in zip(x, values, tops):
            ax.text(position, max(top_value, 0.0) + 0.02 * span, format_loss(metric, value), ha="center",
                    va="bottom", fontsize=9)
        ax.set_ylim(min(min(values), 0.0) - 0.03 * span, max(max(tops), 0.0) + 0.15 * span)
        ax.set_xticks(x, [BREAKDOWN_LABELS[p] for p in BREAKDOWN_PARTS], fontsize=9)
        ax.axhline(0.0, color="0.3", linewidth=0.8)
        ax.set_ylabel(LOSS_LABELS[metric])
        if metric == "perplexity":
            ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=None))
        ax.grid(True, axis="y", alpha=0.3)
        ax.set_title(LOSS_LABELS[metric], fontsize=10)
    title = "Where the loss comes from: one part quantized at a time, the rest float"
    details = [f"{data['statistic']} statistic" if "statistic" in data else None,
               f"{data['num_tokens']} tokens" if "num_tokens" in data else None]
    float_perplexity = _optional_number(parts.get("float", {}).get("perplexity"))
    if math.isfinite(float_perplexity):
        details.append(f"float perplexity {float_perplexity:.4g}")
    details.append("whiskers: 95 % bootstrap CI")
    fig.suptitle(f"{title}\n({', '.join(d for d in details if d)})", fontsize=10)
    _save(fig, out_png)


# ----------------------------------------------------------------------------- outlier ratios

def layer_depth(name: str) -> int | None:
    """Block index of a layer name (`...layers.12...`, `transformer.h.5...`); None for lm_head and others."""
    match = DEPTH_PATTERN.search(name)
    return int(match.group(1)) if match else None


def layer_kind(name: str) -> str:
    """The Linear's own name: the last component (q_proj, fc1, w1, dense_4h_to_h, lm_head, ...)."""
    return name.rsplit(".", 1)[-1]


def _ratio(maximum, top) -> float | None:
    """maximum / top, or None when it is undefined on a log axis (top ≤ 0, non-numeric, non-finite)."""
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (maximum, top)):
        return None
    if top <= 0 or maximum <= 0:
        return None
    ratio = maximum / top
    return ratio if math.isfinite(ratio) else None


def _check_act_scales(data: dict, path) -> list[str]:
    for key in STAT_KEYS["signed"]:
        if not isinstance(data.get(key), dict) or not data[key]:
            raise PipelineError(f"{path}: missing or empty key '{key}' (expected the act_scales format "
                                "of docs/method.md section 1)")
    layers = list(data["ori"])
    for key in (k for keys in STAT_KEYS.values() for k in keys if k in data):
        for name in layers:
            entry = data[key].get(name)
            if not isinstance(entry, dict) or any(side not in entry for side in SIDES):
                raise PipelineError(f"{path}: '{key}' has no input/output entry for layer '{name}'")
    return layers


def plot_outlier_ratios(act_scales_json: str | Path, out_png: str | Path, threshold: float | None = None) -> None:
    """Per-layer outlier ratio (max / 99.9 % statistic) across depth: columns input/output, rows signed/absmax.

    With `threshold`, a line at t: sides above it are shadow sides at that threshold.
    """
    path = Path(act_scales_json)
    data = _read_json(path, "activation scales")
    layers = _check_act_scales(data, path)
    statistics = [s for s, (a, b) in STAT_KEYS.items() if a in data and b in data]
    depths = {name: layer_depth(name) for name in layers}
    known = [d for d in depths.values() if d is not None]
    # lm_head (and anything outside the blocks) goes one step after the last block.
    head_depth = (max(known) + 1) if known else 0
    kinds = list(dict.fromkeys(layer_kind(name) for name in layers))
    palette = _kind_palette(len(kinds))
    # Spread kinds side by side within a depth so they do not hide each other.
    block_kinds = list(dict.fromkeys(layer_kind(name) for name in layers if depths[name] is not None))
    offsets = {k: (i - (len(block_kinds) - 1) / 2) * (0.8 / len(block_kinds)) for i, k in enumerate(block_kinds)}

    fig = _new_figure(13.0, 3.9 * len(statistics) + 1.2)
    axes = fig.subplots(len(statistics), 2, squeeze=False, sharex=True)
    for row, statistic in enumerate(statistics):
        max_key, top_key = STAT_KEYS[statistic]
        for col, side in enumerate(SIDES):
            ax = axes[row][col]
            skipped = 0
            for kind_index, kind in enumerate(kinds):
                xs, ys = [], []
                for name in layers:
                    if layer_kind(name) != kind:
                        continue
                    ratio = _ratio(data[max_key][name][side], data[top_key][name][side])
                    if ratio is None:
                        skipped += 1
                        continue
                    # Layers outside the blocks (lm_head) sit alone at their position: no spread.
                    xs.append(head_depth if depths[name] is None else depths[name] + offsets[kind])
                    ys.append(ratio)
                colour, marker = palette[kind_index]
                ax.scatter(xs, ys, color=colour, marker=marker, s=22, alpha=0.85, linewidth=0.3,
                           edgecolor="black", label=kind)
            _style_ratio_axis(ax)
            title = [f"{statistic}: {max_key} / {top_key}, {side}"]
            if threshold is not None:
                title += _draw_threshold(ax, threshold)
            if skipped:
                # A non-positive quantile never satisfies top * t > max: such a side is shadow at every t.
                title.append(f"not drawn: {skipped} side(s) with {top_key} ≤ 0 (shadow at every t)")
            ax.set_title("\n".join(title), fontsize=10)
            if col == 0:
                ax.set_ylabel("max / 99.9 % quantile")
        for ax in axes[row]:
            _style_depth_axis(ax, head_depth, has_head=any(d is None for d in depths.values()))
    for ax in axes[-1]:
        ax.set_xlabel("layer depth (block index)")
    meta = data.get("meta", {})
    title = "Outlier ratio per Linear (high ratio: a few extreme activations; shadow candidates)"
    if isinstance(meta, dict) and meta.get("num_tokens"):
        title += f" — {meta.get('num_samples', '?')} samples, {meta['num_tokens']} tokens"
    fig.suptitle(title, fontsize=10)
    _shared_legend(fig, axes.ravel())
    _save(fig, out_png)


def _draw_threshold(ax, threshold: float) -> list[str]:
    """Line at t (ratios at or above it are shadow sides); far above the data, a title note instead."""
    top = max((y for c in ax.collections for _, y in c.get_offsets()), default=None)
    if top is not None and threshold > 10 * top:
        return [f"t={threshold:g} is above every ratio: no shadow side"]
    ax.axhline(threshold, color="tab:red", linestyle="--", linewidth=1.0,
               label=f"threshold t={threshold:g} (at or above: shadow)")
    return []


def _plain_log_axis(ax) -> None:
    """A log y axis labelled with plain numbers (20, 30, 100) rather than 2×10^1."""
    from matplotlib.ticker import LogFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(LogFormatter())
    ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.5)))


def _style_ratio_axis(ax) -> None:
    _plain_log_axis(ax)
    ax.grid(True, which="major", alpha=0.3)


def _kind_palette(count: int) -> list[tuple[str, str]]:
    from matplotlib import colormaps

    colours = colormaps["tab10" if count <= 10 else "tab20"].colors
    return [(colours[i % len(colours)], KIND_MARKERS[i % len(KIND_MARKERS)]) for i in range(count)]


def _style_depth_axis(ax, head_depth: int, has_head: bool) -> None:
    from matplotlib.ticker import FixedLocator

    last_block = head_depth - 1 if has_head else head_depth
    step = max(1, math.ceil((last_block + 1) / 12))
    ticks = list(range(0, last_block + 1, step))
    labels = [str(t) for t in ticks]
    if has_head:
        ticks.append(head_depth)
        labels.append("head")
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.set_xticklabels(labels)
    ax.set_xlim(-0.7, (head_depth if has_head else last_block) + 0.7)


# ----------------------------------------------------------------------------- tables
def write_table_html(csv_path: str | Path, out_html: str | Path, title: str, float_digits: int = 6,
                     sort_by: str | None = None) -> None:
    """A CSV as a standalone HTML table: the Snakemake report shows HTML inline but offers CSV only as a download.

    `sort_by` orders the rows by that column (ascending, empty last) when the table has it."""
    import html

    path = Path(csv_path)
    table = _read_csv(path, "table")
    if sort_by is not None and sort_by in table.columns:
        table = table.sort_values(sort_by, kind="stable", na_position="last")

    def number(value: float) -> str:
        # Counts and thresholds read as written in the config (10000000, not 1e+07).
        if value.is_integer() and abs(value) < 1e15:
            return f"{value:.0f}"
        return f"{value:.{float_digits}g}"

    body = table.to_html(index=False, na_rep="", float_format=number, border=0, classes="data")
    style = ("body{font-family:sans-serif;font-size:13px;margin:1em}"
             "table.data{border-collapse:collapse}"
             "table.data th,table.data td{padding:2px 8px;border-bottom:1px solid #ddd;text-align:right}"
             "table.data th{position:sticky;top:0;background:#f4f4f4}"
             "table.data tr:hover{background:#fafad2}")
    write_text(out_html, f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
                         f"<style>{style}</style></head><body><h3>{html.escape(title)}</h3>\n"
                         f"<p>{len(table)} rows, from {html.escape(path.name)}</p>\n{body}\n</body></html>\n")
