"""Whole studies from BIDS datasets through snakemake (raw_format: bids): the smoke study's
patients as BIDS run to the report and give the boxes of the DICOM study whose boxes come
as DICOM SEG; and a small real-style cohort in which every patient has lesions trains for
epochs x max_iters_per_epoch iterations and reaches its report."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from spinedet.io import read_csv

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def snakemake(workdir: Path, overrides: dict, *targets: str) -> subprocess.CompletedProcess:
    (workdir / "paths.yaml").write_text(yaml.safe_dump(overrides))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(
        [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
         "--cores", "2", "--configfile", str(REPO / "config.yaml"), str(REPO / "config" / "smoke.yaml"),
         str(workdir / "paths.yaml"), "--", *targets],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=1500)


@pytest.fixture(scope="module")
def bids_smoke_study(tmp_path_factory) -> Path:
    """config/smoke-bids.yaml with its folders moved under a temporary directory."""
    workdir = tmp_path_factory.mktemp("bids_smoke")
    overrides = yaml.safe_load((REPO / "config" / "smoke-bids.yaml").read_text())
    overrides.update(results=str(workdir / "results"), restricted=str(workdir / "restricted"),
                     raw=str(workdir / "export" / "BIDS"))
    overrides["demo"]["out"] = str(workdir / "export")
    # one model: what is BIDS-specific ends at the split; the DICOM smoke study compares two
    overrides["study"] = {"models": ["resnet50"]}
    run = snakemake(workdir, overrides)
    assert run.returncode == 0, run.stderr[-5000:]
    return workdir


@pytest.fixture(scope="module")
def seg_study(tmp_path_factory) -> Path:
    """The DICOM smoke study with its boxes as DICOM SEG objects, to the split."""
    workdir = tmp_path_factory.mktemp("seg_smoke")
    export = workdir / "export"
    overrides = {"results": str(workdir / "results"), "restricted": str(workdir / "restricted"),
                 "raw": str(export / "DICOM"), "annotations": str(export / "annotations.csv"),
                 "cohort": str(export / "cohort.csv"), "demo": {"out": str(export), "annotation_format": "seg"}}
    run = snakemake(workdir, overrides, *(str(workdir / "results" / "split" / f"{s}.json")
                                          for s in ("train", "val", "test")))
    assert run.returncode == 0, run.stderr[-5000:]
    return workdir


def boxes_by_image(results: Path) -> dict[tuple, list[list[float]]]:
    """COCO boxes of every split, by (slice file name, category)."""
    found: dict[tuple, list[list[float]]] = {}
    for split in ("train", "val", "test"):
        coco = json.loads((results / "split" / f"{split}.json").read_text())
        names = {image["id"]: image["file_name"] for image in coco["images"]}
        for ann in coco["annotations"]:
            found.setdefault((names[ann["image_id"]], ann["category_id"]), []).append(ann["bbox"])
    return {key: sorted(boxes) for key, boxes in found.items()}


def test_the_bids_smoke_study_reaches_the_report(bids_smoke_study):
    results = bids_smoke_study / "results"
    assert (results / "report" / "report.html").is_file()
    summary = json.loads((results / "inventory" / "summary.json").read_text())
    # the demo stores some patients in RAS voxel order and some masks in another order than their image
    assert summary["raw_format"] == "bids" and summary["patients_selected"] == 10
    assert summary["masks_resampled"] >= 1 and summary["quarantined"] == 0
    report = (results / "report" / "report.md").read_text()
    assert "10 patients" in report
    files = read_csv(bids_smoke_study / "restricted" / "bids" / "files.csv")
    assert all(row["status"] in ("used", "ignored") for row in files)


def test_no_subject_label_leaves_restricted(bids_smoke_study):
    """The BIDS subject labels are the synthetic PatientIDs: none may appear under results/."""
    labels = [row["patient_id"] for row in read_csv(bids_smoke_study / "restricted" / "pseudonyms.csv")]
    pattern = re.compile(r"(?<![\d.])(" + "|".join(map(re.escape, labels)) + r")(?!\d)")
    for path in (bids_smoke_study / "results").rglob("*"):
        assert not pattern.search(str(path.relative_to(bids_smoke_study))), path
        if path.is_file() and path.suffix in (".json", ".csv", ".md", ".html", ".log", ".tsv", ".yaml"):
            assert not pattern.search(path.read_text(errors="replace")), path


def test_bids_masks_give_the_boxes_of_the_dicom_seg_study(bids_smoke_study, seg_study):
    """The same phantom masks by two paths: NIfTI + dseg written from the phantom geometry
    (some in RAS order, some masks on another grid), and DICOM + dcm2niix + DICOM SEG. The
    pseudonyms are the same (subject label = PatientID, the demo's key), so the slices are;
    the split may differ (the DICOM export's fault corpus adds cohort patients), so the boxes
    are compared by slice image, across the splits."""
    from_bids = boxes_by_image(bids_smoke_study / "results")
    from_seg = boxes_by_image(seg_study / "results")
    assert from_bids and from_bids.keys() == from_seg.keys()
    for key, boxes in from_bids.items():
        assert len(boxes) == len(from_seg[key]), key
        for a, b in zip(boxes, from_seg[key]):
            assert np.allclose(a, b, atol=0.5), (key, a, b)


def test_a_small_cohort_where_every_patient_has_lesions_trains_its_full_length_and_reports(tmp_path):
    """15 patients, all with lesions (the demo's normal participants removed from the BIDS
    dataset), run as a real study (demo off): each epoch is max_iters_per_epoch batches
    whatever the cohort's size, the report says what cannot be estimated without lesion-free
    patients, and nothing warns about the demo."""
    export = tmp_path / "export"
    done = subprocess.run([sys.executable, "-m", "spinedet.cli", "synthesize", "--out", str(export), "--patients", "22",
                           "--matrix", "128", "--seed", "5", "--export-format", "bids"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    root = export / "BIDS"
    header, *rows = (root / "participants.tsv").read_text().splitlines()
    kept = [row for row in rows if row.split("\t")[1] != "normal"]
    for row in rows:
        if row not in kept:
            subject = row.split("\t")[0]
            shutil.rmtree(root / subject)
            shutil.rmtree(root / "derivatives" / "labels" / subject)
    (root / "participants.tsv").write_text("\n".join([header, *kept]) + "\n")
    assert len(kept) == 15
    epochs, per_epoch = 2, 5
    overrides = {"raw_format": "bids", "raw": str(root), "annotations": None, "cohort": None,
                 "demo": {"enabled": False}, "results": str(tmp_path / "results"),
                 "restricted": str(tmp_path / "restricted"), "study": {"models": ["resnet50"]},
                 "models": {"resnet50": {"epochs": epochs, "max_iters_per_epoch": per_epoch}},
                 "speed": {"warmup": 0, "iterations": 1}}
    run = snakemake(tmp_path, overrides)
    assert run.returncode == 0, run.stderr[-5000:]
    assert "synthesize" not in run.stdout + run.stderr
    results = tmp_path / "results"
    log = read_csv(results / "models" / "resnet50" / "train_log.csv")
    assert [int(row["iters"]) for row in log] == [per_epoch] * epochs
    groups = {row["group"]: row for row in read_csv(results / "split" / "group_counts.csv")}
    assert groups["normal"]["total"] == "0" and groups["total"]["total"] == "15"
    report = (results / "report" / "report.md").read_text()
    assert "not estimable (no lesion-free patients in the test split)" in report
    assert (results / "report" / "report.html").is_file()
