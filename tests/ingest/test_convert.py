"""spinedet convert: the real dcm2niix on each selected series; failures quarantine one series only."""

import csv
from pathlib import Path

import nibabel as nib
import pytest
from pydicom.uid import generate_uid
from test_inventory import AXIAL, SAGITTAL, write_mr

from spinedet.ingest.convert import convert_all
from spinedet.ingest.dicom_to_nifti import find_dcm2niix, run_dcm2niix


def write_named_series(folder, patient_id, n, iops=None, name="IM_Doe_John_{i}"):
    series_uid = generate_uid()
    paths = []
    for i in range(n):
        path = folder / name.format(i=i)
        write_mr(path, patient_id, series_uid, i + 1, iop=(iops or [SAGITTAL] * n)[i])
        paths.append(path)
    return series_uid, paths


def series_row(series_uid, paths):
    return {"series_uid": series_uid, "files": ";".join(p.as_posix() for p in paths),
            "rows": 64, "columns": 64, "n_slices": len(paths)}


def test_dcm2niix_comes_from_the_pip_package():
    import dcm2niix

    assert find_dcm2niix() == str(Path(dcm2niix.bin))


def test_one_series_becomes_one_volume_without_raw_names(tmp_path):
    uid, paths = write_named_series(tmp_path / "raw", "P1", 4)
    result = run_dcm2niix(paths, tmp_path / "out" / "0001", pixels_per_image=64 * 64)
    assert result["status"] == "converted", result["message"]
    assert Path(result["nifti"]).name == "series.nii.gz" and Path(result["sidecar"]).name == "series.json"
    assert nib.load(result["nifti"]).shape == (4, 64, 64)  # MR_small is a 3D acquisition: dcm2niix rotates it
    assert "Convert 4 DICOM" in result["output"]
    assert "Doe_John" not in result["output"]  # dcm2niix saw only numbered links
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["0001"]  # link folder removed


def test_split_empty_and_missing_series_are_quarantined(tmp_path):
    _, mixed = write_named_series(tmp_path / "loc", "P1", 4, iops=[SAGITTAL, SAGITTAL, AXIAL, AXIAL])
    result = run_dcm2niix(mixed, tmp_path / "out" / "a")
    assert result["status"] == "quarantined"
    assert "split the series into 2 volumes" in result["message"]
    assert "orientation varies" in result["message"]  # dcm2niix's own explanation

    junk = tmp_path / "notes.txt"
    junk.write_text("not an image")
    result = run_dcm2niix([junk], tmp_path / "out" / "b")
    assert result["status"] == "quarantined" and "Unable to find any DICOM" in result["message"]

    result = run_dcm2niix([tmp_path / "gone.dcm"], tmp_path / "out" / "c")
    assert result["status"] == "quarantined" and "rerun the inventory" in result["message"]


def test_wrong_voxel_count_is_quarantined(tmp_path):
    _, paths = write_named_series(tmp_path / "raw", "P1", 3)
    result = run_dcm2niix(paths, tmp_path / "out", pixels_per_image=32 * 32)
    assert result["status"] == "quarantined" and "does not hold" in result["message"]


def test_one_bad_series_does_not_stop_the_others(tmp_path, capsys):
    good_uid, good = write_named_series(tmp_path / "p1", "P1", 3)
    bad_uid, bad = write_named_series(tmp_path / "p2", "P2", 4, iops=[SAGITTAL, AXIAL, AXIAL, SAGITTAL])
    late_uid, late = write_named_series(tmp_path / "p3", "P3", 2)
    series = [series_row(good_uid, good), series_row(bad_uid, bad), series_row(late_uid, late)]
    selection = [
        {"row": "1", "patient_id": "P1", "series_uid": good_uid, "status": "selected"},
        {"row": "2", "patient_id": "P2", "series_uid": bad_uid, "status": "selected"},
        {"row": "3", "patient_id": "P4", "series_uid": "", "status": "no_target_series"},
        {"row": "4", "patient_id": "P3", "series_uid": late_uid, "status": "selected"},
    ]
    out = tmp_path / "convert"
    (out / "0009").mkdir(parents=True)  # left over from an earlier, larger cohort
    conversions = convert_all(series, selection, out)

    assert [(c["row"], c["status"]) for c in conversions] == [
        ("1", "converted"), ("2", "quarantined"), ("4", "converted")]
    assert conversions[0]["nifti"] == (out / "0001" / "series.nii.gz").as_posix()
    assert "split" in conversions[1]["message"]
    assert not (out / "0009").exists()
    printed = capsys.readouterr().out
    assert printed.count("Found ") == 3  # dcm2niix's output goes to stdout, i.e. the log


def test_cli_writes_conversions_csv(tmp_path):
    from spinedet.cli import main

    uid, paths = write_named_series(tmp_path / "raw", "P1", 3)
    series_csv, selection_csv = tmp_path / "series.csv", tmp_path / "selection.csv"
    with series_csv.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["series_uid", "files", "rows", "columns", "n_slices"])
        writer.writeheader()
        writer.writerow(series_row(uid, paths))
    selection_csv.write_text(f"row,patient_id,group,series_uid,status,reason\n1,P1,disc,{uid},selected,ok\n")
    config = Path(__file__).resolve().parents[2] / "config.yaml"
    out = tmp_path / "convert"
    assert main(["convert", "--config", str(config), "--series", str(series_csv),
                 "--selection", str(selection_csv), "--out", str(out)]) == 0
    with (out / "conversions.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["status"] for r in rows] == ["converted"]
    assert list(rows[0]) == ["row", "patient_id", "series_uid", "status", "nifti", "sidecar", "message"]


@pytest.mark.parametrize("missing", ["series.csv", "selection.csv"])
def test_missing_inputs_are_clear_errors(tmp_path, missing):
    from spinedet.cli import main

    (tmp_path / "series.csv").write_text("series_uid,files,rows,columns\n")
    (tmp_path / "selection.csv").write_text("row,patient_id,group,series_uid,status,reason\n")
    (tmp_path / missing).unlink()
    config = Path(__file__).resolve().parents[2] / "config.yaml"
    assert main(["convert", "--config", str(config), "--series", str(tmp_path / "series.csv"),
                 "--selection", str(tmp_path / "selection.csv"), "--out", str(tmp_path / "c")]) == 2


def test_a_series_that_fails_conversion_falls_back_to_the_next_candidate(tmp_path):
    bad_uid, bad = write_named_series(tmp_path / "p1" / "a", "P1", 4, iops=[SAGITTAL, AXIAL, AXIAL, SAGITTAL])
    good_uid, good = write_named_series(tmp_path / "p1" / "b", "P1", 3)
    series = [series_row(bad_uid, bad), series_row(good_uid, good)]
    selection = [{"row": "1", "patient_id": "P1", "series_uid": bad_uid, "status": "selected",
                  "fallbacks": good_uid}]
    conversions = convert_all(series, selection, tmp_path / "convert")
    assert [(c["series_uid"], c["status"]) for c in conversions] == [(good_uid, "converted")]
    assert conversions[0]["message"].startswith("converted fallback 1 of the inventory's ranking after selected series:")
    assert "split" in conversions[0]["message"]
    assert nib.load(conversions[0]["nifti"]).shape[0] == 3

    only_bad = [{**selection[0], "fallbacks": ""}]
    conversions = convert_all(series, only_bad, tmp_path / "convert2")
    assert conversions[0]["status"] == "quarantined" and conversions[0]["series_uid"] == bad_uid


def test_a_missing_slice_is_named_in_the_conversion_message(tmp_path):
    uid = generate_uid()
    paths = [tmp_path / "raw" / f"IM{i}" for i in range(6)]
    for instance, (path, position) in enumerate(zip(paths, [1, 2, 3, 5, 6, 7]), start=1):  # slice 4 missing
        write_mr(path, "P1", uid, instance, position=position)
    row = {**series_row(uid, paths), "missing_slices": 1}
    conversions = convert_all([row], [{"row": "1", "patient_id": "P1", "series_uid": uid, "status": "selected"}],
                              tmp_path / "convert")
    assert conversions[0]["status"] == "quarantined"
    assert conversions[0]["message"].startswith("1 slice(s) missing from the series (a gap in slice positions")
