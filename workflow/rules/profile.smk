# Stage 2: activation statistics of every Linear (docs/method.md section 1).
# calibration.shards > 1 splits the calibration batches over profile_shard jobs and merges them.

PROFILE_SHARDS = config["calibration"]["shards"]
PROFILE_PARAMS = dict(
    seq_len=config["calibration"]["seq_len"],
    batch_size=config["calibration"]["batch_size"],
    checkpoint_every=config["calibration"]["checkpoint_every"],
    device=config["device"],
    dtype=config["dtype"],
)


if PROFILE_SHARDS == 1:

    rule profile:
        input:
            manifest=run_manifest,
            samples=f"{RESULTS}/calibration.jsonl",
        output:
            scales=f"{RUN_RESULTS}/act_scales.json",
            table=f"{RUN_RESULTS}/act_scales.csv",
        log:
            f"{RUN_LOGS}/profile.log",
        benchmark:
            f"{RUN_BENCH}/profile.tsv"
        cache: CACHE_MODE
        # The chain to the layer-front points (profile, runtime_scales, sensitivity) goes first among
        # ready jobs: everything else fills the other CPU beside it.
        priority: 100
        conda:
            CONDA_ENV
        threads: rule_threads("profile")  # capped by --cores locally; --cpus-per-task on SLURM
        resources:
            mem_mb=model_mem_mb,
            runtime=240,
            gpu=USES_GPU,
        params:
            **PROFILE_PARAMS,
            checkpoint_dir=f"{RUN_CHECKPOINTS}/profile",
        script:
            "../scripts/profile.py"

else:

    rule profile_shard:
        input:
            manifest=run_manifest,
            samples=f"{RESULTS}/calibration.jsonl",
        output:
            shard=f"{RUN_RESULTS}/profile-shards/shard-{{shard}}-of-{PROFILE_SHARDS}.safetensors",
        log:
            f"{RUN_LOGS}/profile_shard-{{shard}}.log",
        benchmark:
            f"{RUN_BENCH}/profile_shard-{{shard}}.tsv"
        wildcard_constraints:
            shard=r"\d+",
        conda:
            CONDA_ENV
        threads: rule_threads("profile_shard")  # capped by --cores locally; --cpus-per-task on SLURM
        resources:
            mem_mb=model_mem_mb,
            runtime=240,
            gpu=USES_GPU,
        params:
            **PROFILE_PARAMS,
            shards=PROFILE_SHARDS,
            checkpoint_dir=lambda wildcards: (
                f"resources/checkpoints/{wildcards.run}/profile-shard-{wildcards.shard}"
            ),
        script:
            "../scripts/profile_shard.py"

    rule merge_profile:
        input:
            shards=expand(
                f"{RUN_RESULTS}/profile-shards/shard-{{shard}}-of-{PROFILE_SHARDS}.safetensors",
                shard=range(PROFILE_SHARDS),
                allow_missing=True,
            ),
        output:
            scales=f"{RUN_RESULTS}/act_scales.json",
            table=f"{RUN_RESULTS}/act_scales.csv",
        log:
            f"{RUN_LOGS}/merge_profile.log",
        benchmark:
            f"{RUN_BENCH}/merge_profile.tsv"
        conda:
            CONDA_ENV
        threads: 1
        resources:
            mem_mb=merge_mem_mb,  # every shard's statistics, no model
            runtime=30,
            gpu=0,
        script:
            "../scripts/merge_profile.py"
