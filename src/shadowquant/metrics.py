"""Evaluation of a causal LM on token-id sequences: last-token accuracy, perplexity, agreement, KL.

One forward pass per batch (right padding, attention mask; padding never counted) gives all
metrics. "Predicted positions" of a sequence of length L are the logits at 0..L-2, predicting
tokens 1..L-1.

- accuracy: as the reference LAMBADA evaluation, correct if argmax(logits[L-2]) == ids[L-1].
- perplexity: exp of the mean NLL over all predicted tokens of all sequences.
- agreement / kl against a float baseline: the float run stores, per predicted position, its
  argmax, the log-probs and ids of its top-k tokens and the log of the probability mass outside
  them. KL(float || quant) is then computed exactly for the distributions coarse-grained to
  k + 1 outcomes (the float top-k tokens, and "any other token"):
      sum_{v in topk} p_v (log p_v - log q_v) + P_tail (log P_tail - log Q_tail)
  By the log-sum inequality this is a lower bound on the full-vocabulary KL, equal to it when
  k >= vocabulary size or when q/p is constant over the tail. The tail masses are computed as
  log-sum-exps of the tail logits, not as 1 - sum(top-k), so they stay accurate when tiny.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from tqdm import tqdm

from shadowquant.atomic import atomic_path
from shadowquant.errors import PipelineError

BASELINE_FORMAT = "shadowquant-float-baseline-v1"
DEFAULT_TOP_K = 32
_BASELINE_TENSORS = ("sequence_lengths", "argmax", "topk_logprobs", "topk_indices", "tail_logmass")


@dataclass
class Baseline:
    """Compact per-position float-model data for agreement and KL; positions of all sequences concatenated."""

    top_k: int
    tokens_sha256: str
    sequence_lengths: torch.Tensor  # [S] int64, full lengths L (each contributes L - 1 positions)
    argmax: torch.Tensor  # [N] int64
    topk_logprobs: torch.Tensor  # [N, k] float32, descending
    topk_indices: torch.Tensor  # [N, k] int64
    tail_logmass: torch.Tensor  # [N] float32, log of the probability outside the top-k (-inf if none)

    def offsets(self) -> list[int]:
        """Start of each sequence's positions in the concatenated tensors."""
        counts = (self.sequence_lengths - 1).tolist()
        return [0] + list(np.cumsum(counts)[:-1].tolist()) if counts else []


@dataclass
class EvalResult:
    """Per-sample results (in input order); sums rather than means so they can be pooled exactly."""

    last_token_correct: list[bool] = field(default_factory=list)
    nll_sum: list[float] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)
    agreement_count: list[int] | None = None  # positions whose argmax equals the baseline's
    kl_sum: list[float] | None = None  # sum over positions of KL(float || this model), see module docstring
    baseline: Baseline | None = None  # collected when evaluate(collect_top_k=...) was asked for


def tokens_sha256(sequences: list[list[int]]) -> str:
    """Fingerprint of the evaluated token sequences, so a baseline is never compared with other data."""
    digest = hashlib.sha256()
    for seq in sequences:
        digest.update(np.int64(len(seq)).tobytes())
        digest.update(np.asarray(seq, dtype=np.int64).tobytes())
    return digest.hexdigest()


def _check_sequences(sequences: list[list[int]]) -> None:
    if not sequences:
        raise PipelineError("no sequences to evaluate (empty evaluation set)")
    for i, seq in enumerate(sequences):
        if len(seq) < 2:
            raise PipelineError(f"evaluation sequence {i} has {len(seq)} token(s); at least 2 are needed "
                                f"(a prefix and the token to predict)")


def _model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _tail_logmass(logits: torch.Tensor, indices: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """log of the probability of all tokens not in `indices`, per row."""
    masked = logits.scatter(-1, indices, float("-inf"))
    return torch.logsumexp(masked, dim=-1) - lse


def _sample_metrics(logits: torch.Tensor, ids: torch.Tensor, baseline: Baseline | None, start: int,
                    collect_top_k: int | None) -> dict:
    """Metrics of one sequence from its float32 logits at the predicted positions [L - 1, V]."""
    lse = torch.logsumexp(logits, dim=-1)
    targets = ids[1:]
    nll = lse - logits.gather(-1, targets[:, None]).squeeze(-1)
    argmax = logits.argmax(dim=-1)
    out = {
        "correct": bool(argmax[-1] == ids[-1]),
        "nll_sum": float(nll.double().sum()),
        "num_tokens": int(targets.numel()),
    }
    if baseline is not None:
        n = targets.numel()
        sl = slice(start, start + n)
        idx = baseline.topk_indices[sl].to(logits.device)
        p_log = baseline.topk_logprobs[sl].to(logits.device).double()
        p_tail = baseline.tail_logmass[sl].to(logits.device).double()
        q_log = (logits.gather(-1, idx) - lse[:, None]).double()
        q_tail = _tail_logmass(logits, idx, lse).double()
        kl = (p_log.exp() * (p_log - q_log)).sum(-1)
        # 0 * log(0 / x) = 0 where the float model leaves no tail mass.
        kl = kl + torch.where(torch.isfinite(p_tail), p_tail.exp() * (p_tail - q_tail), torch.zeros_like(p_tail))
        out["agreement_count"] = int((argmax == baseline.argmax[sl].to(logits.device)).sum())
        out["kl_sum"] = float(kl.sum())
    if collect_top_k is not None:
        k = min(collect_top_k, logits.shape[-1])
        values, indices = logits.topk(k, dim=-1)
        out["collected"] = (
            argmax.cpu(),
            (values - lse[:, None]).cpu(),
            indices.cpu(),
            _tail_logmass(logits, indices, lse).cpu(),
        )
    return out


@torch.inference_mode()
def evaluate(model: torch.nn.Module, sequences: list[list[int]], batch_size: int = 4,
             baseline: Baseline | str | Path | None = None, collect_top_k: int | None = None,
             desc: str = "evaluate") -> EvalResult:
    """Evaluate `model` on token-id `sequences` (one forward per batch of `batch_size`).

    `baseline` (a Baseline or a saved file) adds agreement and KL against the float model;
    `collect_top_k=k` records this model's baseline in `result.baseline` (do it for the float run).
    """
    _check_sequences(sequences)
    if batch_size < 1:
        raise PipelineError(f"batch_size {batch_size} must be >= 1")
    if collect_top_k is not None and collect_top_k < 1:
        raise PipelineError(f"baseline top_k {collect_top_k} must be >= 1")
    fingerprint = tokens_sha256(sequences)
    if isinstance(baseline, (str, Path)):
        baseline = load_baseline(baseline)
    if baseline is not None:
        _check_baseline_matches(baseline, sequences, fingerprint)
        offsets = baseline.offsets()

    model.eval()
    device = _model_device(model)
    # Longest first: similar lengths share a batch (less padding), and an out-of-memory shows at once.
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    per_sample: list[dict | None] = [None] * len(sequences)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc=desc, unit="batch"):
        max_len = len(sequences[batch[0]])
        input_ids = torch.zeros((len(batch), max_len), dtype=torch.long)
        attention_mask = torch.zeros((len(batch), max_len), dtype=torch.long)
        for row, i in enumerate(batch):
            input_ids[row, :len(sequences[i])] = torch.tensor(sequences[i], dtype=torch.long)
            attention_mask[row, :len(sequences[i])] = 1
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        for row, i in enumerate(batch):
            length = len(sequences[i])
            per_sample[i] = _sample_metrics(logits[row, :length - 1].float(), input_ids[row, :length], baseline,
                                            offsets[i] if baseline is not None else 0, collect_top_k)
        del logits

    result = EvalResult(
        last_token_correct=[s["correct"] for s in per_sample],
        nll_sum=[s["nll_sum"] for s in per_sample],
        num_tokens=[s["num_tokens"] for s in per_sample],
    )
    if baseline is not None:
        result.agreement_count = [s["agreement_count"] for s in per_sample]
        result.kl_sum = [s["kl_sum"] for s in per_sample]
    if collect_top_k is not None:
        argmax, logprobs, indices, tail = (torch.cat(parts) for parts in zip(*(s["collected"] for s in per_sample)))
        result.baseline = Baseline(
            top_k=logprobs.shape[-1], tokens_sha256=fingerprint,
            sequence_lengths=torch.tensor([len(s) for s in sequences], dtype=torch.long),
            argmax=argmax, topk_logprobs=logprobs, topk_indices=indices, tail_logmass=tail,
        )
    return result


def summarize(result: EvalResult) -> dict:
    """Corpus-level metrics: accuracy, perplexity, agreement, kl (None without a baseline), counts."""
    num_samples = len(result.last_token_correct)
    num_tokens = int(sum(result.num_tokens))
    mean_nll = sum(result.nll_sum) / num_tokens
    try:
        perplexity = math.exp(mean_nll)
    except OverflowError:
        perplexity = float("inf")
    return {
        "accuracy": sum(result.last_token_correct) / num_samples,
        "perplexity": perplexity,
        "agreement": None if result.agreement_count is None else sum(result.agreement_count) / num_tokens,
        "kl": None if result.kl_sum is None else sum(result.kl_sum) / num_tokens,
        "num_samples": num_samples,
        "num_tokens": num_tokens,
    }


def _check_baseline_matches(baseline: Baseline, sequences: list[list[int]], fingerprint: str) -> None:
    if baseline.tokens_sha256 != fingerprint or len(baseline.sequence_lengths) != len(sequences):
        raise PipelineError("float baseline was computed on other token sequences than this evaluation "
                            f"({len(baseline.sequence_lengths)} vs {len(sequences)} sequences); "
                            "re-run the float evaluation on the same data")


def save_baseline(path: str | Path, baseline: Baseline) -> None:
    """Write a Baseline as safetensors (atomically)."""
    tensors = {
        "sequence_lengths": baseline.sequence_lengths.to(torch.int64).contiguous(),
        "argmax": baseline.argmax.to(torch.int32).contiguous(),
        "topk_logprobs": baseline.topk_logprobs.to(torch.float32).contiguous(),
        "topk_indices": baseline.topk_indices.to(torch.int32).contiguous(),
        "tail_logmass": baseline.tail_logmass.to(torch.float32).contiguous(),
    }
    metadata = {"format": BASELINE_FORMAT, "top_k": str(baseline.top_k), "tokens_sha256": baseline.tokens_sha256}
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def load_baseline(path: str | Path) -> Baseline:
    """Read a Baseline written by save_baseline, checking its format and shapes."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: float baseline file not found; run the float evaluation first")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise PipelineError(f"{path}: not a readable safetensors file ({exc}); delete it and re-run the float evaluation") from None
    if metadata.get("format") != BASELINE_FORMAT:
        raise PipelineError(f"{path}: metadata format {metadata.get('format')!r} is not {BASELINE_FORMAT!r}; "
                            "re-run the float evaluation")
    missing = [name for name in _BASELINE_TENSORS if name not in tensors]
    if missing or "tokens_sha256" not in metadata or not metadata.get("top_k", "").isdigit():
        raise PipelineError(f"{path}: incomplete float baseline (missing {', '.join(missing) or 'metadata'}); "
                            "re-run the float evaluation")
    baseline = Baseline(
        top_k=int(metadata["top_k"]),
        tokens_sha256=metadata["tokens_sha256"],
        sequence_lengths=tensors["sequence_lengths"].long(),
        argmax=tensors["argmax"].long(),
        topk_logprobs=tensors["topk_logprobs"].float(),
        topk_indices=tensors["topk_indices"].long(),
        tail_logmass=tensors["tail_logmass"].float(),
    )
    positions = int((baseline.sequence_lengths - 1).sum())
    shapes_ok = (
        baseline.argmax.shape == (positions,) and baseline.tail_logmass.shape == (positions,)
        and baseline.topk_logprobs.shape == (positions, baseline.top_k)
        and baseline.topk_indices.shape == (positions, baseline.top_k)
    )
    if not shapes_ok:
        raise PipelineError(f"{path}: float baseline tensors disagree in shape with its {positions} positions "
                            f"and top_k {baseline.top_k}; re-run the float evaluation")
    return baseline
