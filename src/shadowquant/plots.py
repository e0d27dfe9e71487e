"""Report figures (PNG): the threshold sweep and the per-layer outlier ratios; plus an HTML view of a CSV table.

Figures are built on `matplotlib.figure.Figure` directly (Agg canvas, no pyplot): no display is
needed and no global figure state leaks between calls.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from shadowquant.atomic import atomic_path, write_text
from shadowquant.errors import PipelineError
from shadowquant.decision import SIDES, STAT_KEYS
from shadowquant.selection import HIGHER_IS_BETTER, budget_bound

METRIC_LABELS = {
    "accuracy": "last-token accuracy",
    "perplexity": "perplexity",
    "agreement": "top-1 agreement with float",
    "kl": "mean KL(float || W8A8)",
}
SWEEP_REQUIRED = ("statistic", "threshold", "accuracy", "perplexity")
STATISTIC_STYLE = {"signed": ("tab:blue", "o"), "absmax": ("tab:orange", "s")}
FALLBACK_COLOURS = ("tab:green", "tab:purple", "tab:brown", "tab:pink")
KIND_MARKERS = ("o", "s", "^", "v", "D", "P", "X", "<", ">", "h", "*", "p")
# A largest threshold this far above the next one is the "no shadow" sentinel (10000000 by default):
# it is drawn PULL_IN times the next one, behind an axis break, so the real thresholds keep the width.
SENTINEL_GAP = 100.0
PULL_IN = 3.0
DEPTH_PATTERN = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)(?:\.|$)")
DPI = 120


# ----------------------------------------------------------------------------- inputs

def _read_csv(path: Path, what: str):
    import pandas as pd

    try:
        return pd.read_csv(path)
    except FileNotFoundError:
        raise PipelineError(f"{path}: {what} not found") from None
    except pd.errors.EmptyDataError:
        raise PipelineError(f"{path}: {what} is empty") from None


def _read_json(path: str | Path, what: str) -> dict:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PipelineError(f"{path}: {what} file not found") from None
    except json.JSONDecodeError as exc:
        raise PipelineError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, dict):
        raise PipelineError(f"{path}: expected a JSON object ({what})")
    return data


def load_sweep(path: str | Path):
    """The sweep table with numeric columns coerced; non-finite metric values become NaN (not drawn)."""
    import numpy as np
    import pandas as pd

    path = Path(path)
    table = _read_csv(path, "sweep table")
    missing = [c for c in SWEEP_REQUIRED if c not in table.columns]
    if missing:
        raise PipelineError(f"{path}: missing column(s) {', '.join(missing)}; expected at least "
                            f"{', '.join(SWEEP_REQUIRED)}")
    table["statistic"] = table["statistic"].astype(str)
    for column in table.columns.drop("statistic"):
        table[column] = pd.to_numeric(table[column], errors="coerce")
    table = table.replace([np.inf, -np.inf], np.nan)
    points = table[table["statistic"] != "float"]
    if points.empty:
        raise PipelineError(f"{path}: no sweep point (only float rows); nothing to plot")
    bad = points[~(points["threshold"] > 0)]
    if not bad.empty:
        raise PipelineError(f"{path}: threshold must be a positive number, got "
                            f"{bad['threshold'].iloc[0]!r} for statistic {bad['statistic'].iloc[0]}")
    return table


def load_selection(path: str | Path) -> dict:
    """selection.json, checked for the keys the figures use."""
    data = _read_json(path, "selection")
    for key in ("statistic", "threshold", "metric", "max_drop", "float_value"):
        if key not in data:
            raise PipelineError(f"{path}: missing key '{key}' (expected the selection written by the sweep)")
    for key in ("threshold", "max_drop", "float_value"):
        if isinstance(data[key], bool) or not isinstance(data[key], (int, float)):
            raise PipelineError(f"{path}: '{key}' must be a number, got {data[key]!r}")
    if data["metric"] not in HIGHER_IS_BETTER:
        raise PipelineError(f"{path}: unknown metric '{data['metric']}'; valid: {', '.join(HIGHER_IS_BETTER)}")
    return data


def _float_row(table):
    floats = table[table["statistic"] == "float"]
    return None if floats.empty else floats.iloc[0]


def _float_value(float_row, metric: str) -> float | None:
    """The float model's value; agreement and KL of float with itself are 1 and 0 when the row leaves them empty."""
    if float_row is None or metric not in float_row.index:
        return None
    value = float(float_row[metric])
    if math.isnan(value):
        return {"agreement": 1.0, "kl": 0.0}.get(metric)
    return value


def _selected_row(table, selection: dict, sweep_path, selection_path):
    match = table[(table["statistic"] == selection["statistic"])
                  & ((table["threshold"] - float(selection["threshold"])).abs()
                     <= 1e-9 * float(selection["threshold"]))]
    if match.empty:
        raise PipelineError(f"{selection_path}: selected statistic {selection['statistic']} threshold "
                            f"{float(selection['threshold']):g} is not a row of {sweep_path}")
    return match.iloc[0]


def _statistic_style(statistic: str, index: int) -> tuple[str, str]:
    return STATISTIC_STYLE.get(statistic, (FALLBACK_COLOURS[index % len(FALLBACK_COLOURS)], "D"))


# ----------------------------------------------------------------------------- shared drawing

def _new_figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _save(fig, out_png: str | Path) -> None:
    with atomic_path(out_png, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)


def _panel_metrics(table, selection: dict | None) -> list[str]:
    """Accuracy and perplexity; plus the selection metric when it is another one with data."""
    metrics = ["accuracy", "perplexity"]
    if selection is not None and selection["metric"] not in metrics and selection["metric"] in table.columns:
        if table.loc[table["statistic"] != "float", selection["metric"]].notna().any():
            metrics.append(selection["metric"])
    return metrics


def _style_metric_axis(ax, metric: str, values) -> None:
    from matplotlib.ticker import PercentFormatter

    ax.set_ylabel(METRIC_LABELS.get(metric, metric))
    if metric in ("accuracy", "agreement"):
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    finite = [v for v in values if v > 0 and math.isfinite(v)]
    # Broken quantization can send perplexity up by orders of magnitude; a log axis keeps both readable.
    if metric in ("perplexity", "kl") and finite and max(finite) / min(finite) > 10:
        ax.set_yscale("log")
    ax.grid(True, which="major", alpha=0.3)


def _draw_baseline_and_budget(ax, metric: str, float_value: float | None, selection: dict | None) -> None:
    """Float baseline (dashed) and, on the selection metric's panel, the accepted band (shaded)."""
    # KL is measured against float, so float's own value (0) is no baseline to draw.
    if metric != "kl" and float_value is not None and math.isfinite(float_value):
        ax.axhline(float_value, color="0.3", linestyle="--", linewidth=1.2, label="float baseline")
    if selection is None or selection["metric"] != metric:
        return
    max_drop = float(selection["max_drop"])
    reference = float(selection["float_value"])
    low, high = ax.get_ylim()
    bound = budget_bound(metric, reference, max_drop)
    if HIGHER_IS_BETTER[metric]:
        low = min(low, bound - 0.05 * (high - low))
        ax.axhspan(bound, high, color="tab:green", alpha=0.12, label=f"accepted: ≥ float − {max_drop:g}")
    else:
        high = max(high, bound * 1.05 if ax.get_yscale() == "log" else bound + 0.05 * (high - low))
        ax.axhspan(low, bound, color="tab:green", alpha=0.12, label=f"accepted: ≤ {bound:.4g}")
    ax.axhline(bound, color="tab:green", linewidth=0.8)
    ax.set_ylim(low, high)


def _mark_selected(ax, x: float, y: float, text: str) -> None:
    """Star on the selected point; its note goes in the corner of the panel with the fewest points."""
    if not (math.isfinite(x) and math.isfinite(y)):
        return
    ax.scatter([x], [y], marker="*", s=320, color="gold", edgecolor="black", linewidth=0.8, zorder=6,
               label="selected")
    to_axes = ax.transData + ax.transAxes.inverted()
    drawn = [tuple(p) for line in ax.get_lines() if line.get_transform() == ax.transData
             for p in to_axes.transform(line.get_xydata())
             if math.isfinite(p[0]) and math.isfinite(p[1]) and 0 <= p[0] <= 1 and 0 <= p[1] <= 1]
    star = tuple(to_axes.transform((x, y)))

    def crowding(corner: tuple[float, float]) -> tuple[int, float]:
        near = sum(abs(px - corner[0]) < 0.38 and abs(py - corner[1]) < 0.3 for px, py in drawn)
        return near, math.dist(corner, star)

    cx, cy = min(((0.03, 0.97), (0.97, 0.97), (0.03, 0.03), (0.97, 0.03)), key=crowding)
    ax.annotate(text, (x, y), xytext=(cx, cy), textcoords="axes fraction", fontsize=8,
                ha="left" if cx < 0.5 else "right", va="bottom" if cy < 0.5 else "top", zorder=7,
                bbox={"boxstyle": "round,pad=0.3", "fc": "lightyellow", "ec": "0.5", "alpha": 0.95},
                arrowprops={"arrowstyle": "->", "color": "0.3", "shrinkB": 8})


def _panel_title(metric: str, versus: str, float_value: float | None, table) -> str:
    """Panel title with the float value; a second line names the points without a finite value."""
    title = f"{METRIC_LABELS.get(metric, metric)} vs {versus}"
    if metric != "kl" and float_value is not None and math.isfinite(float_value):
        title += f" (float: {float_value:.2%})" if metric in ("accuracy", "agreement") \
            else f" (float: {float_value:.4g})"
    missing = table[(table["statistic"] != "float") & table[metric].isna()]
    if not missing.empty:
        title += "\nnot finite, not drawn: " + ", ".join(
            f"{s} t={t:g}" for s, t in zip(missing["statistic"], missing["threshold"]))
    return title


def _selection_text(selection: dict, row) -> str:
    text = f"selected: {selection['statistic']}, t={float(selection['threshold']):g}"
    if "num_shadow_sides" in row.index and not math.isnan(row["num_shadow_sides"]):
        text += f"\n{int(row['num_shadow_sides'])} shadow sides"
    return text


def _shared_legend(fig, axes) -> None:
    """One legend for the figure: entries of all panels, each label once."""
    handles, labels = [], []
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 4), fontsize=9)


# ----------------------------------------------------------------------------- sweep vs threshold

def _threshold_positions(thresholds) -> tuple[dict[float, float], float | None]:
    """x position of each threshold; a far 'no shadow' sentinel is pulled in next to the others."""
    values = sorted(set(float(t) for t in thresholds))
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


def plot_sweep_vs_threshold(sweep_csv: str | Path, selection_json: str | Path | None, out_png: str | Path) -> None:
    """Accuracy and perplexity vs threshold (log x), one line per statistic, float baseline and selection."""
    table = load_sweep(sweep_csv)
    selection = load_selection(selection_json) if selection_json is not None else None
    float_row = _float_row(table)
    points = table[table["statistic"] != "float"]
    positions, sentinel = _threshold_positions(points["threshold"])
    sentinel_label = ""
    if sentinel is not None:
        sentinel_label = f"{sentinel:g}"
        sides = points.loc[points["threshold"] == sentinel, "num_shadow_sides"] \
            if "num_shadow_sides" in points.columns else []
        if len(sides) and (sides == 0).all():
            sentinel_label += "\n(no shadow)"
    metrics, fig, axes, selected = _sweep_panels(table, selection, sweep_csv, selection_json)
    for ax, metric in zip(axes, metrics):
        for index, (statistic, group) in enumerate(points.groupby("statistic", sort=True)):
            group = group.sort_values("threshold")
            colour, marker = _statistic_style(statistic, index)
            ax.plot([positions[t] for t in group["threshold"]], group[metric], color=colour, marker=marker,
                    markersize=5, linewidth=1.5, label=statistic)
        _style_threshold_axis(ax, positions, sentinel, sentinel_label)
        _style_metric_axis(ax, metric, points[metric].dropna())
        _draw_baseline_and_budget(ax, metric, _float_value(float_row, metric), selection)
        if selected is not None:
            _mark_selected(ax, positions[float(selected["threshold"])], float(selected[metric]),
                           _selection_text(selection, selected))
        ax.set_title(_panel_title(metric, "threshold", _float_value(float_row, metric), table), fontsize=10)
    fig.suptitle(_suptitle(table), fontsize=10)
    _shared_legend(fig, axes)
    _save(fig, out_png)


def _sweep_panels(table, selection, sweep_csv, selection_json):
    """One panel per metric in a row, and the selected sweep row (None without a selection)."""
    metrics = _panel_metrics(table, selection)
    fig = _new_figure(6.2 * len(metrics), 4.8)
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    selected = _selected_row(table, selection, sweep_csv, selection_json) if selection is not None else None
    return metrics, fig, axes, selected


def _suptitle(table) -> str:
    text = "Simulated W8A8 sweep"
    for column, unit in (("num_samples", "samples"), ("num_tokens", "tokens")):
        if column in table.columns and table[column].notna().any():
            text += f", {int(table[column].dropna().iloc[0])} {unit}"
    return text


# ----------------------------------------------------------------------------- sweep vs shadow cost

def plot_sweep_vs_shadow(sweep_csv: str | Path, selection_json: str | Path | None, out_png: str | Path) -> None:
    """Accuracy and perplexity vs number of shadow sides (the on-device cost), per statistic."""
    table = load_sweep(sweep_csv)
    if "num_shadow_sides" not in table.columns:
        raise PipelineError(f"{sweep_csv}: missing column num_shadow_sides")
    selection = load_selection(selection_json) if selection_json is not None else None
    float_row = _float_row(table)
    points = table[(table["statistic"] != "float") & table["num_shadow_sides"].notna()]
    if points.empty:
        raise PipelineError(f"{sweep_csv}: no sweep point has num_shadow_sides")
    metrics, fig, axes, selected = _sweep_panels(table, selection, sweep_csv, selection_json)
    for ax, metric in zip(axes, metrics):
        for index, (statistic, group) in enumerate(points.groupby("statistic", sort=True)):
            group = group.sort_values(["num_shadow_sides", "threshold"])
            colour, marker = _statistic_style(statistic, index)
            ax.plot(group["num_shadow_sides"], group[metric], color=colour, marker=marker, markersize=5,
                    linewidth=1.5, label=statistic)
        _style_metric_axis(ax, metric, points[metric].dropna())
        ax.set_xlabel("shadow sides (Linear inputs/outputs with CPU shadow execution)")
        ax.set_xlim(left=min(-0.5, ax.get_xlim()[0]))
        _draw_baseline_and_budget(ax, metric, _float_value(float_row, metric), selection)
        if selected is not None:
            _mark_selected(ax, float(selected["num_shadow_sides"]), float(selected[metric]),
                           _selection_text(selection, selected))
        ax.set_title(_panel_title(metric, "shadow cost", _float_value(float_row, metric), table), fontsize=10)
    fig.suptitle(_suptitle(table) + " (each point one threshold)", fontsize=10)
    _shared_legend(fig, axes)
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
                                "of METHOD.md section 1)")
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


def _style_ratio_axis(ax) -> None:
    from matplotlib.ticker import LogFormatter

    ax.set_yscale("log")
    # Plain numbers (8, 10, 100) rather than 8×10^0 when the range is under a decade.
    ax.yaxis.set_major_formatter(LogFormatter())
    ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.5)))
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

def write_table_html(csv_path: str | Path, out_html: str | Path, title: str, float_digits: int = 6) -> None:
    """A CSV as a standalone HTML table: the Snakemake report shows HTML inline but offers CSV only as a download."""
    import html

    path = Path(csv_path)
    table = _read_csv(path, "table")

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
