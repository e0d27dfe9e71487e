"""The runtime as the seam (shadowquant.runtimes): what the workflow computes from the config while the
Snakefile is parsed (sweep labels, thresholds, the breakdown point, the bundle's refusal, which inputs a
runtime needs) and what the stages ask a runtime, for the ideal and the NPU profiles; no torch."""

import math
import subprocess
import sys

import pytest

from shadowquant.config import validate_config
from shadowquant.errors import PipelineError
from shadowquant.runtimes.profiles import PROFILE_NAMES
from shadowquant.runtimes import get_runtime, runtime_of
from shadowquant.runtimes.ideal import IdealRuntime
from shadowquant.runtimes.npu import NpuRuntime


def _sweep(profile: str, **sweep) -> dict:
    cfg = {"model": {"source": "/nowhere"}, "runtime": {"profile": profile}, "transform": {"variants": ["none"]},
           "sweep": {"thresholds": [4, 10000000], "shadow_sides": [2], "shadow_layers": [1], **sweep}}
    return validate_config(cfg, source="cfg.yaml")["sweep"]


def test_every_profile_has_one_runtime():
    kinds = {name: type(get_runtime(name)) for name in PROFILE_NAMES}
    assert kinds.pop("ideal") is IdealRuntime
    assert set(kinds.values()) == {NpuRuntime}
    with pytest.raises(PipelineError, match="set runtime.profile to ideal"):
        get_runtime("qwen-npu", "opt")


def test_runtime_of_a_record_defaults_to_the_ideal_profile():
    assert runtime_of({}).name == "ideal"
    assert runtime_of({"runtime": math.nan}).name == "ideal"  # a sweep table's float row
    assert runtime_of({"runtime": "qwen-npu"}).name == "qwen-npu"


def test_npu_sweep_labels_thresholds_and_breakdown():
    runtime = get_runtime("qwen-npu")
    sweep = _sweep("qwen-npu", breakdown=True)
    assert runtime.sweep_thresholds(sweep) == [4.0, 10000000.0]
    assert runtime.sweep_labels(sweep, "auto") == ["absmax-l0", "absmax-l1", "absmax-t10000000", "absmax-t4"]
    assert runtime.sweep_labels(sweep, "absmax-l3") == ["absmax-l0", "absmax-l1", "absmax-l3", "absmax-t10000000",
                                                        "absmax-t4"]
    assert runtime.breakdown_statistic(["absmax"]) == "absmax"
    assert runtime.breakdown_point("absmax") == "absmax-l0"
    assert runtime.needs_runtime_scales and runtime.shadow_unit == "layers"
    runtime.require_phone("cfg.yaml")  # an NPU profile runs on a phone


def test_ideal_sweep_labels_thresholds_and_breakdown():
    runtime = get_runtime("ideal")
    sweep = _sweep("ideal", breakdown=True, statistics=["signed", "absmax"], clip_scales=["max", "mse"])
    # The breakdown adds t = 1, whose '-mse' twin would repeat it.
    assert runtime.sweep_thresholds(sweep) == [1.0, 4.0, 10000000.0]
    labels = runtime.sweep_labels(sweep, "auto")
    assert "absmax-t1" in labels and "absmax-t1-mse" not in labels and "signed-t4-mse" in labels
    assert {"absmax-k2", "absmax-k2-mse", "signed-k2", "signed-k2-mse"} <= set(labels)
    assert len(labels) == 2 * (1 + 2 * 2 + 2) and labels == sorted(labels)
    assert runtime.sweep_thresholds(_sweep("ideal", breakdown=False)) == [4.0, 10000000.0]
    assert runtime.breakdown_statistic(["signed", "absmax"]) == "absmax"
    assert runtime.breakdown_statistic(["signed"]) == "signed"
    assert runtime.breakdown_point("signed") == "signed-t1"
    assert not runtime.needs_runtime_scales and runtime.shadow_unit == "sides"
    with pytest.raises(PipelineError, match=r"^cfg\.yaml \(the bundle\): runtime.profile is 'ideal', which no phone"):
        runtime.require_phone("cfg.yaml (the bundle)")


def test_which_points_suit_which_runtime():
    ideal, npu = get_runtime("ideal"), get_runtime("qwen-npu")
    for point in ("absmax-t4", "signed-k2-mse", "absmax-k0"):
        ideal.check_point(point)
    with pytest.raises(PipelineError, match="point 'absmax-l2' is a set of shadow layers"):
        ideal.check_point("absmax-l2")
    for point in ("absmax-t4", "absmax-l0", "absmax-l2"):
        npu.check_point(point)
    for point, message in (("signed-t4", "signed is the original tools"), ("absmax-k2", "shadow sides"),
                           ("absmax-t4-mse", "MSE clips")):
        with pytest.raises(PipelineError, match=message):
            npu.check_point(point)
    # The config says the same, naming the key.
    with pytest.raises(PipelineError, match=r"^cfg\.yaml: export\.point = 'absmax-k2' chooses shadow sides"):
        npu.check_config(["absmax"], "absmax-k2", "cfg.yaml")
    with pytest.raises(PipelineError, match=r"needs \[absmax\]"):
        npu.check_config(["signed", "absmax"], "auto", "cfg.yaml")
    ideal.check_config(["signed"], "signed-k2", "cfg.yaml")


def test_selection_orders_by_the_runtime_cost():
    ideal, npu = get_runtime("ideal"), get_runtime("qwen-npu")
    row = {"point": "p", "transform": "none", "num_shadow_sides": 4, "shadow_flop_fraction": 0.25,
           "cpu_share": 0.001, "num_shadow_layers": 2.0, "shadow_layers": "1 3"}
    assert ideal.selection_cost(row, 0.1) == (4, 0.25, 0.1, "p", "none")
    assert npu.selection_cost(row, 0.1) == (0.001, 2, 0.1, "p", "none")
    assert npu.selection_fields(row) == {"runtime": "qwen-npu", "cpu_share": 0.001, "num_shadow_layers": 2,
                                         "shadow_layers": [1, 3]}
    assert ideal.selection_fields({**row, "cpu_share": math.nan, "num_shadow_layers": math.nan}) == {
        "runtime": "ideal", "cpu_share": None, "num_shadow_layers": None, "shadow_layers": None}


def test_the_runtimes_import_no_torch():
    code = ("import sys, shadowquant.runtimes, shadowquant.config, shadowquant.evaluate.selection; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_evaluation_line_of_a_phone_profile_points_to_the_whole_generations_number():
    npu = get_runtime("qwen-npu-rotated").shadow_line({"shadow_layers": "3 7", "cpu_share": 0.0005})
    assert npu.startswith("Runtime profile qwen-npu-rotated: shadow layers 3, 7; the shadow ops run 0.050 %")
    assert "snakemake bundle" in npu and "demo_evaluation.md" in npu and "default target" in npu
    ideal = get_runtime("ideal").shadow_line({"num_shadow_inputs": 2, "num_shadow_outputs": 1,
                                              "shadow_flop_fraction": 0.01})
    assert "no phone runs it" in ideal and "snakemake bundle" not in ideal
