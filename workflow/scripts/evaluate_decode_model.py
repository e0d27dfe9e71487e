# Thin adapter: rule evaluate_decode_model -> shadowquant.decoding.candidates.evaluate_decode_candidate
from shadowquant.adapter import run_stage
from shadowquant.bundle.assemble import exported_variant
from shadowquant.decoding.candidates import evaluate_decode_candidate

i, o, p, w = snakemake.input, snakemake.output, snakemake.params, snakemake.wildcards


def evaluate_exported_variant(**kwargs):
    n = exported_variant(i.runtime[0] if i.runtime else None, p.variants)
    return evaluate_decode_candidate(prefill_manifest=i.manifests[n], float_json=i.floats[n],
                                     baseline=i.baselines[n], **kwargs)


run_stage(snakemake, evaluate_exported_variant, candidate=f"{w.source}:{w.recipe}", samples=i.samples,
          out_model=o.model, out_json=o.result, seq_len=p.seq_len,
          original_manifest=i.original, calibration=i.calibration,
          imatrix_samples=p.imatrix_samples, calibration_seq_len=p.calibration_seq_len, batch_size=p.batch_size,
          device=p.device, dtype=p.dtype, num_resamples=p.num_resamples)
