# Thin adapter: rules select_calibration / select_evaluation -> shadowquant.stages.select_samples
from shadowquant.adapter import run_stage
from shadowquant.stages import select_samples

p = snakemake.params
run_stage(snakemake, select_samples, corpus_path=snakemake.input.corpus, out=snakemake.output[0],
          num_samples=p.num_samples, offset=p.get("offset", 0), what=p.get("what", "calibration"),
          shuffle=p.get("shuffle", True))
