"""The configuration reference (docs/configuration.md), rendered from the config schema.

Regenerate:  python -m shadowquant.config_reference > docs/configuration.md
Check:       python -m shadowquant.config_reference --check docs/configuration.md

Torch-free: it reads only the schema, so docs and tests can run it cheaply.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from shadowquant.config import schema as load_schema

SCHEMA_FILE = "src/shadowquant/config_schema.yaml"
OUTPUT_FILE = "docs/configuration.md"
REGENERATE = f"python -m shadowquant.config_reference > {OUTPUT_FILE}"
COLUMNS = ("key", "type", "default", "allowed values", "description")


def _value(value) -> str:
    """A schema value as it would be written in config.yaml (YAML flow style)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key}: {_value(item)}" for key, item in value.items()) + "}"
    if isinstance(value, str) and _needs_quotes(value):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return str(value)


def _needs_quotes(text: str) -> bool:
    """Whether YAML would read `text` unquoted as something else (null, a number, a mapping, ...)."""
    if any(c in text for c in ",[]{}#"):  # these end or nest a flow-style list item
        return True
    try:
        return yaml.safe_load(text) != text
    except yaml.YAMLError:
        return True


def _code(text: str) -> str:
    return f"`{text}`"


def _type_words(node: dict) -> str:
    """'integer', 'string or null', 'list of number', 'number or `auto`'."""
    if "anyOf" in node:
        return " or ".join(_type_words(option) for option in node["anyOf"])
    if "const" in node:
        return _code(_value(node["const"]))
    types = node.get("type")
    if types is None and "enum" in node:
        # An enum without a declared type: name the types of its values.
        kinds = {"null" if v is None else "boolean" if isinstance(v, bool) else
                 "integer" if isinstance(v, int) else "number" if isinstance(v, float) else "string"
                 for v in node["enum"]}
        types = sorted(kinds, key=lambda k: (k == "null", k))
    types = [types] if isinstance(types, str) else list(types or [])
    words = []
    for kind in types:
        if kind == "array":
            items = node.get("items")
            words.append(f"list of {_type_words(items)}" if items else "list")
        elif kind == "object":
            words.append("mapping")
        else:
            words.append(kind)
    return " or ".join(words) or "any"


def _allowed(node: dict) -> str:
    """The constraints of a node in words: enum values, bounds, patterns, list lengths."""
    if "anyOf" in node:
        return "; or ".join(part for part in (_allowed(option) for option in node["anyOf"]) if part)
    if "const" in node:
        return _code(_value(node["const"]))
    parts = []
    if "enum" in node:
        parts.append(", ".join(_code(_value(v)) for v in node["enum"]))
    for key, sign in (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="), ("exclusiveMaximum", "<")):
        if key in node:
            parts.append(f"{sign} {_value(node[key])}")
    if "pattern" in node:
        parts.append(f"matches {_code(node['pattern'])}")
    if node.get("minLength"):
        parts.append("non-empty" if node["minLength"] == 1 else f"at least {node['minLength']} characters")
    if node.get("minItems"):
        parts.append("non-empty" if node["minItems"] == 1 else f"at least {node['minItems']} items")
    if "maxItems" in node:
        parts.append(f"at most {node['maxItems']} items")
    if "items" in node:
        items = _allowed(node["items"])
        if items:
            parts.append(f"each item {items}")
    return ", ".join(parts)


def _cell(text: str) -> str:
    """Table cell text: one line, pipes escaped (GitHub tables honour the escape inside code spans too)."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _rows(prefix: str, node: dict) -> list[tuple[str, ...]]:
    """One row per configurable key under `node` (nested mappings flattened to dotted keys)."""
    properties = node.get("properties")
    if node.get("type") == "object" and properties:
        rows = []
        for key, sub in properties.items():
            rows.extend(_rows(f"{prefix}.{key}" if prefix else key, sub))
        return rows
    description = node.get("description", "")
    if node.get("deprecated"):
        description = f"Deprecated. {description}"
    default = _code(_value(node["default"])) if "default" in node else "(required)"
    return [(_code(prefix), _type_words(node), default, _allowed(node), description)]


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(cell) for cell in row) + " |" for row in rows]
    return lines


def render_reference(schema: dict | None = None) -> str:
    """The markdown reference: one section and table per top-level key of the schema."""
    schema = load_schema() if schema is None else schema
    lines = [
        "<!-- Generated from " + SCHEMA_FILE + "; do not edit by hand. Regenerate with:",
        "     " + REGENERATE + " -->",
        "",
        "# Configuration reference",
        "",
    ]
    if schema.get("description"):
        lines += [" ".join(schema["description"].split()), ""]
    lines += [
        f"Every key below is validated against `{SCHEMA_FILE}` before any job runs; an unknown key, a wrong",
        "type or an out-of-range value stops the run with one line naming the key and what is valid.",
        "`python -m shadowquant validate-config FILE` prints a config with every default filled in.",
        "How the sections fit together, and how to run another model: [config/README.md](../config/README.md).",
        "",
    ]
    for key, node in schema.get("properties", {}).items():
        lines.append(f"## `{key}`")
        lines.append("")
        if node.get("type") == "object" and node.get("properties") and node.get("description"):
            lines += [" ".join(node["description"].split()), ""]
        lines += _table(_rows(key, node))
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shadowquant.config_reference",
                                     description="Print the configuration reference rendered from the schema.")
    parser.add_argument("--check", metavar="FILE",
                        help="exit 1 with a one-line message if FILE differs from the rendered reference")
    args = parser.parse_args(argv)
    text = render_reference()
    if args.check is None:
        sys.stdout.write(text)
        return 0
    path = Path(args.check)
    try:
        current = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        print(f"error: {path}: not found; generate it with: {REGENERATE}", file=sys.stderr)
        return 1
    if current != text:
        print(f"error: {path} is out of date with {SCHEMA_FILE}; regenerate it with: {REGENERATE}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
