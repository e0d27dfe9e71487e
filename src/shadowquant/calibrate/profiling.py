"""Activation profiling of every nn.Linear (docs/method.md section 1), streaming and resumable."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from shadowquant.atomic import atomic_path, write_json
from shadowquant.runtimes.decision import SIDES
from shadowquant.errors import PipelineError
from shadowquant.model.families import linear_layer_names
from shadowquant.calibrate.stats import (BINS, HistogramStats, new_side_stats, non_finite_counts, side_stats_kind,
                               uses_histogram)

log = logging.getLogger(__name__)
# Padded activations up to this size (64 MB in float32) are copied without their padding; larger
# ones (lm_head logits) are read per sample, in place.
PADDED_COPY_ELEMENTS = 1 << 24
# On an accelerator, 16-bit statistics are checked for NaN/Inf (a host round trip) at most this often,
# before every checkpoint and after the last batch; on the CPU after every batch.
NON_FINITE_CHECK_SECONDS = 30.0


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


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A host tensor on `device`; to a GPU through pinned memory, so the copy does not wait for the GPU."""
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def collate(sequences: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right padding: with causal attention the valid positions never see the pads."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return to_device(ids, device), to_device(mask, device)


def shard_ranges(num_batches: int, shards: int) -> list[range]:
    """`shards` contiguous runs of batch indices, as even as possible: a shard starts at a batch
    boundary of the unsharded run, so every activation is chunked as there."""
    if shards > num_batches:
        raise PipelineError(f"calibration.shards = {shards} is more than the {num_batches} calibration batches "
                            f"(num_samples / batch_size); use at most {num_batches}")
    edges = [num_batches * i // shards for i in range(shards + 1)]
    return [range(edges[i], edges[i + 1]) for i in range(shards)]


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

    A Linear with bfloat16/float16 weights (so 16-bit activations) gets histogram statistics: the
    histograms of all such sides are rows of one table, so one kernel per batch tracks NaN/Inf.
    """

    def __init__(self, model, layer_names: list[str], total_tokens: int, device):
        self.model = model
        modules = dict(model.named_modules())
        missing = [n for n in layer_names if n not in modules]
        if missing:
            raise PipelineError(f"model has no Linear layers named {', '.join(missing[:5])}")
        self.layers = {n: modules[n] for n in layer_names}
        self.device = torch.device(device)
        half_keys: dict[torch.dtype, list[tuple[str, str]]] = {}
        for name, mod in self.layers.items():
            if uses_histogram(mod.weight.dtype):
                half_keys.setdefault(mod.weight.dtype, []).extend((name, side) for side in SIDES)
        # dtype -> ([sides, BINS] int64 counts, the (layer, side) of each row)
        self.tables = {dtype: (torch.zeros(len(keys), BINS, dtype=torch.int64, device=self.device), keys)
                       for dtype, keys in half_keys.items()}
        rows = {key: (dtype, i) for dtype, (_, keys) in self.tables.items() for i, key in enumerate(keys)}
        self.stats: dict[str, dict] = {}
        for name, mod in self.layers.items():
            # Upper bound of elements per side; MoE experts see at most every token.
            sizes = {"input": mod.in_features, "output": mod.out_features}
            self.stats[name] = {}
            for side in SIDES:
                row = rows.get((name, side))
                counts = self.tables[row[0]][0][row[1]] if row else None
                self.stats[name][side] = new_side_stats(mod.weight.dtype, total_tokens * sizes[side], device, counts)
        # (batch index, cumulative NaN/Inf count of every table row after it), kept on the device
        self._marks: list[tuple[int, torch.Tensor]] = []
        self.valid_rows: torch.Tensor | None = None  # flat indices of the valid positions, for 16-bit sides
        self.valid: torch.Tensor | None = None  # [batch, seq] bool mask of the current batch (None: no padding)
        self.lengths: list[int] = []  # valid positions per sample of the current batch
        self.input_owner: dict[str, str] = {}  # layer -> layer whose input SideStats it uses (itself if own)
        self._input_calls: dict[str, int] = {}
        self._last_input: torch.Tensor | None = None  # held, so no other tensor can take its identity
        self._last_version = -1
        self._last_owner = ""
        self._handles = []

    def set_batch(self, mask: torch.Tensor | None, lengths: list[int] | None = None) -> None:
        """The attention mask of the next batch (right padded), or None for no padding; `lengths`,
        the valid positions per sample as known on the host, spare a read-back of the mask."""
        if lengths is None and mask is not None:
            lengths = mask.sum(1).tolist()
        if mask is None or all(length == mask.shape[1] for length in lengths):
            self.valid, self.lengths, self.valid_rows = None, [], None
            return
        self.valid, self.lengths = mask.bool(), list(lengths)
        if self.tables:
            width = mask.shape[1]
            flat = [row * width + i for row, length in enumerate(lengths) for i in range(length)]
            self.valid_rows = to_device(torch.tensor(flat, dtype=torch.long), self.device)

    def _update(self, stats, t: torch.Tensor) -> None:
        """Feed the valid positions of `t` into `stats`."""
        valid = self.valid
        if valid is None or t.dim() < 3 or t.shape[:2] != valid.shape:
            stats.update(t)
        elif t.numel() <= PADDED_COPY_ELEMENTS:
            if isinstance(stats, HistogramStats):
                # A gather of host-known rows: boolean indexing would read the count back from the device.
                stats.update(t.reshape(-1, t.shape[-1]).index_select(0, self.valid_rows))
            else:
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

    def end_batch(self, batch: int = -1) -> None:
        """Let go of the last input tensor (the batch's activations can be freed) and note, on the
        device, the NaN/Inf counts of the 16-bit sides after batch number `batch`."""
        self._last_input, self._last_version, self._last_owner = None, -1, ""
        if self.tables:
            self._marks.append((batch, torch.cat([non_finite_counts(counts, dtype)
                                                  for dtype, (counts, _) in self.tables.items()])))

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

    def first_non_finite_float32(self) -> tuple[str, str] | None:
        """As first_non_finite, for the float32-path sides only (their flags are on the host already)."""
        for name, sides in self.stats.items():
            for side in SIDES:
                if not isinstance(sides[side], HistogramStats) and not sides[side].is_finite():
                    return name, side
        return None

    def first_non_finite_half(self) -> tuple[int, str, str] | None:
        """(batch, layer, side) of the first batch noted by end_batch after which a 16-bit side held
        NaN/Inf, its first such side in layer order; None if none. One host round trip."""
        if not self._marks:
            return None
        batches = [b for b, _ in self._marks]
        counts = torch.stack([c for _, c in self._marks]).cpu()
        self._marks.clear()
        bad_batches = (counts > 0).any(1).nonzero()
        if bad_batches.numel() == 0:
            return None
        first = int(bad_batches[0])
        keys = [key for _, (_, keys) in self.tables.items() for key in keys]
        bad = {keys[i] for i in counts[first].nonzero().squeeze(1).tolist()}
        for name in self.stats:
            for side in SIDES:
                if (name, side) in bad:
                    return batches[first], name, side
        raise AssertionError("unreachable: a flagged row belongs to a profiled side")

    # --- checkpoint state ---
    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors, scalars, kinds = {}, {}, {}
        shared = {name: owner for name, owner in self.input_owner.items() if owner != name}
        for name, sides in self.stats.items():
            for side in SIDES:
                if side == "input" and name in shared:
                    continue  # saved once, under its owner
                t, s = sides[side].state(f"{name}.{side}")
                tensors.update(t)
                scalars[f"{name}.{side}"] = s["n"]
                kinds[f"{name}.{side}"] = [sides[side].kind, sides[side].max_elements]
        scalars["shared_inputs"] = shared
        scalars["sides"] = kinds  # statistics kind and planned element count: what a merge needs
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
def run_profiler(model, sequences: list[list[int]], pad_id: int, batch_size: int = 1,
                 layer_names: list[str] | None = None, checkpoint: Checkpoint | None = None,
                 checkpoint_every: int = 0, progress: bool = True,
                 after_batch: Callable[[int], None] | None = None, shard: int = 0,
                 shards: int = 1) -> ActivationProfiler:
    """Profile the batches of shard `shard` of `shards` (shard_ranges of the whole batch plan) and
    return the profiler; buffers are sized for all `sequences`, so shards merge exactly.

    `after_batch(batches_done)` is called after each batch (used by tests to interrupt a run).
    """
    device = next(model.parameters()).device
    names = layer_names or linear_layer_names(model)
    total_tokens = sum(len(s) for s in sequences)
    batches = plan_batches([len(s) for s in sequences], batch_size)
    own = shard_ranges(len(batches), shards)[shard]
    profiler = ActivationProfiler(model, names, total_tokens, device)
    start = own.start
    if checkpoint is not None:
        restored = checkpoint.load()
        if restored is not None:
            start, tensors, scalars = restored
            profiler.load_state(tensors, scalars)
            log.info("resuming profiling after %d of %d batches", start - own.start, len(own))
    every_batches = max(1, math.ceil(checkpoint_every / batch_size)) if checkpoint_every else 0
    done_samples = sum(len(b) for b in batches[own.start : start])
    bar = tqdm(total=sum(len(b) for b in batches[own.start : own.stop]), initial=done_samples, desc="profiling",
               unit="sample", disable=not progress)
    # 16-bit statistics stay on the device; reading their NaN/Inf flags back waits for the device.
    always_check = device.type == "cpu"
    last_check = time.monotonic()
    with profiler:
        for b in range(start, own.stop):
            batch = batches[b]
            ids, mask = collate([sequences[i] for i in batch], pad_id, device)
            profiler.set_batch(mask, [len(sequences[i]) for i in batch])
            model(input_ids=ids, attention_mask=mask, use_cache=False)
            profiler.end_batch(b)
            save = checkpoint is not None and every_batches and (b + 1) % every_batches == 0 and b + 1 < own.stop
            bad = profiler.first_non_finite_float32()
            bad_batch = b
            if bad is None and (always_check or save or b + 1 == own.stop
                                or time.monotonic() - last_check >= NON_FINITE_CHECK_SECONDS):
                last_check = time.monotonic()
                found = profiler.first_non_finite_half()
                if found is not None:
                    bad_batch, *bad = found
            if bad is not None:
                profiler.set_batch(None)
                profiler.__exit__()  # the diagnostic re-run must not feed the statistics
                sample = _locate_non_finite(model, profiler, *bad, batches[bad_batch], sequences, pad_id, device)
                raise PipelineError(f"non-finite activation (NaN or Inf) in layer '{bad[0]}' {bad[1]} for calibration "
                                    f"sample {sample}; try dtype: float32 or check the model weights")
            bar.update(len(batch))
            if save:
                checkpoint.save(b + 1, *profiler.state())
            if after_batch is not None:
                after_batch(b + 1)
    bar.close()
    return profiler


def profile_model(model, sequences: list[list[int]], pad_id: int, batch_size: int = 1,
                  layer_names: list[str] | None = None, checkpoint: Checkpoint | None = None,
                  checkpoint_every: int = 0, progress: bool = True,
                  after_batch: Callable[[int], None] | None = None) -> dict:
    """Profile `sequences` and return the act_scales dict (reference keys plus absmax keys).

    `after_batch(batches_done)` is called after each batch (used by tests to interrupt a run).
    """
    names = layer_names or linear_layer_names(model)
    profiler = run_profiler(model, sequences, pad_id, batch_size, names, checkpoint, checkpoint_every, progress,
                            after_batch)
    return assemble_act_scales(profiler.stats, names, sum(len(s) for s in sequences), len(sequences))


def assemble_act_scales(stats: dict, names: list[str], total_tokens: int, num_samples: int) -> dict:
    """The act_scales dict from layer -> side -> statistics (SideStats or HistogramStats)."""
    out = {"ori": {}, "top_0_1": {}, "all_stat": {}, "absmax_ori": {}, "absmax_top_0_1": {}, "count": {}}
    for name in names:
        res = {side: stats[name][side].result() for side in SIDES}
        for key in ("ori", "top_0_1", "absmax_ori", "absmax_top_0_1"):
            out[key][name] = {side: res[side][key] for side in SIDES}
        out["all_stat"][name] = {side: {"mean": res[side]["mean"], "std": res[side]["std"]} for side in SIDES}
        out["count"][name] = {side: res[side]["n"] for side in SIDES}
    out["meta"] = {"num_samples": num_samples, "num_tokens": total_tokens, "num_layers": len(names)}
    return out


# --- shards: partial statistics of contiguous batch ranges, merged exactly ---

SHARD_METADATA_KEY = "shadowquant_profile_shard"


def save_shard(path: str | Path, profiler: ActivationProfiler, meta: dict) -> None:
    """The shard's statistics state plus `meta` (shard, shards, names, num_samples, num_tokens, and the
    act_scales 'meta' entries the stage adds)."""
    tensors, scalars = profiler.state()
    header = json.dumps({"scalars": scalars, **meta})  # key order kept: act_scales["meta"] is copied as is
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={SHARD_METADATA_KEY: header})


def read_shard(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            header = (handle.metadata() or {}).get(SHARD_METADATA_KEY)
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except FileNotFoundError:
        raise PipelineError(f"{path}: profile shard not found; run the profile_shard rule first") from None
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise PipelineError(f"{path}: not a readable profile shard ({exc}); delete it to profile "
                            "the shard again") from None
    if header is None:
        raise PipelineError(f"{path}: not a profile shard (no '{SHARD_METADATA_KEY}' metadata); delete it")
    return tensors, json.loads(header)


# Entries every shard of one run has in common.
SHARED_META = ("shards", "names", "num_samples", "num_tokens", "meta")


def merge_shards(paths: list[str | Path]) -> dict:
    """The act_scales dict of the whole run from the files of all its shards (in any order)."""
    shards = sorted(((*read_shard(p), Path(p)) for p in paths), key=lambda s: s[1].get("shard", -1))
    first, first_path = shards[0][1], shards[0][2]
    expected = list(range(first.get("shards", 0)))
    if [meta.get("shard") for _, meta, _ in shards] != expected:
        found = ", ".join(f"{path.name}: shard {meta.get('shard')} of {meta.get('shards')}" for _, meta, path in shards)
        raise PipelineError(f"profile shards do not form one complete set 0..{len(expected) - 1}: {found}")
    for _, meta, path in shards[1:]:
        for key in SHARED_META:
            if meta.get(key) != first.get(key):
                raise PipelineError(f"{path}: profile shard entry '{key}' differs from {first_path}'s; profile all "
                                    "shards with the same model, samples and settings")
        if meta["scalars"]["shared_inputs"] != first["scalars"]["shared_inputs"]:
            raise PipelineError(f"{path}: its layers share inputs differently from {first_path}'s")
    merged = {}
    for key, (kind, max_elements) in first["scalars"]["sides"].items():
        total = None
        for tensors, meta, path in shards:
            if meta["scalars"]["sides"].get(key) != [kind, max_elements]:
                raise PipelineError(f"{path}: '{key}' statistics are {meta['scalars']['sides'].get(key)}, "
                                    f"not {[kind, max_elements]} as in {first_path}")
            part = side_stats_kind(kind, max_elements)
            part.load_state(key, tensors, {"n": meta["scalars"][key]})
            if total is None:
                total = part
            else:
                total.merge(part)  # in shard order: float32 moments fold in the unsharded run's order
        merged[key] = total
    stats = {name: {side: merged.get(f"{name}.{side}") for side in SIDES} for name in first["names"]}
    for name, owner in first["scalars"]["shared_inputs"].items():
        stats[name]["input"] = stats[owner]["input"]
    scales = assemble_act_scales(stats, first["names"], first["num_tokens"], first["num_samples"])
    scales["meta"].update(first["meta"])
    return scales


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
