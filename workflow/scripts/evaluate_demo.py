# Thin adapter: rule evaluate_demo -> shadowquant.evaluate.demo_evaluation.evaluate_demo
from shadowquant.adapter import run_stage
from shadowquant.bundle.assemble import exported_variant
from shadowquant.evaluate.demo_evaluation import evaluate_demo

i, p, out = snakemake.input, snakemake.params, snakemake.output


def evaluate_exported_variant(**kwargs):
    n = exported_variant(i.runtime, p.variants)
    return evaluate_demo(manifest=i.manifests[n], baseline=i.baselines[n], **kwargs)


run_stage(snakemake, evaluate_exported_variant, export=i.export, runtime_json=i.runtime, samples=i.samples,
          decode_path=i.decode, decode_choice=i.decode_choice, prefill_json=i.prefill_json, out_json=out.metrics,
          out_md=out.summary, seq_len=p.seq_len, batch_size=p.batch_size, device=p.device,
          num_resamples=p.num_resamples, name=p.name)
