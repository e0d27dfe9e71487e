# Thin adapter: rule export_int8 -> shadowquant.stages.export (of the selected transform variant)
from shadowquant.adapter import run_stage
from shadowquant.evaluate.selection import selected_variant
from shadowquant.stages import export
from shadowquant.calibrate.weight_range import resolve_weight_range

i, p = snakemake.input, snakemake.params
selection = i.selection[0] if i.selection else None


def export_selected_variant(**kwargs):
    n = selected_variant(p.variants, p.transform, selection)
    return export(manifest=i.manifests[n], act_scales=i.scales[n],
                  sensitivity=i.sensitivity[n] if i.sensitivity else None,
                  clip_scales=i.clip_scales[n] if i.clip_scales else None,
                  weight_range=resolve_weight_range(p.weight_range, i.weight_range[n] if i.weight_range else None),
                  runtime=p.runtime, runtime_scales=i.runtime_scales[n] if i.runtime_scales else None,
                  auto_choices=dict(p.auto_choices), **kwargs)


run_stage(snakemake, export_selected_variant, out=snakemake.output.export, point=p.point, selection=selection,
          shadow_json=snakemake.output.shadow, runtime_json=snakemake.output.runtime)
