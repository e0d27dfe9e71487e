# The demo evaluation (snakemake demo): each held-out record run as mllm's NPU demo runs a generation,
# the int8 NPU model prefilling its first half and the CPU decoding model producing the rest.

# The decoding model the demo hands over to, in one place: the bundle's chosen decoding model and its
# choice (decode_choice.json, whose `manifest` gives the architecture and unstored tensors).
DEMO_DECODE_MODEL = f"{BUNDLE}/decode.mllm"
DEMO_DECODE_CHOICE = f"{RESULTS}/decode_choice.json"


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
        # The single models' sums over the same continuation tokens: the sweep's evaluation of the exported
        # point (evaluation.json) and the chosen decoding candidate's (decode_choice.json).
        decode_choice=DEMO_DECODE_CHOICE,
        prefill_json=f"{RESULTS}/evaluation.json",
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
    # The last long job: first as soon as it is ready.
    priority: 100
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
        seq_len=config["evaluation"]["seq_len"],
        batch_size=config["evaluation"]["batch_size"],
        device=config["device"],
        num_resamples=NUM_RESAMPLES,
    script:
        "../scripts/evaluate_demo.py"
