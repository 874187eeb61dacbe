"""Series geometry, rendering a phantom into a slice stack, and the lesion boxes on it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from spinedet.demo import phantom
from spinedet.demo.dicom_writer import MAX_STORED, slice_normal

# A lesion is annotated on a slice where its mask has at least MIN_BOX_PIXELS
# pixels and at least VISIBLE_FRACTION of its largest cross-section: the thin
# partial-volume tails at its edges are not boxed.
MIN_BOX_PIXELS = 3
VISIBLE_FRACTION = 0.25


@dataclass
class SeriesGeometry:
    """A stack of parallel slices: LPS mm, DICOM conventions."""

    ipp_first: np.ndarray
    iop: np.ndarray
    pixel_spacing: tuple[float, float]  # (row spacing, column spacing)
    slice_step: float
    n_slices: int
    rows: int
    cols: int
    thickness: float

    @property
    def normal(self) -> np.ndarray:
        return slice_normal(self.iop)

    def slice_points(self, k: int, offset: float = 0.0) -> np.ndarray:
        """LPS positions (rows, cols, 3) of the pixel centres of spatial slice k."""
        row_dir, col_dir = self.iop[:3], self.iop[3:]
        origin = self.ipp_first + (k * self.slice_step + offset) * self.normal
        cols = np.arange(self.cols) * self.pixel_spacing[1]
        rows = np.arange(self.rows) * self.pixel_spacing[0]
        return origin + cols[None, :, None] * row_dir + rows[:, None, None] * col_dir


def centered_geometry(center, row_dir, col_dir, *, matrix: int, fov: float, n_slices: int,
                      slice_step: float, thickness: float) -> SeriesGeometry:
    """A stack of square slices centred on `center`."""
    row_dir = np.asarray(row_dir, float) / np.linalg.norm(row_dir)
    col_dir = np.asarray(col_dir, float) / np.linalg.norm(col_dir)
    spacing = round(fov / matrix, 4)
    normal = np.cross(row_dir, col_dir)
    half = (matrix - 1) / 2 * spacing
    ipp_first = np.asarray(center) - half * row_dir - half * col_dir - (n_slices - 1) / 2 * slice_step * normal
    return SeriesGeometry(np.round(ipp_first, 4), np.concatenate([row_dir, col_dir]), (spacing, spacing),
                          slice_step, n_slices, matrix, matrix, thickness)


def rotation_matrix(axis: str, degrees: float) -> np.ndarray:
    c, s = np.cos(np.deg2rad(degrees)), np.sin(np.deg2rad(degrees))
    if axis == "x":
        return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    if axis == "y":
        return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def render_series(anatomy: phantom.Anatomy, lesions: list[phantom.Lesion], geometry: SeriesGeometry,
                  contrast: str, rng: np.random.Generator, *, subsamples: int = 1,
                  signal_scale: float | None = None, snr: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Render a series: (volume uint16 (n, rows, cols), lesion masks bool (n_lesions, n, rows, cols)).

    Each slice averages `subsamples` planes across its thickness (partial
    volume); a lesion's mask holds the pixels at least half filled by it.
    """
    shape = (geometry.n_slices, geometry.rows, geometry.cols)
    signal = np.zeros(shape, dtype=np.float32)
    masks = np.zeros((len(lesions),) + shape, dtype=bool)
    edge = float(min(geometry.pixel_spacing))
    offsets = (np.arange(subsamples) + 0.5) / subsamples * geometry.thickness - geometry.thickness / 2
    center = geometry.slice_points(0)[geometry.rows // 2, geometry.cols // 2] + (geometry.n_slices - 1) / 2 * geometry.slice_step * geometry.normal
    for k in range(geometry.n_slices):
        filled = np.zeros((len(lesions), geometry.rows, geometry.cols), dtype=np.float32)
        for offset in offsets:
            points = geometry.slice_points(k, offset)
            image, occupancies = phantom.render(anatomy, lesions, points, contrast, edge)
            signal[k] += image * phantom.bias_field(anatomy, points, center) / subsamples
            for index, occupancy in enumerate(occupancies):
                filled[index] += occupancy / subsamples
        masks[:, k] = filled >= 0.5
    scale = anatomy.signal_scale if signal_scale is None else signal_scale
    sigma = scale / (anatomy.snr if snr is None else snr)
    noisy = phantom.add_rician_noise(rng, signal * scale, sigma)
    volume = np.clip(np.rint(noisy), 0, MAX_STORED).astype(np.uint16)
    return volume, masks


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Tight pixel-edge box (x_min, y_min, x_max, y_max) of a 2D mask (x = column)."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def visible_slices(lesion_masks: np.ndarray) -> np.ndarray:
    """Which slices of one lesion's masks (n_slices, rows, cols) get a box."""
    area = lesion_masks.sum(axis=(1, 2))
    return (area >= MIN_BOX_PIXELS) & (area >= VISIBLE_FRACTION * area.max())


def lesion_boxes(masks: np.ndarray) -> list[tuple[int, int, tuple[int, int, int, int]]]:
    """(lesion index, spatial slice, box) for every slice where a lesion is visible."""
    boxes = []
    for lesion_index, lesion_masks in enumerate(masks):
        for k in np.flatnonzero(visible_slices(lesion_masks)):
            boxes.append((lesion_index, int(k), mask_box(lesion_masks[k])))
    return boxes


def boxes_are_separate(masks: np.ndarray, boxes) -> bool:
    """True when no lesion's box holds a pixel of another lesion on the same slice."""
    for lesion_index, k, (x0, y0, x1, y1) in boxes:
        for other in range(len(masks)):
            if other != lesion_index and masks[other, k, y0:y1, x0:x1].any():
                return False
    return True
