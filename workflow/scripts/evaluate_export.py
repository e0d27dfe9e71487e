# Thin adapter: rule evaluate_export -> shadowquant.summary.final_evaluation
from shadowquant.adapter import run_stage
from shadowquant.summary import final_evaluation

p = snakemake.params
run_stage(snakemake, final_evaluation, manifest=snakemake.input.manifest, act_scales=snakemake.input.scales,
          float_json=snakemake.input.float, sweep_csv=snakemake.input.sweep, out_json=snakemake.output.metrics,
          out_md=snakemake.output.summary, out_html=snakemake.output.page, statistic=p.statistic, threshold=p.threshold,
          selection=snakemake.input.selection[0] if snakemake.input.selection else None, prompts=list(p.prompts),
          max_new_tokens=p.max_new_tokens, device=p.device, dtype=p.dtype)
