# Thin adapter: rule plot_sweep -> shadowquant.report.plots
from shadowquant.adapter import run_stage
from shadowquant.report.plots import (plot_sweep_vs_shadow, plot_sweep_vs_threshold, selection_for_variant,
                               write_table_html)


def sweep_figures(sweep_csv, selection_json, variant, by_threshold, by_shadow, table):
    selection_json = selection_for_variant(selection_json, variant)  # marked only in its own variant
    plot_sweep_vs_threshold(sweep_csv, selection_json, by_threshold)
    plot_sweep_vs_shadow(sweep_csv, selection_json, by_shadow)
    write_table_html(sweep_csv, table, "Sweep: every point against float, with 95 % bootstrap intervals")


out = snakemake.output
run_stage(snakemake, sweep_figures, sweep_csv=snakemake.input.sweep, selection_json=snakemake.input.selection,
          variant=snakemake.params.variant, by_threshold=out.threshold, by_shadow=out.shadow, table=out.table)
