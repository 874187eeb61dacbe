"""A fault corpus beside a clean synthetic export: one case of each way a real
hospital export goes wrong, each in its own patient or file, so the effects
can be told apart.

`write_faults(export)` runs after `synthesize` wrote `export/` (DICOM/,
cohort.csv, annotations.csv). Fault patients are copies of the first clean
patient's sagittal T2 series (or of pydicom's own test files) with new
identities and UIDs, written under `DICOM/FAULTS/`; cohort.csv and
annotations.csv gain their lines. `faults.csv` lists every case and where
its outcome must show:

- `file`: a path under DICOM/ -> its files.csv status and reason;
- `patient`: a PatientID -> its selection.csv status (and conversion);
- `annotation`: a line of annotations.csv -> its annotation_issues.csv reason;
- `object`: an SR or SEG object under DICOM/ -> the import_issues.csv reason of
  every region or segment it holds (the object itself is ok in files.csv).

The same export and seed give the same files.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import RLELossless, generate_uid

from spinedet import SpinedetError
from spinedet.demo.annotation_objects import measurement_report, write
from spinedet.demo.dicom_writer import TARGET_DESCRIPTION, enhanced_dataset
from spinedet.io import read_csv, write_csv

FAULT_COLUMNS = ["fault", "kind", "where", "expect_status", "expect_reason", "expect_conversion"]
FAULT_ROOT = "FAULTS"
LINKED_STORAGE = "linked_storage"  # beside DICOM/: the target of a linked patient folder


def _uid(seed: int, *parts) -> str:
    return generate_uid(entropy_srcs=["spinedet-faults", str(seed), *map(str, parts)])


def _fake_name(seed: int, case: str) -> str:
    """A made-up PatientName no output could contain by chance (the leak scan looks for it)."""
    digest = hashlib.sha256(f"spinedet-faults {seed} {case}".encode()).digest()
    letters = "".join(chr(ord("a") + b % 26) for b in digest[:14])
    return f"{letters[:8].capitalize()}^{letters[8:].capitalize()}"


def _donor_series(dicom: Path, patient_ids: list[str]) -> tuple[str, list[Path]]:
    """The first of `patient_ids` exported as classic MR (one file per slice): its
    ID and its sagittal T2 files, in instance order."""
    found: dict[str, list] = {patient_id: [] for patient_id in patient_ids}
    for path in sorted(p for p in dicom.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - only the clean export is read here
            continue
        patient_id = str(ds.get("PatientID", ""))
        if patient_id in found and ds.get("SeriesDescription") == TARGET_DESCRIPTION and "NumberOfFrames" not in ds:
            found[patient_id].append((int(ds.InstanceNumber), path))
    for patient_id in patient_ids:
        if found[patient_id]:
            return patient_id, [path for _, path in sorted(found[patient_id])]
    raise SpinedetError("the fault corpus needs a normal patient exported as classic MR (not Enhanced MR)")


def _copy_series(files: list[Path], folder: Path, patient_id: str, seed: int, case: str, *,
                 study_uid: str | None = None, edit=None) -> list[Path]:
    """The donor series as a new patient's: new PatientID, study, series and SOP UIDs.
    `edit(index, dataset)` may change an instance before it is written."""
    study_uid = study_uid or _uid(seed, case, "study")
    series_uid = _uid(seed, case, "series")
    written = []
    for index, source in enumerate(files):
        ds = pydicom.dcmread(source)
        ds.PatientID = patient_id
        ds.PatientName = _fake_name(seed, case)
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = _uid(seed, case, "sop", index)
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        if edit is not None:
            edit(index, ds)
        path = folder / f"IM{index + 1:04d}"
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        written.append(path)
    return written


def _replace_identity(ds: pydicom.Dataset, seed: int, case: str, identity: pydicom.Dataset) -> None:
    """Every date, time and person name of a test file (sequences too) becomes the
    donor's date and time or a made-up name: values the leak scan knows and can
    find, instead of pydicom's generic ones (a StudyTime of 000000 is in any output)."""
    for element in ds.iterall():
        if element.value in (None, ""):
            continue
        if element.VR in ("DA", "TM", "DT"):
            element.value = {"DA": identity.StudyDate, "TM": identity.StudyTime,
                             "DT": identity.StudyDate + identity.StudyTime}[element.VR]
        elif element.VR == "PN":
            element.value = _fake_name(seed, f"{case} {element.tag}")
        elif element.keyword in ("StationName", "InstitutionName", "PatientID", "OtherPatientIDs"):
            element.value = _fake_name(seed, f"{case} {element.tag}").replace("^", "")


def _testdata(name: str, path: Path, patient_id: str, seed: int, case: str, identity: pydicom.Dataset) -> Path:
    """One of pydicom's own test files with a fault patient's identity; its dates
    and times become the donor's (`identity`), whose values the leak scan knows."""
    ds = pydicom.dcmread(get_testdata_file(name))
    _replace_identity(ds, seed, case, identity)
    ds.PatientID = patient_id
    ds.SOPInstanceUID = _uid(seed, case, "sop")
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _enhanced_mr(files: list[Path], path: Path, patient_id: str, seed: int) -> Path:
    """The donor series as one Enhanced MR Image Storage file (multi-frame, geometry
    in the functional groups), as modern scanners export by default."""
    frames = [pydicom.dcmread(f) for f in files]
    for frame in frames:
        frame.StudyInstanceUID = _uid(seed, "enhanced", "study")
        frame.SeriesInstanceUID = _uid(seed, "enhanced", "series")
        frame.PatientID = patient_id
        frame.PatientName = _fake_name(seed, "enhanced")
    ds = enhanced_dataset(frames, _uid(seed, "enhanced", "sop"))
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_faults(export: Path, seed: int = 0, normal_group: str = "normal",
                 codes: dict[str, tuple[str, str, str]] | None = None) -> list[dict]:
    """Add the fault corpus to a clean export; returns (and writes) faults.csv.
    Fault patients copy the first normal patient exported as classic MR, and are normal themselves.
    `codes`: each class's finding code for the SR cases (default: the config schema's)."""
    if codes is None:
        from spinedet.config import finding_codes, load

        codes = finding_codes(load([]))
    export = Path(export)
    dicom, root = export / "DICOM", export / "DICOM" / FAULT_ROOT
    cohort = read_csv(export / "cohort.csv")
    annotations = read_csv(export / "annotations.csv")
    # every box of the export (the sheet is empty when the boxes came as SR or SEG)
    all_boxes = read_csv(export / "truth" / "annotations.csv")
    normal_ids = [row["patient_id"] for row in cohort if row["group"] == normal_group]
    if not normal_ids or not all_boxes:
        raise SpinedetError("the fault corpus needs a clean export with a normal patient and annotations")
    donor_id, donor = _donor_series(dicom, normal_ids)
    if len(donor) < 5:
        raise SpinedetError(f"the donor patient has {len(donor)} T2 files: too few to copy")
    identity = pydicom.dcmread(donor[0], stop_before_pixels=True)
    faults: list[dict] = []
    new_cohort: list[dict] = []

    def rel(path: Path) -> str:
        return path.relative_to(dicom).as_posix()

    def expect_file(fault: str, path: Path, status: str, reason: str = "") -> None:
        faults.append({"fault": fault, "kind": "file", "where": rel(path), "expect_status": status,
                       "expect_reason": reason, "expect_conversion": ""})

    def expect_object(fault: str, path: Path, reason: str) -> None:
        faults.append({"fault": fault, "kind": "object", "where": rel(path), "expect_status": "issue",
                       "expect_reason": reason, "expect_conversion": ""})

    def patient(fault: str, patient_id: str, status: str, reason: str = "", conversion: str = "") -> None:
        """`reason`: a phrase of selection.csv's reason; `conversion`: conversions.csv status."""
        new_cohort.append({"patient_id": patient_id, "group": normal_group})
        faults.append({"fault": fault, "kind": "patient", "where": patient_id, "expect_status": status,
                       "expect_reason": reason, "expect_conversion": conversion})

    # Files that are not DICOM images.
    (root / "junk").mkdir(parents=True, exist_ok=True)
    (root / "junk" / "README.txt").write_text("exported by the PACS on request\n")
    expect_file("non-DICOM text", root / "junk" / "README.txt", "quarantined", "not_dicom")
    (root / "junk" / "thumbnail.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    expect_file("non-DICOM image", root / "junk" / "thumbnail.png", "quarantined", "not_dicom")
    (root / "junk" / "empty.dcm").write_bytes(b"")
    expect_file("zero bytes", root / "junk" / "empty.dcm", "quarantined", "not_dicom")
    truncated = root / "junk" / "truncated.dcm"
    truncated.write_bytes(donor[0].read_bytes()[: donor[0].stat().st_size // 2])
    expect_file("truncated DICOM", truncated, "quarantined", "truncated")
    sr = _testdata("reportsi.dcm", root / "sr" / "report.dcm", donor_id, seed, "sr", identity)
    expect_file("DICOM without pixel data (structured report)", sr, "quarantined", "unsupported_sop_class")
    # Annotation objects spinedet annotations cannot use: each listed with its reason.
    report = _testdata("test-SR.dcm", root / "sr" / "not_a_measurement_report.dcm", donor_id, seed, "sr-text",
                       identity)
    expect_file("a structured report that is not a TID 1500 measurement report", report, "quarantined",
                "sr_not_measurement_report")
    liver = _testdata("liver_1frame.dcm", root / "seg" / "ct_segmentation.dcm", donor_id, seed, "seg-ct", identity)
    segmentation = pydicom.dcmread(liver)  # its segments coded as a lesion class: only their images are wrong
    for segment in segmentation.SegmentSequence:
        code = segment.SegmentedPropertyTypeCodeSequence[0]
        code.CodingSchemeDesignator, code.CodeValue, code.CodeMeaning = next(iter(codes.values()))
    segmentation.save_as(liver, enforce_file_format=True)
    expect_object("a segmentation of CT images that are not in the export", liver, "references_unknown_instance")
    ct = _testdata("CT_small.dcm", root / "sr" / "ct.dcm", donor_id, seed, "sr-ct", identity)
    expect_file("a CT image (annotated by the next report)", ct, "quarantined", "unsupported_sop_class")
    ct_dataset = pydicom.dcmread(ct)
    on_ct = measurement_report([ct_dataset], [{"sop_instance_uid": ct_dataset.SOPInstanceUID, "frame_number": None,
                                               "label": "disc_herniation", "x_min": 10, "y_min": 10, "x_max": 20,
                                               "y_max": 20}],
                               codes, series_number=92)
    write(on_ct, root / "sr" / "report_on_ct.dcm")
    expect_object("a measurement report of a CT image", root / "sr" / "report_on_ct.dcm", "references_unknown_instance")
    donor_first = pydicom.dcmread(donor[0])
    other = measurement_report([donor_first], [{"sop_instance_uid": donor_first.SOPInstanceUID, "frame_number": None,
                                                "label": "other", "x_min": 4, "y_min": 4, "x_max": 12, "y_max": 12}],
                               {"other": ("SCT", "49755003", "Morphologically abnormal structure")}, series_number=93)
    write(other, root / "sr" / "report_of_another_finding.dcm")
    expect_object("a measurement report of a finding no class maps", root / "sr" / "report_of_another_finding.dcm",
                  "unknown_finding")

    index = pydicom.dcmread(get_testdata_file("DICOMDIR"))
    _replace_identity(index, seed, "dicomdir", identity)
    index.save_as(root / "DICOMDIR")
    expect_file("a DICOMDIR (an index, accounted for as such)", root / "DICOMDIR", "ok")
    enhanced = _enhanced_mr(donor, root / "enhanced" / "multiframe.dcm", "FAULT-ENHANCED", seed)
    expect_file("enhanced multi-frame MR", enhanced, "ok")
    patient("enhanced multi-frame MR only", "FAULT-ENHANCED", "selected", conversion="converted")

    # Compressed transfer syntaxes: pydicom's MR test images (one axial slice each).
    for name, case in [("MR_small_RLE.dcm", "rle"), ("MR_small_jp2klossless.dcm", "j2k"),
                       ("MR_small_jpeg_ls_lossless.dcm", "jpegls")]:
        path = _testdata(name, root / "compressed" / f"{case}.dcm", "FAULT-COMPRESSED", seed, f"compressed-{case}",
                         identity)
        expect_file(f"compressed pixel data ({case})", path, "ok")
    baseline = _testdata("SC_rgb_jpeg_dcmtk.dcm", root / "compressed" / "jpeg_baseline.dcm", "FAULT-COMPRESSED",
                         seed, "compressed-jpeg", identity)
    expect_file("compressed pixel data (JPEG baseline, secondary capture)", baseline, "quarantined",
                "unsupported_sop_class")
    patient("compressed single axial slices only", "FAULT-COMPRESSED", "no_target_series")

    # A whole good series, compressed losslessly (RLE): processed like any other.
    def rle(_index, ds):
        ds.compress(RLELossless)

    _copy_series(donor, root / "rle_series", "FAULT-RLE-SERIES", seed, "rle-series", edit=rle)
    patient("a whole series RLE-compressed", "FAULT-RLE-SERIES", "selected", conversion="converted")

    # Duplicate SOPInstanceUID: a second copy of a donor file.
    duplicate = root / "duplicate" / "copy_of_first_slice.dcm"
    duplicate.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(donor[0], duplicate)
    # the first path in sorted order is kept, the other is the duplicate
    expect_file("duplicate SOPInstanceUID", max(duplicate, donor[0], key=rel), "quarantined", "duplicate")

    # A missing slice: the middle file of a copy left out.
    gap = _copy_series(donor, root / "missing_slice", "FAULT-MISSING-SLICE", seed, "missing-slice")
    gap[len(gap) // 2].unlink()
    patient("a missing slice", "FAULT-MISSING-SLICE", "selected", "slice(s) missing", "quarantined")

    # Mixed matrix sizes in one series: one instance downsampled.
    def smaller(index, ds):
        if index == 1:
            pixels = ds.pixel_array[::2, ::2].copy()
            ds.Rows, ds.Columns = pixels.shape
            ds.PixelSpacing = [float(v) * 2 for v in ds.PixelSpacing]
            ds.PixelData = pixels.astype("<u2").tobytes()

    _copy_series(donor, root / "mixed_matrix", "FAULT-MIXED-MATRIX", seed, "mixed-matrix", edit=smaller)
    patient("mixed matrix sizes in one series", "FAULT-MIXED-MATRIX", "selected", conversion="quarantined")

    # Inconsistent orientation inside a series: one instance tilted.
    def tilted(index, ds):
        if index == 2:
            ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]

    _copy_series(donor, root / "mixed_orientation", "FAULT-MIXED-ORIENTATION", seed, "mixed-orientation", edit=tilted)
    patient("inconsistent orientation inside a series", "FAULT-MIXED-ORIENTATION", "no_target_series")

    # Only axial series.
    def axial(_index, ds):
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SeriesDescription = "T2_TSE_TRA"

    _copy_series(donor, root / "axial_only", "FAULT-AXIAL-ONLY", seed, "axial-only", edit=axial)
    patient("only axial series", "FAULT-AXIAL-ONLY", "no_target_series")

    # Patients in the images but not in the cohort, and the reverse.
    stray = _copy_series(donor[:2], root / "not_in_cohort", "FAULT-NOT-IN-COHORT", seed, "not-in-cohort")
    expect_file("patient in the images, not in the cohort", stray[0], "quarantined", "not_in_cohort")
    patient("patient in the cohort, not in the images", "FAULT-NO-IMAGES", "no_files")

    # Hostile PatientIDs: still one patient each, pseudonymised, never a path.
    for case, patient_id in [("traversal", "../FAULT-TRAVERSAL"), ("slash", "FAULT/SLASH"),
                             ("space", "FAULT SPACE 01"), ("non-ascii", "FAULT-MÜLLER")]:
        def identity(_index, ds, patient_id=patient_id):
            ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8, for the non-ASCII one
            ds.PatientID = patient_id

        _copy_series(donor, root / f"id_{case}", patient_id, seed, f"id-{case}", edit=identity)
        patient(f"PatientID {patient_id!r}", patient_id, "selected", conversion="converted")
    empty_id = _copy_series(donor[:1], root / "id_empty", "", seed, "id-empty")
    expect_file("empty PatientID", empty_id[0], "quarantined", "missing_attributes")

    # The same patient exported twice (two studies): one selected, the other a fallback.
    for study in ("a", "b"):
        _copy_series(donor, root / f"twice_{study}", "FAULT-TWICE", seed, f"twice-{study}")
    patient("the same patient exported twice (two studies)", "FAULT-TWICE", "selected", "1 other matching series",
            "converted")

    # Bad annotations in the sheet, against the first clean annotated series.
    first = all_boxes[0]
    bad_lines = [
        ("annotation of an unknown instance", {**first, "sop_instance_uid": _uid(seed, "unknown-instance")},
         "unknown_instance"),
        ("inverted box", {**first, "x_min": first["x_max"], "x_max": first["x_min"]}, "inverted_box"),
        ("unknown label", {**first, "label": "fracture"}, "unknown_label"),
        ("box outside the image", {**first, "x_min": "5000", "x_max": "5010"}, "outside_image"),
        ("annotation of a multi-frame instance without frame_number",
         {**first, "series_uid": _uid(seed, "enhanced", "series"), "sop_instance_uid": _uid(seed, "enhanced", "sop"),
          "instance_number": "1", "frame_number": ""}, "unknown_frame"),
        ("annotation of a frame the instance does not have",
         {**first, "series_uid": _uid(seed, "enhanced", "series"), "sop_instance_uid": _uid(seed, "enhanced", "sop"),
          "instance_number": "1", "frame_number": "999"}, "unknown_frame"),
    ]
    for fault, row, reason in bad_lines:
        annotations.append(row)
        faults.append({"fault": fault, "kind": "annotation", "where": str(len(annotations) + 1),
                       "expect_status": "issue", "expect_reason": reason, "expect_conversion": ""})

    # Links: a linked patient folder (read through), a dangling link, a loop.
    linked_target = export / LINKED_STORAGE / "linked_patient"
    _copy_series(donor, linked_target, "FAULT-LINKED", seed, "linked")
    (root / "linked_patient").symlink_to(os.path.relpath(linked_target, root), target_is_directory=True)
    patient("a patient folder that is a symbolic link", "FAULT-LINKED", "selected", conversion="converted")
    (root / "dangling.dcm").symlink_to("no_such_file.dcm")
    expect_file("a dangling symbolic link", root / "dangling.dcm", "quarantined", "broken_link")
    # a folder holding only a link to itself: a loop, with nothing else below it to walk twice
    (root / "loop_dir").mkdir()
    (root / "loop_dir" / "loop").symlink_to(".", target_is_directory=True)
    expect_file("a directory link loop", root / "loop_dir" / "loop", "quarantined", "link_loop")

    write_csv(export / "cohort.csv", cohort + new_cohort, ["patient_id", "group"])
    write_csv(export / "annotations.csv", annotations, list(all_boxes[0]))
    write_csv(export / "faults.csv", faults, FAULT_COLUMNS)
    return faults

