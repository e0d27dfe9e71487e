"""The package layout: no import cycles between modules, no private name imported across modules, every
module in the development guide's map, and the modules the Snakefile reads stay torch-free."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "shadowquant"


def module_name(path: Path) -> str:
    """Dotted name of a module file of the package (a package's __init__ is the package)."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported_names(path: Path) -> list[tuple[str, str]]:
    """(module, name) of every `from shadowquant... import name` in a file, function-local imports included;
    `import shadowquant.x` gives (shadowquant.x, '')."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "shadowquant":
            found += [(node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(alias.name, "") for alias in node.names if alias.name.startswith("shadowquant.")]
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports (`from pkg import module` counts as importing the module)."""
    known = modules()
    graph = {}
    for name, path in known.items():
        targets = set()
        for module, imported in imported_names(path):
            target = f"{module}.{imported}" if f"{module}.{imported}" in known else module
            if target in known and target != name:
                targets.add(target)
        graph[name] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_package_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_private_name_is_imported_across_modules():
    """A helper two modules share is public: `from shadowquant.x import _helper` hides a dependency."""
    crossings = [f"{name} imports {module}.{imported}"
                 for name, path in modules().items()
                 for module, imported in imported_names(path)
                 if imported.startswith("_") and module != name]
    scripts = [f"{path.name} imports {module}.{imported}"
               for path in sorted((ROOT / "workflow" / "scripts").glob("*.py"))
               for module, imported in imported_names(path) if imported.startswith("_")]
    assert crossings + scripts == []


def test_every_module_is_in_the_development_guides_map():
    """docs/development.md names every module by its path under src/shadowquant/ (a missing row fails)."""
    text = (ROOT / "docs" / "development.md").read_text(encoding="utf-8")
    listed = set(re.findall(r"`([\w/]+\.py)`", text))
    missing = [str(path.relative_to(PACKAGE)) for path in sorted(PACKAGE.rglob("*.py"))
               if str(path.relative_to(PACKAGE)) not in listed and path.name != "__init__.py"]
    assert missing == [], f"docs/development.md's module map lacks {', '.join(missing)}"


# The modules the Snakefile imports while it is parsed: a dry run must not wait for torch.
PARSE_TIME_MODULES = ["shadowquant.config", "shadowquant.runtimes.decision", "shadowquant.inputs.manifest", "shadowquant.evaluate.selection",
                      "shadowquant.inputs.download", "shadowquant.errors", "shadowquant.jsonfile", "shadowquant.model.families",
                      "shadowquant.inputs.model_source", "shadowquant.model.transform_support", "shadowquant.runtimes.profiles"]


@pytest.mark.parametrize("module", PARSE_TIME_MODULES)
def test_modules_read_at_parse_time_do_not_import_torch(module):
    code = f"import sys, {module}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", f"{module} imports torch"
