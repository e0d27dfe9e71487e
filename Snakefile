# Shadow-outlier W8A8 quantization of a causal LM into an mllm model file.
#   snakemake --cores 2 model.mllm          the primary model's mllm file
#   snakemake --cores 2                     every default target
#   snakemake --cores 2 bundle              the phone bundle (results/<name>/bundle/)
#   snakemake --cores 2 demo                the bundle's prefill + decode as mllm's demo runs them
#   snakemake --configfile other.yaml ...   another model, results under results/<name>/
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/inputs.smk"
include: "workflow/rules/profile.smk"
include: "workflow/rules/export.smk"
include: "workflow/rules/sweep.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/bundle.smk"
include: "workflow/rules/demo.smk"


drop_benchmarks_of_cached_rules()


# Short bookkeeping jobs run on the submitting host, never as cluster jobs.
localrules:
    all,
    build_pydoc_corpus,
    select_calibration,
    select_evaluation,
    aggregate_sweep,
    compare_transforms,
    select_point,
    breakdown,
    plot_sweep,
    plot_outliers,
    plot_quality,
    primary_model,
    primary_runtime,
    bundle,
    evaluation_summary,


rule all:
    default_target: True
    input:
        default_targets(),
