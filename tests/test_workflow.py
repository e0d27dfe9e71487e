"""The whole pipeline through the snakemake CLI on tiny random models of every family."""

import json
import shutil

import pandas as pd
import pytest
import torch
from safetensors import safe_open

from shadowquant.families import FAMILIES, NPU_FAMILIES
from shadowquant.inspector import main as inspect_main
from shadowquant.mllm import DTYPE_INT8, read_mllm
from test_bundle_workflow import check_bundle
from workflow_helpers import planned_jobs, snakemake, tiny_config, write_config

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_runs_the_whole_workflow(family, tiny_model_dir, tiny_text_corpus, tmp_path, native_loader):
    """The default transform and runtime ('auto') with only the model changed: every family reaches model.mllm
    (and the LLaMA run goes on to the phone bundle)."""
    model_dir = tiny_model_dir("qwen2" if family == "qwen1" else family)
    # The fronts, the breakdown and their plots run for one family per runtime (llama under qwen-npu-rotated, opt
    # under ideal with '-mse' points), the rest of the workflow for all eight.
    # The runtime each family's run simulates under the default runtime.profile 'auto': mllm's Qwen NPU model runs
    # LLaMA-shaped models; the others take the idealized W8A8 of the original tools (mllm has no NPU model for them).
    npu = family in NPU_FAMILIES
    full = family in ("llama", "opt")
    overrides = {"runtime.profile": "auto", "transform.variants": "auto"}
    # Two decoding candidates (each is a job): the mixed Q4_0/Q8_0 file of the unrotated weights, and Q8_0.
    decode_candidates = ["unrotated:q4_0i-down8-head8", "prefill:q8_0"]
    if family == "llama":
        overrides["bundle.decode"] = {"candidates": decode_candidates}
    if family == "opt":
        overrides.update({"sweep.clip_scales": ["max", "mse"], "sweep.weight_range": "auto"})
    elif not full:
        overrides.update({"sweep.shadow_sides": [], "sweep.shadow_layers": [], "sweep.breakdown": False})
    cfg = write_config(tmp_path, tiny_config(model_dir, tiny_text_corpus, f"tiny-{family}",
                                             **{"model.type": family}, **overrides))
    # The default target: sweep, selection, export, mllm, evaluation, plots (LLaMA: and the phone bundle).
    snakemake(tmp_path, cfg, *(["all", "bundle"] if family == "llama" else []))
    results = tmp_path / f"results/tiny-{family}"
    # Every tiny model takes rotate+smooth, the best exact variant, in its own run directory.
    run = tmp_path / f"results/tiny-{family}.rotate+smooth"
    transform = json.loads((tmp_path / f"resources/models/tiny-{family}/transformed/rotate+smooth/hf/"
                                       "transform.json").read_text())
    assert transform["transforms"] == ["rotate", "smooth"]
    assert transform["chosen_by"].startswith(f"transform.variants auto: family {family}: rotate and smooth are exact")
    sweep = pd.read_csv(run / "sweep.csv")
    ratio = ["absmax-t1", "absmax-t4", "absmax-t10000000"]  # ideal: t = 1 comes with the breakdown
    if npu:  # shadow layers: no shadow layer (always), the layer front, the ratio rule per layer, no '-mse' twins
        expected = ["float", "absmax-l0", "absmax-l1", *ratio[1:]] if full else ["float", "absmax-l0", *ratio[1:]]
    else:  # t = 1 clips no side, so it has no '-mse' twin.
        expected = ["float", *ratio, "absmax-k2", *[f"{p}-mse" for p in ratio[1:]], "absmax-k2-mse"] if full \
            else ["float", *ratio[1:]]
    assert list(sweep["point"]) == expected
    assert set(sweep.loc[sweep["point"] != "float", "runtime"]) == {"qwen-npu-rotated" if npu else "ideal"}
    assert sweep["perplexity"].notna().all() and sweep["perplexity_ci_low"].notna().all()
    assert (sweep["perplexity_ci_low"] <= sweep["perplexity"]).all()
    assert (sweep["perplexity"] <= sweep["perplexity_ci_high"]).all()
    selection = json.loads((results / "selection.json").read_text())
    assert selection["point"] in set(sweep["point"]) - {"float"}
    if full:
        if family == "opt":
            chosen = json.loads((run / "weight_range.json").read_text())["weight_range"]
            assert set(sweep.loc[sweep["point"] != "float", "weight_range"]) == {chosen}
        breakdown = json.loads((run / "breakdown.json").read_text())
        assert set(breakdown["parts"]) == {"float", "weights", "inputs", "outputs", "all"}
        assert breakdown["point"] == ("absmax-l0" if npu else "absmax-t1")
        for plot in ("fronts.png", "sensitivity.png", "breakdown.png"):
            assert (run / "plots" / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    evaluation = json.loads((results / "evaluation.json").read_text())
    assert evaluation["generations"][0]["prompt"] == "The list"
    for plot in ("sweep_threshold.png", "sweep_shadow.png", "outlier_ratios.png"):
        assert (run / "plots" / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    mllm = results / "model.mllm"
    # runtime.json beside the file: the inspector checks what that runtime's C++ model loads.
    runtime = json.loads((results / "runtime.json").read_text())
    assert runtime["runtime"] == ("qwen-npu-rotated" if npu else "ideal")
    assert runtime["auto_choices"]["runtime.profile"]["value"] == runtime["runtime"]
    assert runtime["auto_choices"]["transform.variants"]["value"] == runtime["transform"] == "rotate+smooth"
    assert inspect_main([str(mllm), "--export", str(mllm.with_name("model-int8.safetensors"))]) == 0
    f = read_mllm(mllm)
    scales = json.loads((run / "act_scales.json").read_text())
    assert "lm_head" in scales["ori"]
    linears = [n for n in scales["ori"] if n != "lm_head"]
    for layer in linears:
        assert f.entry(f"{layer}.weight").dtype == DTYPE_INT8
        if npu:  # clip flags only where the runtime reads them: down_proj of the shadow layers
            shadow = f"model.layers.{layer.split('.')[2]}" in {f"model.layers.{i}" for i in runtime["shadow_layers"]}
            assert (f"{layer}.clip_input" in f) == (shadow and layer.endswith("down_proj"))
        else:
            assert f.entry(f"{layer}.clip_input").dtype == DTYPE_INT8
    with safe_open(str(mllm.with_name("model-int8.safetensors")), framework="pt") as st:
        meta = st.metadata()
    assert meta["family"] == family and meta["runtime"] == ("qwen-npu-rotated" if npu else "ideal")
    if family == "llama":
        check = check_bundle(tmp_path, f"tiny-{family}", native_loader, decode_candidates)
        assert check["decoding_model"]["candidate"] == "unrotated:q4_0i-down8-head8"  # the smaller, within budget
        assert check["decoding_model"]["dtype_mix"] == "q4_0+q8_0"
        assert check["float"]["point"] == "float" and runtime["transform"] == "rotate+smooth"
        # The family is now read from the fetched model, no longer from model.type: nothing is stale.
        assert planned_jobs(snakemake(tmp_path, cfg, "-n", "all", "bundle")) == {}
        # Relinking the root model.mllm (Snakemake touches the new output) leaves the export and the bundle
        # as they were: the root copy shares no timestamp with results/.
        (tmp_path / "model.mllm").unlink()
        snakemake(tmp_path, cfg, "model.mllm")
        assert (tmp_path / "model.mllm").is_symlink()
        assert planned_jobs(snakemake(tmp_path, cfg, "-n", "all", "bundle")) == {}


def test_threshold_change_reruns_export_but_not_profiling(tiny_model_dir, tiny_text_corpus, tmp_path):
    # Explicit statistic and threshold: model.mllm needs no sweep.
    base = tiny_config(tiny_model_dir("llama"), tiny_text_corpus, "tiny-llama", **{"export.point": "absmax-t152"})
    cfg = write_config(tmp_path, base)
    snakemake(tmp_path, cfg, "model.mllm")
    assert (tmp_path / "model.mllm").read_bytes() == (tmp_path / "results/tiny-llama/model.mllm").read_bytes()
    assert planned_jobs(snakemake(tmp_path, cfg, "-n", "model.mllm")) == {}
    base["export"] = {"point": "absmax-t8"}
    cfg = write_config(tmp_path, base)
    jobs = planned_jobs(snakemake(tmp_path, cfg, "-n", "model.mllm"))
    assert "profile" not in jobs and "fetch_model" not in jobs and "select_calibration" not in jobs
    assert {"export_int8", "convert_mllm", "primary_model"} <= set(jobs)
    assert "evaluate_point" not in jobs and "sensitivity" not in jobs
    snakemake(tmp_path, cfg, "model.mllm")
    shadow = json.loads((tmp_path / "results/tiny-llama/shadow_layers.json").read_text())
    assert shadow["threshold"] == 8 and shadow["point"] == "absmax-t8"
    # A change of the calibration size does rerun profiling.
    base["calibration"]["num_samples"] = 5
    jobs = planned_jobs(snakemake(tmp_path, write_config(tmp_path, base), "-n", "model.mllm"))
    assert "profile" in jobs


def test_default_config_dry_run(tmp_path):
    from workflow_helpers import REPO

    proc = snakemake(tmp_path, REPO / "config" / "config.yaml", "-n")
    jobs = planned_jobs(proc)
    assert {"fetch_model", "build_pydoc_corpus", "select_calibration", "profile", "export_int8",
            "convert_mllm", "primary_model"} <= set(jobs)


def test_points_per_job_groups_the_sweep_into_fewer_jobs(tiny_model_dir, tiny_text_corpus, tmp_path):
    cfg = tiny_config(tiny_model_dir("llama"), tiny_text_corpus, "tiny-groups", **{"sweep.points_per_job": 2})
    jobs = planned_jobs(snakemake(tmp_path, write_config(tmp_path, cfg), "-n"))
    # absmax-l0, -l1, -t4 and -t10000000: two jobs of two points, split into four point files.
    assert jobs["evaluate_point_group"] == 2 and jobs["split_point"] == 4 and "evaluate_point" not in jobs


def test_export_agrees_with_the_model_weights(tiny_model_dir, tiny_text_corpus, tmp_path):
    """Dequantized int8 weights are the per-tensor fake-quantized float weights."""
    from shadowquant.fakequant import dequantized_linear_from_export, fake_quant_weight
    from shadowquant.models import load_model

    cfg = write_config(tmp_path, tiny_config(tiny_model_dir("opt"), tiny_text_corpus, "tiny-opt",
                                             **{"export.point": "absmax-t4", "runtime.profile": "ideal"}))
    snakemake(tmp_path, cfg, "results/tiny-opt/model-int8.safetensors")
    model, _, _ = load_model(tiny_model_dir("opt"), device="cpu", dtype="float32")
    mods = dict(model.named_modules())
    with safe_open(str(tmp_path / "results/tiny-opt/model-int8.safetensors"), framework="pt") as st:
        name = "model.decoder.layers.0.fc1"
        w, b = dequantized_linear_from_export(st.get_tensor(f"{name}.weight"), st.get_tensor(f"{name}.weight.scale"),
                                              st.get_tensor(f"{name}.bias"), st.get_tensor(f"{name}.bias.scale"))
        assert torch.allclose(w, fake_quant_weight(mods[name].weight), atol=1e-6)
        assert torch.allclose(b, fake_quant_weight(mods[name].bias), atol=1e-6)


def test_budget_change_reruns_selection_only(tiny_model_dir, tiny_text_corpus, tmp_path):
    base = tiny_config(tiny_model_dir("llama"), tiny_text_corpus, "tiny-budget", **{"sweep.breakdown": False})
    cfg = write_config(tmp_path, base)
    snakemake(tmp_path, cfg)
    calibration = set((tmp_path / "results/tiny-budget/calibration.jsonl").read_text().splitlines())
    evaluation = set((tmp_path / "results/tiny-budget/evaluation.jsonl").read_text().splitlines())
    assert calibration and evaluation and not calibration & evaluation  # held out: disjoint
    base["sweep"]["budget"] = 0.5
    jobs = planned_jobs(snakemake(tmp_path, write_config(tmp_path, base), "-n"))
    assert "select_point" in jobs
    for rule in ("profile", "evaluate_float", "evaluate_point", "sensitivity", "fetch_model", "select_evaluation"):
        assert rule not in jobs
    report = tmp_path / "report.html"
    snakemake(tmp_path, cfg, "--report", str(report))
    assert report.stat().st_size > 10_000


def test_cache_reuses_the_profile_across_working_directories(tiny_model_dir, tiny_text_corpus, tmp_path,
                                                                     monkeypatch):
    monkeypatch.setenv("SNAKEMAKE_OUTPUT_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    cfg = tiny_config(tiny_model_dir("llama"), tiny_text_corpus, "tiny-cache")
    first, second = tmp_path / "first", tmp_path / "second"
    for workdir in (first, second):
        workdir.mkdir()
        # Targets before --cache: it takes a list of rule names (none: every cacheable rule).
        proc = snakemake(workdir, write_config(workdir, cfg), "results/tiny-cache/act_scales.json", "--cache")
    # The second directory takes the profile from the cache instead of running it.
    assert "from cache" in proc.stderr + proc.stdout
    assert (second / "results/tiny-cache/act_scales.json").is_symlink()
    assert (second / "results/tiny-cache/act_scales.json").read_bytes() == \
        (first / "results/tiny-cache/act_scales.json").read_bytes()


def test_editing_a_local_model_reruns_fetch_and_profiling(tiny_model_dir, tiny_text_corpus, tmp_path):
    """A local model directory is an input of fetch_model: an edit in place makes everything after it stale."""
    import shutil

    model = tmp_path / "my-model"
    shutil.copytree(tiny_model_dir("llama"), model)
    cfg = write_config(tmp_path, tiny_config(model, tiny_text_corpus, "tiny-local"))
    target = "results/tiny-local/act_scales.json"
    snakemake(tmp_path, cfg, target)
    assert planned_jobs(snakemake(tmp_path, cfg, "-n", target)) == {}
    config_json = model / "config.json"
    # An edit in place (Snakemake ignores a newer file whose content is unchanged).
    config_json.write_text(config_json.read_text() + "\n")
    jobs = planned_jobs(snakemake(tmp_path, cfg, "-n", target))
    assert {"fetch_model", "profile"} <= set(jobs), jobs


def test_transform_variants_are_swept_compared_and_selected_across(tiny_model_dir, tiny_text_corpus, tmp_path):
    """Two variants, each profiled and swept in its own results directory; the selection chooses across them,
    transforms.csv compares them, and either variant's export keeps the untransformed tensor names."""
    variants = ["none", "rotate+equalize"]
    base = tiny_config(tiny_model_dir("llama"), tiny_text_corpus, "tiny-tf",
                       **{"transform.variants": variants, "sweep.thresholds": [4], "sweep.shadow_sides": [],
                          "sweep.shadow_layers": [],
                          "sweep.weight_range": "auto"})
    snakemake(tmp_path, write_config(tmp_path, base))
    runs = {"none": tmp_path / "results/tiny-tf", "rotate+equalize": tmp_path / "results/tiny-tf.rotate+equalize"}
    for run in runs.values():
        assert list(pd.read_csv(run / "sweep.csv")["point"]) == ["float", "absmax-l0", "absmax-t4"]
        assert (run / "plots/sweep_shadow.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    manifest = json.loads((tmp_path / "resources/models/tiny-tf/transformed/rotate+equalize/manifest.json")
                          .read_text())
    assert manifest["transform"]["transforms"] == ["rotate", "equalize"]
    selection = json.loads((runs["none"] / "selection.json").read_text())
    assert selection["transform"] in variants
    table = pd.read_csv(runs["none"] / "transforms.csv")
    assert list(table["transform"]) == variants
    assert table["exported"].sum() == 1
    assert table.loc[table["exported"], "transform"].item() == selection["transform"]
    assert table["weights_only"].notna().all() and table["all_shadow_sides"].notna().all()
    # The transformed float model is exact: its float perplexity matches the original's.
    assert table["float_perplexity"].iloc[1] == pytest.approx(table["float_perplexity"].iloc[0], rel=1e-3)
    first = read_mllm(runs["none"] / "model.mllm")
    reports = [(runs["none"] / "inspect.txt").read_text()]

    # An explicit export of the other variant reruns the export only, never profiling or the sweep.
    other = next(v for v in variants if v != selection["transform"])
    forced = write_config(tmp_path, {**base, "export": {"point": "absmax-t4", "transform": other}}, "forced.yaml")
    jobs = planned_jobs(snakemake(tmp_path, forced, "-n", "model.mllm"))
    assert "export_int8" in jobs and not {"profile", "evaluate_point", "transform_model"} & set(jobs), jobs
    snakemake(tmp_path, forced, "model.mllm")
    second = read_mllm(runs["none"] / "model.mllm")
    reports.append((runs["none"] / "inspect.txt").read_text())
    plain, transformed = (first, second) if other == "rotate+equalize" else (second, first)
    plain_report, transformed_report = reports if other == "rotate+equalize" else reports[::-1]
    assert "note: exact transform before quantization: rotate+equalize" in transformed_report
    assert "note: exact transform" not in plain_report and "lm_head: " in plain_report
    extra = {"lm_head.weight"} if manifest["transform"]["untied_lm_head"] else set()
    assert set(transformed.names) == set(plain.names) | extra
    for name in plain.names:
        assert transformed.entry(name).dtype == plain.entry(name).dtype
        assert transformed.entry(name).shape == plain.entry(name).shape


def post_layernorm_opt(tiny_model_dir, tmp_path):
    """The tiny OPT as a post-LayerNorm model (opt-350m's layout), which takes equalize only."""
    model = tmp_path / "post-ln-opt"
    shutil.copytree(tiny_model_dir("opt"), model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "do_layer_norm_before": False}))
    return model


def test_a_transform_the_model_does_not_support_is_refused_in_one_line(tiny_model_dir, tiny_text_corpus, tmp_path):
    cfg = tiny_config(post_layernorm_opt(tiny_model_dir, tmp_path), tiny_text_corpus, "tiny-opt-rot",
                      **{"transform.variants": ["rotate"]})
    proc = snakemake(tmp_path, write_config(tmp_path, cfg),
                     "resources/models/tiny-opt-rot/transformed/rotate/manifest.json", check=False)
    assert proc.returncode != 0
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error: ")]
    assert errors and "opt" in errors[0] and "rotate" in errors[0], errors
    assert not (tmp_path / "resources/models/tiny-opt-rot/transformed").exists()
