# Thin adapter: rule primary_model -> shadowquant.stages.link_primary (model.mllm and its runtime.json)
from shadowquant.adapter import run_stage
from shadowquant.stages import link_primary


def link_both(**_):
    link_primary(snakemake.input.model, snakemake.output.model)
    link_primary(snakemake.input.runtime, snakemake.output.runtime)


run_stage(snakemake, link_both)
