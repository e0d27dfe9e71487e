# Configuration, validated once, and the paths every rule shares.
import sys
from pathlib import Path

sys.path.insert(0, str(Path(workflow.basedir) / "src"))

from shadowquant.config import validate_config
from shadowquant.download import dataset_cache_path
from shadowquant.errors import PipelineError
from shadowquant.sources import source_fingerprint
from shadowquant.stages import threshold_label

try:
    # Errors name the config files the keys came from (the default one and any --configfile).
    CONFIG_SOURCE = " + ".join(map(str, workflow.configfiles)) or "config"
    config.update(validate_config(config, source=CONFIG_SOURCE))
except PipelineError as exc:
    sys.exit(f"error: {exc}")

NAME = config["model"]["name"]
RESULTS = f"results/{NAME}"
LOGS = f"logs/{NAME}"
BENCH = f"benchmarks/{NAME}"
MODEL_MANIFEST = f"resources/models/{NAME}/manifest.json"
MODEL_DIR = f"resources/models/{NAME}/hf"
PYDOC_CORPUS = "resources/datasets/builtin/pydoc.jsonl"
CHECKPOINTS = f"resources/checkpoints/{NAME}"
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

# The threshold and statistic the export uses: explicit values, or "auto" (the sweep's selection).
EXPORT_THRESHOLD = config["export"]["threshold"]
EXPORT_STATISTIC = config["statistic"]
EXPORT_IS_AUTO = "auto" in (EXPORT_THRESHOLD, EXPORT_STATISTIC)
# Explicit export values are always swept too, so the evaluation can report them.
SWEEP_THRESHOLDS = sorted(
    {float(t) for t in config["sweep"]["thresholds"]}
    | ({float(EXPORT_THRESHOLD)} if EXPORT_THRESHOLD != "auto" else set())
)
SWEEP_STATISTICS = sorted(
    set(config["sweep"]["statistics"])
    | ({EXPORT_STATISTIC} if EXPORT_STATISTIC != "auto" else set())
)
SWEEP_POINTS = [
    f"{RESULTS}/sweep/{s}-t{threshold_label(t)}.json"
    for s in SWEEP_STATISTICS
    for t in SWEEP_THRESHOLDS
]


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

    params = json.loads(Path(input.manifest).read_text()).get("num_parameters", 0)
    return int((params * 4 * 2) / 2**20 + 2000) * attempt


def selection_input(wildcards=None):
    """The selection is an input of the export only when something is left to "auto"."""
    return [f"{RESULTS}/selection.json"] if EXPORT_IS_AUTO else []


def default_targets():
    targets = [
        "model.mllm",
        f"{RESULTS}/model.mllm",
        f"{RESULTS}/model-int8.safetensors",
        f"{RESULTS}/act_scales.csv",
        f"{RESULTS}/sweep.csv",
        f"{RESULTS}/selection.json",
        f"{RESULTS}/evaluation.json",
        f"{RESULTS}/evaluation.md",
        f"{RESULTS}/plots/sweep_threshold.png",
        f"{RESULTS}/plots/sweep_shadow.png",
        f"{RESULTS}/plots/outlier_ratios.png",
        f"{RESULTS}/evaluation.html",
    ]
    if config["export"]["pth"]:
        targets.append(f"{RESULTS}/model-int8.pth")
    return targets
