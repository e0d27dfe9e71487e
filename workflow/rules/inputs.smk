# Stage 1: the model and the calibration corpus, resolved into local files.


rule fetch_model:
    input:
        # A local model's files: editing them in place reruns the fetch and everything after it.
        local_source_files(config["model"]["source"]),
    output:
        manifest=FETCHED_MANIFEST,
    log:
        f"{LOGS}/fetch_model.log",
    benchmark:
        f"{BENCH}/fetch_model.tsv"
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=8000,
        runtime=60,
    params:
        source=config["model"]["source"],
        type=config["model"]["type"],
        revision=config["model"]["revision"],
        trust_remote_code=config["model"]["trust_remote_code"],
    script:
        "../scripts/fetch_model.py"


rule build_pydoc_corpus:
    output:
        PYDOC_CORPUS,
    log:
        "logs/datasets/pydoc.log",
    cache: CACHE_MODE
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
    script:
        "../scripts/build_corpus.py"


rule download_dataset:
    output:
        "resources/datasets/{file}",
    log:
        "logs/datasets/download-{file}.log",
    benchmark:
        "benchmarks/datasets/download-{file}.tsv"
    wildcard_constraints:
        file=r"[0-9a-f]{12}-[^/]+",
    cache: CACHE_MODE
    retries: 2
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=500,
        runtime=120,
    params:
        url=lambda wc: DOWNLOADS[f"resources/datasets/{wc.file}"][0],
        sha256=lambda wc: DOWNLOADS[f"resources/datasets/{wc.file}"][1],
    script:
        "../scripts/download_dataset.py"


rule select_calibration:
    input:
        corpus=CALIBRATION_CORPUS,
    output:
        f"{RESULTS}/calibration.jsonl",
    log:
        f"{LOGS}/select_calibration.log",
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=1000,
        runtime=30,
    params:
        num_samples=config["calibration"]["num_samples"],
    script:
        "../scripts/select_samples.py"


rule transform_model:
    input:
        manifest=FETCHED_MANIFEST,
        samples=lambda wildcards: (
            [f"{RESULTS}/calibration.jsonl"] if "smooth" in wildcards.variant else []
        ),
    output:
        manifest=transformed_manifest("{variant}"),
    log:
        f"{LOGS}/transform_model-{{variant}}.log",
    benchmark:
        f"{BENCH}/transform_model-{{variant}}.tsv"
    conda:
        CONDA_ENV
    threads: rule_threads("transform_model")
    resources:
        mem_mb=model_mem_mb,
        runtime=120,
    params:
        steps=lambda wildcards: wildcards.variant.split("+"),
        # Why the variant was chosen, when transform.variants is 'auto' (recorded in transform.json).
        chosen_by=AUTO_CHOICE_PARAMS.get("transform.variants", {}).get("reason"),
        seed=config["transform"]["seed"],
        alpha=config["transform"]["alpha"],
        num_samples=min(16, config["calibration"]["num_samples"]),
        seq_len=config["calibration"]["seq_len"],
    script:
        "../scripts/transform_model.py"
