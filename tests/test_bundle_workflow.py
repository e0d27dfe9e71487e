"""`snakemake bundle` refusals before any job runs (the bundle a run builds is checked by
bundle_checks.check_bundle in the whole-workflow test of the tiny LLaMA model, test_workflow.py)."""

from __future__ import annotations

import pytest

from workflow_helpers import snakemake, tiny_config, write_config

pytestmark = pytest.mark.slow


def test_bundle_is_refused_under_the_ideal_profile_before_any_job(tiny_model_dir, tiny_text_corpus, tmp_path):
    cfg = tiny_config(tiny_model_dir("llama"), tiny_text_corpus, "tiny-ideal", **{"runtime.profile": "ideal"})
    proc = snakemake(tmp_path, write_config(tmp_path, cfg), "bundle", "-n", check=False)
    assert proc.returncode != 0
    assert "runtime.profile is 'ideal', which no phone runs" in proc.stdout + proc.stderr


@pytest.mark.parametrize("profile, with_bundle", [("qwen-npu", True), ("ideal", False)])
def test_the_default_target_builds_the_bundle_where_a_phone_runs_the_runtime(tiny_model_dir, tiny_text_corpus,
                                                                             tmp_path, profile, with_bundle):
    """bundle.default_target: the default target plans the decoding candidates, the demo evaluation and the
    bundle under an NPU profile; under 'ideal' it plans none of them and is not refused."""
    from workflow_helpers import planned_jobs

    cfg = tiny_config(tiny_model_dir("llama"), tiny_text_corpus, "tiny-default",
                      **{"runtime.profile": profile, "bundle.default_target": True})
    jobs = planned_jobs(snakemake(tmp_path, write_config(tmp_path, cfg), "-n"))
    bundle_jobs = {"evaluate_decode_model", "bundle_decode_model", "evaluate_demo", "bundle", "check_bundle_tokenizer"}
    assert (bundle_jobs <= set(jobs)) == with_bundle and (not (bundle_jobs & set(jobs))) == (not with_bundle)
    assert "evaluation_summary" in jobs
    off = tiny_config(tiny_model_dir("llama"), tiny_text_corpus, "tiny-default", **{"runtime.profile": profile})
    assert not bundle_jobs & set(planned_jobs(snakemake(tmp_path, write_config(tmp_path, off), "-n")))
