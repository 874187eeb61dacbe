# spinedet: raw cervical-spine DICOM export in, model-comparison report out.
# Stages live in workflow/rules/*.smk; every rule calls one `spinedet` verb.

import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version

min_version("9.0")

# The config check is spinedet's own (same schema as snakemake.utils.validate,
# defaults filled, plus checks a schema cannot express), so the workflow and
# every verb fail with the same one-line message naming the key. Imported from
# the source tree: snakemake's environment need not have spinedet installed.
sys.path.insert(0, str(Path(workflow.basedir) / "workflow"))
from spinedet import SpinedetError
from spinedet.config_check import check_config


configfile: "config.yaml"


try:
    # Inputs of a real export are checked where the workflow starts, not
    # again inside each cluster job (compute nodes may not see raw data).
    check_config(
        config,
        Path(workflow.basedir) / "workflow/schemas/config.schema.yaml",
        check_paths=workflow.is_main_process,
    )
except SpinedetError as exc:
    raise WorkflowError(str(exc)) from None


include: "workflow/rules/common.smk"
include: "workflow/rules/synthesize.smk"
# A hospital DICOM export, or a BIDS dataset with label masks (raw_format).
if config["raw_format"] == "bids":

    include: "workflow/rules/bids.smk"

else:

    include: "workflow/rules/ingest.smk"


include: "workflow/rules/slices.smk"
include: "workflow/rules/split.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/speed.smk"
include: "workflow/rules/compare.smk"
include: "workflow/rules/cv.smk"
include: "workflow/rules/report.smk"


# exported slices for CVAT / Label Studio go back to DICOM: DICOM exports only
if config["raw_format"] == "dicom":

    include: "workflow/rules/annotation_export.smk"


rule all:
    input:
        f"{RESULTS}/report/report.html",
        f"{RESULTS}/report/report.md",
        f"{RESULTS}/report/summary.csv",
        # split.folds >= 2: the cross-validation summary is a result in its own right
        rules.cv.output if FOLDS else [],
    default_target: True
