# Thin adapter: rule merge_profile -> shadowquant.calibrate.profile_stage.merge_profile
from shadowquant.adapter import run_stage
from shadowquant.calibrate.profile_stage import merge_profile

run_stage(snakemake, merge_profile, shard_files=list(snakemake.input.shards), out_json=snakemake.output.scales,
          out_table=snakemake.output.table)
