"""A volume in canonical sagittal orientation, and its 8-bit window.

The reorientation is derived from the NIfTI affine with nibabel
(`io_orientation` -> `ornt_transform` -> `apply_orientation`), so a volume
stored in any axis order, with any flips, or a few degrees oblique (the
nearest axes are used), comes out the same: voxel axis 0 from the patient's
left to right (the slice axis), axis 1 from superior to inferior (image
rows), axis 2 from anterior to posterior (image columns). Shared by
`spinedet slices`, `spinedet export-for-annotation` and `spinedet predict`,
as are the slices' PNG file names and their writer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform
from PIL import Image

from spinedet import SpinedetError

# Direction each canonical voxel axis increases towards (nibabel axis codes):
# left -> right (slices), superior -> inferior (rows), anterior -> posterior (columns).
CANONICAL_AXCODES = ("R", "I", "P")

@dataclass(frozen=True)
class CanonicalVolume:
    """A volume in canonical orientation and the map from its original voxels."""

    data: np.ndarray  # (left->right, superior->inferior, anterior->posterior)
    affine: np.ndarray  # canonical voxel -> RAS mm
    old_to_new: np.ndarray  # 4x4: original voxel -> canonical voxel
    source_lr_axis: int  # the original voxel axis that became the slice axis


def to_canonical(image: nib.spatialimages.SpatialImage) -> CanonicalVolume:
    """Reorient a 3-D image so that its voxel axes follow CANONICAL_AXCODES."""
    data = np.asanyarray(image.get_fdata(dtype=np.float32))
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise SpinedetError(f"expected a 3-D volume, got shape {data.shape}")
    current = io_orientation(image.affine)
    transform = ornt_transform(current, axcodes2ornt(CANONICAL_AXCODES))
    new_affine = image.affine @ inv_ornt_aff(transform, data.shape)
    old_to_new = np.linalg.inv(new_affine) @ image.affine
    source_lr_axis = int(np.flatnonzero(current[:, 0] == 0)[0])
    return CanonicalVolume(
        data=apply_orientation(data, transform),
        affine=new_affine,
        old_to_new=old_to_new,
        source_lr_axis=source_lr_axis,
    )


def load_canonical(path: Path) -> tuple[np.ndarray, CanonicalVolume]:
    """(the NIfTI's own affine, the volume in canonical orientation); a file nibabel cannot
    read is a SpinedetError naming it."""
    try:
        image = nib.load(path)
    except (OSError, ValueError, nib.filebasedimages.ImageFileError) as exc:
        raise SpinedetError(f"cannot read volume {path}: {exc}") from exc
    return image.affine, to_canonical(image)


def window_to_uint8(data: np.ndarray, percentiles: list[float]) -> np.ndarray:
    """Map the volume's [low, high] percentile window linearly to 0..255."""
    finite = data[np.isfinite(data)]
    if finite.size == 0:
        return np.zeros(data.shape, dtype=np.uint8)
    low, high = np.percentile(finite, percentiles)
    if high <= low:
        return np.zeros(data.shape, dtype=np.uint8)
    scaled = (np.nan_to_num(data, nan=low) - low) / (high - low) * 255.0
    return np.rint(np.clip(scaled, 0.0, 255.0)).astype(np.uint8)


def slice_file_name(pseudonym: str, slice_index: int, n_slices: int) -> str:
    """`sub-<p>/sub-<p>_slice-KK.png`: the pseudonym and the canonical slice index only."""
    digits = max(2, len(str(n_slices - 1)))
    return f"sub-{pseudonym}/sub-{pseudonym}_slice-{slice_index:0{digits}d}.png"


def write_png(path: Path, pixels: np.ndarray) -> None:
    """Write an 8-bit grayscale PNG with no text or other metadata chunks."""
    Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8)).save(path, format="PNG")
