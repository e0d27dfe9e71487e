# Thin adapter: rules evaluate_point and evaluate_part -> shadowquant.sweep.evaluate_point
from shadowquant.adapter import run_stage
from shadowquant.decision import point_label
from shadowquant.sweep import evaluate_point

p, w, i = snakemake.params, snakemake.wildcards, snakemake.input
# A breakdown part is the all-shadow ratio point (t = 1) with only that part quantized.
point = w.point if "point" in w.keys() else point_label(w.statistic, "ratio", 1)
run_stage(snakemake, evaluate_point, manifest=i.manifest, samples=i.samples, act_scales=i.scales,
          baseline=i.baseline, float_json=i.float, out_json=snakemake.output[0], point=point, seq_len=p.seq_len,
          batch_size=p.batch_size, device=p.device, dtype=p.dtype, num_resamples=p.num_resamples,
          sensitivity=i.sensitivity[0] if "sensitivity" in i.keys() and i.sensitivity else None,
          part=w.part if "part" in w.keys() else "all",
          clip_scales=i.clip_scales[0] if "clip_scales" in i.keys() and i.clip_scales else None)
