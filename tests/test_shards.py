"""16-bit profiling against the reference, and sharded profiling merged byte for byte."""

import json

import pytest
import torch

from shadowquant.inputs.corpus import write_jsonl
from shadowquant.errors import PipelineError
from shadowquant.model.loading import load_model
from shadowquant.calibrate.profile_stage import merge_profile, profile_shard
from shadowquant.calibrate.profiling import SIDES, profile_model, shard_ranges, tokenize_samples
from shadowquant.stages import profile
from shadowquant.calibrate.stats import HistogramStats, SideStats, reference_statistics


class _Interrupt(Exception):
    pass


def _texts(corpus, count=10):
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()[:count]]
    return [t[: 30 + 17 * i] for i, t in enumerate(texts)]  # different lengths, so batches are padded


def _reference(model, sequences, device="cpu"):
    """Every activation of every Linear, one sample per forward, sorted at the end."""
    store, handles = {}, []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            store[name] = {"input": [], "output": []}

            def hook(m, args, out, name=name):
                store[name]["input"].append(args[0].detach().reshape(-1).cpu())
                store[name]["output"].append(out.detach().reshape(-1).cpu())

            handles.append(mod.register_forward_hook(hook))
    with torch.inference_mode():
        for seq in sequences:
            model(input_ids=torch.tensor([seq], device=device), use_cache=False)
    for h in handles:
        h.remove()
    return {n: {s: reference_statistics(torch.cat(v[s]).float()) for s in v} for n, v in store.items()}


def _assert_exact(ours, ref):
    for name, sides in ref.items():
        for side, r in sides.items():
            for key in ("ori", "top_0_1", "absmax_ori", "absmax_top_0_1"):
                assert ours[key][name][side] == r[key], (key, name, side)
            assert ours["count"][name][side] == r["n"]
            stat = ours["all_stat"][name][side]
            assert stat["mean"] == pytest.approx(r["mean"], rel=1e-9, abs=1e-12)
            assert stat["std"] == pytest.approx(r["std"], rel=1e-9)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_model_profile_equals_reference(dtype, tiny_model_dir, tiny_text_corpus):
    model, tok, _ = load_model(tiny_model_dir("llama"), device="cpu", dtype=dtype)
    seqs = tokenize_samples(tok, _texts(tiny_text_corpus, 6), seq_len=48)
    ours = profile_model(model, seqs, tok.pad_token_id, batch_size=1, progress=False)
    assert all(isinstance(s, HistogramStats) for s in _profiler_stats(model, seqs))
    _assert_exact(ours, _reference(model, seqs))


def _profiler_stats(model, seqs):
    from shadowquant.calibrate.profiling import ActivationProfiler
    from shadowquant.model.families import linear_layer_names

    profiler = ActivationProfiler(model, linear_layer_names(model), sum(map(len, seqs)), "cpu")
    return [sides[side] for sides in profiler.stats.values() for side in SIDES]


def test_padded_half_batches_match_the_float32_path_on_the_same_activations(tiny_model_dir, tiny_text_corpus,
                                                                           monkeypatch):
    """Batched with padding, the histogram path (valid rows gathered by host-known indices) counts
    exactly what the float32 path (boolean mask) counts on the very same bf16 activations."""
    model, tok, _ = load_model(tiny_model_dir("llama"), device="cpu", dtype="bfloat16")
    seqs = tokenize_samples(tok, _texts(tiny_text_corpus), seq_len=48)
    histogram = profile_model(model, seqs, tok.pad_token_id, batch_size=4, progress=False)
    monkeypatch.setattr("shadowquant.calibrate.profiling.new_side_stats",
                        lambda dtype, n, device="cpu", counts=None: SideStats(n, device))
    streamed = profile_model(model, seqs, tok.pad_token_id, batch_size=4, progress=False)
    for key in ("ori", "top_0_1", "absmax_ori", "absmax_top_0_1", "count"):
        assert histogram[key] == streamed[key], key


def test_half_non_finite_activation_names_layer_and_sample(tiny_model_dir, tiny_text_corpus):
    model, tok, _ = load_model(tiny_model_dir("llama"), device="cpu", dtype="bfloat16")
    seqs = tokenize_samples(tok, _texts(tiny_text_corpus, 6), seq_len=48)
    target = dict(model.named_modules())["model.layers.1.mlp.down_proj"]

    def poison(mod, args, out):
        if args[0].shape[1] == len(seqs[3]):
            out = out.clone()
            out[0, 0, 0] = float("inf")
            return out

    handle = target.register_forward_hook(poison)
    try:
        with pytest.raises(PipelineError, match=r"model.layers.1.mlp.down_proj' output for calibration sample 3"):
            profile_model(model, seqs, tok.pad_token_id, batch_size=2, progress=False)
    finally:
        handle.remove()


@pytest.fixture
def stage_inputs(tiny_model_dir, tiny_text_corpus, tmp_path):
    model_dir = tiny_model_dir("llama")
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"path": str(model_dir), "family": "llama", "source": str(model_dir)}))
    samples = tmp_path / "calibration.jsonl"
    write_jsonl(samples, _texts(tiny_text_corpus, 11))
    return manifest, samples


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_sharded_profile_is_byte_identical_to_unsharded(dtype, stage_inputs, tmp_path):
    manifest, samples = stage_inputs
    common = dict(seq_len=48, batch_size=2, device="cpu", dtype=dtype, progress=False)
    profile(manifest, samples, tmp_path / "one.json", tmp_path / "one.csv", **common)
    shards = 3  # 6 batches of 2 (the last of 1): shards of 2 batches
    files = [tmp_path / f"shard-{i}-of-{shards}.safetensors" for i in range(shards)]

    def stop_after_first_batch(done):
        if done == 3:
            raise _Interrupt

    # Shard 1 is interrupted after its first batch, past a checkpoint, and resumed.
    with pytest.raises(_Interrupt):
        profile_shard(manifest, samples, files[1], 1, shards, checkpoint_dir=tmp_path / "ckpt-1",
                      checkpoint_every=2, after_batch=stop_after_first_batch, **common)
    seen = []
    for i in (2, 1, 0):  # any order
        profile_shard(manifest, samples, files[i], i, shards, checkpoint_dir=tmp_path / f"ckpt-{i}",
                      checkpoint_every=2, after_batch=seen.append, **common)
    assert seen == [5, 6, 4, 1, 2]  # shard 1 resumed after its checkpoint (batch 3), not from its start
    merge_profile([files[2], files[0], files[1]], tmp_path / "merged.json", tmp_path / "merged.csv")
    assert (tmp_path / "merged.json").read_bytes() == (tmp_path / "one.json").read_bytes()
    assert (tmp_path / "merged.csv").read_bytes() == (tmp_path / "one.csv").read_bytes()
    assert not (tmp_path / "ckpt-1").exists()


def test_shard_ranges_are_contiguous_and_cover_every_batch():
    for batches in range(1, 12):
        for shards in range(1, batches + 1):
            ranges = shard_ranges(batches, shards)
            assert [b for r in ranges for b in r] == list(range(batches))
            assert all(len(r) > 0 for r in ranges)
    with pytest.raises(PipelineError, match="calibration.shards = 4 is more than the 3"):
        shard_ranges(3, 4)


def test_merge_needs_every_shard_once(stage_inputs, tmp_path):
    manifest, samples = stage_inputs
    common = dict(seq_len=48, batch_size=4, device="cpu", dtype="float32", progress=False)
    files = [tmp_path / f"shard-{i}.safetensors" for i in range(2)]
    for i, f in enumerate(files):
        profile_shard(manifest, samples, f, i, 2, **common)
    with pytest.raises(PipelineError, match="complete set"):
        merge_profile([files[0]], tmp_path / "m.json", tmp_path / "m.csv")
    with pytest.raises(PipelineError, match="complete set"):
        merge_profile([files[0], files[0], files[1]], tmp_path / "m.json", tmp_path / "m.csv")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(PipelineError, match="junk.safetensors: not a readable profile shard"):
        merge_profile([files[0], tmp_path / "junk.safetensors"], tmp_path / "m.json", tmp_path / "m.csv")
    with pytest.raises(PipelineError, match="shard 2 does not exist"):
        profile_shard(manifest, samples, tmp_path / "x.safetensors", 2, 2, **common)
    assert not (tmp_path / "m.json").exists()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_half_profile_on_cuda_equals_reference(tiny_model_dir, tiny_text_corpus):
    model, tok, _ = load_model(tiny_model_dir("llama"), device="cuda", dtype="bfloat16")
    seqs = tokenize_samples(tok, _texts(tiny_text_corpus, 6), seq_len=48)
    ours = profile_model(model, seqs, tok.pad_token_id, batch_size=1, progress=False)
    _assert_exact(ours, _reference(model, seqs, device="cuda"))
