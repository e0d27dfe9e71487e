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


rule choose_weight_range:
    input:
        manifest=run_manifest,
        samples=f"{RESULTS}/calibration.jsonl",
    output:
        WEIGHT_RANGE_CHOICE,
    log:
        f"{RUN_LOGS}/choose_weight_range.log",
    benchmark:
        f"{RUN_BENCH}/choose_weight_range.tsv"
    # Every sweep point and decoding candidate needs these: before the points.
    priority: 8
    conda:
        CONDA_ENV
    threads: rule_threads("choose_weight_range")
    resources:
        mem_mb=model_mem_mb,
        runtime=60,
        gpu=USES_GPU,
    params:
        num_samples=config["sensitivity"]["num_samples"],
        seq_len=config["sensitivity"]["seq_len"],
        device=config["device"],
        dtype=config["dtype"],
    script:
        "../scripts/choose_weight_range.py"


rule evaluate_float:
    input:
        manifest=run_manifest,
        samples=f"{RESULTS}/evaluation.jsonl",
    output:
        metrics=f"{RUN_RESULTS}/sweep/float.json",
        baseline=f"{RUN_RESULTS}/sweep/float-baseline.safetensors",
    log:
        f"{RUN_LOGS}/sweep/float.log",
    benchmark:
        f"{RUN_BENCH}/sweep/float.tsv"
    # Every sweep point and decoding candidate needs these: before the points.
    priority: 8
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
        num_resamples=NUM_RESAMPLES,
    script:
        "../scripts/evaluate_float.py"


rule runtime_scales:
    input:
        manifest=run_manifest,
        samples=f"{RESULTS}/calibration.jsonl",
        scales=f"{RUN_RESULTS}/act_scales.json",
    output:
        RUNTIME_SCALES,
    log:
        f"{RUN_LOGS}/runtime_scales.log",
    benchmark:
        f"{RUN_BENCH}/runtime_scales.tsv"
    # The chain to the layer-front points, the export and the demo evaluation goes first among ready
    # jobs, everything else fills the other CPU beside it. 100: the scheduler maximizes the sum of the
    # chosen jobs' priorities, and two fillers (at most 8 each) must not outweigh one job of the chain.
    priority: 100
    conda:
        CONDA_ENV
    threads: rule_threads("runtime_scales")
    resources:
        mem_mb=model_mem_mb,
        runtime=120,
        gpu=USES_GPU,
    params:
        profile=RUNTIME,
        cpu_cap=config["runtime"]["cpu_cap"],
        num_samples=config["calibration"]["num_samples"],
        seq_len=config["calibration"]["seq_len"],
        fisher_samples=config["sensitivity"]["num_samples"],
        fisher_seq_len=config["sensitivity"]["seq_len"],
        device=config["device"],
        dtype=config["dtype"],
    script:
        "../scripts/runtime_scales.py"


rule sensitivity:
    input:
        manifest=run_manifest,
        samples=f"{RESULTS}/calibration.jsonl",
        scales=f"{RUN_RESULTS}/act_scales.json",
        weight_range=weight_range_input,
        runtime_scales=runtime_scales_input,
    output:
        SENSITIVITY,
    log:
        f"{RUN_LOGS}/sensitivity.log",
    benchmark:
        f"{RUN_BENCH}/sensitivity.tsv"
    # First among the ready jobs: the layer-front points wait for it (started after the other points, it
    # left a CPU idle while they queued behind it).
    priority: 100
    conda:
        CONDA_ENV
    threads: rule_threads("sensitivity")
    resources:
        mem_mb=model_mem_mb,
        runtime=240,
        gpu=USES_GPU,
    params:
        weight_range=WEIGHT_RANGE,
        statistics=SENSITIVITY_STATISTICS,
        num_samples=config["sensitivity"]["num_samples"],
        seq_len=config["sensitivity"]["seq_len"],
        measure_top=config["sensitivity"]["measure_top"],
        measure_samples=config["sensitivity"]["measure_samples"],
        cost=config["sensitivity"]["cost"],
        runtime=RUNTIME,
        device=config["device"],
        dtype=config["dtype"],
    script:
        "../scripts/sensitivity.py"


rule clip_scales:
    input:
        manifest=run_manifest,
        samples=f"{RESULTS}/calibration.jsonl",
        scales=f"{RUN_RESULTS}/act_scales.json",
    output:
        CLIP_SCALES,
    log:
        f"{RUN_LOGS}/clip_scales.log",
    benchmark:
        f"{RUN_BENCH}/clip_scales.tsv"
    conda:
        CONDA_ENV
    threads: rule_threads("clip_scales")
    resources:
        mem_mb=model_mem_mb,
        runtime=120,
        gpu=USES_GPU,
    params:
        statistics=CLIP_STATISTICS,
        num_samples=config["sensitivity"]["num_samples"],
        seq_len=config["calibration"]["seq_len"],
        device=config["device"],
        dtype=config["dtype"],
    script:
        "../scripts/clip_scales.py"


if POINTS_PER_JOB == 1:

    rule evaluate_point:
        input:
            manifest=run_manifest,
            samples=f"{RESULTS}/evaluation.jsonl",
            scales=f"{RUN_RESULTS}/act_scales.json",
            baseline=f"{RUN_RESULTS}/sweep/float-baseline.safetensors",
            float=f"{RUN_RESULTS}/sweep/float.json",
            sensitivity=point_sensitivity_input,
            clip_scales=point_clip_scales_input,
            weight_range=weight_range_input,
            runtime_scales=runtime_scales_input,
        output:
            f"{RUN_RESULTS}/sweep/{{point}}.json",
        log:
            f"{RUN_LOGS}/sweep/{{point}}.log",
        benchmark:
            f"{RUN_BENCH}/sweep/{{point}}.tsv"
        wildcard_constraints:
            point=r"(signed|absmax)-(t[0-9]+(\.[0-9]+)?|k[0-9]+|l[0-9]+)(-mse)?",
        # The points (the selection and the export wait for them) before the breakdown's parts and the
        # decoding candidates, which only the end of the run needs.
        priority: 5
        conda:
            CONDA_ENV
        threads: rule_threads("evaluate_point")
        resources:
            mem_mb=model_mem_mb,
            runtime=120,
            gpu=USES_GPU,
        params:
            weight_range=WEIGHT_RANGE,
            runtime=RUNTIME,
            seq_len=config["evaluation"]["seq_len"],
            batch_size=config["evaluation"]["batch_size"],
            device=config["device"],
            dtype=config["dtype"],
            num_resamples=NUM_RESAMPLES,
        script:
            "../scripts/evaluate_point.py"

else:

    # sweep.points_per_job > 1: a group of points per job (one model load), split into the per-point files.
    rule evaluate_point_group:
        input:
            manifest=run_manifest,
            samples=f"{RESULTS}/evaluation.jsonl",
            scales=f"{RUN_RESULTS}/act_scales.json",
            baseline=f"{RUN_RESULTS}/sweep/float-baseline.safetensors",
            float=f"{RUN_RESULTS}/sweep/float.json",
            sensitivity=group_sensitivity_input,
            clip_scales=group_clip_scales_input,
            weight_range=weight_range_input,
            runtime_scales=runtime_scales_input,
        output:
            f"{RUN_RESULTS}/sweep/groups/group-{{group}}-of-{len(POINT_GROUPS)}.json",
        log:
            f"{RUN_LOGS}/sweep/groups/group-{{group}}-of-{len(POINT_GROUPS)}.log",
        benchmark:
            f"{RUN_BENCH}/sweep/groups/group-{{group}}-of-{len(POINT_GROUPS)}.tsv"
        wildcard_constraints:
            group=r"\d+",
        # As evaluate_point.
        priority: 5
        conda:
            CONDA_ENV
        threads: rule_threads("evaluate_point_group")
        resources:
            mem_mb=model_mem_mb,
            runtime=120 * POINTS_PER_JOB,
            gpu=USES_GPU,
        params:
            weight_range=WEIGHT_RANGE,
            points=lambda wildcards: POINT_GROUPS[int(wildcards.group)],
            runtime=RUNTIME,
            seq_len=config["evaluation"]["seq_len"],
            batch_size=config["evaluation"]["batch_size"],
            device=config["device"],
            dtype=config["dtype"],
            num_resamples=NUM_RESAMPLES,
        script:
            "../scripts/evaluate_point_group.py"

    rule split_point:
        input:
            point_group_file,
        output:
            f"{RUN_RESULTS}/sweep/{{point}}.json",
        log:
            f"{RUN_LOGS}/sweep/{{point}}.log",
        wildcard_constraints:
            point=r"(signed|absmax)-(t[0-9]+(\.[0-9]+)?|k[0-9]+|l[0-9]+)(-mse)?",
        localrule: True
        conda:
            CONDA_ENV
        threads: 1
        resources:
            mem_mb=500,
            runtime=5,
        script:
            "../scripts/split_point.py"


rule evaluate_part:
    input:
        manifest=run_manifest,
        samples=f"{RESULTS}/evaluation.jsonl",
        scales=f"{RUN_RESULTS}/act_scales.json",
        baseline=f"{RUN_RESULTS}/sweep/float-baseline.safetensors",
        float=f"{RUN_RESULTS}/sweep/float.json",
        weight_range=weight_range_input,
        runtime_scales=runtime_scales_input,
    output:
        f"{RUN_RESULTS}/sweep/parts/{{statistic}}-{{part}}.json",
    log:
        f"{RUN_LOGS}/sweep/parts/{{statistic}}-{{part}}.log",
    benchmark:
        f"{RUN_BENCH}/sweep/parts/{{statistic}}-{{part}}.tsv"
    wildcard_constraints:
        statistic="signed|absmax",
        part="weights|inputs|outputs",
    # After the points, before the decoding candidates (bundle.smk).
    priority: 4
    conda:
        CONDA_ENV
    threads: rule_threads("evaluate_part")
    resources:
        mem_mb=model_mem_mb,
        runtime=120,
        gpu=USES_GPU,
    params:
        weight_range=WEIGHT_RANGE,
        runtime=RUNTIME,
        seq_len=config["evaluation"]["seq_len"],
        batch_size=config["evaluation"]["batch_size"],
        device=config["device"],
        dtype=config["dtype"],
        num_resamples=NUM_RESAMPLES,
    script:
        "../scripts/evaluate_point.py"


rule breakdown:
    input:
        float=f"{RUN_RESULTS}/sweep/float.json",
        weights=f"{RUN_RESULTS}/sweep/parts/{BREAKDOWN_STATISTIC}-weights.json",
        inputs=f"{RUN_RESULTS}/sweep/parts/{BREAKDOWN_STATISTIC}-inputs.json",
        outputs=f"{RUN_RESULTS}/sweep/parts/{BREAKDOWN_STATISTIC}-outputs.json",
        all=f"{RUN_RESULTS}/sweep/{BREAKDOWN_POINT}.json",
    output:
        f"{RUN_RESULTS}/breakdown.json",
    log:
        f"{RUN_LOGS}/breakdown.log",
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
    script:
        "../scripts/breakdown.py"


rule aggregate_sweep:
    input:
        float=f"{RUN_RESULTS}/sweep/float.json",
        points=SWEEP_POINTS,
    output:
        f"{RUN_RESULTS}/sweep.csv",
    log:
        f"{RUN_LOGS}/aggregate_sweep.log",
    # On the way to the export and the demo evaluation: first among ready jobs (see runtime_scales).
    priority: 100
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
    script:
        "../scripts/aggregate_sweep.py"


rule select_point:
    input:
        # One sweep table per transform variant, in the order of transform.variants.
        per_run(f"{RUN_RESULTS}/sweep.csv"),
    output:
        f"{RESULTS}/selection.json",
    log:
        f"{LOGS}/select_point.log",
    # On the way to the export and the demo evaluation: first among ready jobs (see runtime_scales).
    priority: 100
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
    params:
        metric=config["sweep"]["metric"],
        budget=config["sweep"]["budget"],
        point=EXPORT_POINT,
        variants=VARIANTS,
        transform=config["export"]["transform"],
    script:
        "../scripts/select_point.py"


rule evaluate_export:
    input:
        # Per variant the export may come from; the script takes the exported one's.
        manifests=[variant_manifest(v) for v in EXPORT_VARIANTS],
        export=f"{RESULTS}/model-int8.safetensors",
        floats=export_inputs(f"{RUN_RESULTS}/sweep/float.json"),
        sweeps=export_inputs(f"{RUN_RESULTS}/sweep.csv"),
        selection=selection_input,
    output:
        metrics=f"{RESULTS}/evaluation.json",
    log:
        f"{LOGS}/evaluate_export.log",
    benchmark:
        f"{BENCH}/evaluate_export.tsv"
    # On the way to the export and the demo evaluation: first among ready jobs (see runtime_scales).
    priority: 100
    conda:
        CONDA_ENV
    threads: rule_threads("evaluate_export")
    resources:
        mem_mb=model_mem_mb,
        runtime=60,
        gpu=USES_GPU,
    params:
        name=NAME,
        point=EXPORT_POINT,
        variants=EXPORT_VARIANTS,
        transform=config["export"]["transform"],
        prompts=config["evaluation"]["prompts"],
        max_new_tokens=config["evaluation"]["max_new_tokens"],
        device=config["device"],
        dtype=config["dtype"],
    script:
        "../scripts/evaluate_export.py"


rule evaluation_summary:
    # evaluation.md: what a generation gets (the demo evaluation) first where the run makes one, then the
    # exported prefill model next to float.
    input:
        unpack(evaluation_summary_inputs),
    output:
        summary=f"{RESULTS}/evaluation.md",
        page=report(
            f"{RESULTS}/evaluation.html",
            caption="../report/evaluation_summary.rst",
            category="Evaluation",
        ),
    log:
        f"{LOGS}/evaluation_summary.log",
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
    script:
        "../scripts/evaluation_summary.py"


rule compare_transforms:
    input:
        sweeps=per_run(f"{RUN_RESULTS}/sweep.csv"),
        breakdowns=per_run(f"{RUN_RESULTS}/breakdown.json"),
        selection=f"{RESULTS}/selection.json",
    output:
        table=f"{RESULTS}/transforms.csv",
        summary=f"{RESULTS}/transforms.md",
        page=report(
            f"{RESULTS}/transforms.html",
            caption="../report/transforms.rst",
            category="Quantization quality",
        ),
    log:
        f"{LOGS}/compare_transforms.log",
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
    params:
        variants=VARIANTS,
        metric=config["sweep"]["metric"],
        budget=config["sweep"]["budget"],
    script:
        "../scripts/compare_transforms.py"
