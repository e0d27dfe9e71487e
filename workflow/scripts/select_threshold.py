# Thin adapter: rule select_threshold -> shadowquant.selection.select_stage
from shadowquant.adapter import run_stage
from shadowquant.selection import select_stage

p = snakemake.params
run_stage(snakemake, select_stage, sweep_csv=snakemake.input[0], out=snakemake.output[0], metric=p.metric,
          max_drop=p.max_drop, statistic=p.statistic, threshold=p.threshold)
