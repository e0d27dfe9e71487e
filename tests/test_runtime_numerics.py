"""The runtime's arithmetic around the quantized Linears (issue 24, item 4) and the float32 model under an
NPU profile: LLaMADequantize's float16 levels, the NPU RMSNorm's epsilon, the float16 SiLU variants, the
CPU's float16 attention, the CPU rounding of layer 0's q/k/v input, and the dtype every NPU run loads."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from shadowquant.config import resolve_auto, validate_config
from shadowquant.errors import PipelineError
from shadowquant.inputs.model_source import SourceInfo
from shadowquant.runtimes.profiles import PROFILES, SideSpec
from shadowquant.runtimes.runtime_linear import (RuntimeSiLU, apply_runtime_model, attention_key_extents, dequantize,
                                        fp16_cpu_attention, fp16_cpu_attention_full,
                                        fp16_lane_matmul, fp16_lane_matmul_plain, silu_fp16_poly)

QWEN = PROFILES["qwen-npu"]


def test_hvx_dequantize_rounds_int16_levels_to_float16_and_the_fp16_step():
    q = torch.tensor([2047.0, 2049.0, 4097.0, -32767.0, 100.0])
    exact = dequantize(q, 0.5, SideSpec(bits=16))
    assert exact.tolist() == [1023.5, 1024.5, 2048.5, -16383.5, 50.0]
    to32 = dequantize(q, 0.5, SideSpec(bits=16, hvx_dequantize=True))
    assert to32.dtype == torch.float32 and to32.tolist() == [1023.5, 1024.0, 2048.0, -16384.0, 50.0]
    # float16 out: the step itself is float16; below 2^-14 it is subnormal and loses relative precision.
    step = 3e-5 / 32767 * 32767  # a range of 1 over 32767 levels is about 3.05e-5
    to16 = dequantize(torch.tensor([1000.0]), step, SideSpec(bits=16, dtype="float16", hvx_dequantize=True))
    assert to16.dtype == torch.float16
    assert float(to16) == float(torch.tensor(1000.0, dtype=torch.float16) * torch.tensor(step, dtype=torch.float16))
    assert abs(float(to16) - 1000 * step) > 1e-4 * 1000 * step  # the subnormal step is off by more than fp16's 2^-11


def test_the_qwen_profile_reads_its_arithmetic_from_data():
    assert QWEN.roles["k_proj"].output.hvx_dequantize and QWEN.roles["down_proj"].output.hvx_dequantize
    assert not QWEN.shadow_roles["down_proj"].output.hvx_dequantize  # the shadow op's output is the CPU's
    assert QWEN.npu_norm_eps == 1e-6 and QWEN.silu == "fp16-sigmoid" and QWEN.attention == "fp16-cpu"
    # Layer 0 and the layer after a shadow layer quantize q/k/v on the CPU: round half to even.
    assert QWEN.spec("model.layers.0.self_attn.k_proj").input.rounding == "even"
    assert QWEN.spec("model.layers.4.self_attn.q_proj", {3}).input.rounding == "even"
    assert QWEN.spec("model.layers.4.self_attn.q_proj", {2}).input.rounding == "half_up"
    assert QWEN.spec("model.layers.4.mlp.up_proj", {3}).input.rounding == "half_up"


def test_silu_variants():
    x = torch.linspace(-7.9, 7.9, 1001)
    exact = F.silu(x)
    sigmoid = RuntimeSiLU("fp16-sigmoid")(x)
    assert sigmoid.dtype == torch.float32 and torch.equal(sigmoid, sigmoid.half().float())  # float16 values
    assert (sigmoid - exact).abs().max() < 8e-3
    assert (silu_fp16_poly(x).float() - exact).abs().max() < 8e-3  # the quartics are good inside [-8, 8)
    # Outside, the float16 index wraps onto another segment: no saturation, far from x or 0.
    assert abs(float(silu_fp16_poly(torch.tensor([12.0]))) - 12.0) > 10
    assert torch.equal(RuntimeSiLU("float")(x), exact)
    with pytest.raises(PipelineError, match="unknown SiLU variant"):
        RuntimeSiLU("fp8")


def test_fp16_lane_matmul_accumulates_in_float16():
    a = torch.full((1, 64), 1.0, dtype=torch.float16)
    b = torch.full((64, 1), 1.0 + 2.0 ** -10, dtype=torch.float16)
    # each of 8 lanes sums 8 products of 1.0009765625 in float16; exact would be 64.0625
    assert float(fp16_lane_matmul(a, b)) == 8 * float(torch.tensor(8 * (1 + 2.0 ** -10), dtype=torch.float16))
    big = torch.full((1, 2048), 1.0, dtype=torch.float16)
    ones = torch.ones(2048, 1, dtype=torch.float16)
    assert float(fp16_lane_matmul(big, ones)) == 2048.0  # 256 per lane: exact in float16


@pytest.mark.parametrize("shape_a, shape_b", [((2, 3, 7, 13), (2, 3, 13, 5)), ((1, 9, 20, 64), (1, 9, 64, 20)),
                                              ((3, 16), (16, 4)), ((1, 1, 1, 3), (1, 1, 3, 1)),
                                              ((2, 1, 5, 24), (2, 4, 24, 6))])
@pytest.mark.parametrize("scale", [1.0, 40.0, 1e-3, 300.0])  # 300: float16 overflow
def test_fp16_lane_matmul_matches_the_plain_accumulation_to_the_bit(shape_a, shape_b, scale):
    generator = torch.Generator().manual_seed(int(scale * 1000) + len(shape_a) + shape_a[-1])
    a = (torch.randn(shape_a, generator=generator) * scale).to(torch.float16)
    b = (torch.randn(shape_b, generator=generator) * scale).to(torch.float16)
    a[..., 0] = 0.0  # zeros and negative zeros: the first step must keep their sign
    b[..., -1, :] = -0.0
    got, want = fp16_lane_matmul(a, b), fp16_lane_matmul_plain(a, b)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))


def test_fp16_attention_is_close_to_float_attention_and_masks_like_it():
    torch.manual_seed(0)
    module = type("M", (), {"num_key_value_groups": 2})()
    q, k, v = torch.randn(2, 4, 6, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    mask = torch.ones(2, 1, 6, 6, dtype=torch.bool).tril()
    out, _ = fp16_cpu_attention(module, q, k, v, mask, scaling=8 ** -0.5)
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    assert out.shape == (2, 6, 4, 8) and (out - ref.transpose(1, 2)).abs().max() < 5e-3
    unmasked, _ = fp16_cpu_attention(module, q, k, v, None, scaling=8 ** -0.5)
    assert torch.equal(out, unmasked)  # None means causal, as sdpa's is_causal


def _padded_float_mask(batch, q_len, k_len, lengths):
    """Hugging Face's additive mask: causal (queries are the last q_len positions) and right padding."""
    allowed = torch.ones(q_len, k_len, dtype=torch.bool).tril(k_len - q_len).expand(batch, 1, q_len, k_len).clone()
    for row, length in enumerate(lengths):
        allowed[row, :, :, length:] = False
    return torch.zeros(batch, 1, q_len, k_len).masked_fill(~allowed, torch.finfo(torch.float32).min)


@pytest.mark.parametrize("q_len,k_len,mask_kind", [(128, 128, "none"), (37, 37, "bool"), (5, 40, "none"),
                                                  (40, 40, "float"), (1, 9, "none"), (33, 33, "padded")])
def test_tiled_attention_equals_the_full_one_to_the_bit(q_len, k_len, mask_kind):
    generator = torch.Generator().manual_seed(q_len * 1000 + k_len)
    module = type("M", (), {"num_key_value_groups": 3})()
    q = torch.randn(2, 6, q_len, 16, generator=generator) * 3
    k, v = torch.randn(2, 2, k_len, 16, generator=generator) * 3, torch.randn(2, 2, k_len, 16, generator=generator)
    causal = torch.ones(q_len, k_len, dtype=torch.bool).tril(k_len - q_len)
    mask = {"none": None, "bool": causal.expand(2, 1, q_len, k_len),
            "float": _padded_float_mask(2, q_len, k_len, [k_len, k_len]),
            "padded": _padded_float_mask(2, q_len, k_len, [k_len, 7])}[mask_kind]
    tiled, _ = fp16_cpu_attention(module, q, k, v, mask, scaling=0.25)
    full, _ = fp16_cpu_attention_full(module, q, k, v, mask, scaling=0.25)
    assert torch.equal(tiled, full)


def test_attention_key_extents_skip_only_keys_no_row_of_a_tile_sees():
    assert attention_key_extents(None, 40, 40, tile=16) == [(0, 16, 16), (16, 32, 32), (32, 40, 40)]
    assert attention_key_extents(None, 4, 10, tile=16) == [(0, 4, 10)]  # decoding after a 6-token prefix
    # Right padding in one batch element does not shorten the extent another element needs.
    assert attention_key_extents(_padded_float_mask(2, 20, 20, [20, 3]), 20, 20, tile=8) == [
        (0, 8, 8), (8, 16, 16), (16, 20, 20)]
    # A key hidden from every row (a padded position in the only batch element) is never computed.
    assert attention_key_extents(_padded_float_mask(1, 20, 20, [3]), 20, 20, tile=8) == [
        (0, 8, 3), (8, 16, 3), (16, 20, 3)]
    nothing = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    assert attention_key_extents(nothing, 4, 4) == [(0, 4, 0)]


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                         num_hidden_layers=3, vocab_size=50, rms_norm_eps=1e-5)
    return LlamaForCausalLM(config).eval()


def test_apply_runtime_model_patches_norms_silu_and_attention_per_shadow_set():
    model = _tiny_llama()
    ids = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        before = model(ids).logits
        apply_runtime_model(model, QWEN, {1})
        layers = model.model.layers
        # input_layernorm: the CPU's (model eps) in layer 0 and after shadow layer 1, else the NPU's 1e-6.
        assert [n.input_layernorm.variance_epsilon for n in layers] == [1e-5, 1e-6, 1e-5]
        assert all(n.post_attention_layernorm.variance_epsilon == 1e-6 for n in layers)
        assert model.model.norm.variance_epsilon == 1e-5  # the final norm runs on the CPU
        # gate's SiLU: float16 in normal layers; a shadow layer's gate is float32 (the model's own SiLU)
        assert [getattr(n.mlp.act_fn, "variant", "model") for n in layers] == ["fp16-sigmoid", "model", "fp16-sigmoid"]
        assert model.config._attn_implementation != "shadowquant_fp16_cpu"  # the masks stay the model's
        simulated = model(ids).logits
        assert 0 < (simulated - before).abs().max() < 0.05
        apply_runtime_model(model, replace(QWEN, npu_norm_eps=None, silu="float", attention="float"), set())
        assert [n.input_layernorm.variance_epsilon for n in layers] == [1e-5] * 3
        assert torch.equal(model(ids).logits, before)


def test_another_activation_is_left_alone():
    model = _tiny_llama()
    for layer in model.model.layers:
        layer.mlp.act_fn = torch.nn.ReLU()
    apply_runtime_model(model, QWEN, set())
    assert all(isinstance(layer.mlp.act_fn, torch.nn.ReLU) for layer in model.model.layers)


def test_apply_runtime_refuses_a_model_that_is_not_float32():
    from shadowquant.runtimes.runtime_linear import apply_runtime

    model = _tiny_llama().to(torch.bfloat16)
    with pytest.raises(PipelineError, match="simulated on the float32 model, but this one is bfloat16"):
        apply_runtime(model, {}, [], QWEN)


@pytest.mark.parametrize("dtype", ["auto", "bfloat16", "float16"])
def test_an_npu_profile_loads_the_model_in_float32(dtype, capsys):
    cfg = validate_config({"runtime": {"profile": "qwen-npu"}, "dtype": dtype}, source="c.yaml")
    assert cfg["dtype"] == "float32"
    assert f"shadowquant: dtype {dtype} -> float32: runtime.profile qwen-npu" in capsys.readouterr().err
    # 'auto' profile: decided once the family is known
    auto = validate_config({"dtype": dtype})
    assert auto["dtype"] == dtype
    assert resolve_auto(auto, SourceInfo("llama", None, "model.type"))[0]["dtype"] == "float32"
    assert resolve_auto(auto, SourceInfo("opt", None, "model.type"))[0]["dtype"] == dtype
    # the ideal profile keeps what the config says, without a word
    capsys.readouterr()
    assert validate_config({"runtime": {"profile": "ideal"}, "dtype": dtype})["dtype"] == dtype
    assert capsys.readouterr().err == ""
