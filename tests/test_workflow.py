"""The whole pipeline through the snakemake CLI on tiny random models of every family."""

import json

import pytest
import torch
from safetensors import safe_open

from shadowquant.families import FAMILIES
from shadowquant.inspector import main as inspect_main
from shadowquant.mllm import DTYPE_INT8, read_mllm
from workflow_helpers import planned_jobs, snakemake, write_config

pytestmark = pytest.mark.slow


def _config(model_dir, corpus, name, **overrides):
    cfg = {
        "model": {"source": str(model_dir), "name": name},
        "calibration": {"dataset": str(corpus), "num_samples": 6, "seq_len": 32, "batch_size": 3,
                        "checkpoint_every": 0},
        "device": "cpu",
    }
    for key, value in overrides.items():
        section, _, leaf = key.partition(".")
        if leaf:
            cfg.setdefault(section, {})[leaf] = value
        else:
            cfg[section] = value
    return cfg


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_builds_an_mllm_the_inspector_accepts(family, tiny_model_dir, tiny_text_corpus, tmp_path):
    model_dir = tiny_model_dir("qwen2" if family == "qwen1" else family)
    cfg = write_config(tmp_path, _config(model_dir, tiny_text_corpus, f"tiny-{family}", **{"model.type": family}))
    snakemake(tmp_path, cfg, f"results/tiny-{family}/model.mllm")
    mllm = tmp_path / f"results/tiny-{family}/model.mllm"
    assert inspect_main([str(mllm), "--export", str(mllm.with_name("model-int8.safetensors"))]) == 0
    f = read_mllm(mllm)
    scales = json.loads((tmp_path / f"results/tiny-{family}/act_scales.json").read_text())
    assert "lm_head" in scales["ori"]
    linears = [n for n in scales["ori"] if n != "lm_head"]
    for layer in linears:
        assert f.entry(f"{layer}.weight").dtype == DTYPE_INT8
        assert f.entry(f"{layer}.clip_input").dtype == DTYPE_INT8
    with safe_open(str(mllm.with_name("model-int8.safetensors")), framework="pt") as st:
        meta = st.metadata()
    assert meta["family"] == family


def test_threshold_change_reruns_export_but_not_profiling(tiny_model_dir, tiny_text_corpus, tmp_path):
    base = _config(tiny_model_dir("llama"), tiny_text_corpus, "tiny-llama")
    cfg = write_config(tmp_path, base)
    snakemake(tmp_path, cfg)
    assert (tmp_path / "model.mllm").stat().st_size == (tmp_path / "results/tiny-llama/model.mllm").stat().st_size
    assert planned_jobs(snakemake(tmp_path, cfg, "-n")) == {}
    base["export"] = {"threshold": 8}
    cfg = write_config(tmp_path, base)
    jobs = planned_jobs(snakemake(tmp_path, cfg, "-n"))
    assert "profile" not in jobs and "fetch_model" not in jobs and "select_calibration" not in jobs
    assert {"decide", "export_int8", "convert_mllm"} <= set(jobs)
    snakemake(tmp_path, cfg)
    shadow = json.loads((tmp_path / "results/tiny-llama/shadow_layers.json").read_text())
    assert shadow["threshold"] == 8
    # A change of the calibration size does rerun profiling.
    base["calibration"]["num_samples"] = 5
    jobs = planned_jobs(snakemake(tmp_path, write_config(tmp_path, base), "-n"))
    assert "profile" in jobs


def test_default_config_dry_run(tmp_path):
    from workflow_helpers import REPO

    proc = snakemake(tmp_path, REPO / "config" / "config.yaml", "-n")
    jobs = planned_jobs(proc)
    assert {"fetch_model", "build_pydoc_corpus", "select_calibration", "profile", "export_int8",
            "convert_mllm", "primary_model"} <= set(jobs)


def test_export_agrees_with_the_model_weights(tiny_model_dir, tiny_text_corpus, tmp_path):
    """Dequantized int8 weights are the per-tensor fake-quantized float weights."""
    from shadowquant.fakequant import dequantized_linear_from_export, fake_quant_weight
    from shadowquant.models import load_model

    cfg = write_config(tmp_path, _config(tiny_model_dir("opt"), tiny_text_corpus, "tiny-opt"))
    snakemake(tmp_path, cfg, "results/tiny-opt/model-int8.safetensors")
    model, _, _ = load_model(tiny_model_dir("opt"), device="cpu", dtype="float32")
    mods = dict(model.named_modules())
    with safe_open(str(tmp_path / "results/tiny-opt/model-int8.safetensors"), framework="pt") as st:
        name = "model.decoder.layers.0.fc1"
        w, b = dequantized_linear_from_export(st.get_tensor(f"{name}.weight"), st.get_tensor(f"{name}.weight.scale"),
                                              st.get_tensor(f"{name}.bias"), st.get_tensor(f"{name}.bias.scale"))
        assert torch.allclose(w, fake_quant_weight(mods[name].weight), atol=1e-6)
        assert torch.allclose(b, fake_quant_weight(mods[name].bias), atol=1e-6)
