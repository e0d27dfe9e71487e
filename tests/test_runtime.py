"""Runtime profiles: points as shadow layers, ranges under the CPU cap, selection by CPU share, the export,
runtime.json and the inspector per profile, and the ideal profile's numbers unchanged."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from shadowquant import stages

from shadowquant.evaluate import sweep
from shadowquant.config import validate_config
from shadowquant.runtimes.decision import LayerQuant, load_act_scales, parse_point
from shadowquant.errors import PipelineError
from shadowquant.export.int8 import runtime_state_dict
from shadowquant.model.families import quantized_layer_names
from shadowquant.export.inspector import inspect_mllm
from shadowquant.model.loading import load_model_from_manifest
from shadowquant.export.mllm import convert_safetensors_to_mllm, read_mllm
from shadowquant.export.dtypes import (DTYPE_FLOAT32 as FLOAT32_CODE, DTYPE_INT8 as INT8_CODE, DTYPE_INT32 as INT32_CODE,
                                       DTYPE_Q4_0 as Q4_0_CODE)
from shadowquant.runtimes.profiles import (PROFILES, SideSpec, decode_loaded_tensors, get_profile, layer_index,
                                 loaded_tensors)
from shadowquant.decoding.candidates import decode_dtype
from mllm_loader_helpers import run_native_loader
from shadowquant.runtimes.npu import (read_runtime_scales, runtime_decisions, shadow_fraction, shadow_range,
                                          shadow_layers_of_point)
from shadowquant.runtimes.runtime_linear import apply_runtime, apply_runtime_from_export
from shadowquant.runtimes import get_runtime
from shadowquant.calibrate.runtime_scales import shadow_ranges
from shadowquant.evaluate.selection import choose


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory, profiled_tiny_llama, tiny_text_corpus):
    """A tiny llama profiled on 8 records, with its float evaluation and qwen-npu runtime scales."""
    d = profiled_tiny_llama(tmp_path_factory.mktemp("runtime_llama"))
    manifest = d / "model" / "manifest.json"
    stages.select_samples(tiny_text_corpus, d / "eval.jsonl", 8, offset=8)
    sweep.evaluate_float(manifest, d / "eval.jsonl", d / "float.json", d / "base.safetensors", seq_len=32)
    return d


def _evaluate(run, point, part="all", runtime="ideal", **kwargs):
    evaluation = sweep.PointEvaluation(manifest=run / "model" / "manifest.json", samples=run / "eval.jsonl",
                                       act_scales=run / "act.json", baseline=run / "base.safetensors",
                                       float_json=run / "float.json", seq_len=32, runtime=runtime, **kwargs)
    return sweep.evaluate_point(evaluation, point=point, out_json=run / f"{point}.json", part=part)


# Measured with the pipeline before runtime profiles existed (commit 45b67a0) on the same tiny model,
# corpus and records: the ideal profile must keep them to float32 rounding. Not to the last bit: the
# float32 sums' order follows the CPU's BLAS kernels, and another processor moved perplexity by 4e-9.
BEFORE_RUNTIME_PROFILES = {
    "absmax-t1": (323.8215151314632, 2.3676376986940815e-05, 0.9556451612903226, 28),
    "absmax-t4": (324.2113581201425, 4.133713881544449e-05, 0.9314516129032258, 0),
    "signed-t10000000": (324.0092861962233, 0.00011314876306236268, 0.9112903225806451, 0),
}


@pytest.mark.parametrize("point", sorted(BEFORE_RUNTIME_PROFILES))
def test_ideal_profile_reproduces_the_numbers_from_before_runtime_profiles(llama_run, point):
    """runtime.profile ideal gives the perplexity, KL, agreement and shadow sides of the old pipeline."""
    metrics = _evaluate(llama_run, point, runtime="ideal")
    perplexity, kl, agreement, sides = BEFORE_RUNTIME_PROFILES[point]
    assert metrics["perplexity"] == pytest.approx(perplexity, rel=1e-7)
    assert metrics["kl"] == pytest.approx(kl, rel=1e-4, abs=1e-9)  # a mean of differences of log-probabilities
    assert (metrics["agreement"], metrics["num_shadow_sides"]) == (agreement, sides)
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
    with pytest.raises(PipelineError, match="absmax-l<shadow layers>"):
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
    assert get_runtime("qwen-npu").breakdown_point("absmax") == "absmax-l0"
    assert get_runtime("ideal").breakdown_point("signed") == "signed-t1"


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
    assert rotated[f"{layer}.bias"].dtype == torch.float32 and torch.equal(rotated[f"{layer}.bias"], state[f"{layer}.bias"])
    # QNNLinearINT8 loads bias.scale whatever the bias: the accumulator step, unused with a zero conv bias.
    assert float(rotated[f"{layer}.bias.scale"]) == float(int32[f"{layer}.bias.scale"])
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


# --- what mllm's C++ models ask their loader for (runtime.loaded_tensors, runtime.decode_loaded_tensors) ---

# The default model, SmolLM2-135M (tied in the Hugging Face config).
SMOLLM2 = {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3,
           "head_dim": 64, "num_hidden_layers": 30, "vocab_size": 49152, "tie_embedding_words": True}
LINEARS = {"q_proj": (576, 576), "k_proj": (576, 192), "v_proj": (576, 192), "o_proj": (576, 576),
           "gate_proj": (576, 1536), "up_proj": (576, 1536), "down_proj": (1536, 576)}


def _linear(index: int, role: str) -> str:
    return f"model.layers.{index}.{'mlp' if role in ('gate_proj', 'up_proj', 'down_proj') else 'self_attn'}.{role}"


@pytest.mark.parametrize("name, plain, with_shadow", [
    ("qwen-npu", 1112, 1114), ("qwen-npu-rotated", 1112, 1114), ("phonelm-npu", 993, 996)])
def test_loaded_tensors_are_what_the_cpp_npu_model_asks_for(name, plain, with_shadow):
    """Per Linear the QNN Linear's weight, weight.scale, bias.scale (asked for bias or not) and output_scale;
    q/k/v biases in both Qwen configs, whatever the model (int32 from the Linear, float32 from DequantizeAdd);
    one input_scale per quantizer; clip flags in the shadow layers; the head only where it is not tied."""
    profile = PROFILES[name]
    tensors = loaded_tensors(profile, SMOLLM2, [])
    shadowed = loaded_tensors(profile, SMOLLM2, [10])
    assert len(tensors) == plain and len(shadowed) == with_shadow
    assert loaded_tensors(profile, {**SMOLLM2, "qkv_bias": False}, []) == tensors  # no such key is read
    for index in (0, 1, 10, 11):
        for role, (fan_in, fan_out) in LINEARS.items():
            linear = _linear(index, role)
            assert shadowed[f"{linear}.weight"] == (INT8_CODE, fan_in * fan_out)
            for scalar in ("weight.scale", "bias.scale", "output_scale"):
                assert shadowed[f"{linear}.{scalar}"] == (FLOAT32_CODE, 4), (linear, scalar)
            bias = shadowed.get(f"{linear}.bias")
            if role not in ("q_proj", "k_proj", "v_proj") or name == "phonelm-npu":
                assert bias is None, linear
            else:
                assert bias == ((INT32_CODE if name == "qwen-npu" else FLOAT32_CODE), 4 * fan_out), linear
        inputs = {role for role in LINEARS if f"{_linear(index, role)}.input_scale" in shadowed}
        own_down = name != "phonelm-npu" or index == 10  # PhoneLM's normal layers quantize down_proj's input nowhere
        assert inputs == {"q_proj", "o_proj", "up_proj"} | ({"down_proj"} if own_down else set())
        assert shadowed[f"model.layers.{index}.input_layernorm.weight"] == (FLOAT32_CODE, 4 * 576)
    assert sorted(n for n in shadowed if ".clip_" in n) == [
        "model.layers.10.mlp.down_proj.clip_input", "model.layers.10.mlp.down_proj.clip_output"]
    assert shadowed["model.layers.10.mlp.down_proj.clip_input"] == (INT8_CODE, 1)
    assert tensors["model.embed_tokens.weight"] == (FLOAT32_CODE, 4 * 49152 * 576)
    assert ("lm_head.weight" in tensors) == (name == "phonelm-npu")  # a tied head reads the embedding (Parameter)
    untied = loaded_tensors(profile, {**SMOLLM2, "tie_embedding_words": False}, [])
    assert untied["lm_head.weight"] == (FLOAT32_CODE, 4 * 49152 * 576) and len(untied) == len(tensors) + (name != "phonelm-npu")


def test_decode_loaded_tensors_are_what_the_cpu_model_asks_for():
    """mllm's CPU Qwen model builds q/k/v with bias whatever the model; every size follows the dtype mllm's
    quantizer gives the name (Q4_0: 18 bytes per 32 values; norms and biases float32); PhoneLM has no bias."""
    qwen = decode_loaded_tensors(PROFILES["qwen-npu"], SMOLLM2, decode_dtype)
    assert len(qwen) == 363 and decode_loaded_tensors(PROFILES["qwen-npu-rotated"], SMOLLM2, decode_dtype) == qwen
    for role, (fan_in, fan_out) in LINEARS.items():
        assert qwen[f"{_linear(7, role)}.weight"] == (Q4_0_CODE, fan_in * fan_out // 32 * 18)
        if role in ("q_proj", "k_proj", "v_proj"):
            assert qwen[f"{_linear(7, role)}.bias"] == (FLOAT32_CODE, 4 * fan_out)
    assert sum(n.endswith("_proj.bias") for n in qwen) == 90
    assert qwen["model.embed_tokens.weight"] == qwen["lm_head.weight"] == (Q4_0_CODE, 49152 * 576 // 32 * 18)
    assert qwen["model.layers.7.post_attention_layernorm.weight"] == qwen["model.norm.weight"] == (FLOAT32_CODE, 2304)
    tied = decode_loaded_tensors(PROFILES["qwen-npu"], SMOLLM2, decode_dtype, tied=True)
    assert set(qwen) - set(tied) == {"lm_head.weight"}
    phonelm = decode_loaded_tensors(PROFILES["phonelm-npu"], SMOLLM2, decode_dtype)
    assert set(qwen) - set(phonelm) == {n for n in qwen if n.endswith(".bias")} and len(phonelm) == 273
    with pytest.raises(PipelineError, match="no C\\+\\+ model"):
        decode_loaded_tensors(PROFILES["ideal"], SMOLLM2, decode_dtype)


def _renamed_runtime_scales(run, tmp_path, profile_name):
    """The llama run's runtime scales relabelled for another profile with the same Linear roles."""
    data = json.loads((run / "rs.json").read_text())
    data["profile"] = profile_name
    (tmp_path / "rs.json").write_text(json.dumps(data))
    return tmp_path / "rs.json"


@pytest.mark.parametrize("profile_name", ["qwen-npu", "qwen-npu-rotated", "phonelm-npu"])
def test_a_model_without_qkv_bias_gets_what_the_cpp_model_loads(llama_run, tmp_path, profile_name, native_loader):
    """LLaMA has no q/k/v bias: the export writes zero ones as the profile stores them (int32 with bias.scale,
    float32) and every Linear's bias.scale, so mllm's loader (re-implemented in C++) finds every tensor; the
    same file without the biases is refused by the inspector and reported missing by the loader."""
    from safetensors.torch import save_file

    stages.export(llama_run / "model" / "manifest.json", llama_run / "act.json", tmp_path / "export.safetensors",
                  point="absmax-t1", runtime=profile_name,
                  runtime_scales=_renamed_runtime_scales(llama_run, tmp_path, profile_name),
                  runtime_json=tmp_path / "runtime.json")
    tensors = load_file(str(tmp_path / "export.safetensors"))
    runtime = json.loads((tmp_path / "runtime.json").read_text())
    biases = sorted(n for n in tensors if n.endswith("_proj.bias"))
    if profile_name == "phonelm-npu":
        assert biases == []
    else:
        assert len(biases) == 3 * runtime["cpp_config"]["num_hidden_layers"]
        dtype = torch.int32 if profile_name == "qwen-npu" else torch.float32
        assert all(tensors[n].dtype == dtype and not tensors[n].any() for n in biases)
    assert all(f"{n}.bias.scale" in tensors for n in quantized_layer_names_of(tensors))
    convert_safetensors_to_mllm(tmp_path / "export.safetensors", tmp_path / "model.mllm")
    expected = loaded_tensors(get_profile(profile_name), runtime["cpp_config"], runtime["shadow_layers"])
    report = inspect_mllm(tmp_path / "model.mllm", runtime=runtime)
    assert report.ok, report.problems
    _, _, statuses = run_native_loader(native_loader, tmp_path / "model.mllm", expected, tmp_path)
    assert len(statuses) == len(expected) and set(statuses.values()) == {"ok"}
    if profile_name == "phonelm-npu":
        return
    for name in biases:
        del tensors[name]
    save_file(tensors, str(tmp_path / "nobias.safetensors"))
    convert_safetensors_to_mllm(tmp_path / "nobias.safetensors", tmp_path / "nobias.mllm")
    problems = {p.name: p.what for p in inspect_mllm(tmp_path / "nobias.mllm", runtime=runtime).problems}
    assert problems == {name: "missing" for name in biases}
    _, _, statuses = run_native_loader(native_loader, tmp_path / "nobias.mllm", expected, tmp_path)
    assert sorted(n for n, status in statuses.items() if status != "ok") == biases
    assert {statuses[n] for n in biases} == {"missing"}


def quantized_layer_names_of(tensors) -> list[str]:
    return [n.removesuffix(".weight") for n, t in tensors.items() if n.endswith("_proj.weight") and t.dtype == torch.int8]


def test_the_decoding_model_holds_what_the_cpu_model_loads(llama_run, tmp_path, native_loader):
    """The Q4_0 decoding file of a model without q/k/v bias gets zero float32 ones (mllm's CPU Qwen model
    adds them); without them the inspector and mllm's loader (re-implemented) report each missing."""
    from shadowquant.decoding.candidates import write_decode_model

    _, runtime = _runtime_export(llama_run, tmp_path, "absmax-t10000000")
    model, _, _ = load_model_from_manifest(llama_run / "model" / "manifest.json", "cpu", "float32")
    expected = decode_loaded_tensors(get_profile("qwen-npu"), runtime["cpp_config"], decode_dtype)
    write_decode_model(model.state_dict(), tmp_path / "decode.mllm")
    stored = read_mllm(tmp_path / "decode.mllm")
    biases = sorted(n for n in expected if n.endswith("_proj.bias"))
    assert len(biases) == 3 * runtime["cpp_config"]["num_hidden_layers"]
    assert all(stored.entry(n).dtype == FLOAT32_CODE and not stored.read(n).any() for n in biases)
    report = inspect_mllm(tmp_path / "decode.mllm", runtime=runtime)
    assert report.ok, report.problems
    assert "CPU decoding model" in report.notes[0]
    _, _, statuses = run_native_loader(native_loader, tmp_path / "decode.mllm", expected, tmp_path)
    assert len(statuses) == len(expected) and set(statuses.values()) == {"ok"}
    write_decode_model(model.state_dict(), tmp_path / "nobias.mllm", qkv_bias=False)
    problems = {p.name: p.what for p in inspect_mllm(tmp_path / "nobias.mllm", runtime=runtime).problems}
    assert problems == {name: "missing" for name in biases}
    _, _, statuses = run_native_loader(native_loader, tmp_path / "nobias.mllm", expected, tmp_path)
    assert sorted(n for n, status in statuses.items() if status != "ok") == biases


def test_a_real_qkv_bias_keeps_its_values():
    """Qwen2's own q/k/v biases are exported as before; only a missing one is written as zeros."""
    state = {f"model.layers.0.self_attn.{r}.weight": torch.randn(64, 64) for r in ("q_proj", "k_proj", "v_proj")}
    state["model.layers.0.self_attn.q_proj.bias"] = torch.randn(64)
    layers = [n.removesuffix(".weight") for n in state if n.endswith(".weight")]
    decisions = {layer: LayerQuant(3.0, 5.0, True, True) for layer in layers}
    rotated = runtime_state_dict(state, decisions, layers, PROFILES["qwen-npu-rotated"], frozenset())
    assert torch.equal(rotated["model.layers.0.self_attn.q_proj.bias"], state["model.layers.0.self_attn.q_proj.bias"])
    assert not rotated["model.layers.0.self_attn.k_proj.bias"].any()
    int32 = runtime_state_dict(state, decisions, layers, PROFILES["qwen-npu"], frozenset())
    assert int32["model.layers.0.self_attn.q_proj.bias"].abs().sum() > 0
    assert int32["model.layers.0.self_attn.v_proj.bias"].dtype == torch.int32
    assert not int32["model.layers.0.self_attn.v_proj.bias"].any()
    from shadowquant.decoding.candidates import decode_tensors
    decoded = decode_tensors({**state, "lm_head.weight": torch.randn(8, 64)})
    assert torch.equal(decoded["model.layers.0.self_attn.q_proj.bias"], state["model.layers.0.self_attn.q_proj.bias"])
    assert decoded["model.layers.0.self_attn.k_proj.bias"].shape == (64,) and not decoded["model.layers.0.self_attn.k_proj.bias"].any()


def test_layer_ranking_replay_equals_full_runs(llama_run):
    """The layer ranking that starts each shadow layer's run from the no-shadow run's recorded layer outputs
    gives the full runs' rows to the bit: benefit, NLL and CPU share (a shadow layer changes only itself and
    the layers after it)."""
    from shadowquant.calibrate.sensitivity import stage_inputs
    from shadowquant.runtimes.npu import first_changed_layer, layer_ranking

    model, sequences, layers, scales = stage_inputs(llama_run / "model" / "manifest.json", llama_run / "calib.jsonl",
                                                    llama_run / "act.json", 4, 24, "cpu", "auto")
    profile = get_profile("qwen-npu", "llama")
    runtime_scales = read_runtime_scales(llama_run / "rs.json", profile)
    replayed, full = (layer_ranking(model, layers, sequences, scales, runtime_scales, profile, batch_size=3,
                                    progress=False, replay=replay) for replay in (True, False))
    assert replayed == full and len(full) == 2 and any(row["cost"] > 0 for row in full)
    none = runtime_decisions(scales, runtime_scales, profile, layers, frozenset())
    for index in (0, 1):
        shadow = frozenset({index})
        decisions = runtime_decisions(scales, runtime_scales, profile, layers, shadow)
        assert first_changed_layer(decisions, none, layers, profile, shadow) == index
