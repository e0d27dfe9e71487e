# Stage 5: the phone bundle (snakemake bundle): prefill model, the decoding model chosen among measured
# candidates (bundle.decode), tokenizer, README with what a generation gets (the demo evaluation, demo.smk).

# The decoding candidates evaluated: bundle.decode.candidates, plus a named choice when it is not among them.
DECODE_CANDIDATES = list(config["bundle"]["decode"]["candidates"])
if config["bundle"]["decode"]["choice"] not in ["auto", *DECODE_CANDIDATES]:
    DECODE_CANDIDATES.append(config["bundle"]["decode"]["choice"])
DECODE_DIR = f"{RESULTS}/decode_candidates"
DECODE_PATHS = [f"{DECODE_DIR}/{c.replace(':', '/')}" for c in DECODE_CANDIDATES]


rule bundle_tokenizer:
    input:
        manifest=FETCHED_MANIFEST,
    output:
        vocab=f"{BUNDLE}/vocab.mllm",
        merges=f"{BUNDLE}/merges.txt",
        spec=f"{RESULTS}/bundle_tokenizer.json",
    log:
        f"{LOGS}/bundle_tokenizer.log",
    benchmark:
        f"{BENCH}/bundle_tokenizer.tsv"
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


rule evaluate_decode_model:
    # One decoding candidate: written, read back and evaluated on the held-out records.
    input:
        manifests=[variant_manifest(v) for v in EXPORT_VARIANTS],
        # runtime.json only when the export may come from several variants: with one, the candidates
        # need no export and run beside the sweep.
        runtime=exported_variant_input,
        samples=f"{RESULTS}/evaluation.jsonl",
        floats=export_inputs(f"{RUN_RESULTS}/sweep/float.json"),
        baselines=export_inputs(f"{RUN_RESULTS}/sweep/float-baseline.safetensors"),
        # Used by the unrotated source (the fetched model) and the imatrix recipes (calibration records).
        original=FETCHED_MANIFEST,
        calibration=f"{RESULTS}/calibration.jsonl",
    output:
        model=temp(f"{DECODE_DIR}/{{source}}/{{recipe}}.mllm"),
        result=f"{DECODE_DIR}/{{source}}/{{recipe}}.json",
    log:
        f"{LOGS}/evaluate_decode_model/{{source}}/{{recipe}}.log",
    benchmark:
        f"{BENCH}/evaluate_decode_model/{{source}}/{{recipe}}.tsv"
    wildcard_constraints:
        source="prefill|unrotated",
        recipe="[a-z0-9_-]+",
    # The last fillers: the demo evaluation (two threads) starts when both are done, with nothing left
    # to take one of its CPUs.
    priority: 3
    conda:
        CONDA_ENV
    threads: rule_threads("evaluate_decode_model")
    resources:
        # The unrotated source holds the prefill variant and the fetched model.
        mem_mb=lambda wildcards, input, attempt: 2
        * model_mem_mb(wildcards, input, attempt),
        runtime=120,
        gpu=USES_GPU,
    params:
        variants=EXPORT_VARIANTS,
        seq_len=config["evaluation"]["seq_len"],
        batch_size=config["evaluation"]["batch_size"],
        calibration_seq_len=config["calibration"]["seq_len"],
        imatrix_samples=config["bundle"]["decode"]["imatrix_samples"],
        device=config["device"],
        dtype=config["dtype"],
        num_resamples=NUM_RESAMPLES,
    script:
        "../scripts/evaluate_decode_model.py"


rule bundle_decode_model:
    # The candidates' table, the choice, and the chosen file as the bundle's decoding model.
    input:
        results=[f"{path}.json" for path in DECODE_PATHS],
        models=[f"{path}.mllm" for path in DECODE_PATHS],
    output:
        decode=f"{BUNDLE}/decode.mllm",
        choice=f"{RESULTS}/decode_choice.json",
        table=f"{RESULTS}/decode_candidates.csv",
        html=report(
            f"{RESULTS}/decode_candidates.html",
            caption="../report/decode_candidates.rst",
            category="Phone bundle",
        ),
    log:
        f"{LOGS}/bundle_decode_model.log",
    benchmark:
        f"{BENCH}/bundle_decode_model.tsv"
    conda:
        CONDA_ENV
    threads: rule_threads("bundle_decode_model")
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        candidates=DECODE_CANDIDATES,
        choice=config["bundle"]["decode"]["choice"],
        budget=config["bundle"]["decode"]["budget"],
    script:
        "../scripts/bundle_decode_model.py"


rule bundle:
    input:
        prefill=f"{RESULTS}/model.mllm",
        runtime=bundle_runtime_json,
        decode=f"{BUNDLE}/decode.mllm",
        vocab=f"{BUNDLE}/vocab.mllm",
        merges=f"{BUNDLE}/merges.txt",
        tokenizer=f"{RESULTS}/bundle_tokenizer.json",
        tokenizer_check=f"{RESULTS}/bundle_tokenizer_check.json",
        decode_choice=f"{RESULTS}/decode_choice.json",
        floats=export_inputs(f"{RUN_RESULTS}/sweep/float.json"),
        # What a generation gets (NPU prefill, then this decoding model): README.txt's headline.
        demo=DEMO_EVALUATION,
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
    benchmark:
        f"{BENCH}/bundle.tsv"
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
