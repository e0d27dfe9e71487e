"""sweep.points_per_job: several points evaluated with one model load give the one-point jobs' results."""

import json

import pytest

from shadowquant.errors import PipelineError
from shadowquant.stages import fetch_model, profile
from shadowquant.evaluate.sweep import PointEvaluation, evaluate_float, evaluate_point, evaluate_point_group, split_point


@pytest.fixture
def swept(tiny_model_dir, tiny_text_corpus, tmp_path):
    manifest, scales = tmp_path / "manifest.json", tmp_path / "act_scales.json"
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(tiny_text_corpus.read_text().splitlines(keepends=True)[:12]))
    fetch_model(str(tiny_model_dir("llama")), manifest)
    profile(manifest, samples, scales, tmp_path / "act_scales.csv", seq_len=24, batch_size=4,
            device="cpu", dtype="float32", progress=False)
    common = dict(manifest=manifest, samples=samples, seq_len=24, batch_size=4, device="cpu",
                  dtype="float32")
    evaluate_float(out_json=tmp_path / "float.json", out_baseline=tmp_path / "baseline.safetensors",
                   num_resamples=20, **common)
    return PointEvaluation(act_scales=scales, baseline=tmp_path / "baseline.safetensors",
                           float_json=tmp_path / "float.json", num_resamples=20, runtime="ideal", **common)


def test_a_group_job_equals_one_job_per_point(swept, tmp_path):
    points = ["absmax-t4", "absmax-t10000000", "signed-t1"]
    singles = [evaluate_point(swept, out_json=tmp_path / f"{p}.json", point=p) for p in points]
    group = tmp_path / "group.json"
    grouped = evaluate_point_group(swept, out_json=group, points=points)
    assert grouped == singles
    for point, single in zip(points, singles):
        split = split_point(group, point, tmp_path / f"split-{point}.json")
        assert split == single
        assert json.loads((tmp_path / f"split-{point}.json").read_text()) == \
            json.loads((tmp_path / f"{point}.json").read_text())
    with pytest.raises(PipelineError, match="has no result for point absmax-t16"):
        split_point(group, "absmax-t16", tmp_path / "absent.json")
    assert not (tmp_path / "absent.json").exists()
