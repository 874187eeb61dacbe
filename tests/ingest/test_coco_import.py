"""Boxes drawn in CVAT or Label Studio on the slices of `spinedet export-for-annotation`,
brought back as COCO: `spinedet annotations --coco --manifest` puts them on the DICOM
instances they were drawn on, and lists every box it cannot use with its reason."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from dicom_study import CONFIG, export_argv, run_dicom_study
from spinedet import SpinedetError, cli
from spinedet.ingest.annotations.coco import read_coco, read_manifest, slice_key
from spinedet.io import read_csv

REPO = Path(__file__).resolve().parents[2]
CLASSES = ["disc_herniation", "cord_injury"]
COORDINATES = ("x_min", "y_min", "x_max", "y_max")


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> SimpleNamespace:
    """A tiny export (3 patients, half Enhanced MR) through inventory ... slices and the export for
    annotation, by the CLI; the export's COCO and manifest copied to restricted/labels/ as a user does."""
    study = run_dicom_study(tmp_path_factory.mktemp("coco_study"))
    exported = study.restricted / "annotation_export"
    assert cli.main(export_argv(study, exported)) == 0
    labels = study.restricted / "labels"
    labels.mkdir()
    shutil.copy(exported / "coco.json", labels / "coco.json")
    shutil.copy(exported / "manifest.csv", labels / "manifest.csv")
    file_rows = read_csv(study.inventory / "files.csv")
    return SimpleNamespace(
        root=study.root, export=study.export, inventory=study.inventory, labels=labels,
        table=read_csv(study.restricted / "annotations" / "annotations.csv"),
        coco=json.loads((labels / "coco.json").read_text()),
        manifest=read_manifest(labels / "manifest.csv"),
        instances={row["sop_instance_uid"]: row for row in file_rows if row["kind"] == "image"},
    )


def import_annotations(study: SimpleNamespace, out: Path, coco: Path, sheet: bool = False) -> tuple[list, list, dict]:
    argv = ["annotations", *CONFIG, "--files", str(study.inventory / "files.csv"),
            "--cohort", str(study.export / "cohort.csv"), "--coco", str(coco),
            "--manifest", str(study.labels / "manifest.csv"), "--out", str(out), "--summary", str(out / "summary.json")]
    if sheet:
        argv += ["--sheet", str(study.export / "annotations.csv")]
    assert cli.main(argv) == 0
    return (read_csv(out / "annotations.csv"), read_csv(out / "import_issues.csv"),
            json.loads((out / "summary.json").read_text()))


def key(row: dict) -> tuple:
    return row["sop_instance_uid"], row["frame_number"], row["label"]


def test_the_exported_boxes_come_back_on_their_dicom_instances(study, tmp_path):
    """The task's pre-annotations, as the tool gives them back, with no sheet: each is the
    sheet's box on the same instance (and frame) to 0.5 px, as source coco."""
    table, issues, summary = import_annotations(study, tmp_path / "annotations", study.labels / "coco.json")
    assert issues == [] and len(table) == len(study.coco["annotations"]) > 0
    assert summary["boxes_by_source"] == {"csv": 0, "sr": 0, "seg": 0, "coco": len(table)}
    assert {row["source"] for row in table} == {"coco"}
    assert [row["source_ref"] for row in table] == [f"coco.json annotation {ann['id']}"
                                                    for ann in study.coco["annotations"]]
    assert any(row["frame_number"] for row in table) and any(not row["frame_number"] for row in table)
    worst = 0.0
    for row in table:
        same = [t for t in study.table if key(t) == key(row)]
        assert same and all(row[c] == same[0][c] for c in ("study_uid", "series_uid", "instance_number"))
        worst = max(worst, min(max(abs(float(t[c]) - float(row[c])) for c in COORDINATES) for t in same))
    assert worst < 0.5


def test_boxes_the_sheet_already_gives_are_kept_once(study, tmp_path):
    """The COCO is read after the sheet: its copies of the sheet's boxes are duplicates."""
    table, issues, summary = import_annotations(study, tmp_path / "annotations", study.labels / "coco.json",
                                                sheet=True)
    assert {row["source"] for row in table} == {"csv"} and len(table) == len(study.table)
    assert {issue["reason"] for issue in issues} == {"duplicate"}
    assert len(issues) == len(study.coco["annotations"]) == summary["unusable_by_source"]["coco"]


def test_unusable_boxes_are_listed_with_their_reason(study, tmp_path):
    """Boxes a tool can give that lead nowhere: on an image that is not in the export, of a label
    the study does not have, off the image; and a name with a tool's folder and upload prefix."""
    coco = copy.deepcopy(study.coco)
    first = coco["images"][0]
    annotated = coco["annotations"][0]
    coco["images"].append({"id": 900, "file_name": "sub-0000000000/sub-0000000000_slice-07.png", "width": 64,
                           "height": 64})
    coco["images"].append({"id": 901, "file_name": "images/8f3a2b1c-" + Path(first["file_name"]).name,
                           "width": 64, "height": 64})
    coco["categories"].append({"id": 7, "name": "fracture"})
    coco["annotations"] = [
        {"id": 101, "image_id": 900, "category_id": 1, "bbox": [10, 10, 5, 5], "area": 25, "iscrowd": 0},
        {"id": 102, "image_id": 555, "category_id": 1, "bbox": [10, 10, 5, 5], "area": 25, "iscrowd": 0},
        {"id": 103, "image_id": first["id"], "category_id": 7, "bbox": [10, 10, 5, 5], "area": 25, "iscrowd": 0},
        {"id": 104, "image_id": first["id"], "category_id": 2, "bbox": [-40, 10, 20, 5], "area": 100, "iscrowd": 0},
        {"id": 105, "image_id": first["id"], "category_id": 2, "bbox": [10, 70, 5, 5], "area": 25, "iscrowd": 0},
        {"id": 106, "image_id": first["id"], "category_id": 1, "bbox": [10, 10, 0, 5], "area": 0, "iscrowd": 0},
        {"id": 107, "image_id": first["id"], "category_id": 1, "bbox": ["a", 10, 5, 5], "area": 0, "iscrowd": 0},
        {"id": 108, "image_id": 901, "category_id": 2, "bbox": [60, 60, 10, 10], "area": 100, "iscrowd": 0},
        annotated,
    ]
    path = tmp_path / "project-1-at-2026.json"
    path.write_text(json.dumps(coco))
    boxes, issues = read_coco(path, study.manifest, study.instances, CLASSES)
    reasons = {issue.source_ref.rsplit(" ", 1)[1]: issue.reason for issue in issues}
    assert reasons == {"101": "unknown_image", "102": "unknown_image", "103": "unknown_label",
                       "104": "outside_image", "105": "outside_image", "106": "unsupported_graphic",
                       "107": "unreadable_object"}
    assert all(issue.source == "coco" and issue.source_ref.startswith(f"{path.name} annotation ") for issue in issues)
    assert all(issue.patient_id for issue in issues if issue.reason != "unknown_image")
    # the Label Studio-style name is the first image; its box is clipped to the 64 x 64 image
    clipped = next(box for box in boxes if box.source_ref.endswith(" 108"))
    row = next(r for r in study.manifest if r["file_name"] == first["file_name"])
    assert (clipped.sop_instance_uid, clipped.x_max, clipped.y_max) == (row["sop_instance_uid"], 64.0, 64.0)
    assert len(boxes) == 2


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", json.dumps({"images": [], "annotations": {}}),
                                     "\x00\x01binary"])
def test_a_file_that_is_not_coco_is_one_issue(study, tmp_path, content):
    path = tmp_path / "broken.json"
    path.write_text(content)
    boxes, issues = read_coco(path, study.manifest, study.instances, CLASSES)
    assert boxes == [] and [(i.source, i.source_ref, i.reason) for i in issues] == [
        ("coco", "broken.json", "unreadable_object")]
    assert str(tmp_path) not in issues[0].detail


def test_tool_file_names_match_on_the_pseudonymous_tail():
    assert slice_key("sub-ab12/sub-ab12_slice-07.png") == "sub-ab12_slice-07.png"
    assert slice_key("images\\3f2e1a0b-sub-ab12_slice-07.png") == "sub-ab12_slice-07.png"
    assert slice_key("/data/upload/1/sub-ab12_slice-07.png") == "sub-ab12_slice-07.png"
    assert slice_key("slice-07.png") is None


def test_coco_needs_its_manifest(study, tmp_path):
    argv = ["annotations", *CONFIG, "--files", str(study.inventory / "files.csv"),
            "--cohort", str(study.export / "cohort.csv"), "--coco", str(study.labels / "coco.json"),
            "--out", str(tmp_path), "--summary", str(tmp_path / "summary.json")]
    assert cli.main(argv) == 2
    (tmp_path / "manifest.csv").write_text("file_name,width\nx.png,64\n")
    with pytest.raises(SpinedetError, match="not a manifest of spinedet export-for-annotation"):
        read_manifest(tmp_path / "manifest.csv")
