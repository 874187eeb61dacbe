# raw_format dicom. Inventory, conversion and de-identification read PHI: they are
# localrules and write identity only under restricted/.


rule inventory:
    localrule: True
    input:
        raw=config["raw"],
        cohort=config["cohort"],
    output:
        files=f"{RESTRICTED}/inventory/files.csv",
        series=f"{RESTRICTED}/inventory/series.csv",
        selection=f"{RESTRICTED}/inventory/selection.csv",
        summary=f"{RESULTS}/inventory/summary.json",
    log:
        f"{LOGS}/inventory.log",
    benchmark:
        f"{BENCH}/inventory.tsv"
    params:
        # the config sections the verb reads (a change reruns the rule)
        config=verb_config("inventory", "groups"),
        out=lambda wildcards, output: Path(output.files).parent,
    conda:
        "../../envs/preprocess.yaml"
    shell:
        "spinedet inventory --config {params.config:q} --raw {input.raw}"
        " --cohort {input.cohort} --out {params.out}"
        " --summary {output.summary} > {log} 2>&1"


rule annotations:
    localrule: True
    input:
        files=rules.inventory.output.files,
        cohort=config["cohort"],
        # the SR and SEG objects are read where files.csv found them, in the export
        raw=config["raw"],
        sheet=config["annotations"] or [],
        # boxes drawn in CVAT / Label Studio on exported slices, and a copy of that export's
        # manifest (never annotation_export's own output: it comes after slices, a cycle)
        coco=config["annotation_import"]["coco"] or [],
        coco_manifest=config["annotation_import"]["coco_manifest"] or [],
    output:
        table=f"{RESTRICTED}/annotations/annotations.csv",
        issues=f"{RESTRICTED}/annotations/import_issues.csv",
        summary=f"{RESULTS}/annotations/summary.json",
    log:
        f"{LOGS}/annotations.log",
    benchmark:
        f"{BENCH}/annotations.tsv"
    params:
        # the config sections the verb reads (a change reruns the rule)
        config=verb_config("annotation_import", "classes"),
        out=lambda wildcards, output: Path(output.table).parent,
        sheet=lambda wildcards, input: f"--sheet {input.sheet}" if input.sheet else "",
        coco=lambda wildcards, input: f"--coco {input.coco} --manifest {input.coco_manifest}" if input.coco else "",
    conda:
        "../../envs/preprocess.yaml"
    shell:
        "spinedet annotations --config {params.config:q} --files {input.files}"
        " --cohort {input.cohort} {params.sheet} {params.coco} --out {params.out}"
        " --summary {output.summary} > {log} 2>&1"


rule convert:
    localrule: True
    input:
        series=rules.inventory.output.series,
        selection=rules.inventory.output.selection,
    output:
        conversions=f"{RESTRICTED}/convert/conversions.csv",
    log:
        f"{LOGS}/convert.log",
    benchmark:
        f"{BENCH}/convert.tsv"
    params:
        # the config sections the verb reads (a change reruns the rule)
        config=verb_config(),
        out=lambda wildcards, output: Path(output.conversions).parent,
    conda:
        "../../envs/preprocess.yaml"
    shell:
        "spinedet convert --config {params.config:q} --series {input.series}"
        " --selection {input.selection} --out {params.out} > {log} 2>&1"


rule deidentify:
    localrule: True
    input:
        conversions=rules.convert.output.conversions,
        files=rules.inventory.output.files,
        selection=rules.inventory.output.selection,
        annotations=rules.annotations.output.table,
        key=lambda wildcards: PSEUDONYM_KEY or [],
    output:
        # participants.csv, annotation_issues.csv and sub-<p>/ (volume, sidecar, boxes)
        deid=directory(f"{RESULTS}/deid"),
        pseudonyms=f"{RESTRICTED}/pseudonyms.csv",
        # Not an output: restricted/pseudonym.key, made once for real data without
        # deidentify.key_file. Snakemake deletes outputs before a rerun, and with the
        # key every pseudonym would change.
    log:
        f"{LOGS}/deidentify.log",
    benchmark:
        f"{BENCH}/deidentify.tsv"
    params:
        # the config sections the verb reads (a change reruns the rule)
        config=verb_config("deidentify", "classes"),
        restricted=lambda wildcards: RESTRICTED,
        key=lambda wildcards, input: f"--key-file {input.key}" if input.key else "",
    conda:
        "../../envs/preprocess.yaml"
    shell:
        "spinedet deidentify --config {params.config:q}"
        " --conversions {input.conversions} --files {input.files}"
        " --selection {input.selection} --annotations {input.annotations}"
        " --restricted {params.restricted} {params.key} --out {output.deid} > {log} 2>&1"


# What the stages after de-identification read, whichever ingest made it.
DEID_TREE = rules.deidentify.output.deid
INVENTORY_SUMMARY = rules.inventory.output.summary
