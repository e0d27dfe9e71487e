# Thin adapter: rule evaluate_threshold -> shadowquant.sweep.evaluate_threshold
from shadowquant.adapter import run_stage
from shadowquant.sweep import evaluate_threshold

p, w = snakemake.params, snakemake.wildcards
run_stage(snakemake, evaluate_threshold, manifest=snakemake.input.manifest, samples=snakemake.input.samples,
          act_scales=snakemake.input.scales, baseline=snakemake.input.baseline, out_json=snakemake.output[0],
          statistic=w.statistic, threshold=float(w.threshold), seq_len=p.seq_len, batch_size=p.batch_size,
          device=p.device, dtype=p.dtype)
