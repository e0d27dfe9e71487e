# Thin adapter: rule aggregate_sweep -> shadowquant.evaluate.sweep.aggregate
from shadowquant.adapter import run_stage
from shadowquant.evaluate.sweep import aggregate

run_stage(snakemake, aggregate, float_json=snakemake.input.float, point_jsons=list(snakemake.input.points),
          out_csv=snakemake.output[0])
