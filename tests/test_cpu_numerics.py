"""The simulation of mllm's CPU numerics (cpu_numerics.py): Q8_0 inputs to Q4_0 / Q8_0 matmuls, float16 K/V."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shadowquant.decoding.cpu_numerics import (fake_quantize_q8_0, formats_from_dtypes, fp16_kv, install_input_quantization,
                                      linear_reference, linear_names, mllm_cpu_numerics, vec_dot_q4_0_q8_0,
                                      vec_dot_q8_0_q8_0)
from shadowquant.errors import PipelineError
from shadowquant.decoding.q4_0 import dequantize_q4_0, quantize_q4_0
from shadowquant.decoding.q8_0 import dequantize_q8_0, fake_quantize_q8_0 as np_fake_quantize_q8_0, quantize_q8_0

EPS32 = 2.0 ** -24


@pytest.mark.parametrize("variant", ["neon", "avx2", "reference"])
def test_torch_fake_quant_is_the_encoder(variant):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((16, 128)) * rng.lognormal(0, 2, (16, 1))).astype(np.float32)
    x[3, :32] = 0.0
    ties = (rng.integers(-253, 254, (4, 32)) / 2).astype(np.float32)
    ties[:, 0] = 127.0
    x[4:8, 32:64] = ties
    ours = fake_quantize_q8_0(torch.from_numpy(x), variant).numpy()
    assert np.array_equal(ours, np_fake_quantize_q8_0(x, variant))
    assert np.array_equal(ours, dequantize_q8_0(quantize_q8_0(x, variant)).reshape(x.shape))


def test_scalar_dot_hand_block():
    # Q4_0 weight block: d = 0.5, codes 9 (value +1 * 0.5) in the low nibbles, 7 (-1 * 0.5) in the high ones
    w = np.float16(0.5).tobytes() + bytes([0x79] * 16)
    # Q8_0 input block: d = 0.25, codes 1..32
    x = np.float16(0.25).tobytes() + np.arange(1, 33, dtype=np.int8).tobytes()
    sumi = sum(range(1, 17)) - sum(range(17, 33))
    assert vec_dot_q4_0_q8_0(w, x) == np.float32(sumi * 0.5 * 0.25)
    w8 = np.float16(2.0).tobytes() + np.full(32, -1, np.int8).tobytes()
    assert vec_dot_q8_0_q8_0(w8, x) == np.float32(-sum(range(1, 33)) * 2.0 * 0.25)


@pytest.mark.parametrize("weight_format", ["q4_0", "q8_0"])
def test_fast_linear_equals_scalar_reference(weight_format):
    rng = np.random.default_rng(1)
    out_features, in_features = 12, 256
    w = (rng.standard_normal((out_features, in_features)) * rng.lognormal(0, 1, (out_features, 1))).astype(np.float32)
    x = (rng.standard_normal((3, in_features)) * rng.lognormal(0, 2, (3, 1))).astype(np.float32)
    bias = rng.standard_normal(out_features).astype(np.float32)
    if weight_format == "q4_0":
        data, decoded = quantize_q4_0(w), None
        decoded = dequantize_q4_0(data).reshape(w.shape)
    else:
        data = quantize_q8_0(w)
        decoded = dequantize_q8_0(data).reshape(w.shape)
    ref = linear_reference(data, weight_format, out_features, in_features, x, bias)
    xq = fake_quantize_q8_0(torch.from_numpy(x))
    fast = torch.nn.functional.linear(xq, torch.from_numpy(decoded), torch.from_numpy(bias)).numpy()
    # equal to float32 rounding: within a few float32 steps of the sum of the magnitudes of the terms
    magnitude = np.abs(xq.numpy()) @ np.abs(decoded).T + np.abs(bias)
    assert (np.abs(fast - ref) <= 4 * in_features / 32 * EPS32 * magnitude).all()
    exact = xq.numpy().astype(np.float64) @ decoded.T.astype(np.float64) + bias
    assert (np.abs(ref - exact) <= 4 * in_features / 32 * EPS32 * magnitude).all()
    # and not the float matmul: the input quantization is visible
    plain = x @ decoded.T + bias
    assert np.abs(plain - ref).max() > 100 * EPS32 * magnitude.max()


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).eval()


def test_input_hooks_quantize_every_linear():
    model = _tiny_llama()
    ids = torch.randint(0, 96, (2, 10))
    seen = {}

    def spy(name):
        def hook(module, args):
            seen[name] = args[0]
        return hook

    names = linear_names(model)
    assert "lm_head" in names and "model.layers.0.mlp.down_proj" in names
    with torch.no_grad(), mllm_cpu_numerics(model, kv_float16=False):
        spies = [dict(model.named_modules())[n].register_forward_pre_hook(spy(n)) for n in names]
        model(ids)
        for handle in spies:
            handle.remove()
    for name, x in seen.items():
        assert torch.equal(x, fake_quantize_q8_0(x)), name  # a Q8_0 round trip is the identity on Q8_0 values
    assert not any(m._forward_pre_hooks for m in model.modules())  # hooks removed after the block
    with pytest.raises(PipelineError):
        install_input_quantization(model, {"nope": "q4_0"})
    with pytest.raises(PipelineError):
        install_input_quantization(model, {"lm_head": "iq2"})


def test_float16_kv_is_after_rope_and_cache_consistent():
    model = _tiny_llama()
    ids = torch.randint(0, 96, (1, 12))
    with torch.no_grad():
        float_logits = model(ids).logits
        captured = []
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        with fp16_kv(model):
            name = model.config._attn_implementation
            assert name.startswith("mllm_fp16kv_")
            inner = ALL_ATTENTION_FUNCTIONS._global_mapping["sdpa"]

            def capture(module, query, key, value, *args, **kwargs):
                captured.append((key, value))
                return inner(module, query, key, value, *args, **kwargs)

            ALL_ATTENTION_FUNCTIONS._global_mapping["sdpa"] = capture
            try:
                sim_logits = model(ids).logits
            finally:
                ALL_ATTENTION_FUNCTIONS._global_mapping["sdpa"] = inner
            # incremental decoding through the KV cache gives the teacher-forced logits
            out = model(ids[:, :8], use_cache=True)
            cache, steps = out.past_key_values, [out.logits[:, -1]]
            for t in range(8, 12):
                out = model(ids[:, t:t + 1], cache=cache, use_cache=True)
                cache = out.past_key_values
                steps.append(out.logits[:, -1])
        assert model.config._attn_implementation == "sdpa"
        assert torch.equal(model(ids).logits, float_logits)  # restored
    assert len(captured) == 2  # one call per layer
    for key, value in captured:
        assert torch.equal(key, key.half().float()) and torch.equal(value, value.half().float())
    assert not torch.equal(sim_logits, float_logits)
    assert torch.allclose(sim_logits, float_logits, atol=1e-2)
    incremental = torch.stack(steps, dim=1)
    assert torch.allclose(incremental, sim_logits[:, 7:], atol=1e-5)


def test_float16_kv_eager():
    model = _tiny_llama()
    model.config._attn_implementation = "eager"
    ids = torch.randint(0, 96, (1, 9))
    with torch.no_grad():
        float_logits = model(ids).logits
        with fp16_kv(model):
            assert model.config._attn_implementation == "mllm_fp16kv_eager"
            sim = model(ids).logits
    assert not torch.equal(sim, float_logits) and torch.allclose(sim, float_logits, atol=1e-2)


def test_formats_from_dtypes():
    model = _tiny_llama()
    names = linear_names(model)
    dtypes = {f"{n}.weight": 2 for n in names}
    dtypes["lm_head.weight"] = 8
    dtypes["model.layers.0.mlp.down_proj.weight"] = 0
    formats = formats_from_dtypes(model, dtypes)
    assert formats["lm_head"] == "q8_0" and formats["model.layers.0.mlp.down_proj"] == "f32"
    assert formats["model.layers.1.self_attn.q_proj"] == "q4_0"
    handles = install_input_quantization(model, formats)
    assert len(handles) == len(names) - 1  # float32 weights keep float32 inputs
    for handle in handles:
        handle.remove()
    del dtypes["lm_head.weight"]
    with pytest.raises(PipelineError):
        formats_from_dtypes(model, dtypes)
