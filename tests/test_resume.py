"""Kill -9 of a running pipeline during profiling, then a rerun that resumes from the checkpoint.

The whole snakemake process group is SIGKILLed once the profile job has written a checkpoint
(first or a later one). The rerun must continue from that checkpoint, not start over, and
produce the same act_scales.json, byte for byte, as an uninterrupted run.

What a rerun needs after snakemake itself was killed: `snakemake --unlock` (the lock files in
.snakemake/locks stay behind). Incomplete markers need nothing: the profile outputs are written
atomically, so none exists, and the workflow profile sets rerun-incomplete anyway.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from shadowquant.inputs.corpus import pydoc_records, write_jsonl
from workflow_helpers import snakemake, snakemake_command, snakemake_env, write_config

pytestmark = pytest.mark.slow

NAME = "tiny-resume"
# 32 batches and a checkpoint every 2 of them: the profiling loop of a fresh job lasts seconds
# (more under load), plenty to be killed between two checkpoints by a poll every 2 ms.
CALIBRATION = {"num_samples": 64, "seq_len": 256, "batch_size": 2, "checkpoint_every": 4}
NUM_BATCHES = 32
TARGET = f"results/{NAME}/act_scales.json"
STARTUP_TIMEOUT_S = 300
KILLED_OUTPUT = "snakemake-killed.out"
POINTER = f"resources/checkpoints/{NAME}/profile/checkpoint.json"


@pytest.fixture(scope="module")
def long_text_corpus(tmp_path_factory) -> Path:
    """pydoc records of 1,500+ characters: every sample fills the 256-token window."""
    path = tmp_path_factory.mktemp("resume_corpus") / "corpus.jsonl"
    write_jsonl(path, [text for text in pydoc_records() if len(text) >= 1500])
    return path


@pytest.fixture(scope="module")
def resume_config(tiny_model_dir, long_text_corpus) -> dict:
    return {
        "model": {"source": str(tiny_model_dir("llama")), "name": NAME},
        "calibration": {"dataset": str(long_text_corpus), **CALIBRATION},
        "device": "cpu",
        "transform": {"variants": ["none"]},
    }


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory, resume_config) -> Path:
    """Working directory of a run that was never interrupted."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    snakemake(workdir, write_config(workdir, resume_config), TARGET)
    return workdir


def start_snakemake(workdir: Path, configfile: Path, *args: str) -> subprocess.Popen:
    """snakemake (as workflow_helpers.snakemake) in its own process group, output to KILLED_OUTPUT."""
    cmd = snakemake_command(workdir, configfile, *args)
    env = snakemake_env()
    # A file, not a pipe: nobody reads while we wait, and a full pipe would stall snakemake.
    with open(workdir / KILLED_OUTPUT, "wb") as out:
        return subprocess.Popen(cmd, cwd=workdir, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)


def read_pointer(pointer: Path) -> dict | None:
    try:
        return json.loads(pointer.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def kill_after_checkpoint(proc: subprocess.Popen, workdir: Path, min_batches: int) -> int:
    """SIGKILL snakemake and its jobs once the checkpoint covers `min_batches`; return what it covers."""
    pointer = workdir / POINTER
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    try:
        while True:
            meta = read_pointer(pointer)
            if meta is not None and meta["batches_done"] >= min_batches:
                os.killpg(proc.pid, signal.SIGKILL)  # the profile job is in snakemake's process group
                break
            if proc.poll() is not None:
                output = (workdir / KILLED_OUTPUT).read_text(errors="replace")
                pytest.fail(f"snakemake ended (rc {proc.returncode}) before a checkpoint of {min_batches} "
                            f"batches was seen:\n{output[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"no checkpoint of {min_batches} batches within {STARTUP_TIMEOUT_S} s")
            time.sleep(0.002)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    # Read again: a newer checkpoint may have landed between the read and the kill.
    meta = read_pointer(pointer)
    if meta is None:
        pytest.fail("the profile job completed (and removed its checkpoint) before the kill landed")
    return meta["batches_done"]


@pytest.mark.parametrize("min_batches", [2, NUM_BATCHES // 2], ids=["first-checkpoint", "later-checkpoint"])
def test_killed_profiling_resumes_and_matches_an_uninterrupted_run(min_batches, uninterrupted_run, resume_config,
                                                                  tmp_path):
    # The reference run's stage 1 outputs (mtimes kept), so the killed run goes straight to profiling.
    shutil.copytree(uninterrupted_run, tmp_path, dirs_exist_ok=True, symlinks=True,
                    ignore=shutil.ignore_patterns(".snakemake", "logs", "benchmarks", "act_scales.*"))
    config = write_config(tmp_path, resume_config)

    proc = start_snakemake(tmp_path, config, TARGET)
    done = kill_after_checkpoint(proc, tmp_path, min_batches)
    assert min_batches <= done < NUM_BATCHES
    # Nothing complete-looking is left behind.
    assert not (tmp_path / TARGET).exists()
    assert not (tmp_path / f"results/{NAME}/act_scales.csv").exists()

    snakemake(tmp_path, config, "--unlock")  # the killed snakemake left its locks
    snakemake(tmp_path, config, TARGET)

    # Snakemake empties a job's log before running it: this is the rerun's log alone.
    rerun_log = (tmp_path / f"logs/{NAME}/profile.log").read_text(errors="replace")
    assert f"resuming profiling after {done} of {NUM_BATCHES} batches" in rerun_log
    for rel in (TARGET, f"results/{NAME}/act_scales.csv"):
        assert (tmp_path / rel).read_bytes() == (uninterrupted_run / rel).read_bytes(), rel
    assert not (tmp_path / POINTER).parent.exists(), "the checkpoint should be removed after a complete run"
