"""Profiling against the reference definition: collect everything, sort, index (docs/method.md section 1)."""

import json

import pytest
import torch

from shadowquant.errors import PipelineError
from shadowquant.model.families import FAMILIES
from shadowquant.model.families import linear_layer_names as linear_names
from shadowquant.model.loading import load_model
from shadowquant.calibrate.profiling import ActivationProfiler, Checkpoint, profile_model, tokenize_samples
from shadowquant.calibrate.stats import reference_statistics


class _Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def llama(tiny_model_dir):
    model, tokenizer, _ = load_model(tiny_model_dir("llama"), device="cpu", dtype="float32")
    return model, tokenizer


@pytest.fixture(scope="module")
def sequences(llama, tiny_text_corpus):
    texts = [json.loads(line)["text"] for line in tiny_text_corpus.read_text().splitlines()[:10]]
    texts = [t[: 30 + 17 * i] for i, t in enumerate(texts)]  # different lengths, so batches are padded
    return tokenize_samples(llama[1], texts, seq_len=48)


def _reference_act_scales(model, sequences):
    """The original tool: one sample per forward, keep every activation, sort at the end."""
    store = {}
    handles = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            store[name] = {"input": [], "output": []}

            def hook(m, args, out, name=name):
                store[name]["input"].append(args[0].detach().reshape(-1).clone())
                store[name]["output"].append(out.detach().reshape(-1).clone())

            handles.append(mod.register_forward_hook(hook))
    with torch.inference_mode():
        for seq in sequences:
            model(input_ids=torch.tensor([seq]), use_cache=False)
    for h in handles:
        h.remove()
    return {n: {s: reference_statistics(torch.cat(v[s])) for s in v} for n, v in store.items()}


def _assert_matches_reference(ours, ref):
    for name, sides in ref.items():
        for side, r in sides.items():
            assert ours["ori"][name][side] == r["ori"]
            assert ours["top_0_1"][name][side] == r["top_0_1"]
            assert ours["absmax_ori"][name][side] == r["absmax_ori"]
            assert ours["absmax_top_0_1"][name][side] == r["absmax_top_0_1"]
            assert ours["count"][name][side] == r["n"]
            stat = ours["all_stat"][name][side]
            assert stat["mean"] == pytest.approx(r["mean"], abs=1e-6 * r["std"] + 1e-12)
            assert stat["std"] == pytest.approx(r["std"], rel=1e-5)


def test_unbatched_profile_equals_reference_exactly(llama, sequences):
    model, tok = llama
    ours = profile_model(model, sequences, tok.pad_token_id, batch_size=1, progress=False)
    ref = _reference_act_scales(model, sequences)
    assert set(ours["ori"]) == set(ref) == set(linear_names(model))
    assert "lm_head" in ours["ori"]
    _assert_matches_reference(ours, ref)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_matches_reference_with_shared_inputs(family, tiny_model_dir, tiny_text_corpus):
    """Linears reading one tensor (q/k/v, gate/up, an expert's w1/w3) share their input statistics;
    each must still equal the reference computed from its own hook."""
    model, tok, _ = load_model(tiny_model_dir(family), device="cpu", dtype="float32")
    texts = [json.loads(line)["text"][:200] for line in tiny_text_corpus.read_text().splitlines()[:4]]
    seqs = tokenize_samples(tok, texts, seq_len=32)
    ours = profile_model(model, seqs, tok.pad_token_id, batch_size=1, progress=False)
    assert set(ours["ori"]) == set(linear_names(model))
    _assert_matches_reference(ours, _reference_act_scales(model, seqs))


def test_batched_with_padding_matches_unbatched(llama, sequences):
    model, tok = llama
    one = profile_model(model, sequences, tok.pad_token_id, batch_size=1, progress=False)
    four = profile_model(model, sequences, tok.pad_token_id, batch_size=4, progress=False)
    assert len({len(s) for s in sequences}) > 1  # the batches really are padded
    assert four["count"] == one["count"]  # padded positions never counted
    for key in ("ori", "top_0_1", "absmax_ori", "absmax_top_0_1"):
        for name in one[key]:
            for side in ("input", "output"):
                assert four[key][name][side] == pytest.approx(one[key][name][side], rel=1e-4, abs=1e-6)


def test_large_padded_activations_are_read_per_sample_without_copies(llama, sequences, monkeypatch):
    """Activations above PADDED_COPY_ELEMENTS (lm_head logits in real models) go in as per-sample views of
    the valid prefix; the statistics must equal those of the small-copy path exactly."""
    model, tok = llama
    copied = profile_model(model, sequences, tok.pad_token_id, batch_size=4, progress=False)
    monkeypatch.setattr("shadowquant.calibrate.profiling.PADDED_COPY_ELEMENTS", 0)
    viewed = profile_model(model, sequences, tok.pad_token_id, batch_size=4, progress=False)
    assert viewed["count"] == copied["count"]
    for key in ("ori", "top_0_1", "absmax_ori", "absmax_top_0_1"):
        assert viewed[key] == copied[key]
    for name, sides in copied["all_stat"].items():
        for side, stat in sides.items():
            # Other chunks, other float32 partial sums: equal to float32 precision.
            assert viewed["all_stat"][name][side]["mean"] == pytest.approx(stat["mean"], abs=1e-6 * stat["std"])
            assert viewed["all_stat"][name][side]["std"] == pytest.approx(stat["std"], rel=1e-5)


def test_resume_after_interruption_is_byte_identical(llama, sequences, tmp_path):
    model, tok = llama
    ckpt = lambda: Checkpoint(tmp_path / "ckpt", {"test": 1})  # noqa: E731
    full = profile_model(model, sequences, tok.pad_token_id, batch_size=2, progress=False)

    def stop_after_three(done):
        if done == 3:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        profile_model(model, sequences, tok.pad_token_id, batch_size=2, checkpoint=ckpt(), checkpoint_every=4,
                      progress=False, after_batch=stop_after_three)
    assert (tmp_path / "ckpt" / "checkpoint.json").exists()
    seen = []
    resumed = profile_model(model, sequences, tok.pad_token_id, batch_size=2, checkpoint=ckpt(),
                            checkpoint_every=4, progress=False, after_batch=seen.append)
    assert seen[0] == 3  # continued after the last checkpoint (batch 2), not from the start
    assert json.dumps(resumed) == json.dumps(full)


def test_stale_checkpoint_is_ignored(llama, sequences, tmp_path):
    model, tok = llama
    with pytest.raises(_Interrupt):
        profile_model(model, sequences, tok.pad_token_id, batch_size=2, checkpoint=Checkpoint(tmp_path, {"a": 1}),
                      checkpoint_every=2, progress=False,
                      after_batch=lambda d: (_ for _ in ()).throw(_Interrupt) if d == 2 else None)
    seen = []
    profile_model(model, sequences, tok.pad_token_id, batch_size=2, checkpoint=Checkpoint(tmp_path, {"a": 2}),
                  checkpoint_every=2, progress=False, after_batch=seen.append)
    assert seen[0] == 1


def test_non_finite_activation_names_layer_and_sample(llama, sequences):
    model, tok = llama
    target = dict(model.named_modules())["model.layers.1.mlp.down_proj"]

    def poison(mod, args, out):
        if args[0].shape[1] == len(sequences[3]):
            out = out.clone()
            out[0, 0, 0] = float("nan")
            return out

    handle = target.register_forward_hook(poison)
    try:
        with pytest.raises(PipelineError, match=r"model.layers.1.mlp.down_proj' output for calibration sample 3"):
            profile_model(model, sequences, tok.pad_token_id, batch_size=1, progress=False)
    finally:
        handle.remove()


def test_projections_reading_one_tensor_share_input_statistics(llama, sequences):
    model, tok = llama
    profiler = ActivationProfiler(model, linear_names(model), sum(map(len, sequences)), "cpu")
    with torch.inference_mode(), profiler:
        model(input_ids=torch.tensor([sequences[0]]), use_cache=False)
    shared = {name: owner for name, owner in profiler.input_owner.items() if owner != name}
    assert shared == {
        **{f"model.layers.{i}.self_attn.{p}_proj": f"model.layers.{i}.self_attn.q_proj" for i in (0, 1) for p in "kv"},
        **{f"model.layers.{i}.mlp.up_proj": f"model.layers.{i}.mlp.gate_proj" for i in (0, 1)},
    }
    assert profiler.stats["model.layers.0.self_attn.k_proj"]["input"] is profiler.stats[
        "model.layers.0.self_attn.q_proj"]["input"]
