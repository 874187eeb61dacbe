rule slices:
    input:
        deid=DEID_TREE,
    output:
        slices=directory(f"{RESULTS}/slices"),
    log:
        f"{LOGS}/slices.log",
    benchmark:
        f"{BENCH}/slices.tsv"
    params:
        # the config sections the verb reads (a change reruns the rule)
        config=verb_config("slices", "classes"),
    threads: config["resources"]["slices"]["threads"]  # patients sliced in parallel
    conda:
        "../../envs/preprocess.yaml"
    resources:
        mem_mb=config["resources"]["slices"]["mem_mb"],
        runtime=config["resources"]["slices"]["runtime"],
    shell:
        "spinedet slices --config {params.config:q} --participants {input.deid}/participants.csv"
        " --out {output.slices} --workers {threads} > {log} 2>&1"
