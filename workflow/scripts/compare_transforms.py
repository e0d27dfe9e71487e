# Thin adapter: rule compare_transforms -> shadowquant.evaluate.transform_comparison
from shadowquant.adapter import run_stage
from shadowquant.evaluate.transform_comparison import compare_transforms

i, p, out = snakemake.input, snakemake.params, snakemake.output
run_stage(snakemake, compare_transforms, sweep_csvs=list(i.sweeps), breakdown_jsons=list(i.breakdowns),
          variants=list(p.variants), selection_json=i.selection, metric=p.metric, budget=p.budget,
          out_csv=out.table, out_md=out.summary, out_html=out.page)
