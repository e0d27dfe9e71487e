"""Activation profiling of every nn.Linear (METHOD.md section 1), streaming and resumable."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from shadowquant.atomic import atomic_path, write_json
from shadowquant.decision import SIDES
from shadowquant.errors import PipelineError
from shadowquant.families import linear_layer_names
from shadowquant.stats import SideStats

log = logging.getLogger(__name__)
# Padded activations up to this size (64 MB in float32) are copied without their padding; larger
# ones (lm_head logits) are read per sample, in place.
PADDED_COPY_ELEMENTS = 1 << 24


def tokenize_samples(tokenizer, texts: list[str], seq_len: int) -> list[list[int]]:
    """Each text on its own, special tokens included, truncated to seq_len (as the reference)."""
    out = []
    for i, text in enumerate(texts):
        ids = tokenizer(text, add_special_tokens=True, truncation=True, max_length=seq_len)["input_ids"]
        if not ids:
            raise PipelineError(f"calibration sample {i} tokenizes to zero tokens; remove empty records from the corpus")
        out.append(list(ids))
    return out


def plan_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Group sample indices into batches of similar length (longest first) to keep padding low."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def collate(sequences: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right padding: with causal attention the valid positions never see the pads."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids.to(device), mask.to(device)


def _version(t: torch.Tensor) -> int:
    """In-place modification counter; inference tensors have none (nothing in a forward pass
    modifies an activation in place after a Linear has read it)."""
    return 0 if t.is_inference() else t._version


class ActivationProfiler:
    """Forward hooks feeding every observed Linear's input and output into SideStats.

    Linears that read the very same input tensor (q/k/v projections, gate/up projections,
    an expert's w1/w3) share one input SideStats: the second and third pass over identical
    data would add nothing but time. Sharing is decided on a layer's first call and checked
    on every later one.
    """

    def __init__(self, model, layer_names: list[str], total_tokens: int, device):
        self.model = model
        modules = dict(model.named_modules())
        missing = [n for n in layer_names if n not in modules]
        if missing:
            raise PipelineError(f"model has no Linear layers named {', '.join(missing[:5])}")
        self.layers = {n: modules[n] for n in layer_names}
        self.stats: dict[str, dict[str, SideStats]] = {}
        for name, mod in self.layers.items():
            # Upper bound of elements per side; MoE experts see at most every token.
            self.stats[name] = {
                "input": SideStats(total_tokens * mod.in_features, device),
                "output": SideStats(total_tokens * mod.out_features, device),
            }
        self.valid: torch.Tensor | None = None  # [batch, seq] bool mask of the current batch (None: no padding)
        self.lengths: list[int] = []  # valid positions per sample of the current batch
        self.input_owner: dict[str, str] = {}  # layer -> layer whose input SideStats it uses (itself if own)
        self._input_calls: dict[str, int] = {}
        self._last_input: torch.Tensor | None = None  # held, so no other tensor can take its identity
        self._last_version = -1
        self._last_owner = ""
        self._handles = []

    def set_batch(self, mask: torch.Tensor | None) -> None:
        """The attention mask of the next batch (right padded), or None for no padding."""
        if mask is None or bool(mask.all()):
            self.valid, self.lengths = None, []
        else:
            self.valid, self.lengths = mask.bool(), mask.sum(1).tolist()

    def _update(self, stats: SideStats, t: torch.Tensor) -> None:
        """Feed the valid positions of `t` into `stats`."""
        valid = self.valid
        if valid is None or t.dim() < 3 or t.shape[:2] != valid.shape:
            stats.update(t)
        elif t.numel() <= PADDED_COPY_ELEMENTS:
            stats.update(t[valid])  # a bounded copy keeps the chunks few and large
        else:
            # Large activations (lm_head logits) as per-sample views: right padding makes the valid
            # positions of each sample a prefix, so nothing is copied.
            for row, length in enumerate(self.lengths):
                stats.update(t[row, :length])

    def _record_input(self, name: str, x: torch.Tensor) -> None:
        same = x is self._last_input and _version(x) == self._last_version
        calls = self._input_calls.get(name, 0)
        owner = self.input_owner.get(name)
        if owner is None:
            # Share only from the owner's first call on, so both have seen exactly the same inputs.
            share = same and self._input_calls[self._last_owner] == 1
            owner = self.input_owner[name] = self._last_owner if share else name
            if share:
                self.stats[name]["input"] = self.stats[owner]["input"]
        self._input_calls[name] = calls + 1
        if owner != name:
            if not (same and self._last_owner == owner and self._input_calls[owner] == calls + 1):
                raise RuntimeError(f"layer '{name}' shared the input of '{owner}' on its first call but not on "
                                   f"call {calls + 1}; profiling expects the same graph for every batch")
            return
        self._update(self.stats[name]["input"], x)
        self._last_input, self._last_version, self._last_owner = x, _version(x), name

    def _hook(self, name: str):
        output_stats = self.stats[name]["output"]

        def hook(module, args, output):
            self._record_input(name, args[0])
            self._update(output_stats, output)

        return hook

    def end_batch(self) -> None:
        """Let go of the last input tensor (the batch's activations can be freed)."""
        self._last_input, self._last_version, self._last_owner = None, -1, ""

    def __enter__(self):
        for name, mod in self.layers.items():
            self._handles.append(mod.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def first_non_finite(self) -> tuple[str, str] | None:
        for name, sides in self.stats.items():
            for side in SIDES:
                if not sides[side].is_finite():
                    return name, side
        return None

    # --- checkpoint state ---
    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors, scalars = {}, {}
        shared = {name: owner for name, owner in self.input_owner.items() if owner != name}
        for name, sides in self.stats.items():
            for side in SIDES:
                if side == "input" and name in shared:
                    continue  # saved once, under its owner
                t, s = sides[side].state(f"{name}.{side}")
                tensors.update(t)
                scalars[f"{name}.{side}"] = s["n"]
        scalars["shared_inputs"] = shared
        return tensors, scalars

    def load_state(self, tensors, scalars) -> None:
        shared = scalars.get("shared_inputs", {})
        for name, sides in self.stats.items():
            for side in SIDES:
                if side == "input" and name in shared:
                    continue
                key = f"{name}.{side}"
                sides[side].load_state(key, tensors, {"n": scalars[key]})
        for name, owner in shared.items():
            self.stats[name]["input"] = self.stats[owner]["input"]
            self.input_owner[name] = owner
            self.input_owner.setdefault(owner, owner)


class Checkpoint:
    """Running state every few samples: tensors in a numbered safetensors file, then a JSON pointer.

    The pointer is written last, so a kill at any moment leaves either the old or the new
    complete checkpoint. `fingerprint` ties it to the exact inputs; a stale one is ignored.
    """

    def __init__(self, directory: str | Path, fingerprint: dict):
        self.dir = Path(directory)
        self.fingerprint = fingerprint
        self.pointer = self.dir / "checkpoint.json"

    def load(self) -> tuple[int, dict, dict] | None:
        try:
            meta = json.loads(self.pointer.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        if meta.get("fingerprint") != self.fingerprint:
            log.warning("ignoring checkpoint in %s: it was made for other inputs", self.dir)
            return None
        tensors = load_file(self.dir / meta["tensors"])
        return meta["batches_done"], tensors, meta["scalars"]

    def save(self, batches_done: int, tensors: dict, scalars: dict) -> None:
        name = f"state-{batches_done:06d}.safetensors"
        with atomic_path(self.dir / name, suffix=".safetensors") as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        write_json(self.pointer, {"fingerprint": self.fingerprint, "batches_done": batches_done,
                                  "tensors": name, "scalars": scalars})
        for old in self.dir.glob("state-*.safetensors"):
            if old.name != name:
                old.unlink(missing_ok=True)

    def clear(self) -> None:
        if self.dir.exists():
            for f in self.dir.iterdir():
                f.unlink(missing_ok=True)
            self.dir.rmdir()


def _locate_non_finite(model, profiler: ActivationProfiler, name: str, side: str, batch: list[int],
                       sequences, pad_id, device) -> int:
    """Re-run the batch's samples one by one to name the sample that produced NaN/Inf."""
    module = profiler.layers[name]
    found = []

    def probe(mod, args, output):
        t = args[0] if side == "input" else output
        found.append(not bool(torch.isfinite(t).all()))

    handle = module.register_forward_hook(probe)
    try:
        for idx in batch:
            found.clear()
            ids, mask = collate([sequences[idx]], pad_id, device)
            model(input_ids=ids, attention_mask=mask, use_cache=False)
            if any(found):
                return idx
    finally:
        handle.remove()
    return batch[0]


@torch.inference_mode()
def profile_model(model, sequences: list[list[int]], pad_id: int, batch_size: int = 1,
                  layer_names: list[str] | None = None, checkpoint: Checkpoint | None = None,
                  checkpoint_every: int = 0, progress: bool = True,
                  after_batch: Callable[[int], None] | None = None) -> dict:
    """Profile `sequences` and return the act_scales dict (reference keys plus absmax keys).

    `after_batch(batches_done)` is called after each batch (used by tests to interrupt a run).
    """
    device = next(model.parameters()).device
    names = layer_names or linear_layer_names(model)
    total_tokens = sum(len(s) for s in sequences)
    batches = plan_batches([len(s) for s in sequences], batch_size)
    profiler = ActivationProfiler(model, names, total_tokens, device)
    start = 0
    if checkpoint is not None:
        restored = checkpoint.load()
        if restored is not None:
            start, tensors, scalars = restored
            profiler.load_state(tensors, scalars)
            log.info("resuming profiling after %d of %d batches", start, len(batches))
    every_batches = max(1, math.ceil(checkpoint_every / batch_size)) if checkpoint_every else 0
    done_samples = sum(len(b) for b in batches[:start])
    bar = tqdm(total=len(sequences), initial=done_samples, desc="profiling", unit="sample", disable=not progress)
    with profiler:
        for b in range(start, len(batches)):
            batch = batches[b]
            ids, mask = collate([sequences[i] for i in batch], pad_id, device)
            profiler.set_batch(mask)
            model(input_ids=ids, attention_mask=mask, use_cache=False)
            profiler.end_batch()
            bad = profiler.first_non_finite()
            if bad is not None:
                profiler.set_batch(None)
                profiler.__exit__()  # the diagnostic re-run must not feed the statistics
                sample = _locate_non_finite(model, profiler, *bad, batch, sequences, pad_id, device)
                raise PipelineError(f"non-finite activation (NaN or Inf) in layer '{bad[0]}' {bad[1]} for calibration "
                                    f"sample {sample}; try dtype: float32 or check the model weights")
            bar.update(len(batch))
            if checkpoint is not None and every_batches and (b + 1) % every_batches == 0 and b + 1 < len(batches):
                checkpoint.save(b + 1, *profiler.state())
            if after_batch is not None:
                after_batch(b + 1)
    bar.close()
    return assemble_act_scales(profiler, names, total_tokens, len(sequences))


def assemble_act_scales(profiler: ActivationProfiler, names: list[str], total_tokens: int, num_samples: int) -> dict:
    out = {"ori": {}, "top_0_1": {}, "all_stat": {}, "absmax_ori": {}, "absmax_top_0_1": {}, "count": {}}
    for name in names:
        res = {side: profiler.stats[name][side].result() for side in SIDES}
        for key in ("ori", "top_0_1", "absmax_ori", "absmax_top_0_1"):
            out[key][name] = {side: res[side][key] for side in SIDES}
        out["all_stat"][name] = {side: {"mean": res[side]["mean"], "std": res[side]["std"]} for side in SIDES}
        out["count"][name] = {side: res[side]["n"] for side in SIDES}
    out["meta"] = {"num_samples": num_samples, "num_tokens": total_tokens, "num_layers": len(names)}
    return out


def act_scales_table(act_scales: dict):
    """One row per layer and side: the statistics plus the outlier ratios people look at."""
    import pandas as pd

    rows = []
    for name in act_scales["ori"]:
        for side in SIDES:
            ori, top = act_scales["ori"][name][side], act_scales["top_0_1"][name][side]
            row = {"layer": name, "side": side, "count": act_scales.get("count", {}).get(name, {}).get(side),
                   "ori": ori, "top_0_1": top}
            if "absmax_ori" in act_scales:
                aori, atop = act_scales["absmax_ori"][name][side], act_scales["absmax_top_0_1"][name][side]
                row.update(absmax_ori=aori, absmax_top_0_1=atop,
                           negative_outlier=aori > ori, absmax_ratio=aori / atop if atop else math.inf)
            row.update(mean=act_scales["all_stat"][name][side]["mean"], std=act_scales["all_stat"][name][side]["std"],
                       ratio=ori / top if top else math.inf)
            rows.append(row)
    return pd.DataFrame(rows)
