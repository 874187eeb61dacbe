# Cross-validation (split.folds = k >= 2): each model trained on the other
# folds of train+val and selected on fold i, every fold tested on the fixed
# test split, then one summary over the folds and their ensemble.


rule train_fold:
    input:
        images=rules.slices.output.slices,
        train=f"{RESULTS}/split/fold{{fold}}/train.json",
        val=f"{RESULTS}/split/fold{{fold}}/val.json",
    output:
        best=f"{RESULTS}/models/{{model}}/fold{{fold}}/best.pt",
        log_csv=f"{RESULTS}/models/{{model}}/fold{{fold}}/train_log.csv",
        anchors=f"{RESULTS}/models/{{model}}/fold{{fold}}/anchors.json",
        val_detections=f"{RESULTS}/models/{{model}}/fold{{fold}}/val_detections.json",
    log:
        f"{LOGS}/train/{{model}}_fold{{fold}}.log",
    benchmark:
        f"{BENCH}/train/{{model}}_fold{{fold}}.tsv"
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


rule evaluate_fold:
    input:
        images=rules.slices.output.slices,
        best=rules.train_fold.output.best,
        test=rules.split.output.test,
        val=f"{RESULTS}/split/fold{{fold}}/val.json",
        val_detections=rules.train_fold.output.val_detections,
    output:
        metrics=f"{RESULTS}/eval/{{model}}/fold{{fold}}/metrics.json",
        detections=f"{RESULTS}/eval/{{model}}/fold{{fold}}/detections.json",
    log:
        f"{LOGS}/evaluate/{{model}}_fold{{fold}}.log",
    benchmark:
        f"{BENCH}/evaluate/{{model}}_fold{{fold}}.tsv"
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


rule cv:
    input:
        # model by model, fold by fold: the order spinedet cv reads them in
        metrics=[f"{RESULTS}/eval/{model}/fold{fold}/metrics.json" for model in MODELS for fold in FOLDS],
        detections=[f"{RESULTS}/eval/{model}/fold{fold}/detections.json" for model in MODELS for fold in FOLDS],
        test=rules.split.output.test,
    output:
        summary=f"{RESULTS}/report/cv_summary.csv",
        ensemble=f"{RESULTS}/report/cv_ensemble.json",
    log:
        f"{LOGS}/cv.log",
    benchmark:
        f"{BENCH}/cv.tsv"
    params:
        # the config sections the verb reads (a change reruns the rule)
        config=verb_config("split", "classes"),
        models=MODELS,
    conda:
        "../../envs/train.yaml"
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "spinedet cv --config {params.config:q} --models {params.models}"
        " --metrics {input.metrics} --detections {input.detections} --test {input.test}"
        " --summary {output.summary} --ensemble {output.ensemble} > {log} 2>&1"
