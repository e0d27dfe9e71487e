# Thin adapter: rule plot_quality -> shadowquant.report.plots
from shadowquant.adapter import run_stage
from shadowquant.report.plots import (plot_breakdown, plot_fronts, plot_sensitivity, selection_for_variant,
                               write_table_html)


def quality_figures(sweep_csv, selection_json, variant, sensitivity_csv, breakdown_json, fronts, sensitivity,
                    breakdown, sensitivity_table, top):
    plot_fronts(sweep_csv, selection_for_variant(selection_json, variant), fronts)
    plot_sensitivity(sensitivity_csv, sensitivity, top=top)
    plot_breakdown(breakdown_json, breakdown)
    write_table_html(sensitivity_csv, sensitivity_table, "Sensitivity per Linear side, in the order the "
                     "sensitivity rule shadows them", sort_by="rank")


out = snakemake.output
run_stage(snakemake, quality_figures, sweep_csv=snakemake.input.sweep, selection_json=snakemake.input.selection,
          variant=snakemake.params.variant, sensitivity_csv=snakemake.input.sensitivity,
          breakdown_json=snakemake.input.breakdown, fronts=out.fronts, sensitivity=out.sensitivity,
          breakdown=out.breakdown, sensitivity_table=out.table, top=int(snakemake.params.top))
