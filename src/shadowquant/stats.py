"""Exact streaming activation statistics (METHOD.md section 1).

The reference keeps every activation and sorts them at the end. Here each
layer side keeps only running moments and the largest elements the exact
order statistic can need, on the device where the activations live.
"""

from __future__ import annotations

import torch

QUANTILE = 0.999
# Large activations (e.g. lm_head logits) are processed in pieces to bound temporaries.
CHUNK_ELEMENTS = 1 << 20


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


def above(x: torch.Tensor, floor: torch.Tensor) -> torch.Tensor:
    """Elements of 1-D `x` greater than `floor`."""
    mask, _ = _masks(x)
    torch.gt(x, floor, out=mask)
    return x[mask]


def abs_above(x: torch.Tensor, floor: torch.Tensor) -> torch.Tensor:
    """|x| for the elements of 1-D `x` with |x| > floor, without materializing |x|."""
    mask, other = _masks(x)
    torch.gt(x, floor, out=mask)
    torch.lt(x, -floor, out=other)
    torch.logical_or(mask, other, out=mask)
    return x[mask].abs()


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


class _TopBuffer:
    """The `capacity` largest values seen so far (unordered).

    Candidates above the current floor are appended and only compacted (one topk) once
    they reach twice the capacity, so the cost of a selection is amortized over many
    chunks; memory stays within about twice the exact order statistic's need.
    """

    def __init__(self, capacity: int, device: torch.device):
        self.capacity = capacity
        self.parts: list[torch.Tensor] = []
        self.size = 0
        self.floor: torch.Tensor | None = None  # a value no smaller than the floor of the top `capacity`

    def update(self, x: torch.Tensor) -> None:
        if self.floor is not None:
            x = above(x, self.floor)  # equal values cannot change the kept multiset
        else:
            x = self._first_cut(x)
        if x.numel() == 0:
            return
        self.parts.append(x)
        self.size += x.numel()
        if self.size > 2 * self.capacity:
            self.compact()

    def _first_cut(self, x: torch.Tensor) -> torch.Tensor:
        """Before any floor exists: cut a chunk much larger than the buffer without a full topk.

        A value v taken from a strided subsample is a valid floor as soon as at least `capacity`
        elements exceed it (none at or below v can then be among the largest `capacity`).
        """
        n, k = x.numel(), self.capacity
        step = n // (32 * k)
        if step >= 2:
            sample = x[::step]
            v = torch.topk(sample, min(sample.numel(), 2 * k // step + 1), sorted=False).values.min()
            kept = x[x > v]
            if kept.numel() >= k:
                self.floor = v
                return kept
        return x.clone() if x._base is not None or n > k else x  # never keep a view of a whole activation

    def compact(self) -> torch.Tensor:
        if not self.parts:
            return torch.empty(0)
        merged = torch.cat(self.parts) if len(self.parts) > 1 else self.parts[0]
        if merged.numel() > self.capacity:
            merged = torch.topk(merged, self.capacity, sorted=False).values
        if merged.numel() >= self.capacity:
            self.floor = merged.min()
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
        self.floor = values.min() if values.numel() >= self.capacity else None


class SideStats:
    """Streaming statistics of one side (input or output) of one Linear."""

    def __init__(self, max_elements: int, device: torch.device | str = "cpu"):
        device = torch.device(device)
        self.max_elements = max_elements
        self.n = 0
        capacity = buffer_capacity(max_elements)
        self.signed = _TopBuffer(capacity, device)
        self.absolute = _TopBuffer(capacity, device)
        self.mean = torch.zeros((), dtype=torch.float64, device=device)
        self.m2 = torch.zeros((), dtype=torch.float64, device=device)
        self.maximum = torch.tensor(float("-inf"), dtype=torch.float32, device=device)
        self.abs_maximum = torch.tensor(0.0, dtype=torch.float32, device=device)
        self.finite = torch.ones((), dtype=torch.bool, device=device)

    def update(self, x: torch.Tensor) -> None:
        """Add the elements of `x` (any shape, already restricted to valid positions)."""
        x = x.detach().reshape(-1)
        for start in range(0, x.numel(), CHUNK_ELEMENTS):
            self._update_chunk(x[start : start + CHUNK_ELEMENTS])

    def _update_chunk(self, x: torch.Tensor) -> None:
        if x.dtype != torch.float32:
            x = x.float()  # statistics are exact in float32/float64 whatever the model dtype
        nb = x.numel()
        if nb == 0:
            return
        if self.n + nb > self.max_elements:
            raise RuntimeError(f"received {self.n + nb} elements, more than the {self.max_elements} planned")
        # Moments with fast float32 kernels (pairwise sum, BLAS dot) and no temporaries; chunks are
        # merged in float64 with Chan's formula. Where the mean dwarfs the spread the raw second
        # moment would cancel, so such chunks (rare in activations) are centred first.
        total = x.sum().double()
        batch_mean = total / nb
        batch_m2 = torch.dot(x, x).double() - total * batch_mean
        if x.device.type != "cpu" or bool(batch_m2 < 1e-3 * batch_mean * batch_mean * nb):
            centered = x - batch_mean.float()
            s1 = centered.sum().double()
            batch_mean = batch_mean + s1 / nb
            batch_m2 = torch.dot(centered, centered).double() - s1 * s1 / nb
            del centered
        delta = batch_mean - self.mean
        n_old = self.n
        self.n += nb
        self.mean = self.mean + delta * (nb / self.n)
        self.m2 = self.m2 + batch_m2 + delta * delta * (n_old * nb / self.n)
        self.finite &= torch.isfinite(batch_m2)  # NaN or Inf anywhere poisons the sums
        lo, hi = torch.aminmax(x)
        self.maximum = torch.maximum(self.maximum, hi)
        abs_hi = torch.maximum(hi, -lo)
        self.abs_maximum = torch.maximum(self.abs_maximum, abs_hi)
        # Skip the candidate search when nothing in the chunk can enter a full buffer.
        if self.signed.floor is None or bool(hi > self.signed.floor):
            self.signed.update(x)
        floor = self.absolute.floor
        if floor is None:
            self.absolute.update(x.abs())
        elif bool(abs_hi > floor):
            # |x| > f without materializing |x| for the whole chunk.
            self.absolute.update(abs_above(x, floor))

    def is_finite(self) -> bool:
        return bool(self.finite.item())

    def result(self) -> dict[str, float]:
        if self.n == 0:
            raise RuntimeError("no elements were recorded")
        k = top_count(self.n)
        return {
            "n": self.n,
            "ori": float(self.maximum.item()),
            "top_0_1": self.signed.kth_largest(k),
            "absmax_ori": float(self.abs_maximum.item()),
            "absmax_top_0_1": self.absolute.kth_largest(k),
            "mean": float(self.mean.item()),
            "std": float(torch.sqrt(torch.clamp(self.m2 / self.n, min=0)).item()),
        }

    # --- checkpointing: tensors and scalars that restore the exact running state ---
    def state(self, prefix: str) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        tensors = {
            f"{prefix}.signed": self.signed.state(),
            f"{prefix}.absolute": self.absolute.state(),
            f"{prefix}.moments": torch.stack((self.mean, self.m2)).cpu(),
            f"{prefix}.maxima": torch.stack((self.maximum, self.abs_maximum)).cpu(),
        }
        return tensors, {"n": self.n}

    def load_state(self, prefix: str, tensors: dict[str, torch.Tensor], scalars: dict[str, int]) -> None:
        device = self.mean.device
        self.n = int(scalars["n"])
        for buf, key in ((self.signed, "signed"), (self.absolute, "absolute")):
            buf.load(tensors[f"{prefix}.{key}"], device)
        self.mean, self.m2 = (t.to(device) for t in tensors[f"{prefix}.moments"])
        self.maximum, self.abs_maximum = (t.to(device) for t in tensors[f"{prefix}.maxima"])


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
