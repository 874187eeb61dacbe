"""Image geometry: DICOM pixel <-> patient LPS <-> RAS <-> NIfTI voxel.

Pure functions on numpy arrays, no I/O. Conventions:

- DICOM pixel index coordinates `(col, row)`: pixel centres sit on integers,
  `col` runs along the first ImageOrientationPatient vector (the direction
  of a row), `row` along the second. PixelSpacing is `(row_spacing,
  col_spacing)`: the distance between rows, then between columns.
- Patient coordinates: DICOM uses LPS (x to the patient's left, y posterior,
  z superior); NIfTI affines map voxel indices to RAS. The two differ by
  negating x and y.
- Boxes use pixel-edge coordinates (pixel `c` covers `[c, c+1)`), as in
  docs/data-contracts.md; a box edge `e` is the index coordinate `e - 0.5`.

No function assumes a flip or a slice order: everything goes through the
ImagePositionPatient / ImageOrientationPatient / PixelSpacing of the
instance and the affine of the volume.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# A plane is called sagittal/coronal/axial when its normal is within 30° of
# the corresponding patient axis; beyond that it is oblique.
PLANE_MIN_COSINE = math.cos(math.radians(30.0))
PLANE_BY_AXIS = ("sagittal", "coronal", "axial")  # normal along L-R, A-P, S-I

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])  # its own inverse

# How far (in voxels) a mapped box's slice may sit from a voxel slice before
# we call the volume and the annotation inconsistent. In-plane edges are
# continuous coordinates (annotation tools export decimal pixels): not snapped.
GRID_TOLERANCE = 0.1
# In-plane edges this close to the grid are written as whole voxels.
ON_GRID = 1e-4


class GeometryError(ValueError):
    """An annotation cannot be mapped consistently onto the voxel grid."""


def _as_points(points, width: int) -> np.ndarray:
    array = np.asarray(points, dtype=float)
    if array.shape[-1] != width:
        raise ValueError(f"expected points with {width} coordinates, got shape {array.shape}")
    return array.reshape(-1, width)


def orientation_vectors(iop) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit row direction, column direction and slice normal (row x column) of an IOP."""
    iop = np.asarray(iop, dtype=float)
    if iop.shape != (6,):
        raise ValueError(f"ImageOrientationPatient needs 6 values, got {iop.tolist()}")
    row_dir = iop[:3] / np.linalg.norm(iop[:3])
    col_dir = iop[3:] / np.linalg.norm(iop[3:])
    normal = np.cross(row_dir, col_dir)
    return row_dir, col_dir, normal / np.linalg.norm(normal)


def slice_normal(iop) -> np.ndarray:
    """Unit normal of the image plane, cross(row direction, column direction), in LPS."""
    return orientation_vectors(iop)[2]


def orientation_label(iop, min_cosine: float = PLANE_MIN_COSINE) -> str:
    """'sagittal', 'coronal' or 'axial' when the normal is close to that axis, else 'oblique'."""
    normal = np.abs(slice_normal(iop))
    axis = int(np.argmax(normal))
    return PLANE_BY_AXIS[axis] if normal[axis] >= min_cosine else "oblique"


def pixel_to_lps_matrix(ipp, iop, pixel_spacing) -> np.ndarray:
    """4x4 matrix taking `(col, row, offset_mm, 1)` of one instance to LPS.

    The third coordinate is a distance in mm along the slice normal, so the
    matrix is invertible and `lps_to_pixel` can report how far a point lies
    off the image plane.
    """
    row_dir, col_dir, normal = orientation_vectors(iop)
    row_spacing, col_spacing = (float(v) for v in pixel_spacing)
    matrix = np.eye(4)
    matrix[:3, 0] = row_dir * col_spacing
    matrix[:3, 1] = col_dir * row_spacing
    matrix[:3, 2] = normal
    matrix[:3, 3] = np.asarray(ipp, dtype=float)
    return matrix


def apply_affine(matrix: np.ndarray, points) -> np.ndarray:
    """Apply a 4x4 homogeneous matrix to an (N, 3) array of points."""
    points = _as_points(points, 3)
    return points @ matrix[:3, :3].T + matrix[:3, 3]


def pixel_to_lps(points, ipp, iop, pixel_spacing) -> np.ndarray:
    """Pixel index coordinates `(col, row)`, shape (N, 2), to LPS mm, shape (N, 3)."""
    points = _as_points(points, 2)
    in_plane = np.column_stack([points, np.zeros(len(points))])
    return apply_affine(pixel_to_lps_matrix(ipp, iop, pixel_spacing), in_plane)


def lps_to_pixel(points, ipp, iop, pixel_spacing) -> np.ndarray:
    """LPS mm, shape (N, 3), to `(col, row, offset_mm)` of one instance."""
    inverse = np.linalg.inv(pixel_to_lps_matrix(ipp, iop, pixel_spacing))
    return apply_affine(inverse, points)


def lps_to_ras(points) -> np.ndarray:
    """Negate x and y: DICOM patient coordinates to NIfTI world coordinates."""
    return apply_affine(LPS_TO_RAS, points)


def ras_to_lps(points) -> np.ndarray:
    return apply_affine(LPS_TO_RAS, points)


def ras_to_voxel(points, affine) -> np.ndarray:
    """RAS mm to continuous voxel index coordinates through the inverse affine."""
    return apply_affine(np.linalg.inv(np.asarray(affine, dtype=float)), points)


def voxel_to_ras(points, affine) -> np.ndarray:
    return apply_affine(np.asarray(affine, dtype=float), points)


def pixel_to_voxel(points, ipp, iop, pixel_spacing, affine) -> np.ndarray:
    """DICOM pixel `(col, row)` of one instance to continuous NIfTI voxel indices."""
    return ras_to_voxel(lps_to_ras(pixel_to_lps(points, ipp, iop, pixel_spacing)), affine)


def voxel_to_pixel(points, ipp, iop, pixel_spacing, affine) -> np.ndarray:
    """NIfTI voxel indices to `(col, row, offset_mm)` on one DICOM instance."""
    return lps_to_pixel(ras_to_lps(voxel_to_ras(points, affine)), ipp, iop, pixel_spacing)


def acquisition_plane(affine: np.ndarray) -> tuple[str, list[float]]:
    """The plane a volume's slices were acquired in, and its voxel sizes in mm.

    The slices lie across the thickest voxel axis; its direction in the world
    names the plane (along L-R: sagittal, A-P: coronal, S-I: axial).
    `isotropic` when no axis is at least 1.5x thicker than the others: such a
    volume reformats to sagittal slices without loss.
    """
    columns = np.asarray(affine, dtype=float)[:3, :3]
    sizes = np.linalg.norm(columns, axis=0)
    thick = int(np.argmax(sizes))
    if sizes[thick] < 1.5 * np.delete(sizes, thick).max():
        return "isotropic", [round(float(v), 3) for v in sizes]
    direction = np.abs(columns[:, thick]) / sizes[thick]
    world = int(np.argmax(direction))
    plane = PLANE_BY_AXIS[world] if direction[world] >= PLANE_MIN_COSINE else "oblique"
    return plane, [round(float(v), 3) for v in sizes]


def volume_slice_axis(iop, affine) -> int:
    """The voxel axis of `affine` that runs along the slice normal of `iop`."""
    normal_ras = LPS_TO_RAS[:3, :3] @ slice_normal(iop)
    columns = np.asarray(affine, dtype=float)[:3, :3]
    cosines = np.abs(normal_ras @ columns) / np.linalg.norm(columns, axis=0)
    return int(np.argmax(cosines))


@dataclass(frozen=True)
class VoxelBox:
    """A box on one voxel slice: index ranges `[min, max)` on the in-plane `axes`."""

    slice_axis: int
    slice: int
    axes: tuple[int, int]
    min: tuple[float, float]  # edges, whole voxels written as int
    max: tuple[float, float]

    def as_dict(self) -> dict:
        return {
            "slice": self.slice,
            "min": list(self.min),
            "max": list(self.max),
            "axes": list(self.axes),
        }


def _snap(values: np.ndarray, what: str, tolerance: float) -> np.ndarray:
    snapped = np.round(values)
    worst = float(np.max(np.abs(values - snapped)))
    if worst > tolerance:
        raise GeometryError(f"{what} is {worst:.2f} voxel off the voxel grid (tolerance {tolerance})")
    return snapped.astype(int)


def _edges(values: np.ndarray) -> tuple:
    """Continuous edge coordinates to 1e-3 voxel; whole voxels (within rounding) as int."""
    return tuple(int(round(v)) if abs(v - round(v)) <= ON_GRID else round(float(v), 3) for v in values)


def pixel_box_to_voxel_box(
    box, ipp, iop, pixel_spacing, affine, shape=None, tolerance: float = GRID_TOLERANCE
) -> VoxelBox:
    """Map a pixel-edge box `(x_min, y_min, x_max, y_max)` of one instance to voxels.

    The four corners go through the geometry as index coordinates (edge -
    0.5); the axis on which all four agree is the slice axis, the other two
    carry the box, back in edge coordinates (+ 0.5). Raises GeometryError if
    the box is empty, its corners do not lie on one voxel slice (within
    `tolerance`), or (when the volume `shape` is given) it falls outside the
    volume. In-plane edges stay continuous: a decimal pixel edge maps to a
    decimal voxel edge.
    """
    x_min, y_min, x_max, y_max = (float(v) for v in box)
    if not (x_max > x_min and y_max > y_min):
        raise GeometryError(f"empty or inverted box {list(box)}")
    corners = np.array(
        [[x_min, y_min], [x_max, y_min], [x_min, y_max], [x_max, y_max]], dtype=float
    )
    voxels = pixel_to_voxel(corners - 0.5, ipp, iop, pixel_spacing, affine)
    spread = voxels.max(axis=0) - voxels.min(axis=0)
    slice_axis = int(np.argmin(spread))
    if spread[slice_axis] > tolerance:
        raise GeometryError(
            "the box does not lie on one voxel slice: the image plane is not a plane of the volume"
        )
    slice_index = int(_snap(np.array([voxels[:, slice_axis].mean()]), "the slice", tolerance)[0])
    axes = tuple(axis for axis in range(3) if axis != slice_axis)
    edges = voxels[:, axes] + 0.5
    low, high = _edges(edges.min(axis=0)), _edges(edges.max(axis=0))
    if shape is not None:
        size = [int(shape[axis]) for axis in axes]
        if not 0 <= slice_index < int(shape[slice_axis]) or any(
            low[i] < 0 or high[i] > size[i] for i in range(2)
        ):
            raise GeometryError(f"the mapped box falls outside the volume of shape {tuple(shape)[:3]}")
    return VoxelBox(
        slice_axis=slice_axis,
        slice=slice_index,
        axes=(int(axes[0]), int(axes[1])),
        min=low,
        max=high,
    )
