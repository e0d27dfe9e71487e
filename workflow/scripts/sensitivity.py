# Thin adapter: rule sensitivity -> shadowquant.sensitivity.sensitivity_stage
from shadowquant.adapter import run_stage
from shadowquant.sensitivity import sensitivity_stage
from shadowquant.weight_range import resolve_weight_range

p, i = snakemake.params, snakemake.input


def ranked_sensitivity(**kwargs):
    weight_range = resolve_weight_range(p.weight_range, i.weight_range[0] if i.weight_range else None)
    return sensitivity_stage(weight_range=weight_range, **kwargs)


run_stage(snakemake, ranked_sensitivity, manifest=i.manifest, samples=i.samples, act_scales=i.scales,
          out_csv=snakemake.output[0], statistics=list(p.statistics), num_samples=p.num_samples,
          seq_len=p.seq_len, measure_top=p.measure_top, measure_samples=p.measure_samples, cost=p.cost,
          device=p.device, dtype=p.dtype)
