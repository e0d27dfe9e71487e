# Thin adapter: rule download_dataset -> shadowquant.stages.build_corpus (https download)
from shadowquant.adapter import run_stage
from shadowquant.stages import build_corpus

run_stage(snakemake, build_corpus, source=snakemake.params.url, out=snakemake.output[0],
          sha256=snakemake.params.sha256)
