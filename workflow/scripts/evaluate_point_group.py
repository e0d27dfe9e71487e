# Thin adapter: rule evaluate_point_group -> shadowquant.evaluate.sweep.evaluate_point_group
from shadowquant.adapter import run_stage
from shadowquant.evaluate.sweep import PointEvaluation, evaluate_point_group
from shadowquant.calibrate.weight_range import resolve_weight_range

p, i = snakemake.params, snakemake.input


def evaluate_group_with_weight_range(**kwargs):
    weight_range = resolve_weight_range(p.weight_range, i.weight_range[0] if i.weight_range else None)
    evaluation = PointEvaluation(
        manifest=i.manifest, samples=i.samples, act_scales=i.scales, baseline=i.baseline, float_json=i.float,
        seq_len=p.seq_len, runtime=p.runtime, batch_size=p.batch_size, device=p.device, dtype=p.dtype,
        num_resamples=p.num_resamples, weight_range=weight_range,
        sensitivity=i.sensitivity[0] if i.sensitivity else None,
        clip_scales=i.clip_scales[0] if i.clip_scales else None,
        runtime_scales=i.runtime_scales[0] if i.runtime_scales else None)
    return evaluate_point_group(evaluation, **kwargs)


run_stage(snakemake, evaluate_group_with_weight_range, points=list(p.points), out_json=snakemake.output[0])
