# Thin adapter: rule bundle_decode_model -> shadowquant.decoding.candidates.choose_decode_model
from shadowquant.adapter import run_stage
from shadowquant.decoding.candidates import choose_decode_model

i, o, p = snakemake.input, snakemake.output, snakemake.params
run_stage(snakemake, choose_decode_model, candidate_jsons=list(i.results), candidate_models=list(i.models),
          candidates=p.candidates, out_csv=o.table, out_html=o.html, out_choice=o.choice, out_decode=o.decode,
          choice=p.choice, budget=p.budget)
