"""The CPU decoding model of the phone bundle: the same (transformed) float weights as the NPU prefill
model, stored the way mllm's own quantizer stores a Q4_0 model, and its quality measured from the
stored blocks.

mllm's NPU demos prefill with the int8 QNN model and decode token by token with a second, CPU model
(examples/demo_qwen_npu.cpp loads `--decoding-model`, a `*-Q40.mllm`). That file comes from mllm's
quantizer (tools/quantizer/QuantWriter.cpp, getQuantizationTypeFor): a name containing
'embed_tokens' or 'word_embeddings' is Q4_0, a name containing one of FP32_MARKERS stays float32,
everything else is Q4_0; a model without `lm_head.weight` gets one copied from the embedding. The
decoding model is written here with the same rules from the variant the prefill model came from,
so both halves of a generation see the same rotated residual stream.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from shadowquant.atomic import write_json
from shadowquant.errors import PipelineError
from shadowquant.mllm import DTYPE_FLOAT32, DTYPE_Q4_0, read_mllm, write_mllm_v1_encoded
from shadowquant.q4_0 import check_q4_0_shape, q4_0_nbytes, quantize_q4_0
from shadowquant.runtime import QKV_ROLES, layer_role

log = logging.getLogger(__name__)

Q4_0_MARKERS = ("embed_tokens", "word_embeddings")
# QuantWriter's fp32_layers: substrings whose tensors stay float32.
FP32_MARKERS = ("norm", "rope", "bias", "rotary_emb", "_GN", "class_embedding", "embeddings", "logit_scale",
                "modality_preprocessors", "modality_heads", "modality_postprocessors", "pre_transformer_layer",
                "pos_embed.inv_freq", "ln_q", "patch_embed.proj")
EMBEDDING = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"


def decode_dtype(name: str) -> int:
    """The dtype code mllm's quantizer gives tensor `name` in a Q4_0 model."""
    if any(marker in name for marker in Q4_0_MARKERS):
        return DTYPE_Q4_0
    if any(marker in name for marker in FP32_MARKERS):
        return DTYPE_FLOAT32
    return DTYPE_Q4_0


def decode_tensors(state: dict[str, torch.Tensor], qkv_bias: bool = True) -> dict[str, torch.Tensor]:
    """The float tensors of the decoding model: the state, plus lm_head copied from a tied embedding, plus
    (`qkv_bias`) a zero bias beside every q/k/v weight that has none: mllm's CPU Qwen model
    (QWenForCausalLM, modeling_qwen.hpp) builds q/k/v with bias whatever the model, and loads it
    (runtime.decode_loaded_tensors); without one it adds uninitialised memory. A real bias is kept."""
    tensors = {name: tensor for name, tensor in state.items() if tensor.is_floating_point()}
    if LM_HEAD not in tensors:
        if EMBEDDING not in tensors:
            raise PipelineError(f"the model has neither {LM_HEAD} nor {EMBEDDING}; the decoding model needs a head")
        tensors[LM_HEAD] = tensors[EMBEDDING]
    if qkv_bias:
        for name in list(tensors):
            layer, _, kind = name.rpartition(".")
            if kind == "weight" and layer_role(layer) in QKV_ROLES and f"{layer}.bias" not in tensors:
                tensors[f"{layer}.bias"] = torch.zeros(tensors[name].shape[0], dtype=torch.float32)
    return tensors


def decode_plan(tensors: dict[str, torch.Tensor]) -> list[tuple[str, int, int]]:
    """(name, dtype code, byte size) of every tensor, in the state's order."""
    plan = []
    for name, tensor in tensors.items():
        code = decode_dtype(name)
        if code == DTYPE_Q4_0:
            check_q4_0_shape(name, tuple(tensor.shape))
            plan.append((name, code, q4_0_nbytes(tensor.numel())))
        else:
            plan.append((name, code, 4 * tensor.numel()))
    return plan


def _encoded(tensor: torch.Tensor, code: int) -> bytes:
    values = tensor.detach().to("cpu", torch.float32).contiguous().numpy()
    return quantize_q4_0(values) if code == DTYPE_Q4_0 else values.astype("<f4").tobytes()


def write_decode_model(state: dict[str, torch.Tensor], out_path: str | Path, qkv_bias: bool = True) -> dict:
    """Write the Q4_0 decoding model; returns {name: dtype} and the byte counts per dtype. `qkv_bias`: write
    zero q/k/v biases where the model has none (mllm's CPU Qwen model loads them; PhoneLM's ignores them)."""
    tensors = decode_tensors(state, qkv_bias)
    plan = decode_plan(tensors)
    codes = {name: code for name, code, _ in plan}
    write_mllm_v1_encoded(out_path, plan, lambda name: _encoded(tensors[name], codes[name]))
    q4 = sum(size for _, code, size in plan if code == DTYPE_Q4_0)
    f32 = sum(size for _, code, size in plan if code == DTYPE_FLOAT32)
    return {"tensors": len(plan), "q4_0_bytes": q4, "float32_bytes": f32,
            "q4_0_tensors": sum(code == DTYPE_Q4_0 for _, code, _ in plan)}


@torch.no_grad()
def load_decode_weights(model: torch.nn.Module, decode_path: str | Path) -> list[str]:
    """Replace every weight of `model` the decoding file stores with the file's values (Q4_0 decoded);
    returns the names replaced. A tied head takes the file's lm_head values for both sides only when
    the file's two copies agree, as they do when written from a tied model."""
    stored = read_mllm(decode_path)
    params = dict(model.named_parameters(remove_duplicate=False))
    replaced = []
    for name in stored.names:
        if name not in params:
            continue
        param = params[name]
        values = stored.read(name)
        if values.size != param.numel():
            raise PipelineError(f"{decode_path}: {name} holds {values.size} values, the model's has {param.numel()}")
        param.copy_(torch.from_numpy(np.ascontiguousarray(values)).reshape(param.shape).to(param.dtype))
        replaced.append(name)
    missing = [name for name in params if name not in stored]
    if missing:
        raise PipelineError(f"{decode_path}: has no {missing[0]} (and {len(missing) - 1} more) of the model")
    return replaced


def evaluate_decode_model(manifest, decode_path, samples, baseline, float_json, out_json, seq_len: int,
                          batch_size: int = 4, device: str = "auto", dtype: str = "auto",
                          num_resamples: int = 1000) -> dict:
    """Perplexity, KL to float and top-1 agreement of the Q4_0 decoding model rebuilt from its file,
    paired with the float model on the same held-out records."""
    import copy

    from shadowquant.metrics import _output_head, evaluate, per_record, result_from_per_record, summarize
    from shadowquant.models import load_model_from_manifest
    from shadowquant.sweep import _clean, evaluation_sequences, read_point_json

    model, tokenizer, _ = load_model_from_manifest(manifest, device, dtype)
    # KL needs the float logits: the float head, kept before the file's Q4_0 head replaces it.
    float_head = copy.deepcopy(_output_head(model))
    replaced = load_decode_weights(model, decode_path)
    log.info("%d tensors taken from %s", len(replaced), decode_path)
    sequences = evaluation_sequences(tokenizer, samples, seq_len)
    float_result = result_from_per_record(read_point_json(float_json)["per_record"], source=str(float_json))
    result = evaluate(model, sequences, batch_size=batch_size, baseline=baseline, float_head=float_head,
                      desc="Q4_0 decode")
    metrics = {k: _clean(v) for k, v in summarize(result, float_result, num_resamples=num_resamples).items()}
    metrics.update(point="q4_0-decode", per_record=per_record(result))
    write_json(out_json, metrics)
    log.info("Q4_0 decoding model: perplexity %.4f (%+.2f %%), KL %.4f, agreement %.4f", metrics["perplexity"],
             100 * (metrics["perplexity_increase"] or 0.0), metrics["kl"] or 0.0, metrics["agreement"] or 0.0)
    return metrics
