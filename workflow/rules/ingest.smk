# Inventory, conversion and de-identification read PHI: they are localrules
# (common.smk) and write identity only under restricted/.


rule inventory:
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
        # The config this rule depends on: a change reruns it.
        settings={"inventory": config["inventory"], "groups": config["groups"]},
        config=EFFECTIVE_CONFIG,
        out=lambda wildcards, output: Path(output.files).parent,
    conda:
        "../../envs/preprocess.yaml"
    shell:
        "spinedet inventory --config {params.config} --raw {input.raw}"
        " --cohort {input.cohort} --out {params.out}"
        " --summary {output.summary} > {log} 2>&1"


rule convert:
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
        config=EFFECTIVE_CONFIG,
        out=lambda wildcards, output: Path(output.conversions).parent,
    conda:
        "../../envs/preprocess.yaml"
    shell:
        "spinedet convert --config {params.config} --series {input.series}"
        " --selection {input.selection} --out {params.out} > {log} 2>&1"


rule deidentify:
    input:
        conversions=rules.convert.output.conversions,
        files=rules.inventory.output.files,
        selection=rules.inventory.output.selection,
        annotations=config["annotations"],
        key=lambda wildcards: PSEUDONYM_KEY or [],
    output:
        participants=f"{RESULTS}/deid/participants.csv",
        issues=f"{RESULTS}/deid/annotation_issues.csv",
    log:
        f"{LOGS}/deidentify.log",
    benchmark:
        f"{BENCH}/deidentify.tsv"
    params:
        # The config this rule depends on: a change reruns it.
        settings={"deidentify": config["deidentify"], "classes": config["classes"]},
        config=EFFECTIVE_CONFIG,
        restricted=lambda wildcards: RESTRICTED,
        key=lambda wildcards, input: f"--key-file {input.key}" if input.key else "",
        out=lambda wildcards, output: Path(output.participants).parent,
    conda:
        "../../envs/preprocess.yaml"
    shell:
        "spinedet deidentify --config {params.config}"
        " --conversions {input.conversions} --files {input.files}"
        " --selection {input.selection} --annotations {input.annotations}"
        " --restricted {params.restricted} {params.key} --out {params.out} > {log} 2>&1"
