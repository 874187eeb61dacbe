if config["demo"]["enabled"]:

    rule synthesize:
        localrule: True
        output:
            export=directory(config["raw"]),  # the DICOM tree, or with demo.export_format bids the BIDS dataset
            # the sheet: every box, or with demo.annotation_format sr, seg or mixed those of
            # the csv patients (the others' boxes are SR or SEG objects in the export)
            annotations=f"{config['demo']['out']}/annotations.csv",
            # written in every case; a BIDS demo's groups are also in its participants.tsv
            cohort=f"{config['demo']['out']}/cohort.csv",
            preview=f"{config['demo']['out']}/preview.png",
            key=f"{config['demo']['out']}/pseudonym.key",
            faults=f"{config['demo']['out']}/faults.csv",
            linked_storage=directory(f"{config['demo']['out']}/linked_storage"),
        params:
            # the config sections the verb reads (a change reruns the rule)
            config=verb_config("classes", "groups", "annotation_import.finding_map"),
            out=lambda wildcards, output: Path(output.annotations).parent,
            patients=config["demo"]["patients"],
            matrix=config["demo"]["matrix"],
            seed=config["demo"]["seed"],
            enhanced=config["demo"]["enhanced_fraction"],
            faults="--faults" if config["demo"]["faults"] else "",
            annotation_format=config["demo"]["annotation_format"],
            export_format=config["demo"]["export_format"],
        threads: 8  # patients written in parallel; snakemake caps it at --cores
        log:
            f"{LOGS}/synthesize.log",
        benchmark:
            f"{BENCH}/synthesize.tsv"
        conda:
            "../../envs/preprocess.yaml"
        shell:
            "spinedet synthesize --out {params.out} --patients {params.patients}"
            " --matrix {params.matrix} --seed {params.seed} --enhanced-fraction {params.enhanced}"
            " --annotation-format {params.annotation_format} --export-format {params.export_format}"
            " --preview {output.preview}"
            " --config {params.config:q} --workers {threads} {params.faults} > {log} 2>&1"
