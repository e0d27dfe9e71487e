"""Every bad input gets one clear line naming the file/key/value and what would be valid, and leaves no output.

One table: each case builds its bad input in a scratch directory, triggers it the way a user
would meet it (`snakemake -n` where the Snakefile rejects it while it is read, the same config
check without the snakemake start-up, a real snakemake run of the failing rule,
`python -m shadowquant ...`, or the stage function the rule calls) and returns the one error
line plus the outputs that must not exist afterwards. The messages are printed
(`[case] message`) so CI output doubles as a catalogue of them (docs/troubleshooting.md lists
them with their fixes).
"""

from __future__ import annotations

import functools
import http.server
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import yaml
import zstandard
from safetensors.torch import load_file, save_file

from shadowquant import stages
from shadowquant.errors import PipelineError
from workflow_helpers import snakemake, tiny_config, write_config

NAME = "bad"


@dataclass
class Inputs:
    """What a case may build on: a scratch directory and the session's tiny model, tokenizer and corpus."""

    tmp: Path
    model_dir: Path
    tokenizer_dir: Path
    corpus: Path
    llama_scales: Callable[[], dict]

    def config(self, **overrides) -> dict:
        """A valid small config with `section.key=value` overrides."""
        return tiny_config(self.model_dir, self.corpus, NAME, **{"calibration.num_samples": 4,
                                                                   "calibration.seq_len": 16,
                                                                   "calibration.batch_size": 2, **overrides})


@dataclass
class Outcome:
    message: str  # the one error line, without a leading "error: "
    absent: list[Path]  # outputs that must not exist after the failure


def _error_line(output: str) -> str:
    """The one distinct 'error: ...' line of a command's output (a failed job's log may repeat it)."""
    assert "Traceback" not in output, output[-3000:]
    lines = {line.strip() for line in output.splitlines() if line.strip().startswith("error:")}
    assert len(lines) == 1, f"expected exactly one distinct error line, got {sorted(lines)}:\n{output[-3000:]}"
    return lines.pop().removeprefix("error:").strip()


# ---------------------------------------------------------------- ways to trigger a bad input


def dry_run(**overrides) -> Callable[[Inputs], Outcome]:
    """`snakemake -n` with the config: rejected while the Snakefile is parsed, before any job."""

    def trigger(inputs: Inputs) -> Outcome:
        proc = snakemake(inputs.tmp, write_config(inputs.tmp, inputs.config(**overrides)), "-n", check=False,
                         timeout=120)
        assert proc.returncode != 0
        return Outcome(_error_line(proc.stdout + proc.stderr), [inputs.tmp / "results", inputs.tmp / "resources"])

    return trigger


def config_check(**overrides) -> Callable[[Inputs], Outcome]:
    """The check common.smk runs on the config (validate_config), without the snakemake start-up."""

    def trigger(inputs: Inputs) -> Outcome:
        from shadowquant.config import validate_config

        path = write_config(inputs.tmp, inputs.config(**overrides))
        with pytest.raises(PipelineError) as raised:
            validate_config(yaml.safe_load(path.read_text()), source=str(path))
        return Outcome(str(raised.value), [])

    return trigger


def snakemake_run(target: str, outputs: list[str], setup: Callable[[Inputs], dict]) -> Callable[[Inputs], Outcome]:
    """A real snakemake run of `target` whose rule fails; `setup` returns the config overrides."""

    def trigger(inputs: Inputs) -> Outcome:
        cfg = write_config(inputs.tmp, inputs.config(**setup(inputs)))
        proc = snakemake(inputs.tmp, cfg, target, check=False, timeout=300)
        assert proc.returncode != 0
        return Outcome(_error_line(proc.stdout + proc.stderr), [inputs.tmp / out for out in outputs])

    return trigger


def cli(setup: Callable[[Inputs], tuple[list[str], list[Path]]], **env: str) -> Callable[[Inputs], Outcome]:
    """`python -m shadowquant ARGS` in a subprocess; `setup` returns the arguments and the outputs."""

    def trigger(inputs: Inputs) -> Outcome:
        args, outputs = setup(inputs)
        proc = subprocess.run([sys.executable, "-m", "shadowquant", *map(str, args)], cwd=inputs.tmp,
                              capture_output=True, text=True, timeout=300, env={**os.environ, **env})
        assert proc.returncode != 0
        return Outcome(_error_line(proc.stderr), outputs)

    return trigger


def stage(run: Callable[[Inputs], object], outputs: Callable[[Inputs], list[Path]] = lambda i: []):
    """The library entry point a rule calls: `run` must raise PipelineError; `outputs` must not appear."""

    def trigger(inputs: Inputs) -> Outcome:
        with pytest.raises(PipelineError) as raised:
            run(inputs)
        return Outcome(str(raised.value), outputs(inputs))

    return trigger


# ---------------------------------------------------------------- bad inputs, built on demand


def copy_model(inputs: Inputs, name: str) -> Path:
    target = inputs.tmp / name
    shutil.copytree(inputs.model_dir, target, symlinks=False)
    return target


def under(*names: str) -> Callable[[Inputs], list[Path]]:
    """Outputs of a stage call, relative to the scratch directory."""
    return lambda inputs: [inputs.tmp / name for name in names]


FETCHED = under("fetched/manifest.json")
SELECTED = under("calibration.jsonl")
PROFILED = under("act_scales.json", "act_scales.csv")
EXPORTED = under("model-int8.safetensors", "shadow_layers.json")
CONVERTED = under("model.mllm", "inspect.txt")


def fetch(inputs: Inputs, source, **kwargs) -> None:
    stages.fetch_model(str(source), inputs.tmp / "fetched" / "manifest.json", **kwargs)


def write_file(inputs: Inputs, name: str, data: bytes) -> Path:
    path = inputs.tmp / name
    path.write_bytes(data)
    return path


def foreign_model(inputs: Inputs, config) -> Path:
    """A model of an architecture outside the supported families, saved with weights and tokenizer."""
    import transformers

    target = inputs.tmp / config.model_type
    if config.model_type == "bert":
        model = transformers.BertModel(config)
    else:
        model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(target)
    shutil.copy(inputs.tokenizer_dir / "tokenizer.json", target)
    return target


def gpt2_model(inputs: Inputs) -> Path:
    import transformers

    return foreign_model(inputs, transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=320))


def bert_model(inputs: Inputs) -> Path:
    import transformers

    return foreign_model(inputs, transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                        intermediate_size=64, vocab_size=320))


def without(inputs: Inputs, filename: str) -> Path:
    model = copy_model(inputs, f"no-{filename}")
    (model / filename).unlink()
    return model


def truncated_weights(inputs: Inputs) -> Path:
    model = copy_model(inputs, "truncated")
    data = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(data[: len(data) // 2])
    return model


def records(count: int) -> bytes:
    return "".join(json.dumps({"text": f"record {i}: the quick brown fox"}) + "\n" for i in range(count)).encode()


def zstd_corpus(inputs: Inputs, damage: str) -> Path:
    packed = bytearray(zstandard.ZstdCompressor(write_checksum=True).compress(records(200)))
    if damage == "truncated":  # an interrupted download
        packed = packed[: len(packed) // 2]
    else:  # flipped bits inside the first block
        packed[20:60] = bytes(byte ^ 0xFF for byte in packed[20:60])
    return write_file(inputs, f"{damage}.jsonl.zst", bytes(packed))


def select(inputs: Inputs, corpus: Path) -> None:
    stages.select_samples(corpus, inputs.tmp / "calibration.jsonl", 4)


def profile_poisoned(inputs: Inputs) -> None:
    """The tiny llama with +inf in one row of a decoder MLP weight: its activations overflow."""
    model = copy_model(inputs, "poisoned")
    tensors = load_file(model / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][3, :] = float("inf")
    save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})
    manifest = inputs.tmp / "manifest.json"
    stages.fetch_model(str(model), manifest)
    samples = write_file(inputs, "samples.jsonl", records(4))
    stages.profile(manifest, samples, *PROFILED(inputs), seq_len=16, batch_size=2, device="cpu", progress=False)


def export_with_scales(inputs: Inputs, edit: Callable[[dict], None] = lambda scales: None) -> Path:
    """stages.export (signed, t = 152) of the tiny llama with an edited copy of its real act_scales.json."""
    manifest = inputs.tmp / "manifest.json"
    stages.fetch_model(str(inputs.model_dir), manifest)
    scales = json.loads(json.dumps(inputs.llama_scales()))
    edit(scales)
    scales_path = inputs.tmp / "act_scales.json"
    scales_path.write_text(json.dumps(scales))
    export, summary = EXPORTED(inputs)
    stages.export(manifest, scales_path, export, "signed-t152", shadow_json=summary)
    return export


def drop_layer(scales: dict) -> None:
    for key in ("ori", "top_0_1", "absmax_ori", "absmax_top_0_1", "all_stat"):
        scales[key].pop("model.layers.0.self_attn.q_proj")


def zero_scale(scales: dict) -> None:
    scales["ori"]["model.layers.0.mlp.down_proj"]["output"] = 0.0
    scales["top_0_1"]["model.layers.0.mlp.down_proj"]["output"] = 0.0


def inspect_damaged(damage: str) -> Callable[[Inputs], tuple[list, list[Path]]]:
    def setup(inputs: Inputs) -> tuple[list, list[Path]]:
        if damage == "truncated":
            good = inputs.tmp / "good.mllm"
            stages.convert(export_with_scales(inputs), good)
            data = good.read_bytes()
            target = write_file(inputs, "cut.mllm", data[: len(data) // 2])
        else:  # a file of another format under an .mllm name
            target = write_file(inputs, "foreign.mllm", b"PK\x03\x04" + bytes(200))
        report = inputs.tmp / "report.json"
        return ["inspect", target, "--json", report], [report]

    return setup


def convert_without_companions(inputs: Inputs) -> None:
    tensors = load_file(export_with_scales(inputs))
    for suffix in (".weight.scale", ".input_scale", ".clip_output"):
        del tensors["model.layers.0.self_attn.q_proj" + suffix]
    export = inputs.tmp / "incomplete-int8.safetensors"
    save_file(tensors, str(export))
    stages.convert(export, *CONVERTED(inputs))


def convert_truncated_export(inputs: Inputs) -> None:
    data = export_with_scales(inputs).read_bytes()
    export = write_file(inputs, "cut-int8.safetensors", data[: len(data) - 100])
    stages.convert(export, *CONVERTED(inputs))


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def download_with_wrong_sha(inputs: Inputs) -> None:
    """A local http server serves a corpus whose sha256 is not the configured one."""
    from shadowquant.inputs.download import dataset_cache_path, download

    served = inputs.tmp / "served"
    served.mkdir()
    (served / "corpus.jsonl").write_bytes(records(10))
    handler = functools.partial(_QuietHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/corpus.jsonl"
    dest = inputs.tmp / dataset_cache_path(url)
    try:
        download(url, dest, sha256="0" * 64, root=inputs.tmp / "resources", allow_http=True, retries=1)
    finally:
        server.shutdown()
        server.server_close()
        # The verified name never appears (checked as the case's output); the bytes stay for inspection.
        assert dest.with_name(dest.name + ".part").is_file()


def downloaded(inputs: Inputs) -> list[Path]:
    return sorted((inputs.tmp / "resources" / "datasets").glob("*-corpus.jsonl"))


def download_escaping(inputs: Inputs) -> None:
    from shadowquant.inputs.download import download

    download("https://example.com/corpus.jsonl", inputs.tmp / "resources" / ".." / "outside.jsonl",
             root=inputs.tmp / "resources")


# ---------------------------------------------------------------- the table


@dataclass(frozen=True)
class Case:
    id: str
    trigger: Callable[[Inputs], Outcome]
    pattern: str  # regex (re.search) the error line must match


CASES = [
    # -- config: rejected while the Snakefile is read (a few through `snakemake -n`, the rest by the same check)
    Case("config-unknown-key", dry_run(**{"calibration.num_sample": 8}),
         r"unknown config key 'calibration\.num_sample'; valid keys here: .*num_samples"),
    Case("config-wrong-type", config_check(**{"calibration.batch_size": "four"}),
         r"config key 'calibration\.batch_size' = 'four' is not valid: expected an integer >= 1"),
    Case("config-zero-num-samples", dry_run(**{"calibration.num_samples": 0}),
         r"config key 'calibration\.num_samples' = 0 is not valid: expected an integer >= 1"),
    Case("config-negative-seq-len", config_check(**{"calibration.seq_len": -8}),
         r"config key 'calibration\.seq_len' = -8 is not valid: expected an integer >= 1"),
    Case("config-negative-budget", config_check(**{"sweep.budget": -0.1}),
         r"config key 'sweep\.budget' = -0\.1 is not valid: expected a number >= 0"),
    Case("config-non-numeric-threshold", config_check(**{"sweep.thresholds": [8, "high"]}),
         r"config key 'sweep\.thresholds\[1\]' = 'high' is not valid: expected a number > 0"),
    Case("config-negative-threshold", config_check(**{"sweep.thresholds": [-4]}),
         r"config key 'sweep\.thresholds\[0\]' = -4 is not valid: expected a number > 0"),
    Case("config-infinite-threshold", config_check(**{"sweep.thresholds": [4, float("inf")]}),
         r"config key 'sweep\.thresholds\[1\]' = inf is not valid: expected a finite number"),
    Case("config-bad-export-point", config_check(**{"export.point": "absmax-q4"}),
         r"config key 'export\.point' = 'absmax-q4' is not valid: expected a string matching"),
    Case("config-deprecated-threshold-without-statistic", config_check(**{"export.threshold": 152}),
         r"config key 'export\.threshold' is deprecated and needs its statistic; set export\.point to "
         r"'absmax-t152' or 'signed-t152' instead"),
    Case("config-unknown-model-type", config_check(**{"model.type": "gpt2"}),
         r"config key 'model\.type' = 'gpt2' is not valid: expected one of null, llama, .*falcon"),
    Case("config-unknown-statistic", config_check(statistic="median"),
         r"config key 'statistic' = 'median' is not valid: expected one of signed, absmax, auto"),
    Case("config-negative-shadow-sides", config_check(**{"sweep.shadow_sides": [5, -1]}),
         r"config key 'sweep\.shadow_sides\[1\]' = -1 is not valid: expected an integer >= 0"),
    Case("config-zero-threads", config_check(**{"threads.profile": 0}),
         r"config key 'threads\.profile' = 0 is not valid: expected an integer >= 1"),
    # -- model
    Case("model-missing-directory", stage(lambda i: fetch(i, i.tmp / "no-such-model"), FETCHED),
         r"model\.source = '.*no-such-model': no such file or directory; valid sources: 'hf:<org>/<repo>'"),
    Case("model-no-config-json", stage(lambda i: fetch(i, without(i, "config.json")), FETCHED),
         r"no-config\.json: no config\.json; not a Hugging Face model directory \(expected config\.json"),
    Case("model-no-weights", stage(lambda i: fetch(i, without(i, "model.safetensors")), FETCHED),
         r"no-model\.safetensors: no model weights found \(expected model\.safetensors"),
    Case("model-truncated-safetensors", stage(lambda i: fetch(i, truncated_weights(i)), FETCHED),
         r"truncated/model\.safetensors: safetensors file is truncated or corrupt \(\d+ bytes, its header describes "
         r"\d+\); download or convert the model again"),
    Case("model-gguf-not-gguf", stage(lambda i: fetch(i, write_file(i, "model.gguf", b"<html>404</html>")), FETCHED),
         r"model\.gguf: not a GGUF file \(it does not start with the bytes 'GGUF'\)"),
    Case("model-type-contradicts-model", stage(lambda i: fetch(i, i.model_dir, model_type="opt"), FETCHED),
         r"config\.json: model\.type = 'opt' contradicts the model: its config\.json model_type is 'llama' "
         r"\(family 'llama'\); set model\.type to 'llama' or null"),
    Case("model-unsupported-gpt2",
         snakemake_run(f"resources/models/{NAME}/manifest.json", [f"resources/models/{NAME}/manifest.json"],
                       lambda i: {"model.source": str(gpt2_model(i))}),
         r"gpt2/config\.json: unsupported model architecture: config\.json model_type = 'gpt2'; supported "
         r"families: llama, qwen1, qwen2, gemma, phi, opt, mixtral, falcon"),
    Case("model-unsupported-bert", stage(lambda i: fetch(i, bert_model(i)), FETCHED),
         r"bert/config\.json: unsupported model architecture: config\.json model_type = 'bert'"),
    Case("model-hub-id-offline",
         cli(lambda i: (["fetch-model", "--source", "hf:HuggingFaceTB/SmolLM2-135M", "--manifest",
                         i.tmp / "m/manifest.json"], [i.tmp / "m/manifest.json"]), HF_HUB_OFFLINE="1"),
         r"model\.source = 'hf:HuggingFaceTB/SmolLM2-135M': the Hugging Face hub is unreachable .*point "
         r"model\.source to a local copy"),
    # -- dataset
    Case("dataset-missing-file", dry_run(**{"calibration.dataset": "data/missing.jsonl"}),
         r"config key 'calibration\.dataset': dataset file 'data/missing\.jsonl' not found"),
    Case("dataset-truncated-zst", stage(lambda i: select(i, zstd_corpus(i, "truncated")), SELECTED),
         r"truncated\.jsonl\.zst: truncated zstd file \(it ends inside a frame at byte \d+\)"),
    Case("dataset-corrupt-zst", stage(lambda i: select(i, zstd_corpus(i, "corrupt")), SELECTED),
         r"corrupt\.jsonl\.zst(:\d+)?: (corrupt zstd data|not zstd data)"),
    Case("dataset-no-text-field",
         stage(lambda i: select(i, write_file(i, "chat.jsonl", b'{"content": "hi", "role": "user"}\n')), SELECTED),
         r"chat\.jsonl:1: record has no 'text' field \(its keys: content, role\)"),
    Case("dataset-empty", stage(lambda i: select(i, write_file(i, "empty.jsonl", b"\n")), SELECTED),
         r"empty\.jsonl: the corpus has no records \(expected JSON lines with a 'text' field"),
    Case("dataset-fewer-records-than-num-samples",
         snakemake_run(f"results/{NAME}/calibration.jsonl", [f"results/{NAME}/calibration.jsonl"],
                       lambda i: {"calibration.dataset": str(write_file(i, "small.jsonl", records(3)))}),
         r"small\.jsonl: the corpus has 3 records, but calibration needs 4; lower calibration\.num_samples to "
         r"at most 3"),
    Case("dataset-not-utf8",
         stage(lambda i: select(i, write_file(i, "latin1.jsonl", '{"text": "caf\xe9"}\n'.encode("latin-1"))),
               SELECTED),
         r"latin1\.jsonl:1: not UTF-8 text \(byte 0xe9 at byte offset 13\); re-encode the file as UTF-8"),
    Case("dataset-sha256-mismatch", stage(download_with_wrong_sha, downloaded),
         r"corpus\.jsonl\.part: sha256 mismatch for http://127\.0\.0\.1:\d+/corpus\.jsonl: expected 0{64}, got "
         r"[0-9a-f]{64}; the file is kept"),
    # -- activations
    Case("activations-non-finite", stage(profile_poisoned, PROFILED),
         r"non-finite activation \(NaN or Inf\) in layer 'model\.layers\.1\.mlp\.up_proj' output for calibration "
         r"sample \d+"),
    Case("act-scales-missing-layers", stage(lambda i: export_with_scales(i, drop_layer), EXPORTED),
         r"act_scales\.json: missing layers model\.layers\.0\.self_attn\.q_proj \(1 of \d+\); profile this "
         r"model again"),
    Case("act-scales-non-positive-scale", stage(lambda i: export_with_scales(i, zero_scale), EXPORTED),
         r"act_scales\.json: layer 'model\.layers\.0\.mlp\.down_proj' output scale 0\.0 under statistic 'signed' "
         r"is not a positive finite number; int8 scales must be > 0"),
    # -- files
    Case("mllm-truncated", cli(inspect_damaged("truncated")),
         r"cut\.mllm: tensor '.*' data \[\d+, \d+\) lies outside the data region .*: truncated or corrupt file"),
    Case("mllm-foreign-file", cli(inspect_damaged("foreign")),
         r"foreign\.mllm: not an mllm file: first bytes 504b0304 match neither the v1 magic 20012 nor the v2 magic"),
    Case("export-missing-companions", stage(convert_without_companions, CONVERTED),
         r"incomplete-int8\.safetensors: the converted model fails inspection: "
         r"model\.layers\.0\.self_attn\.q_proj\.weight\.scale missing.*re-run the int8 export"),
    Case("export-truncated", stage(convert_truncated_export, CONVERTED),
         r"cut-int8\.safetensors: safetensors file is truncated or corrupt \(\d+ bytes, its header describes \d+\)"),
    # -- security
    Case("security-model-name-escapes", dry_run(**{"model.name": "../../outside"}),
         r"config key 'model\.name' = '\.\./\.\./outside' is not valid: expected a string matching "),
    Case("security-hub-id-escapes", stage(lambda i: fetch(i, "hf:../../etc"), FETCHED),
         r"model\.source = 'hf:\.\./\.\./etc': expected 'hf:<org>/<repo>'"),
    Case("security-download-escapes-resources", stage(download_escaping, under("outside.jsonl")),
         r"download destination '.*resources/\.\./outside\.jsonl' is outside '.*resources'"),
    Case("security-http-dataset-url", dry_run(**{"calibration.dataset": "http://example.com/corpus.jsonl"}),
         r"config key 'calibration\.dataset' = 'http://example\.com/corpus\.jsonl': use builtin:pydoc, an https:// "
         r"URL or a local"),
]


@pytest.fixture(scope="module")
def llama_scales(tmp_path_factory, tiny_model_dir, tiny_text_corpus) -> Callable[[], dict]:
    """The real act_scales of the tiny llama (profiled once, on first use)."""

    @functools.cache
    def get() -> dict:
        tmp = tmp_path_factory.mktemp("llama_scales")
        stages.fetch_model(str(tiny_model_dir("llama")), tmp / "manifest.json")
        stages.select_samples(tiny_text_corpus, tmp / "samples.jsonl", 4)
        return stages.profile(tmp / "manifest.json", tmp / "samples.jsonl", tmp / "a.json", tmp / "a.csv",
                              seq_len=16, batch_size=2, device="cpu", progress=False)

    return get


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_gets_one_clear_line_and_leaves_no_output(case, tmp_path, tiny_model_dir, tiny_tokenizer_dir,
                                                            tiny_text_corpus, llama_scales, capsys):
    inputs = Inputs(tmp_path, tiny_model_dir("llama"), tiny_tokenizer_dir, tiny_text_corpus, llama_scales)
    outcome = case.trigger(inputs)
    with capsys.disabled():
        print(f"\n[{case.id}] {outcome.message}")
    assert "\n" not in outcome.message and outcome.message.strip() == outcome.message
    assert re.search(case.pattern, outcome.message), f"{outcome.message!r} does not match {case.pattern!r}"
    left = [path for path in outcome.absent if path.exists()]
    assert not left, f"outputs left after the failure: {left}"


def test_trust_remote_code_is_off_by_default_and_logged_when_on(tiny_model_dir, caplog):
    from shadowquant.config import validate_config
    from shadowquant.model.loading import HUB_PATTERNS, load_model

    assert validate_config({})["model"]["trust_remote_code"] is False
    assert not any(pattern.endswith(".py") for pattern in HUB_PATTERNS)  # no code is even downloaded
    with caplog.at_level(logging.WARNING, logger="shadowquant.model.loading"):
        load_model(tiny_model_dir("llama"), device="cpu", dtype="float32")
    assert not [r for r in caplog.records if "trust_remote_code" in r.getMessage()]
    with caplog.at_level(logging.WARNING, logger="shadowquant.model.loading"):
        load_model(tiny_model_dir("llama"), device="cpu", dtype="float32", trust_remote_code=True)
    assert [r for r in caplog.records if r.levelno == logging.WARNING and "trust_remote_code is on" in r.getMessage()]


def test_dataset_url_path_cannot_leave_the_datasets_folder():
    from shadowquant.inputs.download import dataset_cache_path

    for url in ("https://example.com/../../../etc/passwd", "https://example.com/a/..%2F..%2F..%2Fx.jsonl.zst",
                "https://example.com/..", "https://example.com/"):
        path = dataset_cache_path(url)
        assert re.fullmatch(r"resources/datasets/[0-9a-f]{12}-[A-Za-z0-9_][A-Za-z0-9._-]*", path), path
        assert ".." not in Path(path).parts
