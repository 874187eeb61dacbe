# On demand, not part of rule all: the study's slices, pseudonymised, with their boxes
# as pre-annotations, for CVAT or Label Studio (`snakemake annotation_export`). The
# manifest that takes the boxes drawn there back to DICOM carries identity: it stays in
# restricted/, and the rule reads restricted inputs, so it is a localrule. DICOM exports only.
# `spinedet annotations` reads a copy of the manifest (annotation_import.coco_manifest),
# never this output: it runs before slices, so reading it here would close a cycle.


rule annotation_export:
    localrule: True
    input:
        deid=rules.deidentify.output.deid,
        pseudonyms=rules.deidentify.output.pseudonyms,
        slices=rules.slices.output.slices,
        conversions=rules.convert.output.conversions,
        files=rules.inventory.output.files,
    output:
        images=directory(f"{RESULTS}/annotation_export/images"),
        coco=f"{RESULTS}/annotation_export/coco.json",
        manifest=f"{RESTRICTED}/annotation_export/manifest.csv",
    log:
        f"{LOGS}/annotation_export.log",
    benchmark:
        f"{BENCH}/annotation_export.tsv"
    params:
        # the config sections the verb reads (a change reruns the rule)
        config=verb_config("slices", "classes"),
    conda:
        "../../envs/preprocess.yaml"
    shell:
        "spinedet export-for-annotation --config {params.config:q} --participants {input.deid}/participants.csv"
        " --slices {input.slices} --pseudonyms {input.pseudonyms} --conversions {input.conversions}"
        " --files {input.files} --images {output.images} --coco {output.coco}"
        " --manifest {output.manifest} > {log} 2>&1"
