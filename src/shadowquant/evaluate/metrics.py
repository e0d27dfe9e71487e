"""Evaluation of a causal LM on token-id sequences: accuracy, perplexity, exact KL to float, agreement, intervals.

One forward pass per batch (right padding, attention mask; padding never counted) gives all
metrics. "Predicted positions" of a sequence of length L are the logits at 0..L-2, predicting
tokens 1..L-1. Every metric is kept per record (sequence) as sums, so corpus values pool exactly
and bootstrap intervals resample records.

Float baseline (`evaluate(float_model, ..., collect_baseline=True)`, `save_baseline`): per
predicted position, the input of the model's output projection (`get_output_embeddings()`, the
lm_head) captured by a forward pre-hook, in the dtype the lm_head received (float32 for float32
models), plus the float model's own argmax, the sequence lengths and a fingerprint of the tokens.
That is hidden_size * dtype-size bytes per position (32k positions x 576 x 4 B = 74 MB) instead
of vocabulary-sized logits. The float run checks on its first batch that lm_head(hidden), with the
model's known logit post-processing, reproduces its forward logits.

Quantized run (`evaluate(quant_model, ..., baseline=...)`): the lm_head is never quantized, so
the float logits of each batch are recomputed as lm_head(hidden) with the float lm_head
(`float_head`, default the evaluated model's own output embeddings), followed by the logit
post-processing the model applies after lm_head. Of the supported families only Gemma-2 (and
Gemma-3) apply any: `config.final_logit_softcapping` c gives logits = c * tanh(logits / c);
OPT, Falcon, Phi (lm_head with bias, part of the module), Qwen2, Llama, Gemma and Mixtral use
lm_head's output as is. Then, per position, over the full vocabulary,
    KL(float || quant) = sum_v p_v (log p_v - log q_v),
with float logits recomputed for a whole batch at once (one matmul; as much memory as the batch's
own logits), the KL itself in chunks of positions (a few MB of temporaries) in a form that keeps
float32 passes accurate (`exact_kl`).

`summarize(result, float_result=None)` keys (all computed over records in evaluation order):
- accuracy: fraction of records whose last token is the argmax at position L-2 (as LAMBADA).
- perplexity: exp(sum of NLL over all predicted tokens / number of predicted tokens).
- kl: sum of per-position KL(float || this model) / number of predicted tokens; None without baseline.
- agreement: fraction of predicted positions whose argmax equals the float model's; None without baseline.
- perplexity_increase: perplexity / float_result's perplexity - 1 (relative; 0.01 = +1 %); None
  without float_result.
- <metric>_ci_low, <metric>_ci_high for each metric above: percentile bootstrap interval over
  records (records resampled with replacement, the ratio estimator recomputed per resample;
  perplexity_increase resamples the same records in both results, a paired interval). None when
  the metric is None or num_resamples is 0.
- ci_level: the two-sided coverage of the intervals (e.g. 0.95); num_resamples: resamples drawn
  (0: no intervals); num_samples: records; num_tokens: predicted tokens.

`per_record(result)` is the JSON-serializable per-record data (keys last_token_correct, nll_sum,
num_tokens, kl_sum, agreement_count; the last two None without baseline) and
`result_from_per_record(d)` reads it back, so paired intervals can be computed from JSON alone.

Continuation sums: every evaluation also keeps the same per-record sums over the tokens after the
demo's prefill (`result.continuation`; tokens prefill_length(L)..L-1, the second half by default):
what mllm's demo has the CPU decoding model write after the NPU prefilled the first half. The demo
evaluation (demo_evaluation) reads them from the sweep's and the decoding candidates' JSON
(`per_record`'s "continuation", `continuation_from_per_record`) instead of running those models again.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from tqdm import tqdm

from shadowquant.atomic import atomic_path
from shadowquant.errors import PipelineError
from shadowquant.calibrate.profiling import collate

BASELINE_FORMAT = "shadowquant-float-baseline-v2"
_BASELINE_TENSORS = ("sequence_lengths", "argmax", "hidden")
_PER_RECORD_KEYS = ("last_token_correct", "nll_sum", "num_tokens", "kl_sum", "agreement_count")
# The demo's split of a record (demo_evaluation): the NPU prefills this share of its tokens, the CPU decoding model
# writes the rest; every evaluation keeps its sums over that rest too (EvalResult.continuation).
PREFILL_FRACTION = 0.5
# Positions x vocabulary elements per chunk of the exact KL: 2 MB float32 temporaries stay in cache.
_KL_CHUNK_ELEMENTS = 1 << 19


@dataclass
class Baseline:
    """Per-position float-model data for exact KL and agreement; positions of all sequences concatenated."""

    tokens_sha256: str
    sequence_lengths: torch.Tensor  # [S] int64, full lengths L (each contributes L - 1 positions)
    argmax: torch.Tensor  # [N] int64, the float model's own argmax per position
    hidden: torch.Tensor  # [N, H] lm_head input per position, in the dtype lm_head received

    def offsets(self) -> list[int]:
        """Start of each sequence's positions in the concatenated tensors."""
        counts = (self.sequence_lengths - 1).tolist()
        return [0] + list(np.cumsum(counts)[:-1].tolist()) if counts else []


@dataclass
class EvalResult:
    """Per-record results (in input order); sums rather than means so they can be pooled exactly."""

    last_token_correct: list[bool] = field(default_factory=list)
    nll_sum: list[float] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)
    agreement_count: list[int] | None = None  # positions whose argmax equals the float baseline's
    kl_sum: list[float] | None = None  # sum over positions of exact KL(float || this model)
    baseline: Baseline | None = None  # collected when evaluate(collect_baseline=True) was asked for
    # The same sums over the continuation (tokens prefill_length(L)..L-1), set by evaluate.
    continuation: EvalResult | None = None


def prefill_length(length: int, fraction: float = PREFILL_FRACTION) -> int:
    """How many of a record's `length` tokens the demo's NPU prefills: floor(length * fraction), kept within
    1..length-1 so that the prefill has a token and at least one token is scored after it."""
    if not 0.0 < fraction < 1.0:
        raise PipelineError(f"prefill fraction {fraction!r} must be strictly between 0 and 1 (0.5: half the record)")
    if length < 2:
        raise PipelineError(f"a record of {length} token(s) cannot be split into a prefill and a continuation; "
                            "the demo evaluation needs at least 2 tokens per record")
    return min(length - 1, max(1, int(np.floor(length * fraction))))


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


def final_logit_softcap(model: torch.nn.Module) -> float | None:
    """The cap c of Gemma-2/3's logits = c * tanh(lm_head(h) / c), or None when the model applies none."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    cap = getattr(text_config, "final_logit_softcapping", None)
    return float(cap) if cap else None


@torch.no_grad()
def head_logits(head: torch.nn.Module, hidden: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """The model's logits from its lm_head input: lm_head, then the post-processing it applies after it."""
    weight = getattr(head, "weight", None)
    if weight is not None:
        hidden = hidden.to(device=weight.device, dtype=weight.dtype)
    logits = head(hidden)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def exact_kl(float_logits: torch.Tensor, quant_logits: torch.Tensor) -> torch.Tensor:
    """Per-position KL(float || quant) [n] over the full vocabulary, from logits [n, V], in chunks of positions.

    With d = a - b (float minus quant logits) and p = softmax(a), KL = E_p[d] + log E_p[exp(-d)]
    (since log sum exp b - log sum exp a = log E_p[exp(b - a)]), the second term as
    log1p(E_p[expm1(-d)]). Unlike sum p (log p - log q) this never subtracts the two large
    log-normalizers, so float32 passes over the vocabulary with float64 sums keep the error relative
    to d itself (relative error of the KL near 1e-6, 1e-4 at 1e-5 per token): 4x cheaper than float64.
    """
    rows = max(1, _KL_CHUNK_ELEMENTS // quant_logits.shape[-1])
    parts = []
    for start in range(0, quant_logits.shape[0], rows):
        a = float_logits[start:start + rows].float()
        d = a - quant_logits[start:start + rows].float()
        weights = (a - a.amax(-1, keepdim=True)).exp_()  # unnormalized p; the normalizer cancels below
        total = weights.sum(-1, dtype=torch.float64)
        mean_d = (weights * d).sum(-1, dtype=torch.float64) / total
        # expm1/log1p: exp(-d) rounded in float32 would cost an absolute 1e-7, large against a tiny KL.
        mean_expm1 = (weights * d.neg_().expm1_()).sum(-1, dtype=torch.float64) / total
        parts.append(mean_d + mean_expm1.log1p())
    return torch.cat(parts)


def _token_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Per-position NLL of one sequence from its float32 logits at the predicted positions [L - 1, V]."""
    return torch.logsumexp(logits, dim=-1) - logits.gather(-1, ids[1:, None]).squeeze(-1)


def record_sums(correct: bool, nll: torch.Tensor, kl: torch.Tensor | None, agree: torch.Tensor | None) -> dict:
    """One record's sums (EvalResult's fields) from per-position NLL, KL and float agreement."""
    sums = {"correct": correct, "nll_sum": float(nll.double().sum()), "num_tokens": int(nll.numel())}
    if kl is not None:
        sums["kl_sum"] = float(kl.sum())
        sums["agreement_count"] = int(agree.sum())
    return sums


def _check_recomputed_logits(model: torch.nn.Module, head: torch.nn.Module, softcap: float | None,
                             hidden: torch.Tensor, logits: torch.Tensor) -> None:
    """Refuse a model whose forward logits are not lm_head(hidden) plus the post-processing known here."""
    recomputed = head_logits(head, hidden, softcap).to(logits.dtype)
    scale = max(1.0, float(logits.abs().max()))
    error = float((recomputed - logits).abs().max())
    # Loose enough for a different matmul blocking, far below any real post-processing (a cap, a scale).
    tolerance = max(4 * torch.finfo(logits.dtype).eps, 1e-4) * scale
    if not error <= tolerance:
        raise PipelineError(f"{type(model).__name__}: logits recomputed from the lm_head input differ from the "
                            f"forward logits by {error:.3g} (> {tolerance:.3g}); the model post-processes its logits "
                            "in a way the exact KL does not know (known: final_logit_softcapping)")


def output_head(model: torch.nn.Module) -> torch.nn.Module:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise PipelineError(f"{type(model).__name__} has no output embeddings (lm_head); "
                            "the float baseline and the exact KL need one")
    return head


@torch.inference_mode()
def evaluate(model: torch.nn.Module, sequences: list[list[int]], batch_size: int = 4,
             baseline: Baseline | str | Path | None = None, collect_baseline: bool = False,
             float_head: torch.nn.Module | None = None, desc: str = "evaluate") -> EvalResult:
    """Evaluate `model` on token-id `sequences` (one forward per batch of `batch_size`).

    `baseline` (a Baseline or a saved file) adds exact KL and agreement against the float model,
    whose logits are recomputed with `float_head` (default: `model`'s own lm_head, which the
    quantization leaves float). `collect_baseline=True` records this model's baseline in
    `result.baseline` (do it for the float run).
    """
    _check_sequences(sequences)
    if batch_size < 1:
        raise PipelineError(f"batch_size {batch_size} must be >= 1")
    fingerprint = tokens_sha256(sequences)
    if isinstance(baseline, (str, Path)):
        baseline = load_baseline(baseline)
    softcap = final_logit_softcap(model)
    if baseline is not None:
        check_baseline_matches(baseline, sequences, fingerprint)
        offsets = baseline.offsets()
        float_head = output_head(model) if float_head is None else float_head
        in_features = getattr(float_head, "in_features", baseline.hidden.shape[-1])
        if baseline.hidden.shape[-1] != in_features:
            raise PipelineError(f"float baseline hidden size {baseline.hidden.shape[-1]} does not match the lm_head "
                                f"input size {in_features}; re-run the float evaluation with this model")

    model.eval()
    device = _model_device(model)
    captured: list[torch.Tensor] = []
    hook = None
    if collect_baseline:
        head = output_head(model)

        def capture_head_input(module, args, kwargs):
            captured.append(args[0] if args else kwargs["input"])

        hook = head.register_forward_pre_hook(capture_head_input, with_kwargs=True)
    # Longest first: similar lengths share a batch (less padding), and an out-of-memory shows at once.
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    per_sample: list[dict | None] = [None] * len(sequences)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    try:
        for number, batch in enumerate(tqdm(batches, desc=desc, unit="batch")):
            input_ids, attention_mask = collate([sequences[i] for i in batch], 0, device)
            captured.clear()
            logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            if collect_baseline:
                if len(captured) != 1:
                    raise PipelineError(f"{type(model).__name__}: lm_head ran {len(captured)} times in one forward; "
                                        "the float baseline needs exactly one call")
                hidden = captured[0]
                if number == 0:
                    _check_recomputed_logits(model, head, softcap, hidden, logits)
            if baseline is not None:
                # One lm_head matmul for the whole batch: in small pieces the weight read would dominate.
                float_hidden = torch.cat([baseline.hidden[offsets[i]:offsets[i] + len(sequences[i]) - 1]
                                          for i in batch])
                float_logits = head_logits(float_head, float_hidden.to(device), softcap)
                float_starts = np.cumsum([0] + [len(sequences[i]) - 1 for i in batch]).tolist()
            for row, i in enumerate(batch):
                length = len(sequences[i])
                sample_logits = logits[row, :length - 1]
                nll = _token_nll(sample_logits.float(), input_ids[row, :length])
                correct = bool(sample_logits[-1].float().argmax() == input_ids[row, length - 1])
                kl = agree = None
                if baseline is not None:
                    kl = exact_kl(float_logits[float_starts[row]:float_starts[row + 1]], sample_logits)
                    positions = slice(offsets[i], offsets[i] + length - 1)
                    agree = sample_logits.argmax(-1).cpu() == baseline.argmax[positions]
                sample = record_sums(correct, nll, kl, agree)
                # The continuation: positions p-1..L-2 predict tokens p..L-1 (p = prefill_length(L)).
                tail = slice(prefill_length(length) - 1, None)
                sample["continuation"] = record_sums(correct, nll[tail], None if kl is None else kl[tail],
                                                     None if agree is None else agree[tail])
                if collect_baseline:
                    sample["hidden"] = hidden[row, :length - 1].to("cpu", copy=True)
                    sample["argmax"] = sample_logits.argmax(-1).cpu()
                per_sample[i] = sample
            captured.clear()
            logits = float_logits = None  # free both before the next forward
    finally:
        if hook is not None:
            hook.remove()

    result = result_of_sums(per_sample)
    result.continuation = result_of_sums([s["continuation"] for s in per_sample])
    if collect_baseline:
        result.baseline = Baseline(
            tokens_sha256=fingerprint,
            sequence_lengths=torch.tensor([len(s) for s in sequences], dtype=torch.long),
            argmax=torch.cat([s["argmax"] for s in per_sample]),
            hidden=torch.cat([s["hidden"] for s in per_sample]),
        )
    return result


def result_of_sums(rows: list[dict]) -> EvalResult:
    """An EvalResult from per-record sums (dicts with correct, nll_sum, num_tokens and, with a float reference,
    kl_sum and agreement_count)."""
    result = EvalResult(last_token_correct=[r["correct"] for r in rows], nll_sum=[r["nll_sum"] for r in rows],
                        num_tokens=[r["num_tokens"] for r in rows])
    if rows and "kl_sum" in rows[0]:
        result.kl_sum = [r["kl_sum"] for r in rows]
        result.agreement_count = [r["agreement_count"] for r in rows]
    return result


# ---------------------------------------------------------------- per-record data and intervals

def _record_arrays(result: EvalResult, name: str) -> dict[str, np.ndarray | None]:
    """Per-record arrays of a result, checked to have one entry per record."""
    n = len(result.last_token_correct)
    if n == 0:
        raise PipelineError(f"{name} has no records")
    arrays: dict[str, np.ndarray | None] = {}
    for key in _PER_RECORD_KEYS:
        values = getattr(result, key)
        if values is None:
            arrays[key] = None
            continue
        if len(values) != n:
            raise PipelineError(f"{name}: {key} has {len(values)} records, last_token_correct has {n}")
        arrays[key] = np.asarray(values, dtype=np.float64)
    if np.any(arrays["num_tokens"] < 1):
        raise PipelineError(f"{name}: num_tokens must be >= 1 for every record")
    return arrays


def _exp(values: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return np.exp(values)


def _point_metrics(arrays: dict, float_arrays: dict | None) -> dict[str, float | None]:
    tokens = arrays["num_tokens"].sum()
    point = {
        "accuracy": float(arrays["last_token_correct"].mean()),
        "perplexity": float(_exp(arrays["nll_sum"].sum() / tokens)),
        "kl": None if arrays["kl_sum"] is None else float(arrays["kl_sum"].sum() / tokens),
        "agreement": None if arrays["agreement_count"] is None else float(arrays["agreement_count"].sum() / tokens),
        "perplexity_increase": None,
    }
    if float_arrays is not None:
        log_ratio = arrays["nll_sum"].sum() / tokens - float_arrays["nll_sum"].sum() / float_arrays["num_tokens"].sum()
        point["perplexity_increase"] = float(np.expm1(log_ratio))
    return point


def _check_paired(arrays: dict, float_arrays: dict) -> None:
    n, m = len(arrays["num_tokens"]), len(float_arrays["num_tokens"])
    if n != m:
        raise PipelineError(f"paired comparison needs the same records: result has {n} records, float_result has {m}")
    if not np.array_equal(arrays["num_tokens"], float_arrays["num_tokens"]):
        first = int(np.flatnonzero(arrays["num_tokens"] != float_arrays["num_tokens"])[0])
        raise PipelineError(f"paired comparison needs the same records: record {first} has "
                            f"{int(arrays['num_tokens'][first])} tokens in result, "
                            f"{int(float_arrays['num_tokens'][first])} in float_result")


def bootstrap_intervals(result: EvalResult, float_result: EvalResult | None = None, num_resamples: int = 1000,
                        seed: int = 0, level: float = 0.95) -> dict[str, float | None]:
    """Percentile bootstrap intervals over records: `<metric>_ci_low` / `<metric>_ci_high` (module docstring).

    Each resample draws len(records) records with replacement and recomputes the ratio estimators
    (sum of NLL / sum of tokens, ...); `perplexity_increase` uses the same draw for `float_result`
    (the float model's result on the same records), so the interval is paired.
    """
    if not isinstance(num_resamples, int) or num_resamples < 1:
        raise PipelineError(f"num_resamples {num_resamples!r} must be an integer >= 1")
    if not 0.0 < level < 1.0:
        raise PipelineError(f"level {level!r} must be strictly between 0 and 1 (e.g. 0.95)")
    arrays = _record_arrays(result, "result")
    float_arrays = None if float_result is None else _record_arrays(float_result, "float_result")
    if float_arrays is not None:
        _check_paired(arrays, float_arrays)
    n = len(arrays["num_tokens"])
    draws = np.random.default_rng(seed).integers(0, n, size=(num_resamples, n))

    def resampled_sum(values: np.ndarray) -> np.ndarray:
        return values[draws].sum(axis=1)

    tokens = resampled_sum(arrays["num_tokens"])
    mean_nll = resampled_sum(arrays["nll_sum"]) / tokens
    samples = {
        "accuracy": resampled_sum(arrays["last_token_correct"]) / n,
        "perplexity": _exp(mean_nll),
        "kl": None if arrays["kl_sum"] is None else resampled_sum(arrays["kl_sum"]) / tokens,
        "agreement": None if arrays["agreement_count"] is None else resampled_sum(arrays["agreement_count"]) / tokens,
        "perplexity_increase": None,
    }
    if float_arrays is not None:
        float_mean_nll = resampled_sum(float_arrays["nll_sum"]) / resampled_sum(float_arrays["num_tokens"])
        samples["perplexity_increase"] = np.expm1(mean_nll - float_mean_nll)
    tail = (1.0 - level) / 2.0
    intervals: dict[str, float | None] = {}
    for metric, values in samples.items():
        low, high = (None, None) if values is None else (float(q) for q in np.quantile(values, [tail, 1.0 - tail]))
        intervals[f"{metric}_ci_low"], intervals[f"{metric}_ci_high"] = low, high
    return intervals


def summarize(result: EvalResult, float_result: EvalResult | None = None, num_resamples: int = 1000,
              seed: int = 0, level: float = 0.95) -> dict:
    """Corpus-level metrics with bootstrap intervals; every key is documented in the module docstring.

    `float_result` (the float model's result on the same records) adds `perplexity_increase`;
    `num_resamples=0` skips the intervals (their keys are None).
    """
    arrays = _record_arrays(result, "result")
    float_arrays = None if float_result is None else _record_arrays(float_result, "float_result")
    if float_arrays is not None:
        _check_paired(arrays, float_arrays)
    summary: dict = dict(_point_metrics(arrays, float_arrays))
    if num_resamples == 0:
        summary.update({f"{m}_ci_{side}": None for m in list(summary) for side in ("low", "high")})
    else:
        summary.update(bootstrap_intervals(result, float_result, num_resamples, seed, level))
    summary.update(ci_level=level, num_resamples=num_resamples, num_samples=len(arrays["num_tokens"]),
                   num_tokens=int(arrays["num_tokens"].sum()))
    return summary


def interval_text(row: dict, key: str) -> str:
    """A summary's `key` with its interval as the summaries print it: '22.3100 [21.9000, 22.8000]', '+1.72%
    [+1.08%, +2.37%]' for perplexity_increase, '–' without a value."""
    value, low, high = row.get(key), row.get(f"{key}_ci_low"), row.get(f"{key}_ci_high")
    if value is None:
        return "–"
    bracketed = low is not None and high is not None
    if key == "perplexity_increase":
        return f"{value:+.2%}" + (f" [{low:+.2%}, {high:+.2%}]" if bracketed else "")
    text = f"{value:.4f}" if isinstance(value, float) else str(value)
    return text + (f" [{low:.4f}, {high:.4f}]" if bracketed else "")


def per_record(result: EvalResult) -> dict:
    """The per-record data of a result as plain JSON types (keys: module docstring), with its continuation sums
    and the prefill fraction they follow under "continuation" when the result has them."""
    _record_arrays(result, "result")
    data = {
        "last_token_correct": [bool(v) for v in result.last_token_correct],
        "nll_sum": [float(v) for v in result.nll_sum],
        "num_tokens": [int(v) for v in result.num_tokens],
        "kl_sum": None if result.kl_sum is None else [float(v) for v in result.kl_sum],
        "agreement_count": None if result.agreement_count is None else [int(v) for v in result.agreement_count],
    }
    if result.continuation is not None:
        data["continuation"] = {"prefill_fraction": PREFILL_FRACTION, **per_record(result.continuation)}
    return data


def continuation_from_per_record(data: dict, source: str, fraction: float = PREFILL_FRACTION) -> EvalResult:
    """The continuation sums (after a prefill of `fraction`) of `per_record` output read back from `source`."""
    part = data.get("continuation") if isinstance(data, dict) else None
    if not isinstance(part, dict):
        raise PipelineError(f"{source}: its per-record data has no continuation sums (written before they existed); "
                            "delete it and re-run the step that wrote it")
    if part.get("prefill_fraction") != fraction:
        raise PipelineError(f"{source}: continuation sums after a prefill of {part.get('prefill_fraction')!r} of each "
                            f"record, but {fraction!r} was asked for; delete it and re-run the step that wrote it")
    return result_from_per_record(part, f"{source} (continuation)")


def result_from_per_record(data: dict, source: str = "per-record data") -> EvalResult:
    """An EvalResult (without baseline) from `per_record` output, e.g. read back from a JSON file."""
    if not isinstance(data, dict):
        raise PipelineError(f"{source}: per-record data must be a mapping with keys {', '.join(_PER_RECORD_KEYS)}")
    missing = [key for key in _PER_RECORD_KEYS if key not in data]
    if missing:
        raise PipelineError(f"{source}: per-record data lacks {', '.join(missing)}; "
                            f"expected keys {', '.join(_PER_RECORD_KEYS)}")
    for key in _PER_RECORD_KEYS:
        values = data[key]
        optional = key in ("kl_sum", "agreement_count")
        if values is None and optional:
            continue
        if not isinstance(values, list) or not all(isinstance(v, (int, float)) and not isinstance(v, str)
                                                   for v in values):
            raise PipelineError(f"{source}: per-record {key} must be a list of numbers"
                                f"{' or null' if optional else ''}, got {type(values).__name__}")
    result = EvalResult(
        last_token_correct=[bool(v) for v in data["last_token_correct"]],
        nll_sum=[float(v) for v in data["nll_sum"]],
        num_tokens=[int(v) for v in data["num_tokens"]],
        kl_sum=None if data["kl_sum"] is None else [float(v) for v in data["kl_sum"]],
        agreement_count=None if data["agreement_count"] is None else [int(v) for v in data["agreement_count"]],
    )
    _record_arrays(result, source)
    return result


# ---------------------------------------------------------------- baseline file

def check_baseline_matches(baseline: Baseline, sequences: list[list[int]], fingerprint: str) -> None:
    if baseline.tokens_sha256 != fingerprint or len(baseline.sequence_lengths) != len(sequences):
        raise PipelineError("float baseline was computed on other token sequences than this evaluation "
                            f"({len(baseline.sequence_lengths)} vs {len(sequences)} sequences); "
                            "re-run the float evaluation on the same data")


def save_baseline(path: str | Path, baseline: Baseline) -> None:
    """Write a Baseline as safetensors (atomically); the hidden states keep their dtype."""
    tensors = {
        "sequence_lengths": baseline.sequence_lengths.to(torch.int64).contiguous(),
        "argmax": baseline.argmax.to(torch.int32).contiguous(),
        "hidden": baseline.hidden.contiguous(),
    }
    metadata = {"format": BASELINE_FORMAT, "tokens_sha256": baseline.tokens_sha256}
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
        raise PipelineError(f"{path}: float baseline format {metadata.get('format')!r} is not {BASELINE_FORMAT!r} "
                            "(written by an older version); re-run the float evaluation")
    missing = [name for name in _BASELINE_TENSORS if name not in tensors]
    if missing or "tokens_sha256" not in metadata:
        raise PipelineError(f"{path}: incomplete float baseline (missing {', '.join(missing) or 'metadata'}); "
                            "re-run the float evaluation")
    baseline = Baseline(
        tokens_sha256=metadata["tokens_sha256"],
        sequence_lengths=tensors["sequence_lengths"].long(),
        argmax=tensors["argmax"].long(),
        hidden=tensors["hidden"],
    )
    positions = int((baseline.sequence_lengths - 1).sum())
    if baseline.argmax.shape != (positions,) or baseline.hidden.dim() != 2 or baseline.hidden.shape[0] != positions:
        raise PipelineError(f"{path}: float baseline tensors disagree in shape with its {positions} positions; "
                            "re-run the float evaluation")
    return baseline
