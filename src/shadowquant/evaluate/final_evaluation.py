"""The exported model next to float: its sweep metrics, and greedy generations side by side from a model
rebuilt out of the int8 export file itself (the tensors that ship, not a fresh simulation)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from safetensors.torch import load_file

from shadowquant.atomic import write_json, write_text
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


def _fmt(value) -> str:
    if value is None:
        return "–"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _with_interval(row: dict, key: str) -> str:
    """'22.31 [21.9, 22.8]': the value and its 95 % bootstrap interval, where there is one."""
    value, low, high = row.get(key), row.get(f"{key}_ci_low"), row.get(f"{key}_ci_high")
    if value is None:
        return "–"
    if key == "perplexity_increase":
        text = f"{value:+.2%}"
        return text + (f" [{low:+.2%}, {high:+.2%}]" if low is not None and high is not None else "")
    return _fmt(value) + (f" [{low:.4f}, {high:.4f}]" if low is not None and high is not None else "")


METRIC_ROWS = (("perplexity", "perplexity"), ("perplexity_increase", "perplexity increase over float"),
               ("kl", "KL(float || W8A8) per token"), ("agreement", "top-1 agreement with float"),
               ("accuracy", "last-token accuracy"))


def _selection_line(result: dict) -> str:
    choice = result.get("selection")
    if not choice:
        return f"Exported point **{result['point']}**, set explicitly by export.point."
    verdict = ("within the budget" if choice["budget_met"] else
               "**BUDGET MISSED**: no swept point met it; this is the most accurate point")
    return (f"Exported point **{result['point']}**, chosen by the selection: {choice['metric']} loss "
            f"{choice['loss']:.4g} against a budget of {choice['budget']:g}, {verdict}.")


def export_metadata(export) -> dict:
    from safetensors import safe_open

    with safe_open(str(export), framework="pt") as handle:
        return handle.metadata() or {}


def _shadow_line(q: dict) -> str:
    """What runs on the CPU: the shadow layers and measured CPU share (NPU runtime), or the shadow sides (ideal)."""
    return runtime_of(q).shadow_line(q)


def markdown_summary(result: dict) -> str:
    q, f = result["w8a8"], result["float"]
    lines = [
        f"# W8A8 evaluation of {result['model']}",
        "",
        _selection_line(result),
        _shadow_line(q),
        "",
        f"Evaluated on {f['num_samples']} held-out records ({f['num_tokens']} predicted tokens); brackets are "
        "95 % bootstrap intervals over records (the increase is paired with float on the same records).",
        "",
        "| metric | float | W8A8 |",
        "| --- | --- | --- |",
    ]
    for key, label in METRIC_ROWS:
        lines.append(f"| {label} | {_with_interval(f, key)} | {_with_interval(q, key)} |")
    lines += ["", "## Greedy generations", "",
              "The W8A8 text comes from a model rebuilt out of the int8 export file.", ""]
    for g in result["generations"]:
        lines += [f"**Prompt:** `{g['prompt']}`", "", f"- float: {g['float']!r}", f"- W8A8: {g['w8a8']!r}", ""]
    return "\n".join(lines) + "\n"


def html_summary(result: dict) -> str:
    """The same summary as a small standalone page: the Snakemake report shows HTML inline."""
    import html

    q, f = result["w8a8"], result["float"]
    rows = "".join(f"<tr><td>{label}</td><td>{html.escape(_with_interval(f, key))}</td>"
                   f"<td>{html.escape(_with_interval(q, key))}</td></tr>" for key, label in METRIC_ROWS)
    gens = "".join(f"<h4>{html.escape(g['prompt'])}</h4><p><b>float:</b> {html.escape(g['float'])}</p>"
                   f"<p><b>W8A8:</b> {html.escape(g['w8a8'])}</p>" for g in result["generations"])
    selection = html.escape(_selection_line(result)).replace("**", "")
    return (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>W8A8 evaluation</title>"
        "<style>body{font-family:sans-serif;font-size:13px;margin:1em} td,th{padding:2px 10px;"
        "border-bottom:1px solid #ddd}</style></head><body>"
        f"<h3>W8A8 evaluation of {html.escape(result['model'])}</h3>"
        f"<p>{selection} {html.escape(_shadow_line(q))} "
        f"{f['num_samples']} held-out records, {f['num_tokens']} predicted tokens; brackets: 95 % bootstrap "
        "intervals.</p>"
        f"<table><tr><th>metric</th><th>float</th><th>W8A8</th></tr>{rows}</table>"
        f"<h3>Greedy generations (W8A8 from the int8 export file)</h3>{gens}</body></html>\n"
    )


def evaluate_export(manifest, export, float_json, sweep_csv, out_json, out_md, point: str = "auto",
                    selection=None, prompts: list[str] = (), max_new_tokens: int = 24,
                    device: str = "auto", dtype: str = "auto", out_html=None) -> dict:
    """Metrics of the exported point (from the sweep) next to float, plus float vs exported W8A8 generations."""
    import pandas as pd

    point = resolve_export_point(point, selection)
    table = pd.read_csv(sweep_csv)
    row = table[table["point"] == point]
    if row.empty:
        raise PipelineError(f"{sweep_csv}: no sweep point {point}; re-run the sweep")
    w8a8 = {k: (None if pd.isna(v) else v.item() if hasattr(v, "item") else v)
            for k, v in row.iloc[0].to_dict().items()}
    float_metrics = {k: v for k, v in read_point_json(float_json).items() if k != "per_record"}
    model, tokenizer, family = load_model_from_manifest(manifest, device, dtype)
    float_text = greedy_generations(model, tokenizer, list(prompts), max_new_tokens)
    tensors = load_file(str(export), device=str(next(model.parameters()).device))
    meta = export_metadata(export)
    runtime_of(meta, family).apply_from_export(model, tensors, quantized_layer_names(model, family), meta)
    w8a8_text = greedy_generations(model, tokenizer, list(prompts), max_new_tokens)
    result = {
        "model": Path(manifest).parent.name, "point": point, "float": float_metrics, "w8a8": w8a8,
        "selection": read_selection(selection) if selection is not None else None,
        "generations": [{"prompt": p, "float": a, "w8a8": b} for p, a, b in zip(prompts, float_text, w8a8_text)],
    }
    write_json(out_json, result)
    write_text(out_md, markdown_summary(result))
    if out_html is not None:
        write_text(out_html, html_summary(result))
    return result
