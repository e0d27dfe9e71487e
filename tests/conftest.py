"""Shared fixtures: a tiny tokenizer, tiny random models of every family and a small text corpus."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

import pytest

# As the workflow's jobs (common.smk): a busy machine must not change MKL's thread split, or the
# last-bit comparisons (test_runtime's numbers from before the runtime profiles) see another sum order.
os.environ.setdefault("MKL_DYNAMIC", "FALSE")

from mllm_loader_helpers import build_native_loader
from shadowquant.model.tiny import build_tiny_model, pydoc_texts, train_tokenizer


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer (320 tokens, <s> prepended, <pad> set) trained on pydoc text."""
    path = tmp_path_factory.mktemp("tiny_tokenizer")
    train_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer_dir) -> Callable[[str], Path]:
    """Factory: family -> directory of a tiny random model of that family (built once per session)."""
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            out = tmp_path_factory.mktemp(f"tiny_{family}") / "model"
            built[family] = build_tiny_model(family, out, tiny_tokenizer_dir, seed=0)
        return built[family]

    return get


@pytest.fixture(scope="session")
def tiny_text_corpus(tmp_path_factory) -> Path:
    """A .jsonl of 200 records ({"text": ...}) made of pydoc paragraphs."""
    paragraphs = [
        " ".join(block.split())
        for text in pydoc_texts()
        for block in text.split("\n\n")
        if len(block.strip()) >= 80
    ]
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    with open(path, "w", encoding="utf-8") as handle:
        for paragraph in paragraphs[:200]:
            handle.write(json.dumps({"text": paragraph}) + "\n")
    return path


@pytest.fixture(scope="session")
def native_loader(tmp_path_factory) -> Path:
    """mllm's parameter loader re-implemented in C++ (tests/native), built with the system compiler."""
    binary = build_native_loader(tmp_path_factory.mktemp("native"))
    if binary is None:
        pytest.skip("no C++ compiler for mllm's loader re-implementation (Debian: apt-get install g++)")
    return binary


@pytest.fixture(scope="session")
def profiled_tiny_llama(tmp_path_factory, tiny_model_dir, tiny_text_corpus) -> Callable[[Path], Path]:
    """Factory: directory -> that directory holding a tiny llama fetched (model/manifest.json), 8
    calibration records (calib.jsonl) profiled at 32 tokens (act.json, act.csv) and its qwen-npu runtime
    scales (rs.json); profiled once per session, copied for each caller, who adds its own files."""
    from shadowquant import stages
    from shadowquant.calibrate.runtime_scales import runtime_scales_stage

    base = tmp_path_factory.mktemp("profiled_llama")
    manifest = base / "model" / "manifest.json"
    stages.fetch_model(str(tiny_model_dir("llama")), manifest)
    stages.select_samples(tiny_text_corpus, base / "calib.jsonl", 8)
    stages.profile(manifest, base / "calib.jsonl", base / "act.json", base / "act.csv", seq_len=32, batch_size=4,
                   progress=False)
    runtime_scales_stage(manifest, base / "calib.jsonl", base / "act.json", base / "rs.json", "qwen-npu", 0.001, 8,
                         32, 2, 16)

    def copy(into: Path) -> Path:
        shutil.copytree(base, into, dirs_exist_ok=True, symlinks=True)
        return into

    return copy

