# Thin adapter: rule check_bundle_tokenizer -> shadowquant.bundle.assemble.check_tokenizer
from shadowquant.adapter import run_stage
from shadowquant.bundle.assemble import check_tokenizer
from shadowquant.inputs.manifest import read_manifest

i, p = snakemake.input, snakemake.params
run_stage(snakemake, lambda **kw: check_tokenizer(model_dir=read_manifest(i.manifest)["path"], **kw),
          vocab=i.vocab, merges=i.merges, spec_json=i.spec, corpus=i.corpus, out_json=snakemake.output[0],
          num_texts=p.num_texts, offset=p.offset)
