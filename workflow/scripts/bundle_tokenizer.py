# Thin adapter: rule bundle_tokenizer -> shadowquant.bundle.write_tokenizer
from shadowquant.adapter import run_stage
from shadowquant.bundle import write_tokenizer
from shadowquant.manifest import read_manifest

i, o = snakemake.input, snakemake.output
run_stage(snakemake, lambda **kw: write_tokenizer(read_manifest(i.manifest)["path"], **kw),
          vocab_out=o.vocab, merges_out=o.merges, spec_out=o.spec)
