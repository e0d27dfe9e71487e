# Configuration, validated once, and the paths every rule shares.
import os
import re
import sys
from pathlib import Path

# MKL may use fewer threads than asked for when the machine is busy, which changes how its sums are
# split and so the last bits of the statistics: fixed threads keep a resumed run bit-identical.
os.environ.setdefault("MKL_DYNAMIC", "FALSE")

sys.path.insert(0, str(Path(workflow.basedir) / "src"))

from shadowquant.config import choice_params, resolve_auto, uses_auto, validate_config
from shadowquant.inputs.download import dataset_cache_path
from shadowquant.errors import PipelineError
from shadowquant.inputs.manifest import local_source_files
from shadowquant.inputs.model_source import describe_source
from shadowquant.evaluate.plan import sweep_plan
from shadowquant.runtimes.decision import needs_ranking, point_clip
from shadowquant.slurm_check import (
    ThreadRequest,
    check_threads_fit,
    parse_sinfo,
    query_sinfo,
)

try:
    # Errors name the config files the keys came from (the default one and any --configfile).
    CONFIG_SOURCE = " + ".join(map(str, workflow.configfiles)) or "config"
    config.update(validate_config(config, source=CONFIG_SOURCE))
    # 'auto' runtime.profile and transform.variants shape the workflow, so they are chosen now, from
    # the model's family (read before fetching: shadowquant.inputs.model_source says from where).
    AUTO_CHOICES = {}
    if uses_auto(config):
        _model = config["model"]
        _info = describe_source(
            _model["source"],
            declared=_model["type"],
            revision=_model["revision"],
            fetched_manifest=f"resources/models/{_model['name']}/manifest.json",
        )
        _resolved, AUTO_CHOICES = resolve_auto(config, _info, source=CONFIG_SOURCE)
        config.update(_resolved)
        for _key, _choice in AUTO_CHOICES.items():
            print(
                f"shadowquant: {_key} auto -> {_choice['value']}: {_choice['reason']}; "
                f"family read from {_choice['family_from']}",
                file=sys.stderr,
            )
except PipelineError as exc:
    sys.exit(f"error: {exc}")

# The auto choices as the rules take them (value and reason), the same before and after the fetch.
AUTO_CHOICE_PARAMS = choice_params(AUTO_CHOICES)

NAME = config["model"]["name"]
# What the selection and the export produce (and the calibration and evaluation samples).
RESULTS = f"results/{NAME}"
LOGS = f"logs/{NAME}"
BENCH = f"benchmarks/{NAME}"
FETCHED_MANIFEST = f"resources/models/{NAME}/manifest.json"
PYDOC_CORPUS = "resources/datasets/builtin/pydoc.jsonl"

# Each transform variant (an exact transform of the float model, or 'none') is profiled and swept on
# its own, as a "run" named <name> ('none') or <name>.<variant>; the selection chooses across them.
VARIANTS = config["transform"]["variants"]
RUNS = {(NAME if v == "none" else f"{NAME}.{v}"): v for v in VARIANTS}
RUN_OF_VARIANT = {v: run for run, v in RUNS.items()}
# Per-run paths, with the {run} wildcard.
RUN_RESULTS = "results/{run}"
RUN_LOGS = "logs/{run}"
RUN_BENCH = "benchmarks/{run}"
RUN_CHECKPOINTS = "resources/checkpoints/{run}"


def transformed_manifest(variant):
    return f"resources/models/{NAME}/transformed/{variant}/manifest.json"


def variant_manifest(variant):
    """How every step after the fetch reads a variant's model: the fetched one, or its exact transform."""
    return FETCHED_MANIFEST if variant == "none" else transformed_manifest(variant)


def run_manifest(wildcards):
    return variant_manifest(RUNS[wildcards.run])


def per_run(path):
    """A per-run path pattern ('{run}' in it) for every variant, in the order of transform.variants."""
    return [path.replace("{run}", run) for run in RUNS]


def any_of(values):
    """A wildcard constraint matching exactly these values (and nothing when there are none)."""
    return "|".join(re.escape(v) for v in values) or "(?!)"


wildcard_constraints:
    run=any_of(RUNS),
    variant=any_of(v for v in VARIANTS if v != "none"),


# One software environment for every rule (--use-conda); the same list as pyproject.toml.
CONDA_ENV = "../../environment.yml"
# Between-workflow caching (snakemake --cache) of the dataset fetch and profiling. The model
# fetch is not cached: its result is a model directory, which Snakemake's cache does not keep.
# Snakemake forbids benchmark files on cacheable rules (a cached result has no run to measure),
# so these rules are cacheable only when --cache is given, and then drop their benchmark files.
CACHING = (
    getattr(getattr(workflow, "workflow_settings", None), "cache", None) is not None
)
CACHE_MODE = "omit-software" if CACHING else False
CACHED_RULES = ("build_pydoc_corpus", "download_dataset", "profile")


def drop_benchmarks_of_cached_rules():
    if CACHING:
        for name in CACHED_RULES:
            if workflow.is_rule(name):  # profile is absent when profiling is sharded
                workflow.get_rule(name)._benchmark = None


USES_GPU = 1 if config["device"].startswith("cuda") else 0

# The config key (under `threads:`) that sets each multi-threaded rule's threads;
# on SLURM the threads become the job's --cpus-per-task, so they must fit a node.
THREADS_CONFIG_KEYS = {
    "profile": "threads.profile",
    "profile_shard": "threads.profile",
    "evaluate_float": "threads.evaluate",
    "evaluate_point": "threads.evaluate",
    "evaluate_point_group": "threads.evaluate",
    "evaluate_part": "threads.evaluate",
    "sensitivity": "threads.evaluate",
    "choose_weight_range": "threads.evaluate",
    "clip_scales": "threads.evaluate",
    "runtime_scales": "threads.profile",
    "evaluate_export": "threads.evaluate",
    "evaluate_decode_model": "threads.evaluate",
    "export_int8": "threads.export",
    "transform_model": "threads.export",
    "export_pth": "threads.export",
    "bundle_decode_model": "threads.export",
    "evaluate_demo": "threads.demo",
}


def rule_threads(rule_name):
    """A rule's threads, from the config key THREADS_CONFIG_KEYS names for it."""
    return config["threads"][THREADS_CONFIG_KEYS[rule_name].removeprefix("threads.")]


def check_slurm_threads():
    """Before anything is submitted to SLURM: each job's threads fit a node of its partition."""
    plugin = workflow.executor_plugin
    if plugin is None or plugin.name != "slurm":
        return
    requests = [
        ThreadRequest(job.rule.name, job.threads, job.resources.get("slurm_partition"))
        for job in workflow.dag.needrun_jobs()
        if not job.is_local
    ]
    try:
        partitions = parse_sinfo(query_sinfo())
    except PipelineError as exc:
        # sbatch will say what is wrong with the cluster; this check only adds clarity.
        print(
            f"warning: threads not checked against the SLURM nodes: {exc}",
            file=sys.stderr,
        )
        return
    try:
        check_threads_fit(requests, partitions, THREADS_CONFIG_KEYS)
    except PipelineError as exc:
        sys.exit(f"error: {exc}")


onstart:
    check_slurm_threads()


# What the config sweeps (shadowquant.evaluate.plan): the runtime the numbers are for (an NPU profile,
# where a point is a set of shadow layers, or 'ideal'), its points and their jobs, the breakdown point
# (itself a sweep point), the statistics that need a sensitivity ranking or MSE clip scales, and the
# exported point (an explicit one is always evaluated too, so the final evaluation can report it).
PLAN = sweep_plan(config)
SIMULATED = PLAN.runtime
RUNTIME = config["runtime"]["profile"]
EXPORT_POINT = PLAN.export_point
EXPORT_IS_AUTO = PLAN.export_is_auto
EXPORT_THRESHOLD = PLAN.export_threshold
BREAKDOWN_STATISTIC = PLAN.breakdown_statistic
BREAKDOWN_POINT = PLAN.breakdown_point
RUNTIME_SCALES = f"{RUN_RESULTS}/runtime_scales.json"
SWEEP_LABELS = PLAN.labels
SWEEP_POINTS = [f"{RUN_RESULTS}/sweep/{label}.json" for label in SWEEP_LABELS]
POINTS_PER_JOB = PLAN.points_per_job
POINT_GROUPS = PLAN.point_groups
GROUP_OF_POINT = PLAN.group_of_point
SENSITIVITY_STATISTICS = PLAN.sensitivity_statistics
USES_SENSITIVITY = bool(SENSITIVITY_STATISTICS)
CLIP_STATISTICS = PLAN.clip_statistics
CLIP_SCALES = f"{RUN_RESULTS}/clip_scales.json"
SENSITIVITY = f"{RUN_RESULTS}/sensitivity.csv"
NUM_RESAMPLES = config["sweep"]["bootstrap"]


def corpus_file(source, key):
    """Local path of a dataset source: built in, downloaded, or the user's own file."""
    if source == "builtin:pydoc":
        return PYDOC_CORPUS
    if source.startswith("https://"):
        return dataset_cache_path(source)
    if "://" in source or source.startswith(("hf:", "builtin:")):
        sys.exit(
            f"error: config key '{key}' = '{source}': use builtin:pydoc, an https:// URL or a local "
            ".jsonl/.jsonl.zst/.txt file"
        )
    if not Path(source).is_file():
        sys.exit(
            f"error: config key '{key}': dataset file '{source}' not found (relative paths start at the "
            "working directory); use builtin:pydoc, an https:// URL or an existing .jsonl/.jsonl.zst/.txt file"
        )
    return source


CALIBRATION_CORPUS = corpus_file(
    config["calibration"]["dataset"], "calibration.dataset"
)
LAMBADA = "resources/datasets/lambada-validation.jsonl"
EVAL_SOURCE = config["evaluation"]["dataset"]
if EVAL_SOURCE == "heldout":
    # Records after the calibration samples in the same seed-42 permutation: never overlapping.
    EVAL_CORPUS = CALIBRATION_CORPUS
    EVAL_OFFSET, EVAL_SHUFFLE = config["calibration"]["num_samples"], True
elif EVAL_SOURCE == "hf:lambada":
    # The reference's evaluation: the first records of LAMBADA validation, in order.
    EVAL_CORPUS, EVAL_OFFSET, EVAL_SHUFFLE = LAMBADA, 0, False
else:
    EVAL_CORPUS = corpus_file(EVAL_SOURCE, "evaluation.dataset")
    EVAL_OFFSET, EVAL_SHUFFLE = 0, True
# Download targets and the URL (and sha256) each comes from; rule download_dataset looks them up.
DOWNLOADS = {
    dataset_cache_path(src): (src, sha)
    for src, sha in [
        (EVAL_SOURCE, None),
        (config["calibration"]["dataset"], config["calibration"]["sha256"]),
    ]
    if src.startswith("https://")
}


def model_mem_mb(wildcards, input, attempt):
    """Memory for a job that holds the model: its float32 size twice over plus headroom, more on retry."""
    import json

    manifests = input.manifests if hasattr(input, "manifests") else [input.manifest]
    params = max(
        json.loads(Path(path).read_text()).get("num_parameters", 0)
        for path in manifests
    )
    return int((params * 4 * 2) / 2**20 + 2000) * attempt


def merge_mem_mb(wildcards, input, attempt):
    """The shards' statistics held at once (histograms dominate), twice over plus headroom; more on retry."""
    size = sum(Path(path).stat().st_size for path in input.shards)
    return int(2 * size / 2**20 + 1000) * attempt


def selection_input(wildcards=None):
    """The selection is an input of the export only when the point is left to "auto"."""
    return [f"{RESULTS}/selection.json"] if EXPORT_IS_AUTO else []


# The variants the export may take its model from (in the order of transform.variants): all of them
# when the selection chooses, else export.transform (or the only variant).
EXPORT_VARIANTS = (
    VARIANTS if EXPORT_IS_AUTO else [config["export"]["transform"] or VARIANTS[0]]
)


def export_inputs(path):
    """A per-run path for each variant the export may use."""
    return [path.replace("{run}", RUN_OF_VARIANT[v]) for v in EXPORT_VARIANTS]


def sensitivity_input(wildcards=None):
    """The sensitivity rankings for the export: only when its point is (or may be) a sensitivity point."""
    if EXPORT_IS_AUTO:
        return export_inputs(SENSITIVITY) if USES_SENSITIVITY else []
    if needs_ranking(EXPORT_POINT):
        return export_inputs(SENSITIVITY)
    return []


def runtime_scales_input(wildcards):
    """The run's runtime_scales.json under an NPU runtime profile."""
    return [in_run(RUNTIME_SCALES, wildcards)] if SIMULATED.needs_runtime_scales else []


def export_runtime_scales_input(wildcards=None):
    """runtime_scales.json of every variant the export may use, under an NPU runtime profile."""
    return export_inputs(RUNTIME_SCALES) if SIMULATED.needs_runtime_scales else []


def clip_scales_input(wildcards=None):
    """The MSE clip scales for the export: only when its point is (or may be) a '-mse' point."""
    if EXPORT_IS_AUTO:
        return export_inputs(CLIP_SCALES) if CLIP_STATISTICS else []
    return export_inputs(CLIP_SCALES) if point_clip(EXPORT_POINT) == "mse" else []


def in_run(path, wildcards):
    """A per-run path pattern for the job's run (input functions get no wildcard expansion)."""
    return path.replace("{run}", wildcards.run)


def point_clip_scales_input(wildcards):
    """The MSE clip scales only for a '-mse' point."""
    return (
        [in_run(CLIP_SCALES, wildcards)] if point_clip(wildcards.point) == "mse" else []
    )


WEIGHT_RANGE = config["sweep"]["weight_range"]
WEIGHT_RANGE_CHOICE = f"{RUN_RESULTS}/weight_range.json"


def weight_range_input(wildcards):
    """The run's measured weight range choice, when sweep.weight_range is 'auto'."""
    return [in_run(WEIGHT_RANGE_CHOICE, wildcards)] if WEIGHT_RANGE == "auto" else []


def point_group_file(wildcards):
    """The group file a point of a multi-point sweep job is split from."""
    group = GROUP_OF_POINT.get(wildcards.point)
    if group is None:
        raise ValueError(f"{wildcards.point} is not a point of the configured sweep")
    return in_run(
        f"{RUN_RESULTS}/sweep/groups/group-{group}-of-{len(POINT_GROUPS)}.json",
        wildcards,
    )


def group_sensitivity_input(wildcards):
    """The ranking when some point of the group is a sensitivity point."""
    points = POINT_GROUPS[int(wildcards.group)]
    if any(needs_ranking(p) for p in points):
        return [in_run(SENSITIVITY, wildcards)]
    return []


def group_clip_scales_input(wildcards):
    """The MSE clip scales when some point of the group is a '-mse' point."""
    points = POINT_GROUPS[int(wildcards.group)]
    if any(point_clip(p) == "mse" for p in points):
        return [in_run(CLIP_SCALES, wildcards)]
    return []


def point_sensitivity_input(wildcards):
    """The ranking only for a sensitivity point ("absmax-k15", "absmax-l2"): ratio points never wait for it."""
    if needs_ranking(wildcards.point):
        return [in_run(SENSITIVITY, wildcards)]
    return []


def default_targets():
    targets = [
        "model.mllm",
        f"{RESULTS}/model.mllm",
        f"{RESULTS}/model-int8.safetensors",
        f"{RESULTS}/selection.json",
        f"{RESULTS}/evaluation.json",
        f"{RESULTS}/evaluation.md",
        f"{RESULTS}/evaluation.html",
    ]
    per_run_targets = [
        f"{RUN_RESULTS}/act_scales.csv",
        f"{RUN_RESULTS}/sweep.csv",
        f"{RUN_RESULTS}/plots/sweep_threshold.png",
        f"{RUN_RESULTS}/plots/sweep_shadow.png",
        f"{RUN_RESULTS}/plots/outlier_ratios.png",
    ]
    if config["sweep"]["breakdown"]:
        per_run_targets.append(f"{RUN_RESULTS}/breakdown.json")
        targets += [f"{RESULTS}/transforms.csv", f"{RESULTS}/transforms.md"]
    if USES_SENSITIVITY and config["sweep"]["breakdown"]:
        per_run_targets += [
            f"{RUN_RESULTS}/plots/fronts.png",
            f"{RUN_RESULTS}/plots/sensitivity.png",
            f"{RUN_RESULTS}/plots/breakdown.png",
            f"{RUN_RESULTS}/plots/sensitivity.html",
        ]
    targets += [path for pattern in per_run_targets for path in per_run(pattern)]
    if config["export"]["pth"]:
        targets.append(f"{RESULTS}/model-int8.pth")
    if BUNDLE_IN_RUN:
        targets += [
            f"{BUNDLE}/README.txt",
            f"{RESULTS}/bundle_check.json",
            DEMO_EVALUATION,
            f"{RESULTS}/demo_evaluation.md",
        ]
    return targets


# The phone bundle (bundle.smk).
BUNDLE = f"{RESULTS}/bundle"
# The demo evaluation (demo.smk), which the bundle's README.txt and evaluation.md lead with.
DEMO_EVALUATION = f"{RESULTS}/demo_evaluation.json"
# The default target builds the bundle and the demo evaluation too where a phone runs the runtime.
BUNDLE_IN_RUN = config["bundle"]["default_target"] and SIMULATED.runs_on_phone


def evaluation_summary_inputs(wildcards=None):
    """evaluation.md's inputs: the export's evaluation, and the demo evaluation where the run makes one."""
    inputs = {"evaluation": f"{RESULTS}/evaluation.json"}
    if BUNDLE_IN_RUN:
        inputs["demo"] = DEMO_EVALUATION
    return inputs


def exported_variant_input(wildcards=None):
    """What says which variant the export came from: runtime.json when several may be exported, nothing when
    one is (so that jobs needing only the variant do not wait for the export). Refuses a runtime no phone
    runs before any job runs, as everything the phone bundle needs does."""
    runtime_json = bundle_runtime_json()
    return [runtime_json] if len(EXPORT_VARIANTS) > 1 else []


def bundle_runtime_json(wildcards=None):
    """runtime.json of the export; the bundle is refused before any job runs under a runtime no phone runs."""
    SIMULATED.require_phone(f"{CONFIG_SOURCE} (the bundle)")
    return f"{RESULTS}/runtime.json"
