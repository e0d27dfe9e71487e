"""The whole check of a phone bundle that a workflow run built: every file, read back by mllm's loader
(re-implemented in C++), the tokenizer check, the decoding candidates and the choice, the decoding model's
quality and the bundle inspection. The whole-workflow test of the tiny LLaMA model (test_workflow.py) runs it
on top of its run, so the pipeline does not run twice for it."""

from __future__ import annotations

import contextlib
import csv
import io
import json
from pathlib import Path

from shadowquant.cli import inspect_command as inspect_main
from shadowquant.config import schema
from shadowquant.decoding.candidates import file_dtype_of
from shadowquant.export.mllm import DTYPE_NAMES, DTYPE_Q4_0, DTYPE_Q8_0, read_mllm, write_mllm_v1_encoded
from shadowquant.runtimes.profiles import decode_loaded_tensors, get_profile, loaded_tensors
from mllm_loader_helpers import fnv1a64, run_native_loader

DEFAULT_CANDIDATES = schema()["properties"]["bundle"]["properties"]["decode"]["properties"]["candidates"]["default"]


def check_bundle(tmp_path, name: str, native_loader, candidates=DEFAULT_CANDIDATES):
    """Check every part of the bundle a run in `tmp_path` built (target 'bundle'; `candidates`: its
    bundle.decode.candidates)."""
    bundle = tmp_path / f"results/{name}/bundle"
    files = sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file())
    assert files == sorted(["prefill-int8.mllm", "decode.mllm", "vocab.mllm", "merges.txt", "runtime.json",
                            "README.txt", "cpp/shadowquant_demo.cpp", "cpp/shadowquant_tokenizer.hpp",
                            "cpp/CMakeLists.txt"])
    check = json.loads((tmp_path / f"results/{name}/bundle_check.json").read_text())
    assert check["inspection"]["ok"], check["inspection"]["problems"]
    assert set(check["sizes"]) == set(files) and check["total_bytes"] == sum(check["sizes"].values())

    # The tokenizer files give the Hugging Face ids on every held-out paragraph.
    tokens = check["tokenizer_check"]
    assert tokens["texts"] > 150 and tokens["all_merges"]["identical"] == tokens["texts"]
    assert 0 <= tokens["mllm_v1_tokenizer"]["identical"] <= tokens["texts"]
    assert tokens["demo_tokenizer"]["identical"] == tokens["texts"]  # the C++ demo's tokenizer (its Python twin)

    # The decoding model's quality, paired with float, with intervals.
    decode = check["decoding_model"]
    for key in ("perplexity", "kl", "agreement", "perplexity_increase"):
        assert decode[f"{key}_ci_low"] <= decode[key] <= decode[f"{key}_ci_high"]
    assert decode["num_samples"] == check["float"]["num_samples"]

    # Every candidate evaluated, one chosen, its file the bundle's decode.mllm (the candidates' files are
    # temporary), the choice's reason and per-tensor dtypes beside it.
    results = tmp_path / f"results/{name}"
    table = list(csv.DictReader((results / "decode_candidates.csv").open()))
    choice = json.loads((results / "decode_choice.json").read_text())
    assert [row["candidate"] for row in table] == [c["candidate"] for c in check["decoding_candidates"]]
    assert [row["candidate"] for row in table] == list(candidates)
    assert [row["candidate"] for row in table if row["chosen"] == "True"] == [choice["chosen"]] == [decode["candidate"]]
    assert all(row["within_budget"] == str(float(row["perplexity_increase"]) <= 0.10) for row in table)
    assert choice["why"] and choice["file_bytes"] == (bundle / "decode.mllm").stat().st_size
    assert int(next(r for r in table if r["chosen"] == "True")["file_bytes"]) == choice["file_bytes"]
    assert not list((results / "decode_candidates").rglob("*.mllm"))
    assert (tmp_path / choice["manifest"]).is_file() or Path(choice["manifest"]).is_file()

    # mllm's loader: every tensor the C++ model allocates is there with the allocated size, and every
    # tensor's bytes are what our reader (and the export) hold.
    runtime = json.loads((bundle / "runtime.json").read_text())
    expected = loaded_tensors(get_profile(runtime["runtime"]), runtime["cpp_config"], runtime["shadow_layers"])
    tensors, index, statuses = run_native_loader(native_loader, bundle / "prefill-int8.mllm", expected, tmp_path)
    assert set(statuses.values()) == {"ok"} and len(statuses) == len(expected)
    prefill = read_mllm(bundle / "prefill-int8.mllm")
    assert index[0] == index[1] == len(prefill.names) and index[2] == index[3]
    for name in prefill.names:
        assert tensors[name]["hash"] == fnv1a64(prefill.read_raw(name)), name
        assert tensors[name]["dtype"] == prefill.entry(name).dtype and tensors[name]["misaligned"] == 0
    # The CPU decoding model (QWenForCausalLM) loads q/k/v biases whatever the model: zero ones for LLaMA.
    decode_expected = decode_loaded_tensors(get_profile(runtime["runtime"]), runtime["cpp_config"],
                                            file_dtype_of(read_mllm(bundle / "decode.mllm")))
    decode_tensors, _, statuses = run_native_loader(native_loader, bundle / "decode.mllm", decode_expected,
                                                    tmp_path)
    assert set(statuses.values()) == {"ok"} and len(statuses) == len(decode_expected)
    assert any(name.endswith("q_proj.bias") for name in decode_expected)
    decode_file = read_mllm(bundle / "decode.mllm")
    assert sorted(decode_tensors) == sorted(decode_file.names)
    for name in decode_file.names:
        assert decode_tensors[name]["hash"] == fnv1a64(decode_file.read_raw(name)), name
    linear = [n for n in prefill.names if n.endswith("_proj.weight")]
    assert linear and all(DTYPE_NAMES[decode_file.entry(n).dtype] == choice["dtypes"][n] for n in linear)
    assert {decode_file.entry(n).dtype for n in linear} <= {DTYPE_Q4_0, DTYPE_Q8_0}
    assert runtime["bundle"]["decoding_candidate"] == choice["chosen"]
    assert runtime["bundle"]["decoding_dtype"] == choice["dtype_mix"]

    # The README names the demo command with the bundle's own files; runtime.json records the files.
    readme = (bundle / "README.txt").read_text()
    assert "--model decode.mllm --qnn-model prefill-int8.mllm" in readme and "--mode cpu" in readme
    assert f"decoding model {choice['chosen']} ({choice['dtype_mix']}" in readme and "chosen: " in readme
    assert "add_subdirectory(shadowquant)" in readme
    # Its headline: what a generation gets (NPU prefill, then this decoding model), from the demo evaluation.
    generation = json.loads((results / "demo_evaluation.json").read_text())
    assert generation["setup"]["decode_model"].endswith("bundle/decode.mllm")
    quality = runtime["bundle"]["generation_quality"]
    for key, label in (("demo", "NPU prefill + CPU decoding:"), ("prefill_only", "NPU prefill model alone:"),
                       ("decode_only", "CPU decoding model alone:")):
        m = generation[key]
        assert quality[key]["perplexity"] == m["perplexity"] and quality[key]["num_tokens"] == m["num_tokens"]
        assert m["perplexity_increase_ci_low"] <= m["perplexity_increase"] <= m["perplexity_increase_ci_high"]
        assert f"{label:<28} perplexity {m['perplexity']:.3f} ({m['perplexity_increase']:+.1%}" in readme
    assert readme.index("NPU prefill + CPU decoding:") < readme.index(f"decoding model {choice['chosen']}")
    demo = (bundle / "cpp/shadowquant_demo.cpp").read_text()
    assert "c.shadow_layers = {" + ", ".join(str(i) for i in runtime["shadow_layers"]) + "};" in demo
    assert runtime["bundle"]["files"]["decode.mllm"]["bytes"] == (bundle / "decode.mllm").stat().st_size

    # The inspector checks the whole folder, and catches a runtime.json that disagrees with the clip flags
    # and a decoding model without the q/k/v biases its C++ model loads.
    assert inspect_main([str(bundle)]) == 0
    original = (bundle / "decode.mllm").read_bytes()
    kept = [(e.name, e.dtype, e.size) for e in decode_file.entries if not e.name.endswith("_proj.bias")]
    write_mllm_v1_encoded(bundle / "decode.mllm", kept, decode_file.read_raw)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert inspect_main([str(bundle)]) == 1
    assert "decode.mllm: no model.layers.0.self_attn.q_proj.bias" in printed.getvalue()
    (bundle / "decode.mllm").write_bytes(original)
    saved = (bundle / "runtime.json").read_bytes()
    wrong = sorted(set(range(runtime["cpp_config"]["num_hidden_layers"])) - set(runtime["shadow_layers"]))[:1]
    runtime["shadow_layers"] = wrong
    (bundle / "runtime.json").write_text(json.dumps(runtime))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert inspect_main([str(bundle)]) == 1
    assert f"runtime.json's shadow layers are {wrong}" in printed.getvalue()
    (bundle / "runtime.json").write_bytes(saved)
    return check
