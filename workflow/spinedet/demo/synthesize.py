"""`spinedet synthesize`: a synthetic hospital export of cervical spine MRI.

For every patient it writes one study like a scanner export would: a 3-plane
localizer, a sagittal T2 (the target, with lesions annotated), a sagittal T1
and a few axial T2 slices, with realistic fake PHI in the headers. Beside the
DICOM tree it writes `annotations.csv` (boxes on the sagittal T2 instances),
`cohort.csv` (patient_id, group) and `truth/` (lesion masks for tests, read
back with `spinedet.demo.truth.load_truth`).

Everything is derived from the seed: patient i is drawn from
`numpy.random.default_rng([seed, i])`, UIDs are hashes of the seed and the
patient, dates are drawn, never read from the clock. The same seed gives
byte-identical files.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import logging
import multiprocessing
from pathlib import Path
from typing import Sequence

import numpy as np
import pydicom
from pydicom.uid import generate_uid
from tqdm import tqdm

from spinedet import SpinedetError, silence_dicom_libraries
from spinedet.demo import bids_writer, phantom
from spinedet.demo.dicom_writer import (
    TARGET_DESCRIPTION,
    display_window,
    ds_number,
    image_dataset,
    write_dataset,
    write_series,
)
from spinedet.demo.identities import (
    DEFAULT_GROUPS,
    EXPORT_STYLES,
    fake_identity,
    file_namer,
    group_counts,
    series_times,
    study_header,
)
from spinedet.demo.preview import preview_slice, write_preview
from spinedet.demo.rendering import (
    SeriesGeometry,
    boxes_are_separate,
    centered_geometry,
    lesion_boxes,
    render_series,
    rotation_matrix,
)
from spinedet.demo.faults import FAULT_COLUMNS, LINKED_STORAGE, write_faults
from spinedet.demo.truth import PatientResult, write_truth
from spinedet.demo.annotation_objects import label_masks, measurement_report, segmentation, write
from spinedet.io import write_csv

log = logging.getLogger(__name__)

DEMO_KEY_FILE = "pseudonym.key"

DEFAULT_CLASSES = ("disc_herniation", "cord_injury")
ROLES = ("disc", "injured", "normal")

TARGET_SUBSAMPLES = 2  # planes averaged across each target slice's thickness (partial volume)
ANNOTATION_FORMATS = ("csv", "sr", "seg")
ANNOTATION_COLUMNS = ["study_uid", "series_uid", "sop_instance_uid", "instance_number", "frame_number", "label",
                      "x_min", "y_min", "x_max", "y_max"]


# --------------------------------------------------------------------------
# One patient

MR_PROTOCOLS = {
    "T2_SAG": lambda rng: {
        "RepetitionTime": ds_number(round(rng.uniform(2500, 4000))), "EchoTime": ds_number(round(rng.uniform(90, 120))),
        "EchoTrainLength": int(rng.integers(13, 24)), "ScanningSequence": "SE", "SequenceVariant": ["SK", "SP", "OSP"],
        "SequenceName": "*tse2d1_17", "FlipAngle": "150"},
    "T1_SAG": lambda rng: {
        "RepetitionTime": ds_number(round(rng.uniform(450, 700))), "EchoTime": ds_number(round(rng.uniform(9, 13))),
        "EchoTrainLength": int(rng.integers(3, 6)), "ScanningSequence": "SE", "SequenceVariant": ["SK", "SP", "OSP"],
        "SequenceName": "*tse2d1_3", "FlipAngle": "150"},
    "T2_AX": lambda rng: {
        "RepetitionTime": ds_number(round(rng.uniform(3500, 5000))), "EchoTime": ds_number(round(rng.uniform(95, 110))),
        "EchoTrainLength": int(rng.integers(13, 20)), "ScanningSequence": "SE", "SequenceVariant": ["SK", "SP", "OSP"],
        "SequenceName": "*tse2d1_15", "FlipAngle": "150", "InPlanePhaseEncodingDirection": "ROW"},
    "LOCALIZER": lambda rng: {
        "RepetitionTime": "8.6", "EchoTime": "4", "EchoTrainLength": 1, "ScanningSequence": "GR",
        "SequenceVariant": ["SP", "OSP"], "SequenceName": "*fl2d1", "FlipAngle": "20",
        "ImageType": ["ORIGINAL", "PRIMARY", "OTHER", "NORM", "DIS2D"], "NumberOfAverages": "1"},
}


def _target_geometry(rng: np.random.Generator, anatomy: phantom.Anatomy, matrix: int) -> tuple[SeriesGeometry, bool]:
    """The sagittal T2 stack: sometimes oblique, sometimes rows P->A; returns (geometry, reverse_order)."""
    n_slices = int(rng.integers(13, 18))
    thickness = float(rng.choice([3.0, 3.0, 3.5]))
    step = round(thickness + float(rng.uniform(0.3, 0.5)), 2)
    fov = float(rng.uniform(220, 260))
    row_dir, col_dir = np.array([0.0, 1.0, 0.0]), np.array([0.0, 0.0, -1.0])
    if rng.random() < 0.4:
        rotation = rotation_matrix("x", rng.uniform(-8, 8)) @ rotation_matrix("y", rng.uniform(-5, 5))
        row_dir, col_dir = rotation @ row_dir, rotation @ col_dir
    if rng.random() < 0.2:
        row_dir = -row_dir
    reverse_order = bool(rng.random() < 0.3)
    center = anatomy.to_lps(rng.uniform(-3, 3), anatomy.level_s("C4") + rng.uniform(-8, 6), phantom.PVBL + rng.uniform(0, 14))
    geometry = centered_geometry(center, row_dir, col_dir, matrix=matrix, fov=fov, n_slices=n_slices,
                                 slice_step=step, thickness=thickness)
    return geometry, reverse_order


def synthesize_patient(root: Path, *, seed: int, index: int, group: str, role: str, labels: tuple[str, str],
                       matrix: int, enhanced: bool = False, annotation_format: str = "csv",
                       codes: dict[str, tuple[str, str, str]] | None = None,
                       export_format: str = "dicom") -> PatientResult:
    """Draw and write one patient's study under root/DICOM; return its annotations and truth.

    With `enhanced`, its sagittal and axial series are written as Enhanced MR (one
    multi-frame file per series), as modern scanners export; the pixels are the same.
    `annotation_format` csv: the boxes go to the sheet; sr: a TID 1500 measurement
    report beside the images instead; seg: a segmentation of the lesion masks instead
    (the returned annotations hold every box in each case). `codes`: each label's finding code (config.finding_codes).
    `export_format` bids: only the sagittal T2, as NIfTI under root/BIDS with its lesion masks as dseg
    (spinedet.demo.bids_writer); the same draws, so the same patients as the DICOM export.
    """
    rng = np.random.default_rng([seed, index])
    identity = fake_identity(rng, index)
    style = EXPORT_STYLES[int(rng.integers(len(EXPORT_STYLES)))]
    degenerated = int(rng.choice([0, 0, 1, 2])) if role == "normal" else int(rng.choice([0, 1, 2]))
    anatomy = phantom.draw_anatomy(rng, degenerated_discs=degenerated)
    geometry, reverse_order = _target_geometry(rng, anatomy, matrix)
    study_uid = generate_uid(entropy_srcs=["spinedet-synthesize", str(seed), str(index), "study"])
    frame_uid = generate_uid(entropy_srcs=["spinedet-synthesize", str(seed), str(index), "frame"])
    header = study_header(identity, study_uid, frame_uid)
    series_numbers = dict(zip(["T2_SAG", "T1_SAG", "T2_AX"], (int(n) for n in rng.permutation([2, 3, 4]))))
    series_numbers["LOCALIZER"] = 1
    protocol = {kind: make(rng) for kind, make in MR_PROTOCOLS.items()}
    lesion_rng = np.random.default_rng([seed, index, 1])

    # Lesions are redrawn in the rare case one's box would hold another lesion.
    for _attempt in range(8):
        lesions = phantom.draw_lesions(lesion_rng, anatomy, role, labels)
        volume, masks = render_series(anatomy, lesions, geometry, "T2", np.random.default_rng([seed, index, 2]),
                                      subsamples=TARGET_SUBSAMPLES)
        boxes = lesion_boxes(masks)
        if boxes_are_separate(masks, boxes):
            break
    else:
        raise SpinedetError(f"patient {index}: could not place lesions with separate boxes")

    if export_format == "bids":
        preview = preview_slice(volume, geometry, anatomy, lesions, boxes)
        return _bids_patient(root, index, group, identity, lesions, volume, masks, boxes, geometry, protocol,
                             classes=labels, preview=preview)
    namer = lambda kind: file_namer(style, index + 1, series_numbers[kind])  # noqa: E731
    dicom = root / "DICOM"
    minutes = {kind: 1.5 + 4.0 * series_numbers[kind] for kind in series_numbers}
    t2 = write_series(dicom, volume, ipp_first=geometry.ipp_first, iop=geometry.iop, pixel_spacing=geometry.pixel_spacing,
                      slice_step=geometry.slice_step, reverse_order=reverse_order, header=header,
                      series_number=series_numbers["T2_SAG"], description=TARGET_DESCRIPTION, file_name=namer("T2_SAG"),
                      slice_thickness=geometry.thickness, enhanced=enhanced,
                      series_attributes={**protocol["T2_SAG"], **series_times(identity, minutes["T2_SAG"])})
    series_uid = t2[0]["series_uid"]
    by_slice = {item["slice_index"]: item for item in t2}

    annotations = []
    for lesion_index, k, (x0, y0, x1, y1) in boxes:
        annotations.append({
            "study_uid": study_uid, "series_uid": series_uid, "sop_instance_uid": by_slice[k]["sop_instance_uid"],
            "instance_number": by_slice[k]["instance_number"], "frame_number": by_slice[k]["frame_number"],
            "label": lesions[lesion_index].label,
            "x_min": x0, "y_min": y0, "x_max": x1, "y_max": y1,
        })

    files = len({item["path"] for item in t2})
    if annotation_format != "csv":
        files += _write_annotation_object(dicom, annotation_format, t2, annotations, masks,
                                          [lesion.label for lesion in lesions], codes, style, index)
    files += _write_distractors(dicom, rng, anatomy, lesions, geometry, header, identity, series_numbers, protocol,
                                namer, minutes, matrix, seed, index, enhanced)

    preview_image, preview_boxes = preview_slice(volume, geometry, anatomy, lesions, boxes)
    truth = {
        "labels": np.array([lesion.label for lesion in lesions], dtype=str),
        "kinds": np.array([lesion.kind for lesion in lesions], dtype=str),
        "levels": np.array([lesion.level for lesion in lesions], dtype=str),
        "masks": masks,
        # the image's number in acquisition order: its frame number in an enhanced file
        "instance_numbers": np.array([by_slice[k]["frame_number"] or by_slice[k]["instance_number"]
                                      for k in range(geometry.n_slices)]),
        "sop_instance_uids": np.array([by_slice[k]["sop_instance_uid"] for k in range(geometry.n_slices)], dtype=str),
        "ipp_first": geometry.ipp_first,
        "iop": geometry.iop,
        "pixel_spacing": np.array(geometry.pixel_spacing),
        "slice_step": np.array(geometry.slice_step),
        "study_uid": np.array(study_uid),
        "series_uid": np.array(series_uid),
    }
    return PatientResult(identity["PatientID"], group, annotations, truth, preview_image, preview_boxes, files,
                         annotation_format)


def _bids_patient(root: Path, index: int, group: str, identity: dict, lesions, volume: np.ndarray, masks: np.ndarray,
                  boxes, geometry: SeriesGeometry, protocol: dict, classes: Sequence[str], preview) -> PatientResult:
    """Write the patient into root/BIDS. Its boxes (truth) name the spatial slice k as
    instance_number k + 1 and no UIDs: a BIDS dataset has none."""
    subject = identity["PatientID"]  # digits: a valid BIDS label, as a site's own subject codes are
    labels = [lesion.label for lesion in lesions]
    sidecar = {"Modality": "MR", "MagneticFieldStrength": 1.5, "EchoTime": float(protocol["T2_SAG"]["EchoTime"]) / 1000,
               "RepetitionTime": float(protocol["T2_SAG"]["RepetitionTime"]) / 1000,
               "SliceThickness": geometry.thickness, "ConversionSoftware": "spinedet synthesize"}
    files = bids_writer.write_subject(root / bids_writer.BIDS_FOLDER, subject, index, volume, masks, labels, classes,
                                      geometry, sidecar)
    annotations = [{"study_uid": "", "series_uid": "", "sop_instance_uid": "", "instance_number": k + 1,
                    "frame_number": "", "label": lesions[lesion_index].label,
                    "x_min": x0, "y_min": y0, "x_max": x1, "y_max": y1}
                   for lesion_index, k, (x0, y0, x1, y1) in boxes]
    truth = {
        "labels": np.array(labels, dtype=str),
        "kinds": np.array([lesion.kind for lesion in lesions], dtype=str),
        "levels": np.array([lesion.level for lesion in lesions], dtype=str),
        "masks": masks,
        "instance_numbers": np.arange(1, geometry.n_slices + 1),
        "sop_instance_uids": np.array([""] * geometry.n_slices, dtype=str),
        "ipp_first": geometry.ipp_first,
        "iop": geometry.iop,
        "pixel_spacing": np.array(geometry.pixel_spacing),
        "slice_step": np.array(geometry.slice_step),
        "study_uid": np.array(""),
        "series_uid": np.array(""),
    }
    return PatientResult(subject, group, annotations, truth, *preview, files, "bids")


# Series numbers of the annotation objects: after every image series of the study.
ANNOTATION_SERIES = {"sr": 90, "seg": 91}


def _write_annotation_object(dicom: Path, kind: str, t2: list[dict], boxes: list[dict], masks: np.ndarray,
                             labels: list[str], codes: dict, style: str, index: int) -> int:
    """The patient's boxes as an SR (kind sr) or its lesion masks as a SEG (kind seg) in
    the study's folder, as a PACS exports them; 0 files for a patient without any."""
    sources = [pydicom.dcmread(path) for path in dict.fromkeys(item["path"] for item in t2)]
    series_number = ANNOTATION_SERIES[kind]
    if kind == "sr":
        if not boxes:
            return 0
        dataset = measurement_report(sources, boxes, codes, series_number=series_number)
    else:
        by_label = label_masks(masks, labels, [item["slice_index"] for item in t2])
        if not any(mask.any() for mask in by_label.values()):
            return 0
        dataset = segmentation(sources, {label: mask for label, mask in by_label.items() if mask.any()}, codes,
                               series_number=series_number)
    write(dataset, dicom / file_namer(style, index + 1, series_number)(1))
    return 1


def _write_distractors(dicom: Path, rng, anatomy, lesions, target: SeriesGeometry, header, identity, series_numbers,
                       protocol, namer, minutes, matrix, seed, index, enhanced) -> int:
    """Sagittal T1, axial T2 and the 3-plane localizer: cheap, lower resolution. Returns files written."""
    small = max(64, matrix // 2)
    files = 0
    # sagittal T1: same slab as the T2, nominal orientation
    t1_geometry = centered_geometry(
        target.slice_points(target.n_slices // 2)[target.rows // 2, target.cols // 2]
        - (0.5 if target.n_slices % 2 == 0 else 0.0) * target.slice_step * target.normal,
        [0, 1, 0], [0, 0, -1], matrix=small, fov=target.pixel_spacing[0] * target.rows, n_slices=target.n_slices,
        slice_step=abs(target.slice_step), thickness=target.thickness)
    volume, _ = render_series(anatomy, lesions, t1_geometry, "T1", np.random.default_rng([seed, index, 3]),
                              signal_scale=anatomy.signal_scale * 0.8)
    files += len({item["path"] for item in write_series(
        dicom, volume, ipp_first=t1_geometry.ipp_first, iop=t1_geometry.iop, pixel_spacing=t1_geometry.pixel_spacing,
        slice_step=t1_geometry.slice_step, header=header, series_number=series_numbers["T1_SAG"], description="T1_TSE_SAG",
        file_name=namer("T1_SAG"), slice_thickness=t1_geometry.thickness, enhanced=enhanced,
        series_attributes={**protocol["T1_SAG"], **series_times(identity, minutes["T1_SAG"])})})

    # axial T2: a few slices parallel to the C5-C6 disc
    disc_s = anatomy.level_s("C5-C6")
    tangent = anatomy.tangent_lps(disc_s)
    angle = np.rad2deg(np.arctan2(-tangent[1], tangent[2]))
    rotation = rotation_matrix("x", angle)
    n_axial = int(rng.integers(5, 9))
    ax_geometry = centered_geometry(anatomy.to_lps(0.0, disc_s, phantom.PVBL + 2), rotation @ [1, 0, 0], rotation @ [0, 1, 0],
                                    matrix=small, fov=float(rng.uniform(150, 180)), n_slices=n_axial, slice_step=4.4,
                                    thickness=4.0)
    volume, _ = render_series(anatomy, lesions, ax_geometry, "T2", np.random.default_rng([seed, index, 4]))
    files += len({item["path"] for item in write_series(
        dicom, volume, ipp_first=ax_geometry.ipp_first, iop=ax_geometry.iop, pixel_spacing=ax_geometry.pixel_spacing,
        slice_step=ax_geometry.slice_step, header=header, series_number=series_numbers["T2_AX"], description="T2_AX",
        file_name=namer("T2_AX"), slice_thickness=ax_geometry.thickness, enhanced=enhanced,
        series_attributes={**protocol["T2_AX"], **series_times(identity, minutes["T2_AX"])})})

    # localizer: three single images, sagittal, coronal and axial, in one series
    center = anatomy.to_lps(0.0, anatomy.level_s("C4"), phantom.PVBL)
    planes = [([0, 1, 0], [0, 0, -1]), ([1, 0, 0], [0, 0, -1]), ([1, 0, 0], [0, 1, 0])]
    localizer_rng = np.random.default_rng([seed, index, 5])
    series_uid = generate_uid(entropy_srcs=[header["StudyInstanceUID"], "series", str(series_numbers["LOCALIZER"]), "LOCALIZER"])
    attributes = {
        "SeriesInstanceUID": series_uid, "SeriesNumber": series_numbers["LOCALIZER"], "SeriesDescription": "LOCALIZER",
        "ProtocolName": "LOCALIZER", "AcquisitionNumber": 1,
        **protocol["LOCALIZER"], **series_times(identity, minutes["LOCALIZER"]),
    }
    localizer_namer = namer("LOCALIZER")
    for number, (row_dir, col_dir) in enumerate(planes, start=1):
        plane = centered_geometry(center, row_dir, col_dir, matrix=128, fov=300.0, n_slices=1, slice_step=7.0, thickness=7.0)
        image, _ = render_series(anatomy, [], plane, "T1", localizer_rng, signal_scale=anatomy.signal_scale * 0.7,
                                 snr=anatomy.snr * 0.7)
        window_center, window_width = display_window(image)
        sop_uid = generate_uid(entropy_srcs=[series_uid, "instance", str(number)])
        ds = image_dataset(image[0], position=plane.ipp_first, orientation=plane.iop, pixel_spacing=plane.pixel_spacing,
                            slice_thickness=plane.thickness, spacing_between_slices=None, header=header,
                            series={**attributes, "WindowCenter": window_center, "WindowWidth": window_width},
                            instance_number=number, sop_instance_uid=sop_uid)
        write_dataset(ds, dicom / localizer_namer(number))
        files += 1
    return files


# --------------------------------------------------------------------------
# Whole export

def synthesize(out: Path, patients: int, matrix: int, seed: int, classes: Sequence[str] = DEFAULT_CLASSES,
               groups: Sequence[str] = DEFAULT_GROUPS, preview: Path | None = None, workers: int = 1,
               enhanced_fraction: float = 0.0, annotation_format: str = "csv",
               codes: dict[str, tuple[str, str, str]] | None = None, export_format: str = "dicom") -> dict:
    """Write the export under `out` (DICOM/, annotations.csv, cohort.csv, truth/, pseudonym.key) and
    return a PHI-free summary.

    `workers` processes write patients in parallel; the files are the same for any count.
    About `enhanced_fraction` of the patients (drawn from the seed) are written as
    Enhanced MR, the rest as classic MR Image Storage.

    `classes` name (herniation, cord injury) and `groups` name the (disc,
    injured, normal) groups, in that order. `annotation_format` (csv, sr, seg, or mixed:
    the patients with lesions take csv, sr and seg in turn) says how each patient's boxes
    are handed over; `codes` gives each class's finding code for SR and SEG (default: the
    config schema's finding_map). `export_format` bids writes the same patients' sagittal T2
    and lesion masks as a BIDS dataset under `out`/BIDS instead of the DICOM export.
    """
    if len(classes) != 2:
        raise SpinedetError(f"synthesize needs exactly two classes (herniation, cord injury), got {list(classes)}")
    if len(groups) != 3:
        raise SpinedetError(f"synthesize needs exactly three groups (disc, injured, normal), got {list(groups)}")
    if patients < 1:
        raise SpinedetError(f"--patients must be at least 1, got {patients}")
    if matrix < 64:
        raise SpinedetError(f"--matrix must be at least 64, got {matrix}")
    out = Path(out)
    if export_format not in ("dicom", "bids"):
        raise SpinedetError(f"--export-format must be dicom or bids, got {export_format!r}")
    raw = out / ("DICOM" if export_format == "dicom" else bids_writer.BIDS_FOLDER)
    if raw.exists() and any(raw.iterdir()):
        raise SpinedetError(f"{raw} already holds files; remove it or choose another --out")
    counts = group_counts(patients, groups)
    assignment = np.repeat(np.arange(len(groups)), list(counts.values()))
    assignment = np.random.default_rng([seed, 0xC0 + 0x40]).permutation(assignment)

    if not 0.0 <= enhanced_fraction <= 1.0:
        raise SpinedetError(f"the Enhanced MR fraction must be within 0..1, got {enhanced_fraction}")
    # its own generator: the other patients' files do not depend on the fraction
    enhanced = np.random.default_rng([seed, 0xE4]).random(patients) < enhanced_fraction
    if annotation_format not in (*ANNOTATION_FORMATS, "mixed"):
        raise SpinedetError(f"--annotation-format must be one of csv, sr, seg, mixed, got {annotation_format!r}")
    # mixed: the patients with lesions take the three forms in turn (a patient without lesions has
    # nothing to hand over, so it keeps the sheet's form, with no row in it)
    with_lesions = [index for index in range(patients) if ROLES[int(assignment[index])] != "normal"]
    turn = {index: k for k, index in enumerate(with_lesions)}
    formats = [(ANNOTATION_FORMATS[turn[index] % 3] if index in turn else "csv") if annotation_format == "mixed"
               else annotation_format for index in range(patients)]
    if codes is None:
        from spinedet.config import finding_codes, load

        codes = finding_codes(load([]))
    missing = [label for label in classes if label not in codes] if annotation_format != "csv" else []
    if missing:
        raise SpinedetError(f"no finding code for class(es) {', '.join(missing)}: add a code entry for each to "
                            "annotation_import.finding_map")
    jobs = [
        {"root": out, "seed": seed, "index": index, "group": groups[int(assignment[index])],
         "role": ROLES[int(assignment[index])], "labels": tuple(classes), "matrix": matrix,
         "enhanced": bool(enhanced[index]), "annotation_format": formats[index], "codes": codes,
         "export_format": export_format}
        for index in range(patients)
    ]
    # Each patient draws from its own generator (seed, index), so the files do
    # not depend on how many workers write them.
    workers = max(1, min(int(workers), patients))
    progress = functools.partial(tqdm, total=patients, desc="synthesize", unit="patient")
    if workers == 1:
        results = [synthesize_patient(**job) for job in progress(jobs)]
    else:
        with multiprocessing.get_context("spawn").Pool(workers, initializer=silence_dicom_libraries) as pool:
            results = list(progress(pool.imap(_synthesize_job, jobs)))

    if export_format == "bids":
        bids_writer.write_dataset_files(raw, [(r.patient_id, r.group) for r in results], classes)
    write_csv(out / "annotations.csv", [row for result in results if result.annotation_format == "csv"
                                        for row in result.annotations], ANNOTATION_COLUMNS)
    write_csv(out / "cohort.csv", [{"patient_id": result.patient_id, "group": result.group} for result in results],
              ["patient_id", "group"])
    write_truth(out / "truth", results)
    # every box, whichever way it was handed over (the sheet holds the csv patients' only)
    write_csv(out / "truth" / "annotations.csv", [row for result in results for row in result.annotations],
              ANNOTATION_COLUMNS)
    write_demo_key(out / DEMO_KEY_FILE, seed)
    # No faults in a clean export; `--faults` (spinedet.demo.faults) adds them.
    write_csv(out / "faults.csv", [], FAULT_COLUMNS)
    (out / LINKED_STORAGE).mkdir(exist_ok=True)
    if preview is not None:
        write_preview(results, Path(preview))

    lesions = {label: int(sum((r.truth["labels"] == label).sum() for r in results)) for label in classes}
    summary = {
        "patients": patients,
        "groups": counts,
        "files": int(sum(r.files for r in results)),
        "annotations": int(sum(len(r.annotations) for r in results)),
        "annotations_in_sheet": int(sum(len(r.annotations) for r in results if r.annotation_format == "csv")),
        "lesions": lesions,
        "matrix": matrix,
        "seed": seed,
        "enhanced_mr_patients": int(enhanced.sum()),
        "annotation_formats": {form: formats.count(form) for form in ANNOTATION_FORMATS},
    }
    log.info("synthesized %d patients, %d files, %d boxes in %s", patients, summary["files"], summary["annotations"], out)
    return summary


def write_demo_key(path: Path, seed: int) -> None:
    """The pseudonym key of the synthetic export, derived from its seed: a fresh clone
    gets the same pseudonyms, so the same split. (A real export's key is random and
    never leaves restricted/; this one protects fake identities only.)"""
    key = hashlib.sha256(f"spinedet demo pseudonym key {seed}".encode()).hexdigest()
    path.write_text(key + "\n")
    path.chmod(0o600)


def _synthesize_job(job: dict) -> PatientResult:
    return synthesize_patient(**job)


# --------------------------------------------------------------------------
# CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    from spinedet.config import add_config_argument

    parser.add_argument("--out", required=True, type=Path,
                        help="export root (DICOM/, annotations.csv, cohort.csv, truth/, pseudonym.key)")
    parser.add_argument("--patients", required=True, type=int, help="number of patients")
    parser.add_argument("--matrix", type=int, default=256, help="in-plane matrix of the sagittal T2 (default 256)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed writes the same files")
    parser.add_argument("--preview", type=Path, default=None, help="write a PNG montage of mid-sagittal slices with boxes")
    add_config_argument(parser, required=False)
    parser.add_argument("--workers", type=int, default=1, help="patients written in parallel (same files for any count)")
    parser.add_argument("--enhanced-fraction", type=float, default=0.0,
                        help="fraction of the patients written as Enhanced MR (multi-frame), 0..1 (default 0)")
    parser.add_argument("--annotation-format", choices=[*ANNOTATION_FORMATS, "mixed"], default="csv",
                        help="how the boxes are handed over: the annotations.csv sheet, a TID 1500 SR or a SEG per "
                             "patient in the export, or mixed (default csv)")
    parser.add_argument("--export-format", choices=["dicom", "bids"], default="dicom",
                        help="dicom: the DICOM export under --out/DICOM (default); bids: the same patients' sagittal "
                             "T2 and lesion masks (dseg) as a BIDS dataset under --out/BIDS")
    parser.add_argument("--faults", action="store_true",
                        help="also write the fault corpus (DICOM/FAULTS/, listed in faults.csv)")


def run(args: argparse.Namespace) -> int:
    from spinedet.config import finding_codes, load

    classes, groups = DEFAULT_CLASSES, DEFAULT_GROUPS
    codes = finding_codes(load([]))
    if args.config:
        config = load(args.config)
        classes = tuple(config.get("classes", classes))
        groups = tuple(config.get("groups", groups))
        if "annotation_import" in config:
            codes = finding_codes(config)
    summary = synthesize(args.out, args.patients, args.matrix, args.seed, classes=classes, groups=groups,
                         preview=args.preview, workers=args.workers, enhanced_fraction=args.enhanced_fraction,
                         annotation_format=args.annotation_format, codes=codes, export_format=args.export_format)
    faults = write_faults(args.out, args.seed, normal_group=groups[2], codes=codes) if args.faults else []
    log.info("fault corpus: %d cases (faults.csv)", len(faults))
    log.info("groups: %s; lesions: %s", summary["groups"], summary["lesions"])
    return 0
