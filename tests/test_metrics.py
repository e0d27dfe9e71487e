"""Evaluation metrics against unbatched manual computations on tiny models."""

import math

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, OPTConfig

from shadowquant.decision import LayerQuant
from shadowquant.errors import PipelineError
from shadowquant.fakequant import apply_w8a8
from shadowquant.metrics import evaluate, load_baseline, save_baseline, summarize

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


def quantized_llama(scale):
    model = tiny_llama()
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    return apply_w8a8(model, {n: LayerQuant(scale, scale, True, True) for n in names}, names)


def unbatched_logits(model, seq):
    with torch.no_grad():
        return model(torch.tensor([seq])).logits[0].double()


def make_sequences(model, n=9):
    """Sequences of different lengths; every other one ends with the model's own prediction (a hit)."""
    g = torch.Generator().manual_seed(1)
    sequences = []
    for i in range(n):
        seq = torch.randint(0, VOCAB, (3 + 2 * i,), generator=g).tolist()
        if i % 2 == 0:
            seq[-1] = int(unbatched_logits(model, seq)[-2].argmax())
        sequences.append(seq)
    return sequences


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


@pytest.fixture(scope="module")
def sequences(llama):
    return make_sequences(llama)


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
    assert summary["agreement"] is None and summary["kl"] is None


@pytest.mark.parametrize("make_model", [tiny_llama, tiny_opt])
def test_batched_equals_unbatched(make_model):
    model = make_model()
    sequences = make_sequences(model, n=7)
    one = evaluate(model, sequences, batch_size=1)
    many = evaluate(model, sequences, batch_size=3)
    assert one.last_token_correct == many.last_token_correct
    assert one.num_tokens == many.num_tokens
    torch.testing.assert_close(torch.tensor(many.nll_sum), torch.tensor(one.nll_sum), rtol=1e-5, atol=1e-5)


def test_float_against_own_baseline(llama, sequences, tmp_path):
    float_run = evaluate(llama, sequences, batch_size=3, collect_top_k=8)
    assert float_run.baseline.top_k == 8
    path = tmp_path / "baseline.safetensors"
    save_baseline(path, float_run.baseline)
    again = evaluate(llama, sequences, batch_size=2, baseline=path)
    summary = summarize(again)
    assert summary["agreement"] == 1.0
    assert summary["kl"] == pytest.approx(0.0, abs=1e-6)


def _manual_kl_and_agreement(float_model, quant_model, sequences):
    kl, agree, count = 0.0, 0, 0
    for seq in sequences:
        p = unbatched_logits(float_model, seq)[:-1].log_softmax(-1)
        q = unbatched_logits(quant_model, seq)[:-1].log_softmax(-1)
        kl += float((p.exp() * (p - q)).sum())
        agree += int((p.argmax(-1) == q.argmax(-1)).sum())
        count += len(seq) - 1
    return kl / count, agree / count


def test_quantized_kl_and_agreement(llama, sequences):
    quant = quantized_llama(0.05)
    exact_kl, exact_agreement = _manual_kl_and_agreement(llama, quant, sequences)
    assert exact_kl > 1e-3 and exact_agreement < 1.0

    # Top-k covering the whole vocabulary: the coarse-grained KL is the exact KL.
    full = evaluate(llama, sequences, collect_top_k=VOCAB).baseline
    summary = summarize(evaluate(quant, sequences, batch_size=4, baseline=full))
    assert summary["kl"] == pytest.approx(exact_kl, rel=1e-4)
    assert summary["agreement"] == pytest.approx(exact_agreement)

    # Top-8 plus the tail bucket: a lower bound, positive, and not far off.
    small = evaluate(llama, sequences, collect_top_k=8).baseline
    approx = summarize(evaluate(quant, sequences, batch_size=4, baseline=small))
    assert 0 < approx["kl"] <= exact_kl * (1 + 1e-6)
    assert approx["agreement"] == pytest.approx(exact_agreement)


def test_baseline_roundtrip(llama, sequences, tmp_path):
    baseline = evaluate(llama, sequences, collect_top_k=5).baseline
    path = tmp_path / "b.safetensors"
    save_baseline(path, baseline)
    loaded = load_baseline(path)
    assert loaded.top_k == 5 and loaded.tokens_sha256 == baseline.tokens_sha256
    for name in ("sequence_lengths", "argmax", "topk_logprobs", "topk_indices", "tail_logmass"):
        assert torch.equal(getattr(loaded, name), getattr(baseline, name).to(getattr(loaded, name).dtype)), name
    assert loaded.topk_logprobs.shape == (sum(len(s) - 1 for s in sequences), 5)


def test_baseline_errors(llama, sequences, tmp_path):
    path = tmp_path / "b.safetensors"
    save_baseline(path, evaluate(llama, sequences, collect_top_k=4).baseline)
    other = [s[:-1] + [(s[-1] + 1) % VOCAB] for s in sequences]
    with pytest.raises(PipelineError, match="other token sequences"):
        evaluate(llama, other, baseline=path)
    with pytest.raises(PipelineError, match="not found"):
        load_baseline(tmp_path / "missing.safetensors")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    with pytest.raises(PipelineError, match="not a readable safetensors"):
        load_baseline(corrupt)


def test_bad_inputs(llama):
    with pytest.raises(PipelineError, match="empty"):
        evaluate(llama, [])
    with pytest.raises(PipelineError, match="sequence 1 has 1 token"):
        evaluate(llama, [[1, 2, 3], [4]])
    with pytest.raises(PipelineError, match="batch_size"):
        evaluate(llama, [[1, 2, 3]], batch_size=0)
