"""spinedet inventory: every file accounted for, one target series per cohort patient."""

import json
import os
import shutil
import warnings
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from spinedet import SpinedetError
from spinedet.config import load
from spinedet.ingest.dicom import build_series, is_target, list_files, read_file
from spinedet.ingest.inventory import classify_files, inventory, read_cohort, select_series

REPO = Path(__file__).resolve().parents[2]
SAGITTAL = [0, 1, 0, 0, 0, -1]
AXIAL = [1, 0, 0, 0, 1, 0]
CORONAL = [1, 0, 0, 0, 0, -1]
RULES = {"orientation": "sagittal", "description_pattern": "(?i)(t2|stir)",
         "exclude_pattern": "(?i)(loc|scout|survey|stir)"}


@pytest.fixture(scope="module")
def config():
    return load([REPO / "config.yaml"])


def write_mr(path, patient_id, series_uid, instance, *, iop=SAGITTAL, description="T2 SAG",
             series_number=3, study_uid="1.2.3.4.5", sop_uid=None, position=None):
    """A small MR image (pydicom's MR_small with new identity and geometry)."""
    dataset = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    dataset.PatientID = patient_id
    dataset.StudyInstanceUID = study_uid
    dataset.SeriesInstanceUID = series_uid
    dataset.SOPInstanceUID = sop_uid or generate_uid()
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    dataset.SeriesDescription = description
    dataset.SeriesNumber = series_number
    dataset.InstanceNumber = instance
    dataset.ImageOrientationPatient = iop
    dataset.ImagePositionPatient = [float(instance if position is None else position) * 3, 0.0, 0.0]
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset.save_as(path, enforce_file_format=True)
    return dataset


def write_series(root, patient_id, n, **kwargs):
    series_uid = kwargs.pop("series_uid", None) or generate_uid()
    folder = root / patient_id.lower() / series_uid[-6:]
    for i in range(n):
        write_mr(folder / f"IM{i:04d}", patient_id, series_uid, i + 1, **kwargs)
    return series_uid


@pytest.fixture
def export(tmp_path):
    """A mixed export: good series, distractors and every kind of junk file."""
    raw = tmp_path / "raw"
    uids = {
        "t2": write_series(raw, "PAT1", 4, description="T2 TSE SAG", series_number=3),
        "t1": write_series(raw, "PAT1", 5, description="T1 TSE SAG", series_number=2),
        "ax": write_series(raw, "PAT1", 6, description="T2 AX", iop=AXIAL, series_number=4),
        "stir": write_series(raw, "PAT1", 7, description="STIR SAG", series_number=5),
        "tie_a": write_series(raw, "PAT2", 3, description="t2_sag", series_number=7),
        "tie_b": write_series(raw, "PAT2", 3, description="t2_sag", series_number=6),
        "only_axial": write_series(raw, "PAT3", 3, description="T2 AX", iop=AXIAL),
    }
    # A 3-plane localizer: one series, three orientations.
    loc = generate_uid()
    for i, iop in enumerate([SAGITTAL, AXIAL, CORONAL]):
        write_mr(raw / "pat1" / "loc" / f"{i}.dcm", "PAT1", loc, i + 1, iop=iop, description="T2 loc")
    uids["loc"] = loc

    junk = raw / "junk"
    junk.mkdir()
    (junk / "README.txt").write_text("export notes, not an image\n")
    (junk / "empty").write_bytes(b"")
    good = raw / "pat1" / uids["t2"][-6:] / "IM0000"
    data = good.read_bytes()
    (junk / "truncated.dcm").write_bytes(data[: len(data) - 300])
    no_pixels = pydicom.dcmread(good)
    del no_pixels.PixelData
    no_pixels.SOPInstanceUID = no_pixels.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    no_pixels.save_as(junk / "nopixels.dcm")
    no_geometry = pydicom.dcmread(good)
    del no_geometry.ImagePositionPatient
    no_geometry.SOPInstanceUID = no_geometry.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    no_geometry.save_as(junk / "nogeometry.dcm")
    shutil.copyfile(good, raw / "zz_copy_of_first_image")  # sorts after the original
    shutil.copyfile(get_testdata_file("CT_small.dcm"), junk / "ct.dcm")
    shutil.copyfile(Path(get_testdata_file("MR_small.dcm")).parent / "dicomdirtests" / "DICOMDIR",
                    raw / "DICOMDIR")
    write_series(raw, "OUTSIDER", 2, description="T2 SAG")
    # Patient 5 has only a broken file; patient 4 has nothing at all.
    broken = raw / "pat5" / "IM1"
    write_mr(broken, "PAT5", generate_uid(), 1)
    broken.write_bytes(broken.read_bytes()[:-1000])

    cohort = tmp_path / "cohort.csv"
    cohort.write_text("patient_id,group\nPAT1,disc\nPAT2,injured\nPAT3,normal\nPAT4,normal\nPAT5,disc\n")
    return raw, cohort, uids


def test_every_file_is_ok_or_quarantined_with_its_reason(export, config):
    raw, cohort, _ = export
    files, _series, _selection, summary = inventory(raw, cohort, config)
    by_name = {Path(row["path"]).name: row for row in files}

    assert len(files) == len(list_files(raw)) == summary["files_in"]
    assert summary["files_in"] == summary["ok"] + summary["quarantined"]
    expected = {
        "README.txt": "not_dicom",
        "empty": "not_dicom",
        "truncated.dcm": "truncated",
        "nopixels.dcm": "no_pixel_data",
        "nogeometry.dcm": "missing_attributes",
        "zz_copy_of_first_image": "duplicate",
        "ct.dcm": "unsupported_sop_class",
        "IM1": "truncated",
    }
    for name, reason in expected.items():
        assert (by_name[name]["status"], by_name[name]["reason"]) == ("quarantined", reason), name
        assert by_name[name]["detail"]
    outsiders = [row for row in files if row["patient_id"] == "OUTSIDER"]
    assert len(outsiders) == 2 and {row["reason"] for row in outsiders} == {"not_in_cohort"}
    assert by_name["DICOMDIR"]["status"] == "ok" and by_name["DICOMDIR"]["kind"] == "dicomdir"
    duplicate_detail = by_name["zz_copy_of_first_image"]["detail"]
    assert "IM0000" in duplicate_detail  # names the kept file
    assert summary["quarantined_by_reason"] == {
        "duplicate": 1, "missing_attributes": 1, "no_pixel_data": 1, "not_dicom": 2,
        "not_in_cohort": 2, "truncated": 2, "unsupported_sop_class": 1,
    }
    assert summary["ok_by_kind"] == {"dicomdir": 1, "image": summary["ok"] - 1}


def test_series_orientation_and_target_selection(export, config):
    raw, cohort, uids = export
    _files, series, selection, summary = inventory(raw, cohort, config)
    by_uid = {s["series_uid"]: s for s in series}
    assert by_uid[uids["loc"]]["orientation"] == "mixed"
    assert by_uid[uids["ax"]]["orientation"] == "axial"
    assert by_uid[uids["t2"]]["orientation"] == "sagittal"
    assert by_uid[uids["t2"]]["n_slices"] == 4  # the duplicate copy is not a slice

    status = {row["patient_id"]: row for row in selection}
    assert [row["patient_id"] for row in selection] == ["PAT1", "PAT2", "PAT3", "PAT4", "PAT5"]
    # STIR has more slices but T2 is preferred; T1 does not match; the localizer is mixed.
    assert status["PAT1"]["series_uid"] == uids["t2"] and status["PAT1"]["status"] == "selected"
    assert status["PAT2"]["series_uid"] == uids["tie_b"]  # equal slices: lower series number wins
    assert status["PAT3"]["status"] == "no_target_series" and "axial" in status["PAT3"]["reason"]
    assert status["PAT4"]["status"] == "no_files" and "no file" in status["PAT4"]["reason"]
    assert status["PAT5"]["status"] == "no_files" and "truncated: 1" in status["PAT5"]["reason"]
    assert [s["selected"] for s in series].count(True) == 2
    assert summary["patients_selected"] == 2
    assert summary["patients_without_target"] == 1 and summary["patients_without_files"] == 2
    assert summary["series_by_orientation"] == {"axial": 2, "mixed": 1, "sagittal": 5}


def test_summary_holds_no_identity(export, config):
    raw, cohort, uids = export
    files, _series, _selection, summary = inventory(raw, cohort, config)
    text = json.dumps(summary)
    for row in files:
        for column in ("patient_id", "study_uid", "series_uid", "sop_instance_uid", "path"):
            if row[column]:
                assert row[column] not in text
    assert "T2" not in text  # no series descriptions either


def test_tie_break_is_independent_of_file_order():
    series = [
        {"patient_id": "P", "series_uid": uid, "series_number": number, "orientation": "sagittal",
         "description": "T2", "n_slices": 5, "selected": False}
        for uid, number in [("1.9", "4"), ("1.1", "4"), ("1.5", "2")]
    ]
    for ordering in (series, series[::-1]):
        chosen = select_series([dict(s) for s in ordering], [], {"P": "disc"}, RULES)
        assert chosen[0]["series_uid"] == "1.5"
    same_number = [s for s in series if s["series_number"] == "4"]
    assert select_series(same_number, [], {"P": "disc"}, RULES)[0]["series_uid"] == "1.1"


def test_default_rules_select_stir_when_there_is_no_t2_and_prefer_t2_when_there_is(config):
    rules = config["inventory"]

    def sagittal(uid, description, n_slices):
        return {"patient_id": "P", "series_uid": uid, "series_number": uid, "orientation": "sagittal",
                "description": description, "n_slices": n_slices, "selected": False}

    stir_only = select_series([sagittal("7", "STIR_SAG", 15), sagittal("8", "LOCALIZER", 3)], [], {"P": "disc"}, rules)
    assert stir_only[0]["status"] == "selected" and stir_only[0]["series_uid"] == "7"
    both = select_series([sagittal("7", "STIR_SAG", 20), sagittal("9", "T2_TSE_SAG", 15)], [], {"P": "disc"}, rules)
    assert both[0]["series_uid"] == "9"  # T2 before STIR, though STIR has more slices
    scout = select_series([sagittal("3", "SCOUT T2", 30), sagittal("4", "t2 sag", 12)], [], {"P": "disc"}, rules)
    assert scout[0]["series_uid"] == "4"


def test_rules_come_from_the_config():
    series = {"orientation": "sagittal", "description": "STIR sag"}
    assert not is_target(series, RULES)
    assert is_target(series, {**RULES, "exclude_pattern": None})
    assert not is_target({**series, "orientation": "axial"}, {**RULES, "exclude_pattern": None})
    assert is_target({"orientation": "axial", "description": "t2 ax"},
                     {**RULES, "orientation": "axial"})


@pytest.mark.parametrize("name", ["MR_truncated.dcm", "rtplan_truncated.dcm"])
def test_pydicom_truncated_files_are_found(name):
    assert read_file(Path(get_testdata_file(name)))["reason"] == "truncated"


def test_every_cut_of_an_image_is_quarantined(tmp_path):
    """However a copy is cut short before the pixels end, it never passes as ok."""
    data = Path(get_testdata_file("MR_small.dcm")).read_bytes()
    pixel_end = 9692  # MR_small's pixel data ends here; trailing elements follow
    cut = tmp_path / "cut"
    for length in range(0, pixel_end, 37):
        cut.write_bytes(data[:length])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about some cut values
            row = read_file(cut)
        assert row["status"] == "quarantined", length


@pytest.mark.parametrize(
    ("name", "status", "reason"),
    [
        ("MR_small.dcm", "ok", ""),
        ("MR_small_implicit.dcm", "ok", ""),
        ("MR_small_bigendian.dcm", "ok", ""),
        ("MR_small_RLE.dcm", "ok", ""),  # compressed pixel data: length not checked
        ("reportsi.dcm", "quarantined", "unsupported_sop_class"),
        ("CT_small.dcm", "quarantined", "unsupported_sop_class"),
    ],
)
def test_pydicom_test_files(name, status, reason):
    row = read_file(Path(get_testdata_file(name)))
    assert (row["status"], row["reason"]) == (status, reason)


def test_files_are_found_at_any_depth_with_any_name(tmp_path):
    for relative in ["a/b/c/d/e/IM1", "x.dcm", "deep/no extension", "Ä/ü.DCM"]:
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_bytes(b"x")
    (tmp_path / ".snakemake_timestamp").write_bytes(b"")  # snakemake's directory() marker: not export
    (tmp_path / "deep" / ".snakemake_timestamp").write_bytes(b"")  # deeper down it is an export file
    found = [p.relative_to(tmp_path).as_posix() for p in list_files(tmp_path)]
    assert found == sorted(found) and len(found) == 5


def test_first_copy_in_sorted_path_order_is_kept(tmp_path):
    uid = generate_uid()
    write_mr(tmp_path / "b" / "IM1", "P", "1.2.3", 1, sop_uid=uid)
    shutil.copyfile(tmp_path / "b" / "IM1", tmp_path / "a_copy")
    rows = classify_files(list_files(tmp_path), {"P": "disc"})
    assert [(Path(r["path"]).name, r["status"]) for r in rows] == [("a_copy", "ok"),
                                                                   ("IM1", "quarantined")]
    assert build_series(rows)[0]["n_slices"] == 1


def test_cohort_errors_name_the_line_not_the_patient(tmp_path):
    cohort = tmp_path / "cohort.csv"
    cohort.write_text("patient_id,group\nSECRET1,disc\nSECRET2,martian\n")
    with pytest.raises(SpinedetError, match="line 3") as error:
        read_cohort(cohort, ["disc", "normal"])
    assert "SECRET" not in str(error.value)
    cohort.write_text("patient_id,group\nSECRET1,disc\nSECRET1,disc\n")
    with pytest.raises(SpinedetError, match="listed twice"):
        read_cohort(cohort, ["disc"])
    cohort.write_text("id,group\n")
    with pytest.raises(SpinedetError, match="patient_id"):
        read_cohort(cohort, ["disc"])


def test_missing_raw_folder_is_a_clear_error(tmp_path):
    with pytest.raises(SpinedetError, match="raw export folder not found"):
        list_files(tmp_path / "nowhere")


def run_inventory(tmp_path, raw, cohort_text: str) -> int:
    from spinedet.cli import main

    cohort = tmp_path / "cohort.csv"
    cohort.write_text(cohort_text)
    return main(["inventory", "--config", str(REPO / "config.yaml"), "--raw", str(raw), "--cohort", str(cohort),
                 "--out", str(tmp_path / "inventory"), "--summary", str(tmp_path / "summary.json")])


@pytest.mark.parametrize(
    ("fill", "expected"),
    [
        (lambda raw: None, "0 of 2 cohort patients have a target series: the raw export (config `raw`) holds no file"),
        (lambda raw: (raw / "notes.txt").write_text("not DICOM"),
         "0 of 2 cohort patients have a target series: all 1 files were quarantined ({'not_dicom': 1})"),
        (lambda raw: write_series(raw / "a", "SECRET1", 3, iop=AXIAL),
         "0 of 2 cohort patients have a target series: 1 have series but none meets the inventory rules "
         "(series by orientation: {'axial': 1}), 1 have no usable file"),
    ],
)
def test_an_export_with_no_target_series_stops_at_inventory_saying_why(tmp_path, caplog, fill, expected):
    raw = tmp_path / "raw"
    raw.mkdir()
    fill(raw)
    assert run_inventory(tmp_path, raw, "patient_id,group\nSECRET1,disc\nSECRET2,normal\n") == 2
    assert expected in caplog.text
    assert "Nothing to convert" in caplog.text and "SECRET" not in caplog.text
    assert (tmp_path / "inventory" / "selection.csv").is_file()  # written before stopping


def test_an_export_of_linked_folders_is_read_through_the_links(tmp_path, config):
    real = tmp_path / "storage"
    write_series(real, "PAT1", 3)
    write_series(real, "PAT2", 2)
    raw = tmp_path / "raw"
    raw.mkdir()
    for patient in ("pat1", "pat2"):
        (raw / patient).symlink_to(real / patient, target_is_directory=True)
    cohort = tmp_path / "cohort.csv"
    cohort.write_text("patient_id,group\nPAT1,disc\nPAT2,normal\n")
    files, _series, selection, summary = inventory(raw, cohort, config)
    assert summary["files_in"] == summary["ok"] == 5
    assert [row["status"] for row in selection] == ["selected", "selected"]


def test_broken_links_and_link_loops_get_a_row_and_nothing_is_read_twice(tmp_path, config):
    raw = tmp_path / "raw"
    write_series(raw, "PAT1", 2)
    (raw / "gone.dcm").symlink_to(tmp_path / "no_such_file")
    (raw / "pat1" / "back_up").symlink_to(raw, target_is_directory=True)  # a loop
    cohort = tmp_path / "cohort.csv"
    cohort.write_text("patient_id,group\nPAT1,disc\n")
    files, _series, _selection, summary = inventory(raw, cohort, config)
    by_reason = {row["reason"]: row for row in files if row["status"] == "quarantined"}
    assert set(by_reason) == {"broken_link", "link_loop"}
    assert by_reason["broken_link"]["path"].endswith("gone.dcm")
    assert "restore the target or remove the link" in by_reason["broken_link"]["detail"]
    assert by_reason["link_loop"]["path"].endswith("pat1/back_up")
    assert summary["files_in"] == 4 and summary["ok"] == 2  # files in = ok + quarantined


def test_a_folder_that_cannot_be_listed_gets_a_row_that_says_fix_its_permissions(tmp_path, config, monkeypatch):
    raw = tmp_path / "raw"
    write_series(raw, "PAT1", 2)
    locked = raw / "locked"
    write_series(locked, "PAT2", 2)
    real_scandir = os.scandir

    def scandir(path="."):  # as for a non-root user after chmod 000 (root can list anything)
        if os.fspath(path) == os.fspath(locked):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    cohort = tmp_path / "cohort.csv"
    cohort.write_text("patient_id,group\nPAT1,disc\nPAT2,disc\n")
    files, _series, selection, summary = inventory(raw, cohort, config)
    locked_rows = [row for row in files if row["reason"] == "unreadable_folder"]
    assert len(locked_rows) == 1 and locked_rows[0]["path"] == locked.as_posix()
    assert "Permission denied" in locked_rows[0]["detail"] and "fix its permissions" in locked_rows[0]["detail"]
    assert "re-export" not in locked_rows[0]["detail"]
    assert summary["quarantined_by_reason"] == {"unreadable_folder": 1}
    assert [row["status"] for row in selection] == ["selected", "no_files"]



def write_cohort(tmp_path):
    cohort = tmp_path / "cohort.csv"
    cohort.write_text("patient_id,group\nPAT1,disc\n")
    return cohort


def test_a_missing_slice_is_found_and_a_complete_series_preferred(tmp_path, config):
    raw = tmp_path / "raw"
    gapped = write_series(raw, "PAT1", 8, series_number=3, description="T2 SAG")
    (raw / "pat1" / gapped[-6:] / "IM0004").unlink()  # position 5 of 1..8
    complete = write_series(raw, "PAT1", 6, series_number=4, description="T2 SAG repeat")
    cohort = write_cohort(tmp_path)
    _files, series, selection, _summary = inventory(raw, cohort, config)
    by_uid = {s["series_uid"]: s for s in series}
    assert (by_uid[gapped]["positions"], by_uid[gapped]["missing_slices"]) == (7, 1)
    assert (by_uid[complete]["positions"], by_uid[complete]["missing_slices"]) == (6, 0)
    assert selection[0]["series_uid"] == complete  # though the gapped one has more images

    alone = tmp_path / "alone"
    gapped = write_series(alone, "PAT1", 8)
    (alone / "pat1" / gapped[-6:] / "IM0004").unlink()
    _files, _series, selection, _summary = inventory(alone, cohort, config)
    assert selection[0]["series_uid"] == gapped
    assert "1 slice(s) missing (a gap in slice positions): re-export the complete series" in selection[0]["reason"]


def test_a_4d_series_with_more_images_loses_to_a_3d_one(tmp_path, config):
    raw = tmp_path / "raw"
    uid = generate_uid()
    for volume in range(4):  # 4 volumes x 5 positions, as a diffusion series
        for position in range(5):
            write_mr(raw / "dwi" / f"IM{volume}{position}", "PAT1", uid, volume * 5 + position + 1,
                     description="T2 DWI SAG", position=position + 1)
    anatomical = write_series(raw, "PAT1", 12, series_number=5)
    _files, series, selection, _summary = inventory(raw, write_cohort(tmp_path), config)
    dwi = next(s for s in series if s["series_uid"] == uid)
    assert (dwi["n_slices"], dwi["positions"], dwi["missing_slices"]) == (20, 5, 0)
    assert selection[0]["series_uid"] == anatomical


# --------------------------------------------------------------------------
# Enhanced MR (multi-frame)


def write_enhanced(folder, n_frames=4, *, edit=None):
    """An Enhanced MR series (one file, `n_frames` sagittal frames) by the demo writer; (path, frames)."""
    import numpy as np

    from spinedet.demo.dicom_writer import write_series as write_demo_series

    volume = (np.arange(n_frames * 16 * 16).reshape(n_frames, 16, 16) % 4000).astype(np.uint16)
    frames = write_demo_series(folder, volume, ipp_first=[4.0, -50.0, 60.0], iop=SAGITTAL, pixel_spacing=[0.8, 0.7],
                               slice_step=3.5, header={"PatientID": "P1"}, description="T2 SAG", enhanced=True)
    path = frames[0]["path"]
    if edit is not None:
        dataset = pydicom.dcmread(path)
        edit(dataset)
        dataset.save_as(path, enforce_file_format=True)
    return path, frames


def test_an_enhanced_mr_file_is_read_frame_by_frame(tmp_path):
    from spinedet.ingest.dicom import image_planes

    path, frames = write_enhanced(tmp_path, 4)
    row = read_file(path)
    assert (row["status"], row["kind"], row["sop_class_uid"]) == ("ok", "image", "1.2.840.10008.5.1.4.1.1.4.1")
    assert (row["frames"], row["rows"], row["columns"], row["orientation"]) == (4, 16, 16, "sagittal")
    assert json.loads(row["pixel_spacing"]) == [0.8, 0.7]
    # slice normal = row x column direction = (0,1,0) x (0,0,-1) = (-1,0,0): 3.5 mm steps along -x
    assert json.loads(row["frame_positions"]) == [[4.0 - 3.5 * k, -50.0, 60.0] for k in range(4)]
    planes = image_planes({**row, "path": str(path)})
    assert [plane["frame_number"] for plane in planes] == [1, 2, 3, 4]
    assert [frame["frame_number"] for frame in frames] == [1, 2, 3, 4]
    series = build_series([{**row, "path": str(path)}])
    assert len(series) == 1
    assert (series[0]["n_slices"], series[0]["positions"], series[0]["missing_slices"]) == (4, 4, 0)


def test_a_classic_file_has_one_plane_and_one_frame(tmp_path):
    from spinedet.ingest.dicom import image_planes

    write_mr(tmp_path / "IM1", "P1", "1.2.3", 1)
    row = read_file(tmp_path / "IM1")
    assert (row["frames"], row["frame_positions"]) == (1, "")
    assert [plane["frame_number"] for plane in image_planes(row)] == [None]


def test_enhanced_mr_without_its_frame_geometry_is_quarantined_saying_where(tmp_path):
    def drop_position(dataset):
        del dataset.PerFrameFunctionalGroupsSequence[2].PlanePositionSequence

    def wrong_count(dataset):
        dataset.NumberOfFrames = 5

    missing = read_file(write_enhanced(tmp_path / "a", edit=drop_position)[0])
    assert (missing["status"], missing["reason"]) == ("quarantined", "missing_attributes")
    assert "ImagePositionPatient (in the functional groups of some frames)" in missing["detail"]
    count = read_file(write_enhanced(tmp_path / "b", edit=wrong_count)[0])
    assert (count["reason"], count["detail"].split(":")[0]) == (
        "missing_attributes", "4 per-frame functional groups for NumberOfFrames 5")


def test_enhanced_mr_frames_in_two_orientations_or_spacings_are_mixed(tmp_path):
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    def tilt_one_frame(dataset):
        orientation = Dataset()
        orientation.ImageOrientationPatient = AXIAL
        dataset.PerFrameFunctionalGroupsSequence[1].PlaneOrientationSequence = Sequence([orientation])

    def coarser_one_frame(dataset):
        measures = Dataset()
        measures.PixelSpacing = [1.6, 1.4]
        dataset.PerFrameFunctionalGroupsSequence[3].PixelMeasuresSequence = Sequence([measures])

    def jitter_one_frame(dataset):  # rounding in a scanner's per-frame groups: still one plane
        orientation = Dataset()
        orientation.ImageOrientationPatient = [0, 1, 1e-6, 0, 0, -1]
        dataset.PerFrameFunctionalGroupsSequence[1].PlaneOrientationSequence = Sequence([orientation])

    row = read_file(write_enhanced(tmp_path / "a", edit=tilt_one_frame)[0])
    assert (row["status"], row["orientation"]) == ("ok", "mixed")
    assert build_series([{**row, "path": "x"}])[0]["orientation"] == "mixed"
    assert read_file(write_enhanced(tmp_path / "b", edit=coarser_one_frame)[0])["orientation"] == "mixed"
    assert read_file(write_enhanced(tmp_path / "c", edit=jitter_one_frame)[0])["orientation"] == "sagittal"
