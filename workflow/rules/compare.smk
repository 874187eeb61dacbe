rule compare:
    input:
        detections=expand(f"{RESULTS}/eval/{{model}}/detections.json", model=MODELS),
        test=rules.split.output.test,
    output:
        comparison=f"{RESULTS}/report/comparison.json",
    log:
        f"{LOGS}/compare.log",
    benchmark:
        f"{BENCH}/compare.tsv"
    params:
        # the config sections the verb reads (a change reruns the rule)
        config=verb_config("compare", "evaluate", "seed", "classes"),
        models=MODELS,
    conda:
        "../../envs/report.yaml"
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "spinedet compare --config {params.config:q} --models {params.models}"
        " --detections {input.detections} --test {input.test} --out {output.comparison} > {log} 2>&1"
