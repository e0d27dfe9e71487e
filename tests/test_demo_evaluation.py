"""The demo evaluation: records split as mllm's NPU demo runs them (int8 prefill, KV handover, CPU decode)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from shadowquant import stages

from shadowquant.evaluate import sweep
from shadowquant.cli import main as cli_main
from shadowquant.decoding.cpu_numerics import mllm_cpu_numerics
from shadowquant.decoding.candidates import write_decode_model
from shadowquant.evaluate.demo_evaluation import (MODELS, _with_cache, chunk_size_of, decode_manifest_of, demo_logits,
                                         demo_batch_logits, evaluate_demo, hand_over, load_decoding_model, paired_differences, run_chunks,
                                         score_records, summarize_all, whole_record_logits)
from shadowquant.errors import PipelineError
from shadowquant.evaluate.metrics import evaluate, output_head, per_record, prefill_length
from shadowquant.model.loading import load_model_from_manifest


@pytest.fixture(scope="module")
def run(tmp_path_factory, profiled_tiny_llama, tiny_text_corpus):
    """A tiny llama with its qwen-npu export (every down_proj shadowed), runtime.json, float baseline on 6
    held-out records and a Q4_0 decoding model of the same weights."""
    d = profiled_tiny_llama(tmp_path_factory.mktemp("demo"))
    manifest = d / "model" / "manifest.json"
    stages.select_samples(tiny_text_corpus, d / "eval.jsonl", 6, offset=8)
    stages.export(manifest, d / "act.json", d / "export.safetensors", point="absmax-t1", runtime="qwen-npu",
                  runtime_scales=d / "rs.json", runtime_json=d / "runtime.json", shadow_json=d / "shadow.json")
    runtime = json.loads((d / "runtime.json").read_text())
    runtime["chunk_size"] = 5  # several chunks per prefill at seq_len 24
    (d / "runtime.json").write_text(json.dumps(runtime))
    sweep.evaluate_float(manifest, d / "eval.jsonl", d / "float.json", d / "base.safetensors", seq_len=24)
    model, _, _ = load_model_from_manifest(manifest, "cpu", "float32")
    write_decode_model(model.state_dict(), d / "decode.mllm")
    return d


@pytest.fixture(scope="module")
def float_model(run):
    model, tokenizer, _ = load_model_from_manifest(run / "model" / "manifest.json", "cpu", "float32")
    sequences = sweep.evaluation_sequences(tokenizer, run / "eval.jsonl", 24)
    return model, sequences


def _demo(run, tmp_path, **kwargs):
    return evaluate_demo(run / "model" / "manifest.json", run / "export.safetensors", run / "runtime.json",
                         run / "eval.jsonl", run / "decode.mllm", tmp_path / "demo.json", tmp_path / "demo.md",
                         seq_len=24, device="cpu", num_resamples=200, **kwargs)


def test_split_handover_with_the_same_float_model_reproduces_the_single_model_evaluation(float_model):
    """Prefill and decode by one float model, cache handed over unrounded: the continuation's NLL plus the
    prefix's (metrics.evaluate on the first p tokens) is metrics.evaluate's NLL of the whole record."""
    model, sequences = float_model
    results = score_records(None, model, copy.deepcopy(model), sequences, chunk_size=3, handover="float32",
                            progress=False)
    whole = evaluate(model, sequences, batch_size=1)
    prefix = evaluate(model, [s[:prefill_length(len(s))] for s in sequences], batch_size=1)
    demo = results["demo"]
    for i, seq in enumerate(sequences):
        assert demo.num_tokens[i] == len(seq) - prefill_length(len(seq))
        assert prefix.nll_sum[i] + demo.nll_sum[i] == pytest.approx(whole.nll_sum[i], rel=1e-6)
        assert demo.kl_sum[i] == pytest.approx(0.0, abs=1e-6) and demo.agreement_count[i] == demo.num_tokens[i]
    # and per position: the demo's logits are the single model's
    ids = max(sequences, key=len)
    out = demo_logits(model, copy.deepcopy(model), ids, chunk_size=4, handover="float32")
    assert torch.allclose(out["demo"], whole_record_logits(model, ids, out["prefill_length"]), atol=1e-5)


def test_float16_handover_stays_within_float16_rounding(float_model):
    """Rounding the handed-over K/V to float16 moves the continuation's logits by float16 rounding only."""
    model, sequences = float_model
    ids = max(sequences, key=len)
    exact = demo_logits(model, copy.deepcopy(model), ids, chunk_size=4, handover="float32")["demo"]
    half = demo_logits(model, copy.deepcopy(model), ids, chunk_size=4, handover="float16")["demo"]
    assert not torch.equal(exact[1:], half[1:])  # the rounding is visible after the prefill's own position
    assert torch.equal(exact[0], half[0])  # the first token comes from the prefill model itself
    assert torch.allclose(exact, half, rtol=0, atol=4e-3 * float(exact.abs().max()))
    results = score_records(None, model, copy.deepcopy(model), sequences, chunk_size=4, progress=False)
    assert sum(results["demo"].kl_sum) / sum(results["demo"].num_tokens) < 1e-5


def test_a_batch_of_one_length_gives_each_records_own_logits(float_model):
    """Records of one length run together (no padding): each row is the record run alone, to float rounding,
    for the demo and the prefill model's own continuation; and score_records' batches change no sum."""
    model, sequences = float_model
    n = min(len(s) for s in sequences)
    batch = [s[:n] for s in sequences[:4]]
    decoder = copy.deepcopy(model)
    together = demo_batch_logits(model, decoder, batch, chunk_size=4)
    assert together["demo"].shape[:2] == (4, n - together["prefill_length"])
    for row, ids in enumerate(batch):
        alone = demo_logits(model, decoder, ids, chunk_size=4)
        for key in ("demo", "prefill_only"):
            assert torch.allclose(together[key][row], alone[key], atol=1e-5), key
    one, eight = (score_records(None, model, decoder, sequences, chunk_size=4, progress=False, batch_size=b)
                  for b in (1, 8))
    for name in one:
        assert one[name].num_tokens == eight[name].num_tokens
        assert one[name].nll_sum == pytest.approx(eight[name].nll_sum, rel=1e-5)
    with pytest.raises(PipelineError, match="records of one length"):
        demo_batch_logits(model, decoder, [batch[0], batch[1][:-1]], chunk_size=4)


def test_handover_rounds_keys_and_values_to_float16(float_model):
    model, sequences = float_model
    _, cache = run_chunks(model, torch.tensor([sequences[0][:7]]), chunk_size=3)
    handed = hand_over(cache)
    for key, value in ((layer.keys, layer.values) for layer in handed.layers):
        assert key.dtype == torch.float32 and key.shape[-2] == 7
        assert torch.equal(key, key.half().float()) and torch.equal(value, value.half().float())


def test_teacher_forced_decode_equals_token_by_token_under_cpu_numerics(float_model):
    """One forward over the continuation with the handed-over cache is the token-by-token decode: to float32
    rounding under float16 K/V; with Q8_0 activations too, but where float32 rounding moves a value across a
    Q8_0 rounding boundary one code (of 254 per block) changes and that position moves by about a step."""
    model, sequences = float_model
    ids = torch.tensor([max(sequences, key=len)])
    decoder = copy.deepcopy(model)
    _, cache = run_chunks(model, ids[:, :8], chunk_size=3)
    for formats, exact in (({}, True), (None, False)):
        with torch.no_grad(), mllm_cpu_numerics(decoder, formats):
            forced = decoder(input_ids=ids[:, 8:14], **_with_cache(decoder, hand_over(cache))).logits[0]
            stepwise, step_cache = [], hand_over(cache)
            for t in range(8, 14):
                out = decoder(input_ids=ids[:, t:t + 1], **_with_cache(decoder, step_cache))
                stepwise.append(out.logits[0, -1])
        error = (forced - torch.stack(stepwise)).abs().amax(-1)
        if exact:
            assert (error <= 1e-5).all()
        else:
            assert (error <= 1e-5).sum() >= 4 and (error <= 2e-2 * float(forced.abs().max())).all()


def test_chunked_npu_prefill_equals_one_chunk(run):
    """The simulated NPU model (float16 CPU attention) continues its cache chunk by chunk as one pass would."""
    from safetensors.torch import load_file

    from shadowquant.model.families import quantized_layer_names
    from shadowquant.runtimes.profiles import get_profile
    from shadowquant.runtimes.runtime_linear import apply_runtime_from_export

    model, tokenizer, family = load_model_from_manifest(run / "model" / "manifest.json", "cpu", "float32")
    apply_runtime_from_export(model, load_file(str(run / "export.safetensors")), quantized_layer_names(model, family),
                              get_profile("qwen-npu", family), {0, 1})
    ids = torch.tensor([sweep.evaluation_sequences(tokenizer, run / "eval.jsonl", 24)[0]])
    chunked, _ = run_chunks(model, ids, chunk_size=5)
    whole, _ = run_chunks(model, ids, chunk_size=100)
    assert torch.allclose(chunked, whole, atol=1e-4)
    with torch.no_grad():
        assert torch.allclose(whole, model(ids).logits[0], atol=1e-4)


def test_evaluate_demo_writes_paired_summaries(run, tmp_path):
    """Four models on the same continuation tokens, intervals around each value, paired with float; the
    float baseline file gives what the float model's own forward gives."""
    result = _demo(run, tmp_path, baseline=run / "base.safetensors")
    written = json.loads((tmp_path / "demo.json").read_text())
    assert written["setup"]["chunk_size"] == 5 and written["setup"]["handover"] == "float16"
    tokens = {m: result[m]["num_tokens"] for m in MODELS}
    assert len(set(tokens.values())) == 1
    counts = result["float"]["per_record"]["num_tokens"]
    assert all(result[m]["per_record"]["num_tokens"] == counts for m in MODELS)
    assert result["float"]["perplexity_increase"] == 0.0 and result["float"]["kl"] == 0.0
    for m in MODELS[1:]:
        r = result[m]
        for key in ("perplexity", "kl", "agreement", "perplexity_increase"):
            assert r[f"{key}_ci_low"] <= r[key] <= r[f"{key}_ci_high"], (m, key)
        assert r["perplexity_increase"] == pytest.approx(r["perplexity"] / result["float"]["perplexity"] - 1)
    assert set(result["differences"]) == {"demo_vs_prefill_only", "demo_vs_decode_only"}
    text = (tmp_path / "demo.md").read_text()
    assert "| perplexity |" in text and "demo vs" in text and f"{result['float']['num_tokens']} continuation" in text
    again = _demo(run, tmp_path)  # the float model's forward instead of the baseline
    for m in MODELS:
        assert again[m]["perplexity"] == pytest.approx(result[m]["perplexity"], rel=1e-6)
        assert again[m]["kl"] == pytest.approx(result[m]["kl"], rel=1e-3, abs=1e-8)
        assert again[m]["agreement"] == result[m]["agreement"]


@pytest.fixture(scope="module")
def single_files(run, tmp_path_factory):
    """What the workflow writes before the demo: evaluation.json with the NPU model's per-record sums
    (`w8a8_per_record`, as the sweep evaluates it: batched, against the float baseline) and decode_choice.json
    with the decoding model's (as its candidate evaluation does, under mllm's CPU numerics)."""
    from safetensors.torch import load_file

    from shadowquant.model.families import quantized_layer_names
    from shadowquant.runtimes.profiles import get_profile
    from shadowquant.runtimes.runtime_linear import apply_runtime_from_export

    d = tmp_path_factory.mktemp("singles")
    manifest = run / "model" / "manifest.json"
    model, tokenizer, family = load_model_from_manifest(manifest, "cpu", "float32")
    sequences = sweep.evaluation_sequences(tokenizer, run / "eval.jsonl", 24)
    float_head = copy.deepcopy(output_head(model))  # the decoding file's head is not the float one
    apply_runtime_from_export(model, load_file(str(run / "export.safetensors")), quantized_layer_names(model, family),
                              get_profile("qwen-npu", family), {0, 1})
    prefill = evaluate(model, sequences, batch_size=4, baseline=run / "base.safetensors", float_head=float_head)
    (d / "evaluation.json").write_text(json.dumps({"w8a8_per_record": per_record(prefill)}))
    decoder, formats = load_decoding_model(manifest, run / "decode.mllm", "cpu")
    with mllm_cpu_numerics(decoder, formats):
        decode = evaluate(decoder, sequences, batch_size=4, baseline=run / "base.safetensors", float_head=float_head)
    (d / "decode_choice.json").write_text(json.dumps({"manifest": str(manifest), "prefill_manifest": str(manifest),
                                                      "chosen": "prefill:q4_0", "per_record": per_record(decode)}))
    return d


def test_decode_choice_names_the_decoding_models_manifest(run, single_files, tmp_path):
    manifest = str(run / "model" / "manifest.json")
    choice = single_files / "decode_choice.json"
    assert decode_manifest_of(choice, manifest) == manifest
    assert decode_manifest_of(None, manifest) == manifest
    result = _demo(run, tmp_path, decode_choice=choice, records=2)
    assert result["setup"]["decode_manifest"] == manifest and result["float"]["num_samples"] == 2
    assert result["setup"]["decode_candidate"] == "prefill:q4_0"
    assert result["setup"]["decode_only_from"] == str(choice) and result["setup"]["prefill_only_from"] == "this evaluation"


def test_single_models_from_their_own_evaluations_equal_the_demos_own_run(run, single_files, tmp_path):
    """The prefill-only and decode-only sums read from evaluation.json and decode_choice.json (batched forwards,
    metrics.evaluate's continuation sums) are what the demo computes itself one record at a time, up to float
    rounding; the demo column is the same computation either way."""
    base = run / "base.safetensors"
    computed = _demo(run, tmp_path, baseline=base)
    reused = _demo(run, tmp_path, baseline=base, prefill_json=single_files / "evaluation.json",
                   decode_choice=single_files / "decode_choice.json")
    assert reused["setup"]["prefill_only_from"].endswith("evaluation.json")
    assert reused["demo"]["per_record"] == computed["demo"]["per_record"]
    for m in ("prefill_only", "decode_only"):
        a, b = reused[m]["per_record"], computed[m]["per_record"]
        assert a["num_tokens"] == b["num_tokens"] and a["last_token_correct"] == b["last_token_correct"]
        assert a["nll_sum"] == pytest.approx(b["nll_sum"], rel=1e-4)
        assert a["kl_sum"] == pytest.approx(b["kl_sum"], rel=2e-2, abs=1e-5)
        # an argmax may flip where two logits tie to float rounding: at most one position per record
        assert all(abs(x - y) <= 1 for x, y in zip(a["agreement_count"], b["agreement_count"]))
    assert reused["differences"]["demo_vs_decode_only"]["perplexity_ratio"]["value"] == pytest.approx(
        computed["differences"]["demo_vs_decode_only"]["perplexity_ratio"]["value"], abs=1e-4)


def test_paired_differences_resample_the_same_records(float_model):
    model, sequences = float_model
    results = score_records(None, model, copy.deepcopy(model), sequences, chunk_size=4, progress=False)
    summary = summarize_all(results, num_resamples=100)
    same = paired_differences(results["demo"], results["demo"], 100)
    assert all(v == {"value": 0.0, "ci_low": 0.0, "ci_high": 0.0} for v in same.values())
    diff = summary["differences"]["demo_vs_decode_only"]["kl"]
    assert diff["value"] == pytest.approx(summary["demo"]["kl"] - summary["decode_only"]["kl"])
    assert diff["ci_low"] <= diff["value"] <= diff["ci_high"]
    shorter = copy.deepcopy(results["demo"])
    shorter.num_tokens[0] += 1
    with pytest.raises(PipelineError, match="same records"):
        paired_differences(results["demo"], shorter)


def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_bad_inputs_give_one_line_errors(run, tmp_path, float_model):
    model, _ = float_model
    manifest = run / "model" / "manifest.json"
    with pytest.raises(PipelineError, match="no decoding-model choice") as e:
        decode_manifest_of(tmp_path / "decode_choice.json", manifest)
    _one_line(e)
    (tmp_path / "no_key.json").write_text(json.dumps({"candidate": "q4_0"}))
    with pytest.raises(PipelineError, match="has no 'manifest'") as e:
        decode_manifest_of(tmp_path / "no_key.json", manifest)
    _one_line(e)
    (tmp_path / "other.json").write_text(json.dumps({"manifest": str(manifest), "prefill_manifest": str(run)}))
    with pytest.raises(PipelineError, match="chosen for the prefill model") as e:
        decode_manifest_of(tmp_path / "other.json", manifest)
    _one_line(e)
    with pytest.raises(PipelineError, match="at least 2 tokens") as e:
        prefill_length(1)
    _one_line(e)
    with pytest.raises(PipelineError, match="record 1 has 1 token") as e:
        score_records(None, model, model, [[1, 2, 3], [4]], chunk_size=2, progress=False)
    _one_line(e)
    for fraction in (0.0, 1.0):
        with pytest.raises(PipelineError, match="strictly between 0 and 1"):
            prefill_length(10, fraction)
    with pytest.raises(PipelineError, match="unknown handover"):
        demo_logits(model, model, [1, 2, 3], 2, handover="bfloat16")
    with pytest.raises(PipelineError, match="unknown single model"):
        score_records(None, model, model, [[1, 2, 3]], chunk_size=2, progress=False, singles=["float"])
    # single-model sums without continuation sums, or of other records, are refused by name
    (tmp_path / "old.json").write_text(json.dumps({"w8a8_per_record": {"nll_sum": [1.0], "num_tokens": [3]}}))
    with pytest.raises(PipelineError, match="no continuation sums") as e:
        _demo(run, tmp_path, prefill_json=tmp_path / "old.json", records=1)
    _one_line(e)
    (tmp_path / "short.json").write_text(json.dumps({"w8a8_per_record": {"continuation": {
        "prefill_fraction": 0.5, "last_token_correct": [True], "nll_sum": [1.0], "num_tokens": [3], "kl_sum": [0.1],
        "agreement_count": [2]}}}))
    with pytest.raises(PipelineError, match="other records") as e:
        _demo(run, tmp_path, prefill_json=tmp_path / "short.json", records=1)
    _one_line(e)
    (tmp_path / "runtime.json").write_text(json.dumps({"runtime": "qwen-npu"}))
    with pytest.raises(PipelineError, match="chunk_size None") as e:
        chunk_size_of(tmp_path / "runtime.json")
    _one_line(e)
    # the command line answers with the one line and exit status 1, before any model is loaded
    args = ["evaluate-demo", "--manifest", str(manifest), "--export", str(run / "export.safetensors"),
            "--runtime-json", str(run / "runtime.json"), "--samples", str(run / "eval.jsonl"),
            "--decode", str(run / "decode.mllm"), "--decode-choice", str(tmp_path / "missing.json"),
            "--out-json", str(tmp_path / "o.json"), "--out-md", str(tmp_path / "o.md")]
    assert cli_main(args) == 1
    assert not (tmp_path / "o.json").exists()


def test_prefill_length_is_half_within_bounds():
    assert [prefill_length(n) for n in (2, 3, 4, 5, 128)] == [1, 1, 2, 2, 64]
    assert prefill_length(10, 0.05) == 1 and prefill_length(10, 0.99) == 9
