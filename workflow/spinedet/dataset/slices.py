"""`spinedet slices`: canonical PNG slices and one COCO JSON per patient.

One call handles every de-identified patient listed in deidentify's
`participants.csv` (each one's `sub-<p>/anat/sub-<p>_<suffix>.nii.gz` plus
`sub-<p>/sub-<p>_boxes.json` beside it, see docs/data-contracts.md), in
`--workers` processes, and writes, under `--out` (= `results/slices`):

- `sub-<p>/sub-<p>_slice-KK.png`: 8-bit grayscale, no text chunks;
- `sub-<p>/coco.json`: COCO with `file_name` relative to `--out`;
- `sub-<p>/dropped_boxes.csv`: every box that did not make it into the COCO,
  with the reason (header only when none was dropped).

Canonical orientation. Every slice is shown sagittal with the patient's
anterior on the left and superior at the top. The reorientation is derived
from the NIfTI affine with nibabel (`io_orientation` -> `ornt_transform` ->
`apply_orientation`), so a volume stored in any axis order, with any flips,
or a few degrees oblique (the nearest axes are used), comes out the same.
After it, voxel axis 0 runs from the patient's left to right (the slice
axis; `slice_index` and `KK` count along it, 0 = leftmost slice), axis 1
from superior to inferior (PNG rows) and axis 2 from anterior to posterior
(PNG columns). Boxes go through the same transform, as old voxel -> new
voxel = inv(new_affine) @ old_affine on pixel centres (edge - 0.5, + 0.5
back), the convention of the data contracts.

Slice selection (config `slices.mode`):

- `mid` (default): the central slice along the left-right axis (index
  n // 2 of the n slices, counted in canonical order so it does not depend
  on how the series was stored) +- `slices.half_width`, for every patient.
  Normal patients contribute the same images as the others, without boxes.
  Annotated slices outside that window are *not* added: which images a
  patient contributes must not depend on its labels, otherwise lesion
  patients would bring extra off-midline images that normal patients never
  bring, the detector could learn "off-midline = lesion", and the test set
  would hold no off-midline negatives to make false positives on. Their
  boxes are accounted for in dropped_boxes.csv (reason `outside_window`).
- `annotated`: every slice that carries at least one usable box (the
  selection of Ma et al.); patients without boxes contribute no images.

Intensity: the whole volume's `slices.window_percentiles` (low, high) are
mapped linearly to 0..255 and clipped.

Boxes are clipped to the image; a box narrower or shorter than
`slices.min_box_px` after clipping is dropped (`smaller_than_min_box_px`),
as are boxes with a label not in `classes` (`unknown_label`), boxes on a
slice outside the volume (`slice_out_of_range`) and boxes entirely outside
the image (`outside_image`). dropped_boxes.csv gives each dropped box in
canonical pixel edges as mapped, before clipping.

One job for the whole cohort, not one per patient: a patient takes about
0.1 s, a process start-up (numpy, nibabel) about 0.6 s, and Snakemake's
scheduling of thousands of per-patient jobs after a checkpoint grows faster
than linearly (benchmarks/README.md). Each patient's files depend only on
that patient, so they are the same for any number of workers.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import multiprocessing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from spinedet import SpinedetError, configure_logging
from spinedet.dataset.canonical import load_canonical, slice_file_name, window_to_uint8, write_png
from spinedet.io import read_csv, write_csv, write_json

log = logging.getLogger(__name__)

SLICE_MODES = ("mid", "annotated")
DROPPED_COLUMNS = [
    "patient",
    "label",
    "volume_slice",
    "slice_index",
    "x_min",
    "y_min",
    "x_max",
    "y_max",
    "reason",
]


@dataclass(frozen=True)
class SliceBox:
    """A box in canonical pixel-edge coordinates of canonical slice `slice_index`."""

    label: str
    volume_slice: int  # slice index in the de-identified volume (`slice` in boxes.json)
    slice_index: int
    x_min: float
    y_min: float
    x_max: float
    y_max: float


def map_box(box: dict, slice_axis: int, old_to_new: np.ndarray) -> SliceBox:
    """Map one voxel box of boxes.json to canonical slice pixel edges.

    The box covers voxel index ranges [min, max) on `box["axes"]` of slice
    `box["slice"]` along `slice_axis`; its corners are mapped as pixel
    centres (edge - 0.5) and 0.5 is added back on the new grid.
    """
    axes = [int(a) for a in box["axes"]]
    if sorted([slice_axis, *axes]) != [0, 1, 2]:
        raise SpinedetError(
            f"box axes {axes} with slice_axis {slice_axis} are not the three volume axes"
        )
    corners = []
    for first in (box["min"][0] - 0.5, box["max"][0] - 0.5):
        for second in (box["min"][1] - 0.5, box["max"][1] - 0.5):
            voxel = np.zeros(4)
            voxel[slice_axis] = box["slice"]
            voxel[axes[0]] = first
            voxel[axes[1]] = second
            voxel[3] = 1.0
            corners.append(old_to_new @ voxel)
    corners = np.array(corners)[:, :3]
    return SliceBox(
        label=str(box["label"]),
        volume_slice=int(box["slice"]),
        slice_index=int(np.rint(corners[:, 0].mean())),
        x_min=round(float(corners[:, 2].min()) + 0.5, 3),
        y_min=round(float(corners[:, 1].min()) + 0.5, 3),
        x_max=round(float(corners[:, 2].max()) + 0.5, 3),
        y_max=round(float(corners[:, 1].max()) + 0.5, 3),
    )


def select_slices(n_slices: int, mode: str, half_width: int, annotated: set[int]) -> list[int]:
    """Canonical slice indices to write, ascending (see the module docstring)."""
    if mode == "mid":
        centre = n_slices // 2
        return list(range(max(0, centre - half_width), min(n_slices, centre + half_width + 1)))
    if mode == "annotated":
        return sorted(i for i in annotated if 0 <= i < n_slices)
    raise SpinedetError(f"config slices.mode must be one of {SLICE_MODES}, got {mode!r}")


def clip_box(box: SliceBox, width: int, height: int) -> SliceBox:
    return SliceBox(
        label=box.label,
        volume_slice=box.volume_slice,
        slice_index=box.slice_index,
        x_min=min(max(box.x_min, 0.0), width),
        y_min=min(max(box.y_min, 0.0), height),
        x_max=min(max(box.x_max, 0.0), width),
        y_max=min(max(box.y_max, 0.0), height),
    )


def drop_reason(box: SliceBox, classes: list[str], n_slices: int, min_box_px: float) -> str | None:
    """Why `box` (already clipped to the image) can never go into the COCO, or None."""
    if box.label not in classes:
        return "unknown_label"
    if not 0 <= box.slice_index < n_slices:
        return "slice_out_of_range"
    if box.x_max <= box.x_min or box.y_max <= box.y_min:
        return "outside_image"
    if box.x_max - box.x_min < min_box_px or box.y_max - box.y_min < min_box_px:
        return "smaller_than_min_box_px"
    return None


def read_boxes(path: Path) -> dict:
    try:
        boxes = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SpinedetError(f"cannot read boxes file {path}: {exc}") from exc
    missing = [key for key in ("pseudonym", "group", "slice_axis", "boxes") if key not in boxes]
    if missing:
        raise SpinedetError(f"boxes file {path} lacks keys {missing}")
    return boxes


def write_patient_slices(volume_path: Path, boxes_path: Path, out_dir: Path, config: dict) -> dict:
    """Write one patient's PNG slices, coco.json and dropped_boxes.csv; return the COCO dict."""
    volume_path, boxes_path, out_dir = Path(volume_path), Path(boxes_path), Path(out_dir)
    settings = config["slices"]
    classes = list(config["classes"])
    boxes_doc = read_boxes(boxes_path)
    pseudonym, group = str(boxes_doc["pseudonym"]), str(boxes_doc["group"])
    if not volume_path.name.startswith(f"sub-{pseudonym}_"):
        raise SpinedetError(f"volume {volume_path.name} does not belong to sub-{pseudonym} ({boxes_path})")

    _, volume = load_canonical(volume_path)
    n_slices, height, width = volume.data.shape

    slice_axis = int(boxes_doc["slice_axis"])
    if boxes_doc["boxes"] and slice_axis != volume.source_lr_axis:
        raise SpinedetError(
            f"{boxes_path}: slice_axis {slice_axis} is not the volume's left-right axis "
            f"({volume.source_lr_axis}); boxes cannot be shown on sagittal slices"
        )
    min_box_px = float(settings["min_box_px"])
    usable: list[tuple[SliceBox, SliceBox]] = []  # (as mapped, clipped to the image)
    dropped: list[tuple[SliceBox, str]] = []  # boxes as mapped, before clipping
    for box in (map_box(b, slice_axis, volume.old_to_new) for b in boxes_doc["boxes"]):
        clipped = clip_box(box, width, height)
        reason = drop_reason(clipped, classes, n_slices, min_box_px)
        if reason is None:
            usable.append((box, clipped))
        else:
            dropped.append((box, reason))

    selected = select_slices(
        n_slices, settings["mode"], int(settings["half_width"]), {b.slice_index for b, _ in usable}
    )
    kept = [clipped for box, clipped in usable if box.slice_index in selected]
    dropped += [(box, "outside_window") for box, _ in usable if box.slice_index not in selected]
    for box, reason in dropped:
        level = logging.INFO if reason == "outside_window" else logging.WARNING
        log.log(level, "sub-%s: dropped %s box on slice %d: %s", pseudonym, box.label, box.slice_index, reason)

    patient_dir = out_dir / f"sub-{pseudonym}"
    patient_dir.mkdir(parents=True, exist_ok=True)
    for stale in patient_dir.glob(f"sub-{pseudonym}_slice-*.png"):
        stale.unlink()

    pixels = window_to_uint8(volume.data, list(settings["window_percentiles"]))
    # mm per pixel along the canonical rows (height) and columns (width), from the affine
    spacing = np.linalg.norm(volume.affine[:3, :3], axis=0)
    images, annotations = [], []
    for image_id, slice_index in enumerate(selected, start=1):
        file_name = slice_file_name(pseudonym, slice_index, n_slices)
        write_png(out_dir / file_name, pixels[slice_index])
        images.append(
            {
                "id": image_id,
                "file_name": file_name,
                "width": width,
                "height": height,
                "patient": pseudonym,
                "group": group,
                "slice_index": slice_index,
                "pixel_height_mm": round(float(spacing[1]), 6),
                "pixel_width_mm": round(float(spacing[2]), 6),
            }
        )
        for box in (b for b in kept if b.slice_index == slice_index):
            w, h = box.x_max - box.x_min, box.y_max - box.y_min
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": classes.index(box.label) + 1,
                    "bbox": [box.x_min, box.y_min, round(w, 3), round(h, 3)],
                    "area": round(w * h, 3),
                    "iscrowd": 0,
                }
            )
    coco = {
        "info": {"patient": pseudonym, "group": group, "slice_mode": settings["mode"]},
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": i, "name": name, "supercategory": "lesion"} for i, name in enumerate(classes, start=1)
        ],
    }
    write_json(patient_dir / "coco.json", coco, sort_keys=True)
    write_dropped(patient_dir / "dropped_boxes.csv", pseudonym, dropped)
    log.info(
        "sub-%s: %d slices, %d boxes kept, %d dropped", pseudonym, len(images), len(annotations), len(dropped)
    )
    return coco


def write_dropped(path: Path, pseudonym: str, dropped: list[tuple[SliceBox, str]]) -> None:
    rows = [dict(zip(DROPPED_COLUMNS, [pseudonym, box.label, box.volume_slice, box.slice_index, box.x_min,
                                       box.y_min, box.x_max, box.y_max, reason]))
            for box, reason in dropped]
    write_csv(path, rows, DROPPED_COLUMNS)


def patient_inputs(participants: Path) -> list[tuple[Path, Path]]:
    """(volume, boxes) of every patient in deidentify's participants.csv, in its
    order; the files sit beside it, in the de-identified tree."""
    deid = Path(participants).parent
    pairs = []
    for row in read_csv(participants):
        subject = f"sub-{row['pseudonym']}"
        volumes = sorted((deid / subject / "anat").glob(f"{subject}_*.nii.gz"))
        if len(volumes) != 1:
            raise SpinedetError(
                f"{participants} lists {subject}, but {deid / subject / 'anat'} holds "
                f"{len(volumes)} volumes, not 1: rerun deidentify")
        pairs.append((volumes[0], deid / subject / f"{subject}_boxes.json"))
    return pairs


def _slice_job(pair: tuple[Path, Path], out_dir: Path, config: dict) -> int:
    return len(write_patient_slices(pair[0], pair[1], out_dir, config)["images"])


def write_all_slices(participants: Path, out_dir: Path, config: dict, workers: int = 1) -> int:
    """Slices of every patient in participants.csv; returns the number of PNGs."""
    pairs = patient_inputs(participants)
    if not pairs:
        raise SpinedetError(
            f"{participants} lists no patient: nothing to slice (see annotation_issues.csv beside it "
            "and restricted/inventory/selection.csv for why every patient was left out)")
    job = functools.partial(_slice_job, out_dir=Path(out_dir), config=config)
    progress = functools.partial(tqdm, total=len(pairs), desc="slices", unit="patient")
    workers = max(1, min(int(workers), len(pairs)))
    if workers == 1:
        images = [job(pair) for pair in progress(pairs)]
    else:
        level = logging.getLogger("spinedet").getEffectiveLevel()
        with multiprocessing.get_context("spawn").Pool(workers, configure_logging, (level,)) as pool:
            images = list(progress(pool.imap(job, pairs)))
    log.info("%d patients, %d slices written to %s", len(pairs), sum(images), out_dir)
    return sum(images)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from spinedet.config import add_config_argument

    add_config_argument(parser)
    parser.add_argument("--participants", required=True, type=Path,
                        help="participants.csv of the de-identified tree (results/deid/participants.csv)")
    parser.add_argument("--out", required=True, type=Path, help="slices root, e.g. results/slices")
    parser.add_argument("--workers", type=int, default=1,
                        help="patients sliced in parallel (same files for any count)")


def run(args: argparse.Namespace) -> int:
    from spinedet.config import load

    config = load(args.config)
    write_all_slices(args.participants, args.out, config, args.workers)
    return 0
