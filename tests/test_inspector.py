"""The mllm inspector: quantized-Linear companions, expected shapes, report and CLI exit codes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from shadowquant.cli import inspect_command as main
from shadowquant.export.inspector import format_report, inspect_mllm
from shadowquant.export.mllm import DTYPE_FLOAT32, DTYPE_INT8, write_mllm_v1, write_mllm_v2

Q = "model.layers.0.self_attn.q_proj"
O = "model.layers.0.self_attn.o_proj"  # has a bias


def linear_tensors(prefix: str, in_features: int = 4, out_features: int = 3, bias: bool = False) -> dict:
    tensors = {
        f"{prefix}.weight": torch.full((in_features, out_features), 7, dtype=torch.int8),
        f"{prefix}.weight.scale": torch.tensor(0.01),
        f"{prefix}.input_scale": torch.tensor(4.0),
        f"{prefix}.output_scale": torch.tensor(9.5),
        f"{prefix}.clip_input": torch.tensor(True),
        f"{prefix}.clip_output": torch.tensor(False),
    }
    if bias:
        tensors[f"{prefix}.bias"] = torch.full((out_features,), -3, dtype=torch.int8)
        tensors[f"{prefix}.bias.scale"] = torch.tensor(0.002)
    return tensors


def export_tensors() -> dict[str, torch.Tensor]:
    return {
        "model.embed_tokens.weight": torch.randn(10, 4),
        **linear_tensors(Q),
        **linear_tensors(O, bias=True),
        "model.norm.weight": torch.ones(4),
        # docs/method.md section 4: lm_head keeps a float weight but gets activation scales and flags.
        "lm_head.weight": torch.randn(10, 4),
        "lm_head.input_scale": torch.tensor(2.0),
        "lm_head.output_scale": torch.tensor(30.0),
        "lm_head.clip_input": torch.tensor(False),
        "lm_head.clip_output": torch.tensor(True),
    }


def problems_of(tmp_path, tensors, version=1, **kwargs):
    path = tmp_path / "m.mllm"
    (write_mllm_v1 if version == 1 else write_mllm_v2)(path, tensors)
    return {(p.name, p.what) for p in inspect_mllm(path, **kwargs).problems}


def test_happy_path(tmp_path):
    path = tmp_path / "m.mllm"
    write_mllm_v1(path, export_tensors())
    report = inspect_mllm(path)
    assert report.ok and report.problems == []
    assert [linear.prefix for linear in report.quantized_linears] == [Q, O]
    assert [linear.has_bias for linear in report.quantized_linears] == [False, True]
    assert [(l.prefix, l.weight_quantized) for l in report.linears if not l.weight_quantized] == [("lm_head", False)]
    assert report.tensor_count == len(export_tensors())
    assert report.dtypes[DTYPE_INT8].count == 2 + 1 + 2 * 2 + 2  # weights, bias, clip flags, lm_head flags
    assert report.total_bytes == sum(stat.bytes for stat in report.dtypes.values())
    text = format_report(report)
    assert "quantized Linears: 2 (1 with bias)" in text and "int8" in text and "problems: none" in text


@pytest.mark.parametrize(
    "missing",
    [f"{Q}.weight", f"{Q}.weight.scale", f"{Q}.input_scale", f"{Q}.output_scale", f"{Q}.clip_input",
     f"{Q}.clip_output", f"{O}.bias.scale", "lm_head.input_scale", "lm_head.weight"],
)
def test_each_missing_companion_is_named(tmp_path, missing):
    tensors = export_tensors()
    del tensors[missing]
    problems = problems_of(tmp_path, tensors)
    assert (missing, "missing") in problems
    assert len(problems) == 1


def test_bias_scale_without_bias(tmp_path):
    tensors = export_tensors()
    del tensors[f"{O}.bias"]
    assert problems_of(tmp_path, tensors) == {(f"{O}.bias", f"missing although {O}.bias.scale exists")}


def test_float_bias_on_quantized_linear(tmp_path):
    tensors = export_tensors()
    tensors[f"{O}.bias"] = torch.zeros(3)
    assert problems_of(tmp_path, tensors) == {(f"{O}.bias", "dtype float32 (0), expected int8 (16)")}


@pytest.mark.parametrize(
    "name, value, message",
    [
        (f"{Q}.input_scale", torch.tensor(0.0), "positive finite"),
        (f"{Q}.output_scale", torch.tensor(-2.0), "positive finite"),
        (f"{Q}.input_scale", torch.tensor(float("nan")), "positive finite"),
        (f"{Q}.output_scale", torch.tensor(float("inf")), "positive finite"),
        (f"{Q}.input_scale", torch.tensor([1.0, 2.0]), "2 elements"),
        (f"{Q}.input_scale", torch.tensor(4.0, dtype=torch.float16), "expected float32"),
        (f"{Q}.weight.scale", torch.tensor([0.1, 0.2]), "2 elements"),
        (f"{Q}.clip_input", torch.tensor(2, dtype=torch.int8), "expected 0 or 1"),
        (f"{Q}.clip_output", torch.tensor(1.0), "expected int8"),
        (f"{Q}.weight", torch.ones(4, 3), "expected int8"),
        ("lm_head.weight", torch.ones(10, 4, dtype=torch.int8), "expected float32"),
    ],
)
def test_bad_companion_values(tmp_path, name, value, message):
    tensors = export_tensors()
    tensors[name] = value
    problems = problems_of(tmp_path, tensors)
    assert len(problems) == 1
    ((bad_name, what),) = problems
    assert bad_name == name and message in what


def test_original_converter_bug_everything_float32_is_reported(tmp_path):
    tensors = {name: t.float() for name, t in export_tensors().items()}
    names = {name for name, _ in problems_of(tmp_path, tensors)}
    assert {f"{Q}.weight", f"{O}.weight", f"{O}.bias", f"{Q}.clip_input", "lm_head.clip_output"} <= names


def test_v2_weight_must_be_2d(tmp_path):
    tensors = export_tensors()
    tensors[f"{Q}.weight"] = tensors[f"{Q}.weight"].reshape(-1)
    assert problems_of(tmp_path, tensors, version=2) == {(f"{Q}.weight", "shape (12,), expected 2-D [in_features, out_features]")}
    assert problems_of(tmp_path, export_tensors(), version=2) == set()


def test_expected_shapes(tmp_path):
    expected = {name: tuple(t.shape) for name, t in export_tensors().items()}
    assert problems_of(tmp_path, export_tensors(), expected_shapes=expected) == set()
    wrong = expected | {f"{Q}.weight": (3, 5), "extra.weight": (2,)}
    problems = problems_of(tmp_path, export_tensors(), expected_shapes=wrong)
    assert problems == {
        (f"{Q}.weight", "12 elements, expected 15 for shape (3, 5)"),
        ("extra.weight", "missing (present in the expected tensor list)"),
    }
    transposed = expected | {f"{Q}.weight": (3, 4)}  # same count, v2 stores the shape
    assert problems_of(tmp_path, export_tensors(), version=2, expected_shapes=transposed) == {
        (f"{Q}.weight", "shape (4, 3), expected (3, 4)")
    }


# ---- CLI ------------------------------------------------------------------------------------


def test_cli_clean_file_exits_0_and_writes_json(tmp_path, capsys):
    path, out = tmp_path / "m.mllm", tmp_path / "report.json"
    write_mllm_v1(path, export_tensors())
    assert main([str(path), "--json", str(out)]) == 0
    assert "problems: none" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["ok"] is True and report["quantized_linear_count"] == 2
    assert report["dtypes"]["int8"]["code"] == DTYPE_INT8
    assert report["dtypes"]["float32"]["code"] == DTYPE_FLOAT32


def test_cli_problems_exit_1_and_name_the_tensors(tmp_path, capsys):
    tensors = export_tensors()
    del tensors[f"{Q}.clip_output"]
    tensors[f"{O}.input_scale"] = torch.tensor(0.0)
    path = tmp_path / "m.mllm"
    write_mllm_v1(path, tensors)
    assert main([str(path)]) == 1
    out = capsys.readouterr().out
    assert f"{Q}.clip_output: missing" in out and f"{O}.input_scale" in out


def test_cli_export_comparison(tmp_path, capsys):
    tensors = export_tensors()
    export = tmp_path / "model-int8.safetensors"
    save_file(tensors, str(export))
    good = tmp_path / "good.mllm"
    write_mllm_v1(good, tensors)
    assert main([str(good), "--export", str(export)]) == 0
    # The original converter's output: everything float32 -> int8 weights and flags flagged.
    bad = tmp_path / "bad.mllm"
    write_mllm_v1(bad, {name: t.float() for name, t in tensors.items()})
    capsys.readouterr()
    assert main([str(bad), "--export", str(export)]) == 1
    out = capsys.readouterr().out
    assert f"{Q}.weight: dtype float32 (0), expected int8 (16)" in out


@pytest.mark.parametrize("content", [b"GGUF" + b"\0" * 32, b"\x2c\x4e\x00\x00\xff\xff"])
def test_cli_foreign_or_truncated_file_exits_2_with_one_line(tmp_path, capsys, content):
    path = tmp_path / "broken.mllm"
    path.write_bytes(content)
    assert main([str(path)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: ")
    assert captured.out == ""


def test_cli_truncated_real_file_exits_2(tmp_path, capsys):
    path = tmp_path / "m.mllm"
    write_mllm_v1(path, export_tensors())
    path.write_bytes(path.read_bytes()[:-5])
    capsys.readouterr()  # drop the writer's progress bar
    assert main([str(path)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {path}: ")


def test_the_report_says_how_lm_head_is_stored(tmp_path):
    embedding = torch.zeros(4, 2)
    for names, expected in (({"model.embed_tokens.weight": embedding}, "no lm_head.weight stored"),
                            ({"model.embed_tokens.weight": embedding, "lm_head.weight": embedding},
                             "its own tensor (lm_head.weight)")):
        path = tmp_path / "m.mllm"
        write_mllm_v1(path, names)
        report = inspect_mllm(path)
        assert expected in report.head and f"lm_head: {report.head}" in format_report(report)


TINY_DIMS = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1,
             "num_hidden_layers": 2, "vocab_size": 32, "tie_embedding_words": False}


def tiny_float_state(dims: dict) -> dict[str, torch.Tensor]:
    """A LLaMA-shaped float state without q/k/v biases, [out, in] weights."""
    h, i, v = dims["hidden_size"], dims["intermediate_size"], dims["vocab_size"]
    kv = dims["num_key_value_heads"] * h // dims["num_attention_heads"]
    shapes = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
              "self_attn.o_proj": (h, h), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i)}
    state = {"model.embed_tokens.weight": torch.randn(v, h)}
    for layer in range(dims["num_hidden_layers"]):
        state[f"model.layers.{layer}.input_layernorm.weight"] = torch.ones(h)
        state.update({f"model.layers.{layer}.{n}.weight": torch.randn(*s) for n, s in shapes.items()})
        state[f"model.layers.{layer}.post_attention_layernorm.weight"] = torch.ones(h)
    state["model.norm.weight"] = torch.ones(h)
    return state


@pytest.mark.parametrize("profile, biases", [("qwen-npu", 6), ("phonelm-npu", 0)])
def test_a_decoding_model_is_checked_against_what_its_cpu_model_loads(tmp_path, capsys, profile, biases):
    """A Q4_0 file beside runtime.json is the decoding model: every tensor mllm's CPU model loads (q/k/v
    biases for the Qwen model, none for PhoneLM's) with its dtype and size; without the biases it is refused."""
    from shadowquant.decoding.candidates import write_decode_model

    runtime = {"runtime": profile, "cpp_config": TINY_DIMS, "shadow_layers": []}
    (tmp_path / "runtime.json").write_text(json.dumps(runtime))
    write_decode_model(tiny_float_state(TINY_DIMS), tmp_path / "decode.mllm")
    report = inspect_mllm(tmp_path / "decode.mllm", runtime=runtime)
    assert report.ok, report.problems
    assert sum(linear.has_bias for linear in report.linears) == 6 and len(report.linears) == 14  # PhoneLM's ignores them
    assert main([str(tmp_path / "decode.mllm")]) == 0
    assert "CPU decoding model of runtime profile" in capsys.readouterr().out
    write_decode_model(tiny_float_state(TINY_DIMS), tmp_path / "decode.mllm", qkv_bias=False)
    problems = {(p.name, p.what) for p in inspect_mllm(tmp_path / "decode.mllm", runtime=runtime).problems}
    wanted = {(f"model.layers.{i}.self_attn.{r}_proj.bias", "missing") for i in range(2) for r in "qkv"}
    assert problems == (wanted if biases else set())
