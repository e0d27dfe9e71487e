# Thin adapter: rule clip_scales -> shadowquant.calibrate.sensitivity.clip_scales_stage
from shadowquant.adapter import run_stage
from shadowquant.calibrate.sensitivity import clip_scales_stage

p = snakemake.params
run_stage(snakemake, clip_scales_stage, manifest=snakemake.input.manifest, samples=snakemake.input.samples,
          act_scales=snakemake.input.scales, out_json=snakemake.output[0], statistics=list(p.statistics),
          num_samples=p.num_samples, seq_len=p.seq_len, device=p.device, dtype=p.dtype)
