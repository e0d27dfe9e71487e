"""Simulated W8A8: the pure fake-quant functions against a numpy re-derivation, W8A8Linear, apply_w8a8."""

import numpy as np
import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, OPTConfig

from shadowquant.runtimes.decision import LayerQuant
from shadowquant.errors import PipelineError
from shadowquant.runtimes.fakequant import (
    W8A8Linear,
    apply_w8a8,
    dequantized_linear_from_export,
    fake_quant_activation,
    fake_quant_weight,
    input_step,
    output_step,
    quantize_per_tensor,
)

F32 = np.float32


# --- numpy re-derivations of docs/method.md section 3 (float32, as the reference's torch tensors) ---

def np_output_step(scale):
    return F32(max(F32(scale), F32(1e-5)) / F32(127))


def np_input_step(scale):
    s = np_output_step(scale)
    return F32(np.round(s * F32(100000)) / F32(100000))  # np.round: half to even, like torch.round


def np_fake_quant(x, step, clip):
    q = np.round(x.astype(F32) / F32(step))
    if clip:
        q = np.clip(q, -128, 127)
    return (q * F32(step)).astype(F32)


def np_fake_quant_weight(w):
    w = w.astype(F32)
    s = F32(max(np.abs(w).max(), F32(1e-5)) / F32(127))
    return (np.round(w / s) * s).astype(F32)


def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128)
    return AutoModelForCausalLM.from_config(config).eval()


def tiny_opt():
    torch.manual_seed(0)
    config = OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=128,
                       word_embed_proj_dim=32, max_position_embeddings=64)
    return AutoModelForCausalLM.from_config(config).eval()


def linear_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and "lm_head" not in n]


# --- steps ---

def test_steps_match_float32_rederivation():
    rng = np.random.default_rng(0)
    scales = np.exp(rng.uniform(np.log(1e-3), np.log(1e4), 5000)).tolist() + [0.5, 1.0, 127.0, 152.0]
    for s in scales:
        assert input_step(s) == np_input_step(s), s
        assert output_step(s) == np_output_step(s), s
    assert input_step(0.5) == pytest.approx(0.00394, abs=1e-9)
    assert output_step(0.5) == F32(0.5) / F32(127)


def test_input_step_float32_differs_from_float64_somewhere():
    # Why the steps are computed in float32: float64 Python rounding would change some steps.
    rng = np.random.default_rng(1)
    scales = np.exp(rng.uniform(np.log(1e-3), np.log(1e3), 20000))
    f64 = [F32(round(max(s, 1e-5) / 127 * 1e5) / 1e5) for s in scales]
    assert any(input_step(s) != v for s, v in zip(scales.tolist(), f64))


def test_scale_clamp_and_zero_step_fallback():
    floor = F32(1e-5) / F32(127)
    assert output_step(1e-9) == floor
    # 1e-5 / 127 rounds to 0 at 5 decimals (the reference would divide by zero): keep the unrounded step.
    assert input_step(1e-9) == floor
    assert input_step(6e-4) == F32(6e-4) / F32(127)
    assert input_step(7e-4) == pytest.approx(1e-5)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), "x"])
def test_bad_scales_raise(bad):
    with pytest.raises(PipelineError):
        input_step(bad)
    with pytest.raises(PipelineError):
        output_step(bad)


# --- activations ---

@pytest.mark.parametrize("clip", [True, False])
def test_activation_matches_numpy(clip):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 48, generator=g) * 4
    for scale in (0.3, 2.0, 11.0, 150.0):
        step = input_step(scale)
        out = fake_quant_activation(x, step, clip)
        assert out.dtype == torch.float32
        np.testing.assert_array_equal(out.numpy(), np_fake_quant(x.numpy(), step, clip))
        # float64 view: a value moves by at most half a step unless clamped.
        err = np.abs(out.numpy().astype(np.float64) - x.numpy().astype(np.float64))
        inside = np.abs(x.numpy()) <= 127 * step
        assert err[inside].max() <= step / 2 * (1 + 1e-5)


def test_activation_half_way_values_round_to_even():
    step = 0.25  # exact in binary: x / step lands exactly on .5
    k = np.arange(-6, 6)
    x = torch.tensor((k + 0.5) * step, dtype=torch.float32)
    q = (fake_quant_activation(x, step, clip=False) / step).numpy()
    np.testing.assert_array_equal(q, np.round(k + 0.5))  # half to even
    np.testing.assert_array_equal(q[[5, 6, 7, 8]], [0.0, 0.0, 2.0, 2.0])  # -0.5, 0.5, 1.5, 2.5


def test_shadow_keeps_outliers_clip_saturates():
    step = 0.01
    x = torch.tensor([5.0, -5.0, 1.0, -1.28, 1.275])
    shadow = fake_quant_activation(x, step, clip=False)
    clipped = fake_quant_activation(x, step, clip=True)
    torch.testing.assert_close(shadow, torch.tensor([500.0, -500.0, 100.0, -128.0, 128.0]) * F32(step), rtol=0, atol=0)
    torch.testing.assert_close(clipped, torch.tensor([127.0, -128.0, 100.0, -128.0, 127.0]) * F32(step), rtol=0, atol=0)


def test_activation_keeps_dtype():
    x = torch.randn(10, 8).to(torch.bfloat16)
    out = fake_quant_activation(x, input_step(3.0), True)
    assert out.dtype == torch.bfloat16
    expected = np_fake_quant(x.float().numpy(), input_step(3.0), True)
    torch.testing.assert_close(out, torch.from_numpy(expected).to(torch.bfloat16), rtol=0, atol=0)


# --- weights ---

def test_weight_matches_numpy_and_int8_range():
    g = torch.Generator().manual_seed(4)
    for w in (torch.randn(33, 17, generator=g), torch.randn(40, generator=g) * 1e-3, -torch.rand(5, 5, generator=g)):
        np.testing.assert_array_equal(fake_quant_weight(w).numpy(), np_fake_quant_weight(w.numpy()))
        q, s = quantize_per_tensor(w)
        assert q.dtype == torch.int8 and int(q.abs().max()) == 127 and s.dtype == torch.float32


def test_weight_scale_clamp():
    tiny = torch.tensor([4e-6, -2e-6, 0.0])
    q, s = quantize_per_tensor(tiny)
    assert float(s) == F32(1e-5) / F32(127)
    np.testing.assert_array_equal(q.numpy(), [51, -25, 0])  # 4e-6 * 127 / 1e-5 = 50.8; -25.4
    assert torch.equal(fake_quant_weight(torch.zeros(3, 3)), torch.zeros(3, 3))


def test_weight_bf16_quantized_in_float32():
    w = torch.randn(16, 8).to(torch.bfloat16)
    out = fake_quant_weight(w)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, torch.from_numpy(np_fake_quant_weight(w.float().numpy())).to(torch.bfloat16))


# --- W8A8Linear ---

@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("clip_in,clip_out", [(True, True), (False, True), (False, False)])
def test_w8a8_linear_equals_manual_formula(bias, clip_in, clip_out):
    torch.manual_seed(5)
    linear = nn.Linear(24, 12, bias=bias)
    quant = LayerQuant(input_scale=1.3, output_scale=0.4, clip_input=clip_in, clip_output=clip_out)
    layer = W8A8Linear.from_linear(linear, quant)
    x = torch.randn(3, 7, 24) * 2
    xq = np_fake_quant(x.numpy(), np_input_step(1.3), clip_in)
    w = np_fake_quant_weight(linear.weight.detach().numpy())
    b = torch.from_numpy(np_fake_quant_weight(linear.bias.detach().numpy())) if bias else None
    y = torch.nn.functional.linear(torch.from_numpy(xq), torch.from_numpy(w), b)
    expected = np_fake_quant(y.numpy(), np_output_step(0.4), clip_out)
    np.testing.assert_array_equal(layer(x).numpy(), expected)
    # The layer is not a no-op: the output differs from float.
    assert not torch.allclose(layer(x), linear(x))


def test_export_roundtrip_is_exact():
    torch.manual_seed(6)
    linear = nn.Linear(20, 10)
    layer = W8A8Linear.from_linear(linear, LayerQuant(1.0, 1.0, True, True))
    q_w, s_w = layer.int8_weight()
    q_b, s_b = layer.int8_bias()
    ref_q, ref_s = quantize_per_tensor(linear.weight)
    assert torch.equal(q_w, ref_q) and float(s_w) == float(ref_s)
    # Export layout: int8 transposed to [in, out].
    weight, bias = dequantized_linear_from_export(q_w.t().contiguous(), s_w, q_b, s_b)
    assert torch.equal(weight, layer.weight) and torch.equal(bias, layer.bias)
    assert W8A8Linear.from_linear(nn.Linear(4, 3, bias=False), LayerQuant(1, 1, True, True)).int8_bias() is None


def test_export_roundtrip_bf16():
    torch.manual_seed(7)
    linear = nn.Linear(64, 32).to(torch.bfloat16)
    layer = W8A8Linear.from_linear(linear, LayerQuant(1.0, 1.0, True, True))
    q_w, s_w = layer.int8_weight()
    assert torch.equal(q_w, quantize_per_tensor(linear.weight)[0])
    weight, _ = dequantized_linear_from_export(q_w.t().contiguous(), s_w)
    assert torch.equal(weight.to(torch.bfloat16), layer.weight)


def test_int8_weight_detects_modified_weights():
    layer = W8A8Linear.from_linear(nn.Linear(8, 4), LayerQuant(1.0, 1.0, True, True))
    with torch.no_grad():
        layer.weight[0, 0] += 1e-3
    with pytest.raises(PipelineError):
        layer.int8_weight()


def test_dequantize_rejects_bad_export():
    with pytest.raises(PipelineError):
        dequantized_linear_from_export(torch.zeros(3, 4), 0.1)
    with pytest.raises(PipelineError):
        dequantized_linear_from_export(torch.zeros(3, 4, dtype=torch.int8), 0.1, torch.zeros(4, dtype=torch.int8))


# --- apply_w8a8 ---

@pytest.mark.parametrize("make_model", [tiny_llama, tiny_opt])
def test_apply_changes_exactly_the_named_layers(make_model):
    model = make_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    all_linears = linear_names(model)
    chosen = [n for n in all_linears if n.endswith(("q_proj", "fc1", "up_proj"))]
    assert chosen
    decisions = {n: LayerQuant(2.0, 2.0, True, False) for n in all_linears}
    ids = torch.randint(0, 128, (2, 9))
    float_logits = model(ids).logits

    assert apply_w8a8(model, decisions, chosen) is model
    modules = dict(model.named_modules())
    for name in all_linears:
        expected = W8A8Linear if name in chosen else nn.Linear
        assert type(modules[name]) is expected, name
    assert type(model.lm_head) is nn.Linear
    for name, param in model.named_parameters():
        layer = name.rsplit(".", 1)[0]
        if layer in chosen:
            assert torch.equal(param, fake_quant_weight(before[name])), name
        else:
            assert torch.equal(param, before[name]), name
    quant_logits = model(ids).logits
    assert quant_logits.shape == float_logits.shape and not torch.allclose(quant_logits, float_logits)


def test_apply_errors():
    model = tiny_llama()
    names = linear_names(model)
    decisions = {n: LayerQuant(1.0, 1.0, True, True) for n in names}
    with pytest.raises(PipelineError, match="no module named"):
        apply_w8a8(model, {**decisions, "model.layers.9.mlp.up_proj": decisions[names[0]]}, ["model.layers.9.mlp.up_proj"])
    with pytest.raises(PipelineError, match="not an nn.Linear"):
        apply_w8a8(model, {"model.norm": decisions[names[0]]}, ["model.norm"])
    with pytest.raises(PipelineError, match="no quantization decision"):
        apply_w8a8(model, {}, names[:1])
    with pytest.raises(PipelineError, match="more than once"):
        apply_w8a8(model, decisions, [names[0], names[0]])
    apply_w8a8(model, decisions, names[:1])
    with pytest.raises(PipelineError, match="not an nn.Linear"):  # already converted
        apply_w8a8(model, decisions, names[:1])


def _absmax_activations(model, names, ids):
    stats = {}

    def hook(name):
        def record(module, args, output):
            side = stats.setdefault(name, {"input": 0.0, "output": 0.0})
            side["input"] = max(side["input"], float(args[0].abs().max()))
            side["output"] = max(side["output"], float(output.abs().max()))
        return record

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    return stats


def test_full_range_scales_are_nearly_float_tiny_scales_are_not():
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(8))
    float_model = tiny_llama()
    names = linear_names(float_model)
    with torch.no_grad():
        float_logits = float_model(ids).logits
    stats = _absmax_activations(float_model, names, ids)

    # A huge threshold clips every side at its maximum: only rounding error remains.
    wide = {n: LayerQuant(s["input"], s["output"], True, True) for n, s in stats.items()}
    with torch.no_grad():
        wide_logits = apply_w8a8(tiny_llama(), wide, names)(ids).logits
    rel = (wide_logits - float_logits).abs().max() / float_logits.abs().max()
    assert rel < 0.05

    tiny = {n: LayerQuant(s["input"] / 50, s["output"] / 50, True, True) for n, s in stats.items()}
    with torch.no_grad():
        tiny_logits = apply_w8a8(tiny_llama(), tiny, names)(ids).logits
    assert (tiny_logits - float_logits).abs().max() / float_logits.abs().max() > 5 * rel


@pytest.mark.parametrize("seed", range(4))
def test_the_coarse_to_fine_mse_search_finds_the_full_grids_minimum(seed):
    from shadowquant.runtimes.fakequant import INT8_MAX, MSE_GRID_LOW, MSE_GRID_STEPS, mse_weight_step

    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(96, 64, generator=generator) * torch.rand(96, 1, generator=generator) * 3
    weight = weight.pow(3) if seed % 2 else weight  # heavy tails clip further
    magnitudes = weight.abs().flatten()
    fractions = torch.linspace(MSE_GRID_LOW, 1.0, MSE_GRID_STEPS, dtype=torch.float64)
    steps = (magnitudes.max().double() * fractions).float() / INT8_MAX
    steps[-1] = magnitudes.max() / INT8_MAX
    errors = [float(((torch.round(magnitudes / s).clamp(max=INT8_MAX) * s).double() - magnitudes.double())
                    .pow(2).sum()) for s in steps]
    best = max(i for i, e in enumerate(errors) if e == min(errors))
    assert float(mse_weight_step(weight)) == float(steps[best])
