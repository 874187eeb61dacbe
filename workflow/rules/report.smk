rule report:
    input:
        images=rules.slices.output.slices,
        metrics=expand(f"{RESULTS}/eval/{{model}}/metrics.json", model=MODELS),
        timing=rules.speed.output.timing,
        detections=expand(f"{RESULTS}/eval/{{model}}/detections.json", model=MODELS),
        train_logs=expand(f"{RESULTS}/models/{{model}}/train_log.csv", model=MODELS),
        comparison=rules.compare.output.comparison,
        cv_summary=rules.cv.output.summary if FOLDS else [],
        group_counts=rules.split.output.group_counts,
        test=rules.split.output.test,
        inventory=INVENTORY_SUMMARY,
        deid=DEID_TREE,
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
        config=f"{RESULTS}/report/config.yaml",
        figures=directory(f"{RESULTS}/report/figures"),
    log:
        f"{LOGS}/report.log",
    benchmark:
        f"{BENCH}/report.tsv"
    params:
        # the config sections the verb reads (a change reruns the rule)
        config=verb_config(*(section for section in config if section != "resources")),
        models=MODELS,
        out=lambda wildcards, output: Path(output.html).parent,
        cv=lambda wildcards, input: f"--cv-summary {input.cv_summary}" if FOLDS else "",
    conda:
        "../../envs/report.yaml"
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "spinedet report --config {params.config:q} --models {params.models}"
        " --metrics {input.metrics} --timing {input.timing} --detections {input.detections}"
        " --train-logs {input.train_logs} --comparison {input.comparison} --test {input.test} --group-counts {input.group_counts}"
        " --inventory {input.inventory} --issues {input.deid}/annotation_issues.csv --images {input.images}"
        " {params.cv} --out {params.out} > {log} 2>&1"
