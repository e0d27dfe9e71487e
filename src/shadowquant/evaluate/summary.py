"""evaluation.md and evaluation.html: what a generation on the phone gets first (the demo evaluation: the NPU
prefill model handing over to the CPU decoding model), where the run made one, then the exported int8 prefill
model next to float (final_evaluation's evaluation.json) and the greedy generations."""

from __future__ import annotations

import html

from shadowquant.atomic import write_text
from shadowquant.evaluate.demo_evaluation import model_cells, model_table
from shadowquant.evaluate.metrics import interval_text
from shadowquant.jsonfile import read_json_object
from shadowquant.runtimes import runtime_of


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


def _shadow_line(q: dict) -> str:
    """What runs on the CPU: the shadow layers and measured CPU share (NPU runtime), or the shadow sides (ideal)."""
    return runtime_of(q).shadow_line(q)


def demo_sentence(demo: dict) -> str:
    """The demo evaluation's setup and headline in one paragraph (evaluation.md's first section)."""
    setup, m = demo["setup"], demo["demo"]
    decoder = setup.get("decode_candidate") or setup["decode_model"]
    return (f"mllm's NPU demo prefills the prompt with the int8 NPU model and writes every further token with the "
            f"CPU decoding model. Run that way on each of {m['num_samples']} held-out records (the first "
            f"{setup['prefill_fraction']:.0%} of its tokens prefilled in chunks of {setup['chunk_size']}, the KV cache "
            f"handed over in "
            f"{setup['handover']}, the rest written by the decoding model {decoder}), the "
            f"{m['num_tokens']} continuation tokens get perplexity {m['perplexity']:.4f}, "
            f"**{interval_text(m, 'perplexity_increase')} over float**, against "
            f"{interval_text(demo['prefill_only'], 'perplexity_increase')} for the NPU prefill model alone and "
            f"{interval_text(demo['decode_only'], 'perplexity_increase')} for the CPU decoding model alone on the "
            "same tokens (demo_evaluation.md: the setup and the paired differences).")


def markdown_summary(result: dict, demo: dict | None = None) -> str:
    q, f = result["w8a8"], result["float"]
    lines = [f"# W8A8 evaluation of {result['model']}", ""]
    if demo is not None:
        lines += ["## What a generation on the phone gets", "", demo_sentence(demo), "", *model_table(demo), "",
                  "## The int8 prefill model (NPU)", ""]
    lines += [
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
        lines.append(f"| {label} | {interval_text(f, key)} | {interval_text(q, key)} |")
    lines += ["", "## Greedy generations", "",
              "The W8A8 text comes from a model rebuilt out of the int8 export file.", ""]
    for g in result["generations"]:
        lines += [f"**Prompt:** `{g['prompt']}`", "", f"- float: {g['float']!r}", f"- W8A8: {g['w8a8']!r}", ""]
    return "\n".join(lines) + "\n"


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(cell)}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def html_summary(result: dict, demo: dict | None = None) -> str:
    """The same summary as a small standalone page: the Snakemake report shows HTML inline."""
    q, f = result["w8a8"], result["float"]
    rows = [[label, interval_text(f, key), interval_text(q, key)] for key, label in METRIC_ROWS]
    gens = "".join(f"<h4>{html.escape(g['prompt'])}</h4><p><b>float:</b> {html.escape(g['float'])}</p>"
                   f"<p><b>W8A8:</b> {html.escape(g['w8a8'])}</p>" for g in result["generations"])
    selection = html.escape(_selection_line(result)).replace("**", "")
    phone = ""
    if demo is not None:
        phone = (f"<h3>What a generation on the phone gets</h3><p>{html.escape(demo_sentence(demo).replace('**', ''))}"
                 f"</p>{_html_table(*model_cells(demo))}<h3>The int8 prefill model (NPU)</h3>")
    return (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>W8A8 evaluation</title>"
        "<style>body{font-family:sans-serif;font-size:13px;margin:1em} td,th{padding:2px 10px;"
        "border-bottom:1px solid #ddd}</style></head><body>"
        f"<h3>W8A8 evaluation of {html.escape(result['model'])}</h3>{phone}"
        f"<p>{selection} {html.escape(_shadow_line(q))} "
        f"{f['num_samples']} held-out records, {f['num_tokens']} predicted tokens; brackets: 95 % bootstrap "
        "intervals.</p>"
        f"{_html_table(['metric', 'float', 'W8A8'], rows)}"
        f"<h3>Greedy generations (W8A8 from the int8 export file)</h3>{gens}</body></html>\n"
    )


def write_evaluation_summary(evaluation_json, out_md, out_html, demo_json=None) -> dict:
    """evaluation.md and evaluation.html from evaluation.json and, where given, the demo evaluation's JSON."""
    result = read_json_object(evaluation_json, "the export's evaluation", "re-run the export's evaluation")
    demo = None if demo_json is None else read_json_object(demo_json, "the demo evaluation",
                                                           "re-run the demo evaluation")
    write_text(out_md, markdown_summary(result, demo))
    write_text(out_html, html_summary(result, demo))
    return result
