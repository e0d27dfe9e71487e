"""The whole pipeline through the snakemake CLI on tiny random models of every family: one run per family,
checked concern by concern (check_* functions)."""

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors import safe_open

from shadowquant.model.families import FAMILIES, NPU_FAMILIES
from shadowquant.cli import inspect_command as inspect_main
from shadowquant.export.mllm import DTYPE_INT8, read_mllm
from bundle_checks import check_bundle
from workflow_helpers import planned_jobs, snakemake, tiny_config, write_config

pytestmark = pytest.mark.slow


# The fronts, the breakdown and their plots run for one family per runtime (llama under qwen-npu-rotated, opt
# under ideal with '-mse' points), the rest of the workflow for all eight.
FULL_FAMILIES = ("llama", "opt")
# Two decoding candidates of the LLaMA bundle (each is a job): the mixed Q4_0/Q8_0 file of the unrotated
# weights, and Q8_0.
DECODE_CANDIDATES = ["unrotated:q4_0i-down8-head8", "prefill:q8_0"]
PNG = b"\x89PNG\r\n\x1a\n"


@dataclass
class FamilyRun:
    family: str
    workdir: Path
    config: Path

    @property
    def npu(self) -> bool:
        """The runtime under the default runtime.profile 'auto': mllm's Qwen NPU model runs LLaMA-shaped models;
        the others take the idealized W8A8 of the original tools (mllm has no NPU model for them)."""
        return self.family in NPU_FAMILIES

    @property
    def full(self) -> bool:
        return self.family in FULL_FAMILIES

    @property
    def results(self) -> Path:
        return self.workdir / f"results/tiny-{self.family}"

    @property
    def run(self) -> Path:
        """Every tiny model takes rotate+smooth, the best exact variant, in its own run directory."""
        return self.workdir / f"results/tiny-{self.family}.rotate+smooth"

    @property
    def runtime_name(self) -> str:
        return "qwen-npu-rotated" if self.npu else "ideal"

    def json(self, path: Path) -> dict:
        return json.loads(path.read_text())


def run_family(family, tiny_model_dir, tiny_text_corpus, tmp_path_factory) -> FamilyRun:
    """The default transform and runtime ('auto') with only the model changed: every family reaches
    model.mllm (and the LLaMA run goes on to the phone bundle)."""
    workdir = tmp_path_factory.mktemp(f"workflow_{family}")
    model_dir = tiny_model_dir("qwen2" if family == "qwen1" else family)
    overrides = {"runtime.profile": "auto", "transform.variants": "auto"}
    if family == "llama":  # the default target builds the bundle (bundle.default_target, the default config's)
        overrides.update({"bundle.decode": {"candidates": DECODE_CANDIDATES}, "bundle.default_target": True})
    if family == "opt":
        overrides.update({"sweep.clip_scales": ["max", "mse"], "sweep.weight_range": "auto"})
    elif family not in FULL_FAMILIES:
        overrides.update({"sweep.shadow_sides": [], "sweep.shadow_layers": [], "sweep.breakdown": False})
    cfg = write_config(workdir, tiny_config(model_dir, tiny_text_corpus, f"tiny-{family}",
                                            **{"model.type": family}, **overrides))
    # The default target: sweep, selection, export, mllm, evaluation, plots (LLaMA: and the phone bundle).
    snakemake(workdir, cfg)
    return FamilyRun(family, workdir, cfg)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_runs_the_whole_workflow(family, tiny_model_dir, tiny_text_corpus, tmp_path_factory, native_loader):
    """One run per family (so pytest-xdist cannot split it over workers and run it twice), checked concern by
    concern by the check_* functions below."""
    run = run_family(family, tiny_model_dir, tiny_text_corpus, tmp_path_factory)
    check_auto_takes_the_best_exact_transform(run)
    check_sweep_has_the_points_of_its_runtime_with_intervals(run)
    check_breakdown_fronts_and_plots(run)
    check_final_evaluation_generates_from_the_export(run)
    check_runtime_json_and_export_metadata_name_the_runtime(run)
    check_mllm_file_holds_what_its_runtime_loads(run)
    check_bundle_where_asked_and_nothing_stale_afterwards(run, native_loader)


def check_auto_takes_the_best_exact_transform(family_run):
    transform = family_run.json(family_run.workdir / f"resources/models/tiny-{family_run.family}/transformed/"
                                                     "rotate+smooth/hf/transform.json")
    assert transform["transforms"] == ["rotate", "smooth"]
    assert transform["chosen_by"].startswith(f"transform.variants auto: family {family_run.family}: "
                                             "rotate and smooth are exact")


def check_sweep_has_the_points_of_its_runtime_with_intervals(family_run):
    sweep = pd.read_csv(family_run.run / "sweep.csv")
    ratio = ["absmax-t1", "absmax-t4", "absmax-t10000000"]  # ideal: t = 1 comes with the breakdown
    if family_run.npu:  # shadow layers: none (always), the layer front, the ratio rule per layer, no '-mse' twins
        expected = ["float", "absmax-l0", "absmax-l1", *ratio[1:]] if family_run.full \
            else ["float", "absmax-l0", *ratio[1:]]
    else:  # t = 1 clips no side, so it has no '-mse' twin.
        expected = ["float", *ratio, "absmax-k2", *[f"{p}-mse" for p in ratio[1:]], "absmax-k2-mse"] \
            if family_run.full else ["float", *ratio[1:]]
    assert list(sweep["point"]) == expected
    assert set(sweep.loc[sweep["point"] != "float", "runtime"]) == {family_run.runtime_name}
    assert sweep["perplexity"].notna().all() and sweep["perplexity_ci_low"].notna().all()
    assert (sweep["perplexity_ci_low"] <= sweep["perplexity"]).all()
    assert (sweep["perplexity"] <= sweep["perplexity_ci_high"]).all()
    selection = family_run.json(family_run.results / "selection.json")
    assert selection["point"] in set(sweep["point"]) - {"float"}
    if family_run.family == "opt":
        chosen = family_run.json(family_run.run / "weight_range.json")["weight_range"]
        assert set(sweep.loc[sweep["point"] != "float", "weight_range"]) == {chosen}


def check_breakdown_fronts_and_plots(family_run):
    for plot in ("sweep_threshold.png", "sweep_shadow.png", "outlier_ratios.png"):
        assert (family_run.run / "plots" / plot).read_bytes()[:8] == PNG
    if not family_run.full:
        assert not (family_run.run / "breakdown.json").exists()
        return
    breakdown = family_run.json(family_run.run / "breakdown.json")
    assert set(breakdown["parts"]) == {"float", "weights", "inputs", "outputs", "all"}
    assert breakdown["point"] == ("absmax-l0" if family_run.npu else "absmax-t1")
    for plot in ("fronts.png", "sensitivity.png", "breakdown.png"):
        assert (family_run.run / "plots" / plot).read_bytes()[:8] == PNG


def check_final_evaluation_generates_from_the_export(family_run):
    evaluation = family_run.json(family_run.results / "evaluation.json")
    assert evaluation["generations"][0]["prompt"] == "The list"
    assert evaluation["model"] == f"tiny-{family_run.family}"
    # the exported point's per-record sums, with the continuation the demo evaluation reads
    assert evaluation["w8a8_per_record"]["continuation"]["prefill_fraction"] == 0.5
    summary = (family_run.results / "evaluation.md").read_text()
    assert summary.startswith(f"# W8A8 evaluation of tiny-{family_run.family}\n")
    assert ("## What a generation on the phone gets" in summary) == (family_run.family == "llama")


def check_runtime_json_and_export_metadata_name_the_runtime(family_run):
    runtime = family_run.json(family_run.results / "runtime.json")
    assert runtime["runtime"] == family_run.runtime_name
    assert runtime["auto_choices"]["runtime.profile"]["value"] == runtime["runtime"]
    assert runtime["auto_choices"]["transform.variants"]["value"] == runtime["transform"] == "rotate+smooth"
    with safe_open(str(family_run.results / "model-int8.safetensors"), framework="pt") as st:
        meta = st.metadata()
    assert meta["family"] == family_run.family and meta["runtime"] == family_run.runtime_name


def check_mllm_file_holds_what_its_runtime_loads(family_run):
    mllm = family_run.results / "model.mllm"
    # runtime.json beside the file: the inspector checks what that runtime's C++ model loads.
    assert inspect_main([str(mllm), "--export", str(mllm.with_name("model-int8.safetensors"))]) == 0
    runtime = family_run.json(family_run.results / "runtime.json")
    f = read_mllm(mllm)
    scales = family_run.json(family_run.run / "act_scales.json")
    assert "lm_head" in scales["ori"]
    shadow_layers = {f"model.layers.{i}" for i in runtime.get("shadow_layers", [])}  # NPU profiles only
    for layer in (n for n in scales["ori"] if n != "lm_head"):
        assert f.entry(f"{layer}.weight").dtype == DTYPE_INT8
        if family_run.npu:  # clip flags only where the runtime reads them: down_proj of the shadow layers
            shadow = f"model.layers.{layer.split('.')[2]}" in shadow_layers
            assert (f"{layer}.clip_input" in f) == (shadow and layer.endswith("down_proj"))
        else:
            assert f.entry(f"{layer}.clip_input").dtype == DTYPE_INT8


def check_bundle_where_asked_and_nothing_stale_afterwards(family_run, native_loader):
    """Only the LLaMA run asks for the bundle (the other families' refusals: test_bundle_workflow)."""
    if family_run.family != "llama":
        assert not (family_run.results / "bundle").exists()
        return
    check = check_bundle(family_run.workdir, "tiny-llama", native_loader, DECODE_CANDIDATES)
    assert check["decoding_model"]["candidate"] == "unrotated:q4_0i-down8-head8"  # the smaller, within budget
    assert check["decoding_model"]["dtype_mix"] == "q4_0+q8_0"
    # evaluation.md leads with what a generation gets, the demo evaluation's number with its interval
    demo = family_run.json(family_run.results / "demo_evaluation.json")
    assert demo["setup"]["prefill_only_from"].endswith("evaluation.json")
    assert demo["setup"]["decode_only_from"].endswith("decode_choice.json")
    assert demo["setup"]["decode_candidate"] == "unrotated:q4_0i-down8-head8"
    summary = (family_run.results / "evaluation.md").read_text()
    headline = summary.index("## What a generation on the phone gets")
    assert headline < summary.index("## The int8 prefill model (NPU)")
    m = demo["demo"]
    assert (f"{m['perplexity_increase']:+.2%} [{m['perplexity_increase_ci_low']:+.2%}, "
            f"{m['perplexity_increase_ci_high']:+.2%}] over float") in summary
    assert "What a generation on the phone gets" in (family_run.results / "evaluation.html").read_text()
    assert check["float"]["point"] == "float"
    workdir, cfg = family_run.workdir, family_run.config
    # The family is now read from the fetched model, no longer from model.type: nothing is stale.
    assert planned_jobs(snakemake(workdir, cfg, "-n", "all", "bundle")) == {}
    # Relinking the root model.mllm (Snakemake touches the new output) leaves the export and the bundle
    # as they were: the root copy shares no timestamp with results/.
    (workdir / "model.mllm").unlink()
    snakemake(workdir, cfg, "model.mllm")
    assert (workdir / "model.mllm").is_symlink()
    assert planned_jobs(snakemake(workdir, cfg, "-n", "all", "bundle")) == {}


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
    # make run builds what the phone needs too, and evaluation.md waits for the demo evaluation
    assert {"evaluate_decode_model", "evaluate_demo", "bundle", "evaluation_summary"} <= set(jobs)


def test_points_per_job_groups_the_sweep_into_fewer_jobs(tiny_model_dir, tiny_text_corpus, tmp_path):
    cfg = tiny_config(tiny_model_dir("llama"), tiny_text_corpus, "tiny-groups", **{"sweep.points_per_job": 2})
    jobs = planned_jobs(snakemake(tmp_path, write_config(tmp_path, cfg), "-n"))
    # absmax-l0, -l1, -t4 and -t10000000: two jobs of two points, split into four point files.
    assert jobs["evaluate_point_group"] == 2 and jobs["split_point"] == 4 and "evaluate_point" not in jobs


def test_export_agrees_with_the_model_weights(tiny_model_dir, tiny_text_corpus, tmp_path):
    """Dequantized int8 weights are the per-tensor fake-quantized float weights."""
    from shadowquant.runtimes.fakequant import dequantized_linear_from_export, fake_quant_weight
    from shadowquant.model.loading import load_model

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
