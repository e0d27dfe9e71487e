"""Exact streaming activation statistics (METHOD.md section 1).

The reference keeps every activation and sorts them at the end. Here each
layer side keeps only running moments and the largest elements the exact
order statistic can need, on the device where the activations live.
"""

from __future__ import annotations

import torch

QUANTILE = 0.999
# Large activations (e.g. lm_head logits) are processed in pieces to bound temporaries.
CHUNK_ELEMENTS = 1 << 22


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
    """The `capacity` largest values seen so far (unordered)."""

    def __init__(self, capacity: int, device: torch.device):
        self.capacity = capacity
        self.values = torch.empty(0, dtype=torch.float32, device=device)
        self.floor: torch.Tensor | None = None  # min of a full buffer: smaller values can never enter

    def update(self, x: torch.Tensor) -> None:
        if self.floor is not None:
            # Candidate filtering before any sort; equal values cannot change the kept multiset.
            x = x[x > self.floor]
            if x.numel() == 0:
                return
        merged = torch.cat((self.values, x)) if self.values.numel() else x
        if merged.numel() > self.capacity:
            merged = torch.topk(merged, self.capacity, sorted=False).values
        self.values = merged if merged is not x else x.clone()
        if self.values.numel() >= self.capacity:
            self.floor = self.values.min()

    def kth_largest(self, k: int) -> float:
        """The k-th largest value (1-based) of everything seen."""
        if k > self.values.numel():
            raise RuntimeError(f"order statistic needs {k} values, buffer holds {self.values.numel()}")
        return float(torch.topk(self.values, k, sorted=True).values[-1].item())


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
        # Chan's parallel merge of (count, mean, M2) in float64.
        total = x.sum(dtype=torch.float64)
        batch_mean = total / nb
        centered = x - batch_mean.to(torch.float32)
        batch_m2 = (centered * centered).sum(dtype=torch.float64)
        delta = batch_mean - self.mean
        n_old = self.n
        self.n += nb
        self.mean = self.mean + delta * (nb / self.n)
        self.m2 = self.m2 + batch_m2 + delta * delta * (n_old * nb / self.n)
        self.finite &= torch.isfinite(total)
        self.maximum = torch.maximum(self.maximum, x.max())
        self.signed.update(x)
        a = x.abs()
        self.abs_maximum = torch.maximum(self.abs_maximum, a.max())
        self.absolute.update(a)

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
            f"{prefix}.signed": self.signed.values.cpu(),
            f"{prefix}.absolute": self.absolute.values.cpu(),
            f"{prefix}.moments": torch.stack((self.mean, self.m2)).cpu(),
            f"{prefix}.maxima": torch.stack((self.maximum, self.abs_maximum)).cpu(),
        }
        return tensors, {"n": self.n}

    def load_state(self, prefix: str, tensors: dict[str, torch.Tensor], scalars: dict[str, int]) -> None:
        device = self.mean.device
        self.n = int(scalars["n"])
        for buf, key in ((self.signed, "signed"), (self.absolute, "absolute")):
            buf.values = tensors[f"{prefix}.{key}"].to(device)
            buf.floor = buf.values.min() if buf.values.numel() >= buf.capacity else None
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
