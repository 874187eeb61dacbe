"""spinedet deidentify: keyed pseudonyms, scrubbed volumes and sidecars, annotations in voxel space."""

import csv
import gzip
import hashlib
import hmac
import json
import re
import shutil
import stat
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from spinedet import SpinedetError
from spinedet.cli import main
from spinedet.config import load
from spinedet.ingest.convert import convert_all
from spinedet.ingest.deid_tree import (
    KEY_FILE_NAME,
    SIDECAR_ALLOWLIST,
    load_or_create_key,
    pseudonym,
    pseudonymise,
    scrubbed_nifti_bytes,
    scrubbed_sidecar,
    subject_paths,
)
from spinedet.ingest.deidentify import bids_suffix, deidentify
from spinedet.ingest.annotation_sheet import read_annotations
from spinedet.ingest.inventory import inventory
from spinedet.demo.dicom_writer import write_series

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "config.yaml"
REAL_EXPORT = '{"demo": {"enabled": false}}'  # deidentify makes its own key in restricted/
SAGITTAL = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]
AXIAL = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
PHI_HEADER = {"PatientName": "Doe^Jane", "PatientBirthDate": "19700101", "StudyDate": "20190312",
              "StudyTime": "091500", "InstitutionName": "Secret General Hospital"}
ANNOTATION_COLUMNS = ["study_uid", "series_uid", "sop_instance_uid", "instance_number", "label",
                      "x_min", "y_min", "x_max", "y_max"]


@pytest.fixture(scope="module")
def config():
    return load([CONFIG])


def write_patient(raw, patient_id, *, study, n_slices=4, size=24, t1=False, seed=0):
    """A target sagittal T2 (and optionally a sagittal T1) for one patient; returns the T2 instances."""
    rng = np.random.default_rng(seed)
    volume = rng.integers(50, 3000, size=(n_slices, size, size)).astype(np.uint16)
    header = {**PHI_HEADER, "PatientID": patient_id, "StudyInstanceUID": study}
    folder = raw / hashlib.sha1(patient_id.encode()).hexdigest()[:8]
    instances = write_series(folder, volume, ipp_first=[10.0, -50.0, 60.0], iop=SAGITTAL,
                             pixel_spacing=(0.9, 0.9), slice_step=3.3, reverse_order=True, header=header,
                             series_number=2, description="T2_TSE_SAG",
                             file_name=lambda i: f"t2/IM{i:04d}")
    if t1:
        write_series(folder, volume, ipp_first=[10.0, -50.0, 60.0], iop=SAGITTAL, pixel_spacing=(0.9, 0.9),
                     slice_step=3.3, header=header, series_number=3, description="T1_TSE_SAG",
                     file_name=lambda i: f"t1/IM{i:04d}")
    series_uid = pydicom.dcmread(instances[0]["path"], stop_before_pixels=True).SeriesInstanceUID
    return series_uid, instances


def write_csv(path, rows, columns):
    with Path(path).open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def read_rows(path):
    with Path(path).open(newline="") as fh:
        return list(csv.DictReader(fh))


def run_ingest(work, raw, cohort, annotations, config, conversions_override=None):
    """inventory -> convert -> deidentify in process; returns (out folder, restricted folder)."""
    restricted, out = work / "restricted", work / "results" / "deid"
    files, series, selection, _summary = inventory(raw, cohort, config)
    conversions = convert_all(series, selection, restricted / "convert")
    if conversions_override:
        conversions = conversions_override(conversions)
    key = load_or_create_key(restricted, None)
    stringify = [{k: str(v) for k, v in row.items()} for row in files]
    deidentify(conversions, stringify, [{k: str(v) for k, v in r.items()} for r in selection],
               read_annotations(annotations), key, config, out, restricted)
    return out, restricted


# --------------------------------------------------------------------------
# Pseudonyms and the key


def test_pseudonym_is_keyed_hmac_sha256_hex():
    key = bytes(range(32))
    expected = hmac.new(key, b"12340001", hashlib.sha256).hexdigest()[:10]
    assert pseudonym(key, "12340001", 10) == expected
    assert pseudonym(key, "12340001", 10).isalnum() and len(pseudonym(key, "x", 16)) == 16
    assert pseudonym(bytes(32), "12340001", 10) != expected


def test_key_is_created_once_with_mode_0600(tmp_path):
    first = load_or_create_key(tmp_path / "restricted")
    key_file = tmp_path / "restricted" / "pseudonym.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert load_or_create_key(tmp_path / "restricted") == first and len(first) == 32
    assert pseudonymise(["a", "b"], first, 10) == pseudonymise(["a", "b"], load_or_create_key(
        tmp_path / "restricted"), 10)


def test_configured_key_file(tmp_path):
    with pytest.raises(SpinedetError, match="deidentify.key_file"):
        load_or_create_key(tmp_path, tmp_path / "missing.key")
    key_file = tmp_path / "site.key"
    key_file.write_text("00" * 32 + "\n")
    assert load_or_create_key(tmp_path, key_file) == bytes(32)
    assert not (tmp_path / "pseudonym.key").exists()
    key_file.write_text("not hex")
    with pytest.raises(SpinedetError, match="hexadecimal"):
        load_or_create_key(tmp_path, key_file)


def test_pseudonym_collision_is_an_error(monkeypatch):
    monkeypatch.setattr("spinedet.ingest.deid_tree.pseudonym", lambda key, pid, length: "abcdef")
    with pytest.raises(SpinedetError, match="pseudonym_length"):
        pseudonymise(["a", "b"], b"k" * 32, 6)


@pytest.mark.parametrize("bad", ["../x", "a b", "Müller", "", "a/b"])
def test_subject_paths_accept_only_alphanumeric_pseudonyms(tmp_path, bad):
    with pytest.raises(ValueError):
        subject_paths(tmp_path, bad)
    assert subject_paths(tmp_path, "ab12")["nifti"] == tmp_path / "sub-ab12" / "anat" / "sub-ab12_T2w.nii.gz"


@pytest.mark.parametrize(("description", "suffix"), [
    ("T2_TSE_SAG", "T2w"), ("STIR_SAG", "STIR"), ("t2 stir sag", "STIR"), ("T1_TSE_SAG", "T1w"),
    ("sag PD", "MR"), ("", "MR"),
])
def test_volumes_are_named_by_the_selected_sequence(tmp_path, description, suffix):
    assert bids_suffix(description) == suffix
    paths = subject_paths(tmp_path, "ab12", bids_suffix(description))
    assert paths["nifti"].name == f"sub-ab12_{suffix}.nii.gz" and paths["sidecar"].name == f"sub-ab12_{suffix}.json"


# --------------------------------------------------------------------------
# Volume and sidecar


def test_nifti_text_fields_and_extensions_are_cleared_affine_and_data_kept(tmp_path):
    data = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    affine = np.array([[0, 0, -3.3, 10], [-0.9, 0, 0, 40], [0, -0.8, 0, 60], [0, 0, 0, 1]])
    image = nib.Nifti1Image(data, affine)
    image.header["descrip"] = b"TE=92;Time=90912.000"
    image.header["aux_file"] = b"Doe Jane"
    image.header["intent_name"] = b"secret"
    image.header["db_name"] = b"Secret General"
    image.header.extensions.append(nib.nifti1.Nifti1Extension(6, b"PatientName=Doe^Jane"))
    source = tmp_path / "series.nii.gz"
    nib.save(image, source)

    scrubbed = scrubbed_nifti_bytes(source)
    assert scrubbed == scrubbed_nifti_bytes(source)  # deterministic bytes
    assert scrubbed[4:8] == b"\0\0\0\0" and not scrubbed[3] & 0x08  # gzip: mtime 0, no file name
    raw = gzip.decompress(scrubbed)
    for secret in (b"Time=", b"Doe", b"secret", b"Secret"):
        assert secret not in raw
    out = tmp_path / "out.nii.gz"
    out.write_bytes(scrubbed)
    result = nib.load(out)
    assert result.header.extensions == []
    for field in ("descrip", "aux_file", "intent_name", "db_name"):
        assert result.header[field].item() == b""
    np.testing.assert_allclose(result.affine, affine)
    np.testing.assert_array_equal(np.asarray(result.dataobj), data)
    assert result.get_data_dtype() == np.int16


def test_sidecar_keeps_only_the_allowlist(tmp_path):
    full = {key: 1 for key in SIDECAR_ALLOWLIST}
    identifying = {
        "PatientName": "Doe^Jane", "PatientID": "123456", "AcquisitionTime": "09:15:00.000000",
        "AcquisitionDateTime": "2019-03-12T09:15:00", "InstitutionName": "Secret General Hospital",
        "InstitutionAddress": "1 Road", "StationName": "MRC1", "DeviceSerialNumber": "45210",
        "SeriesDescription": "T2 for Dr Who", "ProtocolName": "T2", "ImageComments": "call Jane",
        "SeriesInstanceUID": "1.2.3", "StudyInstanceUID": "1.2.3.4", "SeriesNumber": 2,
        "ReferringPhysicianName": "Who^Dr", "SoftwareVersions": "VE11",
    }
    source = tmp_path / "series.json"
    source.write_text(json.dumps({**full, **identifying}))
    kept = scrubbed_sidecar(source, [0.9, 0.8])
    assert set(kept) == set(SIDECAR_ALLOWLIST) | {"PixelSpacing"}
    assert kept["PixelSpacing"] == [0.9, 0.8]


# --------------------------------------------------------------------------
# Annotations


@pytest.fixture(scope="module")
def two_patients(tmp_path_factory, config):
    """P1 converted (with an unselected T1), P2 whose conversion is quarantined, and annotations."""
    work = tmp_path_factory.mktemp("deid")
    raw = work / "raw"
    t2_uid, instances = write_patient(raw, "P1", study="1.2.3.1", t1=True)
    p2_uid, p2_instances = write_patient(raw, "P2", study="1.2.3.2", seed=1)
    t1_uid = next(uid for uid in {pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID
                                  for p in raw.rglob("IM*")} if uid not in (t2_uid, p2_uid))
    cohort = work / "cohort.csv"
    cohort.write_text("patient_id,group\nP1,disc\nP2,injured\nP3,normal\n")
    first = instances[0]

    def row(**values):
        base = {"study_uid": "1.2.3.1", "series_uid": t2_uid, "sop_instance_uid": first["sop_instance_uid"],
                "instance_number": "", "label": "disc_herniation",
                "x_min": 2, "y_min": 3, "x_max": 8, "y_max": 9}
        return {**base, **values}

    annotations = [
        row(),                                                         # line 2: good, by UID
        row(sop_instance_uid="", instance_number=2, label="cord_injury"),  # line 3: good, by number
        row(sop_instance_uid="1.2.3.999"),                             # line 4: unknown instance
        row(sop_instance_uid="", instance_number=77),                  # line 5: unknown number
        row(x_max=25),                                                 # line 6: outside the 24 x 24 image
        row(x_min=8, x_max=2),                                         # line 7: inverted
        row(label="syrinx"),                                           # line 8: unknown label
        row(series_uid=t1_uid, sop_instance_uid="", instance_number=1),  # line 9: T1, not selected
        row(series_uid=p2_uid, sop_instance_uid=p2_instances[0]["sop_instance_uid"]),  # line 10: not converted
        row(x_min="abc"),                                              # line 11: malformed
    ]
    annotations_csv = work / "annotations.csv"
    write_csv(annotations_csv, annotations, ANNOTATION_COLUMNS)

    def quarantine_p2(conversions):
        return [{**c, "status": "quarantined", "nifti": "", "sidecar": ""} if c["patient_id"] == "P2" else c
                for c in conversions]

    out, restricted = run_ingest(work, raw, cohort, annotations_csv, config, quarantine_p2)
    return {"out": out, "restricted": restricted, "instances": instances, "t2_uid": t2_uid,
            "annotations": annotations}


def test_annotation_problems_are_quarantined_and_the_rest_kept(two_patients):
    out = two_patients["out"]
    pseudonyms = {r["patient_id"]: r["pseudonym"] for r in read_rows(two_patients["restricted"] / "pseudonyms.csv")}
    assert set(pseudonyms) == {"P1", "P2", "P3"}
    issues = read_rows(out / "annotation_issues.csv")
    assert [(int(i["row"]), i["reason"]) for i in issues] == [
        (4, "unknown_instance"), (5, "unknown_instance"), (6, "outside_image"), (7, "inverted_box"),
        (8, "unknown_label"), (9, "series_not_converted"), (10, "series_not_converted"), (11, "malformed"),
    ]
    assert {i["pseudonym"] for i in issues if i["row"] != "10"} == {pseudonyms["P1"]}
    assert next(i for i in issues if i["row"] == "10")["pseudonym"] == pseudonyms["P2"]
    assert next(i for i in issues if i["row"] == "8")["label"] == ""  # free text never copied
    text = (out / "annotation_issues.csv").read_text()
    assert "1.2.3" not in text and "P1" not in text

    assert read_rows(out / "participants.csv") == [{"pseudonym": pseudonyms["P1"], "group": "disc"}]
    p1 = subject_paths(out, pseudonyms["P1"])
    boxes = json.loads(p1["boxes"].read_text())
    assert boxes["pseudonym"] == pseudonyms["P1"] and boxes["group"] == "disc"
    assert [b["label"] for b in boxes["boxes"]] == ["disc_herniation", "cord_injury"]
    assert sorted(p.name for p in out.iterdir()) == ["annotation_issues.csv", "participants.csv",
                                                     f"sub-{pseudonyms['P1']}"]


def test_mapped_box_holds_the_annotated_pixels(two_patients):
    """The voxels inside each mapped box are exactly the DICOM pixels inside the annotated box."""
    out = two_patients["out"]
    pseudo = read_rows(out / "participants.csv")[0]["pseudonym"]
    paths = subject_paths(out, pseudo)
    volume = np.asarray(nib.load(paths["nifti"]).dataobj)
    boxes = json.loads(paths["boxes"].read_text())
    by_number = {item["instance_number"]: item for item in two_patients["instances"]}
    sources = [by_number[1], by_number[2]]  # instance of the UID row (instance 1) and instance 2
    assert two_patients["instances"][0]["instance_number"] == 1
    for box, instance in zip(boxes["boxes"], sources):
        pixels = pydicom.dcmread(instance["path"]).pixel_array[3:9, 2:8]
        index = [slice(None)] * 3
        index[boxes["slice_axis"]] = box["slice"]
        for axis, low, high in zip(box["axes"], box["min"], box["max"]):
            index[axis] = slice(low, high)
        voxels = volume[tuple(index)]
        assert voxels.size == pixels.size
        assert np.array_equal(np.sort(voxels, axis=None), np.sort(pixels, axis=None))


def test_missing_annotation_columns_are_a_clear_error(tmp_path):
    path = tmp_path / "annotations.csv"
    path.write_text("series_uid,label,x_min,y_min,x_max\n")
    with pytest.raises(SpinedetError, match="y_max"):
        read_annotations(path)
    path.write_text("series_uid,label,x_min,y_min,x_max,y_max\n")
    with pytest.raises(SpinedetError, match="sop_instance_uid or instance_number"):
        read_annotations(path)


# --------------------------------------------------------------------------
# Through the CLI: hostile patient IDs, reruns


def cli_ingest(work, raw, cohort, annotations):
    restricted, results = work / "restricted", work / "results"
    inv = restricted / "inventory"
    assert main(["inventory", "--config", str(CONFIG), "--raw", str(raw), "--cohort", str(cohort),
                 "--out", str(inv), "--summary", str(results / "inventory" / "summary.json")]) == 0
    assert main(["convert", "--config", str(CONFIG), "--series", str(inv / "series.csv"),
                 "--selection", str(inv / "selection.csv"), "--out", str(restricted / "convert")]) == 0
    assert main(["deidentify", "--config", str(CONFIG), REAL_EXPORT,
                 "--conversions", str(restricted / "convert" / "conversions.csv"),
                 "--files", str(inv / "files.csv"), "--selection", str(inv / "selection.csv"),
                 "--annotations", str(annotations), "--restricted", str(restricted),
                 "--out", str(results / "deid")]) == 0
    return results / "deid", restricted


def tree_digest(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file()}


def test_hostile_patient_ids_cannot_steer_paths_and_reruns_are_identical(tmp_path):
    hostile = ["../../escape", "a b/../../c", "Zoë Ünïcode", "..", "x" * 60]
    raw = tmp_path / "raw"
    uids = [write_patient(raw, pid, study=f"1.2.4.{i}", n_slices=3, size=16, seed=i)
            for i, pid in enumerate(hostile)]
    cohort = tmp_path / "cohort.csv"
    write_csv(cohort, [{"patient_id": pid, "group": "normal"} for pid in hostile], ["patient_id", "group"])
    annotations = tmp_path / "annotations.csv"
    write_csv(annotations, [{"study_uid": "", "series_uid": uid, "sop_instance_uid": "", "instance_number": 1,
                             "label": "cord_injury", "x_min": 1, "y_min": 1, "x_max": 5, "y_max": 5}
                            for uid, _ in uids], ANNOTATION_COLUMNS)
    work = tmp_path / "work"
    work.mkdir()
    out, restricted = cli_ingest(work, raw, cohort, annotations)

    assert sorted(p.name for p in tmp_path.iterdir()) == ["annotations.csv", "cohort.csv", "raw", "work"]
    assert sorted(p.name for p in work.iterdir()) == ["restricted", "results"]
    participants = read_rows(out / "participants.csv")
    assert len(participants) == len(hostile)
    allowed = re.compile(r"participants\.csv|annotation_issues\.csv|sub-([0-9a-f]{10})"
                         r"(/anat|/anat/sub-\1_T2w\.nii\.gz|/anat/sub-\1_T2w\.json|/sub-\1_boxes\.json)?")
    for path in out.rglob("*"):
        assert allowed.fullmatch(path.relative_to(out).as_posix()), path
    assert read_rows(out / "annotation_issues.csv") == []
    assert stat.S_IMODE((restricted / "pseudonym.key").stat().st_mode) == 0o600

    first_results, first_pseudonyms = tree_digest(out), (restricted / "pseudonyms.csv").read_text()
    assert main(["deidentify", "--config", str(CONFIG), REAL_EXPORT,
                 "--conversions", str(restricted / "convert" / "conversions.csv"),
                 "--files", str(restricted / "inventory" / "files.csv"),
                 "--selection", str(restricted / "inventory" / "selection.csv"),
                 "--annotations", str(annotations), "--restricted", str(restricted),
                 "--out", str(out)]) == 0
    assert tree_digest(out) == first_results
    assert (restricted / "pseudonyms.csv").read_text() == first_pseudonyms


def test_restricted_inside_the_output_is_refused(tmp_path):
    for name in ("conversions.csv", "files.csv", "selection.csv", "annotations.csv"):
        (tmp_path / name).write_text("x\n")
    code = main(["deidentify", "--config", str(CONFIG), REAL_EXPORT, "--conversions", str(tmp_path / "conversions.csv"),
                 "--files", str(tmp_path / "files.csv"), "--selection", str(tmp_path / "selection.csv"),
                 "--annotations", str(tmp_path / "annotations.csv"),
                 "--restricted", str(tmp_path / "out" / "restricted"), "--out", str(tmp_path / "out")])
    assert code == 2
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------
# Enhanced MR: annotations on frames


def test_an_enhanced_mr_export_gives_the_classic_exports_volumes_and_boxes(tmp_path, config):
    """The same synthetic patients written as classic MR and as Enhanced MR (one
    multi-frame file per series, annotations on sop_instance_uid + frame_number)
    go through inventory, dcm2niix and deidentify to the same voxels and boxes."""
    from spinedet.demo.synthesize import synthesize

    results = {}
    for name, fraction in [("classic", 0.0), ("enhanced", 1.0)]:
        export = tmp_path / name / "export"
        summary = synthesize(export, patients=3, matrix=64, seed=5, enhanced_fraction=fraction)
        assert summary["enhanced_mr_patients"] == (3 if fraction else 0)
        annotations = read_rows(export / "annotations.csv")
        assert annotations and all(bool(row["frame_number"]) == bool(fraction) for row in annotations)
        if results:  # the same key, so the same pseudonyms
            (tmp_path / name / "restricted").mkdir(parents=True)
            shutil.copy2(tmp_path / "classic" / "restricted" / KEY_FILE_NAME, tmp_path / name / "restricted")
        out, _ = run_ingest(tmp_path / name, export / "DICOM", export / "cohort.csv", export / "annotations.csv",
                            config)
        assert read_rows(out / "annotation_issues.csv") == []
        results[name] = out
    subjects = sorted(p.name for p in results["classic"].glob("sub-*"))
    assert subjects == sorted(p.name for p in results["enhanced"].glob("sub-*")) and len(subjects) == 3
    for subject in subjects:
        pseudo = subject.removeprefix("sub-")
        classic, enhanced = (subject_paths(results[name], pseudo) for name in ("classic", "enhanced"))
        assert json.loads(classic["boxes"].read_text()) == json.loads(enhanced["boxes"].read_text())
        a, b = nib.load(classic["nifti"]), nib.load(enhanced["nifti"])
        assert np.array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
        np.testing.assert_allclose(a.affine, b.affine, atol=1e-4)


@pytest.mark.parametrize(("frames", "frame_number", "expected"), [
    (3, "2", 2), (3, "2.0", 2), (3, " 3 ", 3), (1, "", None), (1, "1", None),
    (3, "", "give frame_number"), (3, "0", "not one of the instance's frames (1..3)"),
    (3, "4", "not one of the instance's frames (1..3)"), (3, "x", "not one of"), (1, "2", "(1..1)"),
])
def test_the_annotated_frame_is_checked(frames, frame_number, expected):
    from spinedet.ingest.deidentify import AnnotationIssue, annotated_plane

    row = {"image_orientation": json.dumps(SAGITTAL), "pixel_spacing": "[0.5, 0.5]",
           "image_position": "[0.0, 0.0, 0.0]",
           "frame_positions": json.dumps([[-3.0 * k, 0.0, 0.0] for k in range(frames)]) if frames > 1 else ""}
    if isinstance(expected, str):
        with pytest.raises(AnnotationIssue, match=re.escape(expected)) as caught:
            annotated_plane(row, frame_number, "P1")
        assert caught.value.reason == "unknown_frame"
    else:
        plane = annotated_plane(row, frame_number, "P1")
        assert plane["frame_number"] == expected
        assert plane["ipp"] == ([-3.0 * (expected - 1), 0.0, 0.0] if expected else [0.0, 0.0, 0.0])
