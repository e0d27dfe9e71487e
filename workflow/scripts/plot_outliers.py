# Thin adapter: rule plot_outliers -> shadowquant.report.plots
from shadowquant.adapter import run_stage
from shadowquant.report.plots import plot_outlier_ratios, write_table_html


def profile_figures(scales, table_csv, plot, table, threshold):
    plot_outlier_ratios(scales, plot, threshold=threshold)
    write_table_html(table_csv, table, "Activation statistics per Linear layer and side")


run_stage(snakemake, profile_figures, scales=snakemake.input.scales, table_csv=snakemake.input.table,
          plot=snakemake.output.plot, table=snakemake.output.table, threshold=snakemake.params.threshold)
