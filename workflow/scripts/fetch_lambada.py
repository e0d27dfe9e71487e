# Thin adapter: rule fetch_lambada -> shadowquant.stages.fetch_lambada
from shadowquant.adapter import run_stage
from shadowquant.stages import fetch_lambada

run_stage(snakemake, fetch_lambada, out=snakemake.output[0], num_samples=snakemake.params.num_samples)
