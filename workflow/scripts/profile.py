# Thin adapter: rule profile -> shadowquant.stages.profile
from shadowquant.adapter import run_stage
from shadowquant.stages import profile

p = snakemake.params
run_stage(snakemake, profile, manifest=snakemake.input.manifest, samples=snakemake.input.samples,
          out_json=snakemake.output.scales, out_table=snakemake.output.table, seq_len=p.seq_len,
          batch_size=p.batch_size, device=p.device, dtype=p.dtype, checkpoint_dir=p.checkpoint_dir,
          checkpoint_every=p.checkpoint_every)
