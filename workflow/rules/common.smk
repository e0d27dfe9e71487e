# Configuration, validated once, and the paths every rule shares.
import sys
from pathlib import Path

sys.path.insert(0, str(Path(workflow.basedir) / "src"))

from shadowquant.config import validate_config
from shadowquant.download import dataset_cache_path
from shadowquant.errors import PipelineError
from shadowquant.stages import threshold_label

try:
    config.update(validate_config(config, source="config"))
except PipelineError as exc:
    sys.exit(f"error: {exc}")

NAME = config["model"]["name"]
RESULTS = f"results/{NAME}"
LOGS = f"logs/{NAME}"
BENCH = f"benchmarks/{NAME}"
MODEL_MANIFEST = f"resources/models/{NAME}/manifest.json"
PYDOC_CORPUS = "resources/datasets/builtin/pydoc.jsonl"
CHECKPOINTS = f"resources/checkpoints/{NAME}"
# One software environment for every rule (--use-conda); the same list as pyproject.toml.
CONDA_ENV = "../../environment.yml"
USES_GPU = 1 if config["device"].startswith("cuda") else 0

# The threshold and statistic the export uses (explicit values; the sweep adds "auto").
EXPORT_THRESHOLD = config["export"]["threshold"]
EXPORT_STATISTIC = config["statistic"]


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
        sys.exit(f"error: config key '{key}': dataset file '{source}' not found")
    return source


CALIBRATION_CORPUS = corpus_file(
    config["calibration"]["dataset"], "calibration.dataset"
)
# Download targets and the URLs they come from (rule download_dataset looks them up).
DOWNLOADS = {
    dataset_cache_path(src): (src, config["calibration"]["sha256"])
    for src in [config["calibration"]["dataset"]]
    if src.startswith("https://")
}


def model_mem_mb(wildcards, input, attempt):
    """Memory for a job that holds the model: its float32 size twice over plus headroom, more on retry."""
    import json

    params = json.loads(Path(input.manifest).read_text()).get("num_parameters", 0)
    return int((params * 4 * 2) / 2**20 + 2000) * attempt


def export_targets():
    targets = [
        f"{RESULTS}/model.mllm",
        f"{RESULTS}/model-int8.safetensors",
        f"{RESULTS}/act_scales.csv",
    ]
    if config["export"]["pth"]:
        targets.append(f"{RESULTS}/model-int8.pth")
    return targets


def default_targets():
    return ["model.mllm", *export_targets()]
