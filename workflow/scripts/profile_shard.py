# Thin adapter: rule profile_shard -> shadowquant.calibrate.profile_stage.profile_shard
from shadowquant.adapter import run_stage
from shadowquant.calibrate.profile_stage import profile_shard

p = snakemake.params
run_stage(snakemake, profile_shard, manifest=snakemake.input.manifest, samples=snakemake.input.samples,
          out=snakemake.output.shard, shard=int(snakemake.wildcards.shard), shards=p.shards, seq_len=p.seq_len,
          batch_size=p.batch_size, device=p.device, dtype=p.dtype, checkpoint_dir=p.checkpoint_dir,
          checkpoint_every=p.checkpoint_every)
