"""Load and validate the pipeline configuration against its JSON schema."""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from shadowquant.errors import PipelineError


def schema() -> dict:
    text = resources.files("shadowquant").joinpath("config_schema.yaml").read_text()
    return yaml.safe_load(text)


def _fill_defaults(instance: dict, sch: dict) -> None:
    # jsonschema does not fill defaults; walk the (object-only) schema ourselves.
    for key, sub in sch.get("properties", {}).items():
        if key not in instance and "default" in sub:
            instance[key] = copy.deepcopy(sub["default"])
        if isinstance(instance.get(key), dict) and sub.get("type") == "object":
            _fill_defaults(instance[key], sub)


def _describe(error: jsonschema.ValidationError, sch: dict) -> str:
    where = ".".join(str(p) for p in error.absolute_path) or "<top level>"
    node = sch
    for part in error.absolute_path:
        if isinstance(part, str):
            node = node.get("properties", {}).get(part, {})
        else:
            node = node.get("items", {})
    if error.validator == "additionalProperties":
        allowed = ", ".join(sorted(node.get("properties", {})))
        extra = sorted(set(error.instance) - set(node.get("properties", {})))
        key = ".".join([*map(str, error.absolute_path), extra[0]]) if extra else where
        return f"unknown config key '{key}'; valid keys here: {allowed}"
    hint = node.get("description", "")
    if "enum" in node:
        hint = "valid values: " + ", ".join("null" if v is None else str(v) for v in node["enum"])
    return f"config key '{where}' = {error.instance!r}: {error.message}" + (f" ({hint})" if hint else "")


def validate_config(config: dict[str, Any], source: str = "config") -> dict[str, Any]:
    """Return a validated copy of `config` with every default filled in."""
    sch = schema()
    cfg = copy.deepcopy(config or {})
    if not isinstance(cfg, dict):
        raise PipelineError(f"{source}: the config must be a mapping of keys, got {type(cfg).__name__}")
    _fill_defaults(cfg, sch)
    validator = jsonschema.Draft202012Validator(sch)
    errors = sorted(validator.iter_errors(cfg), key=lambda e: (len(e.absolute_path), list(map(str, e.absolute_path))))
    if errors:
        raise PipelineError(f"{source}: {_describe(errors[0], sch)}")
    return cfg


def load_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise PipelineError(f"{path}: config file not found") from None
    except yaml.YAMLError as exc:
        raise PipelineError(f"{path}: not valid YAML ({exc})") from None
    return validate_config(data, str(path))
