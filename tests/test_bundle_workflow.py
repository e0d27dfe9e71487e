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
