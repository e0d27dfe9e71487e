# Thin adapter: rule plot_sweep -> shadowquant.plots
from shadowquant.adapter import run_stage
from shadowquant.plots import plot_sweep_vs_shadow, plot_sweep_vs_threshold


def both(sweep_csv, selection_json, by_threshold, by_shadow):
    plot_sweep_vs_threshold(sweep_csv, selection_json, by_threshold)
    plot_sweep_vs_shadow(sweep_csv, selection_json, by_shadow)


run_stage(snakemake, both, sweep_csv=snakemake.input.sweep, selection_json=snakemake.input.selection,
          by_threshold=snakemake.output.threshold, by_shadow=snakemake.output.shadow)
