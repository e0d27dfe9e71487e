# Thin adapter: rule export_int8 -> shadowquant.stages.export
from shadowquant.adapter import run_stage
from shadowquant.stages import export

run_stage(snakemake, export, manifest=snakemake.input.manifest, act_scales=snakemake.input.scales,
          out=snakemake.output.export, point=snakemake.params.point,
          selection=snakemake.input.selection[0] if snakemake.input.selection else None,
          sensitivity=snakemake.input.sensitivity[0] if snakemake.input.sensitivity else None,
          clip_scales=snakemake.input.clip_scales[0] if snakemake.input.clip_scales else None,
          shadow_json=snakemake.output.shadow)
