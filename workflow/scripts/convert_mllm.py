# Thin adapter: rule convert_mllm -> shadowquant.stages.convert (runs the inspector too)
from shadowquant.adapter import run_stage
from shadowquant.stages import convert

run_stage(snakemake, convert, export_path=snakemake.input.export, out=snakemake.output.model,
          report=snakemake.output.report, runtime_json=snakemake.input.runtime)
