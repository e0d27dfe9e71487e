"""Where the quantization loss comes from, and which Linear sides to shadow.

- `sensitivity_proxy`: a one-pass estimate, for every (layer, side), of the KL that clipping that
  side alone adds: 1/2 E[(g . dy)^2] with dy the change of the Linear's output between clipping
  (scale = max, clamp) and shadow (scale = 99.9 % quantile, no clamp) and g the gradient of the
  log-probability of tokens sampled from the float model (Fisher information, float model).
- `side_sensitivity`: the measured increase of KL (and NLL) when ONE side is clipped, everything
  else at the all-shadow reference; one forward over the given sequences per side.
- `greedy_front`: shadow sets ordered by benefit (measured or proxy KL increase) per device cost.
- `decisions_for_shadow_set`: the per-layer LayerQuant of a shadow set (exported unchanged).
- `mse_clip_scales`: optional clip scales that minimise the int8 MSE over a calibration histogram.
- `layer_ranking`: under an NPU runtime profile, the measured value of each layer as a shadow layer.

KL and agreement here are against full-vocabulary float log-probs kept in memory for the (small)
sequence set, independent of the metrics module's stored baseline.
"""

from __future__ import annotations

import copy
import csv
import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from shadowquant.atomic import atomic_path
from shadowquant.runtimes.decision import SIDES, STAT_KEYS, LayerQuant, decide_shadow_set
from shadowquant.errors import PipelineError
from shadowquant.runtimes.fakequant import W8A8Linear, apply_w8a8, fake_quant_activation, input_step, output_step
from shadowquant.calibrate.profiling import collate

log = logging.getLogger(__name__)

Side = tuple[str, str]  # (layer name, "input" | "output")


# ---------------------------------------------------------------- float reference and comparison


def _batches(sequences: list[list[int]], batch_size: int) -> list[list[int]]:
    if not sequences:
        raise PipelineError("no sequences given (empty evaluation set)")
    if batch_size < 1:
        raise PipelineError(f"batch_size {batch_size} must be >= 1")
    for i, seq in enumerate(sequences):
        if len(seq) < 2:
            raise PipelineError(f"sequence {i} has {len(seq)} token(s); at least 2 are needed")
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def _forward_logprobs(model: nn.Module, sequences: list[list[int]], batch: list[int]):
    """Yield (index, float32 log-probs at the predicted positions [L - 1, V]) for one right-padded batch."""
    ids, mask = collate([sequences[i] for i in batch], 0, next(model.parameters()).device)
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    for row, i in enumerate(batch):
        yield i, torch.log_softmax(logits[row, :len(sequences[i]) - 1].float(), dim=-1).cpu()


@torch.inference_mode()
def reference_logprobs(model: nn.Module, sequences: list[list[int]], batch_size: int = 4,
                       progress: bool = True) -> list[torch.Tensor]:
    """Float32 full-vocabulary log-probs of `model` per sequence ([L - 1, V] each), kept in memory."""
    model.eval()
    out: list[torch.Tensor | None] = [None] * len(sequences)
    for batch in tqdm(_batches(sequences, batch_size), desc="float reference", unit="batch", disable=not progress):
        for i, logprobs in _forward_logprobs(model, sequences, batch):
            out[i] = logprobs
    return out


@dataclass
class Comparison:
    """Per-sequence sums against the float reference; summary() pools them."""

    kl_sum: list[float]
    nll_sum: list[float]
    agreement_count: list[int]
    num_tokens: list[int]

    def summary(self) -> dict:
        tokens = sum(self.num_tokens)
        nll = sum(self.nll_sum) / tokens
        return {"kl": sum(self.kl_sum) / tokens, "nll": nll,
                "perplexity": math.exp(nll) if nll < 700 else float("inf"),
                "agreement": sum(self.agreement_count) / tokens, "num_tokens": tokens}


@torch.inference_mode()
def compare_to_reference(model: nn.Module, sequences: list[list[int]], reference: list[torch.Tensor],
                         batch_size: int = 4, progress: bool = False, desc: str = "compare") -> Comparison:
    """Exact KL(float || model) over the full vocabulary, NLL and top-1 agreement, per sequence."""
    if len(reference) != len(sequences) or any(r.shape[0] != len(s) - 1 for r, s in zip(reference, sequences)):
        raise PipelineError("float reference log-probs were computed on other sequences; recompute them")
    model.eval()
    n = len(sequences)
    result = Comparison([0.0] * n, [0.0] * n, [0] * n, [len(s) - 1 for s in sequences])
    for batch in tqdm(_batches(sequences, batch_size), desc=desc, unit="batch", disable=not progress):
        for i, q_log in _forward_logprobs(model, sequences, batch):
            p_log = reference[i]
            # 0 * log(0 / q) = 0: exp(-inf) = 0 multiplies a finite or -inf+inf term, masked out.
            terms = torch.where(p_log > -math.inf, p_log.exp() * (p_log - q_log), torch.zeros_like(p_log))
            targets = torch.tensor(sequences[i][1:], dtype=torch.long)
            result.kl_sum[i] = float(terms.double().sum())
            result.nll_sum[i] = float(-q_log.gather(-1, targets[:, None]).double().sum())
            result.agreement_count[i] = int((q_log.argmax(-1) == p_log.argmax(-1)).sum())
    return result


# ---------------------------------------------------------------- decisions


def side_scales(act_scales: dict, statistic: str, layers: list[str], source: str = "act_scales") -> dict[Side, tuple[float, float]]:
    """(clip scale = max, shadow scale = 99.9 % quantile) of every side of `layers` under `statistic`."""
    if statistic not in STAT_KEYS:
        raise PipelineError(f"unknown statistic '{statistic}'; valid: {', '.join(STAT_KEYS)}")
    ori_key, top_key = STAT_KEYS[statistic]
    if not isinstance(act_scales.get(ori_key), dict) or not isinstance(act_scales.get(top_key), dict):
        raise PipelineError(f"{source}: has no '{ori_key}'/'{top_key}' keys; re-run profiling to get the {statistic} statistic")
    out = {}
    for layer in layers:
        for side in SIDES:
            try:
                ori = float(act_scales[ori_key][layer][side])
                top = float(act_scales[top_key][layer][side])
            except (KeyError, TypeError, ValueError):
                raise PipelineError(f"{source}: layer '{layer}' has no numeric '{side}' value under "
                                    f"'{ori_key}'/'{top_key}'; profile this model again") from None
            for value in (ori, top):
                if not (math.isfinite(value) and value > 0):
                    raise PipelineError(f"{source}: layer '{layer}' {side} scale {value!r} under statistic "
                                        f"'{statistic}' is not a positive finite number")
            out[(layer, side)] = (ori, top)
    return out


def _parse_side(item) -> Side:
    if isinstance(item, str):
        layer, sep, side = item.rpartition(":")
        if sep:
            return layer, side
    elif isinstance(item, (tuple, list)) and len(item) == 2:
        return str(item[0]), str(item[1])
    raise PipelineError(f"shadow side {item!r} is not valid; give (layer, side) or 'layer:side' with side input or output")


def decisions_for_shadow_set(act_scales: dict, statistic: str, shadow_sides: Iterable, layers: list[str],
                             clip_scales: dict[Side, float] | None = None,
                             source: str = "act_scales") -> dict[str, LayerQuant]:
    """Shadow sides get (99.9 % quantile, no clip); every other side gets (clip scale, clip).

    `shadow_sides`: (layer, side) pairs or 'layer:side' strings, each of a layer in `layers`.
    `clip_scales` optionally replaces the max as the clip scale of some sides (see mse_clip_scales).
    """
    scales = side_scales(act_scales, statistic, layers, source)
    shadow = set()
    for item in shadow_sides:
        side = _parse_side(item)
        if side not in scales:
            if side[1] not in SIDES:
                raise PipelineError(f"shadow side {item!r}: side must be one of {', '.join(SIDES)}")
            raise PipelineError(f"shadow side {item!r}: layer '{side[0]}' is not a quantized layer of this model")
        shadow.add(side)
    for key, value in (clip_scales or {}).items():
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise PipelineError(f"clip scale of {key[0]}:{key[1]} is {value!r}; it must be a positive finite number")
    return decide_shadow_set(act_scales, statistic, shadow, layers, source, clip_scales)


def all_sides(layers: list[str]) -> list[Side]:
    return [(layer, side) for layer in layers for side in SIDES]


def quantized_copy(model: nn.Module, decisions: dict[str, LayerQuant], layers: list[str], quantize_weights: bool = True,
                   quantize_inputs: bool = True, quantize_outputs: bool = True, weight_range: str = "max") -> nn.Module:
    """A simulated-W8A8 copy of `model` (the float model is left as it is)."""
    return apply_w8a8(copy.deepcopy(model), decisions, layers, quantize_weights, quantize_inputs, quantize_outputs,
                      weight_range)


# ---------------------------------------------------------------- device cost


def side_costs(model: nn.Module, layers: list[str]) -> dict[Side, dict]:
    """Per side: shadow elements per token (in_features for an input side, out_features for an output
    side) and shadow FLOP share: the multiply-adds per token the shadow path needs if every element
    were an outlier (input side: in * out, output side: out) over the quantized layers' in * out total."""
    shapes = {}
    for layer in layers:
        module = model.get_submodule(layer)
        if not isinstance(module, (nn.Linear, W8A8Linear)):
            raise PipelineError(f"module '{layer}' is a {type(module).__name__}, not a Linear")
        shapes[layer] = (module.in_features, module.out_features)
    total = sum(i * o for i, o in shapes.values())
    out = {}
    for layer, (i, o) in shapes.items():
        out[(layer, "input")] = {"shadow_elements": i, "shadow_flop_share": i * o / total}
        out[(layer, "output")] = {"shadow_elements": o, "shadow_flop_share": o / total}
    return out


# ---------------------------------------------------------------- sensitivity


@dataclass
class SideSensitivity:
    """One row of the sensitivity table; delta_* are None where the side was not measured."""

    layer: str
    side: str
    clip_scale: float
    shadow_scale: float
    ratio: float  # clip / shadow scale
    shadow_elements: int
    shadow_flop_share: float
    proxy_kl: float | None = None  # sensitivity_proxy's estimate of the KL increase
    delta_kl: float | None = None  # measured: KL(clip this side) - KL(all shadow)
    delta_nll: float | None = None  # measured: mean NLL increase (log of the perplexity ratio)
    benefit: float | None = None  # what the front ranks by: delta_kl where measured, else proxy_kl


def sensitivity_rows(model: nn.Module, layers: list[str], act_scales: dict, statistic: str = "absmax",
                     clip_scales: dict[Side, float] | None = None) -> list[SideSensitivity]:
    """Rows with scales and costs only, in layer order; fill them with the proxy and measurements."""
    scales = side_scales(act_scales, statistic, layers)
    costs = side_costs(model, layers)
    clip_scales = clip_scales or {}
    rows = []
    for key, (ori, top) in scales.items():
        clip = float(clip_scales.get(key, ori))
        rows.append(SideSensitivity(key[0], key[1], clip, top, clip / top, **costs[key]))
    return rows


def fisher_pass(model: nn.Module, perturbations: dict, sequences: list[list[int]], samples: int = 2, seed: int = 0,
                keys: Iterable = (), desc: str = "Fisher pass", progress: bool = True) -> dict:
    """The Fisher quadratic form (the KL to second order) of output perturbations, per key.

    `perturbations`: layer name -> f(module, x, y) returning [(key, dy)] at that layer's forward (x its
    input, y its output, both detached; dy a change of y, float64). Per sequence and draw of target
    tokens from the model itself: 1/2 (g . dy)^2 with g the gradient at the layer's output of the drawn
    tokens' summed log-probability; averaged over `samples` draws, summed over sequences, divided by the
    number of predicted tokens. `keys` fixes the result's order (others follow as first seen). Cost:
    `samples` forward + backward passes per sequence; the parameters stay frozen."""
    totals = {key: 0.0 for key in keys}
    tokens = sum(len(s) - 1 for s in sequences)

    def hook(perturb):
        def record(module, args, output):
            changes = perturb(module, args[0].detach(), output.detach())

            def accumulate(grad):
                # One sequence per forward: the whole output is one sequence (also for MoE experts'
                # token subsets), so g . dy sums over all its elements.
                g = grad.double()
                for key, dy in changes:
                    totals[key] = totals.get(key, 0.0) + float(0.5 * (g * dy).sum() ** 2) / samples
            output.register_hook(accumulate)
        return record

    was_training = model.training
    model.eval()
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    handles = [model.get_submodule(layer).register_forward_hook(hook(perturb))
               for layer, perturb in perturbations.items()]
    generator = torch.Generator().manual_seed(seed)
    try:
        device = next(model.parameters()).device
        for sequence in tqdm(sequences, desc=desc, unit="sequence", disable=not progress):
            ids = torch.tensor([sequence], dtype=torch.long, device=device)
            for _ in range(samples):
                # Gradients flow from the embeddings on (parameters stay frozen).
                embeddings = model.get_input_embeddings()(ids).detach().requires_grad_(True)
                logits = model(inputs_embeds=embeddings, use_cache=False).logits[0, :-1].float()
                logprobs = torch.log_softmax(logits, dim=-1)
                drawn = torch.multinomial(logprobs.detach().exp().cpu(), 1, generator=generator).to(device)
                logprobs.gather(-1, drawn).sum().backward()
            del embeddings, logits, logprobs
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
        model.train(was_training)
    return {key: value / tokens for key, value in totals.items()}


def sensitivity_proxy(model: nn.Module, layers: list[str], sequences: list[list[int]], act_scales: dict,
                      statistic: str = "absmax", samples: int = 2, seed: int = 0,
                      clip_scales: dict[Side, float] | None = None, progress: bool = True) -> dict[Side, float]:
    """Second-order estimate of the KL increase of clipping each side alone, from the float model
    (fisher_pass): dy is the output change clip - shadow of that side (input side: linear(x_clip -
    x_shadow, W)); a per-token KL like delta_kl."""
    scales = side_scales(act_scales, statistic, layers)
    clip_scales = clip_scales or {}
    steps = {}
    for (layer, side), (ori, top) in scales.items():
        clip = float(clip_scales.get((layer, side), ori))
        make = input_step if side == "input" else output_step
        steps[(layer, side)] = (make(clip), make(top))
    modules = {layer: model.get_submodule(layer) for layer in layers}
    for layer, module in modules.items():
        if not isinstance(module, nn.Linear):
            raise PipelineError(f"sensitivity_proxy needs the float model; '{layer}' is a {type(module).__name__}")

    def clip_minus_shadow(layer):
        (in_clip, in_shadow), (out_clip, out_shadow) = steps[(layer, "input")], steps[(layer, "output")]

        def perturb(module, x, y):
            dx = fake_quant_activation(x, in_clip, True) - fake_quant_activation(x, in_shadow, False)
            dy_in = F.linear(dx, module.weight).double()
            dy_out = (fake_quant_activation(y, out_clip, True) - fake_quant_activation(y, out_shadow, False)).double()
            return [((layer, "input"), dy_in), ((layer, "output"), dy_out)]
        return perturb

    return fisher_pass(model, {layer: clip_minus_shadow(layer) for layer in layers}, sequences, samples, seed,
                       keys=scales, desc="sensitivity proxy", progress=progress)


@torch.inference_mode()
def side_sensitivity(model: nn.Module, layers: list[str], sequences: list[list[int]], act_scales: dict,
                     statistic: str = "absmax", sides: Iterable | None = None,
                     reference: list[torch.Tensor] | None = None, weight_range: str = "max",
                     clip_scales: dict[Side, float] | None = None, batch_size: int = 4,
                     progress: bool = True) -> tuple[dict, dict[Side, dict]]:
    """Measured increase of KL and NLL when ONE side is clipped, the rest at the all-shadow reference.

    `model` is the float model (copied, not changed). `sides` (default: all) are (layer, side) pairs or
    'layer:side'. Returns (reference summary, {side: {"delta_kl", "delta_nll", "kl", "perplexity"}}).
    Cost: one forward over `sequences` per side, plus the float reference if not given.
    """
    if reference is None:
        reference = reference_logprobs(model, sequences, batch_size, progress)
    every = all_sides(layers)
    shadow_all = decisions_for_shadow_set(act_scales, statistic, every, layers)
    clipped = decisions_for_shadow_set(act_scales, statistic, [], layers, clip_scales)
    wanted = every if sides is None else [_parse_side(s) for s in sides]
    unknown = [s for s in wanted if s not in set(every)]
    if unknown:
        raise PipelineError(f"side {unknown[0][0]}:{unknown[0][1]} is not a side of the quantized layers")
    quantized = quantized_copy(model, shadow_all, layers, weight_range=weight_range)
    base = compare_to_reference(quantized, sequences, reference, batch_size).summary()
    out = {}
    for layer, side in tqdm(wanted, desc="side sensitivity", unit="side", disable=not progress):
        module = quantized.get_submodule(layer)
        ref_q, clip_q = shadow_all[layer], clipped[layer]
        if side == "input":
            trial = LayerQuant(clip_q.input_scale, ref_q.output_scale, True, ref_q.clip_output)
        else:
            trial = LayerQuant(ref_q.input_scale, clip_q.output_scale, ref_q.clip_input, True)
        module.set_quant(trial)
        try:
            summary = compare_to_reference(quantized, sequences, reference, batch_size).summary()
        finally:
            module.set_quant(ref_q)
        out[(layer, side)] = {"delta_kl": summary["kl"] - base["kl"], "delta_nll": summary["nll"] - base["nll"],
                              "kl": summary["kl"], "perplexity": summary["perplexity"]}
    return base, out


def rank_correlation(a: list[float], b: list[float]) -> float:
    """Spearman rank correlation (ties get their average rank), to validate a proxy against measurements."""
    if len(a) != len(b) or len(a) < 2:
        raise PipelineError(f"rank correlation needs two equally long lists of >= 2 values (got {len(a)}, {len(b)})")

    def ranks(values):
        values = np.asarray(values, dtype=np.float64)
        order = np.argsort(values, kind="stable")
        result = np.empty(len(values))
        sorted_values = values[order]
        start = 0
        for end in range(1, len(values) + 1):
            if end == len(values) or sorted_values[end] != sorted_values[start]:
                result[order[start:end]] = (start + end - 1) / 2
                start = end
        return result

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = math.sqrt(float((ra ** 2).sum() * (rb ** 2).sum()))
    return float((ra * rb).sum() / denominator) if denominator > 0 else float("nan")


def sensitivity_table(model: nn.Module, layers: list[str], sequences: list[list[int]], act_scales: dict,
                      statistic: str = "absmax", measure_top: int = 40, measure_sequences: int = 8,
                      proxy_samples: int = 2, weight_range: str = "max",
                      clip_scales: dict[Side, float] | None = None, batch_size: int = 4, seed: int = 0,
                      progress: bool = True) -> tuple[list[SideSensitivity], dict]:
    """The sensitivity table at bounded cost: the proxy for every side on `sequences`, then the full
    measure for the `measure_top` sides the proxy ranks highest, on the first `measure_sequences`.

    Returns (rows in layer order with benefit = delta_kl where measured, else proxy_kl; info with the
    all-shadow reference summary, seconds per stage and the proxy's rank correlation with the measure).
    """
    if measure_top < 0 or measure_sequences < 1:
        raise PipelineError(f"measure_top {measure_top} must be >= 0 and measure_sequences {measure_sequences} >= 1")
    rows = sensitivity_rows(model, layers, act_scales, statistic, clip_scales)
    started = time.perf_counter()
    proxy = sensitivity_proxy(model, layers, sequences, act_scales, statistic, proxy_samples, seed, clip_scales, progress)
    proxy_seconds = time.perf_counter() - started
    ranked = sorted(proxy, key=lambda key: (-proxy[key], key))[:measure_top]
    subset = sequences[:measure_sequences]
    started = time.perf_counter()
    base, measured = side_sensitivity(model, layers, subset, act_scales, statistic, ranked, None, weight_range,
                                      clip_scales, batch_size, progress) if ranked else ({}, {})
    measure_seconds = time.perf_counter() - started
    for row in rows:
        key = (row.layer, row.side)
        row.proxy_kl = proxy[key]
        if key in measured:
            row.delta_kl, row.delta_nll = measured[key]["delta_kl"], measured[key]["delta_nll"]
        row.benefit = row.delta_kl if row.delta_kl is not None else row.proxy_kl
    keys = list(measured)
    info = {
        "reference": base, "proxy_sequences": len(sequences), "proxy_samples": proxy_samples,
        "measured_sides": len(keys), "measure_sequences": len(subset),
        "proxy_seconds": proxy_seconds, "measure_seconds": measure_seconds,
        "rank_correlation": (rank_correlation([proxy[k] for k in keys], [measured[k]["delta_kl"] for k in keys])
                             if len(keys) >= 2 else None),
    }
    return rows, info


# ---------------------------------------------------------------- selection


@dataclass(frozen=True)
class FrontPoint:
    num_shadow_sides: int
    cost: float  # summed cost of the shadow sides
    benefit: float  # summed benefit (predicted KL saved against clipping everything)
    shadow_sides: tuple[Side, ...]


def greedy_front(table: Iterable, benefit_key: str = "delta_kl", cost_key: str = "shadow_elements",
                 max_cost: float | None = None) -> list[FrontPoint]:
    """Shadow sets by greedy benefit per cost: point k shadows the first k sides of the order.

    `table`: SideSensitivity rows or dicts with layer, side, the benefit and the cost. Sides with
    positive benefit come first by benefit / cost (zero cost first), then larger benefit, then name;
    sides without positive benefit follow by cost. With `max_cost`, a side that would exceed the budget
    is skipped (greedy knapsack). Point 0 is the empty set; cost is non-decreasing along the front.
    """
    entries = []
    for row in table:
        row = asdict(row) if not isinstance(row, dict) else row
        try:
            benefit, cost = row[benefit_key], float(row[cost_key])
            key = (str(row["layer"]), str(row["side"]))
        except KeyError as exc:
            raise PipelineError(f"sensitivity table row lacks {exc}; needs layer, side, {benefit_key}, {cost_key}") from None
        if benefit is None or not math.isfinite(float(benefit)):
            raise PipelineError(f"sensitivity table: {key[0]}:{key[1]} has no finite {benefit_key} ({benefit!r})")
        if not (math.isfinite(cost) and cost >= 0):
            raise PipelineError(f"sensitivity table: {key[0]}:{key[1]} {cost_key} {cost!r} must be >= 0")
        entries.append((key, float(benefit), cost))
    keys = [e[0] for e in entries]
    if len(set(keys)) != len(keys):
        raise PipelineError("sensitivity table names a side more than once")
    if max_cost is not None and not (max_cost >= 0):
        raise PipelineError(f"max_cost {max_cost!r} must be >= 0")

    def order(entry):
        key, benefit, cost = entry
        if benefit > 0:
            ratio = math.inf if cost == 0 else benefit / cost
            return (0, -ratio, -benefit, key)
        return (1, cost, -benefit, key)

    front = [FrontPoint(0, 0.0, 0.0, ())]
    chosen: list[Side] = []
    cost_sum = benefit_sum = 0.0
    for key, benefit, cost in sorted(entries, key=order):
        if max_cost is not None and cost_sum + cost > max_cost:
            continue
        chosen.append(key)
        cost_sum += cost
        benefit_sum += benefit
        front.append(FrontPoint(len(chosen), cost_sum, benefit_sum, tuple(chosen)))
    return front


# ---------------------------------------------------------------- MSE-optimal clip scales (calibration histogram)


@torch.inference_mode()
def mse_clip_scales(model: nn.Module, layers: list[str], sequences: list[list[int]], act_scales: dict,
                    statistic: str = "absmax", bins: int = 2048, progress: bool = True) -> dict[Side, float]:
    """Per side, the clip scale c <= max|x| minimising the int8 MSE of |x| over a calibration pass.

    A histogram of |x| with `bins` bins up to the side's clip scale (the profiled max) is accumulated
    per side (memory: 2 * bins floats per side); each bin edge is a candidate c, scored with every
    bin's mass at its centre: rounding error step^2 / 12 inside the range, (|x| - c)^2 beyond it.
    Run it on the float model; returned scales are plain floats (the existing format).
    """
    if bins < 16:
        raise PipelineError(f"bins {bins} must be >= 16")
    scales = side_scales(act_scales, statistic, layers)
    hist = {key: torch.zeros(bins, dtype=torch.float64) for key in scales}

    def add(key, t):
        top = scales[key][0]
        values = t.detach().float().abs().flatten()
        hist[key] += torch.histc(values.clamp(max=top), bins=bins, min=0.0, max=top).double()

    observe_sides(model, layers, sequences, add, "clip histograms", progress)
    out = {}
    for key, counts in hist.items():
        out[key] = histogram_mse_clip(counts, scales[key][0])
    return out


@torch.inference_mode()
def observe_sides(model: nn.Module, layers: list[str], sequences: list[list[int]], add, desc: str,
                  progress: bool = True) -> None:
    """One forward per sequence (no padding) calling `add((layer, side), tensor)` for the input and the
    output of every named Linear."""
    def hook(layer):
        def record(module, args, output):
            add((layer, "input"), args[0])
            add((layer, "output"), output)
        return record

    handles = [model.get_submodule(layer).register_forward_hook(hook(layer)) for layer in layers]
    device = next(model.parameters()).device
    try:
        for seq in tqdm(sequences, desc=desc, unit="sequence", disable=not progress):
            model(input_ids=torch.tensor([seq], dtype=torch.long, device=device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()


def histogram_mse_clip(counts: torch.Tensor, top: float) -> float:
    """The upper bin edge c minimising the int8 MSE of a |x| histogram on [0, top], mass at bin centres.

    Inside the range a value rounds with error x^2 if |x| < step / 2 (it becomes 0), else step^2 / 12
    on average; beyond it the error is (|x| - c)^2. step = c / 127. Ties go to the larger clip.
    """
    bins = counts.numel()
    width = top / bins
    centres = (torch.arange(bins, dtype=torch.float64) + 0.5) * width
    clips = torch.arange(1, bins + 1, dtype=torch.float64) * width
    steps = clips / 127
    cum_mass = torch.cumsum(counts, 0)
    cum_second = torch.cumsum(counts * centres ** 2, 0)
    total_mass, total_first, total_second = cum_mass[-1], (counts * centres).sum(), cum_second[-1]
    cum_first = torch.cumsum(counts * centres, 0)
    # Bins that round to zero: centre < step / 2 (searchsorted counts them); the rest of the inside bins
    # (centre <= c, i.e. bins 0..j for clip j) get step^2 / 12.
    zero_bins = torch.searchsorted(centres, steps / 2)
    pad = lambda t: torch.cat([t.new_zeros(1), t])  # noqa: E731  prefix sums with a leading 0
    zero_mass, zero_second = pad(cum_mass)[zero_bins], pad(cum_second)[zero_bins]
    inside_mass = cum_mass  # bins 0..j
    rounding = zero_second + (inside_mass - zero_mass).clamp(min=0) * steps ** 2 / 12
    beyond_mass = total_mass - cum_mass
    beyond_first = total_first - cum_first
    beyond_second = total_second - cum_second
    clipping = beyond_second - 2 * clips * beyond_first + beyond_mass * clips ** 2
    errors = rounding + clipping
    best = int((errors == errors.min()).nonzero()[-1])
    return top if best == bins - 1 else float(clips[best])


# ---------------------------------------------------------------- the workflow stage

def stage_inputs(manifest, samples, act_scales, num_samples: int, seq_len: int, device: str, dtype: str):
    """(float model, the first `num_samples` calibration records tokenized, quantized layers, act_scales)."""
    from shadowquant.inputs.corpus import read_jsonl_texts
    from shadowquant.runtimes.decision import load_act_scales
    from shadowquant.model.families import quantized_layer_names
    from shadowquant.model.loading import load_model_from_manifest
    from shadowquant.calibrate.profiling import tokenize_samples

    model, tokenizer, family = load_model_from_manifest(manifest, device, dtype)
    texts = read_jsonl_texts(samples)[:num_samples]
    sequences = [s for s in tokenize_samples(tokenizer, texts, seq_len) if len(s) >= 2]
    if not sequences:
        raise PipelineError(f"{samples}: no calibration record has two or more tokens")
    return model, sequences, quantized_layer_names(model, family), load_act_scales(act_scales)


SENSITIVITY_COLUMNS = ["layer", "side", "statistic", "ratio", "clip_scale", "shadow_scale", "cost", "flop_share",
                       "proxy_kl", "delta_kl", "delta_nll", "benefit", "rank"]
# Device cost of shadowing a side: the elements checked for outliers per token, or one per side.
COSTS = {"elements": "shadow_elements", "sides": None}


def write_sensitivity_table(out_csv, rows: list[dict]) -> None:
    """sensitivity.csv, atomically; empty cells for missing values."""
    with atomic_path(out_csv, suffix=".csv") as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=SENSITIVITY_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in row.items()})


def ranked_rows(rows: list[SideSensitivity], statistic: str, cost: str = "elements") -> list[dict]:
    """Table rows in greedy order of benefit (measured KL increase, else the proxy's) per device cost."""
    if cost not in COSTS:
        raise PipelineError(f"unknown sensitivity cost '{cost}'; valid: {', '.join(COSTS)}")
    table = [{"layer": row.layer, "side": row.side, "statistic": statistic, "ratio": row.ratio,
              "clip_scale": row.clip_scale, "shadow_scale": row.shadow_scale, "cost": row.shadow_elements,
              "flop_share": row.shadow_flop_share, "proxy_kl": row.proxy_kl, "delta_kl": row.delta_kl,
              "delta_nll": row.delta_nll, "benefit": row.benefit, "unit": 1} for row in rows]
    front = greedy_front(table, benefit_key="benefit", cost_key="cost" if COSTS[cost] else "unit")
    order = {side: rank for rank, side in enumerate(front[-1].shadow_sides, start=1)}
    for row in table:
        del row["unit"]
        row["rank"] = order[(row["layer"], row["side"])]
    return sorted(table, key=lambda r: r["rank"])


def sensitivity_stage(manifest, samples, act_scales, out_csv, statistics: list[str], num_samples: int, seq_len: int,
                      measure_top: int = 40, measure_samples: int = 4, cost: str = "elements", batch_size: int = 4,
                      device: str = "auto", dtype: str = "auto", weight_range: str = "max") -> list[dict]:
    """Per statistic: the proxy for every quantized side on the first `num_samples` calibration records, the
    full measure (clip one side alone) for the proxy's `measure_top` sides on the first `measure_samples`;
    sensitivity.csv ranked by benefit per device cost."""

    model, sequences, layers, scales = stage_inputs(manifest, samples, act_scales, num_samples, seq_len, device,
                                                     dtype)
    table = []
    for statistic in statistics:
        rows, info = sensitivity_table(model, layers, sequences, scales, statistic, measure_top=measure_top,
                                       measure_sequences=measure_samples, batch_size=batch_size,
                                       weight_range=weight_range)
        log.info("%s: proxy on %d records in %.1f s, %d sides measured on %d records in %.1f s, proxy/measure "
                 "rank correlation %s", statistic, info["proxy_sequences"], info["proxy_seconds"],
                 info["measured_sides"], info["measure_sequences"], info["measure_seconds"],
                 "n/a" if info["rank_correlation"] is None else f"{info['rank_correlation']:.3f}")
        table += ranked_rows(rows, statistic, cost)
    write_sensitivity_table(out_csv, table)
    return table


def clip_scales_stage(manifest, samples, act_scales, out_json, statistics: list[str], num_samples: int,
                      seq_len: int, device: str = "auto", dtype: str = "auto") -> dict:
    """clip_scales.json: per statistic, layer and side, the MSE-optimal clip scale from a |x| histogram over
    the first `num_samples` calibration records (for the '-mse' sweep points)."""
    from shadowquant.atomic import write_json

    model, sequences, layers, scales = stage_inputs(manifest, samples, act_scales, num_samples, seq_len, device,
                                                     dtype)
    out: dict = {}
    for statistic in statistics:
        clips = mse_clip_scales(model, layers, sequences, scales, statistic)
        table = out.setdefault(statistic, {})
        for (layer, side), value in clips.items():
            table.setdefault(layer, {})[side] = value
        lowered = sum(1 for (layer, side), value in clips.items() if value < side_scales(scales, statistic, [layer])[(layer, side)][0])
        log.info("%s: %d of %d sides get a clip below their maximum", statistic, lowered, len(clips))
    write_json(out_json, out)
    return out
