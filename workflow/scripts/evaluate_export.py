# Thin adapter: rule evaluate_export -> shadowquant.evaluate.final_evaluation.evaluate_export
from shadowquant.adapter import run_stage
from shadowquant.evaluate.final_evaluation import evaluate_export
from shadowquant.evaluate.selection import selected_variant

i, p = snakemake.input, snakemake.params
selection = i.selection[0] if i.selection else None


def evaluate_selected_variant(**kwargs):
    n = selected_variant(p.variants, p.transform, selection)
    return evaluate_export(manifest=i.manifests[n], float_json=i.floats[n], sweep_csv=i.sweeps[n], **kwargs)


out = snakemake.output
run_stage(snakemake, evaluate_selected_variant, export=i.export, out_json=out.metrics, point=p.point,
          selection=selection, prompts=list(p.prompts), max_new_tokens=p.max_new_tokens, device=p.device,
          dtype=p.dtype, name=p.name)
