# Thin adapter: rules evaluate_point and evaluate_part -> shadowquant.sweep.evaluate_point
from shadowquant.adapter import run_stage
from shadowquant.decision import breakdown_point
from shadowquant.sweep import evaluate_point
from shadowquant.weight_range import resolve_weight_range

p, w, i = snakemake.params, snakemake.wildcards, snakemake.input
# A breakdown part is the breakdown point (ideal: all shadow, t = 1; NPU: no shadow layer) with
# only that part quantized.
point = w.point if "point" in w.keys() else breakdown_point(w.statistic, p.runtime)


def evaluate_with_weight_range(**kwargs):
    weight_range = resolve_weight_range(p.weight_range, i.weight_range[0] if i.weight_range else None)
    return evaluate_point(weight_range=weight_range, **kwargs)


run_stage(snakemake, evaluate_with_weight_range, manifest=i.manifest, samples=i.samples, act_scales=i.scales,
          baseline=i.baseline, float_json=i.float, out_json=snakemake.output[0], point=point, seq_len=p.seq_len,
          batch_size=p.batch_size, device=p.device, dtype=p.dtype, num_resamples=p.num_resamples,
          sensitivity=i.sensitivity[0] if "sensitivity" in i.keys() and i.sensitivity else None,
          part=w.part if "part" in w.keys() else "all",
          clip_scales=i.clip_scales[0] if "clip_scales" in i.keys() and i.clip_scales else None,
          runtime=p.runtime, runtime_scales=i.runtime_scales[0] if i.runtime_scales else None)
