rule speed:
    input:
        images=rules.slices.output.slices,
        best=expand(f"{RESULTS}/models/{{model}}/best.pt", model=MODELS),
        test=rules.split.output.test,
    output:
        timing=expand(f"{RESULTS}/timing/{{model}}.json", model=MODELS),
    log:
        f"{LOGS}/speed.log",
    benchmark:
        f"{BENCH}/speed.tsv"
    params:
        # the config sections the verb reads (a change reruns the rule)
        config=verb_config("speed", "evaluate.score_threshold", "train.device", "train.cpu_inference_precision",
                           models=MODELS),
        models=MODELS,
        out=lambda wildcards, output: Path(output.timing[0]).parent,
    conda:
        "../../envs/train.yaml"
    threads: config["resources"]["evaluate"]["threads"]
    resources:
        gpu=config["resources"]["evaluate"]["gpu"],
        gpu_model=config["resources"]["evaluate"].get("gpu_model"),
        mem_mb=config["resources"]["evaluate"]["mem_mb"],
        runtime=config["resources"]["evaluate"]["runtime"],
    shell:
        "spinedet speed --config {params.config:q} --models {params.models}"
        " --weights {input.best} --test {input.test} --images {input.images}"
        " --out {params.out} --threads {threads} > {log} 2>&1"
