"""What a config sweeps (shadowquant.evaluate.plan), as common.smk reads it while the Snakefile is parsed: the
points, their jobs, the statistics that need a ranking or MSE clip scales, the exported point; no torch."""

import subprocess
import sys

from shadowquant.config import validate_config
from shadowquant.evaluate.plan import sweep_plan


def _plan(profile: str, export: str = "auto", **sweep):
    cfg = {"model": {"source": "/nowhere"}, "runtime": {"profile": profile}, "transform": {"variants": ["none"]},
           "export": {"point": export},
           "sweep": {"thresholds": [4, 10000000], "shadow_sides": [2], "shadow_layers": [1], **sweep}}
    return sweep_plan(validate_config(cfg, source="cfg.yaml"))


def test_ideal_plan_ranks_and_clips_the_statistics_its_points_need():
    plan = _plan("ideal", statistics=["signed", "absmax"], clip_scales=["max", "mse"], breakdown=True)
    assert plan.breakdown_point == "absmax-t1" and plan.breakdown_point in plan.labels
    # absmax-k2 and signed-k2 need a ranking; every '-mse' point its statistic's clip scales.
    assert plan.sensitivity_statistics == ["absmax", "signed"]
    assert plan.clip_statistics == ["absmax", "signed"]
    assert _plan("ideal", shadow_sides=[]).sensitivity_statistics == []
    assert _plan("ideal", clip_scales=["max"]).clip_statistics == []


def test_npu_plan_has_layer_points_and_no_mse_twins():
    plan = _plan("qwen-npu")
    assert plan.labels == ["absmax-l0", "absmax-l1", "absmax-t10000000", "absmax-t4"]
    assert plan.breakdown_point == "absmax-l0" and plan.clip_statistics == []
    assert plan.sensitivity_statistics == ["absmax"]  # the layer front needs the layer ranking


def test_points_are_grouped_into_jobs_in_label_order():
    plan = _plan("qwen-npu", points_per_job=3)
    assert plan.point_groups == [plan.labels[:3], plan.labels[3:]]
    assert plan.group_of_point == {label: 0 if i < 3 else 1 for i, label in enumerate(plan.labels)}
    assert _plan("qwen-npu").point_groups == [[label] for label in plan.labels]


def test_an_explicit_export_point_is_swept_and_its_threshold_marked():
    plan = _plan("ideal", export="absmax-t152")
    assert not plan.export_is_auto and "absmax-t152" in plan.labels and plan.export_threshold == 152
    assert _plan("ideal", export="absmax-k2").export_threshold is None
    auto = _plan("ideal")
    assert auto.export_is_auto and auto.export_threshold is None


def test_the_plan_imports_no_torch():
    code = "import sys, shadowquant.evaluate.plan; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
