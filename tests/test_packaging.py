"""Packaging: pyproject.toml and environment.yml list the same dependencies, torch as a range
there and pinned only in the install command; the CLI entry point works."""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
TESTED_TORCH = "torch==2.13.0"


def _normalize(spec: str) -> str:
    name, rest = re.match(r"^([A-Za-z0-9_.\-]+)(.*)$", spec.strip()).groups()
    return name.lower().replace("_", "-") + rest.replace(" ", "")


def _pyproject_specs() -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    specs = {_normalize(s) for s in project["dependencies"]}
    for extra in project["optional-dependencies"].values():
        specs |= {_normalize(s) for s in extra}
    return specs


def _environment_specs() -> set[str]:
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    return {_normalize(s) for s in pip if not s.startswith("-e")}


def _torch_spec(specs: set[str]) -> str:
    (spec,) = [s for s in specs if re.match(r"torch\b(?![-_.\w])", s)]
    return spec


def test_environment_yml_matches_pyproject():
    assert _environment_specs() == _pyproject_specs()


def test_torch_is_a_range_in_the_package_metadata():
    """A pin there would make `pip install` replace a GPU user's CUDA torch."""
    for where, specs in [("pyproject.toml", _pyproject_specs()), ("environment.yml", _environment_specs())]:
        spec = _torch_spec(specs)
        assert spec.startswith("torch>=") and "==" not in spec, f"{where}: {spec} is not an open range"


def test_the_install_commands_pin_the_tested_torch():
    """The pin lives in the install command: the Makefile's (which CI runs) and the README's."""
    makefile = (REPO / "Makefile").read_text()
    installs = re.findall(r"^\t.*pip install .*-e .*$", makefile, re.MULTILINE)
    assert installs and all(TESTED_TORCH in line.split() for line in installs), installs
    readme_installs = re.findall(r"pip install [^`\n]*-e [^`\n]*", (REPO / "README.md").read_text())
    assert all(TESTED_TORCH in line.split() for line in readme_installs), readme_installs
    ci = (REPO / ".ci" / "run").read_text()
    assert "make test" in ci  # CI installs through the Makefile's setup


def test_cli_help_and_config_validation(tmp_path):
    out = subprocess.run([sys.executable, "-m", "shadowquant", "validate-config", str(REPO / "config/config.yaml")],
                         capture_output=True, text=True, check=True).stdout
    assert "budget: 0.05" in out and "point: auto" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text("calibration:\n  num_samples: 0\n")
    proc = subprocess.run([sys.executable, "-m", "shadowquant", "validate-config", str(bad)],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "calibration.num_samples" in proc.stderr
