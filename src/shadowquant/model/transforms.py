"""Exact transforms folded into the float weights before quantization (issue 11).

Each transform changes only the numbers of existing tensors, never the architecture, so the
transformed model has the same tensor names and shapes (plus lm_head.weight where a tie is
broken) and runs unchanged in the mllm runtime. All arithmetic is done in float64 and cast
back to each tensor's dtype. Where each family keeps its modules is data (families.Layout); one code
path serves them all.

- `rotate`: fold the norm scales into the Linears that read the norm (norm scales become 1),
  then multiply the residual stream by one seeded orthogonal matrix Q1 (randomized Hadamard,
  see shadowquant.model.hadamard): embeddings E Q1, readers W Q1 (q/k/v, MLP inputs, router, lm_head),
  writers Q1^T W (o_proj, MLP outputs). RMSNorm commutes with an orthogonal Q1 once its scale is
  1. Plus "R2": one seeded orthogonal head_dim matrix Q2 per layer between v_proj (rows of every
  KV head) and o_proj (columns of every attention head); attention is linear in v, so any Q2
  shared by a KV group is exact under GQA. No online rotations.
  LayerNorm families (opt, phi, falcon): LayerNorm(x) = g * C x / sqrt(|C x|^2 / d + eps) + b with
  C = I - 1 1^T / d. Its scale g is folded like an RMSNorm scale, its bias b into the readers'
  biases (W b added), or, where a reader has no bias (Falcon, OPT's lm_head), kept on the norm as
  b / g, which its readers (columns scaled by g) turn back into W b. The norm is left as an
  nn.LayerNorm of weight 1. Its mean subtraction C commutes with Q1 only if Q1 maps the all-ones
  direction to itself, so Q1 is the randomized Hadamard times one Householder reflection that
  makes it so (hadamard.fixing_ones); then LayerNorm(x Q1) = LayerNorm(x) Q1 exactly, eps
  included, and a carried bias is rotated with the stream. Every writer of the stream
  (embeddings, OPT's positions and project_in, o/out_proj/dense, fc2) is also mean-centred (C
  folded into its outputs): not needed for exactness, since every read goes through a
  LayerNorm that drops the mean anyway, but it keeps the stream free of that dead component.
- `equalize`: cross-layer equalization (data-free quantization): per channel i, scale s_i =
  sqrt(r1_i / r2_i) between up_proj's output row i (range r1_i, divided by s_i) and down_proj's
  input column i (range r2_i, multiplied by s_i), which makes both ranges sqrt(r1_i r2_i);
  `act(gate) * up` is linear in up, and a plain MLP `down(relu(up))` passes a positive scale
  through relu (a GELU MLP, Phi and Falcon, is skipped: GELU is not positively homogeneous).
  Same between v_proj rows and o_proj columns per KV group, and between q_proj and k_proj rows
  (q * s, k / s, one s per RoPE channel pair and KV group; skipped under Phi's q/k LayerNorms).
- `smooth`: SmoothQuant migration s_j = max|x_j|^alpha / max|W_j|^(1 - alpha) with per-channel
  input maxima from a calibration pass: q/k/v inputs into input_layernorm, MLP inputs (and the
  Mixtral router) into post_attention_layernorm (a LayerNorm's weight and bias both divided by
  s), the down_proj input into up_proj's rows (gated or ReLU MLPs only, as for equalize), the
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
from shadowquant.model.families import LAYERNORM, get_family
from shadowquant.model.hadamard import fixing_ones, random_orthogonal
from shadowquant.model.transform_support import TRANSFORM_ORDER, transform_support

log = logging.getLogger(__name__)

DEFAULT_ALPHA = 0.5
ALPHA_GRID = (0.2, 0.35, 0.5, 0.65, 0.8)
_MIN_SCALE = 1e-5


# ---------------------------------------------------------------- model structure


# Activations f with f(x / s) = f(x) / s for s > 0: a plain MLP's up/down pair can be rescaled through them.
_POSITIVELY_HOMOGENEOUS = (nn.ReLU, nn.LeakyReLU)


def _get(root: nn.Module, path: str | None) -> nn.Module | None:
    """The submodule at a dotted path, or None where it is missing or set to None."""
    if path is None:
        return None
    module = root
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


@dataclass
class _Rows:
    """Output rows of a Linear in head order: a whole q/k/v projection, or its share of a fused one."""

    linear: nn.Linear
    index: torch.Tensor | None = None  # None: every row

    def weight(self) -> torch.Tensor:
        weight = self.linear.weight.detach().double()
        return weight if self.index is None else weight[self.index]

    def bias(self) -> torch.Tensor | None:
        if self.linear.bias is None:
            return None
        bias = self.linear.bias.detach().double()
        return bias if self.index is None else bias[self.index]

    def set_weight(self, value: torch.Tensor) -> None:
        if self.index is None:
            _set(self.linear.weight, value)
        else:
            self.linear.weight.data[self.index] = value.to(self.linear.weight.dtype)

    def set_bias(self, value: torch.Tensor) -> None:
        if self.index is None:
            _set(self.linear.bias, value)
        else:
            self.linear.bias.data[self.index] = value.to(self.linear.bias.dtype)


@dataclass
class _MlpBranch:
    """One MLP (or one Mixtral expert): `down(act(gate(x)) * up(x))`, or `down(act(up(x)))` without gate."""

    gate: nn.Linear | None
    up: nn.Linear
    down: nn.Linear


@dataclass
class _Layer:
    norms: list[tuple[nn.Module, list[nn.Linear]]]  # each norm and every Linear reading its output
    q: _Rows
    k: _Rows
    v: _Rows
    o: nn.Linear
    branches: list[_MlpBranch] = field(default_factory=list)
    mlp_blocked: str | None = None  # why up rows cannot be rescaled against down columns (None: they can)
    qk_blocked: str | None = None  # why q and k rows cannot be rescaled (None: they can)
    names: dict[str, str] = field(default_factory=dict)  # module id -> module name, for calibration

    @property
    def readers(self) -> list[nn.Linear]:
        return [linear for _, readers in self.norms for linear in readers]

    @property
    def writers(self) -> list[nn.Linear]:
        return [self.o, *(branch.down for branch in self.branches)]


@dataclass
class _Geometry:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rotary_dim: int  # leading channels of a q/k head that RoPE turns in pairs (c, c + rotary_dim / 2)


@dataclass
class _Stream:
    """The residual stream outside the decoder layers: who writes it first, who reads it last."""

    embeddings: list[nn.Embedding]  # their rows are stream vectors (tokens; OPT's positions)
    writers: list[nn.Linear]  # OPT's project_in
    final_norm: nn.Module | None
    final_readers: list[nn.Linear]  # lm_head, or OPT's project_out


def _first(block: nn.Module, paths: tuple[str, ...], what: str, family: str) -> nn.Module:
    for path in paths:
        module = _get(block, path)
        if module is not None:
            return module
    raise PipelineError(f"family {family!r}: a decoder layer has no {what} (looked for {', '.join(paths)})")


def _fused_qkv_rows(linear: nn.Linear, geometry: _Geometry) -> tuple[_Rows, _Rows, _Rows]:
    """Falcon's query_key_value: per KV group its query heads, then its key head, then its value head.

    The same grouping covers all three Falcon layouts: new_decoder_architecture, multi-query
    (one group of every head) and the per-head interleaved q/k/v (one head per group).
    """
    group = geometry.num_heads // geometry.num_kv_heads
    rows = geometry.num_kv_heads * (group + 2) * geometry.head_dim
    if linear.out_features != rows:
        raise PipelineError(f"fused query_key_value has {linear.out_features} rows, not the {rows} of "
                            f"{geometry.num_heads} query and {geometry.num_kv_heads} KV heads of {geometry.head_dim}")
    index = torch.arange(rows, device=linear.weight.device).view(geometry.num_kv_heads, group + 2, geometry.head_dim)
    return (_Rows(linear, index[:, :group].reshape(-1)), _Rows(linear, index[:, group].reshape(-1)),
            _Rows(linear, index[:, group + 1].reshape(-1)))


def _decoder_layers(model: nn.Module, family: str) -> list[_Layer]:
    layout = get_family(family).layout
    geometry = _geometry(model, family)
    names = {id(module): name for name, module in model.named_modules()}
    layers = []
    for block in _get(model, layout.layers):
        if isinstance(layout.qkv, str):
            q, k, v = _fused_qkv_rows(_get(block, layout.qkv), geometry)
            attention_readers = [q.linear]
        else:
            q, k, v = (_Rows(_get(block, path)) for path in layout.qkv)
            attention_readers = [q.linear, k.linear, v.linear]
        if layout.experts:
            branches = [_MlpBranch(*(_get(expert, path) for path in layout.mlp))
                        for expert in _get(block, layout.experts)]
            mlp_readers = [_get(block, layout.router)] + [linear for b in branches for linear in (b.gate, b.up)]
        else:
            branches = [_MlpBranch(*(_get(block, path) for path in layout.mlp))]
            mlp_readers = [linear for linear in (branches[0].gate, branches[0].up) if linear is not None]
        attention_norm = _first(block, layout.attention_norm, "attention input norm", family)
        mlp_norm = _first(block, layout.mlp_norm, "MLP input norm", family)
        if mlp_norm is attention_norm:  # parallel attention and MLP read one norm
            norms = [(attention_norm, attention_readers + mlp_readers)]
        else:
            norms = [(attention_norm, attention_readers), (mlp_norm, mlp_readers)]
        mlp_blocked = None
        activation = _get(block, layout.activation)
        if layout.mlp[0] is None and not isinstance(activation, _POSITIVELY_HOMOGENEOUS):
            mlp_blocked = f"{type(activation).__name__} is not positively homogeneous"
        qk_blocked = f"{layout.qk_norm} normalizes q" if _get(block, layout.qk_norm) is not None else None
        layers.append(_Layer(norms, q, k, v, _get(block, layout.o), branches, mlp_blocked, qk_blocked, names))
    return layers


def _stream(model: nn.Module, family: str) -> _Stream:
    layout = get_family(family).layout
    project_in, project_out = _get(model, layout.project_in), _get(model, layout.project_out)
    embedding, head = _embedding_and_head(model)
    embeddings = [] if project_in is not None else [embedding]
    positions = _get(model, layout.positions)
    if positions is not None:
        embeddings.append(positions)
    return _Stream(embeddings, [project_in] if project_in is not None else [], _get(model, layout.final_norm),
                   [project_out if project_out is not None else head])


def _geometry(model: nn.Module, family: str) -> _Geometry:
    config = model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rotary_dim = 0
    if get_family(family).layout.rope and not getattr(config, "alibi", False):
        rope = getattr(config, "rope_parameters", None)
        factor = rope.get("partial_rotary_factor") if isinstance(rope, dict) else None
        rotary_dim = int(head_dim * (factor or getattr(config, "partial_rotary_factor", None) or 1.0))
    return _Geometry(heads, kv_heads, head_dim, rotary_dim)


def _norm_scale(norm: nn.Module, offset: float) -> torch.Tensor:
    if norm.weight is None:  # LayerNorm(elementwise_affine=False): nothing to fold
        return torch.ones(norm.normalized_shape, dtype=torch.float64)
    return norm.weight.detach().double() + offset


def _norm_bias(norm: nn.Module) -> torch.Tensor:
    bias = getattr(norm, "bias", None)
    if bias is None:  # an RMSNorm, or LayerNorm(bias=False)
        return torch.zeros_like(_norm_scale(norm, 0.0))
    return bias.detach().double()


def _set_norm_scale(norm: nn.Module, scale: torch.Tensor, offset: float) -> None:
    if norm.weight is not None:
        norm.weight.data.copy_((scale - offset).to(norm.weight.dtype))


def _set_norm_bias(norm: nn.Module, bias: torch.Tensor) -> None:
    if getattr(norm, "bias", None) is not None:
        _set(norm.bias, bias)


def _set(param: torch.Tensor, value: torch.Tensor) -> None:
    param.data.copy_(value.to(param.dtype))


# ---------------------------------------------------------------- checks


def _support(model: nn.Module, family: str) -> tuple[tuple[str, ...], str]:
    """(The transforms that are exact for this model, why the others are not): the config's answer
    (shadowquant.model.transform_support), with the final norm looked up on the model itself."""
    final_norm = _get(model, get_family(family).layout.final_norm) is not None
    return transform_support(family, model.config, final_norm=final_norm)


def supported_transforms(model: nn.Module, family: str) -> tuple[str, ...]:
    """The transforms that are exact for this model (family, refined by its config)."""
    return _support(model, family)[0]


def check_transforms(model: nn.Module, family: str, transforms: list[str]) -> list[str]:
    """Validate names and family support; return the transforms in their fixed application order."""
    valid, reason = _support(model, family)
    for name in transforms:
        if name not in TRANSFORM_ORDER:
            raise PipelineError(f"unknown transform {name!r}; valid transforms: {', '.join(TRANSFORM_ORDER)} "
                                "(or none)")
    duplicates = sorted({n for n in transforms if transforms.count(n) > 1})
    if duplicates:
        raise PipelineError(f"transform {duplicates[0]!r} is listed more than once")
    for name in transforms:
        if name not in valid:
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
    _set(linear.weight, linear.weight.detach().double() * scale.to(linear.weight.device).view(1, -1))


def _fold_norm(norm: nn.Module, readers: list[nn.Linear], offset: float, name: str) -> None:
    """Fold a norm's scale (and a LayerNorm's bias) into the Linears reading it; the norm keeps scale 1.

    A LayerNorm bias b becomes W b in the readers' biases; where a reader has no bias (adding one
    would change the checkpoint layout), b stays on the norm as b / g, which the g-scaled columns
    turn back into W b.
    """
    scale, bias = _norm_scale(norm, offset), _norm_bias(norm)
    carried = torch.zeros_like(bias)
    if torch.any(bias != 0):
        if all(linear.bias is not None for linear in readers):
            for linear in readers:
                _set(linear.bias, linear.bias.detach().double() + linear.weight.detach().double() @ bias)
        elif torch.any((scale == 0) & (bias != 0)):
            raise PipelineError(f"rotate: {name} has weight 0 but a nonzero bias in "
                                f"{int(((scale == 0) & (bias != 0)).sum())} channel(s) and a reader without bias, "
                                "so its bias cannot be folded exactly; valid: a nonzero weight wherever the bias "
                                "is not 0")
        else:
            carried = torch.where(scale == 0, torch.zeros_like(bias), bias / scale)
    for linear in readers:
        _scale_columns(linear, scale)
    _set_norm_scale(norm, torch.ones_like(scale), offset)
    _set_norm_bias(norm, carried)


def _fold_norms(model: nn.Module, family: str, layers: list[_Layer], stream: _Stream) -> bool:
    """Fold every norm into the Linears reading it; return whether lm_head was untied."""
    offset = get_family(family).norm_offset  # Gemma's RMSNorm multiplies by (1 + w)
    names = layers[0].names if layers else {}
    for layer in layers:
        for norm, readers in layer.norms:
            _fold_norm(norm, readers, offset, names.get(id(norm), "a norm"))
    embedding, head = _embedding_and_head(model)
    final = stream.final_norm
    identity = torch.all(_norm_scale(final, offset) == 1) and torch.all(_norm_bias(final) == 0)
    untied = False
    if not identity and head in stream.final_readers and head.weight is embedding.weight:
        _untie_head(model, head)
        untied = True
    _fold_norm(final, stream.final_readers, offset, names.get(id(final), "the final norm"))
    return untied


def _centre_writers(layers: list[_Layer], stream: _Stream) -> None:
    """Subtract the mean over the hidden channels from every vector written to the residual stream."""
    for embedding in stream.embeddings:
        weight = embedding.weight.detach().double()
        _set(embedding.weight, weight - weight.mean(dim=1, keepdim=True))
    for linear in stream.writers + [w for layer in layers for w in layer.writers]:
        weight = linear.weight.detach().double()
        _set(linear.weight, weight - weight.mean(dim=0, keepdim=True))
        if linear.bias is not None:
            bias = linear.bias.detach().double()
            _set(linear.bias, bias - bias.mean())


def _rotate(model: nn.Module, family: str, generator: torch.Generator) -> dict:
    layernorm = get_family(family).norm == LAYERNORM
    layers = _decoder_layers(model, family)
    geometry = _geometry(model, family)
    stream = _stream(model, family)
    untied = _fold_norms(model, family, layers, stream)
    if layernorm:
        _centre_writers(layers, stream)
    embedding, head = _embedding_and_head(model)
    hidden = layers[0].o.out_features
    q1, kind1 = random_orthogonal(hidden, generator)
    if layernorm:
        q1, kind1 = fixing_ones(q1), f"{kind1}_fixing_ones"
    q1 = q1.to(embedding.weight.device)  # drawn on the CPU so a seed gives the same matrix everywhere
    for table in stream.embeddings:
        _set(table.weight, table.weight.detach().double() @ q1)
    readers = [linear for layer in layers for linear in layer.readers]
    readers += [linear for linear in stream.final_readers if linear.weight is not embedding.weight]
    for linear in readers:  # a still-tied head was rotated with the embedding
        _set(linear.weight, linear.weight.detach().double() @ q1)
    writers = stream.writers + [linear for layer in layers for linear in layer.writers]
    for linear in writers:
        _set(linear.weight, q1.T @ linear.weight.detach().double())
        if linear.bias is not None:
            _set(linear.bias, linear.bias.detach().double() @ q1)
    if layernorm:  # biases carried on the norms live in the stream's basis
        for norm in [norm for layer in layers for norm, _ in layer.norms] + [stream.final_norm]:
            if norm.bias is not None:
                _set(norm.bias, norm.bias.detach().double() @ q1)
    # R2: per layer one head_dim rotation, shared by every head (hence by every KV group).
    d = geometry.head_dim
    kind2 = None
    for layer in layers:
        q2, kind2 = random_orthogonal(d, generator)
        q2 = q2.to(layer.v.linear.weight.device)
        v = layer.v.weight().view(geometry.num_kv_heads, d, -1)
        layer.v.set_weight(torch.einsum("dc,hdi->hci", q2, v).reshape(-1, v.shape[-1]))
        if layer.v.bias() is not None:
            layer.v.set_bias((layer.v.bias().view(geometry.num_kv_heads, d) @ q2).reshape(-1))
        o = layer.o.weight.detach().double().view(-1, geometry.num_heads, d)
        _set(layer.o.weight, (o @ q2).reshape(layer.o.weight.shape))
    return {"untied_lm_head": untied, "r1": kind1, "r1_size": hidden, "r2": kind2, "r2_size": d}


# ---------------------------------------------------------------- equalize and smooth: channel scales


def _scale_pair_up_down(up: nn.Linear, down: nn.Linear, scale: torch.Tensor) -> None:
    """up rows / s, down columns * s: `down(act(gate) * up)` (or `down(relu(up))`) is unchanged."""
    _set(up.weight, up.weight.detach().double() / scale.view(-1, 1))
    if up.bias is not None:
        _set(up.bias, up.bias.detach().double() / scale)
    _scale_columns(down, scale)


def _scale_pair_v_o(v: _Rows, o: nn.Linear, kv_scale: torch.Tensor, geometry: _Geometry) -> None:
    """v rows / s (per KV channel), o columns * s for every attention head of the KV group."""
    v.set_weight(v.weight() / kv_scale.view(-1, 1))
    if v.bias() is not None:
        v.set_bias(v.bias() / kv_scale)
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


def _pair_max(values: torch.Tensor, geometry: _Geometry) -> torch.Tensor:
    """Max over each RoPE pair (c, c + rotary_dim / 2) of a per-channel quantity, broadcast to both.

    Channels past rotary_dim (Phi's partial rotary; all of them without RoPE) keep their own value.
    """
    r = geometry.rotary_dim
    if r == 0:
        return values
    heads = values.view(-1, geometry.head_dim)
    pairs = heads[:, :r].reshape(-1, 2, r // 2).amax(dim=1, keepdim=True).expand(-1, 2, -1).reshape(-1, r)
    return torch.cat([pairs, heads[:, r:]], dim=1).reshape(-1)


def _equalize_q_k(q: _Rows, k: _Rows, geometry: _Geometry) -> None:
    """q rows * s, k rows / s: every score q.k is unchanged.

    RoPE rotates the channel pairs (c, c + rotary_dim / 2) (transformers' rotate_half), which
    commutes with one scale per pair; a KV head's scale is shared by its group's query heads.
    """
    d = geometry.head_dim
    group = geometry.num_heads // geometry.num_kv_heads
    r_q = _pair_max(q.weight().abs().amax(dim=1), geometry)
    r_q = r_q.view(geometry.num_kv_heads, group, d).amax(dim=1).reshape(-1)
    r_k = _pair_max(k.weight().abs().amax(dim=1), geometry)
    kv_scale = _safe_ratio_scale(r_k, r_q).sqrt()
    q_scale = kv_scale.view(geometry.num_kv_heads, 1, d).expand(-1, group, -1).reshape(-1)
    for rows, scale in ((q, q_scale), (k, 1 / kv_scale)):
        rows.set_weight(rows.weight() * scale.view(-1, 1))
        if rows.bias() is not None:
            rows.set_bias(rows.bias() * scale)


def _skipped(layers: list[_Layer]) -> list[str]:
    """The pairs a transform leaves alone because rescaling them would not be exact, with why."""
    reasons = {f"up/down ({layer.mlp_blocked})" for layer in layers if layer.mlp_blocked}
    return sorted(reasons)


def _equalize(model: nn.Module, family: str) -> dict:
    layers = _decoder_layers(model, family)
    geometry = _geometry(model, family)
    pairs = 0
    for layer in layers:
        for branch in layer.branches if layer.mlp_blocked is None else ():
            r_up = branch.up.weight.detach().double().abs().amax(dim=1)
            r_down = branch.down.weight.detach().double().abs().amax(dim=0)
            _scale_pair_up_down(branch.up, branch.down, _safe_ratio_scale(r_up, r_down).sqrt())
            pairs += 1
        r_v = layer.v.weight().abs().amax(dim=1)
        r_o = _o_columns_per_kv_channel(layer.o.weight.detach().double().abs().amax(dim=0), geometry)
        _scale_pair_v_o(layer.v, layer.o, _safe_ratio_scale(r_v, r_o).sqrt(), geometry)
        pairs += 1
        if layer.qk_blocked is None:
            _equalize_q_k(layer.q, layer.k, geometry)
            pairs += 1
    skipped = _skipped(layers) + sorted({f"q/k ({layer.qk_blocked})" for layer in layers if layer.qk_blocked})
    return {"pairs": pairs, **({"skipped": skipped} if skipped else {})}


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
    geometry = _geometry(model, family)
    offset = get_family(family).norm_offset  # Gemma's RMSNorm multiplies by (1 + w)
    linears = [linear for layer in layers
               for linear in (*layer.readers, layer.o,
                              *(b.down for b in layer.branches if layer.mlp_blocked is None))]
    device = next(model.parameters()).device
    act = {key: value.to(device) for key, value in input_channel_absmax(model, linears, calibration).items()}
    for layer in layers:
        for norm, readers in layer.norms:
            # Readers of one norm see the same input; experts only their routed tokens, so take the max.
            x_max = torch.stack([act[id(r)] for r in readers if id(r) in act]).amax(dim=0)
            scale = _smoothing_scale(x_max, _column_max(readers), alpha)
            _set_norm_scale(norm, _norm_scale(norm, offset) / scale, offset)
            _set_norm_bias(norm, _norm_bias(norm) / scale)
            for linear in readers:
                _scale_columns(linear, scale)
        for branch in layer.branches if layer.mlp_blocked is None else ():
            scale = _smoothing_scale(act[id(branch.down)], _column_max([branch.down]), alpha)
            _scale_pair_up_down(branch.up, branch.down, scale)
        o_act = _o_columns_per_kv_channel(act[id(layer.o)], geometry)
        o_weight = _o_columns_per_kv_channel(layer.o.weight.detach().double().abs().amax(dim=0), geometry)
        _scale_pair_v_o(layer.v, layer.o, _smoothing_scale(o_act, o_weight, alpha), geometry)
    skipped = _skipped(layers)
    return {"alpha": alpha, "calibration_sequences": len(calibration),
            "calibration_tokens": sum(len(s) for s in calibration), **({"skipped": skipped} if skipped else {})}


# ---------------------------------------------------------------- public API


def apply_transforms(model: nn.Module, family: str, transforms: list[str], seed: int = 0,
                     calibration: list[list[int]] | None = None, alpha: float = DEFAULT_ALPHA) -> dict:
    """Apply `transforms` in place to a loaded model (shadowquant.model.loading.load_model); return a summary.

    Order is fixed (TRANSFORM_ORDER) whatever the order asked. `seed` seeds the rotations,
    `calibration` (token id sequences) and `alpha` feed `smooth`. The summary says what was
    applied, whether lm_head was untied from the embeddings, and per-transform notes and times
    (`skipped`: the pairs a transform left alone because rescaling them would not be exact).
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
            if notes[name].get("skipped"):  # exact, but weaker than the name promises
                log.info("%s: pairs left alone (rescaling them is not exact): %s", name,
                         "; ".join(notes[name]["skipped"]))
    return {"family": family, "transforms": ordered, "seed": int(seed), "untied_lm_head": untied, "notes": notes}


def calibration_w8a8_nll(model: nn.Module, family: str, calibration: list[list[int]]) -> float:
    """Mean next-token NLL on `calibration` after static W8A8 fake quantization at absmax scales.

    Scales are the per-tensor max|x| of each quantized Linear's input and output on the same
    sequences (nothing is clipped), so this measures rounding error only; `model` is modified.
    """
    from shadowquant.runtimes.decision import LayerQuant
    from shadowquant.runtimes.fakequant import apply_w8a8
    from shadowquant.model.families import quantized_layer_names

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

def checkpoint_state_dict(model: nn.Module, family: str) -> dict[str, torch.Tensor]:
    """The model's tensors under their checkpoint names; a tied lm_head is left out as save_pretrained does."""
    state = model.state_dict()
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    tied = head is not None and head.weight is embedding.weight
    renamed = get_family(family).checkpoint_names
    out = {}
    for name, tensor in state.items():
        if tied and name.endswith("lm_head.weight"):
            continue
        for old, new in renamed:  # modules that prepare_for_quantization renamed, back to the checkpoint's
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
                    seq_len: int = 256, chosen_by: str | None = None) -> dict:
    """The transformed float model as an artefact: a model directory beside `out_manifest` and its manifest,
    which the rest of the workflow uses in place of the fetched model (same names and shapes).

    `alpha` 'auto' searches smooth's strength over ALPHA_GRID on the calibration samples (search_alpha).
    `chosen_by`: why these transforms were chosen (transform.variants 'auto'), kept in transform.json."""
    from shadowquant.atomic import write_json
    from shadowquant.inputs.corpus import read_jsonl_texts
    from shadowquant.inputs.manifest import read_manifest
    from shadowquant.model.loading import inspect_model_dir, load_model_from_manifest
    from shadowquant.calibrate.profiling import tokenize_samples

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
    if chosen_by:
        summary["chosen_by"] = f"transform.variants auto: {chosen_by}"
        log.info("transform.variants auto chose %s: %s", "+".join(summary["transforms"]) or "none", chosen_by)
    out_dir = Path(out_manifest).parent / "hf"
    save_transformed(model, tokenizer, out_dir, family, summary)
    info = inspect_model_dir(out_dir, family)
    info.update(source=fetched.get("source"), trust_remote_code=False, transform=summary)
    write_json(out_manifest, info)
    log.info("transformed %s with %s%s", fetched.get("source"), ", ".join(summary["transforms"]),
             "; lm_head untied from the embeddings (exported as its own tensor)" if summary["untied_lm_head"] else "")
    return info
