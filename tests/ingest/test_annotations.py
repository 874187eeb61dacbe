"""`spinedet annotations`: the sheet, the export's TID 1500 SRs and SEGs in one
table, every unusable item listed with its reason."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from pydicom.data import get_testdata_file
from scipy import ndimage

from spinedet import SpinedetError, cli
from spinedet.demo.synthesize import synthesize
from spinedet.demo.truth import load_truth
from spinedet.io import read_csv, write_csv

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "config.yaml")


def export_of(tmp_path_factory, annotation_format: str, enhanced_fraction: float = 0.0) -> Path:
    root = tmp_path_factory.mktemp(f"export_{annotation_format}")
    synthesize(root, patients=4, matrix=64, seed=8, annotation_format=annotation_format,
               enhanced_fraction=enhanced_fraction)
    return root


def run_inventory(raw: Path, cohort: Path, out: Path) -> None:
    assert cli.main(["inventory", "--config", CONFIG, "--raw", str(raw), "--cohort", str(cohort),
                     "--out", str(out / "inventory"), "--summary", str(out / "inventory_summary.json")]) == 0


def import_annotations(root: Path, out: Path, sheet: bool = True) -> tuple[list[dict], list[dict], dict]:
    """inventory, then `spinedet annotations` through the CLI: (table, issues, summary)."""
    run_inventory(root / "DICOM", root / "cohort.csv", out)
    argv = ["annotations", "--config", CONFIG, "--files", str(out / "inventory" / "files.csv"),
            "--cohort", str(root / "cohort.csv"), "--out", str(out / "annotations"),
            "--summary", str(out / "summary.json")]
    if sheet:
        argv += ["--sheet", str(root / "annotations.csv")]
    assert cli.main(argv) == 0
    return (read_csv(out / "annotations" / "annotations.csv"), read_csv(out / "annotations" / "import_issues.csv"),
            json.loads((out / "summary.json").read_text()))


def box_key(row: dict) -> tuple:
    frame = row["frame_number"]
    return (row["sop_instance_uid"], str(int(float(frame))) if frame not in ("", None) else "", row["label"],
            *(float(row[c]) for c in ("x_min", "y_min", "x_max", "y_max")))


@pytest.fixture(scope="module")
def sr_export(tmp_path_factory) -> Path:
    return export_of(tmp_path_factory, "sr", enhanced_fraction=0.5)


def test_the_sheet_alone_goes_into_the_table_verbatim(tmp_path, tmp_path_factory):
    root = export_of(tmp_path_factory, "csv")
    table, issues, summary = import_annotations(root, tmp_path)
    sheet = read_csv(root / "annotations.csv")
    assert len(table) == len(sheet) > 0 and issues == []
    for number, (row, original) in enumerate(zip(table, sheet), start=2):
        assert {key: row[key] for key in original} == original  # the same strings, so the same boxes downstream
        assert (row["source"], row["source_ref"]) == ("csv", f"annotations.csv line {number}")
    assert summary["boxes_by_source"] == {"csv": len(sheet), "sr": 0, "seg": 0}
    assert summary["objects"] == {"sr": 0, "seg": 0}


def test_the_demos_measurement_reports_give_back_every_box(tmp_path, sr_export):
    """One TID 1500 SR per patient (closed 5-point polylines, as OHIF stores rectangles):
    the same instances, frames, labels and pixel edges as the phantom's boxes."""
    assert read_csv(sr_export / "annotations.csv") == []  # the sheet holds no sr patient's rows
    table, issues, summary = import_annotations(sr_export, tmp_path)
    truth = read_csv(sr_export / "truth" / "annotations.csv")
    assert issues == [] and {row["source"] for row in table} == {"sr"}
    assert sorted(map(box_key, table)) == sorted(map(box_key, truth))
    assert any(row["frame_number"] for row in table)  # Enhanced MR patients: boxes on frames
    assert summary["objects"]["sr"] == len({row["study_uid"] for row in truth})


def component_boxes(root: Path) -> list[tuple]:
    """Every 8-connected component of each class's lesion masks on each source image
    (instance, or frame of an Enhanced MR instance), as a table key."""
    expected = []
    for case in load_truth(root).values():
        enhanced = len(set(case.sop_instance_uids)) == 1
        for label in dict.fromkeys(case.labels):
            union = case.masks[[i for i, name in enumerate(case.labels) if name == label]].any(axis=0)
            for k, mask in enumerate(union):
                components, count = ndimage.label(mask, structure=np.ones((3, 3)))
                for rows, cols in ndimage.find_objects(components):
                    expected.append((case.sop_instance_uids[k], str(int(case.instance_numbers[k])) if enhanced else "",
                                     label, float(cols.start), float(rows.start), float(cols.stop), float(rows.stop)))
    return expected


def test_the_demos_segmentations_give_the_component_extents_of_the_phantom_masks(tmp_path, tmp_path_factory):
    root = export_of(tmp_path_factory, "seg", enhanced_fraction=0.5)
    table, issues, _ = import_annotations(root, tmp_path)
    assert issues == [] and {row["source"] for row in table} == {"seg"}
    assert sorted(map(box_key, table)) == sorted(component_boxes(root))


def test_a_box_given_by_two_sources_is_kept_once(tmp_path, sr_export):
    root = tmp_path / "export"
    shutil.copytree(sr_export, root)
    truth = read_csv(root / "truth" / "annotations.csv")
    write_csv(root / "annotations.csv", truth, list(truth[0]))  # the same boxes in the sheet as well
    table, issues, summary = import_annotations(root, tmp_path / "out")
    assert [row["source"] for row in table] == ["csv"] * len(truth)
    assert len(issues) == len(truth) and {issue["reason"] for issue in issues} == {"duplicate"}
    assert all("annotations.csv line" in issue["detail"] for issue in issues)
    assert summary["unusable_by_reason"] == {"duplicate": len(truth)}


def test_a_second_revision_of_a_report_is_listed_as_duplicate(tmp_path, sr_export):
    """A viewer saves a new SR each time a reader saves; the PACS exports them all."""
    import pydicom

    root = tmp_path / "export"
    shutil.copytree(sr_export, root)
    report = next(path for path in (root / "DICOM").rglob("*") if path.is_file()
                  and pydicom.dcmread(path, stop_before_pixels=True).Modality == "SR")
    revision = pydicom.dcmread(report)
    revision.SOPInstanceUID = revision.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    revision.save_as(report.with_name(report.name + "_revision"), enforce_file_format=True)
    single, _, _ = import_annotations(sr_export, tmp_path / "single")
    table, issues, _ = import_annotations(root, tmp_path / "out")
    assert sorted(map(box_key, table)) == sorted(map(box_key, single))
    duplicates = [issue for issue in issues if issue["reason"] == "duplicate"]
    assert duplicates and all(issue["source_ref"].startswith(revision.SOPInstanceUID) for issue in duplicates)


def test_regions_of_a_patient_outside_the_cohort_are_listed(tmp_path, sr_export):
    root = tmp_path / "export"
    shutil.copytree(sr_export, root)
    cohort = read_csv(root / "cohort.csv")
    annotated = read_csv(root / "truth" / "annotations.csv")[0]["study_uid"]
    left_out = next(case.patient_id for case in load_truth(root).values() if case.study_uid == annotated)
    write_csv(root / "cohort.csv", [row for row in cohort if row["patient_id"] != left_out], ["patient_id", "group"])
    table, issues, _ = import_annotations(root, tmp_path / "out")
    outside = [issue for issue in issues if issue["reason"] == "not_in_cohort"]
    assert outside and {issue["patient_id"] for issue in outside} == {left_out}
    assert all(row["study_uid"] != annotated for row in table)


def test_every_sr_and_seg_pydicom_ships_is_accounted_for(tmp_path):
    """pydicom's SR and SEG test files in an export: each ends up quarantined in files.csv,
    or its regions and segments as boxes or in import_issues.csv, and the verb goes on."""
    import pydicom

    test_files = Path(get_testdata_file("MR_small.dcm")).parent
    objects = []
    for path in sorted(p for p in test_files.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - not DICOM: not an SR or SEG
            continue
        if str(ds.get("SOPClassUID", "")).startswith(("1.2.840.10008.5.1.4.1.1.88.", "1.2.840.10008.5.1.4.1.1.66.4")):
            objects.append(path)
    assert len(objects) >= 3
    raw = tmp_path / "raw"
    for number, path in enumerate(objects):
        (raw / f"object{number}").mkdir(parents=True)
        shutil.copy(path, raw / f"object{number}" / path.name)
    patients = {str(pydicom.dcmread(p, stop_before_pixels=True).get("PatientID", "")) for p in objects}
    write_csv(tmp_path / "cohort.csv", [{"patient_id": p, "group": "disc"} for p in sorted(patients) if p],
              ["patient_id", "group"])
    sheet = tmp_path / "sheet.csv"
    write_csv(sheet, [{"series_uid": "1.2.3", "sop_instance_uid": "1.2.3.4", "label": "cord_injury",
                       "x_min": 1, "y_min": 1, "x_max": 4, "y_max": 4}],
              ["series_uid", "sop_instance_uid", "label", "x_min", "y_min", "x_max", "y_max"])
    # no target series among them: the inventory verb would stop, its table is what matters here
    from spinedet.config import load
    from spinedet.ingest.inventory import FILE_COLUMNS, inventory

    file_rows = inventory(raw, tmp_path / "cohort.csv", load([CONFIG]))[0]
    write_csv(tmp_path / "inventory" / "files.csv", file_rows, FILE_COLUMNS)
    assert cli.main(["annotations", "--config", CONFIG, "--files", str(tmp_path / "inventory" / "files.csv"),
                     "--cohort", str(tmp_path / "cohort.csv"), "--sheet", str(sheet),
                     "--out", str(tmp_path / "annotations"), "--summary", str(tmp_path / "summary.json")]) == 0
    files = {Path(row["path"]).name: row for row in read_csv(tmp_path / "inventory" / "files.csv")}
    issues = read_csv(tmp_path / "annotations" / "import_issues.csv")
    for path in objects:
        row = files[path.name]
        if row["status"] == "quarantined":
            assert row["reason"] and len(row["detail"].split()) >= 4
        else:
            assert row["kind"] in ("sr", "seg")
            listed = [issue for issue in issues if issue["source_ref"].startswith(row["sop_instance_uid"])]
            assert listed and all(issue["reason"] and issue["detail"] for issue in listed), path.name


def test_no_usable_annotation_is_a_clear_error(tmp_path, tmp_path_factory, caplog):
    root = export_of(tmp_path_factory, "csv")
    write_csv(root / "annotations.csv", [], ["series_uid", "sop_instance_uid", "label", "x_min", "y_min", "x_max",
                                             "y_max"])
    with pytest.raises(AssertionError):
        import_annotations(root, tmp_path)
    assert "no usable annotation in the sheet, SR or SEG objects" in caplog.text
    with pytest.raises(SpinedetError, match="missing column"):
        from spinedet.ingest.annotation_sheet import read_annotations

        (tmp_path / "bad.csv").write_text("label,x_min\n")
        read_annotations(tmp_path / "bad.csv")
