rule slices:
    input:
        participants=rules.deidentify.output.participants,
    output:
        slices=directory(f"{RESULTS}/slices"),
    log:
        f"{LOGS}/slices.log",
    benchmark:
        f"{BENCH}/slices.tsv"
    params:
        # The config this rule depends on: a change reruns it.
        settings={"slices": config["slices"], "classes": config["classes"]},
        config=EFFECTIVE_CONFIG,
    threads: config["resources"]["slices"]["threads"]  # patients sliced in parallel
    conda:
        "../../envs/preprocess.yaml"
    resources:
        mem_mb=config["resources"]["slices"]["mem_mb"],
        runtime=config["resources"]["slices"]["runtime"],
    shell:
        "spinedet slices --config {params.config} --participants {input.participants}"
        " --out {output.slices} --workers {threads} > {log} 2>&1"
