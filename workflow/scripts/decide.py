# Thin adapter: rule decide -> shadowquant.stages.decide
from shadowquant.adapter import run_stage
from shadowquant.stages import decide

run_stage(snakemake, decide, act_scales=snakemake.input.scales, out=snakemake.output[0],
          threshold=float(snakemake.wildcards.threshold), statistic=snakemake.wildcards.statistic)
