"""Float weights of the CPU decoding model: the original residual stream, the prefill model's KV cache (issue 25).

The phone generation prefills with the int8 NPU model and decodes with a CPU Q4_0 model that continues
from the prefill's KV cache: the two share only that cache (K after RoPE, and V, per layer; mllm's QNN
build shares the KV cache op by name, stored in float16), not their residual streams. The prefill model
is a transformed model (shadowquant.model.transforms), and its residual rotation Q1 costs 4-bit weights a lot
(the rotation spreads every weight's outliers over whole rows, which Q4_0 blocks then share). The
decoding model therefore keeps the ORIGINAL residual stream (original embeddings, norms, q/k, MLP and
lm_head weights) and takes from the prefill model only what changes the basis of the cache.

Derivation (per layer; n = the unweighted RMS-normalized residual stream of the original model, g the
original input norm scale, W the original weights, primes the transformed model's). The transforms
map the stream to x Q1 (Q1 = I without `rotate`), and RMSNorm commutes with an orthogonal Q1 once its
scale is folded, so the transformed model's normalized stream is n Q1 and its projection x in {q, k, v}
computes n Q1 (W'_x diag(g'))^T = n B_x^T with B_x = W'_x diag(g') Q1^T. The transforms only
ever change a projection's output basis per head on top of that (R2 and the v->o smoothing on v,
equalize's scales on q/k), so per head h, B_x,h = R_x,h W_x,h diag(g): R_x,h (head_dim x head_dim) is the
least-squares solution of that system (exact up to float rounding; its residual is checked), and the
decoding projection W_x,h <- R_x,h W_x,h (bias b_h <- R_x,h b_h) computes exactly the transformed
model's q/k/v from the original stream. K (before RoPE, hence after) and V are the prefill model's.
The attention output is then the prefill's too, and o_proj undoes the V basis: every attention head j
(of KV head h) gets o columns W_o,j R_v,h^-1; this equals Q1 o'_j (checked), so the decoding model's
attention writes exactly the original model's update into the original stream, and its logits are the
original model's.

Q1 itself is recovered from weights the transforms touch with Q1 alone: the embedding rows and the
gate_proj rows of every layer read through their norm (G' = G Q1, smoothing cancelling in W diag(g)),
by least squares and a projection onto the orthogonal matrices; no seed or transform.json is needed.
Where `rotate` was not applied the embeddings are unchanged and Q1 = I. Per-head maps within
`identity_tolerance` of I are taken as I, so q/k stay bit-identical to the original where the
transforms left K alone (rotate, smooth). Everything is computed in float64.

Supported: RMSNorm families with separate q/k/v projections and a gated MLP (llama, qwen1, qwen2, gemma;
not gemma2, whose sandwich norms `rotate` does not support either).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from shadowquant.errors import PipelineError
from shadowquant.model.families import DECODING_FAMILIES, REGISTRY

log = logging.getLogger(__name__)

# Relative Frobenius residual allowed when checking that the transformed model is what the derivation
# assumes: float32 storage of float64 results leaves ~1e-7.
DEFAULT_TOLERANCE = 1e-4
# Per-head maps closer than this (max abs entry) to the identity are taken as the identity.
DEFAULT_IDENTITY_TOLERANCE = 1e-5


@dataclass
class LayerBasis:
    """The per-head output maps of one layer (None: the identity): q per attention head, k/v per KV head."""

    q: torch.Tensor | None  # [num_heads, head_dim, head_dim]
    k: torch.Tensor | None  # [num_kv_heads, head_dim, head_dim]
    v: torch.Tensor | None  # [num_kv_heads, head_dim, head_dim]
    residual: dict[str, float] = field(default_factory=dict)  # relative residual of each fit and check


@dataclass
class KvBasis:
    """What relates a transformed model to its original: the residual rotation and the per-layer head maps."""

    q1: torch.Tensor | None  # [hidden, hidden] float64, None: not rotated
    q1_residual: float
    layers: list[LayerBasis]

    def max_residual(self) -> float:
        return max([self.q1_residual] + [r for layer in self.layers for r in layer.residual.values()])


def _f64(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu", torch.float64)


def _relative(error: torch.Tensor, reference: torch.Tensor) -> float:
    denominator = float(reference.norm())
    return float(error.norm()) / denominator if denominator > 0 else float(error.norm())


def _check_family(model: nn.Module, family: str, which: str) -> None:
    if family not in DECODING_FAMILIES:
        raise PipelineError(f"decoding weights: family {family!r} is not supported (an unrotated decoding model is "
                            f"derived for RMSNorm models with separate q/k/v projections and a gated MLP); valid "
                            f"families: {', '.join(DECODING_FAMILIES)}")
    record = REGISTRY[family]
    # The model types the family loads as, less those with sandwich norms (Gemma 2: not supported).
    model_types = [t for t in record.model_types if t not in record.sandwich_norm_model_types]
    model_type = getattr(model.config, "model_type", None)
    if model_type not in model_types:
        raise PipelineError(f"decoding weights: the {which} model has model_type {model_type!r}, not one of family "
                            f"{family!r} ({', '.join(model_types)})")


def _geometry(model: nn.Module) -> tuple[int, int, int, int, int]:
    config = model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.hidden_size, config.num_hidden_layers, heads, kv_heads, head_dim


def _norm_scale(norm: nn.Module, family: str) -> torch.Tensor:
    return _f64(norm.weight) + REGISTRY[family].norm_offset  # Gemma's RMSNorm multiplies by (1 + w)


def _layers(model: nn.Module) -> nn.ModuleList:
    return model.model.layers


def _recover_q1(original: nn.Module, transformed: nn.Module, family: str, tolerance: float
                ) -> tuple[torch.Tensor | None, float]:
    """Q1 with transformed = original Q1 on the embedding rows and the norm-weighted gate_proj rows."""
    e_orig = _f64(original.get_input_embeddings().weight)
    e_pre = _f64(transformed.get_input_embeddings().weight)
    if e_orig.shape != e_pre.shape:
        raise PipelineError(f"decoding weights: embeddings of shape {tuple(e_pre.shape)} in the transformed model, "
                            f"{tuple(e_orig.shape)} in the original")
    if torch.equal(e_orig, e_pre):
        return None, 0.0
    pairs = [(e_orig, e_pre)]
    for lo, lp in zip(_layers(original), _layers(transformed)):
        pairs.append((_f64(lo.mlp.gate_proj.weight) * _norm_scale(lo.post_attention_layernorm, family),
                      _f64(lp.mlp.gate_proj.weight) * _norm_scale(lp.post_attention_layernorm, family)))
    hidden = e_orig.shape[1]
    gram = torch.zeros(hidden, hidden, dtype=torch.float64)
    cross = torch.zeros(hidden, hidden, dtype=torch.float64)
    for a, b in pairs:
        gram += a.T @ a
        cross += a.T @ b
    fit = torch.linalg.solve(gram, cross)
    u, s, vh = torch.linalg.svd(fit)
    q1 = u @ vh  # the nearest orthogonal matrix (polar factor)
    residual = max(_relative(a @ q1 - b, b) for a, b in pairs)
    if residual > tolerance or float((s - 1).abs().max()) > 100 * tolerance:
        raise PipelineError(f"decoding weights: the transformed model's embeddings and gate_proj inputs are not an "
                            f"orthogonal rotation of the original's (relative residual {residual:.2e}, singular "
                            f"values {float(s.min()):.6f}..{float(s.max()):.6f}); are both models of the same "
                            "checkpoint, and was the transformed one made by shadowquant.model.transforms?")
    return q1, residual


def _head_maps(orig_rows: torch.Tensor, pre_rows: torch.Tensor, heads: int, head_dim: int
               ) -> tuple[torch.Tensor, float]:
    """R [heads, d, d] with pre_h = R_h orig_h per head (rows [heads * d, in]), and the relative residual."""
    a = orig_rows.view(heads, head_dim, -1)
    b = pre_rows.view(heads, head_dim, -1)
    # R_h a_h = b_h  <=>  a_h^T R_h^T = b_h^T
    r = torch.linalg.lstsq(a.transpose(1, 2), b.transpose(1, 2)).solution.transpose(1, 2)
    return r, _relative(r @ a - b, b)


def _snap(r: torch.Tensor, identity_tolerance: float) -> torch.Tensor | None:
    eye = torch.eye(r.shape[-1], dtype=r.dtype)
    return None if float((r - eye).abs().max()) <= identity_tolerance else r


def kv_basis(original: nn.Module, transformed: nn.Module, family: str, tolerance: float = DEFAULT_TOLERANCE,
             identity_tolerance: float = DEFAULT_IDENTITY_TOLERANCE) -> KvBasis:
    """The residual rotation Q1 and the per-head q/k/v output maps relating `transformed` to `original`.

    Raises PipelineError for an unsupported family, models of different shapes, or a transformed model
    that is not an exact transform (rotation, per-head maps) of the original to `tolerance`.
    """
    _check_family(original, family, "original")
    _check_family(transformed, family, "transformed")
    geometry = _geometry(original)
    if _geometry(transformed) != geometry:
        raise PipelineError(f"decoding weights: the models differ in shape (hidden, layers, heads, KV heads, "
                            f"head_dim): original {geometry}, transformed {_geometry(transformed)}")
    hidden, _, heads, kv_heads, head_dim = geometry
    q1, q1_residual = _recover_q1(original, transformed, family, tolerance)
    layers = []
    for index, (lo, lp) in enumerate(zip(_layers(original), _layers(transformed))):
        g_orig = _norm_scale(lo.input_layernorm, family)
        g_pre = _norm_scale(lp.input_layernorm, family)
        maps, residual = {}, {}
        for name, count in (("q", heads), ("k", kv_heads), ("v", kv_heads)):
            po, pp = getattr(lo.self_attn, f"{name}_proj"), getattr(lp.self_attn, f"{name}_proj")
            b = _f64(pp.weight) * g_pre
            if q1 is not None:
                b = b @ q1.T
            r, residual[name] = _head_maps(_f64(po.weight) * g_orig, b, count, head_dim)
            if (po.bias is None) != (pp.bias is None):
                raise PipelineError(f"decoding weights: layer {index} {name}_proj has a bias in only one of the models")
            if po.bias is not None:
                expected = (r @ _f64(po.bias).view(count, head_dim, 1)).reshape(-1)
                residual[f"{name}_bias"] = _relative(expected - _f64(pp.bias), _f64(pp.bias))
            maps[name] = r
        # o: the transformed o_proj mapped back to the original stream must undo exactly the V map.
        group = heads // kv_heads
        inverse = torch.linalg.inv(maps["v"]).repeat_interleave(group, dim=0)  # per attention head
        o_dec = (_f64(lo.self_attn.o_proj.weight).view(hidden, heads, 1, head_dim) @ inverse).reshape(hidden, -1)
        o_pre = _f64(lp.self_attn.o_proj.weight)
        residual["o"] = _relative(o_dec - (q1 @ o_pre if q1 is not None else o_pre), o_pre)
        bad = {key: value for key, value in residual.items() if not value <= tolerance}
        if bad:
            raise PipelineError(f"decoding weights: layer {index} of the transformed model is not a per-head map of "
                                f"the original's q/k/v/o ({', '.join(f'{k} residual {v:.2e}' for k, v in bad.items())}"
                                f" > {tolerance:g}); are both models of the same checkpoint?")
        layers.append(LayerBasis(*(_snap(maps[n], identity_tolerance) for n in ("q", "k", "v")), residual))
    return KvBasis(q1, q1_residual, layers)


def decoding_state_dict(original: nn.Module, transformed: nn.Module, family: str, dtype: torch.dtype | None = None,
                        tolerance: float = DEFAULT_TOLERANCE,
                        identity_tolerance: float = DEFAULT_IDENTITY_TOLERANCE) -> dict[str, torch.Tensor]:
    """The float state dict (original.state_dict() names, on the CPU) of the decoding model for a prefill model.

    `original`: the float model as fetched; `transformed`: the prefill model's float weights (the
    transform stage's output of the same checkpoint, any of rotate / equalize / smooth). The result is
    the original model (embeddings, norms, MLP, lm_head, and q/k wherever the transforms left K alone)
    with q/k/v rows mapped per head onto the transformed model's q/k/v basis and o_proj columns by the
    inverse of the V map, so that the KV cache of every layer (K after RoPE, V) equals the transformed
    model's, and the logits equal the original model's, up to float rounding. `dtype`: of the floating
    tensors (default the original's). Load it with `copy.deepcopy(original).load_state_dict(...)`.
    """
    basis = kv_basis(original, transformed, family, tolerance, identity_tolerance)
    hidden, _, heads, kv_heads, head_dim = _geometry(original)
    group = heads // kv_heads
    state = {name: tensor.detach().to("cpu").clone() for name, tensor in original.state_dict().items()}
    prefix = next(name for name, module in original.named_modules() if module is _layers(original))
    replaced: dict[str, torch.Tensor] = {}
    for index, (layer, maps) in enumerate(zip(_layers(original), basis.layers)):
        attention = layer.self_attn
        base = f"{prefix}.{index}.self_attn"
        for name, r in (("q", maps.q), ("k", maps.k), ("v", maps.v)):
            if r is None:
                continue
            proj = getattr(attention, f"{name}_proj")
            count = r.shape[0]
            weight = _f64(proj.weight).view(count, head_dim, -1)
            replaced[f"{base}.{name}_proj.weight"] = (r @ weight).reshape(proj.weight.shape)
            if proj.bias is not None:
                bias = (r @ _f64(proj.bias).view(count, head_dim, 1)).reshape(-1)
                replaced[f"{base}.{name}_proj.bias"] = bias
        if maps.v is not None:
            inverse = torch.linalg.inv(maps.v).repeat_interleave(group, dim=0)
            o = _f64(attention.o_proj.weight).view(hidden, heads, 1, head_dim) @ inverse
            replaced[f"{base}.o_proj.weight"] = o.reshape(attention.o_proj.weight.shape)
    for name, value in replaced.items():
        if name not in state:
            raise PipelineError(f"decoding weights: the original model's state has no {name}")
        state[name] = value.to(state[name].dtype)
    if dtype is not None:
        state = {name: t.to(dtype) if t.is_floating_point() else t for name, t in state.items()}
    log.info("decoding weights: %s, %d tensors mapped to the prefill model's KV basis (max fit residual %.1e)",
             "Q1 undone" if basis.q1 is not None else "no residual rotation", len(replaced), basis.max_residual())
    return state
