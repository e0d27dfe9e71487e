# Thin adapter: rule sensitivity -> shadowquant.sensitivity.sensitivity_stage (runtime.profile ideal: shadow
# sides) or layer_sensitivity_stage (an NPU runtime profile: shadow layers)
from shadowquant.adapter import run_stage
from shadowquant.sensitivity import layer_sensitivity_stage, sensitivity_stage
from shadowquant.weight_range import resolve_weight_range

p, i = snakemake.params, snakemake.input


def ranked_sensitivity(**kwargs):
    weight_range = resolve_weight_range(p.weight_range, i.weight_range[0] if i.weight_range else None)
    if i.runtime_scales:
        return layer_sensitivity_stage(runtime_scales=i.runtime_scales[0], profile=p.runtime,
                                       weight_range=weight_range, **kwargs)
    return sensitivity_stage(statistics=list(p.statistics), measure_top=p.measure_top,
                             measure_samples=p.measure_samples, cost=p.cost, weight_range=weight_range, **kwargs)


run_stage(snakemake, ranked_sensitivity, manifest=i.manifest, samples=i.samples, act_scales=i.scales,
          out_csv=snakemake.output[0], num_samples=p.num_samples, seq_len=p.seq_len, device=p.device,
          dtype=p.dtype)
