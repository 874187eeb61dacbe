"""The synthetic cohort as a BIDS dataset (`demo.export_format: bids`).

Each patient's sagittal T2 is written as NIfTI straight from the phantom's
voxels and geometry (no DICOM, no dcm2niix: the other path to the same
pixels), with its lesion masks as a discrete segmentation under
derivatives/labels, as ITK-SNAP or FSLeyes users keep them:

    BIDS/dataset_description.json, participants.tsv (participant_id, group)
    BIDS/sub-<id>/anat/sub-<id>_T2w.nii.gz (+ .json sidecar)
    BIDS/derivatives/labels/dataset_description.json, dseg.tsv (index, name)
    BIDS/derivatives/labels/sub-<id>/anat/sub-<id>_T2w_dseg.nii.gz

The affine maps voxel (column, row, slice) through ImagePositionPatient,
ImageOrientationPatient, PixelSpacing and the slice step to RAS. To exercise
readers in any voxel order, every second patient is stored reoriented to
the nearest RAS axes, and every third patient's mask is stored in another
voxel order than its image (a mask on another grid, resampled exactly).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np

from spinedet.geometry import LPS_TO_RAS, pixel_to_lps_matrix

BIDS_FOLDER = "BIDS"
DERIVATIVE = "derivatives/labels"
BIDS_VERSION = "1.9.0"


def bids_label_name(class_name: str) -> str:
    """A class name as a BIDS label (alphanumeric): disc_herniation -> discherniation."""
    return re.sub(r"[^a-zA-Z0-9]", "", class_name)


def voxel_to_ras_affine(ipp_first, iop, pixel_spacing, slice_step: float) -> np.ndarray:
    """Voxel (column, row, spatial slice k) -> RAS mm, from the DICOM geometry."""
    to_lps = pixel_to_lps_matrix(ipp_first, iop, pixel_spacing)
    to_lps[:3, 2] *= slice_step
    return LPS_TO_RAS @ to_lps


def write_dataset_files(root: Path, participants: Sequence[tuple[str, str]], classes: Sequence[str]) -> None:
    """dataset_description.json and participants.tsv of the raw dataset, and the derivative's
    description and dseg.tsv."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(json.dumps(
        {"Name": "spinedet synthetic cervical spine MRI", "BIDSVersion": BIDS_VERSION, "DatasetType": "raw"},
        indent=2) + "\n")
    lines = ["participant_id\tgroup"] + [f"sub-{subject}\t{group}" for subject, group in participants]
    (root / "participants.tsv").write_text("\n".join(lines) + "\n")
    derivative = root / DERIVATIVE
    derivative.mkdir(parents=True, exist_ok=True)
    (derivative / "dataset_description.json").write_text(json.dumps(
        {"Name": "lesion masks", "BIDSVersion": BIDS_VERSION, "DatasetType": "derivative",
         "GeneratedBy": [{"Name": "spinedet synthesize"}]}, indent=2) + "\n")
    table = ["index\tname"] + [f"{index}\t{bids_label_name(name)}" for index, name in enumerate(classes, start=1)]
    (derivative / "dseg.tsv").write_text("\n".join(table) + "\n")


def write_subject(root: Path, subject: str, index: int, volume: np.ndarray, masks: np.ndarray,
                  labels: Sequence[str], classes: Sequence[str], geometry, sidecar: dict) -> int:
    """Write one subject's image, sidecar and dseg; returns the number of files.

    `volume` (n_slices, rows, columns) and `masks` (n_lesions, n_slices, rows, columns)
    as the phantom renders them; `labels` the class of each lesion."""
    affine = voxel_to_ras_affine(geometry.ipp_first, geometry.iop, geometry.pixel_spacing, geometry.slice_step)
    image = nib.Nifti1Image(np.transpose(volume, (2, 1, 0)).astype(np.uint16), affine)
    dseg = np.zeros(image.shape, dtype=np.uint8)
    for lesion, label in enumerate(labels):
        dseg[np.transpose(masks[lesion], (2, 1, 0))] = list(classes).index(label) + 1
    segmentation = nib.Nifti1Image(dseg, affine)
    if index % 2 == 1:
        image, segmentation = nib.as_closest_canonical(image), nib.as_closest_canonical(segmentation)
    if index % 3 == 2:
        # the mask in another voxel order than its image: the reader must resample it
        flipped = nib.orientations.axcodes2ornt(("L", "P", "S"))
        segmentation = segmentation.as_reoriented(
            nib.orientations.ornt_transform(nib.orientations.io_orientation(segmentation.affine), flipped))
    for written in (image, segmentation):
        written.header.set_xyzt_units("mm")
        written.header.set_qform(written.affine, code=1)
        written.header.set_sform(written.affine, code=1)
    anat = Path(root) / f"sub-{subject}" / "anat"
    anat.mkdir(parents=True, exist_ok=True)
    _save(image, anat / f"sub-{subject}_T2w.nii.gz")
    (anat / f"sub-{subject}_T2w.json").write_text(json.dumps(sidecar, indent=2, sort_keys=True) + "\n")
    labels_dir = Path(root) / DERIVATIVE / f"sub-{subject}" / "anat"
    labels_dir.mkdir(parents=True, exist_ok=True)
    _save(segmentation, labels_dir / f"sub-{subject}_T2w_dseg.nii.gz")
    return 3


def _save(image: nib.Nifti1Image, path: Path) -> None:
    """gzip without a time stamp, so the same seed writes the same bytes."""
    import gzip

    path.write_bytes(gzip.compress(image.to_bytes(), compresslevel=6, mtime=0))
