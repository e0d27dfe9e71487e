"""Reading a JSON object written by an earlier step, with one-line errors (torch-free)."""

from __future__ import annotations

import json
from pathlib import Path

from shadowquant.errors import PipelineError


def read_json_object(path: str | Path, what: str, remedy: str = "") -> dict:
    """The JSON object in `path`; every failure is one line naming the file, `what` it is, and `remedy`."""
    path = Path(path)
    tail = f"; {remedy}" if remedy else ""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PipelineError(f"{path}: {what} not found{tail}") from None
    except json.JSONDecodeError as exc:
        raise PipelineError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}){tail}") from None
    except (UnicodeDecodeError, IsADirectoryError, PermissionError) as exc:
        raise PipelineError(f"{path}: {what} is not readable ({type(exc).__name__}){tail}") from None
    if not isinstance(data, dict):
        raise PipelineError(f"{path}: expected a JSON object ({what}){tail}")
    return data
