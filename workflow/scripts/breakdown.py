# Thin adapter: rule breakdown -> shadowquant.evaluate.sweep.breakdown
from shadowquant.adapter import run_stage
from shadowquant.evaluate.sweep import breakdown

i = snakemake.input
run_stage(snakemake, breakdown, float_json=i.float, out_json=snakemake.output[0],
          part_jsons={"weights": i.weights, "inputs": i.inputs, "outputs": i.outputs, "all": i.all})
