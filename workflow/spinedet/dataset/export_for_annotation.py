"""`spinedet export-for-annotation`: the study's slices as a labelling task for CVAT or Label Studio.

Reads the de-identified volumes (`--participants`: results/deid/participants.csv,
and each patient's `sub-<p>/anat/sub-<p>_<suffix>.nii.gz` beside it: the volume
and affine `spinedet slices` cut the slices from; deidentify copies dcm2niix's
voxels and affine unchanged), the slices (`--slices`: results/slices, each
patient's coco.json and PNGs), and from restricted/: `--pseudonyms`
(pseudonyms.csv: pseudonym -> patient_id), `--conversions` (conversions.csv:
the patient's converted series) and `--files` (the inventory's files.csv: that
series' images and their geometry). Writes:

- `--images` (results/annotation_export/images/): `sub-<p>/sub-<p>_slice-KK.png`,
  the study's slice PNGs (those in the slices' COCO files), copied byte for
  byte; with `--all-slices` every slice of every volume, windowed and written
  as `spinedet slices` writes them. Pseudonymous names, no PNG text chunks.
- `--coco` (results/annotation_export/coco.json): COCO (`images` with
  `file_name` relative to the images folder, `annotations`, `categories` with
  ids 1..n in `classes` order), the study's boxes as pre-annotations in
  canonical pixel edges [x, y, w, h]: the task CVAT ("COCO 1.0") and Label
  Studio import. No PHI.
- `--manifest` (restricted/annotation_export/manifest.csv): one row per PNG:
  `file_name, pseudonym, patient_id, study_uid, series_uid, sop_instance_uid,
  instance_number, frame_number` (Enhanced MR), `slice_index, width, height`
  and `a11, a12, a13, a21, a22, a23`, the affine from canonical pixel edges
  (x = column, y = row) to pixel edges of the DICOM image the slice lies on:
  DICOM x = a11 x + a12 y + a13, DICOM y = a21 x + a22 y + a23. A copy of it
  beside the COCO file the tool exports is what `spinedet annotations --coco
  --manifest` reads to bring the boxes drawn on the PNGs back to DICOM.

The transform comes from the geometry, never from an assumed flip: canonical
pixel -> canonical voxel -> the volume's voxel (the inverse of the
reorientation `spinedet slices` applies) -> the DICOM image (instance, or frame
of an Enhanced MR instance) whose plane holds the slice within half the slice
spacing, through ImagePositionPatient, ImageOrientationPatient, PixelSpacing
and the NIfTI affine: `spinedet.ingest.dicom.InstanceLocator`, which `spinedet
predict` maps its detections back with. The affine is fitted by least squares
to the slice's corners and centre; a slice whose mapped points leave the fit
by RESIDUAL_PX or more, or that lies on no DICOM image, is left out with a
warning in the log.
"""

from __future__ import annotations

import argparse
import logging
from collections import defaultdict
from pathlib import Path

import numpy as np
from tqdm import tqdm

from spinedet import SpinedetError
from spinedet.dataset.canonical import load_canonical, slice_file_name, window_to_uint8, write_png
from spinedet.ingest.dicom import InstanceLocator
from spinedet.io import copy_file, read_csv, read_json, write_atomically, write_csv, write_json

log = logging.getLogger(__name__)

AFFINE_COLUMNS = ["a11", "a12", "a13", "a21", "a22", "a23"]
MANIFEST_COLUMNS = ["file_name", "pseudonym", "patient_id", "study_uid", "series_uid", "sop_instance_uid",
                    "instance_number", "frame_number", "slice_index", "width", "height", *AFFINE_COLUMNS]
# The largest distance (px) a mapped point of a slice may lie from its fitted affine.
RESIDUAL_PX = 0.01
AFFINE_DECIMALS = 6


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from spinedet.config import add_config_argument

    add_config_argument(parser)
    parser.add_argument("--participants", required=True, type=Path,
                        help="participants.csv of the de-identified tree (results/deid/participants.csv)")
    parser.add_argument("--slices", required=True, type=Path, help="slices root (results/slices)")
    parser.add_argument("--pseudonyms", required=True, type=Path, help="restricted pseudonyms.csv")
    parser.add_argument("--conversions", required=True, type=Path, help="restricted conversions.csv")
    parser.add_argument("--files", required=True, type=Path, help="restricted inventory files.csv")
    parser.add_argument("--images", required=True, type=Path,
                        help="folder of the exported PNGs (results/annotation_export/images)")
    parser.add_argument("--coco", required=True, type=Path,
                        help="the task's COCO file (results/annotation_export/coco.json)")
    parser.add_argument("--manifest", required=True, type=Path,
                        help="restricted manifest.csv: each PNG's DICOM image and pixel transform")
    parser.add_argument("--all-slices", action="store_true",
                        help="every slice of every volume, not only the slices the study uses")


def volume_of(deid: Path, pseudonym: str) -> Path:
    """The one de-identified volume of sub-<pseudonym>."""
    subject = f"sub-{pseudonym}"
    volumes = sorted((deid / subject / "anat").glob(f"{subject}_*.nii.gz"))
    if len(volumes) != 1:
        raise SpinedetError(f"{deid / subject / 'anat'} holds {len(volumes)} volumes, not 1: rerun deidentify")
    return volumes[0]


def series_images(conversions: list[dict], file_rows: list[dict]) -> dict[str, tuple[str, list[dict]]]:
    """patient_id -> (converted series UID, that series' ok image rows of files.csv)."""
    by_series: dict[str, list[dict]] = defaultdict(list)
    for row in file_rows:
        if row["status"] == "ok" and row["kind"] == "image":
            by_series[row["series_uid"]].append(row)
    return {c["patient_id"]: (c["series_uid"], by_series.get(c["series_uid"], []))
            for c in conversions if c["status"] == "converted"}


def manifest_row(file_name: str, pseudonym: str, patient_id: str, instance: dict, image: dict, slice_index: int,
                 width: int, height: int, affine: np.ndarray) -> dict:
    frame = image["frame_number"]
    return {
        "file_name": file_name, "pseudonym": pseudonym, "patient_id": patient_id,
        "study_uid": instance["study_uid"], "series_uid": instance["series_uid"],
        "sop_instance_uid": image["sop_instance_uid"],
        "instance_number": "" if image["instance_number"] is None else image["instance_number"],
        "frame_number": "" if frame is None else frame,
        "slice_index": slice_index, "width": width, "height": height,
        **{name: round(float(value), AFFINE_DECIMALS) + 0.0 for name, value in zip(AFFINE_COLUMNS, affine.ravel())},
    }


def export_patient(pseudonym: str, patient_id: str, volume_path: Path, patient_coco: dict, files: list[dict],
                   slices_root: Path, images_dir: Path, config: dict, all_slices: bool) -> tuple[list, list, int]:
    """Write one patient's PNGs; returns (manifest rows, pre-annotations as (file_name, label, bbox),
    slices left out)."""
    classes = list(config["classes"])
    affine, volume = load_canonical(volume_path)
    n_slices, height, width = volume.data.shape
    locator = InstanceLocator(files, affine, np.linalg.inv(volume.old_to_new))
    by_uid = {row["sop_instance_uid"]: row for row in files}

    labels = {category["id"]: category["name"] for category in patient_coco.get("categories", [])}
    study_images = {img["slice_index"]: img for img in patient_coco["images"]}
    boxes_of = defaultdict(list)
    for ann in patient_coco["annotations"]:
        if labels.get(ann["category_id"]) in classes:
            boxes_of[ann["image_id"]].append((labels[ann["category_id"]], ann["bbox"]))
    chosen = range(n_slices) if all_slices else sorted(study_images)
    pixels = window_to_uint8(volume.data, list(config["slices"]["window_percentiles"])) if all_slices else None

    rows, annotations = [], []
    for slice_index in chosen:
        file_name = slice_file_name(pseudonym, slice_index, n_slices)
        found = locator.pixel_transform(slice_index, width, height)
        if found is None:
            log.warning("sub-%s slice %d: no DICOM image of the series lies on it; left out", pseudonym, slice_index)
            continue
        plane, affine, residual = found
        if residual >= RESIDUAL_PX:
            log.warning("sub-%s slice %d: no single affine transform takes its pixels onto the DICOM image "
                        "(%.3f px off the fit, at most %g allowed); left out", pseudonym, slice_index, residual,
                        RESIDUAL_PX)
            continue
        if all_slices:
            write_atomically(images_dir / file_name, lambda tmp: write_png(tmp, pixels[slice_index]))
        else:
            study_name = study_images[slice_index]["file_name"]
            if study_name != file_name:
                raise SpinedetError(f"{slices_root / f'sub-{pseudonym}' / 'coco.json'} names slice {slice_index} "
                                    f"{study_name}, not {file_name}: rerun slices")
            copy_file(slices_root / study_name, images_dir / file_name)
        rows.append(manifest_row(file_name, pseudonym, patient_id, by_uid[plane["sop_instance_uid"]], plane,
                                 slice_index, width, height, affine))
        if slice_index in study_images:
            annotations += [(file_name, label, bbox) for label, bbox in boxes_of[study_images[slice_index]["id"]]]
    return rows, annotations, len(chosen) - len(rows)


def export(participants: Path, slices_root: Path, pseudonyms: Path, conversions: Path, files: Path,
           images_dir: Path, coco_path: Path, manifest_path: Path, config: dict, all_slices: bool = False) -> dict:
    """Write the images, the task's COCO and the manifest; returns counts {"images", "boxes", "left_out"}."""
    participants, slices_root, images_dir = Path(participants), Path(slices_root), Path(images_dir)
    classes = list(config["classes"])
    patient_of = {row["pseudonym"]: row["patient_id"] for row in read_csv(pseudonyms)}
    series_of = series_images(read_csv(conversions), read_csv(files))
    subjects = [row["pseudonym"] for row in read_csv(participants)]
    if not subjects:
        raise SpinedetError(f"{participants} lists no patient: nothing to export")

    manifest, pre_annotations, left_out = [], [], 0
    for pseudonym in tqdm(subjects, desc="export-for-annotation", unit="patient"):
        patient_id = patient_of.get(pseudonym)
        if patient_id is None:
            raise SpinedetError(f"sub-{pseudonym} of {participants.name} is not in {pseudonyms}: rerun deidentify")
        series_uid, series_files = series_of.get(patient_id, ("", []))
        if not series_files:
            raise SpinedetError(f"sub-{pseudonym}: its converted series has no ok image in {files}: rerun "
                                "inventory, convert and deidentify")
        patient_coco = read_json(slices_root / f"sub-{pseudonym}" / "coco.json")
        rows, boxes, skipped = export_patient(pseudonym, patient_id, volume_of(participants.parent, pseudonym),
                                              patient_coco, series_files, slices_root, images_dir, config, all_slices)
        left_out += skipped
        manifest += rows
        pre_annotations += boxes
    if not manifest:
        raise SpinedetError("no slice could be mapped onto a DICOM image of its series: nothing exported (see "
                            "the warnings above)")

    written = {row["file_name"] for row in manifest}
    for stale in images_dir.glob("sub-*/sub-*_slice-*.png"):
        if stale.relative_to(images_dir).as_posix() not in written:
            stale.unlink()

    image_ids = {row["file_name"]: number for number, row in enumerate(manifest, start=1)}
    annotations = []
    for file_name, label, (x, y, w, h) in pre_annotations:
        annotations.append({"id": len(annotations) + 1, "image_id": image_ids[file_name],
                            "category_id": classes.index(label) + 1, "bbox": [x, y, w, h],
                            "area": round(w * h, 3), "iscrowd": 0, "segmentation": []})
    coco = {
        "info": {"description": "spinedet export-for-annotation: canonical sagittal slices (anterior left, "
                                "superior up); boxes are pre-annotations in pixel edges [x, y, w, h]"},
        "licenses": [],
        "images": [{"id": image_ids[row["file_name"]], "file_name": row["file_name"], "width": row["width"],
                    "height": row["height"]} for row in manifest],
        "annotations": annotations,
        "categories": [{"id": i, "name": name, "supercategory": "lesion"} for i, name in enumerate(classes, start=1)],
    }
    write_json(coco_path, coco)
    write_csv(manifest_path, manifest, MANIFEST_COLUMNS)
    return {"images": len(manifest), "boxes": len(annotations), "left_out": left_out}


def run(args: argparse.Namespace) -> int:
    from spinedet.config import load

    config = load(args.config)
    counts = export(args.participants, args.slices, args.pseudonyms, args.conversions, args.files, args.images,
                    args.coco, args.manifest, config, all_slices=args.all_slices)
    log.info("%d slices with %d pre-annotated boxes exported to %s (%d left out: see the warnings); their DICOM "
             "transforms in %s", counts["images"], counts["boxes"], args.images, counts["left_out"], args.manifest)
    return 0
