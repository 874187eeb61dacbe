if config["demo"]["enabled"]:

    rule synthesize:
        output:
            dicom=directory(config["raw"]),
            annotations=config["annotations"],
            cohort=config["cohort"],
            preview=f"{config['demo']['out']}/preview.png",
            key=f"{config['demo']['out']}/pseudonym.key",
        params:
            # The config this rule depends on: a change reruns it.
            settings={"classes": config["classes"], "groups": config["groups"]},
            config=EFFECTIVE_CONFIG,
            out=lambda wildcards, output: Path(output.annotations).parent,
            patients=config["demo"]["patients"],
            matrix=config["demo"]["matrix"],
            seed=config["demo"]["seed"],
        threads: 8  # patients written in parallel; snakemake caps it at --cores
        log:
            f"{LOGS}/synthesize.log",
        benchmark:
            f"{BENCH}/synthesize.tsv"
        conda:
            "../../envs/preprocess.yaml"
        shell:
            "spinedet synthesize --out {params.out} --patients {params.patients}"
            " --matrix {params.matrix} --seed {params.seed} --preview {output.preview}"
            " --config {params.config} --workers {threads} > {log} 2>&1"
