# Thin adapter: rule evaluate_decode_model -> shadowquant.decode_model.evaluate_decode_model
from shadowquant.adapter import run_stage
from shadowquant.bundle import exported_variant
from shadowquant.decode_model import evaluate_decode_model

i, p = snakemake.input, snakemake.params


def evaluate_exported_variant(**kwargs):
    n = exported_variant(i.runtime, p.variants)
    return evaluate_decode_model(manifest=i.manifests[n], float_json=i.floats[n], baseline=i.baselines[n], **kwargs)


run_stage(snakemake, evaluate_exported_variant, decode_path=i.decode, samples=i.samples, out_json=snakemake.output[0],
          seq_len=p.seq_len, batch_size=p.batch_size, device=p.device, dtype=p.dtype, num_resamples=p.num_resamples)
