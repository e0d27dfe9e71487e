# Thin adapter: rule evaluation_summary -> shadowquant.evaluate.summary.write_evaluation_summary
from shadowquant.adapter import run_stage
from shadowquant.evaluate.summary import write_evaluation_summary

i, out = snakemake.input, snakemake.output
run_stage(snakemake, write_evaluation_summary, evaluation_json=i.evaluation, out_md=out.summary, out_html=out.page,
          demo_json=i.get("demo"))
