# Thin adapter: rule export_pth -> shadowquant.stages.export_pth
from shadowquant.adapter import run_stage
from shadowquant.stages import export_pth

run_stage(snakemake, export_pth, export_path=snakemake.input[0], out=snakemake.output[0])
