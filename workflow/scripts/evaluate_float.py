# Thin adapter: rule evaluate_float -> shadowquant.evaluate.sweep.evaluate_float
from shadowquant.adapter import run_stage
from shadowquant.evaluate.sweep import evaluate_float

p = snakemake.params
run_stage(snakemake, evaluate_float, manifest=snakemake.input.manifest, samples=snakemake.input.samples,
          out_json=snakemake.output.metrics, out_baseline=snakemake.output.baseline, seq_len=p.seq_len,
          batch_size=p.batch_size, device=p.device, dtype=p.dtype, num_resamples=p.num_resamples)
