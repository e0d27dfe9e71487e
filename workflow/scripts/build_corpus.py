# Thin adapter: rule build_pydoc_corpus -> shadowquant.stages.build_corpus
from shadowquant.adapter import run_stage
from shadowquant.stages import build_corpus

run_stage(snakemake, build_corpus, source="builtin:pydoc", out=snakemake.output[0])
