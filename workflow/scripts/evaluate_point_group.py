# Thin adapter: rule evaluate_point_group -> shadowquant.sweep.evaluate_point_group
from shadowquant.adapter import run_stage
from shadowquant.sweep import evaluate_point_group
from shadowquant.weight_range import resolve_weight_range

p, i = snakemake.params, snakemake.input


def evaluate_group_with_weight_range(**kwargs):
    weight_range = resolve_weight_range(p.weight_range, i.weight_range[0] if i.weight_range else None)
    return evaluate_point_group(weight_range=weight_range, **kwargs)


run_stage(snakemake, evaluate_group_with_weight_range, manifest=i.manifest, samples=i.samples,
          act_scales=i.scales, baseline=i.baseline, float_json=i.float, out_json=snakemake.output[0],
          points=list(p.points), seq_len=p.seq_len, batch_size=p.batch_size, device=p.device, dtype=p.dtype,
          num_resamples=p.num_resamples, sensitivity=i.sensitivity[0] if i.sensitivity else None,
          clip_scales=i.clip_scales[0] if i.clip_scales else None, runtime=p.runtime,
          runtime_scales=i.runtime_scales[0] if i.runtime_scales else None)
