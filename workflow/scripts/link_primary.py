# Thin adapter: rules primary_model, primary_runtime -> shadowquant.stages.link_primary (a root copy)
from shadowquant.adapter import run_stage
from shadowquant.stages import link_primary

run_stage(snakemake, link_primary, src=snakemake.input[0], dst=snakemake.output[0])
