# Thin adapter: rule sensitivity -> shadowquant.sensitivity.sensitivity_stage
from shadowquant.adapter import run_stage
from shadowquant.sensitivity import sensitivity_stage

p = snakemake.params
run_stage(snakemake, sensitivity_stage, manifest=snakemake.input.manifest, samples=snakemake.input.samples,
          act_scales=snakemake.input.scales, out_csv=snakemake.output[0], statistics=list(p.statistics),
          num_samples=p.num_samples, seq_len=p.seq_len, measure_top=p.measure_top,
          measure_samples=p.measure_samples, cost=p.cost, device=p.device, dtype=p.dtype)
