# spinedet: raw cervical-spine DICOM export in, model-comparison report out.
# Stages live in workflow/rules/*.smk; every rule calls one `spinedet` verb.

from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config.yaml"


validate(config, "workflow/schemas/config.schema.yaml")


include: "workflow/rules/common.smk"
include: "workflow/rules/synthesize.smk"
include: "workflow/rules/ingest.smk"
include: "workflow/rules/slices.smk"
include: "workflow/rules/split.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        f"{RESULTS}/report/report.html",
        f"{RESULTS}/report/report.md",
        f"{RESULTS}/report/summary.csv",
    default_target: True
