"""Boxes drawn in CVAT or Label Studio on slices of `spinedet export-for-annotation`, as COCO.

`read_coco` reads one COCO file a tool exported (the task's images, its
categories, and every box drawn or kept there) with the export's manifest
(`read_manifest`: a copy of restricted/annotation_export/manifest.csv, one row
per exported PNG with its DICOM image and the 2x3 affine from canonical pixel
edges to that image's pixel edges). Each COCO annotation becomes a box in
DICOM pixel-edge coordinates of the instance (and frame, for Enhanced MR) the
slice lies on: its four corners [x, y, w, h] go through the affine, their
extent is clipped to the instance's columns and rows.

Images are matched by file name, whatever folder or upload prefix the tool
put before it (CVAT keeps `sub-<p>/sub-<p>_slice-KK.png`, Label Studio turns
it into `images/<hash>-sub-<p>_slice-KK.png`): the `sub-<p>_slice-KK.png` tail,
which holds the pseudonym, identifies the slice. Classes come from the COCO
file's own categories, by name.

Every annotation that gives no box becomes an ImportIssue (unknown_image,
unknown_label, references_unknown_instance, outside_image,
unsupported_graphic, unreadable_object); a file that is not COCO is one
unreadable_object issue; nothing raises.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from spinedet import SpinedetError
from spinedet.ingest.annotations.findings import ImportedBox, ImportIssue, exception_text
from spinedet.io import read_csv

SOURCE = "coco"
AFFINE_COLUMNS = ("a11", "a12", "a13", "a21", "a22", "a23")
MANIFEST_COLUMNS = ("file_name", "patient_id", "study_uid", "series_uid", "sop_instance_uid", "instance_number",
                    "frame_number", "width", "height", *AFFINE_COLUMNS)
# The part of an exported PNG's name that identifies it: pseudonym and slice.
SLICE_NAME = re.compile(r"sub-[0-9A-Za-z]+_slice-\d+\.png$")


def read_manifest(path: Path) -> list[dict]:
    """The rows of an export's manifest.csv; a file without its columns is an error."""
    rows = read_csv(path)
    missing = [column for column in MANIFEST_COLUMNS if rows and column not in rows[0]]
    if missing:
        raise SpinedetError(f"{path} is not a manifest of spinedet export-for-annotation: no column(s) "
                            f"{', '.join(missing)}")
    return rows


def slice_key(file_name: str) -> str | None:
    """`sub-<p>_slice-KK.png` of an image's file name as a tool writes it, or None."""
    name = re.split(r"[\\/]", str(file_name).strip())[-1]
    found = SLICE_NAME.search(name)
    return found.group(0) if found else None


def read_coco(path, manifest_rows: list[dict], instances: dict[str, dict],
              classes: list[str]) -> tuple[list[ImportedBox], list[ImportIssue]]:
    """Boxes and issues of one COCO file (see the module docstring).

    `manifest_rows`: the export's manifest (read_manifest); `instances`:
    SOPInstanceUID -> files.csv row of every accepted MR image."""
    path = Path(path)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        images, annotations, categories = _coco_parts(document)
    except Exception as exc:  # noqa: BLE001 - a broken file is an issue, never an exception
        return [], [ImportIssue(SOURCE, path.name, "unreadable_object",
                                f"the file is not a COCO annotation file ({exception_text(exc, path)}): export the "
                                "task again from the annotation tool as COCO")]
    manifest = {slice_key(row["file_name"]): row for row in manifest_rows}
    image_of = {image.get("id"): image for image in images if isinstance(image, dict)}
    label_of = {category.get("id"): str(category.get("name", "")) for category in categories
                if isinstance(category, dict)}
    boxes, issues = [], []
    for number, annotation in enumerate(annotations, start=1):
        ann_id = annotation.get("id", f"#{number}") if isinstance(annotation, dict) else f"#{number}"
        ref = f"{path.name} annotation {ann_id}"
        try:
            boxes.append(_read_annotation(annotation, ref, image_of, label_of, manifest, instances, list(classes)))
        except _Unusable as problem:
            issues.append(ImportIssue(SOURCE, ref, problem.reason, problem.detail, problem.patient_id, problem.label))
    return boxes, issues


def _coco_parts(document) -> tuple[list, list, list]:
    if not isinstance(document, dict):
        raise ValueError(f"the top level is a {type(document).__name__}, not a mapping")
    parts = []
    for key in ("images", "annotations", "categories"):
        value = document.get(key)
        if not isinstance(value, list):
            raise ValueError(f"no '{key}' list")
        parts.append(value)
    return tuple(parts)


class _Unusable(Exception):
    """An annotation that gives no box: an ImportIssue's reason and detail."""

    def __init__(self, reason: str, detail: str, patient_id: str = "", label: str = ""):
        super().__init__(detail)
        self.reason, self.detail, self.patient_id, self.label = reason, detail, patient_id, label


def _read_annotation(annotation, ref: str, image_of: dict, label_of: dict, manifest: dict,
                     instances: dict[str, dict], classes: list[str]) -> ImportedBox:
    if not isinstance(annotation, dict):
        raise _Unusable("unreadable_object", "the annotation is not a mapping: export the task again as COCO")
    image = image_of.get(annotation.get("image_id"))
    if image is None:
        raise _Unusable("unknown_image", f"image_id {annotation.get('image_id')!r} is not an image of the COCO "
                        "file: export the task again as COCO")
    name = str(image.get("file_name", ""))
    row = manifest.get(slice_key(name))
    if row is None:
        raise _Unusable("unknown_image", f"the image {name!r} is not a slice of the export's manifest: draw on "
                        "the images of spinedet export-for-annotation and give its manifest.csv")
    patient_id = row["patient_id"]
    size = (image.get("width"), image.get("height"))
    if all(value is not None for value in size) and [_number(v) for v in size] != [float(row["width"]),
                                                                                  float(row["height"])]:
        raise _Unusable("unknown_image", f"the image {name!r} is {size[0]} x {size[1]} px in the COCO file, "
                        f"{row['width']} x {row['height']} px as exported: label the exported PNGs unscaled",
                        patient_id)
    label = label_of.get(annotation.get("category_id"), "")
    if label not in classes:
        raise _Unusable("unknown_label", f"category {label or annotation.get('category_id')!r} is not one of the "
                        f"config's classes {classes}: rename the label in the tool", patient_id)
    box = annotation.get("bbox")
    try:
        x, y, w, h = (_number(value) for value in box)
    except (TypeError, ValueError):
        raise _Unusable("unreadable_object", f"bbox {box!r} is not four numbers [x, y, width, height]",
                        patient_id, label) from None
    if not (w > 0 and h > 0):
        raise _Unusable("unsupported_graphic", f"bbox {box!r} has no area: draw a rectangle", patient_id, label)
    instance = instances.get(row["sop_instance_uid"])
    if instance is None:
        raise _Unusable("references_unknown_instance", f"the image {name!r} lies on an instance that is not an "
                        "accepted MR image of this export's inventory: export and label the slices again",
                        patient_id, label)
    affine = np.array([float(row[column]) for column in AFFINE_COLUMNS]).reshape(2, 3)
    corners = np.array([[x, y, 1.0], [x + w, y, 1.0], [x, y + h, 1.0], [x + w, y + h, 1.0]])
    mapped = corners @ affine.T
    columns, rows = int(instance["columns"]), int(instance["rows"])
    low = np.maximum(mapped.min(axis=0), 0.0)
    high = np.minimum(mapped.max(axis=0), [columns, rows])
    if not np.all(high > low):
        raise _Unusable("outside_image", f"the box x {mapped[:, 0].min():.1f}..{mapped[:, 0].max():.1f}, y "
                        f"{mapped[:, 1].min():.1f}..{mapped[:, 1].max():.1f} lies outside the {columns} x {rows} "
                        "image: redraw it on the image", patient_id, label)
    frame = row.get("frame_number", "")
    return ImportedBox(
        patient_id=patient_id, study_uid=row["study_uid"], series_uid=row["series_uid"],
        sop_instance_uid=row["sop_instance_uid"], instance_number=row["instance_number"],
        frame_number=int(float(frame)) if frame not in ("", None) else None, label=label,
        x_min=float(low[0]), y_min=float(low[1]), x_max=float(high[0]), y_max=float(high[1]),
        source=SOURCE, source_ref=ref)


def _number(value) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a number")
    number = float(value)
    if not np.isfinite(number):
        raise ValueError(f"{value!r} is not a finite number")
    return number
