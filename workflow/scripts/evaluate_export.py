# Thin adapter: rule evaluate_export -> shadowquant.final_evaluation.evaluate_export
from shadowquant.adapter import run_stage
from shadowquant.final_evaluation import evaluate_export

p = snakemake.params
run_stage(snakemake, evaluate_export, manifest=snakemake.input.manifest, export=snakemake.input.export,
          float_json=snakemake.input.float, sweep_csv=snakemake.input.sweep, out_json=snakemake.output.metrics,
          out_md=snakemake.output.summary, out_html=snakemake.output.page, point=p.point,
          selection=snakemake.input.selection[0] if snakemake.input.selection else None, prompts=list(p.prompts),
          max_new_tokens=p.max_new_tokens, device=p.device, dtype=p.dtype)
