"""pyproject.toml and environment.yml list the same dependencies; the CLI entry point works."""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def _normalize(spec: str) -> str:
    name, rest = re.match(r"^([A-Za-z0-9_.\-]+)(.*)$", spec.strip()).groups()
    return name.lower().replace("_", "-") + rest.replace(" ", "")


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = {_normalize(s) for s in project["dependencies"]}
    for extra in project["optional-dependencies"].values():
        wanted |= {_normalize(s) for s in extra}
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    listed = {_normalize(s) for s in pip if not s.startswith("-e")}
    assert listed == wanted
    assert "torch==2.13.0" in wanted  # an open range pulls a multi-GB CUDA build


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
