"""One function per pipeline stage, called by the CLI and by the Snakemake adapters.

Stages take plain paths and values, validate what they read, and write every
output atomically.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from safetensors.torch import load_file

from shadowquant.inputs import corpus, download
from shadowquant.atomic import atomic_path, write_json, write_text
from shadowquant.runtimes.decision import (load_act_scales, parse_point, point_clip, read_clip_scales, read_ranking,
                                  shadow_summary, threshold_label)
from shadowquant.errors import PipelineError
from shadowquant.export.int8 import save_export, save_export_pth
from shadowquant.runtimes.fakequant import weight_range_name
from shadowquant.model.families import linear_layer_names
from shadowquant.export.inspector import expectations_from_safetensors, format_report, inspect_mllm, read_runtime_json
from shadowquant.inputs.manifest import read_manifest
from shadowquant.export.mllm import convert_safetensors_to_mllm
from shadowquant.model.loading import fetch_model as fetch, load_model_from_manifest
from shadowquant.calibrate.profile_stage import load_profiling_inputs, make_checkpoint
from shadowquant.calibrate.profiling import act_scales_table, profile_model
from shadowquant.runtimes.profiles import IDEAL
from shadowquant.runtimes import DecisionSources, get_runtime
from shadowquant.runtimes.ideal import point_decisions
from shadowquant.evaluate.selection import resolve_export_point

log = logging.getLogger(__name__)


# --- stage 1: inputs -------------------------------------------------------

def fetch_model(source: str, manifest: str | Path, model_type: str | None = None, revision: str | None = None,
                trust_remote_code: bool = False) -> dict:
    manifest = Path(manifest)
    # A declared model.type that contradicts the model's config fails here, before any work.
    info = fetch(source, manifest.parent, revision=revision, trust_remote_code=trust_remote_code, family=model_type)
    info["trust_remote_code"] = trust_remote_code
    write_json(manifest, info)
    return info


def build_corpus(source: str, out: str | Path, sha256: str | None = None) -> None:
    """builtin:pydoc → a .jsonl; https:// → a verified download. Local files need no stage."""
    if source == "builtin:pydoc":
        corpus.build_pydoc_corpus(out)
    elif source.startswith("https://"):
        download.download(source, out, sha256=sha256)
    else:
        raise PipelineError(f"calibration.dataset '{source}' is neither builtin:pydoc nor an https:// URL")


def select_samples(corpus_path: str | Path, out: str | Path, num_samples: int, offset: int = 0,
                   what: str = "calibration", shuffle: bool = True) -> None:
    """Records `offset .. offset+num_samples` of the seed-42 permutation (or of the file order)."""
    if shuffle:
        texts = corpus.prepare_samples(corpus_path, num_samples, seed=42, offset=offset, what=what)
    else:
        # select_records names the first missing index when the file is too short.
        texts = corpus.select_records(corpus_path, list(range(offset, offset + num_samples)))
    corpus.write_jsonl(out, texts)


# --- stage 2: profiling ----------------------------------------------------

def profile(manifest: str | Path, samples: str | Path, out_json: str | Path, out_table: str | Path,
            seq_len: int, batch_size: int = 1, device: str = "auto", dtype: str = "auto",
            checkpoint_dir: str | Path | None = None, checkpoint_every: int = 0, progress: bool = True,
            after_batch=None) -> dict:
    """act_scales.json and .csv of the whole calibration set in one job (see profile_stage for shards)."""
    model, sequences, pad_id, batch_size, family, info = load_profiling_inputs(manifest, samples, seq_len,
                                                                               batch_size, device, dtype)
    checkpoint = make_checkpoint(checkpoint_dir, checkpoint_every, info, samples, seq_len, batch_size, model)
    names = linear_layer_names(model)
    log.info("profiling %d Linear layers on %d samples (%d tokens), batch size %d, %s on %s", len(names),
             len(sequences), sum(map(len, sequences)), batch_size, next(model.parameters()).dtype,
             next(model.parameters()).device)
    scales = profile_model(model, sequences, pad_id, batch_size=batch_size, layer_names=names,
                           checkpoint=checkpoint, checkpoint_every=checkpoint_every, progress=progress,
                           after_batch=after_batch)
    scales["meta"].update(seq_len=seq_len, family=family, source=info.get("source"))
    table = act_scales_table(scales)
    with atomic_path(out_table, suffix=".csv") as tmp:
        table.to_csv(tmp, index=False)
    write_json(out_json, scales)
    if checkpoint is not None:
        checkpoint.clear()
    return scales


# --- stage 3: decision and export ------------------------------------------

def decide(act_scales: str | Path, out: str | Path, point: str, sensitivity: str | Path | None = None,
           clip_scales: str | Path | None = None) -> dict:
    """The clip / shadow decision of one sweep point, as a JSON summary of its shadow sides."""
    statistic, rule, value = parse_point(point)
    ranking = read_ranking(sensitivity, statistic) if sensitivity is not None else None
    clips = read_clip_scales(clip_scales, statistic) if clip_scales is not None else None
    decisions = point_decisions(load_act_scales(act_scales), point, ranking=ranking, source=str(act_scales),
                                clip_scales=clips)
    summary = shadow_summary(decisions, value if rule == "ratio" else None, statistic)
    summary["point"] = point
    write_json(out, summary)
    log.info("%s: %d shadow inputs, %d shadow outputs of %d layers", point, summary["num_shadow_inputs"],
             summary["num_shadow_outputs"], summary["num_layers"])
    return summary


def export(manifest: str | Path, act_scales: str | Path, out: str | Path, point: str = "auto",
           selection: str | Path | None = None, sensitivity: str | Path | None = None,
           shadow_json: str | Path | None = None, clip_scales: str | Path | None = None,
           weight_range: str = "max", runtime: str = IDEAL, runtime_scales: str | Path | None = None,
           runtime_json: str | Path | None = None, auto_choices: dict | None = None) -> None:
    """Int8 export of an explicit sweep point, or of the point the selection chose, with the weight clip
    range the sweep used, for the runtime profile the sweep simulated (runtime.json says how to run it;
    `auto_choices`, the config's 'auto' values and why each was chosen, go there too)."""
    point = resolve_export_point(point, selection)
    statistic, rule, value = parse_point(point)
    model, _, family = load_model_from_manifest(manifest, device="cpu", dtype="checkpoint")
    runtime = get_runtime(runtime, family)
    transform = read_manifest(manifest).get("transform") or {}
    variant = "+".join(transform.get("transforms", [])) or "none"
    untied = bool(transform.get("untied_lm_head"))
    names = runtime.export_layers(model, family)
    plan = runtime.decide(load_act_scales(act_scales), point, names,
                          DecisionSources(sensitivity, clip_scales, runtime_scales), source=str(act_scales))
    meta = {"format": "shadowquant-int8", "family": family, "point": point, "statistic": statistic,
            "rule": rule, "threshold": threshold_label(value) if rule == "ratio" else "",
            "shadow_budget": str(int(value)) if rule in ("sensitivity", "layers") else "", "clip": point_clip(point),
            "transform": variant, "untied_lm_head": "true" if untied else "false",
            "weight_range": weight_range_name(weight_range), "runtime": runtime.name,
            **runtime.export_metadata(plan)}
    tensors, tied = runtime.export_tensors(model, plan, names, weight_range)
    summary = runtime.export_summary(plan, names)
    save_export(tensors, out, metadata=meta)
    if shadow_json is not None:
        summary.update(point=point, transform=variant, untied_lm_head=untied, runtime=runtime.name,
                       weight_range=weight_range_name(weight_range))
        write_json(shadow_json, {k: v for k, v in summary.items() if k != "layers"})
    if runtime_json is not None:
        description = runtime.describe(model, plan, tied, point, variant)
        if auto_choices:
            description["auto_choices"] = auto_choices
        write_json(runtime_json, description)
    log.info("exported %d tensors (point %s, transform %s, runtime %s%s) to %s%s", len(tensors), point, variant,
             runtime.name, runtime.plan_note(plan), out,
             "; lm_head.weight is its own tensor: the transform untied it from the embeddings" if untied else "")


# --- stage 4: conversion ----------------------------------------------------

def convert(export_path: str | Path, out: str | Path, report: str | Path | None = None, version: int = 1,
            runtime_json: str | Path | None = None) -> None:
    """Int8 safetensors export -> mllm file, published only once the inspector accepts it (against what the
    runtime profile's C++ model loads, given the export's runtime.json)."""
    shapes, codes = expectations_from_safetensors(export_path, version)
    runtime = read_runtime_json(runtime_json) if runtime_json is not None else None
    with atomic_path(out, suffix=".mllm") as tmp:
        convert_safetensors_to_mllm(export_path, tmp, version=version)
        result = inspect_mllm(tmp, expected_shapes=shapes, expected_dtypes=codes, runtime=runtime)
        result.path = str(out)
        result.notes.extend(export_notes(export_path))
        text = format_report(result)
        log.info("inspection of %s:\n%s", out, text)
        if result.problems:  # never publish a model file the runtime would reject
            shown = "; ".join(f"{problem.name} {problem.what}" for problem in result.problems[:3])
            more = f" (and {len(result.problems) - 3} more)" if len(result.problems) > 3 else ""
            raise PipelineError(f"{export_path}: the converted model fails inspection: {shown}{more}; every "
                                "tensor the runtime loads must be there with its dtype and size: re-run the int8 "
                                "export")
    if report is not None:
        write_text(report, text + "\n")


def export_notes(export_path: str | Path) -> list[str]:
    """What the inspector's report should say about how the export was made (its transform)."""
    from safetensors import safe_open

    with safe_open(str(export_path), framework="pt") as handle:
        meta = handle.metadata() or {}
    variant = meta.get("transform", "none")
    if variant == "none":
        return []
    note = f"exact transform before quantization: {variant}"
    if meta.get("untied_lm_head") == "true":
        note += " (it untied lm_head from the embeddings: lm_head.weight is stored as its own tensor)"
    return [note]


def export_pth(export_path: str | Path, out: str | Path) -> None:
    """The reference-compatible .pth, made from our safetensors export (which is read safely)."""
    save_export_pth(load_file(str(export_path)), out)


def link_primary(src: str | Path, dst: str | Path) -> None:
    """The root model.mllm (or runtime.json): a relative symbolic link to `src`, else a copy; atomic.

    Not a hard link: Snakemake touches every output after its job, and a hard link shares its
    timestamp with `src`, which would then look newer than everything built from it."""
    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.symlink(os.path.relpath(src, dst.parent), tmp)
        except OSError:  # a file system without symbolic links
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def fetch_lambada(out: str | Path, num_samples: int) -> None:
    """The reference's evaluation set: LAMBADA validation, first records in order (needs network)."""
    try:
        import datasets
    except ImportError:
        raise PipelineError("evaluation.dataset 'hf:lambada' needs the 'datasets' package: pip install datasets") from None
    try:
        data = datasets.load_dataset("lambada", split=f"validation[:{num_samples}]")
    except Exception as exc:  # the hub raises many kinds of connection errors
        raise PipelineError(f"could not load LAMBADA from the Hugging Face hub ({type(exc).__name__}); the network "
                            "may be unreachable: set evaluation.dataset to 'heldout' or a local .jsonl file") from None
    corpus.write_jsonl(out, [r["text"] for r in data])
