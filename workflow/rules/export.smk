# Stages 3 and 4: clip decision, int8 export, mllm conversion.


rule export_int8:
    input:
        # Per variant the export may come from; the script takes the selected (or named) one's.
        manifests=[variant_manifest(v) for v in EXPORT_VARIANTS],
        scales=export_inputs(f"{RUN_RESULTS}/act_scales.json"),
        selection=selection_input,
        sensitivity=sensitivity_input,
        clip_scales=clip_scales_input,
        weight_range=(
            export_inputs(WEIGHT_RANGE_CHOICE) if WEIGHT_RANGE == "auto" else []
        ),
        runtime_scales=export_runtime_scales_input,
    output:
        export=f"{RESULTS}/model-int8.safetensors",
        shadow=f"{RESULTS}/shadow_layers.json",
        runtime=f"{RESULTS}/runtime.json",
    log:
        f"{LOGS}/export_int8.log",
    benchmark:
        f"{BENCH}/export_int8.tsv"
    # On the way to the export and the demo evaluation: first among ready jobs (see runtime_scales).
    priority: 100
    conda:
        CONDA_ENV
    threads: rule_threads("export_int8")
    resources:
        mem_mb=model_mem_mb,
        runtime=60,
    params:
        point=EXPORT_POINT,
        variants=EXPORT_VARIANTS,
        transform=config["export"]["transform"],
        weight_range=WEIGHT_RANGE,
        runtime=RUNTIME,
        # The 'auto' config values and why each was chosen (recorded in runtime.json).
        auto_choices=AUTO_CHOICE_PARAMS,
    script:
        "../scripts/export_int8.py"


rule export_pth:
    input:
        f"{RESULTS}/model-int8.safetensors",
    output:
        f"{RESULTS}/model-int8.pth",
    log:
        f"{LOGS}/export_pth.log",
    conda:
        CONDA_ENV
    threads: rule_threads("export_pth")
    resources:
        mem_mb=4000,
        runtime=30,
    script:
        "../scripts/export_pth.py"


rule convert_mllm:
    input:
        export=f"{RESULTS}/model-int8.safetensors",
        runtime=f"{RESULTS}/runtime.json",
    output:
        model=f"{RESULTS}/model.mllm",
        report=f"{RESULTS}/inspect.txt",
    log:
        f"{LOGS}/convert_mllm.log",
    benchmark:
        f"{BENCH}/convert_mllm.tsv"
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=60,
    script:
        "../scripts/convert_mllm.py"


# The root copies are two rules: one job linking both would leave model.mllm (written after
# runtime.json) newer than its oldest output, and every later run would plan it again.
rule primary_runtime:
    input:
        f"{RESULTS}/runtime.json",
    output:
        "runtime.json",
    log:
        f"{LOGS}/primary_runtime.log",
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=200,
        runtime=10,
    script:
        "../scripts/link_primary.py"


rule primary_model:
    input:
        f"{RESULTS}/model.mllm",
        # So that model.mllm never lands without the runtime.json it was exported with.
        runtime="runtime.json",
    output:
        "model.mllm",
    log:
        f"{LOGS}/primary_model.log",
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=200,
        runtime=10,
    script:
        "../scripts/link_primary.py"
