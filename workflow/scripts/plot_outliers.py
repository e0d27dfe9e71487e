# Thin adapter: rule plot_outliers -> shadowquant.plots.plot_outlier_ratios
from shadowquant.adapter import run_stage
from shadowquant.plots import plot_outlier_ratios

run_stage(snakemake, plot_outlier_ratios, act_scales_json=snakemake.input[0], out_png=snakemake.output[0])
