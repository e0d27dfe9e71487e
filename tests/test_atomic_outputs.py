"""A job killed while it writes never leaves an output that looks complete, and a rerun produces it.

Stages run in a subprocess that is SIGKILLed at the worst moment: after a temporary file has
been written in full and just before it would be renamed onto the output (or, through
snakemake, in the middle of writing the mllm file). Afterwards the outputs must be absent and
only hidden temporary files may remain.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from shadowquant import stages
from shadowquant.export.inspector import inspect_mllm
from workflow_helpers import snakemake_command, snakemake_env, write_config

# Runs one stage with shadowquant.atomic's rename replaced by "say where, then hang".
HANG_BEFORE_RENAME = textwrap.dedent(
    """
    import json, os, sys, time
    from shadowquant import atomic, stages

    ready, stage, kwargs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])

    class RenameHangs:
        def __getattr__(self, name):
            return getattr(os, name)

        def replace(self, src, dst):
            with open(ready + ".part", "w") as out:
                json.dump({"temporary": str(src), "output": str(dst)}, out)
            os.rename(ready + ".part", ready)
            time.sleep(600)

    atomic.os = RenameHangs()
    getattr(stages, stage)(**kwargs)
    """
)

# Loaded through PYTHONPATH by every Python process of a snakemake run: when SQ_TEST_SLOW_WRITE
# is set, each tensor the mllm writer loads takes that many seconds, so a kill lands mid-write.
SLOW_WRITES = textwrap.dedent(
    """
    import importlib.abc, importlib.machinery, os, sys, time

    class SlowMllmWrites(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "shadowquant.export.mllm":
                return None
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            load = spec.loader.exec_module

            def exec_module(module):
                load(module)
                tensor_bytes = module._tensor_bytes

                def slow(*args, **kwargs):
                    time.sleep(float(os.environ["SQ_TEST_SLOW_WRITE"]))
                    return tensor_bytes(*args, **kwargs)

                module._tensor_bytes = slow

            spec.loader.exec_module = exec_module
            return spec

    if os.environ.get("SQ_TEST_SLOW_WRITE"):
        sys.meta_path.insert(0, SlowMllmWrites())
    """
)


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory, tiny_model_dir, tiny_text_corpus) -> Path:
    """Every stage's inputs for the tiny llama, made once: manifest, samples, act_scales, export."""
    run = tmp_path_factory.mktemp("llama_run")
    stages.fetch_model(str(tiny_model_dir("llama")), run / "manifest.json")
    stages.select_samples(tiny_text_corpus, run / "samples.jsonl", 4)
    stages.profile(run / "manifest.json", run / "samples.jsonl", run / "act_scales.json", run / "act_scales.csv",
                   seq_len=16, batch_size=2, device="cpu", progress=False)
    stages.export(run / "manifest.json", run / "act_scales.json", run / "model-int8.safetensors", "signed-t152",
                  runtime_json=run / "runtime.json")
    return run


def _stage_call(stage: str, run: Path, out: Path, corpus: Path) -> tuple[dict, list[Path]]:
    """Arguments of one stage writing into `out`, and the outputs it declares."""
    if stage == "select_samples":
        outputs = [out / "calibration.jsonl"]
        return {"corpus_path": str(corpus), "out": str(outputs[0]), "num_samples": 8}, outputs
    if stage == "profile":
        outputs = [out / "act_scales.json", out / "act_scales.csv"]
        return {"manifest": str(run / "manifest.json"), "samples": str(run / "samples.jsonl"),
                "out_json": str(outputs[0]), "out_table": str(outputs[1]), "seq_len": 16, "device": "cpu",
                "progress": False}, outputs
    if stage == "export":
        outputs = [out / "model-int8.safetensors", out / "shadow_layers.json"]
        return {"manifest": str(run / "manifest.json"), "act_scales": str(run / "act_scales.json"),
                "out": str(outputs[0]), "point": "signed-t152",
                "shadow_json": str(outputs[1])}, outputs
    outputs = [out / "model.mllm", out / "inspect.txt"]
    return {"export_path": str(run / "model-int8.safetensors"), "out": str(outputs[0]),
            "report": str(outputs[1])}, outputs


def _wait_for(condition, timeout: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            output = proc.stdout.read() if proc.stdout else ""
            pytest.fail(f"the process ended ({proc.returncode}) before {what}:\n{output[-3000:]}")
        time.sleep(0.02)
    pytest.fail(f"timed out waiting for {what}")


def _left_behind(directory: Path, before: set[str]) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name not in before) if directory.exists() else []


@pytest.mark.parametrize("stage", ["select_samples", "profile", "export", "convert"])
def test_a_stage_killed_before_its_rename_leaves_only_a_hidden_temporary(stage, llama_run, tiny_text_corpus,
                                                                          tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    kwargs, outputs = _stage_call(stage, llama_run, out, tiny_text_corpus)
    ready = tmp_path / "ready.json"
    proc = subprocess.Popen([sys.executable, "-c", HANG_BEFORE_RENAME, str(ready), stage, json.dumps(kwargs)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(ready.exists, 120, f"{stage} to reach its first rename", proc)
        rename = json.loads(ready.read_text())
        temporary = Path(rename["temporary"])
        # The temporary is complete and sits beside its output under a hidden name.
        assert temporary.parent == Path(rename["output"]).parent
        assert temporary.name.startswith(".") and temporary.name.endswith(".tmp")
        assert temporary.exists()
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not [path for path in outputs if path.exists()], "a killed job left an output that looks complete"
    left = _left_behind(out, set())
    assert all(name.startswith(".") and name.endswith(".tmp") for name in left), left


def test_snakemake_killed_mid_write_then_rerun_produces_the_output(llama_run, tiny_model_dir, tiny_text_corpus,
                                                                      tmp_path):
    results = tmp_path / "results" / "tiny"
    results.mkdir(parents=True)
    shutil.copy(llama_run / "model-int8.safetensors", results / "model-int8.safetensors")
    shutil.copy(llama_run / "runtime.json", results / "runtime.json")
    config = write_config(tmp_path, {"model": {"source": str(tiny_model_dir("llama")), "name": "tiny"},
                                     "calibration": {"dataset": str(tiny_text_corpus)}, "device": "cpu",
                                     "transform": {"variants": ["none"]}})
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SLOW_WRITES)
    # Only the conversion may run: the existing export is taken as given.
    command = snakemake_command(tmp_path, config, "results/tiny/model.mllm", "--allowed-rules", "convert_mllm",
                                cores=1)
    env = snakemake_env()
    slow_env = snakemake_env(SQ_TEST_SLOW_WRITE="0.2", PYTHONPATH=os.pathsep.join(
        [str(hooks), *filter(None, [os.environ.get("PYTHONPATH")])]))
    before = {p.name for p in results.iterdir()}
    proc = subprocess.Popen(command, cwd=tmp_path, env=slow_env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)

    def writing() -> bool:  # the writer's hidden temporary has data in it
        return any(".model.mllm." in p.name and p.is_file() and p.stat().st_size > 0
                   for p in results.iterdir())

    try:
        _wait_for(writing, 120, "the mllm writer to start writing", proc)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # snakemake and its job, as a cluster's kill would
        proc.wait()
    left = _left_behind(results, before)
    assert not (results / "model.mllm").exists() and not (results / "inspect.txt").exists(), left
    assert left and all(name.startswith(".") and name.endswith(".tmp") for name in left), left

    # What a user does after a killed run: remove the stale lock, then run again.
    unlock = subprocess.run([*command, "--unlock"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert unlock.returncode == 0, unlock.stdout[-3000:] + unlock.stderr[-3000:]
    rerun = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert inspect_mllm(results / "model.mllm").problems == []
    assert (results / "inspect.txt").read_text().startswith("results/tiny/model.mllm: mllm v1")


def test_the_root_model_is_a_relative_link_replaced_atomically(tmp_path):
    from shadowquant.stages import link_primary

    target = tmp_path / "results/m/model.mllm"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"first")
    root = tmp_path / "model.mllm"
    link_primary(target, root)
    assert root.is_symlink() and os.readlink(root) == "results/m/model.mllm" and root.read_bytes() == b"first"
    stamp = target.stat().st_mtime_ns
    os.utime(root, follow_symlinks=False)  # Snakemake touches outputs: the link's own time, not the export's
    assert target.stat().st_mtime_ns == stamp
    other = tmp_path / "results/n/model.mllm"
    other.parent.mkdir(parents=True)
    other.write_bytes(b"second")
    link_primary(other, root)  # an existing link is replaced, no temporary is left
    assert root.read_bytes() == b"second" and sorted(p.name for p in tmp_path.iterdir()) == ["model.mllm", "results"]
