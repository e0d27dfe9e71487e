# Thin adapter: rule choose_weight_range -> shadowquant.calibrate.weight_range.weight_range_stage
from shadowquant.adapter import run_stage
from shadowquant.calibrate.weight_range import weight_range_stage

p = snakemake.params
run_stage(snakemake, weight_range_stage, manifest=snakemake.input.manifest, samples=snakemake.input.samples,
          out_json=snakemake.output[0], num_samples=p.num_samples, seq_len=p.seq_len, device=p.device,
          dtype=p.dtype)
