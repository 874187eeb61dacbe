"""Boxes from BIDS label masks (ITK-SNAP, FSLeyes, Slicer, nnU-Net, SCT).

Two forms sit under a BIDS derivative, named after the image they label:
- binary `<image>_label-<name>_mask.nii.gz`: one structure per file;
- discrete `<image>_dseg.nii.gz`: one integer per structure, named by a
  `dseg.tsv` (`index`, `name`) beside it (`<image>_dseg.tsv`) or at the
  derivative's root.

Each `<name>` becomes a class through `bids.label_map`; an unmapped name is
an issue, never dropped silently. A mask on another grid than its image
(other shape or affine) is resampled onto the image's grid with nearest
neighbour through both affines (nibabel.processing.resample_from_to). The
boxes are the 8-connected components of each structure on each sagittal
slice: the voxel axis that runs left-right in the image's affine
(nibabel's io_orientation), whatever the voxel order. A box is written in
the image's own voxel edges, as `spinedet deidentify` writes them.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import io_orientation
from nibabel.processing import resample_from_to
from scipy import ndimage

EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
# A mask shares its image's grid when the shapes match and the affines agree to
# this (mm); float32 affines of the writing tools stay far below it.
AFFINE_TOLERANCE_MM = 1e-3
# A voxel of a non-integer (e.g. probabilistic) binary mask is set above this.
BINARY_THRESHOLD = 0.5
# Issues of a whole mask file (it gives no box); the others concern one structure or value.
FILE_ISSUES = ("no_dseg_table", "unreadable_mask")

MASK_PATTERN = re.compile(r"_label-(?P<name>[a-zA-Z0-9]+)(_[a-zA-Z0-9]+-[a-zA-Z0-9]+)*_mask\.nii(\.gz)?$")
DSEG_PATTERN = re.compile(r"(_[a-zA-Z0-9]+-[a-zA-Z0-9]+)*_dseg\.nii(\.gz)?$")


@dataclass(frozen=True)
class MaskIssue:
    """A structure or mask file that gives no box: reason code and PHI-free detail."""

    name: str  # the label name, or "" for the whole file
    reason: str
    detail: str


def nifti_stem(path: Path) -> str:
    name = Path(path).name
    for extension in (".nii.gz", ".nii"):
        if name.endswith(extension):
            return name[: -len(extension)]
    return name


def mask_kind(mask: Path, image: Path) -> tuple[str, str] | None:
    """("mask", name) or ("dseg", "") when `mask` labels `image`, else None."""
    stem, name = nifti_stem(image), Path(mask).name
    if not name.startswith(stem + "_"):
        return None
    rest = name[len(stem):]
    match = MASK_PATTERN.fullmatch(rest)
    if match:
        return "mask", match["name"]
    if DSEG_PATTERN.fullmatch(rest):
        return "dseg", ""
    return None


def dseg_table_path(dseg: Path, derivative_root: Path) -> Path | None:
    """The dseg.tsv of a dseg mask: `<mask stem>.tsv` beside it, else the derivative root's dseg.tsv."""
    beside = Path(dseg).with_name(nifti_stem(dseg) + ".tsv")
    if beside.is_file():
        return beside
    root_table = Path(derivative_root) / "dseg.tsv"
    return root_table if root_table.is_file() else None


def read_dseg_table(path: Path, what: str = "the dseg.tsv") -> dict[int, str]:
    """{index: name} of a dseg.tsv; raises ValueError naming what is wrong. Messages name the
    table by `what`, never by its file name (a table beside a mask carries the subject label)."""
    try:
        with Path(path).open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh, delimiter="\t")
            if not reader.fieldnames or not {"index", "name"} <= set(reader.fieldnames):
                raise ValueError(f"{what} needs the columns index and name (tab-separated)")
            table = {}
            for line, row in enumerate(reader, start=2):
                try:
                    table[int(row["index"])] = (row["name"] or "").strip()
                except (TypeError, ValueError):
                    raise ValueError(f"{what} line {line}: index {row['index']!r} is not an integer") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{what} cannot be read ({type(exc).__name__})") from None
    return table


def scrubbed_error(exc: BaseException, path: Path) -> str:
    """'Type: message' of a reading error without the file's path or name (both carry the
    subject label), cut to 200 characters."""
    message = str(exc).replace(str(path), "<file>").replace(Path(path).name, "<file>")
    return f"{type(exc).__name__}: {' '.join(message.split())}"[:200]


def left_right_axis(affine: np.ndarray) -> int:
    """The voxel axis closest to the patient's left-right axis."""
    orientation = io_orientation(np.asarray(affine, dtype=float))
    return int(np.flatnonzero(orientation[:, 0] == 0)[0])


def on_image_grid(mask: nib.spatialimages.SpatialImage, image: nib.spatialimages.SpatialImage) -> bool:
    return tuple(mask.shape[:3]) == tuple(image.shape[:3]) and np.allclose(
        mask.affine, image.affine, atol=AFFINE_TOLERANCE_MM)


def mask_data_on_image_grid(mask: nib.spatialimages.SpatialImage,
                            image: nib.spatialimages.SpatialImage) -> tuple[np.ndarray, bool]:
    """(the mask's voxel values on the image's grid, whether it was resampled)."""
    if len(mask.shape) > 3 and any(size != 1 for size in mask.shape[3:]):
        raise ValueError(f"a mask must be 3-D, this one has shape {tuple(mask.shape)}")
    if len(mask.shape) > 3:
        mask = mask.slicer[..., 0]
    if on_image_grid(mask, image):
        return np.asanyarray(mask.dataobj), False
    resampled = resample_from_to(mask, (tuple(image.shape[:3]), image.affine), order=0, mode="constant", cval=0)
    return np.asanyarray(resampled.dataobj), True


def component_boxes(structure: np.ndarray, slice_axis: int, label: str) -> list[dict]:
    """The box of every 8-connected component of a boolean volume on each slice along
    `slice_axis`, in voxel edges on the other two axes (as deidentify's boxes.json)."""
    axes = [axis for axis in range(3) if axis != slice_axis]
    boxes = []
    for index in np.flatnonzero(structure.any(axis=tuple(axes))):
        plane = np.take(structure, index, axis=slice_axis)
        components, _ = ndimage.label(plane, structure=EIGHT_CONNECTED)
        for first, second in ndimage.find_objects(components):
            boxes.append({"label": label, "slice": int(index), "axes": axes,
                          "min": [int(first.start), int(second.start)],
                          "max": [int(first.stop), int(second.stop)]})
    return boxes


def structures(path: Path, kind: str, name: str, derivative_root: Path) -> tuple[dict[str, list[int]], list[MaskIssue]]:
    """{label name: voxel values that make it} of one mask file (a binary mask: its name,
    set voxels; a dseg: each row of its table)."""
    if kind == "mask":
        return {name: []}, []
    table_path = dseg_table_path(path, derivative_root)
    if table_path is None:
        return {}, [MaskIssue("", "no_dseg_table", "a _dseg mask needs a dseg.tsv (index, name) beside it or at "
                              "the derivative's root")]
    where = "the dseg.tsv beside the mask" if table_path.parent == Path(path).parent else "the derivative's dseg.tsv"
    try:
        table = read_dseg_table(table_path, where)
    except ValueError as exc:
        return {}, [MaskIssue("", "no_dseg_table", str(exc))]
    by_name: dict[str, list[int]] = {}
    for index, label_name in sorted(table.items()):
        if index != 0:
            by_name.setdefault(label_name, []).append(index)
    return by_name, []


def mask_boxes(path: Path, kind: str, name: str, image: nib.spatialimages.SpatialImage, derivative_root: Path,
               label_map: dict[str, str], classes: list[str]) -> tuple[list[dict], list[MaskIssue], bool]:
    """(boxes, issues, resampled) of one mask file labelling `image`."""
    names, issues = structures(path, kind, name, derivative_root)
    if not names:
        return [], issues, False
    try:
        values, resampled = mask_data_on_image_grid(nib.load(path), image)
    except Exception as exc:  # a damaged file: nibabel raises many types
        return [], [MaskIssue("", "unreadable_mask", scrubbed_error(exc, path))], False
    slice_axis = left_right_axis(image.affine)
    boxes = []
    if kind == "dseg":
        listed = {index for indices in names.values() for index in indices}
        unlisted = sorted(int(v) for v in np.unique(values) if v != 0 and v not in listed)
        if unlisted:
            issues.append(MaskIssue("", "unlisted_value", f"voxel value(s) {unlisted[:10]} of the dseg are not in "
                                    "its dseg.tsv: add a row (index, name) for each"))
    for label_name, indices in names.items():
        structure = (values > BINARY_THRESHOLD) if kind == "mask" else np.isin(values, indices)
        if label_name not in label_map:
            if structure.any():
                issues.append(MaskIssue(label_name, "unmapped_label", f"label {label_name!r} is not in bids.label_map "
                                        f"(mapped: {sorted(label_map) or 'none'})"))
            continue
        label = label_map[label_name]
        if label not in classes:
            issues.append(MaskIssue(label_name, "unknown_label", f"bids.label_map maps {label_name!r} to {label!r}, "
                                    f"which is not one of the config's classes {classes}"))
            continue
        found = component_boxes(structure, slice_axis, label)
        if not found and kind == "mask":
            issues.append(MaskIssue(label_name, "empty_mask", f"label {label_name!r} has no voxel in the mask"
                                    + (" after resampling onto the image's grid" if resampled else "")))
        boxes += found
    return boxes, issues, resampled
