# Thin adapter: rule transform_model -> shadowquant.model.transforms.transform_stage
from shadowquant.adapter import run_stage
from shadowquant.model.transforms import transform_stage

p = snakemake.params
run_stage(snakemake, transform_stage, manifest=snakemake.input.manifest, out_manifest=snakemake.output.manifest,
          transforms=list(p.steps), seed=p.seed, alpha=p.alpha,
          samples=snakemake.input.samples[0] if snakemake.input.samples else None,
          num_samples=p.num_samples, seq_len=p.seq_len, chosen_by=p.chosen_by)
