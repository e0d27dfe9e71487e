"""Runtime profiles: points as shadow layers, ranges under the CPU cap, selection by CPU share, the export,
runtime.json and the inspector per profile, and the ideal profile's numbers unchanged."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from shadowquant import stages, sweep
from shadowquant.config import validate_config
from shadowquant.decision import LayerQuant, breakdown_point, load_act_scales, parse_point
from shadowquant.errors import PipelineError
from shadowquant.export import runtime_state_dict
from shadowquant.families import quantized_layer_names
from shadowquant.inspector import inspect_mllm
from shadowquant.models import load_model_from_manifest
from shadowquant.mllm import convert_safetensors_to_mllm, read_mllm
from shadowquant.runtime import PROFILES, SideSpec, get_profile, layer_index, loaded_tensors
from shadowquant.runtime_decision import (read_runtime_scales, runtime_decisions, shadow_fraction, shadow_range,
                                          shadow_layers_of_point)
from shadowquant.runtime_linear import apply_runtime, apply_runtime_from_export
from shadowquant.runtime_scales import runtime_scales_stage, shadow_ranges
from shadowquant.selection import choose


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory, tiny_model_dir, tiny_text_corpus):
    """A tiny llama profiled on 8 records, with its float evaluation and qwen-npu runtime scales."""
    d = tmp_path_factory.mktemp("runtime_llama")
    manifest = d / "model" / "manifest.json"
    stages.fetch_model(str(tiny_model_dir("llama")), manifest)
    stages.select_samples(tiny_text_corpus, d / "calib.jsonl", 8)
    stages.select_samples(tiny_text_corpus, d / "eval.jsonl", 8, offset=8)
    stages.profile(manifest, d / "calib.jsonl", d / "act.json", d / "act.csv", seq_len=32, batch_size=4,
                   progress=False)
    sweep.evaluate_float(manifest, d / "eval.jsonl", d / "float.json", d / "base.safetensors", seq_len=32)
    runtime_scales_stage(manifest, d / "calib.jsonl", d / "act.json", d / "rs.json", "qwen-npu", 0.001, 8, 32, 2, 16)
    return d


def _evaluate(run, point, **kwargs):
    return sweep.evaluate_point(run / "model" / "manifest.json", run / "eval.jsonl", run / "act.json",
                                run / "base.safetensors", run / "float.json", run / f"{point}.json", point, 32,
                                **kwargs)


# Measured with the pipeline before runtime profiles existed (commit 45b67a0) on the same tiny model,
# corpus and records: the ideal profile must keep them to the last bit.
BEFORE_RUNTIME_PROFILES = {
    "absmax-t1": (323.8215151314632, 2.3676376986940815e-05, 0.9556451612903226, 28),
    "absmax-t4": (324.2113581201425, 4.133713881544449e-05, 0.9314516129032258, 0),
    "signed-t10000000": (324.0092861962233, 0.00011314876306236268, 0.9112903225806451, 0),
}


@pytest.mark.parametrize("point", sorted(BEFORE_RUNTIME_PROFILES))
def test_ideal_profile_reproduces_the_numbers_from_before_runtime_profiles(llama_run, point):
    """runtime.profile ideal gives exactly the perplexity, KL, agreement and shadow sides of the old pipeline."""
    metrics = _evaluate(llama_run, point, runtime="ideal")
    assert (metrics["perplexity"], metrics["kl"], metrics["agreement"],
            metrics["num_shadow_sides"]) == BEFORE_RUNTIME_PROFILES[point]
    assert metrics["runtime"] == "ideal"


def test_runtime_points_report_shadow_layers_and_cpu_share(llama_run):
    """Under qwen-npu t=1 shadows every layer's down_proj and costs CPU; t=10000000 shadows none and costs none."""
    everything = _evaluate(llama_run, "absmax-t1", runtime="qwen-npu", runtime_scales=llama_run / "rs.json")
    nothing = _evaluate(llama_run, "absmax-t10000000", runtime="qwen-npu", runtime_scales=llama_run / "rs.json")
    assert everything["shadow_layers"] == "0 1" and everything["num_shadow_layers"] == 2
    assert everything["num_shadow_sides"] == 4  # both sides of two down_proj
    assert everything["cpu_share"] > 0 and everything["input_outliers"] + everything["output_outliers"] > 0
    assert nothing["shadow_layers"] == "" and nothing["cpu_share"] == 0.0 and nothing["num_shadow_sides"] == 0
    assert everything["runtime"] == nothing["runtime"] == "qwen-npu"
    assert math.isfinite(everything["perplexity"]) and math.isfinite(nothing["perplexity"])


def test_layer_points_need_an_npu_profile_and_side_points_the_ideal_one(llama_run):
    """'absmax-l1' is refused under ideal, 'absmax-k2' and signed points under qwen-npu, each with the fix named."""
    scales = load_act_scales(llama_run / "act.json")
    profile = get_profile("qwen-npu")
    layers = [name for name in scales["ori"] if layer_index(name) is not None]
    with pytest.raises(PipelineError, match="absmax-l<k>"):
        shadow_layers_of_point("absmax-k2", scales, profile, layers)
    with pytest.raises(PipelineError, match="signed is the original tools"):
        shadow_layers_of_point("signed-t4", scales, profile, layers)
    with pytest.raises(PipelineError, match="NPU runtime profile"):
        _evaluate(llama_run, "absmax-l1", runtime="ideal")
    with pytest.raises(PipelineError, match="-mse"):
        parse_point("absmax-l2-mse")


def test_ratio_rule_at_the_layer_level_and_layer_front():
    """A layer is shadow when either down_proj ratio reaches t; an l-point takes the ranking's first k layers."""
    def stats(ratio_in, ratio_out):
        return {"input": ratio_in, "output": ratio_out}
    act = {"absmax_ori": {"model.layers.0.mlp.down_proj": stats(10.0, 2.0), "model.layers.1.mlp.down_proj": stats(3.0, 3.0),
                          "model.layers.1.self_attn.q_proj": stats(99.0, 99.0)},
           "absmax_top_0_1": {"model.layers.0.mlp.down_proj": stats(1.0, 1.0),
                              "model.layers.1.mlp.down_proj": stats(1.0, 1.0),
                              "model.layers.1.self_attn.q_proj": stats(1.0, 1.0)}}
    profile, layers = get_profile("qwen-npu"), list(act["absmax_ori"])
    assert shadow_layers_of_point("absmax-t4", act, profile, layers) == {0}
    assert shadow_layers_of_point("absmax-t3", act, profile, layers) == {0, 1}
    assert shadow_layers_of_point("absmax-t11", act, profile, layers) == set()
    ranking = ["model.layers.1.mlp.down_proj", "model.layers.0.mlp.down_proj"]
    assert shadow_layers_of_point("absmax-l1", act, profile, layers, ranking) == {1}
    assert shadow_layers_of_point("absmax-l3", act, profile, layers, ranking) == {0, 1}  # every layer there is
    # absmax-l0, the breakdown's point under an NPU profile, needs no ranking; the others do.
    assert shadow_layers_of_point("absmax-l0", act, profile, layers) == set()
    with pytest.raises(PipelineError, match="needs the layer ranking"):
        shadow_layers_of_point("absmax-l1", act, profile, layers)
    assert breakdown_point("absmax", "qwen-npu") == "absmax-l0"
    assert breakdown_point("signed", "ideal") == "signed-t1"


def test_shadow_ranges_share_the_cpu_cap():
    """Each of 2k shadow sides may leave cap * total / (2k * down MACs) of its elements beyond int8."""
    counts = torch.zeros(1 << 15, dtype=torch.float64)
    values = torch.cat([torch.full((9990,), 1.0), torch.full((10,), 100.0)])
    counts += torch.bincount(values.view(torch.int32) >> 16, minlength=1 << 15).double()
    ranges = shadow_ranges(counts, 100.0, fractions=(0.0, 1e-4, 1e-3))
    assert ranges[0] == 100.0 and 100.0 <= ranges[1] and 1.0 <= ranges[2] < 1.01  # 10 of 10000 beyond at 1e-3
    scales = {"macs": {"a": 100, "b": 300}, "cpu_cap": 0.001, "shadow_fractions": [0.0, 1e-4, 1e-3],
              "shadow": {"b": {"input": {"ranges": ranges}}}}
    assert shadow_fraction(scales, "b", 2) == pytest.approx(0.001 * 400 / (2 * 300))
    assert shadow_range(scales, "b", "input", shadow_fraction(scales, "b", 2)) == ranges[1]
    assert shadow_range(scales, "b", "input", 0.0) == 100.0


def test_fp16_int16_quantizer_range_floor():
    """The decisions raise an fp16 int16 input range to 32767/65504, below which the NPU's reciprocal overflows."""
    assert SideSpec(bits=16, dtype="float16").min_range == pytest.approx(32767 / 65504)
    assert SideSpec(bits=8).min_range == 0.0
    profile = get_profile("qwen-npu")
    layer = "model.layers.0.mlp.down_proj"
    scales = {"clamp": {layer: {"input": {"scale": 0.01}, "output": {"scale": 2.0}}}, "macs": {layer: 1},
              "cpu_cap": 0.001, "shadow_fractions": [0.0], "shadow": {}}
    decision = runtime_decisions({}, scales, profile, [layer], frozenset())[layer]
    assert decision == LayerQuant(32767 / 65504, 2.0, True, True)


def test_selection_takes_the_smallest_cpu_share_within_budget():
    """Under an NPU profile the selection ranks by CPU share, then shadow layers, then loss."""
    rows = [{"point": "float", "rule": "float", "statistic": "float", "perplexity": 10.0},
            {"point": "absmax-t1", "rule": "ratio", "statistic": "absmax", "perplexity": 10.1,
             "perplexity_increase": 0.01, "num_shadow_sides": 8, "num_shadow_layers": 4, "cpu_share": 0.0008,
             "runtime": "qwen-npu", "shadow_layers": "0 1 2 3"},
            {"point": "absmax-l1", "rule": "layers", "statistic": "absmax", "perplexity": 10.3,
             "perplexity_increase": 0.03, "num_shadow_sides": 2, "num_shadow_layers": 1, "cpu_share": 0.0002,
             "runtime": "qwen-npu", "shadow_layers": "3"},
            {"point": "absmax-t10000000", "rule": "ratio", "statistic": "absmax", "perplexity": 11.0,
             "perplexity_increase": 0.10, "num_shadow_sides": 0, "num_shadow_layers": 0, "cpu_share": 0.0,
             "runtime": "qwen-npu", "shadow_layers": ""}]
    chosen = choose(pd.DataFrame(rows), "perplexity", 0.05)
    assert chosen["point"] == "absmax-l1" and chosen["shadow_layers"] == [3] and chosen["cpu_share"] == 0.0002
    assert chosen["runtime"] == "qwen-npu" and "smallest CPU share" in chosen["reason"]
    assert choose(pd.DataFrame(rows), "perplexity", 0.2)["shadow_layers"] == []


def _runtime_export(run, tmp_path, point, profile_name="qwen-npu"):
    stages.export(run / "model" / "manifest.json", run / "act.json", tmp_path / "export.safetensors", point=point,
                  runtime=profile_name, runtime_scales=run / "rs.json", runtime_json=tmp_path / "runtime.json",
                  shadow_json=tmp_path / "shadow.json")
    return load_file(str(tmp_path / "export.safetensors")), json.loads((tmp_path / "runtime.json").read_text())


def test_runtime_export_reproduces_the_simulation_and_passes_the_inspector(llama_run, tmp_path):
    """The qwen-npu export, rebuilt into a model, gives the simulated logits; its mllm file has every tensor the
    C++ model loads with the byte size it allocates, clip flags only in the shadow layers."""
    tensors, runtime = _runtime_export(llama_run, tmp_path, "absmax-t1")
    assert runtime["runtime"] == "qwen-npu" and runtime["shadow_layers"] == [0, 1]
    assert runtime["cpp_config"]["shadow_layers"] == [0, 1] and runtime["cpp_config"]["num_hidden_layers"] == 2
    assert sorted(k for k in tensors if k.endswith(".clip_input")) == [
        "model.layers.0.mlp.down_proj.clip_input", "model.layers.1.mlp.down_proj.clip_input"]
    assert tensors["model.layers.0.self_attn.k_proj.input_scale"] == tensors["model.layers.0.self_attn.q_proj.input_scale"]
    manifest = llama_run / "model" / "manifest.json"
    model, tokenizer, family = load_model_from_manifest(manifest, "cpu", "auto")
    names = quantized_layer_names(model, family)
    ids = torch.tensor([tokenizer("The list of built-in functions")["input_ids"]])
    simulated, rebuilt = (load_model_from_manifest(manifest, "cpu", "auto")[0] for _ in range(2))
    profile = get_profile("qwen-npu")
    decisions = runtime_decisions(load_act_scales(llama_run / "act.json"),
                                  read_runtime_scales(llama_run / "rs.json", profile), profile, names, {0, 1})
    apply_runtime(simulated, decisions, names, profile, {0, 1})
    apply_runtime_from_export(rebuilt, tensors, names, profile, {0, 1})
    assert torch.equal(simulated(ids).logits, rebuilt(ids).logits)
    convert_safetensors_to_mllm(tmp_path / "export.safetensors", tmp_path / "model.mllm")
    report = inspect_mllm(tmp_path / "model.mllm", runtime=runtime)
    assert report.ok, report.problems
    stored = {entry.name for entry in read_mllm(tmp_path / "model.mllm").entries}
    assert set(loaded_tensors(profile, runtime["cpp_config"], [0, 1])) <= stored


def test_inspector_names_missing_resized_and_stray_tensors(llama_run, tmp_path):
    """A missing tensor, a wrong byte size and a clip flag outside runtime.json's shadow layers are problems."""
    tensors, runtime = _runtime_export(llama_run, tmp_path, "absmax-t10000000")
    assert not any(k.endswith(".clip_input") for k in tensors) and runtime["shadow_layers"] == []
    del tensors["model.layers.1.mlp.up_proj.input_scale"]
    tensors["model.layers.0.mlp.down_proj.output_scale"] = torch.ones(2)
    tensors["model.layers.1.mlp.down_proj.clip_input"] = torch.tensor(False)
    from safetensors.torch import save_file
    save_file(tensors, str(tmp_path / "broken.safetensors"))
    convert_safetensors_to_mllm(tmp_path / "broken.safetensors", tmp_path / "broken.mllm")
    problems = {p.name: p.what for p in inspect_mllm(tmp_path / "broken.mllm", runtime=runtime).problems}
    assert problems["model.layers.1.mlp.up_proj.input_scale"] == "missing"
    assert "the runtime allocates 4" in problems["model.layers.0.mlp.down_proj.output_scale"]
    assert "do not name" in problems["model.layers.1.mlp.down_proj.clip_input"]


def test_int32_and_float32_bias_and_phonelm_refusal():
    """qwen-npu stores an int32 bias in input step * weight step units, qwen-npu-rotated float32; phonelm refuses."""
    layer = "model.layers.0.self_attn.q_proj"
    state = {f"{layer}.weight": torch.tensor([[0.5, -1.0], [0.25, 0.125]]), f"{layer}.bias": torch.tensor([0.3, -0.7])}
    decisions = {layer: LayerQuant(2.0, 4.0, True, True)}
    int32 = runtime_state_dict(state, decisions, [layer], PROFILES["qwen-npu"], frozenset())
    step = torch.tensor(2.0 / 32767, dtype=torch.float32) * (1.0 / 127)
    assert int32[f"{layer}.bias"].dtype == torch.int32
    assert float(int32[f"{layer}.bias.scale"]) == pytest.approx(float(step), rel=1e-6)
    assert torch.allclose(int32[f"{layer}.bias"].float() * int32[f"{layer}.bias.scale"], state[f"{layer}.bias"],
                          atol=float(step))
    rotated = runtime_state_dict(state, decisions, [layer], PROFILES["qwen-npu-rotated"], frozenset())
    assert rotated[f"{layer}.bias"].dtype == torch.float32 and f"{layer}.bias.scale" not in rotated
    with pytest.raises(PipelineError, match="loads no bias"):
        runtime_state_dict(state, decisions, [layer], PROFILES["phonelm-npu"], frozenset())


@pytest.mark.parametrize("changes, message", [
    ({"runtime": {"profile": "qwen-npu"}, "model": {"type": "opt"}}, "set runtime.profile to ideal"),
    ({"runtime": {"profile": "qwen-npu"}, "sweep": {"statistics": ["signed", "absmax"]}}, "needs \\[absmax\\]"),
    ({"runtime": {"profile": "qwen-npu"}, "export": {"point": "absmax-k15"}}, "absmax-l<shadow layers>"),
    ({"runtime": {"profile": "ideal"}, "export": {"point": "absmax-l2"}}, "set of shadow layers"),
    ({"runtime": {"profile": "npu"}}, "runtime.profile"),
])
def test_config_refuses_what_the_runtime_cannot_run(changes, message):
    """Points, statistics and families the chosen runtime cannot run fail at validation with the fix named."""
    with pytest.raises(PipelineError, match=message):
        validate_config(changes, source="cfg.yaml")
