"""The exported model next to float: its sweep metrics, and greedy generations side by side from a model
rebuilt out of the int8 export file itself (the tensors that ship, not a fresh simulation)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from safetensors.torch import load_file

from shadowquant.atomic import write_json, write_text
from shadowquant.decision import threshold_label
from shadowquant.errors import PipelineError
from shadowquant.fakequant import apply_w8a8_from_export
from shadowquant.families import quantized_layer_names
from shadowquant.models import load_model_from_manifest
from shadowquant.selection import resolve_export_pair

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


def markdown_summary(result: dict) -> str:
    q, f = result["w8a8"], result["float"]
    lines = [
        f"# W8A8 evaluation of {result['model']}",
        "",
        f"Exported: statistic **{result['statistic']}**, threshold **{threshold_label(result['threshold'])}** "
        f"({int(q['num_shadow_inputs'])} shadow inputs, {int(q['num_shadow_outputs'])} shadow outputs; "
        f"{q['shadow_flop_fraction']:.1%} of quantized Linear FLOPs need shadow execution).",
        "",
        f"Evaluated on {f['num_samples']} held-out records ({f['num_tokens']} predicted tokens).",
        "",
        "| metric | float | W8A8 |",
        "| --- | --- | --- |",
    ]
    for key in ("accuracy", "perplexity", "agreement", "kl"):
        lines.append(f"| {key} | {_fmt(f.get(key))} | {_fmt(q.get(key))} |")
    lines += ["", "## Greedy generations", ""]
    for g in result["generations"]:
        lines += [f"**Prompt:** `{g['prompt']}`", "", f"- float: {g['float']!r}", f"- W8A8: {g['w8a8']!r}", ""]
    return "\n".join(lines) + "\n"


def html_summary(result: dict) -> str:
    """The same summary as a small standalone page: the Snakemake report shows HTML inline."""
    import html

    q, f = result["w8a8"], result["float"]
    rows = "".join(f"<tr><td>{k}</td><td>{_fmt(f.get(k))}</td><td>{_fmt(q.get(k))}</td></tr>"
                   for k in ("accuracy", "perplexity", "agreement", "kl"))
    gens = "".join(f"<h4>{html.escape(g['prompt'])}</h4><p><b>float:</b> {html.escape(g['float'])}</p>"
                   f"<p><b>W8A8:</b> {html.escape(g['w8a8'])}</p>" for g in result["generations"])
    return (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>W8A8 evaluation</title>"
        "<style>body{font-family:sans-serif;font-size:13px;margin:1em} td,th{padding:2px 10px;"
        "border-bottom:1px solid #ddd}</style></head><body>"
        f"<h3>W8A8 evaluation of {html.escape(result['model'])}</h3>"
        f"<p>Exported statistic <b>{result['statistic']}</b>, threshold <b>{threshold_label(result['threshold'])}</b>: "
        f"{int(q['num_shadow_inputs'])} shadow inputs, {int(q['num_shadow_outputs'])} shadow outputs, "
        f"{q['shadow_flop_fraction']:.1%} of quantized Linear FLOPs with shadow inputs. "
        f"{f['num_samples']} held-out records, {f['num_tokens']} predicted tokens.</p>"
        f"<table><tr><th>metric</th><th>float</th><th>W8A8</th></tr>{rows}</table>"
        f"<h3>Greedy generations</h3>{gens}</body></html>\n"
    )


def evaluate_export(manifest, export, float_json, sweep_csv, out_json, out_md, statistic: str,
                    threshold, selection=None, prompts: list[str] = (), max_new_tokens: int = 24,
                    device: str = "auto", dtype: str = "auto", out_html=None) -> dict:
    """Metrics of the exported pair (from the sweep) next to float, plus float vs exported W8A8 generations."""
    import pandas as pd

    statistic, threshold = resolve_export_pair(statistic, threshold, selection)
    table = pd.read_csv(sweep_csv)
    row = table[(table["statistic"] == statistic) & (table["threshold"] == threshold)]
    if row.empty:
        raise PipelineError(f"{sweep_csv}: no sweep point for statistic {statistic} threshold {threshold:g}")
    w8a8 = {k: (None if pd.isna(v) else v.item() if hasattr(v, "item") else v)
            for k, v in row.iloc[0].to_dict().items()}
    float_metrics = json.loads(Path(float_json).read_text())
    model, tokenizer, family = load_model_from_manifest(manifest, device, dtype)
    float_text = greedy_generations(model, tokenizer, list(prompts), max_new_tokens)
    apply_w8a8_from_export(model, load_file(str(export), device=str(next(model.parameters()).device)),
                           quantized_layer_names(model, family))
    w8a8_text = greedy_generations(model, tokenizer, list(prompts), max_new_tokens)
    result = {
        "model": Path(manifest).parent.name, "statistic": statistic, "threshold": threshold,
        "float": float_metrics, "w8a8": w8a8,
        "generations": [{"prompt": p, "float": a, "w8a8": b} for p, a, b in zip(prompts, float_text, w8a8_text)],
    }
    write_json(out_json, result)
    write_text(out_md, markdown_summary(result))
    if out_html is not None:
        write_text(out_html, html_summary(result))
    return result
