"""spinedet.geometry: DICOM pixel <-> LPS <-> RAS <-> voxel, on hand-checked cases and random poses."""

import math

import nibabel as nib
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spinedet.geometry import (
    LPS_TO_RAS,
    GeometryError,
    lps_to_pixel,
    lps_to_ras,
    orientation_label,
    pixel_box_to_voxel_box,
    pixel_to_lps,
    pixel_to_voxel,
    ras_to_lps,
    slice_normal,
    volume_slice_axis,
    voxel_to_pixel,
)

SAGITTAL = [0, 1, 0, 0, 0, -1]  # rows run anterior -> posterior, columns superior -> inferior
AXIAL = [1, 0, 0, 0, 1, 0]
CORONAL = [1, 0, 0, 0, 0, -1]


def rotation(axis, degrees):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    x, y, z = axis
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return np.array([
        [c + x * x * (1 - c), x * y * (1 - c) - z * s, x * z * (1 - c) + y * s],
        [y * x * (1 - c) + z * s, c + y * y * (1 - c), y * z * (1 - c) - x * s],
        [z * x * (1 - c) - y * s, z * y * (1 - c) + x * s, c + z * z * (1 - c)],
    ])


def tilted(iop, axis, degrees):
    r = rotation(axis, degrees)
    return list(r @ np.asarray(iop[:3], float)) + list(r @ np.asarray(iop[3:], float))


def dcm2niix_like_affine(ipp_first, iop, pixel_spacing, slice_step, rows):
    """The RAS affine of a volume whose voxel (i, j, k) is pixel (col=i, row=rows-1-j) of slice k.

    That is what dcm2niix writes (rows flipped, slices stacked along the
    normal); built here independently of spinedet.geometry.
    """
    row_dir, col_dir = np.asarray(iop[:3], float), np.asarray(iop[3:], float)
    normal = np.cross(row_dir, col_dir)
    lps = np.eye(4)
    lps[:3, 0] = row_dir * pixel_spacing[1]
    lps[:3, 1] = -col_dir * pixel_spacing[0]
    lps[:3, 2] = normal * slice_step
    lps[:3, 3] = np.asarray(ipp_first, float) + col_dir * pixel_spacing[0] * (rows - 1)
    return LPS_TO_RAS @ lps


def test_pixel_to_lps_follows_row_and_column_directions():
    # PixelSpacing is (between rows, between columns): column index moves along iop[:3].
    lps = pixel_to_lps([[10, 4]], ipp=[-100, -120, 50], iop=AXIAL, pixel_spacing=[0.5, 0.8])
    np.testing.assert_allclose(lps, [[-100 + 10 * 0.8, -120 + 4 * 0.5, 50]])


def test_sagittal_pixel_moves_posterior_along_a_row_and_inferior_down_a_column():
    ipp = [12.0, -60.0, 80.0]
    origin, right, down = pixel_to_lps([[0, 0], [1, 0], [0, 1]], ipp, SAGITTAL, [0.7, 0.6])
    np.testing.assert_allclose(right - origin, [0, 0.6, 0])  # +y in LPS = posterior
    np.testing.assert_allclose(down - origin, [0, 0, -0.7])  # -z = inferior


def test_lps_and_ras_differ_by_x_and_y_sign():
    points = np.array([[1.0, 2.0, 3.0], [-4.0, 5.5, -6.0]])
    np.testing.assert_allclose(lps_to_ras(points), [[-1, -2, 3], [4, -5.5, -6]])
    np.testing.assert_allclose(ras_to_lps(lps_to_ras(points)), points)


@pytest.mark.parametrize(
    ("iop", "label"),
    [
        (SAGITTAL, "sagittal"),
        (AXIAL, "axial"),
        (CORONAL, "coronal"),
        (tilted(SAGITTAL, [0, 0, 1], 20), "sagittal"),  # a few degrees oblique is still sagittal
        (tilted(SAGITTAL, [0, 1, 0], -25), "sagittal"),
        (tilted(SAGITTAL, [0, 0, 1], 40), "oblique"),
        (tilted(AXIAL, [1, 0, 0], 45), "oblique"),
        ([0, -1, 0, 0, 0, 1], "sagittal"),  # reversed directions: same plane
    ],
)
def test_orientation_label(iop, label):
    assert orientation_label(iop) == label


def test_slice_normal_is_row_cross_column():
    np.testing.assert_allclose(slice_normal(SAGITTAL), [-1, 0, 0])
    np.testing.assert_allclose(slice_normal(AXIAL), [0, 0, 1])


unit_vectors = st.tuples(*[st.floats(-1, 1)] * 3).filter(lambda v: 0.2 < np.linalg.norm(v))
angles = st.floats(-180, 180)


@settings(max_examples=40, deadline=None)
@given(axis=unit_vectors, degrees=angles, ipp=st.tuples(*[st.floats(-200, 200)] * 3),
       spacing=st.tuples(st.floats(0.2, 3), st.floats(0.2, 3)),
       pixel=st.tuples(st.floats(-10, 600), st.floats(-10, 600)))
def test_pixel_lps_round_trip_in_any_pose(axis, degrees, ipp, spacing, pixel):
    iop = tilted(SAGITTAL, axis, degrees)
    lps = pixel_to_lps([pixel], ipp, iop, spacing)
    back = lps_to_pixel(lps, ipp, iop, spacing)
    np.testing.assert_allclose(back[0, :2], pixel, atol=1e-7)
    assert abs(back[0, 2]) < 1e-7  # on the image plane


def test_box_maps_through_flipped_rows_onto_the_right_slice():
    rows, ipp0, spacing, step = 64, np.array([5.0, -40.0, 30.0]), (0.5, 0.6), 3.3
    affine = dcm2niix_like_affine(ipp0, SAGITTAL, spacing, step, rows)
    ipp_slice_4 = ipp0 + slice_normal(SAGITTAL) * step * 4
    box = pixel_box_to_voxel_box((10, 20, 30, 40), ipp_slice_4, SAGITTAL, spacing, affine,
                                 shape=(48, rows, 7))
    assert box.slice_axis == 2 and box.slice == 4 and box.axes == (0, 1)
    # Columns 10..29 stay 10..29; rows 20..39 become voxel rows 63-39..63-20.
    assert box.min == (10, rows - 40) and box.max == (30, rows - 20)
    assert volume_slice_axis(SAGITTAL, affine) == 2


def test_one_pixel_box_is_one_voxel():
    affine = dcm2niix_like_affine([0, 0, 0], AXIAL, (1.0, 1.0), 2.0, 32)
    box = pixel_box_to_voxel_box((3, 5, 4, 6), [0, 0, 0], AXIAL, (1.0, 1.0), affine)
    assert box.min == (3, 26) and box.max == (4, 27) and box.slice == 0


def test_voxel_to_pixel_inverts_pixel_to_voxel():
    iop = tilted(SAGITTAL, [1, 1, 0], 17)
    affine = dcm2niix_like_affine([3, 4, 5], iop, (0.4, 0.9), 2.5, 50)
    pixels = np.array([[0.0, 0.0], [12.5, 7.25], [49.0, 20.0]])
    voxels = pixel_to_voxel(pixels, [3, 4, 5], iop, (0.4, 0.9), affine)
    np.testing.assert_allclose(voxel_to_pixel(voxels, [3, 4, 5], iop, (0.4, 0.9), affine)[:, :2], pixels,
                               atol=1e-9)


def test_a_box_between_two_slices_is_an_error():
    affine = dcm2niix_like_affine([0, 0, 0], SAGITTAL, (1.0, 1.0), 3.0, 32)
    between_slices = [-1.5, 0, 0]
    with pytest.raises(GeometryError, match="the slice is 0.50 voxel off the voxel grid"):
        pixel_box_to_voxel_box((2, 2, 6, 6), between_slices, SAGITTAL, (1.0, 1.0), affine)


def test_decimal_pixel_edges_map_exactly_as_continuous_coordinates():
    rows, spacing = 32, (0.5, 0.8)
    affine = dcm2niix_like_affine([0, 0, 0], SAGITTAL, spacing, 3.0, rows)
    box = pixel_box_to_voxel_box((30.47, 2.25, 31.5, 6), [0, 0, 0], SAGITTAL, spacing, affine, shape=(40, rows, 5))
    # columns keep their decimals; rows flip (rows - edge) and keep theirs
    assert box.min == (30.47, rows - 6) and box.max == (31.5, rows - 2.25)
    assert isinstance(box.min[1], int)  # a whole-voxel edge stays an int
    whole = pixel_box_to_voxel_box((30, 2, 31, 6), [0, 0, 0], SAGITTAL, spacing, affine)
    assert whole.min == (30, rows - 6) and all(isinstance(v, int) for v in whole.min + whole.max)
    # an instance half a pixel off the volume's in-plane grid maps half a voxel over, exactly
    shifted = pixel_box_to_voxel_box((2, 2, 6, 6), [0, 0.5 * spacing[1], 0], SAGITTAL, spacing, affine)
    assert shifted.min == (2.5, rows - 6) and shifted.max == (6.5, rows - 2)


def test_image_plane_that_is_not_a_volume_plane_is_an_error():
    affine = dcm2niix_like_affine([0, 0, 0], SAGITTAL, (1.0, 1.0), 3.0, 32)
    with pytest.raises(GeometryError, match="one voxel slice"):
        pixel_box_to_voxel_box((2, 2, 12, 12), [0, 0, 0], tilted(SAGITTAL, [0, 0, 1], 30),
                               (1.0, 1.0), affine)


def test_box_outside_the_volume_or_empty_is_an_error():
    affine = dcm2niix_like_affine([0, 0, 0], AXIAL, (1.0, 1.0), 2.0, 32)
    with pytest.raises(GeometryError, match="outside the volume"):
        pixel_box_to_voxel_box((2, 2, 6, 6), [0, 0, 2 * 9], AXIAL, (1.0, 1.0), affine, shape=(32, 32, 9))
    with pytest.raises(GeometryError, match="empty or inverted"):
        pixel_box_to_voxel_box((6, 2, 6, 6), [0, 0, 0], AXIAL, (1.0, 1.0), affine)


@settings(max_examples=40, deadline=None)
@given(axis=unit_vectors, degrees=angles, slice_index=st.integers(0, 9),
       corner=st.tuples(st.integers(0, 40), st.integers(0, 40)),
       size=st.tuples(st.integers(1, 20), st.integers(1, 20)))
def test_box_mapping_matches_the_pixel_grid_in_any_pose(axis, degrees, slice_index, corner, size):
    iop = tilted(SAGITTAL, axis, degrees)
    rows, spacing, step = 64, (0.8, 0.5), 3.0
    ipp0 = np.array([10.0, -20.0, 40.0])
    affine = dcm2niix_like_affine(ipp0, iop, spacing, step, rows)
    ipp = ipp0 + slice_normal(iop) * step * slice_index
    x0, y0 = corner
    box = pixel_box_to_voxel_box((x0, y0, x0 + size[0], y0 + size[1]), ipp, iop, spacing, affine)
    assert (box.slice_axis, box.slice, box.axes) == (2, slice_index, (0, 1))
    assert box.min == (x0, rows - (y0 + size[1])) and box.max == (x0 + size[0], rows - y0)


# --------------------------------------------------------------------------
# Round trip through the real dcm2niix: a marker pixel written into DICOM at
# an annotated position must land inside the mapped voxel box.

BASE_PLANES = {"sagittal": SAGITTAL, "axial": AXIAL, "coronal": CORONAL}
MARKER = 4000


@settings(max_examples=14, deadline=None)
@given(
    plane=st.sampled_from(sorted(BASE_PLANES)),
    axis=unit_vectors,
    degrees=st.floats(-40, 40),
    flip_rows=st.booleans(),
    flip_columns=st.booleans(),
    reverse_order=st.booleans(),
    three_d=st.booleans(),
    shape=st.tuples(st.integers(3, 6), st.integers(12, 24), st.integers(12, 24)),
    spacing=st.tuples(st.sampled_from([0.5, 0.7, 1.0]), st.sampled_from([0.6, 0.8, 1.0])),
    step=st.sampled_from([2.5, 3.3, -3.0]),
    data=st.data(),
)
def test_marker_lands_in_mapped_box_after_real_dcm2niix(
    tmp_path_factory, plane, axis, degrees, flip_rows, flip_columns, reverse_order, three_d, shape,
    spacing, step, data,
):
    from spinedet.ingest.dicom_to_nifti import run_dcm2niix
    from spinedet.ingest.deidentify import InstanceIndex, map_annotation
    from spinedet.ingest.dicom import list_files
    from spinedet.ingest.inventory import classify_files
    from spinedet.demo.dicom_writer import write_series

    n_slices, rows, cols = shape
    k = data.draw(st.integers(0, n_slices - 1), label="slice")
    r = data.draw(st.integers(0, rows - 1), label="row")
    c = data.draw(st.integers(0, cols - 1), label="col")
    pad = data.draw(st.tuples(*[st.integers(0, 3)] * 4), label="box padding")
    iop = tilted(BASE_PLANES[plane], axis, degrees)
    if flip_rows:
        iop = [-v for v in iop[:3]] + iop[3:]
    if flip_columns:
        iop = iop[:3] + [-v for v in iop[3:]]
    volume = np.full(shape, 100, dtype=np.uint16)
    volume[k, r, c] = MARKER

    folder = tmp_path_factory.mktemp("roundtrip")
    written = write_series(
        folder / "raw", volume, ipp_first=[-20.0, 35.5, 110.25], iop=iop, pixel_spacing=spacing,
        slice_step=step, reverse_order=reverse_order, header={"PatientID": "RT1"},
        series_attributes={"MRAcquisitionType": "3D" if three_d else "2D"},
    )
    files = classify_files(list_files(folder / "raw"), {"RT1": "normal"})
    assert {row["status"] for row in files} == {"ok"}
    instance = next(item for item in written if item["slice_index"] == k)
    series_uid = files[0]["series_uid"]

    result = run_dcm2niix([item["path"] for item in written], folder / "nifti", pixels_per_image=rows * cols)
    assert result["status"] == "converted", result["message"]
    image = nib.load(result["nifti"])
    voxels = np.asarray(image.dataobj).squeeze()
    volume_info = {"patient_id": "RT1", "affine": image.affine, "shape": voxels.shape,
                   "slice_axis": volume_slice_axis(iop, image.affine)}

    box = (max(c - pad[0], 0), max(r - pad[1], 0), min(c + 1 + pad[2], cols), min(r + 1 + pad[3], rows))
    annotation = {"series_uid": series_uid, "instance_number": str(instance["instance_number"]),
                  "sop_instance_uid": "", "label": "disc_herniation",
                  "x_min": box[0], "y_min": box[1], "x_max": box[2], "y_max": box[3]}
    _, mapped = map_annotation(annotation, InstanceIndex(files), {series_uid: volume_info},
                               ["disc_herniation"])

    marker_voxel = np.argwhere(voxels == MARKER)
    assert len(marker_voxel) == 1
    marker_voxel = marker_voxel[0]
    slice_axis = volume_info["slice_axis"]
    assert marker_voxel[slice_axis] == mapped["slice"]
    for axis_index, low, high in zip(mapped["axes"], mapped["min"], mapped["max"]):
        assert low <= marker_voxel[axis_index] < high
    # the box keeps its size: the pixel grid is the voxel grid
    sizes = sorted(high - low for low, high in zip(mapped["min"], mapped["max"]))
    assert sizes == sorted([box[2] - box[0], box[3] - box[1]])
