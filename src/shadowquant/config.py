"""Load and validate the pipeline configuration against its JSON schema."""

from __future__ import annotations

import copy
import math
import sys
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from shadowquant.errors import PipelineError


def schema() -> dict:
    """The config schema; model.type's and runtime.profile's valid values come from the family registry and
    the profile table, not the YAML."""
    from shadowquant.model.families import FAMILIES
    from shadowquant.runtimes.profiles import PROFILE_NAMES

    text = resources.files("shadowquant").joinpath("config_schema.yaml").read_text()
    loaded = yaml.safe_load(text)
    loaded["properties"]["model"]["properties"]["type"]["enum"] = [None, *FAMILIES]
    loaded["properties"]["runtime"]["properties"]["profile"]["enum"] = ["auto", *PROFILE_NAMES]
    return loaded


def _fill_defaults(instance: dict, sch: dict) -> None:
    # jsonschema does not fill defaults; walk the (object-only) schema ourselves.
    for key, sub in sch.get("properties", {}).items():
        if key not in instance and "default" in sub:
            instance[key] = copy.deepcopy(sub["default"])
        if isinstance(instance.get(key), dict) and sub.get("type") == "object":
            _fill_defaults(instance[key], sub)


def _node_at(sch: dict, path) -> dict:
    node = sch
    for part in path:
        node = node.get("properties", {}).get(part, {}) if isinstance(part, str) else node.get("items", {})
    return node


def _key_name(path) -> str:
    """'sweep.thresholds[1]' for the path ('sweep', 'thresholds', 1)."""
    name = ""
    for part in path:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    return name or "<top level>"


def _expected(node: dict) -> str:
    """What a schema node admits, in words: 'an integer >= 1', 'one of signed, absmax, auto', ..."""
    if "enum" in node:
        return "one of " + ", ".join("null" if v is None else str(v) for v in node["enum"])
    if "const" in node:
        return repr(node["const"])
    if "anyOf" in node:
        return " or ".join(_expected(option) for option in node["anyOf"])
    types = node.get("type", [])
    types = [types] if isinstance(types, str) else list(types)
    words = {"integer": "an integer", "number": "a number", "string": "a string", "boolean": "true or false",
             "array": "a list", "object": "a mapping of keys", "null": "null"}
    bounds = []
    if "minimum" in node:
        bounds.append(f">= {node['minimum']}")
    if "exclusiveMinimum" in node:
        bounds.append(f"> {node['exclusiveMinimum']}")
    if "maximum" in node:
        bounds.append(f"<= {node['maximum']}")
    text = " or ".join(words.get(t, t) for t in types) or "a value"
    if bounds:
        text += " " + " and ".join(bounds)
    if "pattern" in node:
        text += f" matching {node['pattern']}"
    if "array" in types:
        if node.get("minItems"):
            text = "a non-empty list"
        if "items" in node:
            text += " of " + _expected(node["items"]).replace("an integer", "integers").replace("a number", "numbers")
    return text


def _describe(error: jsonschema.ValidationError, sch: dict) -> str:
    path = list(error.absolute_path)
    node = _node_at(sch, path)
    if error.validator == "additionalProperties":
        allowed = ", ".join(sorted(node.get("properties", {})))
        extra = sorted(set(error.instance) - set(node.get("properties", {})))
        key = _key_name([*path, extra[0]]) if extra else _key_name(path)
        return f"unknown config key '{key}'; valid keys here: {allowed}"
    # An item of a list is described by its list (e.g. sweep.thresholds: 'Thresholds evaluated ...').
    described = node if "description" in node or not path else _node_at(sch, path[:-1])
    hint = " ".join(described.get("description", "").split()).rstrip(".")
    return (f"config key '{_key_name(path)}' = {error.instance!r} is not valid: expected {_expected(node)}"
            + (f" ({hint})" if hint else ""))


def _non_finite_number(value, path=()) -> tuple[tuple, float] | None:
    """The path and value of the first NaN or infinite number (YAML .nan / .inf), which JSON schema
    lets through."""
    if isinstance(value, float) and not math.isfinite(value):
        return path, value
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = _non_finite_number(item, (*path, key))
        if found is not None:
            return found
    return None


def _threshold_text(value) -> str:
    value = float(value)
    return str(int(value)) if value.is_integer() else repr(value)


def migrate_deprecated(cfg: dict[str, Any], source: str = "config") -> list[str]:
    """Rewrite keys of earlier versions in place into today's; returns one deprecation message per key.

    - top-level `statistic` and `export.threshold` -> `export.point` ('<statistic>-t<threshold>');
      a statistic alone restricts `sweep.statistics` to it (the sweep then chooses the point).
    - `sweep.max_accuracy_drop` -> `sweep.budget` (same number; for `metric: perplexity` the budget is
      now a relative increase).
    - `transform.steps` (one transform) -> `transform.variants` (each variant swept, the selection chooses).
    """
    messages = []
    export = cfg.get("export") if isinstance(cfg.get("export"), dict) else None
    statistic = cfg.pop("statistic", "auto")
    threshold = export.pop("threshold", "auto") if export is not None else "auto"
    if statistic != "auto" or threshold != "auto":
        if threshold != "auto" and statistic == "auto":
            raise PipelineError(f"{source}: config key 'export.threshold' is deprecated and needs its statistic; "
                                f"set export.point to 'absmax-t{_threshold_text(threshold)}' or "
                                f"'signed-t{_threshold_text(threshold)}' instead")
        if statistic not in ("signed", "absmax"):
            raise PipelineError(f"{source}: config key 'statistic' = {statistic!r} is not valid: expected one of "
                                "signed, absmax, auto (deprecated: use export.point or sweep.statistics)")
        if threshold != "auto":
            if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold > 0:
                raise PipelineError(f"{source}: config key 'export.threshold' = {threshold!r} is not valid: "
                                    "expected a number > 0 (deprecated: use export.point)")
            point = f"{statistic}-t{_threshold_text(threshold)}"
            cfg.setdefault("export", {})["point"] = point
            messages.append(f"config keys 'statistic' and 'export.threshold' are deprecated; "
                            f"use export.point: {point}")
        else:
            cfg.setdefault("sweep", {})["statistics"] = [statistic]
            messages.append(f"config key 'statistic' is deprecated; use sweep.statistics: [{statistic}] "
                            "(or export.point for one point)")
    sweep = cfg.get("sweep") if isinstance(cfg.get("sweep"), dict) else None
    if sweep is not None and "max_accuracy_drop" in sweep:
        drop = sweep.pop("max_accuracy_drop")
        sweep.setdefault("budget", drop)
        messages.append("config key 'sweep.max_accuracy_drop' is deprecated; use sweep.budget (for metric "
                        "perplexity it is a relative increase: 0.05 = 5 % over float)")
    transform = cfg.get("transform") if isinstance(cfg.get("transform"), dict) else None
    if transform is not None and "steps" in transform:
        steps = transform.pop("steps")
        if not isinstance(steps, list) or not all(isinstance(step, str) for step in steps):
            raise PipelineError(f"{source}: config key 'transform.steps' = {steps!r} is not valid: expected a list "
                                "of rotate, equalize, smooth (deprecated: use transform.variants)")
        variant = "+".join(steps) or "none"
        transform.setdefault("variants", [variant])
        messages.append(f"config key 'transform.steps' is deprecated; use transform.variants: [{variant}]")
    return messages


TRANSFORM_ORDER = ("rotate", "equalize", "smooth")
# The value of runtime.profile and transform.variants that lets the model's family decide (resolve_auto).
AUTO = "auto"


def _check_transform_variants(cfg: dict[str, Any], source: str) -> None:
    """Each variant's steps in the fixed order, each at most once ('none' stands alone); an explicit export
    names its variant when there are several."""
    variants = cfg["transform"]["variants"]
    if variants == AUTO:  # checked once resolve_auto has chosen the variant
        return
    export = cfg["export"]
    if export["transform"] is not None and export["transform"] not in variants:
        raise PipelineError(f"{source}: config key 'export.transform' = {export['transform']!r} is not valid: "
                            f"expected one of transform.variants ({', '.join(variants)}) or null")
    if export["point"] != "auto" and export["transform"] is None and len(variants) > 1:
        raise PipelineError(f"{source}: config key 'export.transform' is needed: export.point is explicit and "
                            f"{len(variants)} transform variants are swept; set it to one of {', '.join(variants)}")
    for variant in variants:
        if variant == "none":
            continue
        steps = variant.split("+")
        ordered = [step for step in TRANSFORM_ORDER if step in steps]
        if steps != ordered:
            raise PipelineError(f"{source}: config key 'transform.variants' item {variant!r} is not valid: steps are "
                                f"applied in the order rotate, equalize, smooth, each once; write {'+'.join(ordered)!r}")


def validate_config(config: dict[str, Any], source: str = "config") -> dict[str, Any]:
    """Return a validated copy of `config` with every default filled in (deprecated keys migrated, with a
    warning on stderr)."""
    sch = schema()
    cfg = copy.deepcopy(config or {})
    if not isinstance(cfg, dict):
        raise PipelineError(f"{source}: the config must be a mapping of keys, got {type(cfg).__name__}")
    for message in migrate_deprecated(cfg, source):
        print(f"warning: {source}: {message}", file=sys.stderr)
    _fill_defaults(cfg, sch)
    validator = jsonschema.Draft202012Validator(sch)
    errors = sorted(validator.iter_errors(cfg), key=lambda e: (len(e.absolute_path), list(map(str, e.absolute_path))))
    if errors:
        raise PipelineError(f"{source}: {_describe(errors[0], sch)}")
    bad = _non_finite_number(cfg)
    if bad is not None:
        raise PipelineError(f"{source}: config key '{_key_name(bad[0])}' = {bad[1]!r} is not valid: "
                            "expected a finite number")
    _check_transform_variants(cfg, source)
    _check_runtime(cfg, source)
    _force_npu_dtype(cfg, source)
    return cfg


# The dtype every stage of a run under an NPU profile loads the model in (config key `dtype`).
NPU_DTYPE = "float32"


def _force_npu_dtype(cfg: dict[str, Any], source: str) -> None:
    """Under an NPU runtime profile the model is loaded in float32 on every device: the simulation reproduces
    the phone's integer, float16 and float32 arithmetic on top of the float32 model, and `dtype: auto`
    (bfloat16 on CUDA) or an explicit bfloat16/float16 would simulate another model. Says so on stderr."""
    name = cfg["runtime"]["profile"]
    if name in (AUTO, "ideal") or cfg.get("dtype") in (NPU_DTYPE, "fp32"):
        return
    print(f"shadowquant: dtype {cfg.get('dtype')} -> {NPU_DTYPE}: runtime.profile {name} is simulated on the "
          f"float32 model on every device ({source})", file=sys.stderr)
    cfg["dtype"] = NPU_DTYPE


def _check_runtime(cfg: dict[str, Any], source: str) -> None:
    """Points and statistics that the chosen runtime profile cannot run fail here, before any work."""
    from shadowquant.runtimes import get_runtime

    name = cfg["runtime"]["profile"]
    if name == AUTO:  # checked once resolve_auto has chosen the profile
        return
    try:
        runtime = get_runtime(name, cfg["model"]["type"])
    except PipelineError as exc:
        raise PipelineError(f"{source}: {exc}") from None
    runtime.check_config(cfg["sweep"]["statistics"], cfg["export"]["point"], source)


def uses_auto(cfg: dict[str, Any]) -> bool:
    """Whether runtime.profile or transform.variants waits for the model's family (resolve_auto)."""
    return cfg["runtime"]["profile"] == AUTO or cfg["transform"]["variants"] == AUTO


def resolve_auto(cfg: dict[str, Any], info, source: str = "config") -> tuple[dict[str, Any], dict[str, dict]]:
    """The validated config with 'auto' runtime.profile and transform.variants replaced by the choice for
    the model `info` (model_source.SourceInfo), and {key: {"value", "reason", "family_from"}} per choice
    made (`family_from`: where the family was read; it differs before and after the fetch).

    runtime.profile: qwen-npu where mllm has an NPU model for the family (LLaMA-shaped), else ideal.
    transform.variants: the best exact variant of the model (transform_support.auto_variant)."""
    from shadowquant.runtimes.profiles import DEFAULT_PROFILE, IDEAL, get_profile
    from shadowquant.model.transform_support import auto_variant

    cfg = copy.deepcopy(cfg)
    choices: dict[str, dict] = {}
    family = info.family
    if cfg["runtime"]["profile"] == AUTO:
        npu = get_profile(DEFAULT_PROFILE)
        unfit = _npu_unfit(info.config, npu) if family in npu.families else None
        if family in npu.families and unfit is None:
            profile, reason = DEFAULT_PROFILE, (f"family {family}: mllm's Qwen NPU model runs LLaMA-shaped models; "
                                                f"its float32-bias ('-rotated') configs load in mllm v1")
        elif unfit is not None:
            profile, reason = IDEAL, f"family {family}, but mllm's Qwen NPU model cannot run this model: {unfit}"
        else:
            profile, reason = IDEAL, (f"family {family}: mllm has no NPU model for it (the NPU profiles run "
                                      f"{'/'.join(npu.families)}); the idealized W8A8 is simulated")
        cfg["runtime"]["profile"] = profile
        choices["runtime.profile"] = {"value": profile, "reason": reason}
    if cfg["transform"]["variants"] == AUTO:
        variant, reason = auto_variant(family, info.config)
        cfg["transform"]["variants"] = [variant]
        choices["transform.variants"] = {"value": variant, "reason": reason}
    # Where the family was read changes once the model is fetched; it is kept apart from the reason,
    # which is a rule parameter (a changed parameter would rerun the transform and all after it).
    for choice in choices.values():
        choice["family_from"] = info.origin or "model.type"
    _check_transform_variants(cfg, source)
    _check_runtime(cfg, source)
    _force_npu_dtype(cfg, source)
    return cfg, choices


def _npu_unfit(config_json: dict[str, Any] | None, profile) -> str | None:
    """Why mllm's NPU model config cannot represent the model of `config_json` (runtimes.profiles.cpp_config's
    refusal), or None (also when the config is not readable before the fetch)."""
    from types import SimpleNamespace

    from shadowquant.runtimes.profiles import IDEAL_HINT, cpp_config

    if not config_json or "hidden_size" not in config_json:  # not (yet) a whole config.json
        return None
    try:
        cpp_config(SimpleNamespace(**config_json), profile, tied=bool(config_json.get("tie_word_embeddings")))
    except PipelineError as exc:
        return str(exc).removesuffix(IDEAL_HINT)
    return None


def choice_params(choices: dict[str, dict]) -> dict[str, dict]:
    """The auto choices as rule parameters: value and reason, without where the family was read."""
    return {key: {"value": c["value"], "reason": c["reason"]} for key, c in choices.items()}


def load_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise PipelineError(f"{path}: config file not found") from None
    except yaml.YAMLError as exc:
        raise PipelineError(f"{path}: not valid YAML ({exc})") from None
    return validate_config(data, str(path))
