# Thin adapter: rule fetch_model -> shadowquant.stages.fetch_model
from shadowquant.adapter import run_stage
from shadowquant.stages import fetch_model

p = snakemake.params
run_stage(snakemake, fetch_model, source=p.source, manifest=snakemake.output.manifest, model_type=p.type,
          revision=p.revision, trust_remote_code=p.trust_remote_code)
