"""Reading DICOM headers: one file at a time, without its pixel data.

`read_file` classifies a file from its header alone (an MR image with the
attributes its geometry needs, a DICOMDIR, or quarantined with a reason from
`spinedet.ingest.quarantine` and a detail a person can act on); `build_series`
groups the image rows into series; `is_target` applies the `inventory:`
rules to a series. Shared by the inventory and by `spinedet predict`.
`InstanceLocator` finds the DICOM image (instance, or frame) a canonical
slice lies on and maps canonical pixels onto its grid, for `spinedet
predict` and `spinedet export-for-annotation`.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from spinedet import SpinedetError
from spinedet.geometry import orientation_label, slice_normal, voxel_to_pixel

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4.1"
SUPPORTED_SOP_CLASSES = {MR_IMAGE_STORAGE: "MR Image Storage",
                         ENHANCED_MR_IMAGE_STORAGE: "Enhanced MR Image Storage"}
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"  # Media Storage Directory Storage
# Annotation objects an export may carry beside the images (OHIF, Slicer, highdicom,
# dcmqi, MONAI Label write them): read by `spinedet annotations`, not converted.
SR_SOP_CLASSES = {"1.2.840.10008.5.1.4.1.1.88.22": "Enhanced SR Storage",
                  "1.2.840.10008.5.1.4.1.1.88.33": "Comprehensive SR Storage",
                  "1.2.840.10008.5.1.4.1.1.88.34": "Comprehensive 3D SR Storage"}
SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
# TID 1500 "Measurement Report": the template of an SR's root content item, or
# its concept name (DCM 126000 "Imaging Measurement Report") where no template is named.
MEASUREMENT_REPORT_TEMPLATE = "1500"
MEASUREMENT_REPORT_CONCEPT = ("DCM", "126000")
PIXEL_DATA_TAG = 0x7FE00010
UNDEFINED_LENGTH = 0xFFFFFFFF
SNAKEMAKE_MARKER = ".snakemake_timestamp"
# Values larger than this are skipped by position instead of read.
DEFER_SIZE = 1024

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
GEOMETRY_ATTRIBUTES = REQUIRED_IMAGE_ATTRIBUTES[-3:]
# Where a multi-frame (enhanced) image keeps each geometry attribute: the
# functional group macro, in the frame's own group or the shared one.
FUNCTIONAL_GROUP_OF = {
    "ImagePositionPatient": "PlanePositionSequence",
    "ImageOrientationPatient": "PlaneOrientationSequence",
    "PixelSpacing": "PixelMeasuresSequence",
    "SliceThickness": "PixelMeasuresSequence",
}


def list_files(root: Path) -> list[Path]:
    """Every file under `root` (see walk_export), without the entries that are not files."""
    return walk_export(root)[0]


def walk_export(root: Path) -> tuple[list[Path], list[dict]]:
    """Every file under `root`, at any depth, in sorted order of the relative
    path, and a quarantine row for every entry that cannot be a file of the
    export: a broken symbolic link, a folder that cannot be listed, a
    directory link that loops back to a folder already walked.

    Directory links are followed (exports are often assembled from linked
    folders), each real folder once. Only Snakemake's own marker of a
    `directory()` output (written at the root when the synthesizer made the
    export) is left out: it is not part of the export.
    """
    root = Path(root)
    if not root.is_dir():
        raise SpinedetError(f"raw export folder not found: {root}")
    files, problems = [], []

    def unlistable(error: OSError) -> None:
        problems.append(quarantine_row(
            "unreadable_folder", f"cannot list this folder ({error.strerror}): its files are not in the "
            "inventory; fix its permissions (e.g. chmod -R u+rX) and rerun", path=Path(error.filename).as_posix()))

    walked = {os.path.realpath(root)}
    for folder, dirs, names in os.walk(root, onerror=unlistable, followlinks=True):
        for name in sorted(dirs):
            path = Path(folder, name)
            real = os.path.realpath(path)
            if real in walked:
                dirs.remove(name)
                problems.append(quarantine_row(
                    "link_loop", "a directory link to a folder already walked (a loop or a second link): "
                    "not followed, its files are listed once under the other path", path=path.as_posix()))
            else:
                walked.add(real)
        for name in names:
            path = Path(folder, name)
            if name == SNAKEMAKE_MARKER and path.parent == root:
                continue
            if path.is_file():
                files.append(path)
            elif path.is_symlink():
                problems.append(quarantine_row(
                    "broken_link", "a symbolic link whose target does not exist: restore the target or "
                    "remove the link", path=path.as_posix()))
            else:
                problems.append(quarantine_row(
                    "not_a_file", "not a regular file (a socket, FIFO or device): remove it from the export",
                    path=path.as_posix()))
    return sorted(files, key=lambda p: p.relative_to(root).as_posix()), problems


def quarantine_row(reason: str, detail: str, **fields) -> dict:
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
        return quarantine_row("not_dicom", "empty file: remove it from the export")
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
            return quarantine_row("not_dicom", "no DICOM header (no 'DICM' prefix, no SOP UIDs): "
                               "remove it or move it out of the export")
    except Exception as exc:  # noqa: BLE001 - report the parser's message, keep going
        return quarantine_row("unreadable", f"pydicom cannot parse the header ({type(exc).__name__}: "
                           f"{exc}): re-export the file")

    overrun = _overrun(dataset, size)
    eof_messages = [m for m in messages if re.search(r"(?i)\bEOF|end of (the )?file", m)]
    if overrun or eof_messages:
        return quarantine_row("truncated", f"{overrun or eof_messages[0]}: the copy is incomplete, "
                           "re-export the file", **_identity(dataset))
    try:
        return _classify_dataset(dataset)
    except Exception as exc:  # noqa: BLE001 - malformed values (bad VR, bad numbers)
        return quarantine_row("unreadable", f"header value cannot be decoded ({type(exc).__name__}: "
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
    if sop_class in SR_SOP_CLASSES or sop_class == SEGMENTATION_STORAGE:
        return _classify_annotation_object(dataset, fields)
    fields["kind"] = "image"
    if sop_class not in SUPPORTED_SOP_CLASSES:
        name = pydicom.uid.UID(sop_class).name if sop_class else "missing"
        return quarantine_row("unsupported_sop_class", f"SOP class {name} ({sop_class or 'none'}): only "
                           "MR Image Storage and Enhanced MR Image Storage are converted", **fields)
    if PIXEL_DATA_TAG not in dataset:
        return quarantine_row("no_pixel_data", "no (7FE0,0010) Pixel Data element: re-export the image "
                           "with its pixels", **fields)
    multi_frame = sop_class == ENHANCED_MR_IMAGE_STORAGE
    frames = _frame_geometry(dataset) if multi_frame else [
        {keyword: dataset.get(keyword) for keyword in (*GEOMETRY_ATTRIBUTES, "SliceThickness")}]
    top_level = REQUIRED_IMAGE_ATTRIBUTES[:-3]
    missing = [name for name in top_level if _text(dataset.get(name)) == ""]
    missing += [name for name in GEOMETRY_ATTRIBUTES if any(_text(frame[name]) == "" for frame in frames)]
    if multi_frame and not frames:
        missing.append("PerFrameFunctionalGroupsSequence")
    if missing:
        why = ("the image cannot be assigned to a patient or study" if {"PatientID", "StudyInstanceUID"} & set(missing)
               else "the image cannot be placed in patient space")
        where = " (in the functional groups of some frames)" if multi_frame and set(missing) & set(GEOMETRY_ATTRIBUTES) else ""
        return quarantine_row("missing_attributes", f"missing {', '.join(missing)}{where}: {why}; re-export it "
                              "with its full header", **fields)
    if multi_frame and len(frames) != int(dataset.get("NumberOfFrames") or 0):
        return quarantine_row("missing_attributes", f"{len(frames)} per-frame functional groups for "
                              f"NumberOfFrames {_text(dataset.get('NumberOfFrames')) or 'missing'}: the frames "
                              "cannot be placed in patient space; re-export it with its full header", **fields)
    transfer_syntax = _transfer_syntax(dataset)
    pixel_element = _raw_element(dataset, PIXEL_DATA_TAG)
    if (transfer_syntax is None or not transfer_syntax.is_encapsulated) and (
        pixel_element.length != UNDEFINED_LENGTH
    ):
        expected = _expected_pixel_bytes(dataset)
        if pixel_element.length < expected:
            return quarantine_row("truncated", f"pixel data has {pixel_element.length} bytes, "
                               f"{expected} expected from Rows x Columns x BitsAllocated"
                               f"{' x NumberOfFrames' if multi_frame else ''}: re-export the file", **fields)

    orientations = np.array([[float(v) for v in frame["ImageOrientationPatient"]] for frame in frames])
    spacings = np.array([[float(v) for v in frame["PixelSpacing"]] for frame in frames])
    # frames of one file that do not share one plane geometry cannot make one stack
    one_geometry = (np.allclose(orientations, orientations[0], atol=1e-4)
                    and np.allclose(spacings, spacings[0], rtol=1e-4))
    first = frames[0]
    fields.update(
        instance_number=_text(dataset.get("InstanceNumber")),
        series_number=_text(dataset.get("SeriesNumber")),
        series_description=_text(dataset.get("SeriesDescription")),
        rows=int(dataset.Rows),
        columns=int(dataset.Columns),
        frames=len(frames),
        image_position=_numbers(first["ImagePositionPatient"]),
        frame_positions=json.dumps([json.loads(_numbers(f["ImagePositionPatient"])) for f in frames])
        if multi_frame else "",
        image_orientation=json.dumps(orientations[0].tolist()),
        pixel_spacing=_numbers(first["PixelSpacing"]),
        slice_thickness=_text(first["SliceThickness"]),
        orientation=orientation_label(orientations[0]) if one_geometry else "mixed",
    )
    return {"status": "ok", "reason": "", "detail": "", **fields}



def is_measurement_report(dataset) -> bool:
    """A TID 1500 Measurement Report: by the root's template identifier, else its concept name."""
    for item in dataset.get("ContentTemplateSequence") or []:
        if _text(item.get("TemplateIdentifier")) == MEASUREMENT_REPORT_TEMPLATE:
            return True
    for item in dataset.get("ConceptNameCodeSequence") or []:
        if (_text(item.get("CodingSchemeDesignator")), _text(item.get("CodeValue"))) == MEASUREMENT_REPORT_CONCEPT:
            return True
    return False


def _classify_annotation_object(dataset, fields: dict) -> dict:
    """An SR or SEG object: ok when `spinedet annotations` can read it, else quarantined."""
    sop_class = fields["sop_class_uid"]
    kind = "seg" if sop_class == SEGMENTATION_STORAGE else "sr"
    fields.update(kind=kind, series_number=_text(dataset.get("SeriesNumber")),
                  series_description=_text(dataset.get("SeriesDescription")),
                  instance_number=_text(dataset.get("InstanceNumber")))
    if kind == "sr" and not is_measurement_report(dataset):
        templates = [_text(item.get("TemplateIdentifier")) for item in dataset.get("ContentTemplateSequence") or []]
        named = f"template {', '.join(templates)}" if any(templates) else "no template identifier"
        return quarantine_row("sr_not_measurement_report", f"{SR_SOP_CLASSES[sop_class]} with {named}: only TID 1500 "
                              "measurement reports (OHIF, highdicom, dcmqi) hold regions to import; nothing to do "
                              "unless it should hold lesion annotations", **fields)
    missing = [name for name in ("PatientID", "StudyInstanceUID", "SeriesInstanceUID") if _text(dataset.get(name)) == ""]
    if missing:
        return quarantine_row("missing_attributes", f"missing {', '.join(missing)}: the {kind.upper()} object "
                              "cannot be assigned to a patient or study; re-export it with its full header", **fields)
    what = "measurement report (TID 1500)" if kind == "sr" else "segmentation"
    return {"status": "ok", "reason": "", "detail": f"{what}: read by spinedet annotations", **fields}


def _frame_geometry(dataset) -> list[dict]:
    """Each frame's geometry attributes of a multi-frame image, from its
    per-frame functional group, else the shared one (None where neither has it)."""
    def macro(group, sequence):
        items = group.get(sequence) if group is not None else None
        return items[0] if items else None

    shared_groups = dataset.get("SharedFunctionalGroupsSequence")
    shared = shared_groups[0] if shared_groups else None
    frames = []
    for frame in dataset.get("PerFrameFunctionalGroupsSequence") or []:
        geometry = {}
        for keyword, sequence in FUNCTIONAL_GROUP_OF.items():
            found = [macro(group, sequence) for group in (frame, shared)]
            geometry[keyword] = next((item.get(keyword) for item in found
                                      if item is not None and item.get(keyword) is not None), None)
        frames.append(geometry)
    return frames


def image_planes(row: dict) -> list[dict]:
    """The images of one files.csv image row, one per frame of a multi-frame
    file: {frame_number (None for a single-frame file), ipp, iop, pixel_spacing}."""
    common = {"iop": json.loads(row["image_orientation"]), "pixel_spacing": json.loads(row["pixel_spacing"])}
    if row.get("frame_positions"):
        return [{"frame_number": number, "ipp": position, **common}
                for number, position in enumerate(json.loads(row["frame_positions"]), start=1)]
    return [{"frame_number": None, "ipp": json.loads(row["image_position"]), **common}]


# --------------------------------------------------------------------------
# Series


def series_number_key(series: dict) -> tuple:
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
            "n_slices": sum(int(f.get("frames") or 1) for f in files),
            **slice_positions(files),
            "pixel_spacing": first["pixel_spacing"],
            "slice_thickness": first["slice_thickness"],
            "rows": first["rows"],
            "columns": first["columns"],
            "files": ";".join(f["path"] for f in files),
            "selected": False,
        })
    series_rows.sort(key=lambda s: (s["patient_id"], s["study_uid"], series_number_key(s), s["series_uid"]))
    return series_rows


def slice_positions(files: list[dict]) -> dict:
    """`positions`: distinct slice positions along the series' normal (fewer
    than the files for a 4-D series: diffusion, multi-echo, dynamics);
    `missing_slices`: positions absent from an otherwise even stack (a gap
    of k steps is k - 1 missing slices). Both empty when the geometry is not
    one stack (mixed orientations, positions absent)."""
    try:
        normal = slice_normal(json.loads(files[0]["image_orientation"]))
        along = sorted({round(float(np.dot(plane["ipp"], normal)), 3) for f in files for plane in image_planes(f)})
    except (ValueError, TypeError, KeyError):
        return {"positions": "", "missing_slices": ""}
    steps = np.diff(along)
    if len(steps) < 2:
        return {"positions": len(along), "missing_slices": 0}
    step = float(np.median(steps))
    missing = int(sum(round(s / step) - 1 for s in steps if s > 1.5 * step)) if step > 0 else 0
    return {"positions": len(along), "missing_slices": missing}


def is_target(series: dict, rules: dict) -> bool:
    """Does a series meet the `inventory:` rules (orientation, description, exclusion)?"""
    if series["orientation"] != rules["orientation"]:
        return False
    if not re.search(rules["description_pattern"], series["description"]):
        return False
    exclude = rules.get("exclude_pattern")
    return not (exclude and re.search(exclude, series["description"]))


def missing_slices(series: dict) -> int:
    return int(series.get("missing_slices") or 0)


def is_multi_volume(series: dict) -> bool:
    """More images than slice positions: a 4-D series (diffusion, multi-echo, dynamics)."""
    return bool(series.get("positions")) and int(series["n_slices"]) > int(series["positions"])


def series_rank(rules: dict):
    """The sort key that puts the best of a patient's target series first, for the
    inventory and for `spinedet predict` alike: a series matching an earlier `prefer`
    pattern (T2 before STIR), then a complete one (no gap in its slice positions), then a
    3-D one (not 4-D), then the one with most images; ties go to the lowest series number,
    then the lowest series UID."""
    prefer = list(rules.get("prefer") or [])

    def preference(series: dict) -> int:
        return next((rank for rank, pattern in enumerate(prefer) if re.search(pattern, series["description"])),
                    len(prefer))

    return lambda s: (preference(s), missing_slices(s) > 0, is_multi_volume(s), -int(s["n_slices"]),
                      series_number_key(s), s["series_uid"])


# --------------------------------------------------------------------------
# Canonical slices back on the DICOM images


class InstanceLocator:
    """Maps canonical slice coordinates back to the DICOM image they lie on: an
    instance, or one frame of a multi-frame instance.

    `files`: files.csv rows (or read_file rows) of the series' images;
    `nifti_affine`: the affine of the volume the slices were cut from (voxel ->
    RAS); `canonical_to_volume`: canonical voxel -> that volume's voxel
    (inverse of CanonicalVolume.old_to_new). Canonical voxel axes: 0 = slice,
    1 = image row (y), 2 = image column (x). Shared by `spinedet predict`
    (detections back to DICOM) and `spinedet export-for-annotation` (the
    manifest's transform of each exported slice).
    """

    def __init__(self, files: list[dict], nifti_affine: np.ndarray, canonical_to_volume: np.ndarray):
        self.instances = [
            {
                "sop_instance_uid": f["sop_instance_uid"],
                "instance_number": int(float(f["instance_number"])) if f["instance_number"] else None,
                **plane,
            }
            for f in files for plane in image_planes(f)
        ]
        if not self.instances:
            raise SpinedetError("no DICOM image to map canonical slices onto: the series has no usable file")
        self.nifti_affine = np.asarray(nifti_affine, dtype=float)
        self.canonical_to_volume = np.asarray(canonical_to_volume, dtype=float)
        normal = slice_normal(self.instances[0]["iop"])
        positions = np.sort([float(np.dot(normal, i["ipp"])) for i in self.instances])
        gaps = np.diff(positions)
        # A point belongs to an instance when it lies within half the slice spacing of its plane.
        self.tolerance_mm = float(gaps[gaps > 0].min() / 2) if np.any(gaps > 0) else 1.0

    def locate(self, slice_index: int, points) -> tuple[dict, np.ndarray] | None:
        """(image, (N, 3) `(col, row, offset_mm)` index coordinates on it) of canonical
        pixel-edge points `(x, y)` of slice `slice_index`: the image whose plane lies
        nearest to all of them, or None when none lies within half the slice spacing."""
        points = np.asarray(points, dtype=float).reshape(-1, 2)
        # Points as index coordinates (edge - 0.5) of the canonical voxel grid.
        canonical = np.column_stack([np.full(len(points), float(slice_index)), points[:, 1] - 0.5,
                                     points[:, 0] - 0.5, np.ones(len(points))])
        volume_voxels = (self.canonical_to_volume @ canonical.T).T[:, :3]
        best, best_offset, best_pixels = None, np.inf, None
        for instance in self.instances:
            pixels = voxel_to_pixel(
                volume_voxels, instance["ipp"], instance["iop"], instance["pixel_spacing"], self.nifti_affine
            )
            offset = float(np.abs(pixels[:, 2]).max())
            if offset < best_offset:
                best, best_offset, best_pixels = instance, offset, pixels
        if best is None or best_offset > self.tolerance_mm:
            return None
        return best, best_pixels

    def to_dicom(self, slice_index: int, box: list[float]) -> dict | None:
        """The box [x_min, y_min, x_max, y_max] (canonical pixel edges) on the DICOM
        image holding canonical slice `slice_index`, in its pixel edges; or None."""
        x_min, y_min, x_max, y_max = box
        found = self.locate(slice_index, [[x, y] for x in (x_min, x_max) for y in (y_min, y_max)])
        if found is None:
            return None
        best, pixels = found
        return {
            "sop_instance_uid": best["sop_instance_uid"],
            "instance_number": best["instance_number"],
            "frame_number": best["frame_number"],
            "x_min": round(float(pixels[:, 0].min()) + 0.5, 3),
            "y_min": round(float(pixels[:, 1].min()) + 0.5, 3),
            "x_max": round(float(pixels[:, 0].max()) + 0.5, 3),
            "y_max": round(float(pixels[:, 1].max()) + 0.5, 3),
        }

    def pixel_transform(self, slice_index: int, width: int, height: int) -> tuple[dict, np.ndarray, float] | None:
        """(image, 2x3 affine, residual px) taking canonical pixel edges (x, y) of slice
        `slice_index` (a `width` x `height` image) to pixel edges of the DICOM image it
        lies on: DICOM x = a11 x + a12 y + a13, DICOM y = a21 x + a22 y + a23. Fitted
        by least squares to the image's four corners and centre mapped through the
        geometry; `residual` is the largest distance (px) of a mapped point from the
        fit. None when no image lies on the slice."""
        points = np.array([[0, 0], [width, 0], [0, height], [width, height], [width / 2, height / 2]],
                          dtype=float)
        found = self.locate(slice_index, points)
        if found is None:
            return None
        image, pixels = found
        target = pixels[:, :2] + 0.5  # index coordinates -> pixel edges
        design = np.column_stack([points, np.ones(len(points))])
        solution, *_ = np.linalg.lstsq(design, target, rcond=None)
        residual = float(np.abs(design @ solution - target).max())
        return image, solution.T, residual
