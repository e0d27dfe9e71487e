# Thin adapter: rule bundle_tokenizer -> shadowquant.bundle.assemble.write_tokenizer
from shadowquant.adapter import run_stage
from shadowquant.bundle.assemble import write_tokenizer
from shadowquant.inputs.manifest import read_manifest

i, o = snakemake.input, snakemake.output
run_stage(snakemake, lambda **kw: write_tokenizer(read_manifest(i.manifest)["path"], **kw),
          vocab_out=o.vocab, merges_out=o.merges, spec_out=o.spec)
