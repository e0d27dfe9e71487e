"""The transform variants side by side (pandas only, no torch): float, weights only, W8A8 at the breakdown
point, selected.

One row per variant of `transform.variants`, from its sweep table and error breakdown:

- `float_perplexity`: the transformed float model (exact transforms keep it within float tolerance);
- `weights_only`: perplexity increase with int8 weights and float activations (breakdown part 'weights');
- `all_shadow`: the breakdown's W8A8 point (part 'all'): every side shadowed (t = 1) under the ideal profile,
  no shadow layer (absmax-l0) under an NPU profile; `all_point` names it;
- `selected`: the point the selection rule would choose within this variant, its shadow sides and loss;
- `exported`: whether the selection across variants chose this variant's point;
- `weight_range`: the int8 weight clip range the variant was swept with (`max` or `mse`).

Every increase comes with its 95 % bootstrap interval, paired with the variant's own float.
"""

from __future__ import annotations

import logging
import math

from shadowquant.atomic import write_text
from shadowquant.errors import PipelineError
from shadowquant.jsonfile import read_json_object
from shadowquant.evaluate.selection import choose, read_selection, stack_sweeps
from shadowquant.runtimes import runtime_of

log = logging.getLogger(__name__)

COLUMNS = ["transform", "runtime", "weight_range", "float_perplexity",
           "weights_only", "weights_only_ci_low", "weights_only_ci_high",
           "all_point", "all_shadow", "all_shadow_ci_low", "all_shadow_ci_high", "all_shadow_sides",
           "selected_point", "selected_sides", "selected", "selected_ci_low", "selected_ci_high",
           "selected_kl", "selected_agreement", "selected_budget_met", "selected_shadow_layers", "selected_cpu_share",
           "exported"]


def _part_increase(breakdown: dict, part: str, path) -> tuple[float | None, float | None, float | None]:
    parts = breakdown.get("parts")
    if not isinstance(parts, dict) or part not in parts:
        raise PipelineError(f"{path}: breakdown lacks part '{part}'; delete it and run the breakdown rule again")
    entry = parts[part]
    return tuple(entry.get(f"perplexity_increase{suffix}") for suffix in ("", "_ci_low", "_ci_high"))


def comparison_table(sweep_csvs, breakdown_jsons, variants, selection_json, metric: str, budget: float):
    """The table of the module docstring, as a pandas DataFrame in the order of `variants`."""
    import pandas as pd

    variants = list(variants)
    breakdown_jsons = list(breakdown_jsons)
    if len(breakdown_jsons) != len(variants):
        raise PipelineError(f"{len(breakdown_jsons)} breakdowns for {len(variants)} transform variants; "
                            "give one per variant")
    stacked = stack_sweeps(sweep_csvs, variants)
    exported = read_selection(selection_json)
    rows = []
    for variant, breakdown_path in zip(variants, breakdown_jsons):
        breakdown = read_json_object(breakdown_path, "breakdown", "delete it and run the breakdown rule again")
        table = stacked[stacked["transform"] == variant]
        float_rows = table[table["point"] == "float"]
        all_shadow_point = breakdown.get("point") or f"{breakdown.get('statistic')}-t1"
        all_shadow_rows = table[table["point"] == all_shadow_point]
        choice = choose(table, metric, budget)
        chosen = table[table["point"] == choice["point"]].iloc[0]
        weights = _part_increase(breakdown, "weights", breakdown_path)
        all_shadow = _part_increase(breakdown, "all", breakdown_path)
        rows.append({
            "transform": variant, "runtime": choice["runtime"],
            "weight_range": chosen.get("weight_range") if isinstance(chosen.get("weight_range"), str) else "max",
            "float_perplexity": float(float_rows.iloc[0]["perplexity"]) if not float_rows.empty else math.nan,
            "weights_only": weights[0], "weights_only_ci_low": weights[1], "weights_only_ci_high": weights[2],
            "all_point": all_shadow_point, "all_shadow": all_shadow[0], "all_shadow_ci_low": all_shadow[1], "all_shadow_ci_high": all_shadow[2],
            "all_shadow_sides": (int(all_shadow_rows.iloc[0]["num_shadow_sides"])
                                 if not all_shadow_rows.empty else None),
            "selected_point": choice["point"], "selected_sides": choice["num_shadow_sides"],
            "selected": chosen.get("perplexity_increase"),
            "selected_ci_low": chosen.get("perplexity_increase_ci_low"),
            "selected_ci_high": chosen.get("perplexity_increase_ci_high"),
            "selected_kl": chosen.get("kl"), "selected_agreement": chosen.get("agreement"),
            "selected_budget_met": choice["budget_met"],
            "selected_shadow_layers": (None if choice["shadow_layers"] is None
                                       else " ".join(str(i) for i in choice["shadow_layers"])),
            "selected_cpu_share": choice["cpu_share"],
            "exported": (exported.get("transform", "none") == variant and exported["point"] == choice["point"]),
        })
    return pd.DataFrame(rows, columns=COLUMNS)


def _percent(value, low=None, high=None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    text = f"{100 * float(value):+.1f} %"
    if low is not None and high is not None and not (math.isnan(float(low)) or math.isnan(float(high))):
        text += f" [{100 * float(low):+.1f}, {100 * float(high):+.1f}]"
    return text


def comparison_markdown(table, metric: str, budget: float) -> str:
    """The table as Markdown: perplexity increases over each variant's float with 95 % intervals."""
    lines = [
        "# Transform variants",
        "",
        "Perplexity increase over float on the held-out records, with 95 % bootstrap intervals. "
        f"'Selected' is the point the selection ({metric} loss within {budget:g}) takes within each variant; "
        "the exported model is marked. Runtime profile: "
        f"{', '.join(sorted(set(table['runtime']))) if len(table) else 'none'}.",
        "",
        "| transform | weight range | float ppl | weights only | W8A8 (breakdown point) | selected (shadow cost) | KL | "
        "top-1 agreement |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in table.to_dict("records"):
        mark = " **(exported)**" if row["exported"] else ""
        missed = "" if row["selected_budget_met"] else ", budget missed"
        all_sides = (f" ({row['all_point']}, {row['all_shadow_sides']} sides)" if row["all_shadow_sides"] is not None
                     else f" ({row['all_point']})")
        cost = f"{runtime_of(row).comparison_cost(row)}{missed}"
        lines.append(
            f"| {row['transform']}{mark} | {row['weight_range']} | {row['float_perplexity']:.3f} | "
            f"{_percent(row['weights_only'], row['weights_only_ci_low'], row['weights_only_ci_high'])} | "
            f"{_percent(row['all_shadow'], row['all_shadow_ci_low'], row['all_shadow_ci_high'])}{all_sides} | "
            f"{_percent(row['selected'], row['selected_ci_low'], row['selected_ci_high'])} "
            f"{row['selected_point']} ({cost}) | "
            f"{float(row['selected_kl']):.3f} | {float(row['selected_agreement']):.3f} |")
    return "\n".join(lines) + "\n"


def compare_transforms(sweep_csvs, breakdown_jsons, variants, selection_json, metric: str, budget: float,
                       out_csv, out_md, out_html) -> None:
    """transforms.csv, transforms.md and the report's HTML page of the comparison."""
    from shadowquant.report.plots import write_table_html

    table = comparison_table(sweep_csvs, breakdown_jsons, variants, selection_json, metric, budget)
    write_text(out_csv, table.to_csv(index=False))
    write_text(out_md, comparison_markdown(table, metric, budget))
    write_table_html(out_csv, out_html, "Transform variants: float, weights only, the breakdown point and selected")
    for row in table.to_dict("records"):
        log.info("%s: weights only %s, breakdown point %s, selected %s %s", row["transform"],
                 _percent(row["weights_only"]), _percent(row["all_shadow"]), row["selected_point"],
                 _percent(row["selected"]))
