# Training state (checkpoint.pt, the rolling log) lives in state/, which is no
# declared output: snakemake must not delete it when a preempted job reruns.


rule train:
    input:
        images=rules.slices.output.slices,
        train=rules.split.output.train,
        val=rules.split.output.val,
    output:
        best=f"{RESULTS}/models/{{model}}/best.pt",
        log_csv=report(
            f"{RESULTS}/models/{{model}}/train_log.csv",
            caption="../report/train_log.rst",
            category="Training",
        ),
        anchors=f"{RESULTS}/models/{{model}}/anchors.json",
        val_detections=f"{RESULTS}/models/{{model}}/val_detections.json",
    log:
        f"{LOGS}/train/{{model}}.log",
    benchmark:
        f"{BENCH}/train/{{model}}.tsv"
    params:
        # the config sections the verb reads (a change reruns the rule)
        config=lambda wildcards: verb_config("train", "seed", "classes", models=[wildcards.model]),
        out=lambda wildcards, output: Path(output.best).parent,
    conda:
        "../../envs/train.yaml"
    threads: config["resources"]["train"]["threads"]
    resources:
        gpu=config["resources"]["train"]["gpu"],
        gpu_model=config["resources"]["train"].get("gpu_model"),
        mem_mb=config["resources"]["train"]["mem_mb"],
        runtime=config["resources"]["train"]["runtime"],
    shell:
        "spinedet train --config {params.config:q} --model {wildcards.model}"
        " --train {input.train} --val {input.val} --images {input.images}"
        " --out {params.out} --threads {threads} > {log} 2>&1"
