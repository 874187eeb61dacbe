# raw_format bids: a BIDS dataset with label masks. It is already NIfTI, so no
# inventory of DICOM headers and no dcm2niix: one step writes the same
# de-identified tree as deidentify. It reads subject labels: a localrule,
# identity only under restricted/.


rule bids_import:
    localrule: True
    input:
        raw=config["raw"],
        # null: the dataset's participants.tsv (under raw) holds the groups
        cohort=config["cohort"] or [],
        key=lambda wildcards: PSEUDONYM_KEY or [],
    output:
        # participants.csv, annotation_issues.csv and sub-<p>/ (volume, sidecar, boxes)
        deid=directory(f"{RESULTS}/deid"),
        pseudonyms=f"{RESTRICTED}/pseudonyms.csv",
        files=f"{RESTRICTED}/bids/files.csv",
        summary=f"{RESULTS}/inventory/summary.json",
    log:
        f"{LOGS}/bids_import.log",
    benchmark:
        f"{BENCH}/bids_import.tsv"
    params:
        # the config sections the verb reads (a change reruns the rule)
        config=verb_config("bids", "classes", "groups", "deidentify"),
        restricted=lambda wildcards: RESTRICTED,
        cohort=lambda wildcards, input: f"--cohort {input.cohort}" if input.cohort else "",
        key=lambda wildcards, input: f"--key-file {input.key}" if input.key else "",
    conda:
        "../../envs/preprocess.yaml"
    shell:
        "spinedet bids-import --config {params.config:q} --raw {input.raw} {params.cohort}"
        " --restricted {params.restricted} {params.key} --files {output.files}"
        " --summary {output.summary} --out {output.deid} > {log} 2>&1"


# What the stages after de-identification read, whichever ingest made it.
DEID_TREE = rules.bids_import.output.deid
INVENTORY_SUMMARY = rules.bids_import.output.summary
