rule evaluate:
    input:
        images=rules.slices.output.slices,
        best=rules.train.output.best,
        test=rules.split.output.test,
        val=rules.split.output.val,
        val_detections=rules.train.output.val_detections,
    output:
        metrics=f"{RESULTS}/eval/{{model}}/metrics.json",
        detections=f"{RESULTS}/eval/{{model}}/detections.json",
    log:
        f"{LOGS}/evaluate/{{model}}.log",
    benchmark:
        f"{BENCH}/evaluate/{{model}}.tsv"
    params:
        # the config sections the verb reads (a change reruns the rule)
        config=lambda wildcards: verb_config("evaluate", "train", "seed", "classes", models=[wildcards.model]),
        out=lambda wildcards, output: Path(output.metrics).parent,
    conda:
        "../../envs/train.yaml"
    threads: config["resources"]["evaluate"]["threads"]
    resources:
        gpu=config["resources"]["evaluate"]["gpu"],
        gpu_model=config["resources"]["evaluate"].get("gpu_model"),
        mem_mb=config["resources"]["evaluate"]["mem_mb"],
        runtime=config["resources"]["evaluate"]["runtime"],
    shell:
        "spinedet evaluate --config {params.config:q} --model {wildcards.model}"
        " --weights {input.best} --test {input.test} --images {input.images}"
        " --val {input.val} --val-detections {input.val_detections}"
        " --out {params.out} --threads {threads} > {log} 2>&1"
