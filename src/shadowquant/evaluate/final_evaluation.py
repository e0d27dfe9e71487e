"""The exported model next to float: its sweep metrics and per-record sums, and greedy generations side by side
from a model rebuilt out of the int8 export file itself (the tensors that ship, not a fresh simulation).
evaluation.md and evaluation.html are written from this file's evaluation.json by evaluate.summary."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from safetensors.torch import load_file

from shadowquant.atomic import write_json
from shadowquant.errors import PipelineError
from shadowquant.model.families import quantized_layer_names
from shadowquant.model.loading import load_model_from_manifest
from shadowquant.runtimes import runtime_of
from shadowquant.evaluate.selection import read_selection, resolve_export_point
from shadowquant.evaluate.sweep import read_point_json

log = logging.getLogger(__name__)


@torch.inference_mode()
def greedy_generations(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    device = next(model.parameters()).device
    outputs = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").to(device)
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        outputs.append(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
    return outputs


def export_metadata(export) -> dict:
    from safetensors import safe_open

    with safe_open(str(export), framework="pt") as handle:
        return handle.metadata() or {}


@torch.inference_mode()
def evaluate_export(manifest, export, float_json, sweep_csv, out_json, point: str = "auto", selection=None,
                    prompts: list[str] = (), max_new_tokens: int = 24, device: str = "auto",
                    dtype: str = "auto", name: str | None = None) -> dict:
    """Metrics of the exported point (from the sweep) next to float, its per-record sums (`w8a8_per_record`, from
    the point's JSON in the sweep/ folder beside `sweep_csv`; the demo evaluation reads their continuation
    part), plus float vs exported W8A8 generations. `name`: the model's name in the summary (default: the
    manifest's folder)."""
    import pandas as pd

    point = resolve_export_point(point, selection)
    table = pd.read_csv(sweep_csv)
    row = table[table["point"] == point]
    if row.empty:
        raise PipelineError(f"{sweep_csv}: no sweep point {point}; re-run the sweep")
    w8a8 = {k: (None if pd.isna(v) else v.item() if hasattr(v, "item") else v)
            for k, v in row.iloc[0].to_dict().items()}
    point_json = Path(sweep_csv).with_name("sweep") / f"{point}.json"
    point_data = read_point_json(point_json)
    float_metrics = {k: v for k, v in read_point_json(float_json).items() if k != "per_record"}
    model, tokenizer, family = load_model_from_manifest(manifest, device, dtype)
    float_text = greedy_generations(model, tokenizer, list(prompts), max_new_tokens)
    tensors = load_file(str(export), device=str(next(model.parameters()).device))
    meta = export_metadata(export)
    runtime_of(meta, family).apply_from_export(model, tensors, quantized_layer_names(model, family), meta)
    w8a8_text = greedy_generations(model, tokenizer, list(prompts), max_new_tokens)
    result = {
        "model": name or Path(manifest).parent.name, "point": point, "float": float_metrics, "w8a8": w8a8,
        "selection": read_selection(selection) if selection is not None else None,
        "generations": [{"prompt": p, "float": a, "w8a8": b} for p, a, b in zip(prompts, float_text, w8a8_text)],
        "w8a8_per_record": point_data["per_record"],
    }
    write_json(out_json, result)
    return result
