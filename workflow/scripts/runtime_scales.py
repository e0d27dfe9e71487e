# Thin adapter: rule runtime_scales -> shadowquant.calibrate.runtime_scales.runtime_scales_stage
from shadowquant.adapter import run_stage
from shadowquant.calibrate.runtime_scales import runtime_scales_stage

p, i = snakemake.params, snakemake.input
run_stage(snakemake, runtime_scales_stage, manifest=i.manifest, samples=i.samples, act_scales=i.scales,
          out_json=snakemake.output[0], profile=p.profile, cpu_cap=p.cpu_cap, num_samples=p.num_samples,
          seq_len=p.seq_len, fisher_samples=p.fisher_samples, fisher_seq_len=p.fisher_seq_len, device=p.device,
          dtype=p.dtype)
