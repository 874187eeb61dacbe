"""Boxes from DICOM SEG objects (Slicer, MONAI Label): one per connected component.

`read_segmentation` reads one SEG with highdicom. Each segment gets its class
from the finding map (segmented property type and category, segment label,
tracking id); on every source image (and frame, for Enhanced MR) its frames
are derived from, the segment's mask (BINARY and LABELMAP: set pixels;
FRACTIONAL: more than half the maximum fractional value) is split into
8-connected components, and each component gives the box of its pixels in
pixel-edge coordinates (x_min = first column, x_max = last column + 1).

Only SEG frames on the source image's own pixel grid are read: the frames
must reference their source image (Derivation Image Sequence) and have its
rows, columns and, where the SEG records them, its plane position,
orientation and pixel spacing. Anything else needs resampling, which is not
done. Every segment or source that gives no box becomes an ImportIssue;
nothing raises.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from scipy import ndimage

from spinedet.geometry import lps_to_pixel
from spinedet.ingest.annotations.findings import (
    ImportedBox,
    ImportIssue,
    box_fields,
    describe_concept,
    exception_text,
    match_class,
    unreadable_issue,
)
from spinedet.ingest.dicom import FUNCTIONAL_GROUP_OF, image_planes

SOURCE = "seg"
# A pixel of a FRACTIONAL segment belongs to it above this share of the
# maximum fractional value (highdicom rescales the values to 0..1).
FRACTION = 0.5
EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
# A SEG frame is on its source's grid when its position is this close to the
# source's, in pixels along each axis (DS rounding and float32 volumes of the
# writing tool stay far below it).
GRID_TOLERANCE_PX = 0.1


def read_segmentation(path, instances: dict[str, dict], finding_map: list[dict],
                      classes) -> tuple[list[ImportedBox], list[ImportIssue]]:
    """Boxes and issues of one DICOM SEG file (see the module docstring).

    `instances`: SOPInstanceUID -> files.csv row of every accepted MR image.
    A source image that is not among them gives `references_unknown_instance`
    for each segment that has pixels on it.
    """
    path = Path(path)
    with warnings.catch_warnings():
        # pydicom and highdicom warn with header values verbatim (a UID, a name): never into logs/
        warnings.simplefilter("ignore")
        try:
            seg = hd.seg.segread(path)
        except Exception as exc:  # noqa: BLE001 - one bad object is an issue, never an exception
            return [], [unreadable_issue(SOURCE, path, exc, *_header_identity(path))]
        try:
            return _read(seg, instances, finding_map, list(classes), path)
        except Exception as exc:  # noqa: BLE001
            return [], [unreadable_issue(SOURCE, path, exc, *_header_identity(path))]


def _header_identity(path: Path) -> tuple[str, str]:
    """(SOPInstanceUID, PatientID) of a file highdicom cannot read, as far as pydicom can."""
    try:
        dataset = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        return str(dataset.get("SOPInstanceUID", "") or ""), str(dataset.get("PatientID", "") or "")
    except Exception:  # noqa: BLE001 - nothing readable: the issue names the file by its hash
        return "", ""


def _read(seg, instances: dict[str, dict], finding_map: list[dict], classes: list[str],
          path: Path) -> tuple[list[ImportedBox], list[ImportIssue]]:
    seg_uid = str(seg.get("SOPInstanceUID", "") or "")
    patient_id = str(seg.get("PatientID", "") or "")
    boxes: dict[int, list[ImportedBox]] = defaultdict(list)
    issues: dict[int, list[ImportIssue]] = defaultdict(list)
    labels: dict[int, str] = {}
    for number in seg.segment_numbers:
        ref = f"{seg_uid}#segment{number}"
        try:
            description = seg.get_segment_description(number)
            concepts = [description.segmented_property_type, description.segmented_property_category]
            texts = [description.segment_label, description.tracking_id]
            label = match_class(finding_map, concepts, texts, classes)
        except Exception as exc:  # noqa: BLE001 - the other segments go on
            issues[number].append(ImportIssue(SOURCE, ref, "unreadable_object", "the segment's description cannot "
                                              f"be read ({exception_text(exc, path)}): re-export the SEG",
                                              patient_id))
            continue
        if label is None:
            issues[number].append(ImportIssue(
                SOURCE, ref, "unknown_finding", "segmented property type "
                f"{describe_concept(description.segmented_property_type)} matches none of the classes {classes}: "
                "add its code or text to finding_map, or relabel the segment", patient_id))
        else:
            labels[number] = label

    numbers = sorted(labels)
    sources = _sources(seg) if numbers else {}
    if numbers and not sources:
        for number in numbers:
            issues[number].append(ImportIssue(
                SOURCE, f"{seg_uid}#segment{number}", "unsupported_graphic", "the SEG's frames do not reference "
                "the images they were drawn on (no Derivation Image Sequence), so they are not known to be on an "
                "MR image's grid: it needs resampling, which is not done; export the SEG from the MR series",
                patient_id, labels[number]))
    for (uid, frame), frames in sources.items():
        row = instances.get(uid)
        where = f"@{uid}" + (f":{frame}" if frame is not None else "")
        patient = (row or {}).get("patient_id", "") or patient_id
        try:
            misfit = _misfit(seg, uid, frame, frames, row)
        except Exception as exc:  # noqa: BLE001 - a malformed files.csv row: this source only
            misfit = "unreadable_object", (
                f"the source image's geometry cannot be read ({exception_text(exc)}): rerun the inventory")
        try:
            masks = _masks(seg, uid, frame, numbers)
        except Exception as exc:  # noqa: BLE001 - this source only
            for number in numbers:
                reason, detail = misfit or ("unreadable_object", (
                    f"the segment's pixels on this image cannot be read ({exception_text(exc, path)}): "
                    "re-export the SEG"))
                issues[number].append(ImportIssue(SOURCE, f"{seg_uid}#segment{number}{where}", reason, detail,
                                                  patient, labels[number]))
            continue
        for index, number in enumerate(numbers):
            mask = masks[..., index]
            if not mask.any():
                continue
            if misfit:
                issues[number].append(ImportIssue(SOURCE, f"{seg_uid}#segment{number}{where}", *misfit,
                                                  patient, labels[number]))
                continue
            components, _ = ndimage.label(mask, structure=EIGHT_CONNECTED)
            for component, (rows, columns) in enumerate(ndimage.find_objects(components), start=1):
                boxes[number].append(ImportedBox(
                    **box_fields(row), frame_number=frame if _frame_count(row) > 1 else None,
                    label=labels[number], x_min=int(columns.start), y_min=int(rows.start),
                    x_max=int(columns.stop), y_max=int(rows.stop), source=SOURCE,
                    source_ref=f"{seg_uid}#segment{number}/component{component}{where}"))
    for number in numbers:
        if not boxes[number] and not issues[number]:
            issues[number].append(ImportIssue(
                SOURCE, f"{seg_uid}#segment{number}", "empty_segment", "the segment has no pixels on any image: "
                "draw it again or remove it from the SEG", patient_id, labels[number]))
    ordered = sorted(seg.segment_numbers)
    return ([box for number in ordered for box in boxes[number]],
            [issue for number in ordered for issue in issues[number]])


def _sources(seg) -> dict[tuple[str, int | None], list[dict]]:
    """(source SOPInstanceUID, source frame or None) -> the SEG frames derived
    from it: {spatial (Spatial Locations Preserved), ipp, iop, pixel_spacing}
    (geometry None where the SEG does not record it)."""
    shared_groups = seg.get("SharedFunctionalGroupsSequence")
    shared = shared_groups[0] if shared_groups else None
    sources: dict[tuple[str, int | None], list[dict]] = {}
    for group in seg.get("PerFrameFunctionalGroupsSequence") or []:
        frame = {keyword: _macro_value(group, shared, keyword)
                 for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")}
        derivations = group.get("DerivationImageSequence") or (
            shared.get("DerivationImageSequence") if shared is not None else None) or []
        for derivation in derivations:
            for source in derivation.get("SourceImageSequence") or []:
                uid = str(source.get("ReferencedSOPInstanceUID", "") or "")
                if not uid:
                    continue
                numbers = source.get("ReferencedFrameNumber")
                numbers = [None] if numbers in (None, "") else [int(n) for n in (
                    numbers if isinstance(numbers, (list, tuple, pydicom.multival.MultiValue)) else [numbers])]
                spatial = str(source.get("SpatialLocationsPreserved", "") or "").upper()
                for number in numbers:
                    sources.setdefault((uid, number), []).append({"spatial": spatial, **frame})
    return sources


def _macro_value(group, shared, keyword: str):
    """An attribute of a frame's functional group macro, else of the shared one (None when neither)."""
    for functional in (group, shared):
        items = functional.get(FUNCTIONAL_GROUP_OF[keyword]) if functional is not None else None
        if items and items[0].get(keyword) is not None:
            return [float(v) for v in items[0].get(keyword)]
    return None


def _frame_count(row: dict) -> int:
    return int(row.get("frames") or 1)


def _masks(seg, uid: str, frame: int | None, numbers: list[int]) -> np.ndarray:
    """(rows, columns, segment) booleans of the segments on one source image or frame.

    The SEG's own frame references were read by _sources; spatial locations
    are checked by _misfit, so highdicom is told to ignore them (Slicer and
    MONAI Label often leave Spatial Locations Preserved out).
    """
    options = {"segment_numbers": numbers, "ignore_spatial_locations": True,
               "assert_missing_frames_are_empty": True, "rescale_fractional": True}
    if frame is None:
        pixels = seg.get_pixels_by_source_instance([uid], **options)
    else:
        pixels = seg.get_pixels_by_source_frame(uid, [frame], **options)
    return np.asarray(pixels[0]) > FRACTION


def _misfit(seg, uid: str, frame: int | None, frames: list[dict], row: dict | None) -> tuple[str, str] | None:
    """(reason, detail) when the segment pixels on this source cannot become boxes; None when they can."""
    if row is None:
        return "references_unknown_instance", (
            f"the segment is drawn on instance {uid}, which is not an accepted MR image of the inventory (another "
            "modality such as CT, another export, or quarantined): export the SEG from the MR series")
    count = _frame_count(row)
    if count > 1 and frame is None:
        return "unknown_frame", (
            f"the source is a multi-frame image of {count} frames and the SEG frame gives no source frame number: "
            "re-export the SEG with its frame references")
    if frame is not None and not 1 <= frame <= count:
        return "unknown_frame", (
            f"source frame {frame} is not one of the instance's {count} frame(s): re-export the SEG from the "
            "images it was drawn on")
    resample = "it needs resampling onto the MR grid, which is not done; export the SEG on the MR series' own grid"
    if (int(seg.Rows), int(seg.Columns)) != (int(row["rows"]), int(row["columns"])):
        return "unsupported_graphic", (
            f"the SEG's {seg.Columns} x {seg.Rows} frames are not on the {row['columns']} x {row['rows']} grid "
            f"of the source image: {resample}")
    if any(f["spatial"] == "NO" for f in frames):
        return "unsupported_graphic", (
            "the SEG says its frames do not keep the source image's pixel locations (Spatial Locations Preserved "
            f"NO): {resample}")
    planes = image_planes(row)
    plane = planes[(frame or 1) - 1] if count > 1 else planes[0]
    for seg_frame in frames:
        shift = _grid_shift(seg_frame, plane)
        if shift:
            return "unsupported_graphic", f"the SEG frame {shift} the source image: {resample}"
    return None


def _grid_shift(seg_frame: dict, plane: dict) -> str:
    """How a SEG frame's recorded geometry departs from its source plane ('' when it does not)."""
    if seg_frame["ImageOrientationPatient"] is not None and not np.allclose(
            seg_frame["ImageOrientationPatient"], plane["iop"], atol=1e-3):
        return "has another orientation than"
    if seg_frame["PixelSpacing"] is not None and not np.allclose(
            seg_frame["PixelSpacing"], plane["pixel_spacing"], rtol=1e-3):
        return "has another pixel spacing than"
    if seg_frame["ImagePositionPatient"] is not None:
        column, row, off_plane = lps_to_pixel(seg_frame["ImagePositionPatient"], plane["ipp"], plane["iop"],
                                              plane["pixel_spacing"])[0]
        spacing = min(float(v) for v in plane["pixel_spacing"])
        if max(abs(column), abs(row)) > GRID_TOLERANCE_PX or abs(off_plane) > GRID_TOLERANCE_PX * spacing:
            return (f"is shifted by {column:.2f} columns, {row:.2f} rows and {off_plane:.2f} mm off the plane "
                    "from")
    return ""
