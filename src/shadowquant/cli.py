"""Command line: `python -m shadowquant <command>`; the stages the Snakemake rules run, by hand."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

from shadowquant.errors import PipelineError


def _point(text: str) -> str:
    from shadowquant.runtimes.decision import parse_point

    try:
        parse_point(text)
    except PipelineError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _evaluation_args(s) -> None:
    s.add_argument("--manifest", required=True)
    s.add_argument("--samples", required=True, help="evaluation.jsonl")
    s.add_argument("--seq-len", type=int, default=128)
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--device", default="auto")
    s.add_argument("--dtype", default="auto")
    s.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the intervals")


def _runtime_args(s, scales_for: str) -> None:
    from shadowquant.runtimes.profiles import DEFAULT_PROFILE, PROFILE_NAMES

    s.add_argument("--runtime", choices=PROFILE_NAMES, default=DEFAULT_PROFILE,
                   help="the runtime profile simulated (docs/runtime.md); 'ideal' is the original tools' W8A8")
    s.add_argument("--runtime-scales", default=None, help=f"runtime_scales.json (needed {scales_for} under an NPU "
                   "profile; the runtime-scales command writes it)")


def build_parser() -> argparse.ArgumentParser:
    from shadowquant.runtimes.profiles import DEFAULT_PROFILE

    p = argparse.ArgumentParser(prog="shadowquant", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("inspect", help="check an mllm model file", add_help=False)
    s.add_argument("rest", nargs=argparse.REMAINDER)

    s = sub.add_parser("validate-config", help="validate a config file and print it with defaults")
    s.add_argument("config")

    s = sub.add_parser("fetch-model", help="resolve model.source into a local model directory + manifest")
    s.add_argument("--source", required=True)
    s.add_argument("--manifest", required=True)
    s.add_argument("--type", default=None)
    s.add_argument("--revision", default=None)
    s.add_argument("--trust-remote-code", action="store_true")

    s = sub.add_parser("select-samples", help="pick records of a corpus as docs/method.md section 1 does")
    s.add_argument("--corpus", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--num-samples", type=int, required=True)
    s.add_argument("--offset", type=int, default=0)

    s = sub.add_parser("profile", help="profile activations into act_scales.json")
    s.add_argument("--manifest", required=True)
    s.add_argument("--samples", required=True)
    s.add_argument("--out-json", required=True)
    s.add_argument("--out-table", required=True)
    s.add_argument("--seq-len", type=int, default=512)
    s.add_argument("--batch-size", type=int, default=1)
    s.add_argument("--device", default="auto")
    s.add_argument("--dtype", default="auto")
    s.add_argument("--checkpoint-dir", default=None)
    s.add_argument("--checkpoint-every", type=int, default=0)

    s = sub.add_parser("decide", help="clip/shadow decision of one sweep point")
    s.add_argument("--act-scales", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--point", type=_point, default="signed-t152",
                   help="'<statistic>-t<threshold>' (ratio rule) or '<statistic>-k<k>' (needs --sensitivity); "
                        "the shadow sides of runtime profile ideal")
    s.add_argument("--sensitivity", default=None, help="sensitivity.csv, for '-k' points")

    s = sub.add_parser("export", help="int8 export (safetensors) of one sweep point")
    s.add_argument("--manifest", required=True)
    s.add_argument("--act-scales", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--point", type=_point, default="signed-t152")
    s.add_argument("--sensitivity", default=None, help="sensitivity.csv, for '-k' points")
    s.add_argument("--clip-scales", default=None, help="clip_scales.json, for '-mse' points")
    s.add_argument("--shadow-json", default=None, help="also write the shadow sides summary here")
    s.add_argument("--runtime-json", default=None, help="also write runtime.json (what the C++ model needs) here")
    s.add_argument("--weight-range", choices=["max", "mse"], default="max",
                   help="per-tensor int8 weight clip range (the workflow's weight_range.json says which)")
    _runtime_args(s, "for every point")

    s = sub.add_parser("evaluate-float", help="float metrics and the baseline every sweep point compares with")
    _evaluation_args(s)
    s.add_argument("--out-json", required=True)
    s.add_argument("--out-baseline", required=True)

    s = sub.add_parser("sensitivity", help="per-side sensitivity ranking (sensitivity.csv)")
    s.add_argument("--manifest", required=True)
    s.add_argument("--samples", required=True, help="calibration.jsonl; the first --num-samples records are used")
    s.add_argument("--act-scales", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--statistics", nargs="+", choices=["signed", "absmax"], default=["absmax"])
    s.add_argument("--num-samples", type=int, default=8, help="records for the proxy")
    s.add_argument("--seq-len", type=int, default=128)
    s.add_argument("--measure-top", type=int, default=40, help="sides measured exactly, the proxy's top first")
    s.add_argument("--measure-samples", type=int, default=4, help="records for the exact measurement")
    s.add_argument("--cost", choices=["elements", "sides"], default="elements")
    s.add_argument("--device", default="auto")
    s.add_argument("--dtype", default="auto")
    s.add_argument("--weight-range", choices=["max", "mse"], default="max",
                   help="per-tensor int8 weight clip range (the workflow's weight_range.json says which)")
    _runtime_args(s, "for the layer ranking")

    s = sub.add_parser("runtime-scales", help="ranges chosen for the runtime: shadow ranges under the CPU cap, "
                                              "max or MSE per clamped side (runtime_scales.json)")
    s.add_argument("--manifest", required=True)
    s.add_argument("--samples", required=True, help="calibration.jsonl; the first --num-samples records are used")
    s.add_argument("--act-scales", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--runtime", default=DEFAULT_PROFILE, help="an NPU runtime profile (docs/runtime.md)")
    s.add_argument("--cpu-cap", type=float, default=0.001, help="share of Linear multiply-adds the CPU may run")
    s.add_argument("--num-samples", type=int, default=32, help="records for the histograms")
    s.add_argument("--seq-len", type=int, default=256)
    s.add_argument("--fisher-samples", type=int, default=8, help="records for the max/MSE choice")
    s.add_argument("--fisher-seq-len", type=int, default=128)
    s.add_argument("--device", default="auto")
    s.add_argument("--dtype", default="auto")

    s = sub.add_parser("clip-scales", help="MSE-optimal clip scales of every quantized side (clip_scales.json)")
    s.add_argument("--manifest", required=True)
    s.add_argument("--samples", required=True, help="calibration.jsonl; the first --num-samples records are used")
    s.add_argument("--act-scales", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--statistics", nargs="+", choices=["signed", "absmax"], default=["absmax"])
    s.add_argument("--num-samples", type=int, default=8)
    s.add_argument("--seq-len", type=int, default=256)
    s.add_argument("--device", default="auto")
    s.add_argument("--dtype", default="auto")

    s = sub.add_parser("evaluate-point", help="simulated W8A8 evaluation of one sweep point (or a breakdown part)")
    _evaluation_args(s)
    s.add_argument("--act-scales", required=True)
    s.add_argument("--baseline", required=True)
    s.add_argument("--float-json", required=True)
    s.add_argument("--out-json", required=True)
    s.add_argument("--point", type=_point, required=True)
    s.add_argument("--sensitivity", default=None, help="sensitivity.csv, for '-k' points")
    s.add_argument("--clip-scales", default=None, help="clip_scales.json, for '-mse' points")
    s.add_argument("--part", choices=["all", "weights", "inputs", "outputs"], default="all")
    s.add_argument("--weight-range", choices=["max", "mse"], default="max",
                   help="per-tensor int8 weight clip range (the workflow's weight_range.json says which)")
    _runtime_args(s, "for every point")

    s = sub.add_parser("evaluate-demo", help="the bundle as mllm's NPU demo runs it: int8 prefill of each record's "
                       "first half, CPU decoding model for the rest (docs/bundle.md)")
    s.add_argument("--manifest", required=True, help="the exported variant's manifest (the prefill model's float)")
    s.add_argument("--export", required=True, help="model-int8.safetensors")
    s.add_argument("--runtime-json", required=True, help="the export's runtime.json (chunk_size)")
    s.add_argument("--samples", required=True, help="evaluation.jsonl")
    s.add_argument("--decode", required=True, help="the decoding model file (.mllm)")
    s.add_argument("--decode-choice", default=None, help="decode_choice.json (its manifest: the decoding model's "
                   "float model); default the --manifest")
    s.add_argument("--baseline", default=None, help="the --manifest's float-baseline.safetensors on these records")
    s.add_argument("--prefill-json", default=None, help="evaluation.json, whose per-record sums of the exported point "
                   "give the prefill model alone (default: run it here); the decoding model alone comes from "
                   "--decode-choice the same way")
    s.add_argument("--out-json", required=True)
    s.add_argument("--out-md", required=True)
    s.add_argument("--seq-len", type=int, default=128)
    s.add_argument("--prefill-fraction", type=float, default=0.5)
    s.add_argument("--handover", choices=["float16", "float32"], default="float16")
    s.add_argument("--records", type=int, default=None, help="only the first N records (a quick look)")
    s.add_argument("--batch-size", type=int, default=8, help="records of one length run together, up to N")
    s.add_argument("--device", default="auto")
    s.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the intervals")

    s = sub.add_parser("choose-weight-range", help="int8 weight clip range (max or mse) by weights-only perplexity")
    s.add_argument("--manifest", required=True)
    s.add_argument("--samples", required=True, help="calibration.jsonl; the first --num-samples records are used")
    s.add_argument("--out", required=True)
    s.add_argument("--num-samples", type=int, default=8)
    s.add_argument("--seq-len", type=int, default=128)
    s.add_argument("--device", default="auto")
    s.add_argument("--dtype", default="auto")

    s = sub.add_parser("aggregate-sweep", help="the sweep table from float.json and point JSONs")
    s.add_argument("--float-json", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("points", nargs="+")

    s = sub.add_parser("select", help="choose the exported point from sweep.csv (one per transform variant)")
    s.add_argument("--sweep", required=True, nargs="+", help="sweep.csv of each variant, in --variants order")
    s.add_argument("--variants", nargs="+", default=["none"], help="transform variant of each --sweep table")
    s.add_argument("--out", required=True)
    s.add_argument("--metric", choices=["perplexity", "kl", "agreement", "accuracy"], default="perplexity")
    s.add_argument("--budget", type=float, default=0.05)

    s = sub.add_parser("convert", help="int8 safetensors export -> mllm model file")
    s.add_argument("--export", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--version", type=int, choices=[1, 2], default=1)
    s.add_argument("--runtime-json", default=None,
                   help="the export's runtime.json: inspect against what that runtime's C++ model loads")

    s = sub.add_parser("tiny-model", help="build a tiny random-weight model of a family (for trying the pipeline)")
    s.add_argument("--family", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from shadowquant import stages

    try:
        if args.command == "inspect":
            return inspect_command(args.rest)
        if args.command == "validate-config":
            import yaml

            from shadowquant.config import load_config

            print(yaml.safe_dump(load_config(args.config), sort_keys=False), end="")
        elif args.command == "fetch-model":
            stages.fetch_model(args.source, args.manifest, args.type, args.revision, args.trust_remote_code)
        elif args.command == "select-samples":
            stages.select_samples(args.corpus, args.out, args.num_samples, args.offset)
        elif args.command == "profile":
            stages.profile(args.manifest, args.samples, args.out_json, args.out_table, args.seq_len,
                           args.batch_size, args.device, args.dtype, args.checkpoint_dir, args.checkpoint_every)
        elif args.command == "decide":
            stages.decide(args.act_scales, args.out, args.point, args.sensitivity)
        elif args.command == "export":
            stages.export(args.manifest, args.act_scales, args.out, args.point, sensitivity=args.sensitivity,
                          shadow_json=args.shadow_json, clip_scales=args.clip_scales, weight_range=args.weight_range,
                          runtime=args.runtime, runtime_scales=args.runtime_scales, runtime_json=args.runtime_json)
        elif args.command == "evaluate-float":
            from shadowquant.evaluate.sweep import evaluate_float

            evaluate_float(args.manifest, args.samples, args.out_json, args.out_baseline, args.seq_len,
                           args.batch_size, args.device, args.dtype, args.bootstrap)
        elif args.command == "sensitivity":
            from shadowquant.runtimes import get_runtime

            get_runtime(args.runtime).rank(args.manifest, args.samples, args.act_scales, args.out, args.num_samples,
                                           args.seq_len, statistics=args.statistics, measure_top=args.measure_top,
                                           measure_samples=args.measure_samples, cost=args.cost,
                                           runtime_scales=args.runtime_scales, device=args.device, dtype=args.dtype,
                                           weight_range=args.weight_range)
        elif args.command == "runtime-scales":
            from shadowquant.calibrate.runtime_scales import runtime_scales_stage

            runtime_scales_stage(args.manifest, args.samples, args.act_scales, args.out, args.runtime, args.cpu_cap,
                                 args.num_samples, args.seq_len, args.fisher_samples, args.fisher_seq_len,
                                 device=args.device, dtype=args.dtype)
        elif args.command == "choose-weight-range":
            from shadowquant.calibrate.weight_range import weight_range_stage

            weight_range_stage(args.manifest, args.samples, args.out, args.num_samples, args.seq_len,
                               device=args.device, dtype=args.dtype)
        elif args.command == "evaluate-point":
            from shadowquant.evaluate.sweep import PointEvaluation, evaluate_point

            evaluation = PointEvaluation(
                manifest=args.manifest, samples=args.samples, act_scales=args.act_scales, baseline=args.baseline,
                float_json=args.float_json, seq_len=args.seq_len, runtime=args.runtime, batch_size=args.batch_size,
                device=args.device, dtype=args.dtype, num_resamples=args.bootstrap, weight_range=args.weight_range,
                sensitivity=args.sensitivity, clip_scales=args.clip_scales, runtime_scales=args.runtime_scales)
            evaluate_point(evaluation, point=args.point, out_json=args.out_json, part=args.part)
        elif args.command == "evaluate-demo":
            from shadowquant.evaluate.demo_evaluation import evaluate_demo

            evaluate_demo(args.manifest, args.export, args.runtime_json, args.samples, args.decode, args.out_json,
                          args.out_md, args.seq_len, decode_choice=args.decode_choice, prefill_json=args.prefill_json,
                          prefill_fraction=args.prefill_fraction, handover=args.handover, baseline=args.baseline,
                          device=args.device, num_resamples=args.bootstrap, records=args.records,
                          batch_size=args.batch_size)
        elif args.command == "clip-scales":
            from shadowquant.calibrate.sensitivity import clip_scales_stage

            clip_scales_stage(args.manifest, args.samples, args.act_scales, args.out, args.statistics,
                              args.num_samples, args.seq_len, args.device, args.dtype)
        elif args.command == "aggregate-sweep":
            from shadowquant.evaluate.sweep import aggregate

            aggregate(args.float_json, args.points, args.out)
        elif args.command == "select":
            from shadowquant.evaluate.selection import select_stage

            select_stage(args.sweep, args.out, args.metric, args.budget, variants=args.variants)
        elif args.command == "convert":
            stages.convert(args.export, args.out, version=args.version, runtime_json=args.runtime_json)
        elif args.command == "tiny-model":
            from shadowquant.model.tiny import build_tiny_model

            print(build_tiny_model(args.family, args.out, seed=args.seed))
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def inspect_command(argv: Sequence[str] | None = None) -> int:
    """`inspect PATH [--export SAFETENSORS] [--json OUT]`: 0 clean, 1 problems, 2 unreadable file.
    PATH may be a bundle folder: then the whole bundle is checked (bundle.inspect_bundle)."""
    from shadowquant import atomic
    from shadowquant.export.inspector import expectations_from_safetensors, format_report, inspect_mllm, read_runtime_json
    from shadowquant.export.mllm import read_mllm

    parser = argparse.ArgumentParser(
        prog="shadowquant inspect",
        description="Check an mllm model file for the tensors the QNN runtime pulls for each quantized Linear.",
    )
    parser.add_argument("path", help="mllm model file (v1 or v2), or a phone bundle folder (results/<name>/bundle)")
    parser.add_argument("--export", metavar="SAFETENSORS", help="int8 export it was converted from: check every tensor is there with its shape and dtype")
    parser.add_argument("--runtime", metavar="JSON", help="runtime.json of the export (default: runtime.json beside "
                        "the model file, if there is one): check what that runtime profile's C++ model loads")
    parser.add_argument("--json", metavar="OUT", help="also write the report as JSON to OUT")
    args = parser.parse_args(argv)
    if Path(args.path).is_dir():
        from shadowquant.bundle.assemble import format_bundle_report, inspect_bundle

        bundle = inspect_bundle(args.path)
        print(format_bundle_report(bundle))
        if args.json:
            atomic.write_json(args.json, bundle.as_dict())
        return 0 if not bundle.problems else 1
    try:
        expected_shapes = expected_dtypes = None
        if args.export:
            version = read_mllm(args.path).version
            expected_shapes, expected_dtypes = expectations_from_safetensors(args.export, version)
        runtime_path = Path(args.runtime) if args.runtime else Path(args.path).with_name("runtime.json")
        runtime = read_runtime_json(runtime_path) if args.runtime or runtime_path.is_file() else None
        report = inspect_mllm(args.path, expected_shapes, expected_dtypes, runtime)
    except PipelineError as exc:
        message = str(exc)
        # Reader messages already start with the file; others get the inspected path.
        named_files = [str(Path(args.path))] + ([str(Path(args.export))] if args.export else [])
        if not any(message.startswith(f"{name}:") for name in named_files):
            message = f"{args.path}: {message}"
        print(f"error: {message}", file=sys.stderr)
        return 2
    print(format_report(report))
    if args.json:
        atomic.write_json(args.json, report.to_dict())
    return 0 if report.ok else 1
