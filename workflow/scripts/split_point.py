# Thin adapter: rule split_point -> shadowquant.evaluate.sweep.split_point
from shadowquant.adapter import run_stage
from shadowquant.evaluate.sweep import split_point

run_stage(snakemake, split_point, group_json=snakemake.input[0], point=snakemake.wildcards.point,
          out_json=snakemake.output[0])
