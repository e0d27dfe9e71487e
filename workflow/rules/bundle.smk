# Stage 5: the phone bundle (snakemake bundle): prefill model, Q4_0 decoding model, tokenizer, README.


rule bundle_tokenizer:
    input:
        manifest=FETCHED_MANIFEST,
    output:
        vocab=f"{BUNDLE}/vocab.mllm",
        merges=f"{BUNDLE}/merges.txt",
        spec=f"{RESULTS}/bundle_tokenizer.json",
    log:
        f"{LOGS}/bundle_tokenizer.log",
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    script:
        "../scripts/bundle_tokenizer.py"


rule check_bundle_tokenizer:
    input:
        vocab=f"{BUNDLE}/vocab.mllm",
        merges=f"{BUNDLE}/merges.txt",
        spec=f"{RESULTS}/bundle_tokenizer.json",
        manifest=FETCHED_MANIFEST,
        corpus=CALIBRATION_CORPUS,
    output:
        f"{RESULTS}/bundle_tokenizer_check.json",
    log:
        f"{LOGS}/check_bundle_tokenizer.log",
    benchmark:
        f"{BENCH}/check_bundle_tokenizer.tsv"
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        num_texts=config["bundle"]["tokenizer_check_texts"],
        offset=config["calibration"]["num_samples"],
    script:
        "../scripts/check_bundle_tokenizer.py"


rule bundle_decode_model:
    input:
        # Per variant the export may come from; the script takes the exported one's (runtime.json).
        manifests=[variant_manifest(v) for v in EXPORT_VARIANTS],
        runtime=bundle_runtime_json,
    output:
        f"{BUNDLE}/decode-q4_0.mllm",
    log:
        f"{LOGS}/bundle_decode_model.log",
    benchmark:
        f"{BENCH}/bundle_decode_model.tsv"
    conda:
        CONDA_ENV
    threads: rule_threads("bundle_decode_model")
    resources:
        mem_mb=model_mem_mb,
        runtime=60,
    params:
        variants=EXPORT_VARIANTS,
    script:
        "../scripts/bundle_decode_model.py"


rule evaluate_decode_model:
    input:
        manifests=[variant_manifest(v) for v in EXPORT_VARIANTS],
        runtime=f"{RESULTS}/runtime.json",
        decode=f"{BUNDLE}/decode-q4_0.mllm",
        samples=f"{RESULTS}/evaluation.jsonl",
        floats=export_inputs(f"{RUN_RESULTS}/sweep/float.json"),
        baselines=export_inputs(f"{RUN_RESULTS}/sweep/float-baseline.safetensors"),
    output:
        f"{RESULTS}/decode_evaluation.json",
    log:
        f"{LOGS}/evaluate_decode_model.log",
    benchmark:
        f"{BENCH}/evaluate_decode_model.tsv"
    conda:
        CONDA_ENV
    threads: rule_threads("evaluate_decode_model")
    resources:
        mem_mb=model_mem_mb,
        runtime=120,
        gpu=USES_GPU,
    params:
        variants=EXPORT_VARIANTS,
        seq_len=config["evaluation"]["seq_len"],
        batch_size=config["evaluation"]["batch_size"],
        device=config["device"],
        dtype=config["dtype"],
        num_resamples=NUM_RESAMPLES,
    script:
        "../scripts/evaluate_decode_model.py"


rule bundle:
    input:
        prefill=f"{RESULTS}/model.mllm",
        runtime=bundle_runtime_json,
        decode=f"{BUNDLE}/decode-q4_0.mllm",
        vocab=f"{BUNDLE}/vocab.mllm",
        merges=f"{BUNDLE}/merges.txt",
        tokenizer=f"{RESULTS}/bundle_tokenizer.json",
        tokenizer_check=f"{RESULTS}/bundle_tokenizer_check.json",
        decode_evaluation=f"{RESULTS}/decode_evaluation.json",
        floats=export_inputs(f"{RUN_RESULTS}/sweep/float.json"),
    output:
        prefill=f"{BUNDLE}/prefill-int8.mllm",
        runtime=f"{BUNDLE}/runtime.json",
        readme=f"{BUNDLE}/README.txt",
        cpp_demo=f"{BUNDLE}/cpp/shadowquant_demo.cpp",
        cpp_tokenizer=f"{BUNDLE}/cpp/shadowquant_tokenizer.hpp",
        cpp_cmake=f"{BUNDLE}/cpp/CMakeLists.txt",
        check=report(
            f"{RESULTS}/bundle_check.json",
            caption="../report/bundle.rst",
            category="Phone bundle",
        ),
    log:
        f"{LOGS}/bundle.log",
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        name=NAME,
        variants=EXPORT_VARIANTS,
    script:
        "../scripts/assemble_bundle.py"
