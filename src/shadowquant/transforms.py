"""Exact transforms folded into the float weights before quantization (issue 11).

Each transform changes only the numbers of existing tensors, never the architecture, so the
transformed model has the same tensor names and shapes (plus lm_head.weight where a tie is
broken) and runs unchanged in the mllm runtime. All arithmetic is done in float64 and cast
back to each tensor's dtype.

- `rotate`: fold the RMSNorm scales into the Linears that read the norm (norm scales become 1),
  then multiply the residual stream by one seeded orthogonal matrix Q1 (randomized Hadamard,
  see shadowquant.hadamard): embeddings E Q1, readers W Q1 (q/k/v, MLP inputs, router, lm_head),
  writers Q1^T W (o_proj, MLP outputs). RMSNorm commutes with an orthogonal Q1 once its scale is
  1. Plus "R2": one seeded orthogonal head_dim matrix Q2 per layer between v_proj (rows of every
  KV head) and o_proj (columns of every attention head); attention is linear in v, so any Q2
  shared by a KV group is exact under GQA. No online rotations.
- `equalize`: cross-layer equalization (data-free quantization): per channel i, scale s_i =
  sqrt(r1_i / r2_i) between up_proj's output row i (range r1_i, divided by s_i) and down_proj's
  input column i (range r2_i, multiplied by s_i), which makes both ranges sqrt(r1_i r2_i);
  `act(gate) * up` is linear in up. Same between v_proj rows and o_proj columns per KV group,
  and between q_proj and k_proj rows (q * s, k / s, one s per RoPE channel pair and KV group).
- `smooth`: SmoothQuant migration s_j = max|x_j|^alpha / max|W_j|^(1 - alpha) with per-channel
  input maxima from a calibration pass: q/k/v inputs into input_layernorm, MLP inputs (and the
  Mixtral router) into post_attention_layernorm, the down_proj input into up_proj's rows, the
  o_proj input into v_proj's rows (s shared by the heads of a KV group).

Transforms run in the fixed order of TRANSFORM_ORDER: rotate first (its norm folding would undo a
smoothing done before it), then equalize (weights only), then smooth (activation-aware, last so
that its scales are measured on the final weights and activations).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from shadowquant.errors import PipelineError
from shadowquant.hadamard import random_orthogonal

log = logging.getLogger(__name__)

TRANSFORM_ORDER = ("rotate", "equalize", "smooth")
_RMSNORM_ALL = ("rotate", "equalize", "smooth")
# Transforms that are exact per family. LayerNorm-with-bias families (opt, phi, falcon) would
# need mean-centering for rotate; not implemented, so nothing is offered for them.
SUPPORTED: dict[str, tuple[str, ...]] = {
    "llama": _RMSNORM_ALL,
    "qwen1": _RMSNORM_ALL,
    "qwen2": _RMSNORM_ALL,
    "mixtral": _RMSNORM_ALL,
    "gemma": _RMSNORM_ALL,
    "opt": (),
    "phi": (),
    "falcon": (),
}
_UNSUPPORTED_REASON = {
    "opt": "LayerNorm with bias; rotation needs mean-centering, which is not implemented",
    "phi": "LayerNorm with bias; rotation needs mean-centering, which is not implemented",
    "falcon": "LayerNorm with bias and fused query_key_value; not implemented",
}
# Gemma 2 adds post-attention/post-feedforward norms on the sublayer outputs: an orthogonal Q1
# does not commute with their scales, and its MLP input norm is named differently.
_GEMMA2_SUPPORTED = ("equalize",)
DEFAULT_ALPHA = 0.5
ALPHA_GRID = (0.2, 0.35, 0.5, 0.65, 0.8)
_MIN_SCALE = 1e-5


# ---------------------------------------------------------------- model structure


@dataclass
class _MlpBranch:
    """One gated MLP (or one Mixtral expert): `down(act(gate(x)) * up(x))`."""

    gate: nn.Linear
    up: nn.Linear
    down: nn.Linear


@dataclass
class _Layer:
    input_norm: nn.Module
    post_attention_norm: nn.Module
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    mlp_readers: list[nn.Linear] = field(default_factory=list)  # everything reading the MLP input
    branches: list[_MlpBranch] = field(default_factory=list)
    names: dict[str, str] = field(default_factory=dict)  # module id -> module name, for calibration


@dataclass
class _Geometry:
    num_heads: int
    num_kv_heads: int
    head_dim: int


def _decoder_layers(model: nn.Module, family: str) -> list[_Layer]:
    names = {id(module): name for name, module in model.named_modules()}
    layers = []
    for block in model.model.layers:
        attn, mlp = block.self_attn, block.mlp
        if family == "mixtral":
            branches = [_MlpBranch(e.w1, e.w3, e.w2) for e in mlp.experts]
            readers = [mlp.gate] + [linear for b in branches for linear in (b.gate, b.up)]
        else:
            branches = [_MlpBranch(mlp.gate_proj, mlp.up_proj, mlp.down_proj)]
            readers = [mlp.gate_proj, mlp.up_proj]
        layers.append(_Layer(block.input_layernorm, block.post_attention_layernorm, attn.q_proj, attn.k_proj,
                             attn.v_proj, attn.o_proj, readers, branches, names))
    return layers


def _geometry(model: nn.Module) -> _Geometry:
    config = model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return _Geometry(heads, kv_heads, head_dim)


def _norm_offset(family: str) -> float:
    """Gemma's RMSNorm multiplies by (1 + w): its effective scale is w + 1."""
    return 1.0 if family == "gemma" else 0.0


def _norm_scale(norm: nn.Module, offset: float) -> torch.Tensor:
    return norm.weight.detach().double() + offset


def _set_norm_scale(norm: nn.Module, scale: torch.Tensor, offset: float) -> None:
    norm.weight.data.copy_((scale - offset).to(norm.weight.dtype))


def _set(param: torch.Tensor, value: torch.Tensor) -> None:
    param.data.copy_(value.to(param.dtype))


# ---------------------------------------------------------------- checks


def supported_transforms(model: nn.Module, family: str) -> tuple[str, ...]:
    """The transforms that are exact for this model (family, refined by its model_type)."""
    if family not in SUPPORTED:
        raise PipelineError(f"unknown model family {family!r}; valid values: {', '.join(SUPPORTED)}")
    if family == "gemma" and getattr(model.config, "model_type", "gemma") != "gemma":
        return _GEMMA2_SUPPORTED
    return SUPPORTED[family]


def check_transforms(model: nn.Module, family: str, transforms: list[str]) -> list[str]:
    """Validate names and family support; return the transforms in their fixed application order."""
    valid = supported_transforms(model, family)
    for name in transforms:
        if name not in TRANSFORM_ORDER:
            raise PipelineError(f"unknown transform {name!r}; valid transforms: {', '.join(TRANSFORM_ORDER)} "
                                "(or none)")
    duplicates = sorted({n for n in transforms if transforms.count(n) > 1})
    if duplicates:
        raise PipelineError(f"transform {duplicates[0]!r} is listed more than once")
    for name in transforms:
        if name not in valid:
            reason = _UNSUPPORTED_REASON.get(family, f"model_type {model.config.model_type!r}: its norms on the "
                                             "attention and MLP outputs do not commute with it")
            others = "".join(f", {v}" for v in valid)
            raise PipelineError(f"transform {name!r} is not supported for family {family!r} ({reason}); "
                                f"valid transforms for {family}: {', '.join(valid) or 'none'}; set config key "
                                f"transform.variants to [none{others}]")
    return [name for name in TRANSFORM_ORDER if name in transforms]


# ---------------------------------------------------------------- rotate


def _embedding_and_head(model: nn.Module) -> tuple[nn.Embedding, nn.Linear]:
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise PipelineError(f"rotate: lm_head is a {type(head).__name__}, not an nn.Linear")
    return model.get_input_embeddings(), head


def _untie_head(model: nn.Module, head: nn.Linear) -> None:
    head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    model.config.tie_word_embeddings = False
    text_config = getattr(model.config, "get_text_config", None)
    if text_config is not None:
        text_config().tie_word_embeddings = False


def _scale_columns(linear: nn.Linear, scale: torch.Tensor) -> None:
    _set(linear.weight, linear.weight.detach().double() * scale.view(1, -1))


def _fold_norms(model: nn.Module, family: str, layers: list[_Layer]) -> bool:
    """Fold every RMSNorm scale into the Linears reading it; return whether lm_head was untied."""
    offset = _norm_offset(family)
    for layer in layers:
        for norm, readers in ((layer.input_norm, (layer.q, layer.k, layer.v)),
                              (layer.post_attention_norm, layer.mlp_readers)):
            scale = _norm_scale(norm, offset)
            for linear in readers:
                _scale_columns(linear, scale)
            _set_norm_scale(norm, torch.ones_like(scale), offset)
    embedding, head = _embedding_and_head(model)
    final_norm = model.model.norm
    scale = _norm_scale(final_norm, offset)
    untied = False
    if not torch.all(scale == 1):
        if head.weight is embedding.weight:
            _untie_head(model, head)
            untied = True
        _scale_columns(head, scale)
    _set_norm_scale(final_norm, torch.ones_like(scale), offset)
    return untied


def _rotate(model: nn.Module, family: str, generator: torch.Generator) -> dict:
    layers = _decoder_layers(model, family)
    geometry = _geometry(model)
    untied = _fold_norms(model, family, layers)
    embedding, head = _embedding_and_head(model)
    hidden = embedding.weight.shape[1]
    q1, kind1 = random_orthogonal(hidden, generator)
    q1 = q1.to(embedding.weight.device)  # drawn on the CPU so a seed gives the same matrix everywhere
    _set(embedding.weight, embedding.weight.detach().double() @ q1)
    readers = [linear for layer in layers for linear in (layer.q, layer.k, layer.v, *layer.mlp_readers)]
    if head.weight is not embedding.weight:  # a still-tied head was rotated with the embedding
        readers.append(head)
    for linear in readers:
        _set(linear.weight, linear.weight.detach().double() @ q1)
    writers = [linear for layer in layers for linear in (layer.o, *(b.down for b in layer.branches))]
    for linear in writers:
        _set(linear.weight, q1.T @ linear.weight.detach().double())
        if linear.bias is not None:
            _set(linear.bias, linear.bias.detach().double() @ q1)
    # R2: per layer one head_dim rotation, shared by every head (hence by every KV group).
    d = geometry.head_dim
    kind2 = None
    for layer in layers:
        q2, kind2 = random_orthogonal(d, generator)
        q2 = q2.to(layer.v.weight.device)
        v = layer.v.weight.detach().double().view(geometry.num_kv_heads, d, -1)
        _set(layer.v.weight, torch.einsum("dc,hdi->hci", q2, v).reshape(layer.v.weight.shape))
        if layer.v.bias is not None:
            bias = layer.v.bias.detach().double().view(geometry.num_kv_heads, d)
            _set(layer.v.bias, (bias @ q2).reshape(-1))
        o = layer.o.weight.detach().double().view(-1, geometry.num_heads, d)
        _set(layer.o.weight, (o @ q2).reshape(layer.o.weight.shape))
    return {"untied_lm_head": untied, "r1": kind1, "r1_size": hidden, "r2": kind2, "r2_size": d}


# ---------------------------------------------------------------- equalize and smooth: channel scales


def _scale_pair_up_down(up: nn.Linear, down: nn.Linear, scale: torch.Tensor) -> None:
    """up rows / s, down columns * s: `down(act(gate) * up)` is unchanged."""
    _set(up.weight, up.weight.detach().double() / scale.view(-1, 1))
    if up.bias is not None:
        _set(up.bias, up.bias.detach().double() / scale)
    _scale_columns(down, scale)


def _scale_pair_v_o(v: nn.Linear, o: nn.Linear, kv_scale: torch.Tensor, geometry: _Geometry) -> None:
    """v rows / s (per KV channel), o columns * s for every attention head of the KV group."""
    _set(v.weight, v.weight.detach().double() / kv_scale.view(-1, 1))
    if v.bias is not None:
        _set(v.bias, v.bias.detach().double() / kv_scale)
    group = geometry.num_heads // geometry.num_kv_heads
    per_head = kv_scale.view(geometry.num_kv_heads, 1, geometry.head_dim).expand(-1, group, -1).reshape(-1)
    _scale_columns(o, per_head)


def _o_columns_per_kv_channel(o_values: torch.Tensor, geometry: _Geometry) -> torch.Tensor:
    """Max over the attention heads of each KV group of a per-o-input-channel quantity."""
    group = geometry.num_heads // geometry.num_kv_heads
    return o_values.view(geometry.num_kv_heads, group, geometry.head_dim).amax(dim=1).reshape(-1)


def _safe_ratio_scale(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """Scales that leave dead channels (a zero range on either side) alone."""
    scale = numerator / denominator
    ok = (numerator > 0) & (denominator > 0) & torch.isfinite(scale)
    return torch.where(ok, scale, torch.ones_like(scale)).clamp(min=_MIN_SCALE)


def _pair_max(values: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Max over each RoPE pair (c, c + head_dim / 2) of a per-channel quantity, broadcast to both."""
    halves = values.view(-1, 2, head_dim // 2)
    return halves.amax(dim=1, keepdim=True).expand(-1, 2, -1).reshape(-1)


def _equalize_q_k(q: nn.Linear, k: nn.Linear, geometry: _Geometry) -> None:
    """q rows * s, k rows / s: every score q.k is unchanged.

    RoPE rotates the channel pairs (c, c + head_dim / 2) (transformers' rotate_half), which
    commutes with one scale per pair; a KV head's scale is shared by its group's query heads.
    """
    d = geometry.head_dim
    group = geometry.num_heads // geometry.num_kv_heads
    r_q = _pair_max(q.weight.detach().double().abs().amax(dim=1), d)
    r_q = r_q.view(geometry.num_kv_heads, group, d).amax(dim=1).reshape(-1)
    r_k = _pair_max(k.weight.detach().double().abs().amax(dim=1), d)
    kv_scale = _safe_ratio_scale(r_k, r_q).sqrt()
    q_scale = kv_scale.view(geometry.num_kv_heads, 1, d).expand(-1, group, -1).reshape(-1)
    for linear, scale in ((q, q_scale), (k, 1 / kv_scale)):
        _set(linear.weight, linear.weight.detach().double() * scale.view(-1, 1))
        if linear.bias is not None:
            _set(linear.bias, linear.bias.detach().double() * scale)


def _equalize(model: nn.Module, family: str) -> dict:
    layers = _decoder_layers(model, family)
    geometry = _geometry(model)
    pairs = 0
    for layer in layers:
        for branch in layer.branches:
            r_up = branch.up.weight.detach().double().abs().amax(dim=1)
            r_down = branch.down.weight.detach().double().abs().amax(dim=0)
            _scale_pair_up_down(branch.up, branch.down, _safe_ratio_scale(r_up, r_down).sqrt())
            pairs += 1
        r_v = layer.v.weight.detach().double().abs().amax(dim=1)
        r_o = _o_columns_per_kv_channel(layer.o.weight.detach().double().abs().amax(dim=0), geometry)
        _scale_pair_v_o(layer.v, layer.o, _safe_ratio_scale(r_v, r_o).sqrt(), geometry)
        _equalize_q_k(layer.q, layer.k, geometry)
        pairs += 2
    return {"pairs": pairs}


@torch.inference_mode()
def input_channel_absmax(model: nn.Module, linears: list[nn.Linear], calibration: list[list[int]]
                         ) -> dict[int, torch.Tensor]:
    """Per-input-channel max|x| of each Linear (keyed by id) over `calibration` token sequences.

    One sequence per forward, so no padding enters the maxima. A Linear that never runs (an
    expert no token was routed to) gets zeros.
    """
    maxima = {id(linear): torch.zeros(linear.in_features, dtype=torch.float64) for linear in linears}

    def hook(module, inputs):
        x = inputs[0].detach()
        current = x.abs().reshape(-1, x.shape[-1]).amax(dim=0).double().cpu()
        maxima[id(module)] = torch.maximum(maxima[id(module)], current)

    handles = [linear.register_forward_pre_hook(hook) for linear in linears]
    device = next(model.parameters()).device
    try:
        for sequence in calibration:
            ids = torch.tensor([sequence], dtype=torch.long, device=device)
            model(input_ids=ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return maxima


def _smoothing_scale(act: torch.Tensor, weight_max: torch.Tensor, alpha: float) -> torch.Tensor:
    scale = act.pow(alpha) / weight_max.pow(1 - alpha)
    ok = (act > 0) & (weight_max > 0) & torch.isfinite(scale)
    return torch.where(ok, scale, torch.ones_like(scale)).clamp(min=_MIN_SCALE)


def _column_max(linears: list[nn.Linear]) -> torch.Tensor:
    return torch.stack([linear.weight.detach().double().abs().amax(dim=0) for linear in linears]).amax(dim=0)


def _smooth(model: nn.Module, family: str, calibration: list[list[int]] | None, alpha: float) -> dict:
    if not calibration:
        raise PipelineError("transform 'smooth' needs calibration token sequences (calibration=...); none given")
    if not (isinstance(alpha, (int, float)) and 0 <= alpha <= 1):
        raise PipelineError(f"smooth alpha = {alpha!r} must be a number in [0, 1]")
    layers = _decoder_layers(model, family)
    geometry = _geometry(model)
    offset = _norm_offset(family)
    linears = [linear for layer in layers
               for linear in (layer.q, layer.o, *layer.mlp_readers, *(b.down for b in layer.branches))]
    device = next(model.parameters()).device
    act = {key: value.to(device) for key, value in input_channel_absmax(model, linears, calibration).items()}
    for layer in layers:
        for norm, readers in ((layer.input_norm, [layer.q, layer.k, layer.v]),
                              (layer.post_attention_norm, layer.mlp_readers)):
            # Readers of one norm see the same input; experts only their routed tokens, so take the max.
            x_max = torch.stack([act[id(r)] for r in readers if id(r) in act]).amax(dim=0)
            scale = _smoothing_scale(x_max, _column_max(readers), alpha)
            _set_norm_scale(norm, _norm_scale(norm, offset) / scale, offset)
            for linear in readers:
                _scale_columns(linear, scale)
        for branch in layer.branches:
            scale = _smoothing_scale(act[id(branch.down)], _column_max([branch.down]), alpha)
            _scale_pair_up_down(branch.up, branch.down, scale)
        o_act = _o_columns_per_kv_channel(act[id(layer.o)], geometry)
        o_weight = _o_columns_per_kv_channel(layer.o.weight.detach().double().abs().amax(dim=0), geometry)
        _scale_pair_v_o(layer.v, layer.o, _smoothing_scale(o_act, o_weight, alpha), geometry)
    return {"alpha": alpha, "calibration_sequences": len(calibration),
            "calibration_tokens": sum(len(s) for s in calibration)}


# ---------------------------------------------------------------- public API


def apply_transforms(model: nn.Module, family: str, transforms: list[str], seed: int = 0,
                     calibration: list[list[int]] | None = None, alpha: float = DEFAULT_ALPHA) -> dict:
    """Apply `transforms` in place to a loaded model (shadowquant.models.load_model); return a summary.

    Order is fixed (TRANSFORM_ORDER) whatever the order asked. `seed` seeds the rotations,
    `calibration` (token id sequences) and `alpha` feed `smooth`. The summary says what was
    applied, whether lm_head was untied from the embeddings, and per-transform notes and times.
    """
    if isinstance(transforms, str):
        transforms = [transforms]
    ordered = check_transforms(model, family, list(transforms))
    generator = torch.Generator().manual_seed(int(seed))
    notes: dict[str, dict] = {}
    untied = False
    with torch.no_grad():
        for name in ordered:
            start = time.perf_counter()
            if name == "rotate":
                notes[name] = _rotate(model, family, generator)
                untied = notes[name]["untied_lm_head"]
            elif name == "equalize":
                notes[name] = _equalize(model, family)
            else:
                notes[name] = _smooth(model, family, calibration, alpha)
            notes[name]["seconds"] = round(time.perf_counter() - start, 3)
    return {"family": family, "transforms": ordered, "seed": int(seed), "untied_lm_head": untied, "notes": notes}


def calibration_w8a8_nll(model: nn.Module, family: str, calibration: list[list[int]]) -> float:
    """Mean next-token NLL on `calibration` after static W8A8 fake quantization at absmax scales.

    Scales are the per-tensor max|x| of each quantized Linear's input and output on the same
    sequences (nothing is clipped), so this measures rounding error only; `model` is modified.
    """
    from shadowquant.decision import LayerQuant
    from shadowquant.fakequant import apply_w8a8
    from shadowquant.families import quantized_layer_names

    names = quantized_layer_names(model, family)
    linears = {name: model.get_submodule(name) for name in names}
    maxima = {name: [0.0, 0.0] for name in names}

    def hook_for(name):
        def hook(module, inputs, output):
            maxima[name][0] = max(maxima[name][0], float(inputs[0].detach().abs().max()))
            maxima[name][1] = max(maxima[name][1], float(output.detach().abs().max()))
        return hook

    device = next(model.parameters()).device
    handles = [linear.register_forward_hook(hook_for(name)) for name, linear in linears.items()]
    try:
        with torch.inference_mode():
            for sequence in calibration:
                model(input_ids=torch.tensor([sequence], device=device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    decisions = {name: LayerQuant(max(i, 1e-5), max(o, 1e-5), True, True) for name, (i, o) in maxima.items()}
    apply_w8a8(model, decisions, names)
    total, count = 0.0, 0
    with torch.inference_mode():
        for sequence in calibration:
            ids = torch.tensor([sequence], device=device)
            logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
            total += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            count += len(sequence) - 1
    return total / max(count, 1)


def search_alpha(model: nn.Module, family: str, transforms: list[str], calibration: list[list[int]],
                 seed: int = 0, grid: tuple[float, ...] = ALPHA_GRID) -> tuple[float, dict[float, float]]:
    """Pick smooth's alpha from `grid`: the one with the lowest calibration_w8a8_nll of the transformed model.

    Each candidate transforms a copy of `model` with `transforms` (which must include 'smooth');
    `model` itself is left unchanged. Returns (best alpha, {alpha: nll}).
    """
    if "smooth" not in transforms:
        raise PipelineError(f"search_alpha: transforms {list(transforms)} do not include 'smooth'")
    if not grid:
        raise PipelineError("search_alpha: the alpha grid is empty")
    scores = {}
    for alpha in grid:
        candidate = copy.deepcopy(model)
        apply_transforms(candidate, family, transforms, seed=seed, calibration=calibration, alpha=alpha)
        scores[alpha] = calibration_w8a8_nll(candidate, family, calibration)
        del candidate
    best = min(scores, key=lambda a: (scores[a] if math.isfinite(scores[a]) else math.inf, a))
    return best, scores


# ---------------------------------------------------------------- saving

# Modules that shadowquant.models.prepare_for_quantization renamed, back to the checkpoint layout.
_CHECKPOINT_NAMES = {"mixtral": ((".mlp.gate.", ".block_sparse_moe.gate."),
                                 (".mlp.experts.", ".block_sparse_moe.experts."))}


def checkpoint_state_dict(model: nn.Module, family: str) -> dict[str, torch.Tensor]:
    """The model's tensors under their checkpoint names; a tied lm_head is left out as save_pretrained does."""
    state = model.state_dict()
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    tied = head is not None and head.weight is embedding.weight
    out = {}
    for name, tensor in state.items():
        if tied and name.endswith("lm_head.weight"):
            continue
        for old, new in _CHECKPOINT_NAMES.get(family, ()):
            name = name.replace(old, new)
        out[name] = tensor.detach().cpu().contiguous().clone()
    return out


def save_transformed(model: nn.Module, tokenizer, out_dir, family: str, summary: dict | None = None):
    """Write a loadable Hugging Face directory (model.safetensors, config, tokenizer) atomically.

    Tensor names and shapes are those of the original checkpoint (plus lm_head.weight when
    apply_transforms untied it); `summary` (apply_transforms' return value) goes to transform.json.
    Returns the directory as a Path.
    """
    from pathlib import Path

    from safetensors.torch import save_file

    from shadowquant.atomic import atomic_directory

    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        save_file(checkpoint_state_dict(model, family), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        model.config.save_pretrained(tmp)
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None:
            generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if summary is not None:
            import json

            (tmp / "transform.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return out_dir


# ---------------------------------------------------------------- the workflow stage


def transform_stage(manifest, out_manifest, transforms: list[str], seed: int = 0,
                    alpha: float | str = DEFAULT_ALPHA, samples=None, num_samples: int = 16,
                    seq_len: int = 256) -> dict:
    """The transformed float model as an artefact: a model directory beside `out_manifest` and its manifest,
    which the rest of the workflow uses in place of the fetched model (same names and shapes).

    `alpha` 'auto' searches smooth's strength over ALPHA_GRID on the calibration samples (search_alpha)."""
    from shadowquant.atomic import write_json
    from shadowquant.corpus import read_jsonl_texts
    from shadowquant.manifest import read_manifest
    from shadowquant.models import inspect_model_dir, load_model_from_manifest
    from shadowquant.profiling import tokenize_samples

    fetched = read_manifest(manifest)
    model, tokenizer, family = load_model_from_manifest(manifest, device="cpu", dtype="float32")
    calibration = None
    if "smooth" in transforms:
        if samples is None:
            raise PipelineError("transform 'smooth' needs calibration samples; none were given")
        texts = read_jsonl_texts(samples)[:num_samples]
        calibration = [s for s in tokenize_samples(tokenizer, texts, seq_len) if len(s) >= 2]
    alpha_search = None
    if alpha == "auto":
        if "smooth" in transforms:
            alpha, scores = search_alpha(model, family, list(transforms), calibration, seed=seed)
            alpha_search = {str(a): nll for a, nll in scores.items()}
            log.info("alpha search (calibration W8A8 NLL per token): %s -> alpha %g",
                     ", ".join(f"{a}: {nll:.4f}" for a, nll in scores.items()), alpha)
        else:
            alpha = DEFAULT_ALPHA  # unused without 'smooth'
    summary = apply_transforms(model, family, list(transforms), seed=seed, calibration=calibration, alpha=alpha)
    if alpha_search is not None:
        summary["alpha_search"] = alpha_search
    out_dir = Path(out_manifest).parent / "hf"
    save_transformed(model, tokenizer, out_dir, family, summary)
    info = inspect_model_dir(out_dir, family)
    info.update(source=fetched.get("source"), trust_remote_code=False, transform=summary)
    write_json(out_manifest, info)
    log.info("transformed %s with %s%s", fetched.get("source"), ", ".join(summary["transforms"]),
             "; lm_head untied from the embeddings (exported as its own tensor)" if summary["untied_lm_head"] else "")
    return info
