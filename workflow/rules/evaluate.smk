rule evaluate:
    input:
        best=rules.train.output.best,
        test=rules.split.output.test,
    output:
        metrics=f"{RESULTS}/eval/{{model}}/metrics.json",
        timing=f"{RESULTS}/eval/{{model}}/timing.json",
        detections=f"{RESULTS}/eval/{{model}}/detections.json",
    log:
        f"{LOGS}/evaluate/{{model}}.log",
    benchmark:
        f"{BENCH}/evaluate/{{model}}.tsv"
    conda:
        "../../envs/train.yaml"
    threads: config["resources"]["evaluate"]["threads"]
    resources:
        gpu=config["resources"]["evaluate"]["gpu"],
        mem_mb=config["resources"]["evaluate"]["mem_mb"],
        runtime=config["resources"]["evaluate"]["runtime"],
    shell:
        "spinedet evaluate --config {EFFECTIVE_CONFIG} --model {wildcards.model}"
        " --weights {input.best} --test {input.test} --images {RESULTS}/slices"
        " --out {RESULTS}/eval/{wildcards.model} --threads {threads} > {log} 2>&1"
