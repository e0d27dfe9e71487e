# Stage 2: activation statistics of every Linear (METHOD.md section 1).


rule profile:
    input:
        manifest=MODEL_MANIFEST,
        samples=f"{RESULTS}/calibration.jsonl",
    output:
        scales=f"{RESULTS}/act_scales.json",
        table=f"{RESULTS}/act_scales.csv",
    log:
        f"{LOGS}/profile.log",
    benchmark:
        f"{BENCH}/profile.tsv"
    cache: CACHE_MODE
    conda:
        CONDA_ENV
    threads: rule_threads("profile")  # capped by --cores locally; --cpus-per-task on SLURM
    resources:
        mem_mb=model_mem_mb,
        runtime=240,
        gpu=USES_GPU,
    params:
        seq_len=config["calibration"]["seq_len"],
        batch_size=config["calibration"]["batch_size"],
        checkpoint_every=config["calibration"]["checkpoint_every"],
        checkpoint_dir=f"{CHECKPOINTS}/profile",
        device=config["device"],
        dtype=config["dtype"],
    script:
        "../scripts/profile.py"
