# Thin adapter: rule sensitivity -> the runtime's ranking (shadowquant.runtimes: shadow sides under
# runtime.profile ideal, shadow layers under an NPU runtime profile)
from shadowquant.adapter import run_stage
from shadowquant.runtimes import get_runtime
from shadowquant.calibrate.weight_range import resolve_weight_range

p, i = snakemake.params, snakemake.input


def ranked_sensitivity(**kwargs):
    weight_range = resolve_weight_range(p.weight_range, i.weight_range[0] if i.weight_range else None)
    return get_runtime(p.runtime).rank(runtime_scales=i.runtime_scales[0] if i.runtime_scales else None,
                                       weight_range=weight_range, **kwargs)


run_stage(snakemake, ranked_sensitivity, manifest=i.manifest, samples=i.samples, act_scales=i.scales,
          out_csv=snakemake.output[0], num_samples=p.num_samples, seq_len=p.seq_len,
          statistics=list(p.statistics), measure_top=p.measure_top, measure_samples=p.measure_samples, cost=p.cost,
          device=p.device, dtype=p.dtype)
