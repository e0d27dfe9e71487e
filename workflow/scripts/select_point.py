# Thin adapter: rule select_point -> shadowquant.evaluate.selection.select_stage
from shadowquant.adapter import run_stage
from shadowquant.evaluate.selection import select_stage

p = snakemake.params
run_stage(snakemake, select_stage, sweep_csvs=list(snakemake.input), out=snakemake.output[0], metric=p.metric,
          budget=p.budget, point=p.point, variants=list(p.variants), transform=p.transform)
