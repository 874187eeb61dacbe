"""Ingest end to end on the synthetic export plus junk: every file accounted for, no PHI outside restricted/.

The three verbs run as the Snakefile runs them: `spinedet <verb> ...` in a
subprocess with stdout and stderr sent to logs/<verb>.log, so the logs are
scanned too.
"""

import csv
import gzip
import hashlib
import io
import json
import shutil
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from phi import collect_phi, scan_tree
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from spinedet.demo.dicom_writer import write_series

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "config.yaml"
# The export is treated as a real one: its own key is made in restricted/ (the demo's
# config would hand deidentify the synthetic export's key).
REAL_EXPORT = '{"demo": {"enabled": false}}'
OUTSIDER = {"PatientID": "99990099", "PatientName": "Outsider^Olga", "PatientBirthDate": "19551123",
            "StudyDate": "20180704", "StudyTime": "134501", "InstitutionName": "Elsewhere Imaging Centre",
            "AccessionNumber": "ACC77665544"}


def spinedet(verb, log, *args):
    with log.open("w") as fh:
        completed = subprocess.run([sys.executable, "-m", "spinedet.cli", verb, "--config", str(CONFIG), REAL_EXPORT, *args],
                                   stdout=fh, stderr=subprocess.STDOUT, check=False)
    assert completed.returncode == 0, log.read_text()[-3000:]


def read_rows(path):
    with Path(path).open(newline="") as fh:
        return list(csv.DictReader(fh))


def add_junk(raw: Path) -> dict[str, str]:
    """Junk files a real export may hold; returns {relative path: expected reason}."""
    target = sorted(raw.rglob("*"))
    image = next(p for p in target if p.is_file()
                 and pydicom.dcmread(p, stop_before_pixels=True).SeriesDescription == "T2_TSE_SAG")
    expected = {}
    (raw / "notes.txt").write_text("Exported for the spine study. Call the PACS admin for questions.\n")
    expected["notes.txt"] = "not_dicom"
    data = image.read_bytes()
    (raw / "TRUNC0001").write_bytes(data[: len(data) // 2])
    expected["TRUNC0001"] = "truncated"
    no_pixels = pydicom.dcmread(image)
    del no_pixels.PixelData
    no_pixels.SOPInstanceUID = no_pixels.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    no_pixels.save_as(raw / "NOPIX0001")
    expected["NOPIX0001"] = "no_pixel_data"
    (raw / "zz_dup").mkdir()
    shutil.copyfile(image, raw / "zz_dup" / "copy.dcm")
    expected["zz_dup/copy.dcm"] = "duplicate"
    shutil.copyfile(Path(get_testdata_file("MR_small.dcm")).parent / "dicomdirtests" / "DICOMDIR",
                    raw / "DICOMDIR")
    expected["DICOMDIR"] = "ok"
    volume = np.random.default_rng(0).integers(0, 2000, size=(3, 32, 32)).astype(np.uint16)
    for item in write_series(raw / "OUTSIDE", volume, ipp_first=[0, -40, 50], iop=[0, 1, 0, 0, 0, -1],
                             pixel_spacing=(1.0, 1.0), slice_step=3.0, header=OUTSIDER, series_number=2,
                             description="T2_TSE_SAG"):
        expected[Path(item["path"]).relative_to(raw).as_posix()] = "not_in_cohort"
    return expected


@pytest.fixture(scope="module")
def ingested(smoke_export, tmp_path_factory):
    work = tmp_path_factory.mktemp("ingest")
    raw = work / "raw"
    shutil.copytree(smoke_export / "DICOM", raw)
    junk = add_junk(raw)
    restricted, results, logs = work / "restricted", work / "results", work / "logs"
    logs.mkdir()
    inv = restricted / "inventory"
    spinedet("inventory", logs / "inventory.log", "--raw", str(raw), "--cohort", str(smoke_export / "cohort.csv"),
             "--out", str(inv), "--summary", str(results / "inventory" / "summary.json"))
    convert_args = ["--series", str(inv / "series.csv"), "--selection", str(inv / "selection.csv"),
                    "--out", str(restricted / "convert")]
    spinedet("convert", logs / "convert.log", *convert_args)
    deid_args = ["--conversions", str(restricted / "convert" / "conversions.csv"), "--files", str(inv / "files.csv"),
                 "--selection", str(inv / "selection.csv"), "--annotations", str(smoke_export / "annotations.csv"),
                 "--restricted", str(restricted), "--out", str(results / "deid")]
    spinedet("deidentify", logs / "deidentify.log", *deid_args)
    return {"work": work, "raw": raw, "junk": junk, "restricted": restricted, "results": results, "logs": logs,
            "convert_args": convert_args, "deid_args": deid_args, "phi": collect_phi(raw)}


def test_every_file_is_accounted_for(ingested, smoke_export):
    raw = ingested["raw"]
    files = read_rows(ingested["restricted"] / "inventory" / "files.csv")
    summary = json.loads((ingested["results"] / "inventory" / "summary.json").read_text())
    on_disk = sorted(p.relative_to(raw).as_posix() for p in raw.rglob("*") if p.is_file())
    assert sorted(Path(r["path"]).relative_to(raw).as_posix() for r in files) == on_disk
    assert summary["files_in"] == len(on_disk) == summary["ok"] + summary["quarantined"]

    by_path = {Path(r["path"]).relative_to(raw).as_posix(): r for r in files}
    for path, reason in ingested["junk"].items():
        row = by_path[path]
        assert (row["reason"] or "ok") == reason, path
        assert row["status"] == ("ok" if reason == "ok" else "quarantined")
    outsiders = sum(1 for reason in ingested["junk"].values() if reason == "not_in_cohort")
    assert summary["quarantined_by_reason"] == {"duplicate": 1, "no_pixel_data": 1, "not_dicom": 1,
                                                "not_in_cohort": outsiders, "truncated": 1}
    assert summary["ok_by_kind"]["dicomdir"] == 1
    assert summary["patients_not_in_cohort"] == 1

    cohort = read_rows(smoke_export / "cohort.csv")
    selection = read_rows(ingested["restricted"] / "inventory" / "selection.csv")
    assert [r["patient_id"] for r in selection] == [r["patient_id"] for r in cohort]
    assert {r["status"] for r in selection} == {"selected"}
    assert summary["patients_selected"] == len(cohort)
    # each patient: target T2, T1, axial T2 and a 3-plane localizer (mixed)
    assert summary["series_by_orientation"]["mixed"] == len(cohort)


def test_every_annotation_reaches_voxel_space(ingested, smoke_export):
    annotations = read_rows(smoke_export / "annotations.csv")
    deid = ingested["results"] / "deid"
    assert read_rows(deid / "annotation_issues.csv") == []
    participants = read_rows(deid / "participants.csv")
    boxes = sum(len(json.loads((deid / f"sub-{p['pseudonym']}" / f"sub-{p['pseudonym']}_boxes.json")
                               .read_text())["boxes"]) for p in participants)
    assert boxes == len(annotations) > 0
    groups = {r["group"] for r in read_rows(smoke_export / "cohort.csv")}
    assert {p["group"] for p in participants} == groups


def test_no_phi_outside_restricted(ingested):
    phi = ingested["phi"]
    assert {"PatientID", "PatientName", "PatientBirthDate", "StudyDate", "SeriesTime", "InstitutionName",
            "AccessionNumber", "StationName", "StudyInstanceUID", "SeriesInstanceUID",
            "SOPInstanceUID"} <= set(phi.values())
    assert "Outsider" in phi and "99990099" in phi  # the non-cohort patient's PHI is collected too
    leaks = scan_tree(ingested["results"], phi) + scan_tree(ingested["logs"], phi)
    assert leaks == [], "\n".join(map(str, leaks))


def test_the_scan_finds_phi_in_restricted(ingested):
    hits = scan_tree(ingested["restricted"], ingested["phi"])
    found = {(Path(h.path).name, h.where, h.keyword) for h in hits}
    assert ("pseudonyms.csv", "content", "PatientID") in found
    assert ("files.csv", "content", "SOPInstanceUID") in found
    assert ("series.json", "content", "InstitutionName") in found  # dcm2niix's raw sidecar
    # dcm2niix writes the acquisition time into the NIfTI descrip: found only after gunzip
    assert any(name == "series.nii.gz" and where == "content (gunzipped) NIfTI header" for name, where, _ in found)


def tree_digest(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file()}


def test_rerun_with_the_same_key_is_byte_identical(ingested):
    results, restricted, logs = ingested["results"], ingested["restricted"], ingested["logs"]
    before = tree_digest(results / "deid")
    pseudonyms = (restricted / "pseudonyms.csv").read_text()
    spinedet("convert", logs / "convert.log", *ingested["convert_args"])
    spinedet("deidentify", logs / "deidentify.log", *ingested["deid_args"])
    assert tree_digest(results / "deid") == before
    assert (restricted / "pseudonyms.csv").read_text() == pseudonyms


def test_scanner_finds_planted_values(tmp_path):
    phi = {"Doe^Jane": "PatientName", "Jane": "PatientName", "20190312": "StudyDate",
           "2019-03-12": "StudyDate", "1.2.826.0.1.3680043.8.498.1234567": "SOPInstanceUID",
           "Secret General Hospital": "InstitutionName", "152956": "StudyTime"}
    (tmp_path / "20190312_scan.txt").write_text("nothing here")
    (tmp_path / "sidecar.txt").write_text("AcquisitionTime=152956.000")
    (tmp_path / "uid_like.txt").write_text("1.2.840.3.20190312.152956")  # a time inside a UID-like string
    (tmp_path / "volume.nii.gz").write_bytes(gzip.compress(b"\0" * 100 + b"descrip DOE^JANE" + b"\0" * 100))
    named = io.BytesIO()
    with gzip.GzipFile("Jane.nii", "wb", fileobj=named, mtime=0) as fh:
        fh.write(b"no phi inside")
    (tmp_path / "named.gz").write_bytes(named.getvalue())
    header = np.zeros(352, dtype=np.uint8).tobytes()
    header = (struct.pack("<i", 348) + header[4:108] + struct.pack("<f", 352.0) + header[112:344] + b"n+1\0"
              + header[348:])
    voxels = b"\0jane\0" + b"\0 1.2.826.0.1.3680043.8.498.1234567 \0"
    (tmp_path / "image.nii").write_bytes(header + voxels)
    with zipfile.ZipFile(tmp_path / "checkpoint.pt", "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", b"config: {site: Secret General Hospital}")
    text = b"Comment\0\0" + zlib.compress(b"acquired 2019-03-12")
    chunk = len(text).to_bytes(4, "big") + b"zTXt" + text + b"\0\0\0\0"
    (tmp_path / "slice.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk)
    (tmp_path / "uid.json").write_text('{"uid": "1.2.826.0.1.3680043.8.498.1234567"}')
    # a time as the fraction of a number (a detection score) is chance, not a leak
    (tmp_path / "clean.json").write_text('{"n": 201903121, "uid": "1.2.826.0.1.3680043.8.498.12345678", '
                                         '"who": "Janet", "score": 0.152956}')
    found = {(h.path, h.where, h.value) for h in scan_tree(tmp_path, phi)}
    assert found == {
        ("20190312_scan.txt", "name", "20190312"),
        ("sidecar.txt", "content", "152956"),
        ("uid_like.txt", "content", "152956"),
        ("uid_like.txt", "content", "20190312"),
        ("volume.nii.gz", "content (gunzipped)", "Doe^Jane"),
        ("volume.nii.gz", "content (gunzipped)", "Jane"),
        ("named.gz", "gzip header", "Jane"),
        # in voxel data a short name is chance, a UID is not
        ("image.nii", "content NIfTI voxels", "1.2.826.0.1.3680043.8.498.1234567"),
        ("checkpoint.pt", "content (zip member archive/data.pkl)", "Secret General Hospital"),
        ("slice.png", "content (PNG text chunk)", "2019-03-12"),
        ("uid.json", "content", "1.2.826.0.1.3680043.8.498.1234567"),
    }


def test_a_log_records_own_clock_is_not_phi_but_a_time_in_its_message_is(tmp_path):
    phi = {"14:16:50": "StudyTime"}
    (tmp_path / "inventory.log").write_text(
        "inventory: 100%|##| 3/3\r2026-11-30 14:16:50,123 INFO spinedet.ingest.inventory: files in 3\n")
    assert scan_tree(tmp_path, phi) == []
    (tmp_path / "convert.log").write_text("2026-11-30 10:00:00,000 INFO spinedet.ingest.convert: study at 14:16:50\n")
    assert [(h.path, h.value) for h in scan_tree(tmp_path, phi)] == [("convert.log", "14:16:50")]
