rule split:
    input:
        slices=rules.slices.output.slices,
    output:
        train=f"{RESULTS}/split/train.json",
        val=f"{RESULTS}/split/val.json",
        test=f"{RESULTS}/split/test.json",
        assignments=f"{RESULTS}/split/assignments.csv",
        group_counts=f"{RESULTS}/split/group_counts.csv",
        folds=expand(f"{RESULTS}/split/fold{{fold}}/{{part}}.json", fold=FOLDS, part=["train", "val"]),
    log:
        f"{LOGS}/split.log",
    benchmark:
        f"{BENCH}/split.tsv"
    params:
        # the config sections the verb reads (a change reruns the rule)
        config=verb_config("split", "groups", "classes", "seed"),
        out=lambda wildcards, output: Path(output.train).parent,
    conda:
        "../../envs/preprocess.yaml"
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "spinedet split --config {params.config:q} --slices {input.slices}"
        " --out {params.out} > {log} 2>&1"
