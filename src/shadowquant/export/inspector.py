"""Inspect an mllm file: dtype histogram, quantized Linears and what the QNN runtime would miss.

A quantized Linear `X` is any prefix with one of the companions the runtime
pulls (`X.weight.scale`, `X.input_scale`, `X.output_scale`, `X.clip_input`,
`X.clip_output`) or an int8 `X.weight`. docs/method.md section 4 keeps the weights of
layers whose name contains `head` in float while still giving them activation
scales, so such a prefix is checked as a float-weight Linear instead of being
reported for lacking an int8 weight.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from shadowquant.errors import PipelineError
from shadowquant.export.mllm import (
    DTYPE_FLOAT16,
    DTYPE_FLOAT32,
    DTYPE_INT8,
    DTYPE_NAMES,
    DTYPE_Q4_0,
    DTYPE_Q8_0,
    MllmFile,
    read_mllm,
    read_safetensors_specs,
    stored_dtype_code,
)
from shadowquant.runtimes import runtime_of

ACTIVATION_SCALE_SUFFIXES = (".input_scale", ".output_scale")
CLIP_FLAG_SUFFIXES = (".clip_input", ".clip_output")
COMPANION_SUFFIXES = (".weight.scale",) + ACTIVATION_SCALE_SUFFIXES + CLIP_FLAG_SUFFIXES
FLOAT_WEIGHT_CODES = (DTYPE_FLOAT32, DTYPE_FLOAT16)


@dataclass
class DtypeStat:
    count: int = 0
    bytes: int = 0


@dataclass
class LinearInfo:
    prefix: str
    weight_quantized: bool  # False for the float-weight `head` layers of docs/method.md section 4
    has_bias: bool


@dataclass
class Problem:
    name: str  # the tensor that is missing or bad
    what: str


@dataclass
class InspectReport:
    path: str
    version: int
    model_name: str | None
    file_bytes: int
    tensor_count: int
    total_bytes: int  # tensor data only
    dtypes: dict[int, DtypeStat]
    linears: list[LinearInfo]
    problems: list[Problem] = field(default_factory=list)
    head: str = ""  # how the output projection is stored: its own lm_head.weight, or tied to the embeddings
    notes: list[str] = field(default_factory=list)  # how the file was made (e.g. the transform), from the export

    @property
    def quantized_linears(self) -> list[LinearInfo]:
        return [linear for linear in self.linears if linear.weight_quantized]

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "version": self.version,
            "model_name": self.model_name,
            "file_bytes": self.file_bytes,
            "tensor_count": self.tensor_count,
            "total_bytes": self.total_bytes,
            "dtypes": {
                DTYPE_NAMES[code]: {"code": code, "count": stat.count, "bytes": stat.bytes}
                for code, stat in sorted(self.dtypes.items())
            },
            "quantized_linear_count": len(self.quantized_linears),
            "linears": [asdict(linear) for linear in self.linears],
            "problems": [asdict(problem) for problem in self.problems],
            "head": self.head,
            "notes": list(self.notes),
            "ok": self.ok,
        }


def find_linear_prefixes(mllm: MllmFile) -> list[str]:
    """Prefixes X that look like a quantized Linear, in file order."""
    prefixes: dict[str, None] = {}
    for entry in mllm.entries:
        for suffix in COMPANION_SUFFIXES:
            if entry.name.endswith(suffix):
                prefixes.setdefault(entry.name[: -len(suffix)])
        if entry.name.endswith(".weight") and entry.dtype == DTYPE_INT8:
            prefixes.setdefault(entry.name[: -len(".weight")])
    return list(prefixes)


class _LinearChecker:
    """Checks the companions of one Linear prefix, collecting problems."""

    def __init__(self, mllm: MllmFile, problems: list[Problem]):
        self.mllm = mllm
        self.problems = problems

    def bad(self, name: str, what: str) -> None:
        self.problems.append(Problem(name, what))

    def exists(self, name: str) -> bool:
        if name not in self.mllm:
            self.bad(name, "missing")
            return False
        return True

    def dtype_is(self, name: str, codes: Sequence[int]) -> bool:
        entry = self.mllm.entry(name)
        if entry.dtype not in codes:
            wanted = " or ".join(f"{DTYPE_NAMES[c]} ({c})" for c in codes)
            self.bad(name, f"dtype {entry.dtype_name} ({entry.dtype}), expected {wanted}")
            return False
        return True

    def scalar(self, name: str, code: int) -> float | None:
        """The value of a one-element tensor of dtype `code`, or None after reporting why not."""
        if not self.exists(name) or not self.dtype_is(name, (code,)):
            return None
        entry = self.mllm.entry(name)
        if entry.numel != 1:
            self.bad(name, f"{entry.numel} elements, expected 1")
            return None
        return float(self.mllm.read(name).reshape(-1)[0])

    def positive_scale(self, name: str) -> None:
        value = self.scalar(name, DTYPE_FLOAT32)
        if value is not None and not (math.isfinite(value) and value > 0):
            self.bad(name, f"value {value}, expected a positive finite scale")

    def clip_flag(self, name: str) -> None:
        value = self.scalar(name, DTYPE_INT8)
        if value is not None and value not in (0, 1):
            self.bad(name, f"value {int(value)}, expected 0 or 1")

    def weight_shape(self, name: str) -> None:
        shape = self.mllm.entry(name).shape
        if shape is not None and len(shape) != 2:
            self.bad(name, f"shape {shape}, expected 2-D [in_features, out_features]")

    def check(self, prefix: str) -> LinearInfo:
        weight, bias = f"{prefix}.weight", f"{prefix}.bias"
        quantized = "head" not in prefix
        if quantized:
            if self.exists(weight) and self.dtype_is(weight, (DTYPE_INT8,)):
                self.weight_shape(weight)
            self.positive_scale(f"{weight}.scale")
        elif self.exists(weight) and self.dtype_is(weight, FLOAT_WEIGHT_CODES):
            self.weight_shape(weight)
        for suffix in ACTIVATION_SCALE_SUFFIXES:
            self.positive_scale(prefix + suffix)
        for suffix in CLIP_FLAG_SUFFIXES:
            self.clip_flag(prefix + suffix)
        has_bias = bias in self.mllm
        if quantized and has_bias:
            self.dtype_is(bias, (DTYPE_INT8,))
            self.positive_scale(f"{bias}.scale")
        elif quantized and f"{bias}.scale" in self.mllm:
            self.bad(bias, f"missing although {bias}.scale exists")
        return LinearInfo(prefix, quantized, has_bias)


def _check_expected(
    mllm: MllmFile,
    expected_shapes: dict[str, tuple[int, ...]],
    expected_dtypes: dict[str, int] | None,
    problems: list[Problem],
) -> None:
    """Compare the file with the tensors it should hold (e.g. those of the safetensors export)."""
    already_reported = {problem.name for problem in problems}
    for name, shape in expected_shapes.items():
        if name in already_reported:
            continue
        if name not in mllm:
            problems.append(Problem(name, "missing (present in the expected tensor list)"))
            continue
        entry = mllm.entry(name)
        if expected_dtypes is not None and name in expected_dtypes and entry.dtype != expected_dtypes[name]:
            want = expected_dtypes[name]
            problems.append(Problem(name, f"dtype {entry.dtype_name} ({entry.dtype}), expected {DTYPE_NAMES[want]} ({want})"))
            continue
        if entry.shape is not None and entry.shape != tuple(shape):
            problems.append(Problem(name, f"shape {entry.shape}, expected {tuple(shape)}"))
        elif entry.numel != math.prod(shape):
            problems.append(Problem(name, f"{entry.numel} elements, expected {math.prod(shape)} for shape {tuple(shape)}"))


def loaded_problems(mllm: MllmFile, expected: dict[str, tuple[int, int]]) -> list[Problem]:
    """Every tensor of `expected` ({name: (dtype code, byte size)}, what a C++ model's ops ask the loader
    for) present ("missing" otherwise), with that dtype and byte size: mllm's loader skips a missing name
    without a word (the op computes with uninitialised memory) and rejects or truncates another size."""
    problems: list[Problem] = []
    checker = _LinearChecker(mllm, problems)
    for name, (code, size) in expected.items():
        if not checker.exists(name) or not checker.dtype_is(name, (code,)):
            continue
        entry = mllm.entry(name)
        if entry.size != size:
            checker.bad(name, f"{entry.size} bytes, the runtime allocates {size} (its loader would reject it)")
    return problems


def prefill_loaded(runtime: dict) -> dict[str, tuple[int, int]]:
    """What the runtime profile's C++ NPU model loads for the model runtime.json describes (its
    cpp_config and shadow layers): {name: (dtype code, byte size)}."""
    from shadowquant.runtimes.profiles import get_profile, loaded_tensors

    try:
        return loaded_tensors(get_profile(str(runtime.get("runtime"))), runtime["cpp_config"],
                              runtime.get("shadow_layers", []))
    except (KeyError, TypeError, ValueError) as exc:
        raise PipelineError(f"runtime.json: incomplete ({exc}); re-run the int8 export") from None


def decode_loaded(runtime: dict, mllm: MllmFile) -> dict[str, tuple[int, int]]:
    """What the profile's CPU decoding model loads, each weight with the byte size its own dtype in `mllm`
    needs (Q4_0 and Q8_0 in any mix, as the bundle's recipes write them)."""
    from shadowquant.decoding.candidates import file_dtype_of
    from shadowquant.runtimes.profiles import decode_loaded_tensors, get_profile

    try:
        return decode_loaded_tensors(get_profile(str(runtime.get("runtime"))), runtime["cpp_config"],
                                     file_dtype_of(mllm))
    except (KeyError, TypeError, ValueError) as exc:
        raise PipelineError(f"runtime.json: incomplete ({exc}); re-run the int8 export") from None


def is_decoding_model(mllm: MllmFile) -> bool:
    """A file holding Q4_0 or Q8_0 tensors is a CPU decoding model (the bundle's decode.mllm), not an int8
    export."""
    return any(entry.dtype in (DTYPE_Q4_0, DTYPE_Q8_0) for entry in mllm.entries)


def _check_decoding(mllm: MllmFile, runtime: dict, problems: list[Problem]) -> list[LinearInfo]:
    """Every tensor the profile's CPU decoding model loads (decode_loaded): present, with the byte size its
    own dtype needs, norms and biases float32."""
    from shadowquant.decoding.candidates import decode_dtype_issues

    expected = decode_loaded(runtime, mllm)
    problems.extend(Problem(name, f"dtype {what}") for name, what in decode_dtype_issues(mllm))
    problems.extend(loaded_problems(mllm, expected))
    return [LinearInfo(name[: -len(".weight")], True, f"{name[: -len('.weight')]}.bias" in mllm)
            for name, (code, _) in expected.items()
            if code in (DTYPE_Q4_0, DTYPE_Q8_0) and name.endswith("_proj.weight")]


def _check_runtime(mllm: MllmFile, runtime: dict, problems: list[Problem]) -> list[LinearInfo]:
    """Every tensor the runtime profile's C++ model loads: present, with its dtype and the byte size the op
    allocates (mllm's loader rejects another size and skips a missing name silently); scales positive,
    clip flags 0 or 1 and only where runtime.json names a shadow layer."""
    from shadowquant.runtimes.profiles import layer_index

    expected = prefill_loaded(runtime)
    problems.extend(loaded_problems(mllm, expected))
    checker = _LinearChecker(mllm, problems)
    for name in expected:
        if name in mllm and not any(p.name == name for p in problems):
            if name.endswith(ACTIVATION_SCALE_SUFFIXES + (".weight.scale", ".bias.scale")):
                checker.positive_scale(name)
            elif name.endswith(CLIP_FLAG_SUFFIXES):
                checker.clip_flag(name)
    shadow = set(runtime.get("shadow_layers", []))
    for entry in mllm.entries:
        if entry.name.endswith(CLIP_FLAG_SUFFIXES) and layer_index(entry.name) not in shadow:
            checker.bad(entry.name, f"clip flag of layer {layer_index(entry.name)}, which runtime.json's shadow "
                                    f"layers {sorted(shadow)} do not name")
    return [LinearInfo(name[: -len(".weight")], True, f"{name[: -len('.weight')]}.bias" in mllm)
            for name, (code, _) in expected.items() if name.endswith(".weight") and code == DTYPE_INT8]


def inspect_mllm(
    path: str | os.PathLike,
    expected_shapes: dict[str, tuple[int, ...]] | None = None,
    expected_dtypes: dict[str, int] | None = None,
    runtime: dict | None = None,
) -> InspectReport:
    """Inspect an mllm file; raises PipelineError if it is truncated or not an mllm file.

    `expected_shapes` (name -> shape, e.g. from the safetensors export) adds a
    check that every listed tensor exists with that shape (element count for
    v1, which stores no shapes); `expected_dtypes` (name -> stored dtype code)
    likewise checks dtypes. `runtime` (runtime.json of an NPU runtime profile)
    checks the file against what that profile's C++ model loads instead of the
    original tools' per-Linear contract.
    """
    mllm = read_mllm(path)
    dtypes: dict[int, DtypeStat] = {}
    for entry in mllm.entries:
        stat = dtypes.setdefault(entry.dtype, DtypeStat())
        stat.count += 1
        stat.bytes += entry.size
    problems: list[Problem] = []
    # A runtime with a C++ model is checked against what that model loads; else Linear by Linear.
    cpp_model = runtime is not None and bool(runtime_of(runtime).profile.cpp_model)
    decoding = cpp_model and is_decoding_model(mllm)
    if decoding:
        linears = _check_decoding(mllm, runtime, problems)
    elif cpp_model:
        linears = _check_runtime(mllm, runtime, problems)
    else:
        checker = _LinearChecker(mllm, problems)
        linears = [checker.check(prefix) for prefix in find_linear_prefixes(mllm)]
    if expected_shapes is not None:
        _check_expected(mllm, expected_shapes, expected_dtypes, problems)
    names = [entry.name for entry in mllm.entries]
    if any(name.endswith("lm_head.weight") for name in names):
        head = "its own tensor (lm_head.weight), not tied to the embeddings"
    else:
        head = "no lm_head.weight stored (tied to the embeddings)"
    return InspectReport(
        path=str(path),
        version=mllm.version,
        model_name=mllm.model_name,
        file_bytes=mllm.file_size,
        tensor_count=len(mllm.entries),
        total_bytes=sum(stat.bytes for stat in dtypes.values()),
        dtypes=dtypes,
        linears=linears,
        problems=problems,
        head=head,
        notes=[f"checked as the CPU decoding model of runtime profile {runtime['runtime']}: every tensor its C++ "
               f"model loads, with the dtype and byte size it allocates"] if decoding else
        [f"checked against runtime profile {runtime['runtime']}: every tensor its C++ model loads, with "
         f"the byte size it allocates; shadow layers {runtime.get('shadow_layers', [])}"]
        if cpp_model else [],
    )


def expectations_from_safetensors(path: str | os.PathLike, version: int) -> tuple[dict, dict]:
    """Expected shapes and stored dtype codes of an mllm file of `version` converted from `path`."""
    specs = read_safetensors_specs(path)
    shapes = {spec.name: spec.shape for spec in specs}
    try:
        codes = {spec.name: stored_dtype_code(spec.dtype, version, spec.name) for spec in specs}
    except PipelineError as exc:
        raise PipelineError(f"{Path(path)}: {exc}") from None
    return shapes, codes


def read_runtime_json(path: str | os.PathLike) -> dict:
    """runtime.json written by the int8 export."""
    import json

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PipelineError(f"{path}: runtime.json not found (the int8 export writes it)") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise PipelineError(f"{path}: not valid JSON; re-run the int8 export") from None
    if not isinstance(data, dict) or "runtime" not in data:
        raise PipelineError(f"{path}: expected a JSON object with a 'runtime' key (written by the int8 export)")
    return data


def _megabytes(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def format_report(report: InspectReport) -> str:
    """Human-readable summary of an InspectReport."""
    title = f"{report.path}: mllm v{report.version}"
    if report.model_name:
        title += f" ({report.model_name!r})"
    lines = [
        title,
        f"  tensors: {report.tensor_count}, data {_megabytes(report.total_bytes)}, file {_megabytes(report.file_bytes)}",
        "  dtypes:",
    ]
    for code, stat in sorted(report.dtypes.items()):
        lines.append(f"    {DTYPE_NAMES[code]:>8} ({code:>3}): {stat.count:>6} tensors, {_megabytes(stat.bytes):>10}")
    quantized = report.quantized_linears
    lines.append(
        f"  quantized Linears: {len(quantized)} ({sum(linear.has_bias for linear in quantized)} with bias)"
    )
    if report.head:
        lines.append(f"  lm_head: {report.head}")
    lines.extend(f"  note: {note}" for note in report.notes)
    float_heads = [linear.prefix for linear in report.linears if not linear.weight_quantized]
    if float_heads:
        lines.append(f"  float-weight Linears with activation scales: {', '.join(float_heads)}")
    if report.problems:
        lines.append(f"  problems: {len(report.problems)}")
        lines.extend(f"    {problem.name}: {problem.what}" for problem in report.problems)
    else:
        lines.append("  problems: none")
    return "\n".join(lines)
