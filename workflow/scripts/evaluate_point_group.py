# Thin adapter: rule evaluate_point_group -> shadowquant.sweep.evaluate_point_group
from shadowquant.adapter import run_stage
from shadowquant.sweep import evaluate_point_group

p, i = snakemake.params, snakemake.input
run_stage(snakemake, evaluate_point_group, manifest=i.manifest, samples=i.samples, act_scales=i.scales,
          baseline=i.baseline, float_json=i.float, out_json=snakemake.output[0], points=list(p.points),
          seq_len=p.seq_len, batch_size=p.batch_size, device=p.device, dtype=p.dtype,
          num_resamples=p.num_resamples, sensitivity=i.sensitivity[0] if i.sensitivity else None,
          clip_scales=i.clip_scales[0] if i.clip_scales else None)
