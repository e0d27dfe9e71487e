"""Importance-weighted Q4_0 (llama.cpp's "imatrix" quantization), written as plain Q4_0 blocks.

mllm's Q4_0 block (q4_0.py) fixes only the format: a float16 step d and 32 codes in 0..15 decoded as
(code - 8) * d. Which d and codes a block gets is the encoder's choice. mllm's reference encoder
takes d = -max / 8 from the block's extreme value. llama.cpp's quantize_row_q4_0_impl with an
importance matrix chooses, per block, the codes and d that minimise the weighted error
sum_i w_i (x_i - d * l_i)^2, where l_i = code_i - 8:

- per row, sigma2 = mean of x^2 over the row, and w_i = imp_i * sqrt(sigma2 + x_i^2), imp_i being
  the importance of input channel i (the mean of the squared activation entering that column of
  the weight over calibration data);
- make_qx_quants(32, nmax=8, rmse_type=1, w): max = the signed value of largest magnitude; for the
  candidate inverse scales -(8 + 0.1 * s) / max, s = 0, -9..-1, 1..9, the codes
  l = clamp(round_half_even(iscale * x), -8, 7), and for those codes the weighted least-squares
  step d = sum w x l / sum w l^2; the candidate with the largest sum(w x l)^2 / sum(w l^2) (the
  first on ties) wins; d is stored rounded to float16, the codes are kept as chosen.

The importance comes from `collect_importance`: forward hooks on every nn.Linear summing the
square of each input channel over the calibration tokens (llama.cpp's imatrix tool collects the
same mean of x^2 per column). Without importance the reference encoder is used, as llama.cpp does.

`gptq_q4_0` (GPTQ-style error compensation, written as Q4_0 blocks) is in this module as well: the
columns are quantized in order, and each one's rounding error is spread over the not yet
quantized columns of the same row through the inverse Hessian of the layer's calibration inputs.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch

from shadowquant.errors import PipelineError
from shadowquant.decoding.q4_0 import BLOCK_DTYPE, BLOCK_VALUES, dequantize_q4_0, quantize_q4_0

NMAX = 8
# make_qx_quants' candidates, in its order: the base scale, then is = -9..9 without 0.
CANDIDATE_STEPS = np.array([0] + [s for s in range(-9, 10) if s != 0], dtype=np.float32)
GROUP_MAX_EPS = 1e-15


def _pack(d: np.ndarray, codes: np.ndarray) -> bytes:
    out = np.empty(d.size, dtype=BLOCK_DTYPE)
    out["d"] = d.astype(np.float16)
    codes = codes.astype(np.uint8)
    out["qs"] = codes[:, :16] | (codes[:, 16:] << 4)
    return out.tobytes()


def _make_qx_quants(xb: np.ndarray, wb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """d (float32) and codes 0..15 per block for blocks `xb` [B, 32] with weights `wb` [B, 32]."""
    absx = np.abs(xb)
    first = np.argmax(absx, axis=1)
    rows = np.arange(xb.shape[0])
    signed_max = xb[rows, first]
    amax = absx[rows, first]
    zero = amax < GROUP_MAX_EPS
    safe_max = np.where(zero, np.float32(1.0), signed_max).astype(np.float32)
    best_q = np.full(xb.shape[0], -np.inf, dtype=np.float32)
    best_d = np.zeros(xb.shape[0], dtype=np.float32)
    best_l = np.zeros(xb.shape, dtype=np.int8)
    for k, step in enumerate(CANDIDATE_STEPS):
        iscale = (-(np.float32(NMAX) + np.float32(0.1) * step) / safe_max).astype(np.float32)
        lvals = np.clip(np.rint(iscale[:, None] * xb), -NMAX, NMAX - 1).astype(np.float32)
        sumlx = (wb * xb * lvals).sum(axis=1, dtype=np.float32)
        suml2 = (wb * lvals * lvals).sum(axis=1, dtype=np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):
            scale = np.where(suml2 > 0, sumlx / suml2, np.float32(0.0)).astype(np.float32)
        quality = scale * sumlx
        if k == 0:
            take = np.ones(xb.shape[0], dtype=bool)
        else:
            take = (suml2 > 0) & (quality > best_q)
        best_q = np.where(take, quality, best_q)
        best_d = np.where(take, scale, best_d)
        best_l = np.where(take[:, None], lvals.astype(np.int8), best_l)
    best_d = np.where(zero, np.float32(0.0), best_d)
    best_l = np.where(zero[:, None], np.int8(-NMAX), best_l)  # L = 0 in the C code: code 0, d 0
    return best_d.astype(np.float32), (best_l.astype(np.int16) + NMAX).astype(np.uint8)


def quantize_q4_0_imatrix(values: np.ndarray, importance: np.ndarray | None,
                          chunk_blocks: int = 1 << 15) -> bytes:
    """Q4_0 bytes of a weight `values` [rows, in_features] (in_features a multiple of 32), blocks chosen
    to minimise the importance-weighted error as llama.cpp's quantize_row_q4_0_impl does. `importance`
    [in_features] is the mean squared input activation per column; None gives the reference encoder."""
    x = np.ascontiguousarray(values, dtype=np.float32)
    if importance is None:
        return quantize_q4_0(x)
    if x.ndim != 2 or x.shape[1] % BLOCK_VALUES:
        raise PipelineError(f"shape {x.shape}: an importance-weighted Q4_0 weight needs rows of whole blocks of "
                            f"{BLOCK_VALUES}")
    imp = np.ascontiguousarray(importance, dtype=np.float32).reshape(-1)
    if imp.size != x.shape[1]:
        raise PipelineError(f"importance has {imp.size} values for {x.shape[1]} input columns")
    if not np.isfinite(x).all() or not np.isfinite(imp).all() or (imp < 0).any():
        raise PipelineError("cannot quantize non-finite values or use negative / non-finite importance")
    rows, cols = x.shape
    per_row = cols // BLOCK_VALUES
    rows_per_chunk = max(1, chunk_blocks // per_row)
    parts = []
    for start in range(0, rows, rows_per_chunk):
        xr = x[start:start + rows_per_chunk]
        sigma2 = (xr * xr).sum(axis=1, dtype=np.float32) / np.float32(cols)
        weight = (imp[None, :] * np.sqrt(sigma2[:, None] + xr * xr)).astype(np.float32)
        d, codes = _make_qx_quants(xr.reshape(-1, BLOCK_VALUES), weight.reshape(-1, BLOCK_VALUES))
        parts.append(_pack(d, codes))
    return b"".join(parts)


def weighted_error(values: np.ndarray, decoded: np.ndarray, importance: np.ndarray | None) -> float:
    """Relative importance-weighted squared error sum_ij imp_j (w_ij - q_ij)^2 / sum_ij imp_j w_ij^2 (the
    output error energy over calibration inputs under a diagonal approximation); imp = 1 when None."""
    w = np.asarray(values, dtype=np.float64)
    q = np.asarray(decoded, dtype=np.float64).reshape(w.shape)
    imp = np.ones(w.shape[-1]) if importance is None else np.asarray(importance, dtype=np.float64)
    return float(((w - q) ** 2 * imp).sum() / ((w * w) * imp).sum())


# ---- calibration statistics -----------------------------------------------------------------


@torch.no_grad()
def collect_importance(model: torch.nn.Module, sequences: Iterable[torch.Tensor] | torch.Tensor,
                       names: Iterable[str] | None = None, batch_size: int = 4,
                       hessian: Iterable[str] = ()) -> dict[str, np.ndarray]:
    """Mean of x^2 per input channel of every nn.Linear (or those in `names`) over all tokens of
    `sequences` (token id tensors [T] or [N, T], run through `model`). For the layers in `hessian` the
    result also holds `name + "#H"`: the mean of x x^T over the tokens (for gptq_q4_0)."""
    modules = {name: module for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    if names is not None:
        wanted = list(names)
        missing = [name for name in wanted if name not in modules]
        if missing:
            raise PipelineError(f"the model has no Linear named {missing[0]!r}")
        modules = {name: modules[name] for name in wanted}
    hessian = set(hessian)
    sums: dict[str, torch.Tensor] = {}
    grams: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    last: dict = {}  # the gram of the latest input: q/k/v (and gate/up) share theirs

    def hook_for(name):
        def hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            sums[name] = sums.get(name, 0) + (x.to(torch.float64) ** 2).sum(dim=0)
            if name in hessian:
                # the same tensor object (held here, so its memory cannot be reused by another) and version
                if last.get("tensor") is not args[0] or last.get("version") != args[0]._version:
                    xf = x.to(torch.float32)
                    last.update(tensor=args[0], version=args[0]._version, gram=(xf.T @ xf).to(torch.float64))
                grams[name] = grams.get(name, 0) + last["gram"]
            counts[name] = counts.get(name, 0) + x.shape[0]
        return hook

    handles = [module.register_forward_pre_hook(hook_for(name)) for name, module in modules.items()]
    try:
        if isinstance(sequences, torch.Tensor):
            sequences = list(sequences.reshape(-1, sequences.shape[-1]))
        sequences = list(sequences)
        device = next(model.parameters()).device
        for start in range(0, len(sequences), batch_size):
            batch = sequences[start:start + batch_size]
            if len({len(s) for s in batch}) != 1:
                for seq in batch:
                    model(seq.reshape(1, -1).to(device))
            else:
                model(torch.stack(list(batch)).to(device))
    finally:
        for handle in handles:
            handle.remove()
        last.clear()
    out = {name: (sums[name] / counts[name]).cpu().numpy().astype(np.float32) for name in sums}
    out.update({f"{name}#H": (grams[name] / counts[name]).cpu().numpy() for name in grams})
    return out


# ---- GPTQ-style error compensation, as Q4_0 blocks --------------------------------------------


def gptq_q4_0(values: np.ndarray, hessian: np.ndarray, importance: np.ndarray | None = None,
              damp: float = 0.01, block_size: int = 128) -> bytes:
    """Q4_0 bytes of `values` [rows, in_features] with GPTQ error compensation: the Q4_0 step of each block
    of 32 columns is chosen (with `quantize_q4_0_imatrix` when `importance` is given, else the reference
    rule) from the weights as compensated so far when the block's first column comes up, the codes are
    then rounded one column at a time and each column's error is spread over the later columns through
    the Cholesky factor of the inverse of `hessian` (mean x x^T of the layer's inputs, damped by `damp`
    times its mean diagonal). Columns are taken in their natural order, so the blocks stay the file's."""
    w = np.array(values, dtype=np.float64)
    rows, cols = w.shape
    if cols % BLOCK_VALUES or block_size % BLOCK_VALUES:
        raise PipelineError(f"shape {w.shape}: GPTQ Q4_0 needs rows of whole blocks of {BLOCK_VALUES}")
    h = np.array(hessian, dtype=np.float64)
    if h.shape != (cols, cols):
        raise PipelineError(f"Hessian of shape {h.shape} for {cols} columns")
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += np.eye(cols) * damp * np.mean(np.diag(h))
    hinv = np.linalg.cholesky(np.linalg.inv(h)).T  # upper factor of H^-1
    d_all = np.zeros((rows, cols // BLOCK_VALUES), dtype=np.float32)
    codes_all = np.zeros((rows, cols), dtype=np.uint8)
    for b0 in range(0, cols, block_size):
        b1 = min(b0 + block_size, cols)
        wb = w[:, b0:b1].copy()
        err = np.zeros_like(wb)
        hb = hinv[b0:b1, b0:b1]
        for j in range(b1 - b0):
            col = b0 + j
            if col % BLOCK_VALUES == 0:  # choose this block's step from the compensated weights
                seg = wb[:, j:j + BLOCK_VALUES].astype(np.float32)
                imp = None if importance is None else np.asarray(importance)[col:col + BLOCK_VALUES]
                blocks = np.frombuffer(quantize_q4_0_imatrix(seg, imp) if imp is not None else quantize_q4_0(seg),
                                       dtype=BLOCK_DTYPE)
                d16 = blocks["d"].astype(np.float64)
                d_all[:, col // BLOCK_VALUES] = blocks["d"].astype(np.float32)
            with np.errstate(divide="ignore", invalid="ignore"):
                lvals = np.where(d16 != 0, np.clip(np.rint(wb[:, j] / d16), -NMAX, NMAX - 1), 0.0)
            codes_all[:, col] = (lvals + NMAX).astype(np.uint8)
            q = lvals * d16
            e = (wb[:, j] - q) / hb[j, j]
            wb[:, j:] -= np.outer(e, hb[j, j:])
            err[:, j] = e
        w[:, b1:] -= err @ hinv[b0:b1, b1:]
    codes = codes_all.reshape(-1, BLOCK_VALUES)
    return _pack(d_all.reshape(-1), codes)


def output_error(values: np.ndarray, decoded: np.ndarray, hessian: np.ndarray) -> float:
    """Relative output error trace((W - Q) H (W - Q)^T) / trace(W H W^T) for inputs with second moment H."""
    w = np.asarray(values, dtype=np.float64)
    e = w - np.asarray(decoded, dtype=np.float64).reshape(w.shape)
    return float(np.einsum("ij,jk,ik->", e, hessian, e) / np.einsum("ij,jk,ik->", w, hessian, w))


def decode(data: bytes, shape: tuple[int, ...]) -> np.ndarray:
    """Q4_0 bytes back to a float32 array of `shape`."""
    return dequantize_q4_0(data).reshape(shape)
