# Thin adapter: rule bundle -> shadowquant.bundle.assemble.assemble_bundle
from pathlib import Path

from shadowquant.adapter import run_stage
from shadowquant.bundle.assemble import assemble_bundle, exported_variant

i, o, p = snakemake.input, snakemake.output, snakemake.params


def assemble(**kwargs):
    n = exported_variant(i.runtime, p.variants)
    return assemble_bundle(float_json=i.floats[n], **kwargs)


run_stage(snakemake, assemble, name=p.name, prefill=i.prefill, decode=i.decode, vocab=i.vocab, merges=i.merges,
          tokenizer_json=i.tokenizer, runtime_json=i.runtime, tokenizer_check=i.tokenizer_check,
          decode_choice=i.decode_choice, out_prefill=o.prefill, out_runtime=o.runtime, out_readme=o.readme,
          out_report=o.check, out_cpp_dir=Path(o.cpp_demo).parent, demo_evaluation=i.demo)
