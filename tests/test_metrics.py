"""Evaluation metrics against unbatched brute-force computations on tiny models, and the bootstrap intervals."""

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModelForCausalLM, Gemma2Config, LlamaConfig, OPTConfig

from shadowquant.evaluate import metrics
from shadowquant.runtimes.decision import LayerQuant
from shadowquant.errors import PipelineError
from shadowquant.runtimes.fakequant import apply_w8a8
from shadowquant.model.families import FAMILIES, quantized_layer_names
from shadowquant.evaluate.metrics import (
    EvalResult,
    bootstrap_intervals,
    continuation_from_per_record,
    evaluate,
    head_logits,
    load_baseline,
    per_record,
    prefill_length,
    result_from_per_record,
    save_baseline,
    summarize,
)

VOCAB = 128


def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB)
    return AutoModelForCausalLM.from_config(config).eval()


def tiny_opt():
    torch.manual_seed(0)
    config = OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
                       word_embed_proj_dim=32, max_position_embeddings=64)
    return AutoModelForCausalLM.from_config(config).eval()


def tiny_gemma2_softcapped():
    """Gemma-2 with a cap small enough that tanh bends the random logits noticeably."""
    torch.manual_seed(0)
    config = Gemma2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=8, vocab_size=VOCAB, final_logit_softcapping=0.5,
                          attn_implementation="eager")
    return AutoModelForCausalLM.from_config(config).eval()


def quantize(model, family, scale):
    names = quantized_layer_names(model, family)
    return apply_w8a8(model, {n: LayerQuant(scale, scale, True, True) for n in names}, names)


def unbatched_logits(model, seq):
    with torch.no_grad():
        return model(torch.tensor([seq])).logits[0].double()


def make_sequences(model, n=9, vocab=VOCAB):
    """Sequences of different lengths; every other one ends with the model's own prediction (a hit)."""
    g = torch.Generator().manual_seed(1)
    sequences = []
    for i in range(n):
        seq = torch.randint(0, vocab, (3 + 2 * i,), generator=g).tolist()
        if i % 2 == 0:
            seq[-1] = int(unbatched_logits(model, seq)[-2].argmax())
        sequences.append(seq)
    return sequences


def brute_force_kl_and_agreement(float_model, quant_model, sequences):
    """Full-vocabulary KL(float || quant) per position in float64, from unbatched forwards."""
    kl, agree, count = 0.0, 0, 0
    for seq in sequences:
        p = unbatched_logits(float_model, seq)[:-1].log_softmax(-1)
        q = unbatched_logits(quant_model, seq)[:-1].log_softmax(-1)
        kl += float((p.exp() * (p - q)).sum())
        agree += int((p.argmax(-1) == q.argmax(-1)).sum())
        count += len(seq) - 1
    return kl / count, agree / count


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


@pytest.fixture(scope="module")
def sequences(llama):
    return make_sequences(llama)


def load_family(tiny_model_dir, family):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir(family), dtype=torch.float32).eval()


# ---------------------------------------------------------------- evaluation


def test_accuracy_and_perplexity_match_manual_loop(llama, sequences):
    result = evaluate(llama, sequences, batch_size=4)
    correct, nll, count = [], 0.0, 0
    for seq in sequences:
        logits = unbatched_logits(llama, seq)
        correct.append(bool(logits[-2].argmax() == seq[-1]))
        logprobs = logits[:-1].log_softmax(-1)
        nll -= float(logprobs.gather(-1, torch.tensor(seq[1:])[:, None]).sum())
        count += len(seq) - 1
    assert result.last_token_correct == correct
    assert correct[0::2] == [True] * len(correct[0::2])  # the constructed hits
    assert result.num_tokens == [len(s) - 1 for s in sequences]
    summary = summarize(result)
    assert summary["accuracy"] == pytest.approx(sum(correct) / len(correct))
    assert summary["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert summary["num_samples"] == len(sequences) and summary["num_tokens"] == count
    assert summary["agreement"] is None and summary["kl"] is None and summary["perplexity_increase"] is None
    assert summary["kl_ci_low"] is None and summary["perplexity_increase_ci_high"] is None
    assert summary["perplexity_ci_low"] <= summary["perplexity"] <= summary["perplexity_ci_high"]


@pytest.mark.parametrize("make_model", [tiny_llama, tiny_opt])
def test_batched_equals_unbatched(make_model):
    model = make_model()
    sequences = make_sequences(model, n=7)
    one = evaluate(model, sequences, batch_size=1)
    many = evaluate(model, sequences, batch_size=3)
    assert one.last_token_correct == many.last_token_correct
    assert one.num_tokens == many.num_tokens
    torch.testing.assert_close(torch.tensor(many.nll_sum), torch.tensor(one.nll_sum), rtol=1e-5, atol=1e-5)


def test_recomputed_float_logits_equal_forward_logits(llama, sequences):
    baseline = evaluate(llama, sequences, batch_size=3, collect_baseline=True).baseline
    assert baseline.hidden.shape == (sum(len(s) - 1 for s in sequences), 32)
    assert baseline.hidden.dtype == torch.float32
    for seq, start in zip(sequences, baseline.offsets()):
        own = unbatched_logits(llama, seq)[:-1]
        hidden = baseline.hidden[start:start + len(seq) - 1]
        recomputed = head_logits(llama.get_output_embeddings(), hidden, None).double()
        torch.testing.assert_close(recomputed, own, rtol=1e-5, atol=1e-5)
        assert torch.equal(baseline.argmax[start:start + len(seq) - 1], own.argmax(-1))


def check_float_against_own_baseline(model, sequences, tmp_path):
    path = tmp_path / "baseline.safetensors"
    save_baseline(path, evaluate(model, sequences, batch_size=3, collect_baseline=True).baseline)
    summary = summarize(evaluate(model, sequences, batch_size=2, baseline=path))
    assert summary["agreement"] == 1.0
    assert summary["kl"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_float_against_own_baseline_every_family(family, tiny_model_dir, tmp_path):
    model = load_family(tiny_model_dir, family)
    check_float_against_own_baseline(model, make_sequences(model, n=5), tmp_path)


def test_float_against_own_baseline_with_softcap(tmp_path):
    model = tiny_gemma2_softcapped()
    assert metrics.final_logit_softcap(model) == 0.5
    check_float_against_own_baseline(model, make_sequences(model, n=5), tmp_path)


class ScaledLogits(nn.Module):
    """A model that multiplies its logits after lm_head, a post-processing the exact KL does not know."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def get_output_embeddings(self):
        return self.model.get_output_embeddings()

    def forward(self, **kwargs):
        output = self.model(**kwargs)
        output.logits = output.logits * 2.0
        return output


def test_unknown_logit_post_processing_is_refused(llama, sequences):
    with pytest.raises(PipelineError, match="post-processes its logits") as info:
        evaluate(ScaledLogits(llama), sequences, collect_baseline=True)
    assert "\n" not in str(info.value)


def test_exact_kl_brute_force_random_logits(monkeypatch):
    g = torch.Generator().manual_seed(3)
    float_logits = torch.randn(37, 50, generator=g) * 4
    unrelated = torch.randn(37, 50, generator=g) * 4
    close = float_logits + 0.01 * torch.randn(37, 50, generator=g)  # KL ~ 5e-5: the small-KL regime
    monkeypatch.setattr(metrics, "_KL_CHUNK_ELEMENTS", 500)  # 10 positions per chunk: 4 chunks
    # Far apart: relative 1e-5. Close: an absolute 1e-9 per position is 1e-4 of a KL of 1e-5.
    for quant_logits, rtol, atol in ((unrelated, 1e-5, 0.0), (close, 1e-4, 1e-9)):
        p = torch.softmax(float_logits.double(), -1)
        q = torch.softmax(quant_logits.double(), -1)
        expected = (p * (p.log() - q.log())).sum(-1)
        got = metrics.exact_kl(float_logits, quant_logits)
        assert got.dtype == torch.float64 and got.shape == (37,)
        torch.testing.assert_close(got, expected, rtol=rtol, atol=atol)
        assert float(expected.mean()) > 1e-5  # far from the trivial answer


def test_head_logits_applies_softcap():
    head = nn.Linear(16, 50)
    hidden = torch.randn(7, 16, generator=torch.Generator().manual_seed(4)) * 3
    with torch.no_grad():
        plain = head(hidden)
    assert torch.equal(head_logits(head, hidden, None), plain)
    torch.testing.assert_close(head_logits(head, hidden, 2.0), 2.0 * torch.tanh(plain / 2.0))
    assert float(plain.abs().max()) > 4.0  # the cap bends these logits


@pytest.mark.parametrize("family", ["llama", "phi"])
def test_quantized_kl_and_agreement_brute_force(family, tiny_model_dir, tmp_path):
    float_model = load_family(tiny_model_dir, family)
    quant_model = quantize(load_family(tiny_model_dir, family), family, 0.05)
    sequences = make_sequences(float_model, n=7, vocab=float_model.config.vocab_size)
    exact_kl, exact_agreement = brute_force_kl_and_agreement(float_model, quant_model, sequences)
    assert exact_kl > 1e-3 and exact_agreement < 1.0

    path = tmp_path / "baseline.safetensors"
    float_result = evaluate(float_model, sequences, batch_size=3, collect_baseline=True)
    save_baseline(path, float_result.baseline)
    quant_result = evaluate(quant_model, sequences, batch_size=4, baseline=path)
    summary = summarize(quant_result, float_result)
    assert summary["kl"] == pytest.approx(exact_kl, rel=1e-4)
    assert summary["agreement"] == pytest.approx(exact_agreement)
    # The float head passed explicitly is the same module values: the same answer.
    explicit = evaluate(quant_model, sequences, batch_size=4, baseline=path,
                        float_head=float_model.get_output_embeddings())
    assert explicit.kl_sum == pytest.approx(quant_result.kl_sum, rel=1e-6)
    ppl_ratio = summary["perplexity"] / summarize(float_result)["perplexity"]
    assert summary["perplexity_increase"] == pytest.approx(ppl_ratio - 1, rel=1e-9)


def test_continuation_sums_are_the_sums_after_the_demos_prefill(tiny_model_dir, tmp_path):
    """Each record's continuation sums (the tokens after prefill_length) are its per-position NLL, KL and
    agreement summed over those positions only, from unbatched forwards; they survive the JSON round trip."""
    float_model = load_family(tiny_model_dir, "llama")
    quant_model = quantize(load_family(tiny_model_dir, "llama"), "llama", 0.05)
    sequences = make_sequences(float_model, n=7, vocab=float_model.config.vocab_size)
    path = tmp_path / "baseline.safetensors"
    save_baseline(path, evaluate(float_model, sequences, batch_size=3, collect_baseline=True).baseline)
    result = evaluate(quant_model, sequences, batch_size=4, baseline=path)
    tail = result.continuation
    for i, seq in enumerate(sequences):
        start = prefill_length(len(seq)) - 1
        p = unbatched_logits(float_model, seq)[:-1].log_softmax(-1)[start:]
        q = unbatched_logits(quant_model, seq)[:-1].log_softmax(-1)[start:]
        nll = -float(q.gather(-1, torch.tensor(seq[start + 1:])[:, None]).sum())
        assert tail.num_tokens[i] == len(seq) - prefill_length(len(seq)) == len(seq) - 1 - start
        assert tail.nll_sum[i] == pytest.approx(nll, rel=1e-5)
        assert tail.kl_sum[i] == pytest.approx(float((p.exp() * (p - q)).sum()), rel=1e-3, abs=1e-7)
        assert tail.agreement_count[i] == int((p.argmax(-1) == q.argmax(-1)).sum())
        assert tail.last_token_correct[i] == result.last_token_correct[i]
    assert sum(tail.num_tokens) < sum(result.num_tokens)
    data = json.loads(json.dumps(per_record(result)))
    back = continuation_from_per_record(data, "point.json")
    assert back.nll_sum == tail.nll_sum and back.agreement_count == tail.agreement_count
    assert result_from_per_record(data).nll_sum == result.nll_sum  # the whole-record sums are unchanged
    with pytest.raises(PipelineError, match="point.json: continuation sums after a prefill of 0.5 .* 0.25"):
        continuation_from_per_record(data, "point.json", 0.25)
    del data["continuation"]
    with pytest.raises(PipelineError, match="point.json: its per-record data has no continuation sums"):
        continuation_from_per_record(data, "point.json")


def test_baseline_roundtrip(llama, sequences, tmp_path):
    baseline = evaluate(llama, sequences, collect_baseline=True).baseline
    path = tmp_path / "b.safetensors"
    save_baseline(path, baseline)
    loaded = load_baseline(path)
    assert loaded.tokens_sha256 == baseline.tokens_sha256
    for name in ("sequence_lengths", "argmax", "hidden"):
        assert torch.equal(getattr(loaded, name), getattr(baseline, name)), name


def test_baseline_errors(llama, sequences, tmp_path):
    path = tmp_path / "b.safetensors"
    save_baseline(path, evaluate(llama, sequences, collect_baseline=True).baseline)
    other = [s[:-1] + [(s[-1] + 1) % VOCAB] for s in sequences]
    with pytest.raises(PipelineError, match="other token sequences"):
        evaluate(llama, other, baseline=path)
    with pytest.raises(PipelineError, match="not found"):
        load_baseline(tmp_path / "missing.safetensors")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    with pytest.raises(PipelineError, match="not a readable safetensors"):
        load_baseline(corrupt)
    stale = tmp_path / "stale.safetensors"  # a top-k baseline of the previous format
    save_file({"argmax": torch.zeros(3, dtype=torch.int32)}, str(stale),
              metadata={"format": "shadowquant-float-baseline-v1", "top_k": "32", "tokens_sha256": "x"})
    with pytest.raises(PipelineError, match="re-run the float evaluation") as info:
        load_baseline(stale)
    assert "\n" not in str(info.value) and "v1" in str(info.value)
    with pytest.raises(PipelineError, match="hidden size 32 does not match the lm_head input size 16"):
        evaluate(llama, sequences, baseline=path, float_head=nn.Linear(16, VOCAB))


def test_bad_inputs(llama):
    with pytest.raises(PipelineError, match="empty"):
        evaluate(llama, [])
    with pytest.raises(PipelineError, match="sequence 1 has 1 token"):
        evaluate(llama, [[1, 2, 3], [4]])
    with pytest.raises(PipelineError, match="batch_size"):
        evaluate(llama, [[1, 2, 3]], batch_size=0)


# ---------------------------------------------------------------- intervals and per-record data


def records(nll, tokens, correct=None, kl=None, agree=None):
    n = len(nll)
    return EvalResult(last_token_correct=list(correct) if correct is not None else [False] * n,
                      nll_sum=[float(v) for v in nll], num_tokens=[int(v) for v in tokens],
                      kl_sum=None if kl is None else [float(v) for v in kl],
                      agreement_count=None if agree is None else [int(v) for v in agree])


def test_identical_records_give_zero_width_intervals():
    result = records([6.0] * 50, [4] * 50, correct=[True] * 50, kl=[0.4] * 50, agree=[3] * 50)
    summary = summarize(result, result)
    for metric, value in (("accuracy", 1.0), ("perplexity", math.exp(1.5)), ("kl", 0.1), ("agreement", 0.75),
                          ("perplexity_increase", 0.0)):
        assert summary[metric] == pytest.approx(value)
        assert summary[f"{metric}_ci_low"] == pytest.approx(value) == summary[f"{metric}_ci_high"]


def test_two_valued_population_interval_matches_normal_approximation():
    n, ones = 400, 120  # true mean 0.3
    correct = [True] * ones + [False] * (n - ones)
    kl = [1.0] * ones + [0.0] * (n - ones)  # one token per record: kl is the same two-valued mean
    result = records([1.0] * n, [1] * n, correct=correct, kl=kl, agree=[1] * n)
    intervals = bootstrap_intervals(result, num_resamples=4000, seed=5)
    normal_width = 2 * 1.96 * math.sqrt(0.3 * 0.7 / n)
    for metric in ("accuracy", "kl"):
        low, high = intervals[f"{metric}_ci_low"], intervals[f"{metric}_ci_high"]
        assert low < 0.3 < high
        assert high - low == pytest.approx(normal_width, rel=0.2)


def test_intervals_reproducible_with_seed():
    g = np.random.default_rng(0)
    result = records(g.uniform(10, 90, 64), g.integers(20, 40, 64), correct=g.random(64) < 0.5,
                     kl=g.uniform(0, 5, 64), agree=g.integers(0, 20, 64))
    assert bootstrap_intervals(result, seed=7) == bootstrap_intervals(result, seed=7)
    assert bootstrap_intervals(result, seed=7) != bootstrap_intervals(result, seed=8)
    narrow = bootstrap_intervals(result, seed=7, level=0.5)
    wide = bootstrap_intervals(result, seed=7, level=0.99)
    assert wide["perplexity_ci_low"] < narrow["perplexity_ci_low"] < narrow["perplexity_ci_high"] \
        < wide["perplexity_ci_high"]


def test_paired_increase():
    g = np.random.default_rng(1)
    tokens = g.integers(50, 150, 128)
    float_nll = g.uniform(1.0, 5.0, 128) * tokens  # records differ a lot in difficulty
    float_result = records(float_nll, tokens)
    same = summarize(float_result, float_result)
    assert same["perplexity_increase"] == 0.0
    assert same["perplexity_increase_ci_low"] == 0.0 == same["perplexity_increase_ci_high"]
    # +0.01 nats on every token of every record: every paired resample sees exactly exp(0.01) - 1,
    # although the perplexity itself varies widely between resamples.
    shifted = summarize(records(float_nll + 0.01 * tokens, tokens), float_result)
    assert shifted["perplexity_increase"] == pytest.approx(math.expm1(0.01), rel=1e-9)
    assert shifted["perplexity_increase_ci_high"] - shifted["perplexity_increase_ci_low"] < 1e-9
    assert shifted["perplexity_ci_high"] / shifted["perplexity_ci_low"] > 1.1


def test_interval_bad_inputs():
    a = records([1.0, 2.0, 3.0], [1, 1, 1])
    with pytest.raises(PipelineError, match="3 records, float_result has 2") as info:
        summarize(a, records([1.0, 2.0], [1, 1]))
    assert "\n" not in str(info.value)
    with pytest.raises(PipelineError, match="record 1 has 1 tokens in result, 2 in float_result"):
        bootstrap_intervals(a, records([1.0, 2.0, 3.0], [1, 2, 1]))
    with pytest.raises(PipelineError, match="nll_sum has 2 records"):
        summarize(EvalResult(last_token_correct=[True] * 3, nll_sum=[1.0, 2.0], num_tokens=[1, 1, 1]))
    with pytest.raises(PipelineError, match="num_resamples"):
        bootstrap_intervals(a, num_resamples=0)
    with pytest.raises(PipelineError, match="level"):
        bootstrap_intervals(a, level=1.0)
    assert summarize(a, num_resamples=0)["perplexity_ci_low"] is None


def test_per_record_json_roundtrip(llama, sequences):
    float_result = evaluate(llama, sequences, collect_baseline=True)
    quant = evaluate(quantize(tiny_llama(), "llama", 0.05), sequences, baseline=float_result.baseline)
    quant_back = result_from_per_record(json.loads(json.dumps(per_record(quant))))
    float_back = result_from_per_record(json.loads(json.dumps(per_record(float_result))))
    assert float_back.kl_sum is None and quant_back.kl_sum == quant.kl_sum
    assert summarize(quant_back, float_back) == summarize(quant, float_result)


def test_per_record_bad_inputs():
    good = per_record(records([1.0, 2.0], [1, 1], kl=[0.1, 0.2], agree=[1, 0]))
    with pytest.raises(PipelineError, match="sweep/x.json: per-record data lacks kl_sum"):
        result_from_per_record({k: v for k, v in good.items() if k != "kl_sum"}, source="sweep/x.json")
    with pytest.raises(PipelineError, match="nll_sum must be a list of numbers"):
        result_from_per_record(dict(good, nll_sum="1.0"))
    with pytest.raises(PipelineError, match="kl_sum has 1 records, last_token_correct has 2"):
        result_from_per_record(dict(good, kl_sum=[0.1]))
