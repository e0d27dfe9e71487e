# Plots for people, registered in the Snakemake report (snakemake --report report.html).


rule plot_sweep:
    input:
        sweep=f"{RUN_RESULTS}/sweep.csv",
        selection=f"{RESULTS}/selection.json",
    output:
        threshold=report(
            f"{RUN_RESULTS}/plots/sweep_threshold.png",
            caption="../report/sweep_threshold.rst",
            category="Threshold sweep",
        ),
        shadow=report(
            f"{RUN_RESULTS}/plots/sweep_shadow.png",
            caption="../report/sweep_shadow.rst",
            category="Threshold sweep",
        ),
        table=report(
            f"{RUN_RESULTS}/plots/sweep.html",
            caption="../report/sweep_table.rst",
            category="Threshold sweep",
        ),
    log:
        f"{RUN_LOGS}/plot_sweep.log",
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    params:
        variant=lambda wildcards: RUNS[wildcards.run],
    script:
        "../scripts/plot_sweep.py"


rule plot_outliers:
    input:
        scales=f"{RUN_RESULTS}/act_scales.json",
        table=f"{RUN_RESULTS}/act_scales.csv",
    output:
        plot=report(
            f"{RUN_RESULTS}/plots/outlier_ratios.png",
            caption="../report/outlier_ratios.rst",
            category="Activation profile",
        ),
        table=report(
            f"{RUN_RESULTS}/plots/act_scales.html",
            caption="../report/act_scales_table.rst",
            category="Activation profile",
        ),
    log:
        f"{RUN_LOGS}/plot_outliers.log",
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    params:
        threshold=EXPORT_THRESHOLD,
    script:
        "../scripts/plot_outliers.py"


rule plot_quality:
    input:
        sweep=f"{RUN_RESULTS}/sweep.csv",
        selection=f"{RESULTS}/selection.json",
        sensitivity=SENSITIVITY,
        breakdown=f"{RUN_RESULTS}/breakdown.json",
    output:
        fronts=report(
            f"{RUN_RESULTS}/plots/fronts.png",
            caption="../report/fronts.rst",
            category="Quantization quality",
        ),
        sensitivity=report(
            f"{RUN_RESULTS}/plots/sensitivity.png",
            caption="../report/sensitivity.rst",
            category="Quantization quality",
        ),
        breakdown=report(
            f"{RUN_RESULTS}/plots/breakdown.png",
            caption="../report/breakdown.rst",
            category="Quantization quality",
        ),
        table=report(
            f"{RUN_RESULTS}/plots/sensitivity.html",
            caption="../report/sensitivity_table.rst",
            category="Quantization quality",
        ),
    log:
        f"{RUN_LOGS}/plot_quality.log",
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    params:
        top=25,
        variant=lambda wildcards: RUNS[wildcards.run],
    script:
        "../scripts/plot_quality.py"
