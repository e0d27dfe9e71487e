"""Running the real Snakefile through the snakemake CLI in a scratch working directory."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).parent / "snakemake"


def apply_overrides(cfg: dict, overrides: dict) -> dict:
    """Set `section.key=value` (or top-level `key=value`) overrides on a config dict."""
    for key, value in overrides.items():
        section, _, leaf = key.partition(".")
        if leaf:
            cfg.setdefault(section, {})[leaf] = value
        else:
            cfg[section] = value
    return cfg


def tiny_config(model_dir, corpus, name: str, **overrides) -> dict:
    """A small valid config for a tiny test model: a few short samples, a two-point sweep, CPU.

    `section.key=value` overrides (e.g. `**{"calibration.num_samples": 4}`) adjust it per test.
    """
    cfg = {
        "model": {"source": str(model_dir), "name": name},
        "calibration": {"dataset": str(corpus), "num_samples": 6, "seq_len": 32, "batch_size": 3,
                        "checkpoint_every": 0},
        # A small sweep keeps the workflow fast: two thresholds, one sensitivity point (one shadow layer under
        # the default qwen-npu runtime, which always adds absmax-l0; ideal adds t = 1 with the breakdown), auto
        # selection; the sensitivity is measured on two short records.
        # The weight range is fixed ('auto' adds a job): the whole-workflow llama run and the transform test
        # measure it.
        "sweep": {"thresholds": [4, 10000000], "shadow_sides": [2], "shadow_layers": [1], "clip_scales": ["max"],
                  "bootstrap": 50, "weight_range": "max"},
        "sensitivity": {"num_samples": 2, "seq_len": 16, "measure_top": 4, "measure_samples": 1},
        "evaluation": {"num_samples": 8, "seq_len": 24, "max_new_tokens": 4, "prompts": ["The list"]},
        "device": "cpu",
        # Explicit, so that run directories and points do not depend on the family ('auto', the default, is
        # what test_every_family_runs_the_whole_workflow runs).
        "transform": {"variants": ["none"]},
        "runtime": {"profile": "qwen-npu"},
        # The default target stops at the model file and its evaluation; the tests that want the phone bundle
        # (and the demo evaluation) ask for it.
        "bundle": {"default_target": False},
    }
    return apply_overrides(cfg, overrides)


def write_config(workdir: Path, config: dict, name: str = "test-config.yaml") -> Path:
    path = workdir / name
    path.write_text(yaml.safe_dump(config))
    return path


def snakemake_command(workdir: Path, configfile: Path, *args: str, cores: int = 2) -> list[str]:
    """The snakemake command line that runs the repository's workflow in `workdir`."""
    return [str(SNAKEMAKE), "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
            "--configfile", str(configfile), "--cores", str(cores), *args]


def snakemake_env(**extra: str) -> dict[str, str]:
    """The environment of a snakemake run: this interpreter's bin/ first on PATH, plus `extra`."""
    return dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}", **extra)


def snakemake(workdir: Path, configfile: Path, *args: str, check: bool = True, timeout: int = 600):
    """Run snakemake on the repository's workflow in `workdir`; returns the CompletedProcess."""
    proc = subprocess.run(snakemake_command(workdir, configfile, *args), cwd=workdir, capture_output=True, text=True,
                          timeout=timeout, env=snakemake_env())
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def planned_jobs(proc) -> dict[str, int]:
    """Rule -> job count from a dry run's 'Job stats' table; {} only when snakemake says nothing is to be done.

    Raises when the output has neither, so a change of snakemake's output format fails loudly instead of
    looking like "no jobs planned".
    """
    text = proc.stdout + proc.stderr
    if "Job stats:" not in text:
        if "Nothing to be done" in text:
            return {}
        raise AssertionError(f"dry-run output has no 'Job stats' table and no 'Nothing to be done':\n{text[-3000:]}")
    jobs = {}
    table = text.split("Job stats:", 1)[1]
    for line in table.splitlines()[3:]:
        m = re.match(r"^(\S+)\s+(\d+)$", line.strip())
        if not m:
            break
        if m.group(1) != "total":
            jobs[m.group(1)] = int(m.group(2))
    if not jobs:
        raise AssertionError(f"could not parse the 'Job stats' table:\n{table[:2000]}")
    return jobs
