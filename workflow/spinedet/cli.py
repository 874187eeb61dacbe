"""The `spinedet` command: one subcommand per pipeline stage.

Each stage module exposes `add_arguments(parser)` and `run(args) -> int`.
Modules are imported only when their verb runs, so `spinedet --help` and the
light stages never pay for importing torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from spinedet import SpinedetError, __version__, configure_logging

# verb: (module, one-line help). Each module lives in the wing of the DAG it belongs to.
STAGES = {
    "synthesize": ("demo.synthesize", "Write the synthetic cervical-spine DICOM export (demo data)."),
    "inventory": ("ingest.inventory",
                  "Account for every file of a raw export and pick one target series per patient."),
    "annotations": ("ingest.annotations.table",
                    "One table of every annotation: the sheet, the export's DICOM SR and SEG objects."),
    "convert": ("ingest.convert", "Convert the selected series to NIfTI with dcm2niix (stays in restricted/)."),
    "deidentify": ("ingest.deidentify", "Pseudonymise patients, scrub sidecars, map annotations to voxel space."),
    "bids-import": ("ingest.bids_import",
                    "A BIDS dataset with label masks (raw_format bids): pseudonymised volumes and voxel boxes."),
    "slices": ("dataset.slices", "Write canonical PNG slices and one COCO JSON per patient."),
    "split": ("dataset.split", "Patient-level stratified train/val/test split as COCO datasets."),
    "export-for-annotation": ("dataset.export_for_annotation",
                              "Pseudonymised slices + COCO for CVAT / Label Studio, and their DICOM transforms."),
    "train": ("detect.train", "Train one detector (resumable)."),
    "evaluate": ("study.evaluate",
                 "COCO metrics, FROC, bootstrap CIs and patient-level results on the test split."),
    "speed": ("study.speed", "Time every model in one job, interleaved on the same test slices."),
    "cv": ("study.cv", "Cross-validation summary over the folds, and the fold ensemble on the test split."),
    "compare": ("study.compare",
                "Paired AP50 difference of every model pair: bootstrap CI and permutation p-value."),
    "report": ("study.report", "The model-comparison report (HTML, Markdown, CSV, figures)."),
    "predict": ("detect.predict", "Detect lesions in a new DICOM series or NIfTI volume."),
    "view": ("detect.view", "Show studies and predict's DICOM SR in the OHIF viewer, beside a local Orthanc."),
}


def stage_module(stage: str) -> str:
    """The dotted module of a verb, e.g. spinedet.dataset.slices."""
    return f"spinedet.{STAGES[stage][0]}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spinedet", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"spinedet {__version__}")
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for name, (_, help_text) in STAGES.items():
        stage_parser = sub.add_parser(name, help=help_text, description=help_text)
        stage_parser.set_defaults(_module=stage_module(name))
        # -v after the verb too; SUPPRESS keeps a -v given before it
        stage_parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                                  help="debug logging")
        # Arguments are added lazily (see main) so --help stays fast.
        stage_parser.set_defaults(_lazy=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # Find the stage name first, then let that stage's module add its arguments.
    stage = next((a for a in argv if a in STAGES), None)
    if stage is not None:
        module = importlib.import_module(stage_module(stage))
        stage_parser = parser._subparsers._group_actions[0].choices[stage]  # noqa: SLF001
        module.add_arguments(stage_parser)
    args = parser.parse_args(argv)
    configure_logging(logging.DEBUG if args.verbose else logging.INFO)
    module = importlib.import_module(args._module)
    try:
        return int(module.run(args) or 0)
    except SpinedetError as exc:
        logging.getLogger("spinedet").error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
