# The demo evaluation (snakemake demo): each held-out record run as mllm's NPU demo runs a generation,
# the int8 NPU model prefilling its first half and the CPU decoding model producing the rest.

# The decoding model the demo hands over to, in one place: the bundle's chosen decoding model and its
# choice (decode_choice.json, whose `manifest` gives the architecture and unstored tensors).
DEMO_DECODE_MODEL = f"{BUNDLE}/decode.mllm"
DEMO_DECODE_CHOICE = f"{RESULTS}/decode_choice.json"
# The share of each record's tokens the NPU prefills (the rest is decoded and scored): half, as a prompt
# of the record's first half.
DEMO_PREFILL_FRACTION = 0.5


localrules:
    demo,


rule demo:
    input:
        DEMO_EVALUATION,
        f"{RESULTS}/demo_evaluation.md",


rule evaluate_demo:
    input:
        # Per variant the export may come from; the script takes the exported one's (runtime.json).
        # The fetched model too: the decoding-model choice may name its (untransformed) manifest.
        manifests=[variant_manifest(v) for v in EXPORT_VARIANTS],
        fetched=FETCHED_MANIFEST,
        export=f"{RESULTS}/model-int8.safetensors",
        runtime=bundle_runtime_json,
        decode=DEMO_DECODE_MODEL,
        decode_choice=[DEMO_DECODE_CHOICE] if DEMO_DECODE_CHOICE else [],
        samples=f"{RESULTS}/evaluation.jsonl",
        baselines=export_inputs(f"{RUN_RESULTS}/sweep/float-baseline.safetensors"),
    output:
        metrics=DEMO_EVALUATION,
        summary=report(
            f"{RESULTS}/demo_evaluation.md",
            category="Evaluation",
        ),
    log:
        f"{LOGS}/evaluate_demo.log",
    benchmark:
        f"{BENCH}/evaluate_demo.tsv"
    conda:
        CONDA_ENV
    threads: rule_threads("evaluate_demo")
    resources:
        mem_mb=model_mem_mb,
        runtime=240,
        gpu=USES_GPU,
    params:
        name=NAME,
        variants=EXPORT_VARIANTS,
        prefill_fraction=DEMO_PREFILL_FRACTION,
        seq_len=config["evaluation"]["seq_len"],
        device=config["device"],
        num_resamples=NUM_RESAMPLES,
    script:
        "../scripts/evaluate_demo.py"
