"""A tiny DICOM study run by the CLI, verb by verb, as far as its slices, and the
`spinedet export-for-annotation` command line on it: shared by the export's tests and
the COCO import's, which reads back what the export wrote."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from spinedet import cli
from spinedet.demo.synthesize import synthesize

REPO = Path(__file__).resolve().parents[1]
CONFIG = ["--config", str(REPO / "config.yaml"), '{"demo": {"enabled": false}}']  # a real export


def run_dicom_study(root: Path) -> SimpleNamespace:
    """A tiny export (3 patients, half of them Enhanced MR) through inventory ... slices, by the CLI."""
    export, results, restricted = root / "export", root / "results", root / "restricted"
    synthesize(export, patients=3, matrix=64, seed=8, enhanced_fraction=0.5)
    inventory = restricted / "inventory"
    for argv in (
        ["inventory", *CONFIG, "--raw", str(export / "DICOM"), "--cohort", str(export / "cohort.csv"),
         "--out", str(inventory), "--summary", str(results / "inventory" / "summary.json")],
        ["annotations", *CONFIG, "--files", str(inventory / "files.csv"), "--cohort", str(export / "cohort.csv"),
         "--sheet", str(export / "annotations.csv"), "--out", str(restricted / "annotations"),
         "--summary", str(results / "annotations" / "summary.json")],
        ["convert", *CONFIG, "--series", str(inventory / "series.csv"), "--selection",
         str(inventory / "selection.csv"), "--out", str(restricted / "convert")],
        ["deidentify", *CONFIG, "--conversions", str(restricted / "convert" / "conversions.csv"),
         "--files", str(inventory / "files.csv"), "--selection", str(inventory / "selection.csv"),
         "--annotations", str(restricted / "annotations" / "annotations.csv"), "--restricted", str(restricted),
         "--out", str(results / "deid")],
        ["slices", *CONFIG, "--participants", str(results / "deid" / "participants.csv"),
         "--out", str(results / "slices")],
    ):  # fmt: skip
        assert cli.main(argv) == 0, argv[0]
    return SimpleNamespace(root=root, export=export, results=results, restricted=restricted, inventory=inventory)


def export_argv(study: SimpleNamespace, out: Path, *extra: str) -> list[str]:
    return ["export-for-annotation", *CONFIG,
            "--participants", str(study.results / "deid" / "participants.csv"),
            "--slices", str(study.results / "slices"), "--pseudonyms", str(study.restricted / "pseudonyms.csv"),
            "--conversions", str(study.restricted / "convert" / "conversions.csv"),
            "--files", str(study.inventory / "files.csv"), "--images", str(out / "images"),
            "--coco", str(out / "coco.json"), "--manifest", str(out / "manifest.csv"), *extra]
