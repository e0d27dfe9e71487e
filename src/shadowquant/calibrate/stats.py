"""Exact streaming activation statistics (docs/method.md section 1).

The reference keeps every activation and sorts them at the end. Here each
layer side keeps only running moments and the largest elements the exact
order statistic can need, on the device where the activations live. Per
chunk, one pass of block extrema finds the few blocks that can hold such
elements, so the candidate search reads little beyond them.
"""

from __future__ import annotations

import functools
import math

import torch

QUANTILE = 0.999
# Large activations (e.g. lm_head logits) are processed in pieces of about this many elements
# (at least BLOCK_ROWS rows) to bound temporaries.
CHUNK_ELEMENTS = 1 << 20
# Candidate search blocks: this many consecutive rows (tokens) of one feature.
BLOCK_ROWS = 32
# Past this share of blocks over the floor (early on, when the floor is still low), a full pass is cheaper.
DENSE_BLOCK_FRACTION = 0.5
# The first cut uses block maxima when there are this many blocks per kept value, else a sample.
FIRST_CUT_BLOCKS = 8
# A sampled cut aims at this many times the values needed (the slack absorbs sampling error) ...
CUT_SLACK = 1.125
# ... from a sample in which the cut has at least this rank.
MIN_SAMPLE_RANK = 256


_MASKS: dict[tuple[torch.device, bool], tuple[torch.Tensor, torch.Tensor]] = {}


def _masks(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two reusable boolean buffers shaped like `x`: hooks run one at a time, and reusing them
    avoids a fresh allocation (and its page faults) for every chunk of every layer."""
    # Tensors made in inference mode cannot be written outside it (and vice versa): one pair each.
    key = (x.device, torch.is_inference_mode_enabled())
    bufs = _MASKS.get(key)
    if bufs is None or bufs[0].numel() < x.numel():
        size = max(x.numel(), CHUNK_ELEMENTS)
        bufs = _MASKS[key] = (torch.empty(size, dtype=torch.bool, device=x.device),
                                   torch.empty(size, dtype=torch.bool, device=x.device))
    n = x.numel()
    return bufs[0][:n], bufs[1][:n]


def above(x: torch.Tensor, floor: float) -> torch.Tensor:
    """Elements of 1-D `x` greater than `floor`."""
    mask, _ = _masks(x)
    torch.gt(x, floor, out=mask)
    return x[mask]


def abs_above(x: torch.Tensor, floor: float) -> torch.Tensor:
    """|x| for the elements of 1-D `x` with |x| > floor, without materializing |x|."""
    mask, other = _masks(x)
    torch.gt(x, floor, out=mask)
    torch.lt(x, -floor, out=other)
    torch.logical_or(mask, other, out=mask)
    return x[mask].abs()


class _Chunk:
    """Consecutive rows of one activation, [rows, features], in blocks of `block_rows` rows times
    one feature, with each block's maximum and minimum.

    Outliers of LLM activations sit in a few features, so the values above a top-0.1 % floor
    fall into few such blocks (a small fraction of blocks along rows would each catch one).
    The extrema are one cheap pass; a compare-and-gather then reads only those blocks.
    """

    def __init__(self, rows: torch.Tensor, block_rows: int):
        count, features = rows.shape
        self.x = rows.reshape(-1)
        self.features = features
        self.body = rows.view(count // block_rows, block_rows, features)
        self.block_max = self.body.amax(1).reshape(-1)  # block (group g, feature f) at g * features + f
        self.block_min = self.body.amin(1).reshape(-1)
        self._block_abs_max: torch.Tensor | None = None

    def block_maxima(self, absolute: bool) -> torch.Tensor:
        if not absolute:
            return self.block_max
        if self._block_abs_max is None:
            self._block_abs_max = torch.maximum(self.block_max, self.block_min.neg())
        return self._block_abs_max

    def values(self, absolute: bool) -> torch.Tensor:
        """All elements (|x| if `absolute`) as a new tensor: never a view of a whole activation."""
        return self.x.abs() if absolute else self.x.clone()

    def above(self, floor: float, absolute: bool) -> torch.Tensor:
        """Elements (|x| if `absolute`) greater than `floor`."""
        picked = self._flagged(self.block_maxima(absolute) > floor)
        if picked is None:  # one full pass is cheaper
            return abs_above(self.x, floor) if absolute else above(self.x, floor)
        if absolute:
            picked = picked.abs()
        return picked[picked > floor]

    def negated_below(self, floor: float) -> torch.Tensor:
        """-x for the elements with x < -floor: the negative half of |x| > floor."""
        picked = self._flagged(self.block_min < -floor)
        if picked is None:
            picked = self.x
        return picked[picked < -floor].neg()

    def _flagged(self, flags: torch.Tensor) -> torch.Tensor | None:
        """The elements of the flagged blocks, or None when so many are flagged that one full pass
        over the chunk is cheaper than gathering them."""
        blocks = flags.nonzero().squeeze(1)
        if blocks.numel() == 0:
            return self.x[:0]
        if blocks.numel() > DENSE_BLOCK_FRACTION * flags.numel():
            return None
        return self._gather(blocks)

    def _gather(self, blocks: torch.Tensor) -> torch.Tensor:
        """The elements of the given blocks (flat block indices), as one 1-D tensor."""
        group = blocks // self.features
        return self.body[group, :, blocks - group * self.features].reshape(-1)


def order_index(n: int) -> int:
    """Ascending index of the reference's `top_0_1` among n elements (Python indexing)."""
    idx = int(n * QUANTILE) - 1
    return idx + n if idx < 0 else idx  # n < 1001: index -1 is the last (largest) element


def top_count(n: int) -> int:
    """How many of the largest elements contain the reference's order statistic."""
    return n - order_index(n)


def buffer_capacity(max_elements: int) -> int:
    """Largest `top_count` over all n <= max_elements (it is non-decreasing, plus one for safety)."""
    return top_count(max_elements) + 1


@functools.lru_cache(maxsize=None)
def _prime_at_least(m: int) -> int:
    n = max(2, m)
    while any(n % d == 0 for d in range(2, math.isqrt(n) + 1)):
        n += 1
    return n


def estimated_cut(values: torch.Tensor, k: int, absolute: bool) -> float | None:
    """A value about CUT_SLACK * k of `values` (|values| if `absolute`) exceed, from an evenly
    strided sample (a prime stride, so it does not follow a channel layout); None if `values`
    hold no more than that many. Callers check the count: the estimate carries no guarantee."""
    target = math.ceil(CUT_SLACK * k)
    if values.numel() <= target:
        return None
    stride = _prime_at_least(target // MIN_SAMPLE_RANK) if target >= 2 * MIN_SAMPLE_RANK else 1
    sample = values[::stride]
    if absolute:
        sample = sample.abs()
    return float(torch.topk(sample, math.ceil(target / stride), sorted=False).values.min())


class _TopBuffer:
    """At least the `capacity` largest values (or absolute values) seen so far, unordered.

    It holds every value seen above its floor. Offers are appended and compacted once they
    reach twice the capacity, so the cost of a selection is amortized over many chunks; a
    compaction cuts at a sampled estimate (one compare instead of a large topk) and keeps
    about CUT_SLACK times the capacity. Memory stays within about twice the exact need.
    """

    def __init__(self, capacity: int, absolute: bool):
        self.capacity = capacity
        self.absolute = absolute
        self.parts: list[torch.Tensor] = []
        self.size = 0
        # At most the capacity-th largest value seen: values at or below it cannot change the
        # kept multiset (equal values are interchangeable). None until `capacity` values are held.
        self.floor: float | None = None

    def first_offer(self, chunk: _Chunk) -> None:
        """Before the buffer is full: a cut that at least `capacity` elements of the chunk exceed is a
        valid floor. With many blocks per capacity the capacity-th largest block maximum is cheap and
        close; otherwise a sampled estimate. If too few exceed the cut (ties), keep everything."""
        block_max = chunk.block_maxima(self.absolute)
        if self.capacity * FIRST_CUT_BLOCKS <= block_max.numel():
            cut = float(torch.topk(block_max, self.capacity, sorted=False).values.min())
        else:
            cut = estimated_cut(chunk.x, self.capacity, self.absolute)
        if cut is not None:
            kept = chunk.above(cut, self.absolute)
            if kept.numel() >= self.capacity:
                self.floor = cut
                self.add(kept)
                if self.size > 1.5 * self.capacity:
                    self.compact()  # a block-maximum cut is loose: tighten it before the next chunk
                return
        self.add(chunk.values(self.absolute))

    def add(self, values: torch.Tensor) -> None:
        """Keep `values`, which hold every offered value above the floor."""
        if values.numel() == 0:
            return
        self.parts.append(values)
        self.size += values.numel()
        if self.size > 2 * self.capacity:
            self.compact()

    def compact(self) -> torch.Tensor:
        if not self.parts:
            return torch.empty(0)
        merged = torch.cat(self.parts) if len(self.parts) > 1 else self.parts[0]
        if merged.numel() > self.capacity:
            cut = estimated_cut(merged, self.capacity, absolute=False)
            kept = merged[merged > cut] if cut is not None else None
            if kept is not None and self.capacity <= kept.numel() <= 1.5 * self.capacity:
                merged, self.floor = kept, cut if self.floor is None else max(cut, self.floor)
            else:  # no estimate, or a poor one: exact selection
                merged = torch.topk(merged, self.capacity, sorted=False).values
                self.floor = float(merged.min())
        elif merged.numel() == self.capacity:
            self.floor = float(merged.min())
        self.parts = [merged]
        self.size = merged.numel()
        return merged

    def kth_largest(self, k: int) -> float:
        """The k-th largest value (1-based) of everything seen."""
        values = torch.cat(self.parts) if self.parts else torch.empty(0)
        if k > values.numel():
            raise RuntimeError(f"order statistic needs {k} values, buffer holds {values.numel()}")
        # Selection, not sorting: the (n - k + 1)-th smallest is the k-th largest.
        return float(torch.kthvalue(values.cpu(), values.numel() - k + 1).values.item())

    def state(self) -> torch.Tensor:
        return self.compact().cpu()

    def load(self, values: torch.Tensor, device) -> None:
        values = values.to(device)
        self.parts = [values] if values.numel() else []
        self.size = values.numel()
        self.floor = float(values.min()) if values.numel() >= self.capacity else None


def fold_moments(partials: list[tuple[int, float, float]]) -> tuple[int, float, float]:
    """(n, mean, m2) of chunks given as (count, mean, m2), merged in order with Chan's formula.

    Folding the same list always gives the same bits, so a run split into shards at chunk
    boundaries merges to exactly what the unsplit run computes."""
    n, mean, m2 = 0, 0.0, 0.0
    for nb, batch_mean, batch_m2 in partials:
        delta = batch_mean - mean
        n_old = n
        n += nb
        mean += delta * (nb / n)
        m2 += batch_m2 + delta * delta * (n_old * nb / n)
    return n, mean, m2


class SideStats:
    """Streaming statistics of one side (input or output) of one Linear, exact for any dtype
    (activations are counted in float32).

    Per chunk, one host transfer brings the chunk's four reductions over; each chunk's
    (count, mean, m2) is kept and folded at the end, so shards merge bit for bit.
    """

    kind = "float32"

    def __init__(self, max_elements: int, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.max_elements = max_elements
        self.n = 0
        capacity = buffer_capacity(max_elements)
        self.signed = _TopBuffer(capacity, absolute=False)
        self.absolute = _TopBuffer(capacity, absolute=True)
        self.partials: list[tuple[int, float, float]] = []
        self.maximum = -math.inf
        self.abs_maximum = 0.0
        self.finite = True

    def update(self, x: torch.Tensor) -> None:
        """Add the elements of `x`, [..., features] (already restricted to valid positions)."""
        x = x.detach()
        rows = x.reshape(-1, x.shape[-1]) if x.dim() > 1 else x.reshape(-1, 1)
        count, features = rows.shape
        # Whole blocks of BLOCK_ROWS rows per chunk; what is left at the end is one block of its own.
        step = max(1, CHUNK_ELEMENTS // (features * BLOCK_ROWS)) * BLOCK_ROWS
        for start in range(0, count, step):
            part = rows[start : start + step]
            whole = part.shape[0] - part.shape[0] % BLOCK_ROWS
            if whole:
                self._update_chunk(part[:whole], BLOCK_ROWS)
            if whole < part.shape[0]:
                self._update_chunk(part[whole:], part.shape[0] - whole)

    def _update_chunk(self, rows: torch.Tensor, block_rows: int) -> None:
        if rows.dtype != torch.float32 or not rows.is_contiguous():
            rows = rows.float().contiguous()  # statistics are exact in float32/float64 whatever the model dtype
        nb = rows.numel()
        if self.n + nb > self.max_elements:
            raise RuntimeError(f"received {self.n + nb} elements, more than the {self.max_elements} planned")
        chunk = _Chunk(rows, block_rows)
        x = chunk.x
        # Moments with fast float32 kernels (pairwise sum, BLAS dot) and no temporaries; chunks are
        # merged in double precision with Chan's formula (fold_moments).
        total, square, hi, lo = torch.stack((x.sum(), torch.dot(x, x), chunk.block_max.max(),
                                             chunk.block_min.min())).tolist()
        batch_mean = total / nb
        batch_m2 = square - total * batch_mean
        if batch_m2 < 1e-3 * batch_mean * batch_mean * nb:
            # The mean dwarfs the spread and the raw second moment cancels (rare in activations): centre first.
            centered = x - batch_mean
            s1, s2 = torch.stack((centered.sum(), torch.dot(centered, centered))).tolist()
            batch_mean += s1 / nb
            batch_m2 = s2 - s1 * s1 / nb
            del centered
        self.n += nb
        self.partials.append((nb, batch_mean, batch_m2))
        self.finite = self.finite and math.isfinite(batch_m2)  # NaN or Inf anywhere poisons the sums
        self.maximum = max(self.maximum, hi)
        self.abs_maximum = max(self.abs_maximum, hi, -lo)
        self._offer(chunk)

    def _offer(self, chunk: _Chunk) -> None:
        """Hand each buffer the chunk's elements above its floor."""
        signed_floor, abs_floor = self.signed.floor, self.absolute.floor
        candidates = None
        if signed_floor is None:
            self.signed.first_offer(chunk)
        else:
            candidates = chunk.above(signed_floor, absolute=False)
            self.signed.add(candidates)
        if abs_floor is None:
            self.absolute.first_offer(chunk)
        elif candidates is not None and abs_floor >= signed_floor:
            # |x| > abs_floor: the positive ones are among the signed candidates; only the negative
            # ones need a search of their own.
            positive = candidates[candidates > abs_floor]
            self.absolute.add(torch.cat((positive, chunk.negated_below(abs_floor))))
        else:
            self.absolute.add(chunk.above(abs_floor, absolute=True))

    def is_finite(self) -> bool:
        return self.finite

    def merge(self, later: "SideStats") -> None:
        """Add the statistics of `later`, which saw the elements after this one's.

        Each buffer holds at least the `capacity` largest of its own elements (or all of them),
        so their union holds the largest `capacity` of all: the capacity must come from the
        element count of the whole run, not of one part."""
        if not isinstance(later, SideStats):
            raise RuntimeError(f"cannot merge {later.kind} statistics into float32 ones")
        if self.n + later.n > self.max_elements:
            raise RuntimeError(f"merged {self.n + later.n} elements, more than the {self.max_elements} planned")
        self.n += later.n
        self.partials.extend(later.partials)
        self.maximum = max(self.maximum, later.maximum)
        self.abs_maximum = max(self.abs_maximum, later.abs_maximum)
        self.finite = self.finite and later.finite
        for mine, theirs in ((self.signed, later.signed), (self.absolute, later.absolute)):
            mine.parts.extend(theirs.parts)
            mine.size += theirs.size

    def result(self) -> dict[str, float]:
        if self.n == 0:
            raise RuntimeError("no elements were recorded")
        k = top_count(self.n)
        _, mean, m2 = fold_moments(self.partials)
        return {
            "n": self.n,
            "ori": self.maximum,
            "top_0_1": self.signed.kth_largest(k),
            "absmax_ori": self.abs_maximum,
            "absmax_top_0_1": self.absolute.kth_largest(k),
            "mean": mean,
            "std": math.sqrt(max(m2 / self.n, 0.0)),
        }

    # --- checkpointing: tensors and scalars that restore the exact running state ---
    def state(self, prefix: str) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        tensors = {
            f"{prefix}.signed": self.signed.state(),
            f"{prefix}.absolute": self.absolute.state(),
            # (count, mean, m2) per chunk: counts stay exact in float64 up to 2**53
            f"{prefix}.moments": torch.tensor(self.partials, dtype=torch.float64).reshape(-1, 3),
            f"{prefix}.maxima": torch.tensor((self.maximum, self.abs_maximum), dtype=torch.float64),
        }
        return tensors, {"n": self.n}

    def load_state(self, prefix: str, tensors: dict[str, torch.Tensor], scalars: dict[str, int]) -> None:
        self.n = int(scalars["n"])
        for buf, key in ((self.signed, "signed"), (self.absolute, "absolute")):
            buf.load(tensors[f"{prefix}.{key}"], self.device)
        self.partials = [(int(nb), mean, m2) for nb, mean, m2 in tensors[f"{prefix}.moments"].tolist()]
        self.maximum, self.abs_maximum = tensors[f"{prefix}.maxima"].tolist()
        self.finite = all(math.isfinite(m2) for _, _, m2 in self.partials)


# --- 16-bit activations: a histogram over the 65,536 bit patterns ---------------------------

HALF_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
BINS = 1 << 16
# Elements per histogram pass: bounds the int64 bin-index temporary (32 MB).
HISTOGRAM_CHUNK = 1 << 22
# First bit pattern of +inf; every pattern from it to 0x7FFF (and the same with the sign bit) is inf or NaN.
_INF_BITS = {torch.bfloat16: 0x7F80, torch.float16: 0x7C00}


@functools.lru_cache(maxsize=None)
def _bin_values(dtype_name: str):
    """float64 value of each bit pattern, and the bins in ascending value order (-0.0 before +0.0,
    NaN patterns last, as a sort puts them)."""
    import numpy as np

    dtype = HALF_DTYPES[dtype_name]
    values = torch.arange(BINS, dtype=torch.int32).to(torch.int16).view(dtype).double().numpy()
    negatives = np.arange(BINS - 1, BINS // 2 - 1, -1)  # sign bit set: larger magnitude first
    positives = np.arange(BINS // 2)
    order = np.concatenate((negatives, positives))
    nan = np.isnan(values[order])
    return values, np.concatenate((order[~nan], order[nan]))


class HistogramStats:
    """Statistics of one side whose activations are bfloat16 or float16, from a count of every
    bit pattern: one asynchronous pass per chunk, constant memory, no host round trip.

    The histogram holds the whole multiset, so max, min, the order statistics (signed and of |x|)
    and the moments are exact, and histograms of parts add up to the histogram of the whole.
    """

    def __init__(self, dtype: torch.dtype, max_elements: int, device: torch.device | str = "cpu",
                 counts: torch.Tensor | None = None):
        if dtype not in _INF_BITS:
            raise ValueError(f"histogram statistics need bfloat16 or float16 activations, not {dtype}")
        self.dtype = dtype
        self.kind = str(dtype).removeprefix("torch.")
        self.device = torch.device(device)
        self.max_elements = max_elements
        self.n = 0
        # int64 counts per bit pattern; the profiler passes a row of one table shared by all sides.
        self.counts = counts if counts is not None else torch.zeros(BINS, dtype=torch.int64, device=self.device)
        self._ones = torch.ones(1, dtype=torch.int64, device=self.device)

    def update(self, x: torch.Tensor) -> None:
        """Add the elements of `x` (any shape, already restricted to valid positions)."""
        if x.dtype != self.dtype:
            raise RuntimeError(f"{self.kind} statistics received {x.dtype} activations")
        flat = x.detach().reshape(-1)
        n = flat.numel()
        if self.n + n > self.max_elements:
            raise RuntimeError(f"received {self.n + n} elements, more than the {self.max_elements} planned")
        self.n += n
        bits = flat.view(torch.int16)  # int16 has full kernel support everywhere, uint16 has not
        cpu = self.counts.device.type == "cpu"
        for start in range(0, n, HISTOGRAM_CHUNK):
            # The bin is the bit pattern: the sign-extended int16 with the upper bits cleared.
            index = bits[start : start + HISTOGRAM_CHUNK].to(torch.int32 if cpu else torch.int64).bitwise_and_(0xFFFF)
            if cpu:
                # bincount is the fastest CPU kernel; on CUDA it reads the maximum back to the host.
                self.counts += torch.bincount(index, minlength=BINS)
            else:
                self.counts.index_add_(0, index, self._ones.expand(index.numel()))

    def non_finite_count(self) -> torch.Tensor:
        """Number of inf and NaN elements seen, as a tensor on the device (no synchronization)."""
        return non_finite_counts(self.counts.unsqueeze(0), self.dtype)[0]

    def is_finite(self) -> bool:
        return int(self.non_finite_count()) == 0

    def merge(self, later: "HistogramStats") -> None:
        if not isinstance(later, HistogramStats) or later.dtype != self.dtype:
            raise RuntimeError(f"cannot merge {later.kind} statistics into {self.kind} ones")
        if self.n + later.n > self.max_elements:
            raise RuntimeError(f"merged {self.n + later.n} elements, more than the {self.max_elements} planned")
        self.n += later.n
        self.counts += later.counts.to(self.counts.device)

    def result(self) -> dict[str, float]:
        import numpy as np

        if self.n == 0:
            raise RuntimeError("no elements were recorded")
        values, order = _bin_values(self.kind)
        counts = self.counts.cpu().numpy()
        index = order_index(self.n)  # ascending position of top_0_1, in the signed and in the |x| order
        signed = counts[order]
        present = np.flatnonzero(signed)
        position = np.searchsorted(np.cumsum(signed), index, side="right")
        # |x|: the sign bit folded away; bit patterns 0 .. 0x7FFF ascend in magnitude (NaN last).
        magnitude = counts[: BINS // 2] + counts[BINS // 2 :]
        abs_present = np.flatnonzero(magnitude)
        abs_position = np.searchsorted(np.cumsum(magnitude), index, side="right")
        # Exact sums of exact products (count * value needs at most 11 + 42 bits), one rounding each.
        bins = np.flatnonzero(counts)
        weights, points = counts[bins].astype(np.float64), values[bins]
        mean = math.fsum((weights * points).tolist()) / self.n
        m2 = math.fsum((weights * (points - mean) ** 2).tolist())
        return {
            "n": self.n,
            "ori": float(values[order[present[-1]]]),
            "top_0_1": float(values[order[position]]),
            "absmax_ori": float(values[abs_present[-1]]),
            "absmax_top_0_1": float(values[abs_position]),
            "mean": mean,
            "std": math.sqrt(m2 / self.n),
        }

    def state(self, prefix: str) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        counts = self.counts.cpu()
        bins = counts.nonzero().squeeze(1)  # a checkpoint keeps only the occupied bit patterns
        return {f"{prefix}.bins": bins.to(torch.int32), f"{prefix}.counts": counts[bins]}, {"n": self.n}

    def load_state(self, prefix: str, tensors: dict[str, torch.Tensor], scalars: dict[str, int]) -> None:
        self.n = int(scalars["n"])
        self.counts.zero_()
        bins = tensors[f"{prefix}.bins"].to(device=self.counts.device, dtype=torch.int64)
        self.counts[bins] = tensors[f"{prefix}.counts"].to(self.counts.device)


def non_finite_counts(counts: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inf and NaN elements per row of a [rows, BINS] table of `dtype` bit-pattern counts (on the device)."""
    first = _INF_BITS[dtype]
    return counts[:, first : BINS // 2].sum(1) + counts[:, BINS // 2 + first :].sum(1)


def uses_histogram(dtype: torch.dtype) -> bool:
    """Whether activations of `dtype` get HistogramStats (bfloat16, float16)."""
    return dtype in _INF_BITS


def new_side_stats(dtype: torch.dtype, max_elements: int, device: torch.device | str = "cpu",
                   counts: torch.Tensor | None = None) -> "SideStats | HistogramStats":
    """Histogram statistics for bfloat16/float16 activations, exact streaming ones for any other dtype."""
    if dtype in _INF_BITS:
        return HistogramStats(dtype, max_elements, device, counts)
    return SideStats(max_elements, device)


def side_stats_kind(kind: str, max_elements: int, device: torch.device | str = "cpu") -> "SideStats | HistogramStats":
    """Empty statistics of a recorded `kind` ('float32', 'bfloat16' or 'float16')."""
    if kind == SideStats.kind:
        return SideStats(max_elements, device)
    if kind in HALF_DTYPES:
        return HistogramStats(HALF_DTYPES[kind], max_elements, device)
    raise ValueError(f"unknown statistics kind '{kind}'")


def reference_statistics(values) -> dict[str, float]:
    """The reference definition by brute force (sort everything): for tests and benchmarks."""
    x = torch.as_tensor(values, dtype=torch.float32).reshape(-1)
    s = torch.sort(x).values
    a = torch.sort(x.abs()).values
    idx = int(x.numel() * QUANTILE) - 1
    x64 = x.double()
    return {
        "n": x.numel(),
        "ori": float(s[-1]),
        "top_0_1": float(s[idx]),
        "absmax_ori": float(a[-1]),
        "absmax_top_0_1": float(a[idx]),
        "mean": float(x64.mean()),
        "std": float(x64.std(correction=0)),
    }
