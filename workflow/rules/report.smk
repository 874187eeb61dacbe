rule report:
    input:
        images=rules.slices.output.slices,
        metrics=expand(f"{RESULTS}/eval/{{model}}/metrics.json", model=MODELS),
        timing=expand(f"{RESULTS}/eval/{{model}}/timing.json", model=MODELS),
        detections=expand(f"{RESULTS}/eval/{{model}}/detections.json", model=MODELS),
        train_logs=expand(f"{RESULTS}/models/{{model}}/train_log.csv", model=MODELS),
        group_counts=rules.split.output.group_counts,
        test=rules.split.output.test,
        inventory=rules.inventory.output.summary,
        issues=f"{RESULTS}/deid/annotation_issues.csv",
    output:
        html=report(
            f"{RESULTS}/report/report.html",
            caption="../report/report.rst",
            category="Report",
        ),
        md=f"{RESULTS}/report/report.md",
        summary=report(
            f"{RESULTS}/report/summary.csv",
            caption="../report/summary.rst",
            category="Report",
        ),
    log:
        f"{LOGS}/report.log",
    benchmark:
        f"{BENCH}/report.tsv"
    params:
        # The config this rule depends on: a change reruns it.
        settings={key: value for key, value in config.items() if key != "resources"},
        config=EFFECTIVE_CONFIG,
        models=MODELS,
        results=lambda wildcards: RESULTS,
        out=lambda wildcards, output: Path(output.html).parent,
    conda:
        "../../envs/report.yaml"
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "spinedet report --config {params.config} --models {params.models}"
        " --results {params.results} --images {input.images} --out {params.out} > {log} 2>&1"
