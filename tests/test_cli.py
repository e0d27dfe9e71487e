"""The command line runs the sweep by hand: the same stages the rules run, one command each."""

import json

import pandas as pd
import pytest

from shadowquant.cli import build_parser, main


def test_every_pipeline_step_has_a_command():
    commands = set(build_parser()._subparsers._group_actions[0].choices)
    assert {"fetch-model", "select-samples", "profile", "sensitivity", "evaluate-float", "evaluate-point",
            "aggregate-sweep", "select", "decide", "export", "convert", "inspect"} <= commands


def test_a_bad_point_label_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["decide", "--act-scales", "a.json", "--out", "b.json", "--point", "absmax-q4"])
    assert "point 'absmax-q4' is not valid" in capsys.readouterr().err


def test_sweep_by_hand(tiny_model_dir, tiny_text_corpus, tmp_path):
    run = lambda *args: main([str(a) for a in args])  # noqa: E731
    manifest, scales = tmp_path / "manifest.json", tmp_path / "act_scales.json"
    assert run("fetch-model", "--source", tiny_model_dir("llama"), "--manifest", manifest) == 0
    assert run("select-samples", "--corpus", tiny_text_corpus, "--out", tmp_path / "cal.jsonl", "--num-samples", 4) == 0
    assert run("select-samples", "--corpus", tiny_text_corpus, "--out", tmp_path / "eval.jsonl", "--num-samples", 4,
               "--offset", 4) == 0
    assert run("profile", "--manifest", manifest, "--samples", tmp_path / "cal.jsonl", "--out-json", scales,
               "--out-table", tmp_path / "act_scales.csv", "--seq-len", 16, "--device", "cpu") == 0
    common = ["--manifest", manifest, "--samples", tmp_path / "eval.jsonl", "--seq-len", 16, "--device", "cpu",
              "--bootstrap", 20]
    assert run("evaluate-float", *common, "--out-json", tmp_path / "float.json",
               "--out-baseline", tmp_path / "baseline.safetensors") == 0
    assert run("sensitivity", "--manifest", manifest, "--samples", tmp_path / "cal.jsonl", "--act-scales", scales,
               "--out", tmp_path / "sensitivity.csv", "--num-samples", 2, "--seq-len", 12, "--device", "cpu",
               "--runtime", "ideal") == 0
    assert run("clip-scales", "--manifest", manifest, "--samples", tmp_path / "cal.jsonl", "--act-scales", scales,
               "--out", tmp_path / "clip_scales.json", "--num-samples", 2, "--seq-len", 12, "--device", "cpu") == 0
    assert run("choose-weight-range", "--manifest", manifest, "--samples", tmp_path / "cal.jsonl",
               "--out", tmp_path / "weight_range.json", "--num-samples", 2, "--seq-len", 12, "--device", "cpu") == 0
    weight_range = json.loads((tmp_path / "weight_range.json").read_text())["weight_range"]
    points = []
    for point in ("absmax-t4", "absmax-k3", "absmax-k3-mse"):
        points.append(tmp_path / f"{point}.json")
        assert run("evaluate-point", *common, "--act-scales", scales, "--baseline", tmp_path / "baseline.safetensors",
                   "--float-json", tmp_path / "float.json", "--out-json", points[-1], "--point", point,
                   "--sensitivity", tmp_path / "sensitivity.csv", "--clip-scales", tmp_path / "clip_scales.json",
                   "--weight-range", weight_range, "--runtime", "ideal") == 0
    assert json.loads(points[1].read_text())["num_shadow_sides"] == 3
    assert json.loads(points[2].read_text())["clip"] == "mse"
    assert json.loads(points[2].read_text())["weight_range"] == weight_range
    assert run("aggregate-sweep", "--float-json", tmp_path / "float.json", "--out", tmp_path / "sweep.csv",
               *points) == 0
    assert list(pd.read_csv(tmp_path / "sweep.csv")["point"]) == ["float", "absmax-t4", "absmax-k3", "absmax-k3-mse"]
    assert run("select", "--sweep", tmp_path / "sweep.csv", "--out", tmp_path / "selection.json",
               "--budget", 100) == 0
    chosen = json.loads((tmp_path / "selection.json").read_text())["point"]
    assert run("export", "--manifest", manifest, "--act-scales", scales, "--out", tmp_path / "int8.safetensors",
               "--point", chosen, "--sensitivity", tmp_path / "sensitivity.csv",
               "--clip-scales", tmp_path / "clip_scales.json", "--weight-range", weight_range, "--runtime", "ideal") == 0
    assert run("decide", "--act-scales", scales, "--out", tmp_path / "decision.json", "--point", "absmax-k3",
               "--sensitivity", tmp_path / "sensitivity.csv") == 0
    assert json.loads((tmp_path / "decision.json").read_text())["num_shadow_sides"] == 3


def test_runtime_sweep_by_hand(tiny_model_dir, tiny_text_corpus, tmp_path):
    """The qwen-npu stages by hand: runtime scales, layer ranking, a layer point, export with runtime.json, convert."""
    run = lambda *args: main([str(a) for a in args])  # noqa: E731
    manifest, scales = tmp_path / "manifest.json", tmp_path / "act_scales.json"
    assert run("fetch-model", "--source", tiny_model_dir("llama"), "--manifest", manifest) == 0
    assert run("select-samples", "--corpus", tiny_text_corpus, "--out", tmp_path / "cal.jsonl", "--num-samples", 4) == 0
    assert run("select-samples", "--corpus", tiny_text_corpus, "--out", tmp_path / "eval.jsonl", "--num-samples", 4,
               "--offset", 4) == 0
    assert run("profile", "--manifest", manifest, "--samples", tmp_path / "cal.jsonl", "--out-json", scales,
               "--out-table", tmp_path / "act_scales.csv", "--seq-len", 16, "--device", "cpu") == 0
    chosen = tmp_path / "runtime_scales.json"
    assert run("runtime-scales", "--manifest", manifest, "--samples", tmp_path / "cal.jsonl", "--act-scales", scales,
               "--out", chosen, "--num-samples", 4, "--seq-len", 16, "--fisher-samples", 2, "--fisher-seq-len", 12,
               "--device", "cpu") == 0
    assert run("sensitivity", "--manifest", manifest, "--samples", tmp_path / "cal.jsonl", "--act-scales", scales,
               "--out", tmp_path / "sensitivity.csv", "--num-samples", 2, "--seq-len", 12, "--device", "cpu",
               "--runtime-scales", chosen) == 0
    ranking = pd.read_csv(tmp_path / "sensitivity.csv")
    assert list(ranking["side"]) == ["layer", "layer"] and list(ranking["rank"]) == [1, 2]
    common = ["--manifest", manifest, "--samples", tmp_path / "eval.jsonl", "--seq-len", 16, "--device", "cpu",
              "--bootstrap", 20]
    assert run("evaluate-float", *common, "--out-json", tmp_path / "float.json",
               "--out-baseline", tmp_path / "baseline.safetensors") == 0
    assert run("evaluate-point", *common, "--act-scales", scales, "--baseline", tmp_path / "baseline.safetensors",
               "--float-json", tmp_path / "float.json", "--out-json", tmp_path / "l1.json", "--point", "absmax-l1",
               "--sensitivity", tmp_path / "sensitivity.csv", "--runtime-scales", chosen) == 0
    point = json.loads((tmp_path / "l1.json").read_text())
    assert point["runtime"] == "qwen-npu-rotated" and point["num_shadow_layers"] == 1 and point["cpu_share"] >= 0
    assert run("export", "--manifest", manifest, "--act-scales", scales, "--out", tmp_path / "int8.safetensors",
               "--point", "absmax-l1", "--sensitivity", tmp_path / "sensitivity.csv", "--runtime-scales", chosen,
               "--runtime-json", tmp_path / "runtime.json") == 0
    assert run("convert", "--export", tmp_path / "int8.safetensors", "--out", tmp_path / "model.mllm",
               "--runtime-json", tmp_path / "runtime.json") == 0
    layer = int(ranking["layer"][0].split(".")[2])
    assert json.loads((tmp_path / "runtime.json").read_text())["shadow_layers"] == [layer]
