"""The bundle's decoding model as a measured choice (bundle.decode): the recipes' per-tensor dtypes, a candidate
file read back and inspected, the choice among evaluated candidates, and the config's names."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from shadowquant.config import schema, validate_config
from shadowquant.decoding.candidates import (
    CANDIDATES,
    F32,
    Q4,
    Q4I,
    Q8,
    RECIPES,
    choose_candidate,
    choose_decode_model,
    decode_tensors,
    dtype_mix,
    parse_candidate,
    recipe_plan,
    write_decode_model,
)
from shadowquant.errors import PipelineError
from shadowquant.export.inspector import inspect_mllm
from shadowquant.export.mllm import DTYPE_FLOAT16, DTYPE_FLOAT32, DTYPE_Q4_0, DTYPE_Q8_0, read_mllm, write_mllm_v1_encoded
from shadowquant.decoding.q4_0 import dequantize_q4_0
from shadowquant.decoding.q8_0 import dequantize_q8_0
from test_inspector import TINY_DIMS, tiny_float_state

DIMS = {**TINY_DIMS, "num_hidden_layers": 3}


def plan_of(recipe: str) -> dict[str, str]:
    torch.manual_seed(0)
    return {name: encoding for name, encoding, _, _ in recipe_plan(decode_tensors(tiny_float_state(DIMS)), recipe)}


def _ends(name):
    return name.startswith(("model.layers.0.", "model.layers.2."))  # DIMS: three layers


# recipe -> (embedding, lm_head, how a body weight is stored)
EXPECTED_ENCODINGS = {
    "q4_0": (Q4, Q4, lambda n: Q4),
    "q4_0-head8": (Q8, Q8, lambda n: Q4),
    "q4_0i-head8": (Q8, Q8, lambda n: Q4I),
    "q4_0i-down8-head8": (Q8, Q8, lambda n: Q8 if "down_proj" in n else Q4I),
    "q4_0i-ends8-head8": (Q8, Q8, lambda n: Q8 if _ends(n) else Q4I),
    "q4_0i-v8-lm8": (Q4, Q8, lambda n: Q8 if "v_proj" in n else Q4I),
    "q4_0i-v8-ends8-lm8": (Q4, Q8, lambda n: Q8 if "v_proj" in n or _ends(n) else Q4I),
    "q4_0i-vo8-ends8-lm8": (Q4, Q8, lambda n: Q8 if "v_proj" in n or "o_proj" in n or _ends(n) else Q4I),
    "q8_0": (Q8, Q8, lambda n: Q8),
}


def test_each_recipe_gives_its_per_tensor_types():
    assert set(EXPECTED_ENCODINGS) == set(RECIPES)
    for recipe, (embedding, head, body_encoding) in EXPECTED_ENCODINGS.items():
        plan = plan_of(recipe)
        floats = {n for n in plan if "norm" in n or n.endswith(".bias")}
        assert floats and all(plan[n] == F32 for n in floats), recipe  # norms and biases float32 everywhere
        assert (plan["model.embed_tokens.weight"], plan["lm_head.weight"]) == (embedding, head), recipe
        body = [n for n in plan if n not in floats | {"model.embed_tokens.weight", "lm_head.weight"}]
        assert len(body) == 3 * 7 and all(plan[n] == body_encoding(n) for n in body), recipe
    assert plan_of("q4_0i-vo8-ends8-lm8")["model.layers.1.mlp.up_proj.weight"] == Q4I
    with pytest.raises(PipelineError, match="valid recipes: q4_0, q4_0-head8"):
        plan_of("q3_k")


def test_candidate_names_are_source_and_recipe_and_the_schema_lists_them_all():
    assert parse_candidate("unrotated:q4_0i-head8") == ("unrotated", "q4_0i-head8")
    with pytest.raises(PipelineError, match="valid candidates: prefill:q4_0, prefill:q4_0-head8"):
        parse_candidate("rotated:q4_0")
    decode = schema()["properties"]["bundle"]["properties"]["decode"]["properties"]
    assert decode["candidates"]["items"]["enum"] == list(CANDIDATES)
    assert decode["choice"]["enum"] == ["auto", *CANDIDATES]
    assert set(decode["candidates"]["default"]) <= set(CANDIDATES)


@pytest.mark.parametrize("decode, message", [
    ({"candidates": ["prefill:q5_0"]}, "config key 'bundle.decode.candidates[0]' = 'prefill:q5_0' is not valid: "
                                       "expected one of prefill:q4_0, "),
    ({"choice": "best"}, "config key 'bundle.decode.choice' = 'best' is not valid: expected one of auto, prefill:q4_0"),
    ({"budget": -0.1}, "config key 'bundle.decode.budget' = -0.1 is not valid: expected a number >= 0"),
    ({"imatrix_samples": 0}, "config key 'bundle.decode.imatrix_samples' = 0 is not valid"),
    ({"candidates": []}, "config key 'bundle.decode.candidates' = [] is not valid: expected a non-empty list"),
    ({"recipe": "q4_0"}, "unknown config key 'bundle.decode.recipe'; valid keys here: budget, candidates, choice, "
                         "imatrix_samples"),
])
def test_bad_decode_config_values_are_refused_in_one_line(decode, message):
    with pytest.raises(PipelineError) as error:
        validate_config({"model": {"name": "m", "source": "/nonexistent"}, "bundle": {"decode": decode}})
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("recipe", ["q4_0i-down8-head8", "q8_0"])
def test_a_candidate_file_reads_back_and_passes_the_inspection(tmp_path, recipe):
    torch.manual_seed(1)
    state = tiny_float_state(DIMS)
    importance = {name.removesuffix(".weight"): np.random.default_rng(0).uniform(0.1, 2, t.shape[1]).astype(np.float32)
                  for name, t in state.items() if name.endswith("_proj.weight")}
    summary = write_decode_model(state, tmp_path / "decode.mllm", recipe=recipe, importance=importance)
    stored = read_mllm(tmp_path / "decode.mllm")
    plan = {name: code for name, _, code, _ in recipe_plan(decode_tensors(state), recipe)}
    assert {e.name: e.dtype for e in stored.entries} == plan
    assert summary["dtypes"] == {e.name: e.dtype_name for e in stored.entries}
    assert dtype_mix(summary["dtypes"]) == ("q4_0+q8_0" if recipe != "q8_0" else "q8_0")
    for entry in stored.entries:
        values = stored.read(entry.name)
        original = decode_tensors(state)[entry.name].numpy().reshape(-1)
        if entry.dtype == DTYPE_FLOAT32:
            assert np.array_equal(values, original)
        else:
            decoded = (dequantize_q8_0 if entry.dtype == DTYPE_Q8_0 else dequantize_q4_0)(stored.read_raw(entry.name))
            assert np.array_equal(values, decoded)
            step = np.abs(original.reshape(-1, 32)).max(axis=1) / (127 if entry.dtype == DTYPE_Q8_0 else 4)  # loose
            assert np.all(np.abs(values - original).reshape(-1, 32) <= step[:, None] * 1.01 + 1e-6), entry.name
    runtime = {"runtime": "qwen-npu", "cpp_config": DIMS, "shadow_layers": []}
    report = inspect_mllm(tmp_path / "decode.mllm", runtime=runtime)
    assert report.ok, report.problems
    assert len(report.linears) == 7 * 3  # every projection, Q4_0 or Q8_0
    # A float16 weight is no dtype the bundle writes for a decoding model.
    entries = [(e.name, DTYPE_FLOAT16 if e.name.endswith("up_proj.weight") else e.dtype,
                e.numel * 2 if e.name.endswith("up_proj.weight") else e.size) for e in stored.entries]
    write_mllm_v1_encoded(tmp_path / "bad.mllm", entries,
                          lambda n: bytes(next(s for m, _, s in entries if m == n)))
    problems = {(p.name, p.what) for p in inspect_mllm(tmp_path / "bad.mllm", runtime=runtime).problems}
    assert ("model.layers.0.mlp.up_proj.weight", "dtype float16, expected q4_0 or q8_0") in problems


def rows(*items):
    return [{"candidate": c, "file_bytes": b, "perplexity_increase": p} for c, b, p in items]


def test_auto_takes_the_smallest_file_within_the_budget():
    evaluated = rows(("prefill:q4_0", 90, 0.72), ("unrotated:q4_0i-head8", 100, 0.08),
                     ("unrotated:q4_0i-down8-head8", 110, 0.05), ("prefill:q8_0", 170, 0.001))
    name, why = choose_candidate(evaluated, "auto", 0.10)
    assert name == "unrotated:q4_0i-head8" and "smallest file" in why and "3 of 4 candidates" in why
    assert choose_candidate(evaluated, "auto", 0.06)[0] == "unrotated:q4_0i-down8-head8"
    # On equal sizes the lower increase wins.
    assert choose_candidate(rows(("a", 1, 0.05), ("b", 1, 0.02)), "auto", 0.1)[0] == "b"


def test_with_none_within_the_budget_auto_takes_the_most_accurate_and_says_so():
    name, why = choose_candidate(rows(("prefill:q4_0", 90, 0.72), ("prefill:q4_0i-head8", 100, 0.46)), "auto", 0.10)
    assert name == "prefill:q4_0i-head8"
    assert why.startswith("no candidate is within the budget of +10.0%") and "the most accurate" in why


def test_a_named_choice_is_taken_whatever_its_quality():
    evaluated = rows(("prefill:q4_0", 90, 0.72), ("prefill:q8_0", 170, 0.001))
    name, why = choose_candidate(evaluated, "prefill:q4_0", 0.10)
    assert name == "prefill:q4_0" and "not within the budget" in why
    with pytest.raises(PipelineError, match="was not evaluated"):
        choose_candidate(evaluated, "unrotated:q8_0", 0.10)


def test_the_choice_writes_the_table_and_copies_the_chosen_file(tmp_path):
    names = ["prefill:q4_0", "prefill:q8_0"]
    jsons, models = [], []
    for name, size, increase in (("prefill:q4_0", 90, 0.72), ("prefill:q8_0", 170, 0.001)):
        recipe = name.split(":")[1]
        metrics = {k: 1.0 for k in ("perplexity", "kl", "agreement")}
        metrics.update({f"{k}_ci_{s}": 1.0 for k in ("perplexity", "kl", "agreement", "perplexity_increase")
                        for s in ("low", "high")})
        data = {"candidate": name, "source": "prefill", "recipe": recipe, "recipe_description": RECIPES[recipe],
                "source_description": "the prefill variant", "manifest": "m.json", "prefill_manifest": "m.json",
                "file_bytes": size, "dtype_mix": recipe, "bytes_by_dtype": {}, "tensors_by_dtype": {recipe: 3},
                "dtypes": {"w": recipe}, "perplexity_increase": increase, "num_samples": 4, "num_tokens": 40,
                "per_record": {"nll_sum": [1.0]}, **metrics}
        (tmp_path / f"{recipe}.json").write_text(json.dumps(data))
        (tmp_path / f"{recipe}.mllm").write_bytes(recipe.encode() * size)
        jsons.append(tmp_path / f"{recipe}.json")
        models.append(tmp_path / f"{recipe}.mllm")
    out = choose_decode_model(jsons, models, names, tmp_path / "c.csv", tmp_path / "c.html", tmp_path / "choice.json",
                              tmp_path / "bundle" / "decode.mllm", choice="auto", budget=0.10)
    assert out["chosen"] == "prefill:q8_0" and (tmp_path / "bundle/decode.mllm").read_bytes() == models[1].read_bytes()
    table = list(csv.DictReader((tmp_path / "c.csv").open()))
    assert [r["candidate"] for r in table] == names
    assert [(r["within_budget"], r["chosen"]) for r in table] == [("False", "False"), ("True", "True")]
    choice = json.loads((tmp_path / "choice.json").read_text())
    assert choice["manifest"] == "m.json" and choice["metrics"]["perplexity_increase"] == 0.001
    assert choice["dtypes"] == {"w": "q8_0"} and "prefill:q8_0" in (tmp_path / "c.html").read_text()
    with pytest.raises(PipelineError, match="q8_0.json: not the evaluation of decoding candidate prefill:q4_0"):
        choose_decode_model(jsons[::-1], models, names, tmp_path / "c.csv", tmp_path / "c.html",
                            tmp_path / "choice.json", tmp_path / "bundle" / "decode.mllm")
