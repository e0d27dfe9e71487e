# Thin adapter: rules evaluate_point and evaluate_part -> shadowquant.evaluate.sweep.evaluate_point
from shadowquant.adapter import run_stage
from shadowquant.runtimes import get_runtime
from shadowquant.evaluate.sweep import PointEvaluation, evaluate_point
from shadowquant.calibrate.weight_range import resolve_weight_range

p, w, i = snakemake.params, snakemake.wildcards, snakemake.input
# A breakdown part is the runtime's breakdown point with only that part quantized.
point = w.point if "point" in w.keys() else get_runtime(p.runtime).breakdown_point(w.statistic)


def evaluate_with_weight_range(**kwargs):
    weight_range = resolve_weight_range(p.weight_range, i.weight_range[0] if i.weight_range else None)
    evaluation = PointEvaluation(
        manifest=i.manifest, samples=i.samples, act_scales=i.scales, baseline=i.baseline, float_json=i.float,
        seq_len=p.seq_len, runtime=p.runtime, batch_size=p.batch_size, device=p.device, dtype=p.dtype,
        num_resamples=p.num_resamples, weight_range=weight_range,
        sensitivity=i.sensitivity[0] if "sensitivity" in i.keys() and i.sensitivity else None,
        clip_scales=i.clip_scales[0] if "clip_scales" in i.keys() and i.clip_scales else None,
        runtime_scales=i.runtime_scales[0] if i.runtime_scales else None)
    return evaluate_point(evaluation, **kwargs)


run_stage(snakemake, evaluate_with_weight_range, point=point, out_json=snakemake.output[0],
          part=w.part if "part" in w.keys() else "all")
