# Thin adapter: rule bundle_decode_model -> shadowquant.bundle.write_decode_model_of
from shadowquant.adapter import run_stage
from shadowquant.bundle import write_decode_model_of

i = snakemake.input
run_stage(snakemake, write_decode_model_of, manifests=list(i.manifests), runtime_json=i.runtime,
          variants=snakemake.params.variants, out=snakemake.output[0])
