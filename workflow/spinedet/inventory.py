"""`spinedet inventory`: account for every file of a raw export, pick one target series per patient.

Reads DICOM headers only (large values such as the pixel data are skipped
by position, never loaded). Every file gets one row in files.csv, `ok` or
`quarantined` with a reason code and a detail a person can act on; ok
images are grouped into series, and one target series is chosen per cohort
patient by the config's `inventory:` rules. Patients of the cohort without
a target series are listed in selection.csv with the reason.

Everything written under `--out` carries identity (paths, IDs, UIDs) and
belongs in restricted/; `--summary` holds PHI-free counts only.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import re
import warnings
from collections import Counter, defaultdict
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError
from tqdm import tqdm

from spinedet import SpinedetError
from spinedet.geometry import orientation_label

log = logging.getLogger(__name__)

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
SUPPORTED_SOP_CLASSES = {MR_IMAGE_STORAGE: "MR Image Storage"}
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"  # Media Storage Directory Storage
PIXEL_DATA_TAG = 0x7FE00010
UNDEFINED_LENGTH = 0xFFFFFFFF
SNAKEMAKE_MARKER = ".snakemake_timestamp"
# Values larger than this are skipped by position instead of read.
DEFER_SIZE = 1024

# Reason codes of quarantined files. The summary counts them; the detail
# column of files.csv says what exactly is wrong with each file.
REASONS = {
    "not_dicom": "not a DICOM file",
    "unreadable": "DICOM header cannot be parsed",
    "truncated": "file is truncated",
    "no_pixel_data": "no pixel data",
    "unsupported_sop_class": "SOP class is not MR Image Storage",
    "missing_attributes": "attributes needed for the geometry are missing",
    "duplicate": "duplicate SOPInstanceUID",
    "not_in_cohort": "PatientID is not in cohort.csv",
}
REQUIRED_IMAGE_ATTRIBUTES = (
    "PatientID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Rows",
    "Columns",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
)

FILE_COLUMNS = [
    "path",
    "status",
    "kind",
    "reason",
    "detail",
    "patient_id",
    "study_uid",
    "series_uid",
    "sop_instance_uid",
    "instance_number",
    "sop_class_uid",
    "series_number",
    "series_description",
    "rows",
    "columns",
    "image_position",
    "image_orientation",
    "pixel_spacing",
    "slice_thickness",
    "orientation",
]
SERIES_COLUMNS = [
    "patient_id",
    "study_uid",
    "series_uid",
    "series_number",
    "description",
    "orientation",
    "n_slices",
    "pixel_spacing",
    "slice_thickness",
    "rows",
    "columns",
    "files",
    "selected",
]
SELECTION_COLUMNS = ["row", "patient_id", "group", "series_uid", "status", "reason"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", nargs="+", required=True, help="config YAML file(s)")
    parser.add_argument("--raw", required=True, type=Path, help="root of the raw DICOM export")
    parser.add_argument("--cohort", required=True, type=Path, help="cohort.csv (patient_id, group)")
    parser.add_argument("--out", required=True, type=Path, help="restricted inventory folder")
    parser.add_argument("--summary", required=True, type=Path, help="PHI-free summary.json")


# --------------------------------------------------------------------------
# Reading one file


def list_files(root: Path) -> list[Path]:
    """Every file under `root`, at any depth, in sorted order of the relative path.

    Only Snakemake's own marker of a `directory()` output (written at the
    root when the synthesizer made the export) is left out: it is not part
    of the export.
    """
    root = Path(root)
    if not root.is_dir():
        raise SpinedetError(f"raw export folder not found: {root}")
    found = []
    for folder, _dirs, names in os.walk(root):
        found.extend(Path(folder, name) for name in names
                     if not (name == SNAKEMAKE_MARKER and Path(folder) == root))
    return sorted((p for p in found if p.is_file()), key=lambda p: p.relative_to(root).as_posix())


def _quarantine(reason: str, detail: str, **fields) -> dict:
    return {"status": "quarantined", "kind": fields.pop("kind", "other"), "reason": reason,
            "detail": detail, **fields}


def _dcmread_header(path: Path, force: bool):
    """Read all elements, skipping large values by position; collect pydicom's warnings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = pydicom.dcmread(path, defer_size=DEFER_SIZE, force=force)
    return dataset, [str(w.message) for w in caught]


def _transfer_syntax(dataset):
    """The file's transfer syntax UID, or None when absent or not a known transfer syntax."""
    uid = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
    try:
        return uid if uid is not None and uid.is_transfer_syntax else None
    except ValueError:
        return None


def _raw_element(dataset, tag):
    """The element as read from the file, without loading a deferred (skipped) value."""
    return dataset.get_item(tag, keep_deferred=True)


def _overrun(dataset, file_size: int) -> str | None:
    """Describe the first element whose value runs past the end of the file, if any."""
    transfer_syntax = _transfer_syntax(dataset)
    if transfer_syntax is not None and transfer_syntax.is_deflated:
        return None  # positions refer to the inflated stream, not the file
    if len(dataset) == 0:
        return "the file ends within or right after its file meta information"
    end = None
    for tag in dataset.keys():
        element = _raw_element(dataset, tag)
        length = getattr(element, "length", None)
        value_tell = getattr(element, "value_tell", None)
        if length is None or value_tell is None or length == UNDEFINED_LENGTH:
            end = None  # end of this element unknown
            continue
        if element.value is not None and len(element.value) < length:
            return f"element {element.tag} has {len(element.value)} of its {length} bytes"
        end = value_tell + length
        if end > file_size:
            return f"element {element.tag} needs {end} bytes, file has {file_size}"
    # pydicom stops silently when fewer than 8 bytes (one element header) remain
    if end is not None and 0 < file_size - end < 8:
        return f"the file ends with {file_size - end} bytes of an incomplete element"
    return None


def _expected_pixel_bytes(dataset) -> int:
    bits = int(dataset.get("BitsAllocated", 16))
    samples = int(dataset.get("SamplesPerPixel", 1))
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    pixels = int(dataset.Rows) * int(dataset.Columns) * samples * frames
    return (pixels * bits + 7) // 8


def _text(value) -> str:
    return "" if value is None else str(value).strip()


def _numbers(value) -> str:
    """A multi-valued numeric attribute as a JSON list (empty string if absent)."""
    if value is None or value == "":
        return ""
    values = value if isinstance(value, (list, tuple, pydicom.multival.MultiValue)) else [value]
    return json.dumps([float(v) for v in values])


def read_file(path: Path) -> dict:
    """Classify one file from its header: a partial files.csv row (no duplicate/cohort check)."""
    size = path.stat().st_size
    if size == 0:
        return _quarantine("not_dicom", "empty file: remove it from the export")
    try:
        dataset, messages = _dcmread_header(path, force=False)
    except InvalidDicomError:
        # Files without the 128-byte preamble are still DICOM; anything else
        # parsed by force has no SOP instance UID and is not DICOM.
        try:
            dataset, messages = _dcmread_header(path, force=True)
            if "SOPInstanceUID" not in dataset or "SOPClassUID" not in dataset:
                raise InvalidDicomError("no SOP Instance/Class UID")
        except Exception:  # noqa: BLE001 - any parse failure here means "not DICOM"
            return _quarantine("not_dicom", "no DICOM header (no 'DICM' prefix, no SOP UIDs): "
                               "remove it or move it out of the export")
    except Exception as exc:  # noqa: BLE001 - report the parser's message, keep going
        return _quarantine("unreadable", f"pydicom cannot parse the header ({type(exc).__name__}: "
                           f"{exc}): re-export the file")

    overrun = _overrun(dataset, size)
    eof_messages = [m for m in messages if re.search(r"(?i)\bEOF|end of (the )?file", m)]
    if overrun or eof_messages:
        return _quarantine("truncated", f"{overrun or eof_messages[0]}: the copy is incomplete, "
                           "re-export the file", **_identity(dataset))
    try:
        return _classify_dataset(dataset)
    except Exception as exc:  # noqa: BLE001 - malformed values (bad VR, bad numbers)
        return _quarantine("unreadable", f"header value cannot be decoded ({type(exc).__name__}: "
                           f"{exc}): re-export the file")


def _identity(dataset) -> dict:
    """Patient, study, series, instance and SOP class of a header, as far as they can be read."""
    meta = getattr(dataset, "file_meta", None)
    keywords = {"patient_id": "PatientID", "study_uid": "StudyInstanceUID",
                "series_uid": "SeriesInstanceUID", "sop_instance_uid": "SOPInstanceUID",
                "sop_class_uid": "SOPClassUID"}
    fields = {}
    for column, keyword in keywords.items():
        try:
            fields[column] = _text(dataset.get(keyword))
        except Exception:  # noqa: BLE001 - a cut or malformed value: leave it empty
            fields[column] = ""
    if not fields["sop_class_uid"] and meta is not None:
        fields["sop_class_uid"] = _text(meta.get("MediaStorageSOPClassUID"))
    return fields


def _classify_dataset(dataset) -> dict:
    fields = _identity(dataset)
    sop_class = fields["sop_class_uid"]
    if sop_class == DICOMDIR_SOP_CLASS or "DirectoryRecordSequence" in dataset:
        return {"status": "ok", "kind": "dicomdir", "reason": "",
                "detail": "DICOMDIR index: not an image, not used", **fields}
    fields["kind"] = "image"
    if sop_class not in SUPPORTED_SOP_CLASSES:
        name = pydicom.uid.UID(sop_class).name if sop_class else "missing"
        return _quarantine("unsupported_sop_class", f"SOP class {name} ({sop_class or 'none'}): only "
                           "MR Image Storage is converted", **fields)
    if PIXEL_DATA_TAG not in dataset:
        return _quarantine("no_pixel_data", "no (7FE0,0010) Pixel Data element: re-export the image "
                           "with its pixels", **fields)
    missing = [name for name in REQUIRED_IMAGE_ATTRIBUTES if _text(dataset.get(name)) == ""]
    if missing:
        return _quarantine("missing_attributes", f"missing {', '.join(missing)}: the image cannot be "
                           "placed in patient space", **fields)
    transfer_syntax = _transfer_syntax(dataset)
    pixel_element = _raw_element(dataset, PIXEL_DATA_TAG)
    if (transfer_syntax is None or not transfer_syntax.is_encapsulated) and (
        pixel_element.length != UNDEFINED_LENGTH
    ):
        expected = _expected_pixel_bytes(dataset)
        if pixel_element.length < expected:
            return _quarantine("truncated", f"pixel data has {pixel_element.length} bytes, "
                               f"{expected} expected from Rows x Columns x BitsAllocated: "
                               "re-export the file", **fields)

    iop = [float(v) for v in dataset.ImageOrientationPatient]
    fields.update(
        instance_number=_text(dataset.get("InstanceNumber")),
        series_number=_text(dataset.get("SeriesNumber")),
        series_description=_text(dataset.get("SeriesDescription")),
        rows=int(dataset.Rows),
        columns=int(dataset.Columns),
        image_position=_numbers(dataset.ImagePositionPatient),
        image_orientation=json.dumps(iop),
        pixel_spacing=_numbers(dataset.PixelSpacing),
        slice_thickness=_text(dataset.get("SliceThickness")),
        orientation=orientation_label(iop),
    )
    return {"status": "ok", "reason": "", "detail": "", **fields}


# --------------------------------------------------------------------------
# The whole export


def read_cohort(path: Path, groups: list[str]) -> dict[str, str]:
    """cohort.csv as {patient_id: group}, in file order; errors name the line, not the patient."""
    path = Path(path)
    if not path.is_file():
        raise SpinedetError(f"cohort file not found: {path}")
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        missing = {"patient_id", "group"} - set(reader.fieldnames or [])
        if missing:
            raise SpinedetError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
        cohort: dict[str, str] = {}
        for line, record in enumerate(reader, start=2):
            patient_id = (record["patient_id"] or "").strip()
            group = (record["group"] or "").strip()
            if not patient_id:
                raise SpinedetError(f"{path} line {line}: empty patient_id")
            if group not in groups:
                raise SpinedetError(f"{path} line {line}: group {group!r} is not one of the config's "
                                    f"groups {groups}")
            if patient_id in cohort:
                raise SpinedetError(f"{path} line {line}: this patient_id is listed twice")
            cohort[patient_id] = group
    return cohort


def classify_files(paths: list[Path], cohort: dict[str, str]) -> list[dict]:
    """One files.csv row per path (in the given order): header checks, then duplicates, then cohort.

    The `path` column is the path as found under the raw root given on the
    command line (relative to the working directory when that root is).
    """
    rows = []
    first_path_of_instance: dict[str, str] = {}
    for path in tqdm(paths, desc="inventory", unit="file"):
        row = {column: "" for column in FILE_COLUMNS}
        try:
            row.update(read_file(path))
        except OSError as exc:
            row.update(_quarantine("unreadable", f"cannot read the file ({exc.strerror}): check "
                                   "its permissions"))
        row["path"] = path.as_posix()
        if row["status"] == "ok" and row["kind"] == "image":
            uid = row["sop_instance_uid"]
            if uid in first_path_of_instance:
                row.update(status="quarantined", reason="duplicate",
                           detail=f"same SOPInstanceUID as {first_path_of_instance[uid]} (kept): "
                                  "remove the copy")
            else:
                first_path_of_instance[uid] = row["path"]
                if row["patient_id"] not in cohort:
                    row.update(status="quarantined", reason="not_in_cohort",
                               detail="PatientID is not listed in cohort.csv: add the patient "
                                      "to the cohort or leave the file out")
        rows.append(row)
    return rows


def _series_number_key(series: dict) -> tuple:
    try:
        return (0, int(float(series["series_number"])))
    except ValueError:
        return (1, 0)


def build_series(file_rows: list[dict]) -> list[dict]:
    """Group the ok image files into series.csv rows."""
    members: dict[str, list[dict]] = defaultdict(list)
    for row in file_rows:
        if row["status"] == "ok" and row["kind"] == "image":
            members[row["series_uid"]].append(row)
    series_rows = []
    for uid, files in members.items():
        first = files[0]
        orientations = {f["orientation"] for f in files}
        series_rows.append({
            "patient_id": first["patient_id"],
            "study_uid": first["study_uid"],
            "series_uid": uid,
            "series_number": first["series_number"],
            "description": first["series_description"],
            "orientation": orientations.pop() if len(orientations) == 1 else "mixed",
            "n_slices": len(files),
            "pixel_spacing": first["pixel_spacing"],
            "slice_thickness": first["slice_thickness"],
            "rows": first["rows"],
            "columns": first["columns"],
            "files": ";".join(f["path"] for f in files),
            "selected": False,
        })
    series_rows.sort(key=lambda s: (s["patient_id"], s["study_uid"], _series_number_key(s), s["series_uid"]))
    return series_rows


def is_target(series: dict, rules: dict) -> bool:
    """Does a series meet the `inventory:` rules (orientation, description, exclusion)?"""
    if series["orientation"] != rules["orientation"]:
        return False
    if not re.search(rules["description_pattern"], series["description"]):
        return False
    exclude = rules.get("exclude_pattern")
    return not (exclude and re.search(exclude, series["description"]))


def _describe(series: dict) -> str:
    return f"{series['orientation']} {series['description']!r} ({series['n_slices']} slices)"


def select_series(series_rows: list[dict], file_rows: list[dict], cohort: dict[str, str],
                  rules: dict) -> list[dict]:
    """One selection.csv row per cohort patient; marks the chosen series `selected` in place.

    Among the series meeting the rules the one with most slices wins; ties
    go to the lowest series number, then the lowest series UID.
    """
    by_patient: dict[str, list[dict]] = defaultdict(list)
    for series in series_rows:
        by_patient[series["patient_id"]].append(series)
    quarantined = defaultdict(Counter)
    for row in file_rows:
        if row["status"] == "quarantined" and row["patient_id"]:
            quarantined[row["patient_id"]][row["reason"]] += 1
    rule_text = (f"{rules['orientation']}, description matching {rules['description_pattern']!r}"
                 + (f" and not {rules['exclude_pattern']!r}" if rules.get("exclude_pattern") else ""))

    selection = []
    for number, (patient_id, group) in enumerate(cohort.items(), start=1):
        candidates = by_patient.get(patient_id, [])
        record = {"row": number, "patient_id": patient_id, "group": group, "series_uid": ""}
        targets = sorted(
            (s for s in candidates if is_target(s, rules)),
            key=lambda s: (-s["n_slices"], _series_number_key(s), s["series_uid"]),
        )
        if targets:
            chosen = targets[0]
            chosen["selected"] = True
            others = f"; {len(targets) - 1} other matching series not used" if len(targets) > 1 else ""
            record.update(series_uid=chosen["series_uid"], status="selected",
                          reason=f"{_describe(chosen)} meets the rules ({rule_text}){others}")
        elif candidates:
            found = ", ".join(_describe(s) for s in candidates)
            record.update(status="no_target_series",
                          reason=f"none of {len(candidates)} series is {rule_text}: found {found}")
        elif quarantined.get(patient_id):
            counts = ", ".join(f"{reason}: {n}" for reason, n in sorted(quarantined[patient_id].items()))
            record.update(status="no_files",
                          reason=f"all files of this patient were quarantined ({counts}); see files.csv")
        else:
            record.update(status="no_files", reason="no file of this patient in the export")
        selection.append(record)
    return selection


def summarize(file_rows: list[dict], series_rows: list[dict], selection: list[dict],
              cohort: dict[str, str]) -> dict:
    """PHI-free counts for the report (no IDs, paths, descriptions or dates)."""
    status = Counter(row["status"] for row in file_rows)
    reasons = Counter(row["reason"] for row in file_rows if row["status"] == "quarantined")
    kinds = Counter(row["kind"] for row in file_rows if row["status"] == "ok")
    selection_status = Counter(row["status"] for row in selection)
    outside = {row["patient_id"] for row in file_rows if row["reason"] == "not_in_cohort"}
    return {
        "files_in": len(file_rows),
        "ok": status["ok"],
        "ok_by_kind": dict(sorted(kinds.items())),
        "quarantined": status["quarantined"],
        "quarantined_by_reason": dict(sorted(reasons.items())),
        "series": len(series_rows),
        "series_by_orientation": dict(sorted(Counter(s["orientation"] for s in series_rows).items())),
        "cohort_patients": len(cohort),
        "patients_selected": selection_status["selected"],
        "patients_without_target": selection_status["no_target_series"],
        "patients_without_files": selection_status["no_files"],
        "patients_not_in_cohort": len(outside),
    }


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def inventory(raw: Path, cohort_path: Path, config: dict) -> tuple[list, list, list, dict]:
    """Run the whole inventory in memory: (files, series, selection, summary)."""
    raw = Path(raw)
    cohort = read_cohort(cohort_path, config["groups"])
    paths = list_files(raw)
    log.info("%d files under the raw export, %d cohort patients", len(paths), len(cohort))
    file_rows = classify_files(paths, cohort)
    series_rows = build_series(file_rows)
    selection = select_series(series_rows, file_rows, cohort, config["inventory"])
    summary = summarize(file_rows, series_rows, selection, cohort)
    return file_rows, series_rows, selection, summary


def run(args: argparse.Namespace) -> int:
    from spinedet.config import load

    config = load(args.config)
    file_rows, series_rows, selection, summary = inventory(args.raw, args.cohort, config)
    write_csv(args.out / "files.csv", file_rows, FILE_COLUMNS)
    write_csv(args.out / "series.csv", series_rows, SERIES_COLUMNS)
    write_csv(args.out / "selection.csv", selection, SELECTION_COLUMNS)
    args.summary.parent.mkdir(parents=True, exist_ok=True)
    args.summary.write_text(json.dumps(summary, indent=2) + "\n")
    log.info(
        "files in %d = ok %d + quarantined %d %s; %d series; %d of %d patients have a target series",
        summary["files_in"], summary["ok"], summary["quarantined"], summary["quarantined_by_reason"],
        summary["series"], summary["patients_selected"], summary["cohort_patients"],
    )
    return 0
