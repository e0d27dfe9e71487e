"""Sharded profiling stages: one job per contiguous part of the calibration batches, and a merge.

`profile_shard` writes the partial statistics of one shard; `merge_profile` combines all shards
into act_scales.json and act_scales.csv, byte for byte what the unsharded `stages.profile` writes.
"""

from __future__ import annotations

import logging
from pathlib import Path

from shadowquant.atomic import atomic_path, write_json
from shadowquant.errors import PipelineError
from shadowquant.model.families import get_family

log = logging.getLogger(__name__)


# Part of every checkpoint fingerprint: a checkpoint of another state layout is ignored, not misread.
CHECKPOINT_FORMAT = "profile-checkpoint-v2"


def load_profiling_inputs(manifest: str | Path, samples: str | Path, seq_len: int, batch_size: int,
                          device: str, dtype: str):
    """(model, sequences, pad_id, batch_size, family, manifest info) as the profile stages use them."""
    from shadowquant.inputs import corpus
    from shadowquant.inputs.manifest import read_manifest
    from shadowquant.model.loading import load_model_from_manifest
    from shadowquant.calibrate.profiling import tokenize_samples

    info = read_manifest(manifest)
    texts = corpus.read_jsonl_texts(samples)
    model, tokenizer, family = load_model_from_manifest(manifest, device=device, dtype=dtype)
    if get_family(family).moe and batch_size > 1:
        # Routed experts see flattened tokens, where padding cannot be told apart: profile unbatched.
        log.warning("%s: profiling with batch_size 1 so padded tokens never reach the experts", family)
        batch_size = 1
    sequences = tokenize_samples(tokenizer, texts, seq_len)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return model, sequences, pad_id, batch_size, family, info


def make_checkpoint(checkpoint_dir, checkpoint_every: int, info: dict, samples, seq_len: int, batch_size: int,
                    model, **extra):
    """The Checkpoint of a profiling job (None when disabled), fingerprinted by everything that shapes it."""
    from shadowquant.inputs.download import sha256_file
    from shadowquant.calibrate.profiling import Checkpoint

    if checkpoint_dir is None or not checkpoint_every:
        return None
    parameter = next(model.parameters())
    fingerprint = {
        "format": CHECKPOINT_FORMAT, "manifest": info, "samples": sha256_file(samples), "seq_len": seq_len,
        "batch_size": batch_size, "dtype": str(parameter.dtype), "device": parameter.device.type, **extra,
    }
    return Checkpoint(checkpoint_dir, fingerprint)


def profile_shard(manifest: str | Path, samples: str | Path, out: str | Path, shard: int, shards: int,
                  seq_len: int, batch_size: int = 1, device: str = "auto", dtype: str = "auto",
                  checkpoint_dir: str | Path | None = None, checkpoint_every: int = 0, progress: bool = True,
                  after_batch=None) -> None:
    """Profile shard `shard` (0-based) of `shards` and write its partial statistics to `out`."""
    from shadowquant.model.families import linear_layer_names
    from shadowquant.calibrate.profiling import run_profiler, save_shard

    if not 0 <= shard < shards:
        raise PipelineError(f"profile shard {shard} does not exist: calibration.shards = {shards} gives shards "
                            f"0..{shards - 1}")
    model, sequences, pad_id, batch_size, family, info = load_profiling_inputs(manifest, samples, seq_len,
                                                                               batch_size, device, dtype)
    checkpoint = make_checkpoint(checkpoint_dir, checkpoint_every, info, samples, seq_len, batch_size, model,
                                 shard=shard, shards=shards)
    names = linear_layer_names(model)
    log.info("profiling shard %d of %d: %d Linear layers, batch size %d, %s on %s", shard + 1, shards, len(names),
             batch_size, next(model.parameters()).dtype, next(model.parameters()).device)
    profiler = run_profiler(model, sequences, pad_id, batch_size, names, checkpoint, checkpoint_every, progress,
                            after_batch, shard=shard, shards=shards)
    save_shard(out, profiler, {
        "shard": shard, "shards": shards, "names": names, "num_samples": len(sequences),
        "num_tokens": sum(len(s) for s in sequences),
        # What the unsharded stage adds to act_scales["meta"], in the same order.
        "meta": {"seq_len": seq_len, "family": family, "source": info.get("source")},
    })
    if checkpoint is not None:
        checkpoint.clear()


def merge_profile(shard_files: list[str | Path], out_json: str | Path, out_table: str | Path) -> dict:
    """act_scales.json and act_scales.csv from the files of every shard."""
    from shadowquant.calibrate.profiling import act_scales_table, merge_shards

    if not shard_files:
        raise PipelineError("merge_profile needs at least one profile shard file")
    scales = merge_shards(shard_files)
    with atomic_path(out_table, suffix=".csv") as tmp:
        act_scales_table(scales).to_csv(tmp, index=False)
    write_json(out_json, scales)
    return scales
