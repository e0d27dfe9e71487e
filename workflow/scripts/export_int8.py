# Thin adapter: rule export_int8 -> shadowquant.stages.export
from shadowquant.adapter import run_stage
from shadowquant.stages import export

run_stage(snakemake, export, manifest=snakemake.input.manifest, decision=snakemake.input.decision,
          out=snakemake.output.export, shadow_summary=snakemake.output.shadow)
