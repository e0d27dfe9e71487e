"""The model manifest written by fetch_model (torch-free: the Snakefile reads it while it is parsed)."""

from __future__ import annotations

import json
from pathlib import Path

from shadowquant.errors import PipelineError

# Sources that are downloaded; anything else is a local model directory or .gguf file.
REMOTE_PREFIXES = ("hf:", "pypi:")


def read_manifest(path: str | Path) -> dict:
    """`{"path", "family", "source", "num_parameters", "trust_remote_code", ...}` of a fetched model."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PipelineError(f"{path}: model manifest not found; run the fetch_model rule first") from None
    except json.JSONDecodeError as exc:
        raise PipelineError(f"{path}: model manifest is not valid JSON ({exc.msg}); delete it to refetch") from None


def local_source_files(source: str) -> list[str]:
    """Every file of a local model source (a directory, recursively, or a .gguf file); [] for remote sources.

    The workflow declares them as inputs of fetch_model, so editing a local model in place reruns the
    fetch and everything after it. A missing path is left to fetch_model, which names it in its error.
    """
    if source.startswith(REMOTE_PREFIXES):
        return []
    path = Path(source).expanduser()
    if path.is_file():
        return [str(path)]
    if path.is_dir():
        return sorted(str(p) for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    return []
