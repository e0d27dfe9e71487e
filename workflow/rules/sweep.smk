# The threshold sweep: simulated W8A8 evaluation per (statistic, threshold), selection, final evaluation.


rule fetch_lambada:
    output:
        LAMBADA,
    log:
        "logs/datasets/lambada.log",
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        num_samples=config["evaluation"]["num_samples"],
    script:
        "../scripts/fetch_lambada.py"


rule select_evaluation:
    input:
        corpus=EVAL_CORPUS,
    output:
        f"{RESULTS}/evaluation.jsonl",
    log:
        f"{LOGS}/select_evaluation.log",
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=1000,
        runtime=30,
    params:
        num_samples=config["evaluation"]["num_samples"],
        offset=EVAL_OFFSET,
        shuffle=EVAL_SHUFFLE,
        what="evaluation",
    script:
        "../scripts/select_samples.py"


rule evaluate_float:
    input:
        manifest=MODEL_MANIFEST,
        samples=f"{RESULTS}/evaluation.jsonl",
    output:
        metrics=f"{RESULTS}/sweep/float.json",
        baseline=f"{RESULTS}/sweep/float-baseline.safetensors",
    log:
        f"{LOGS}/sweep/float.log",
    benchmark:
        f"{BENCH}/sweep/float.tsv"
    conda:
        CONDA_ENV
    threads: rule_threads("evaluate_float")
    resources:
        mem_mb=model_mem_mb,
        runtime=120,
        gpu=USES_GPU,
    params:
        seq_len=config["evaluation"]["seq_len"],
        batch_size=config["evaluation"]["batch_size"],
        device=config["device"],
        dtype=config["dtype"],
    script:
        "../scripts/evaluate_float.py"


rule evaluate_threshold:
    input:
        manifest=MODEL_MANIFEST,
        samples=f"{RESULTS}/evaluation.jsonl",
        scales=f"{RESULTS}/act_scales.json",
        baseline=f"{RESULTS}/sweep/float-baseline.safetensors",
    output:
        f"{RESULTS}/sweep/{{statistic}}-t{{threshold}}.json",
    log:
        f"{LOGS}/sweep/{{statistic}}-t{{threshold}}.log",
    benchmark:
        f"{BENCH}/sweep/{{statistic}}-t{{threshold}}.tsv"
    wildcard_constraints:
        statistic="signed|absmax",
        threshold=r"[0-9]+(\.[0-9]+)?",
    conda:
        CONDA_ENV
    threads: rule_threads("evaluate_threshold")
    resources:
        mem_mb=model_mem_mb,
        runtime=120,
        gpu=USES_GPU,
    params:
        seq_len=config["evaluation"]["seq_len"],
        batch_size=config["evaluation"]["batch_size"],
        device=config["device"],
        dtype=config["dtype"],
    script:
        "../scripts/evaluate_threshold.py"


rule aggregate_sweep:
    input:
        float=f"{RESULTS}/sweep/float.json",
        points=SWEEP_POINTS,
    output:
        f"{RESULTS}/sweep.csv",
    log:
        f"{LOGS}/aggregate_sweep.log",
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
    script:
        "../scripts/aggregate_sweep.py"


rule select_threshold:
    input:
        f"{RESULTS}/sweep.csv",
    output:
        f"{RESULTS}/selection.json",
    log:
        f"{LOGS}/select_threshold.log",
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
    params:
        metric=config["sweep"]["metric"],
        max_drop=config["sweep"]["max_accuracy_drop"],
        statistic=EXPORT_STATISTIC,
        threshold=EXPORT_THRESHOLD,
    script:
        "../scripts/select_threshold.py"


rule evaluate_export:
    input:
        manifest=MODEL_MANIFEST,
        scales=f"{RESULTS}/act_scales.json",
        float=f"{RESULTS}/sweep/float.json",
        sweep=f"{RESULTS}/sweep.csv",
        selection=selection_input,
    output:
        metrics=f"{RESULTS}/evaluation.json",
        summary=f"{RESULTS}/evaluation.md",
        page=report(
            f"{RESULTS}/evaluation.html",
            caption="../report/evaluation_summary.rst",
            category="Evaluation",
        ),
    log:
        f"{LOGS}/evaluate_export.log",
    benchmark:
        f"{BENCH}/evaluate_export.tsv"
    conda:
        CONDA_ENV
    threads: rule_threads("evaluate_export")
    resources:
        mem_mb=model_mem_mb,
        runtime=60,
        gpu=USES_GPU,
    params:
        statistic=EXPORT_STATISTIC,
        threshold=EXPORT_THRESHOLD,
        prompts=config["evaluation"]["prompts"],
        max_new_tokens=config["evaluation"]["max_new_tokens"],
        device=config["device"],
        dtype=config["dtype"],
    script:
        "../scripts/evaluate_export.py"
