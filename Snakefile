# Shadow-outlier W8A8 quantization of a causal LM into an mllm model file.
#   snakemake --cores 2 model.mllm          the primary model's mllm file
#   snakemake --cores 2                     every default target
#   snakemake --configfile other.yaml ...   another model, results under results/<name>/
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/inputs.smk"
include: "workflow/rules/profile.smk"
include: "workflow/rules/export.smk"


rule all:
    default_target: True
    input:
        default_targets(),
