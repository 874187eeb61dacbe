"""spinedet.ingest.annotations: real DICOM SR TID 1500 and SEG objects, written
with highdicom on a real MR stack (pydicom's MR_small.dcm, three sagittal
slices), become exact boxes or issues with a reason, never exceptions; so do
the SR and SEG files pydicom ships."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pydicom.data
import pytest
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from spinedet.ingest.annotations.findings import (
    DEFAULT_FINDING_MAP,
    FINDING_CODES,
    ImportedBox,
    ImportIssue,
    match_class,
)
from spinedet.ingest.annotations.seg import read_segmentation
from spinedet.ingest.annotations.sr import read_measurement_report

CLASSES = ["disc_herniation", "cord_injury"]
POINT_BOX_MM = {"disc_herniation": 8.0, "cord_injury": 8.0}


def finding_code(label: str) -> Code:
    scheme, value, meaning = FINDING_CODES[label]
    return Code(value=value, scheme_designator=scheme, meaning=meaning)


HERNIATION, CORD_INJURY = finding_code("disc_herniation"), finding_code("cord_injury")
VERTEBRA = Code("51282000", "SCT", "Spine bone")  # a property no finding_map entry names

# Sagittal slices: the column index grows posterior (+y, LPS), the row index
# inferior (-z); the normal, row x column direction, is -x. Row and column
# spacing differ, so that a swapped axis shows.
IOP = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]
ROW_DIR, COL_DIR = np.array(IOP[:3]), np.array(IOP[3:])
NORMAL = np.cross(ROW_DIR, COL_DIR)
ORIGIN = np.array([10.0, -20.0, 30.0])
PIXEL_SPACING = [0.9375, 0.625]  # [row spacing, column spacing] mm
SLICE_STEP = 4.0
SIZE = 64
TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"


def ipp(k: int) -> np.ndarray:
    return ORIGIN + k * SLICE_STEP * NORMAL


def world(k: int, column: float, row: float, off_plane: float = 0.0) -> list[float]:
    """LPS of pixel index (column, row) of slice k, by the DICOM equation (not spinedet.geometry)."""
    point = ipp(k) + column * PIXEL_SPACING[1] * ROW_DIR + row * PIXEL_SPACING[0] * COL_DIR + off_plane * NORMAL
    return point.tolist()


def instance_row(ds, frame_positions=None) -> dict:
    """The image's row of files.csv as read back from the CSV: every value a string, lists as JSON."""
    return {
        "patient_id": str(ds.PatientID), "study_uid": str(ds.StudyInstanceUID),
        "series_uid": str(ds.SeriesInstanceUID), "sop_instance_uid": str(ds.SOPInstanceUID),
        "sop_class_uid": str(ds.SOPClassUID), "instance_number": str(ds.InstanceNumber),
        "rows": str(ds.Rows), "columns": str(ds.Columns),
        "frames": str(len(frame_positions)) if frame_positions else "1",
        "image_position": json.dumps([float(v) for v in (frame_positions[0] if frame_positions
                                                         else ds.ImagePositionPatient)]),
        "frame_positions": json.dumps(frame_positions) if frame_positions else "",
        "image_orientation": json.dumps(IOP), "pixel_spacing": json.dumps(PIXEL_SPACING),
        "slice_thickness": "3.0", "orientation": "sagittal",
    }


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """(datasets, instances): three MR slices of one series, written to disk, and their files.csv rows."""
    folder = tmp_path_factory.mktemp("mr")
    base = pydicom.dcmread(pydicom.data.get_testdata_file("MR_small.dcm"))
    series_uid = hd.UID()
    datasets = []
    for k in range(3):
        ds = copy.deepcopy(base)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = hd.UID()
        ds.SeriesInstanceUID = series_uid
        ds.InstanceNumber = k + 1
        ds.ImageOrientationPatient = IOP
        ds.ImagePositionPatient = ipp(k).tolist()
        ds.PixelSpacing = PIXEL_SPACING
        ds.SliceThickness = 3.0
        ds.save_as(folder / f"mr{k}.dcm")
        datasets.append(pydicom.dcmread(folder / f"mr{k}.dcm"))
    return datasets, {str(ds.SOPInstanceUID): instance_row(ds) for ds in datasets}


@pytest.fixture(scope="module")
def multiframe(stack):
    """(dataset, files.csv row) of the stack as one multi-frame MR (highdicom's legacy conversion)."""
    datasets, _ = stack
    image = hd.legacy.LegacyConvertedEnhancedMRImage(datasets, series_instance_uid=hd.UID(), series_number=5,
                                                     sop_instance_uid=hd.UID(), instance_number=1)
    positions = [[float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
                 for frame in image.PerFrameFunctionalGroupsSequence]
    return image, instance_row(image, positions)


# --------------------------------------------------------------------------- SR writers


def region(ds, graphic_type: str, points, frames=None) -> hd.sr.ImageRegion:
    source = hd.sr.SourceImageForRegion(ds.SOPClassUID, ds.SOPInstanceUID, frames)
    return hd.sr.ImageRegion(graphic_type, np.asarray(points, dtype=float), source)


def group(referenced_region, finding=HERNIATION, tracking="ROI") -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=tracking),
        referenced_region=referenced_region, finding_type=finding)


def write_sr(folder: Path, evidence, groups, name="sr.dcm") -> tuple[Path, str]:
    observer = hd.sr.ObserverContext(observer_type=codes.DCM.Person,
                                     observer_identifying_attributes=hd.sr.PersonObserverIdentifyingAttributes(
                                         name="Reader^A"))
    report = hd.sr.MeasurementReport(observation_context=hd.sr.ObservationContext(observer_person_context=observer),
                                     procedure_reported=codes.LN.MRIUnspecifiedBodyRegion,
                                     imaging_measurements=groups)
    sr = hd.sr.Comprehensive3DSR(evidence=evidence, content=report, series_instance_uid=hd.UID(), series_number=90,
                                 sop_instance_uid=hd.UID(), instance_number=1)
    path = folder / name
    sr.save_as(path)
    return path, str(sr.SOPInstanceUID)


def read_sr(path, instances):
    return read_measurement_report(path, instances, DEFAULT_FINDING_MAP, CLASSES, POINT_BOX_MM)


def edges(box: ImportedBox) -> tuple:
    return (box.x_min, box.y_min, box.x_max, box.y_max)


# --------------------------------------------------------------------------- SR


def test_a_closed_polyline_rectangle_is_its_box_and_snomed_gives_the_class(tmp_path, stack):
    datasets, instances = stack
    rectangle = [[10, 5], [20, 5], [20, 15], [10, 15], [10, 5]]  # OHIF's rectangle: 5 points, closed
    path, sr_uid = write_sr(tmp_path, datasets, [group(region(datasets[1], "POLYLINE", rectangle))])
    boxes, issues = read_sr(path, instances)
    assert issues == []
    [box] = boxes
    assert edges(box) == (10, 5, 20, 15)  # columns 10..19, rows 5..14: edges, no 0.5 shift
    ds = datasets[1]
    assert (box.label, box.source, box.source_ref, box.frame_number) == ("disc_herniation", "sr", f"{sr_uid}#roi1", None)
    assert (box.patient_id, box.study_uid, box.series_uid, box.sop_instance_uid, box.instance_number) == (
        ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, "2")


def test_shapes_give_their_extents_and_each_unusable_roi_an_issue(tmp_path, stack):
    datasets, instances = stack
    cord_text = Code("CORNERSTONEFREETEXT", "CORNERSTONEJS", "Cord contusion")  # OHIF's typed label
    other = copy.deepcopy(datasets[0])  # an image of another export: not in instances
    other.SOPInstanceUID = unknown_uid = hd.UID()
    stranger = region(other, "POLYLINE", [[1, 1], [5, 1], [5, 5], [1, 5], [1, 1]])
    groups = [
        group(region(datasets[0], "POLYLINE", [[2, 3], [12, 3], [12, 9], [2, 9], [2, 3]]), finding=cord_text),  # 1
        group(region(datasets[0], "CIRCLE", [[30, 20], [34, 23]])),                                  # 2: r = 5
        group(region(datasets[0], "ELLIPSE", [[20, 40], [40, 40], [30, 36], [30, 44]])),             # 3
        group(region(datasets[2], "POINT", [[30.5, 20.5]])),                                         # 4
        group(region(datasets[0], "POLYLINE", [[1, 1], [9, 1], [9, 9]])),                             # 5: open
        group(region(datasets[0], "POLYLINE", [[1, 1], [9, 1], [9, 9], [1, 1]]), finding=VERTEBRA),  # 6
        group(stranger),                                                                             # 7
        group(region(datasets[0], "POLYLINE", [[60, 60], [70, 60], [70, 70], [60, 70], [60, 60]])),  # 8: clipped
        group(region(datasets[0], "POLYLINE", [[70, 70], [80, 70], [80, 80], [70, 80], [70, 70]])),  # 9: outside
        group(region(datasets[0], "POLYLINE", [[1, 1], [9, 1], [9, 9], [1, 1]]), finding=None, tracking="disk bulge"),
    ]
    path, _ = write_sr(tmp_path, [*datasets, other], groups)
    boxes, issues = read_sr(path, instances)
    by_ref = {box.source_ref.split("#")[1]: box for box in boxes}
    assert set(by_ref) == {"roi1", "roi2", "roi3", "roi4", "roi8", "roi10"}
    assert by_ref["roi1"].label == "cord_injury" and edges(by_ref["roi1"]) == (2, 3, 12, 9)
    assert edges(by_ref["roi2"]) == (25, 15, 35, 25)
    assert edges(by_ref["roi3"]) == (20, 36, 40, 44)
    # 8 mm square around the point: 8 / 0.625 = 12.8 columns, 8 / 0.9375 = 8.5333 rows
    point = by_ref["roi4"]
    assert point.sop_instance_uid == datasets[2].SOPInstanceUID
    assert edges(point) == pytest.approx((30.5 - 6.4, 20.5 - 4.26667, 30.5 + 6.4, 20.5 + 4.26667), abs=1e-3)
    assert edges(by_ref["roi8"]) == (60, 60, 64, 64)  # clipped to the 64 x 64 image
    assert by_ref["roi10"].label == "disc_herniation"  # from the tracking identifier's text
    reasons = {issue.source_ref.split("#")[1]: issue.reason for issue in issues}
    assert reasons == {"roi5": "unsupported_graphic", "roi6": "unknown_finding",
                       "roi7": "references_unknown_instance", "roi9": "outside_image"}
    by_reason = {issue.reason: issue for issue in issues}
    assert "Spine bone" in by_reason["unknown_finding"].detail
    assert unknown_uid in by_reason["references_unknown_instance"].detail
    assert all(issue.source == "sr" and issue.patient_id == datasets[0].PatientID for issue in issues)
    assert all(len(issue.detail.split()) >= 6 for issue in issues)


def test_multipoint_gives_a_box_per_point(tmp_path, stack):
    datasets, instances = stack
    roi = region(datasets[1], "POINT", [[10, 10]])
    roi.GraphicType, roi.GraphicData = "MULTIPOINT", [10.0, 10.0, 40.0, 30.0]  # dcmqi-style; highdicom writes no MULTIPOINT
    path, sr_uid = write_sr(tmp_path, datasets, [group(roi)])
    boxes, issues = read_sr(path, instances)
    assert issues == []
    assert [box.source_ref for box in boxes] == [f"{sr_uid}#roi1/point1", f"{sr_uid}#roi1/point2"]
    assert [box.x_max - box.x_min for box in boxes] == pytest.approx([12.8, 12.8])
    assert [(box.x_min + box.x_max) / 2 for box in boxes] == pytest.approx([10, 40])


def test_scoord3d_is_projected_onto_the_nearest_slice_of_the_study(tmp_path, stack):
    datasets, instances = stack
    frame_of_reference = datasets[0].FrameOfReferenceUID
    point = hd.sr.ImageRegion3D("POINT", np.array([world(2, 20, 30, off_plane=1.0)]), frame_of_reference)
    corners = [world(1, c, r) for c, r in [(9.5, 4.5), (19.5, 4.5), (19.5, 14.5), (9.5, 14.5), (9.5, 4.5)]]
    polygon = hd.sr.ImageRegion3D("POLYGON", np.array(corners), frame_of_reference)
    beyond = hd.sr.ImageRegion3D("POINT", np.array([world(2, 20, 30, off_plane=10.0)]), frame_of_reference)
    path, sr_uid = write_sr(tmp_path, datasets, [group(point, finding=CORD_INJURY), group(polygon), group(beyond)])
    boxes, issues = read_sr(path, instances)
    first, second = boxes
    # the centre of pixel (20, 30) is the edge coordinate (20.5, 30.5); 1 mm off slice 2 is within its slab
    assert first.sop_instance_uid == datasets[2].SOPInstanceUID and first.label == "cord_injury"
    assert edges(first) == pytest.approx((20.5 - 6.4, 30.5 - 4.26667, 20.5 + 6.4, 30.5 + 4.26667), abs=1e-3)
    # vertices at pixel centres (9.5, 4.5)... are the edges 10, 5, 20, 15
    assert second.sop_instance_uid == datasets[1].SOPInstanceUID
    assert edges(second) == pytest.approx((10, 5, 20, 15), abs=1e-6)
    [issue] = issues
    assert (issue.reason, issue.source_ref) == ("references_unknown_instance", f"{sr_uid}#roi3")
    assert "10.00 mm" in issue.detail  # the distance to slice 2, beyond its half slab (half the 4 mm spacing)


def test_volumetric_groups_give_a_box_per_region(tmp_path, stack):
    datasets, instances = stack
    def tracking():
        return hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="volume")

    on_two_slices = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking(), finding_type=HERNIATION, referenced_regions=[
            region(datasets[0], "POLYLINE", [[2, 2], [6, 2], [6, 8], [2, 8], [2, 2]]),
            region(datasets[1], "POLYLINE", [[3, 3], [7, 3], [7, 9], [3, 9], [3, 3]])])
    sources = [hd.sr.SourceImageForSegmentation(ds.SOPClassUID, ds.SOPInstanceUID) for ds in datasets]
    contours = [np.array([world(k, c, r) for c, r in [(9.5, 9.5), (19.5, 9.5), (19.5, 19.5), (9.5, 9.5)]])
                for k in (1, 2)]
    surface = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking(), finding_type=CORD_INJURY, referenced_volume_surface=hd.sr.VolumeSurface(
            "POLYGON", contours, datasets[0].FrameOfReferenceUID, source_images=sources))
    axes = np.array([world(1, 10, 10), world(1, 20, 10), world(1, 15, 5), world(1, 15, 15),
                     world(0, 15, 10), world(2, 15, 10)])
    ellipsoid = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking(), finding_type=CORD_INJURY, referenced_volume_surface=hd.sr.VolumeSurface(
            "ELLIPSOID", [axes], datasets[0].FrameOfReferenceUID, source_images=sources))
    path, sr_uid = write_sr(tmp_path, datasets, [on_two_slices, surface, ellipsoid])
    boxes, issues = read_sr(path, instances)
    assert [(b.source_ref.split("#")[1], b.sop_instance_uid, b.label) for b in boxes] == [
        ("roi1/region1", datasets[0].SOPInstanceUID, "disc_herniation"),
        ("roi1/region2", datasets[1].SOPInstanceUID, "disc_herniation"),
        ("roi2/region1", datasets[1].SOPInstanceUID, "cord_injury"),
        ("roi2/region2", datasets[2].SOPInstanceUID, "cord_injury")]
    assert [edges(b) for b in boxes[:2]] == [(2, 2, 6, 8), (3, 3, 7, 9)]
    assert [edges(b) for b in boxes[2:]] == [pytest.approx((10, 10, 20, 20), abs=1e-6)] * 2
    assert [(i.source_ref, i.reason, i.label) for i in issues] == [
        (f"{sr_uid}#roi3", "unsupported_graphic", "cord_injury")]


def test_multi_frame_references_need_a_frame_that_exists(tmp_path, multiframe):
    image, row = multiframe
    instances = {row["sop_instance_uid"]: row}
    rectangle = [[10, 5], [20, 5], [20, 15], [10, 15], [10, 5]]
    groups = [group(region(image, "POLYLINE", rectangle, frames=[2])),
              group(region(image, "POLYLINE", rectangle)),
              group(hd.sr.ImageRegion3D("POINT", np.array([world(2, 20, 30)]), image.FrameOfReferenceUID))]
    path, sr_uid = write_sr(tmp_path, [image], groups)
    boxes, issues = read_sr(path, instances)
    on_frame, projected = boxes
    assert (on_frame.frame_number, edges(on_frame)) == (2, (10, 5, 20, 15))
    slice_2 = 1 + [np.allclose(position, ipp(2)) for position in json.loads(row["frame_positions"])].index(True)
    assert projected.frame_number == slice_2 and projected.sop_instance_uid == row["sop_instance_uid"]
    assert edges(projected) == pytest.approx((20.5 - 6.4, 30.5 - 4.26667, 20.5 + 6.4, 30.5 + 4.26667), abs=1e-3)
    assert [(issue.source_ref, issue.reason) for issue in issues] == [(f"{sr_uid}#roi2", "unknown_frame")]
    # a frame the image does not have
    path, _ = write_sr(tmp_path, [image], [group(region(image, "POLYLINE", rectangle, frames=[2]))], "frame.dcm")
    bad = pydicom.dcmread(path)
    for item in bad.ContentSequence[-1].ContentSequence[0].ContentSequence:
        for child in item.get("ContentSequence", []):
            if child.ValueType == "IMAGE":
                child.ReferencedSOPSequence[0].ReferencedFrameNumber = 7
    bad.save_as(path)
    boxes, issues = read_sr(path, instances)
    assert boxes == [] and [issue.reason for issue in issues] == ["unknown_frame"]


def test_an_sr_that_is_not_a_measurement_report_is_one_issue(tmp_path, stack):
    datasets, instances = stack
    content = hd.sr.ContainerContentItem(name=Code("121070", "DCM", "Findings"))
    content.ContentSequence = [hd.sr.TextContentItem(name=Code("121071", "DCM", "Finding"), value="disc bulge",
                                                     relationship_type="CONTAINS")]
    sr = hd.sr.ComprehensiveSR(evidence=datasets, content=content, series_instance_uid=hd.UID(), series_number=91,
                               sop_instance_uid=hd.UID(), instance_number=1)
    sr.save_as(tmp_path / "text.dcm")
    boxes, issues = read_sr(tmp_path / "text.dcm", instances)
    assert boxes == [] and [(i.reason, i.source_ref) for i in issues] == [("sr_not_measurement_report", sr.SOPInstanceUID)]
    (tmp_path / "garbage.dcm").write_bytes(b"not a DICOM file at all")
    boxes, issues = read_sr(tmp_path / "garbage.dcm", instances)
    assert boxes == [] and [i.reason for i in issues] == ["unreadable_object"]
    assert str(tmp_path) not in issues[0].detail and issues[0].source_ref.startswith("sha256:")


def test_a_broken_finding_map_entry_is_an_issue_per_item_not_an_exception(tmp_path, stack):
    datasets, instances = stack
    path, sr_uid = write_sr(tmp_path, datasets, [group(region(datasets[0], "POINT", [[3, 3]]), finding=None)])
    broken = [{"text": "(unclosed", "class": "cord_injury"}]
    boxes, issues = read_measurement_report(path, instances, broken, CLASSES, POINT_BOX_MM)
    assert boxes == [] and [(i.reason, i.source_ref) for i in issues] == [("unreadable_object", f"{sr_uid}#roi1")]
    write_seg(tmp_path / "seg.dcm", datasets, two_blobs(), [description(1, "hernia", VERTEBRA)])
    boxes, issues = read_segmentation(tmp_path / "seg.dcm", instances, broken, CLASSES)
    assert boxes == [] and [i.reason for i in issues] == ["unreadable_object"]


# --------------------------------------------------------------------------- SEG


def description(number: int, label: str, property_type: Code) -> hd.seg.SegmentDescription:
    return hd.seg.SegmentDescription(
        segment_number=number, segment_label=label, segmented_property_type=property_type,
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)


def write_seg(path: Path, sources, mask: np.ndarray, descriptions, segmentation_type="BINARY", **kwargs):
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=mask, segmentation_type=segmentation_type,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=80,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="spinedet tests",
        manufacturer_model_name="highdicom", software_versions=hd.__version__, device_serial_number="1", **kwargs)
    seg.save_as(path)
    return seg


def two_blobs() -> np.ndarray:
    """Two separate blobs on slice 1; the second is joined only diagonally (8-connected, not 4)."""
    mask = np.zeros((3, SIZE, SIZE), dtype=bool)
    mask[1, 5:10, 3:8] = True       # rows 5..9, columns 3..7
    mask[1, 30:36, 40:45] = True    # rows 30..35, columns 40..44
    mask[1, 36, 45] = True          # diagonal to (35, 44)
    return mask


def test_a_segment_gives_one_box_per_8_connected_component(tmp_path, stack):
    datasets, instances = stack
    masks = np.stack([two_blobs(), np.zeros((3, SIZE, SIZE), bool), two_blobs()], axis=-1)
    seg = write_seg(tmp_path / "seg.dcm", datasets, masks, [
        description(1, "herniation C5-C6", HERNIATION), description(2, "cord", CORD_INJURY),
        description(3, "vertebra", VERTEBRA)])
    boxes, issues = read_segmentation(tmp_path / "seg.dcm", instances, DEFAULT_FINDING_MAP, CLASSES)
    uid, source = seg.SOPInstanceUID, datasets[1].SOPInstanceUID
    assert [(edges(b), b.label, b.source_ref) for b in boxes] == [
        ((3, 5, 8, 10), "disc_herniation", f"{uid}#segment1/component1@{source}"),
        ((40, 30, 46, 37), "disc_herniation", f"{uid}#segment1/component2@{source}"),
    ]
    assert all(b.sop_instance_uid == source and b.frame_number is None and b.source == "seg" for b in boxes)
    assert [(i.source_ref, i.reason, i.label) for i in issues] == [
        (f"{uid}#segment2", "empty_segment", "cord_injury"), (f"{uid}#segment3", "unknown_finding", "")]
    assert "Spine bone" in issues[1].detail


def test_a_fractional_segment_counts_pixels_above_half(tmp_path, stack):
    datasets, instances = stack
    mask = np.zeros((3, SIZE, SIZE), dtype=np.float32)
    mask[0, 10:20, 10:20] = 0.4   # not in the segment
    mask[0, 12:15, 11:17] = 0.8
    write_seg(tmp_path / "fractional.dcm", datasets, mask, [description(1, "cord contusion", CORD_INJURY)],
              segmentation_type="FRACTIONAL")
    boxes, issues = read_segmentation(tmp_path / "fractional.dcm", instances, DEFAULT_FINDING_MAP, CLASSES)
    assert issues == [] and [edges(b) for b in boxes] == [(11, 12, 17, 15)]


def test_a_labelmap_segmentation_gives_each_segment_its_components(tmp_path, stack):
    datasets, instances = stack
    labels = np.zeros((3, SIZE, SIZE), dtype=np.uint8)
    labels[1, 5:10, 3:8] = 1
    labels[2, 20:30, 20:25] = 2
    write_seg(tmp_path / "labelmap.dcm", datasets, labels, [description(1, "hernia", HERNIATION),
                                                            description(2, "cord", CORD_INJURY)],
              segmentation_type="LABELMAP")
    boxes, issues = read_segmentation(tmp_path / "labelmap.dcm", instances, DEFAULT_FINDING_MAP, CLASSES)
    assert issues == []
    assert [(b.label, b.sop_instance_uid, edges(b)) for b in boxes] == [
        ("disc_herniation", datasets[1].SOPInstanceUID, (3, 5, 8, 10)),
        ("cord_injury", datasets[2].SOPInstanceUID, (20, 20, 25, 30))]


def test_a_seg_of_a_multi_frame_image_names_the_frame(tmp_path, multiframe):
    image, row = multiframe
    mask = np.zeros((3, SIZE, SIZE), dtype=bool)
    mask[2, 20:25, 30:33] = True
    write_seg(tmp_path / "mf.dcm", [image], mask, [description(1, "hernia", HERNIATION)])
    boxes, issues = read_segmentation(tmp_path / "mf.dcm", {row["sop_instance_uid"]: row}, DEFAULT_FINDING_MAP, CLASSES)
    assert issues == []
    [box] = boxes
    assert (box.frame_number, edges(box)) == (3, (30, 20, 33, 25))
    assert box.source_ref.endswith(f"@{row['sop_instance_uid']}:3")


def test_a_seg_of_an_image_outside_the_inventory_is_an_issue(tmp_path, stack):
    _, instances = stack
    ct = pydicom.dcmread(pydicom.data.get_testdata_file("CT_small.dcm"))
    mask = np.zeros((1, ct.Rows, ct.Columns), dtype=bool)
    mask[0, 40:50, 60:70] = True
    seg = write_seg(tmp_path / "ct.dcm", [ct], mask, [description(1, "hernia", HERNIATION)])
    boxes, issues = read_segmentation(tmp_path / "ct.dcm", instances, DEFAULT_FINDING_MAP, CLASSES)
    assert boxes == []
    assert [(i.reason, i.source_ref, i.label) for i in issues] == [
        ("references_unknown_instance", f"{seg.SOPInstanceUID}#segment1@{ct.SOPInstanceUID}", "disc_herniation")]


def test_a_seg_off_the_source_grid_needs_resampling(tmp_path, stack):
    datasets, instances = stack
    seg = write_seg(tmp_path / "grid.dcm", datasets, two_blobs(), [description(1, "hernia", HERNIATION)])
    smaller = {uid: {**row, "rows": "128", "columns": "128"} for uid, row in instances.items()}
    boxes, issues = read_segmentation(tmp_path / "grid.dcm", smaller, DEFAULT_FINDING_MAP, CLASSES)
    assert boxes == [] and [i.reason for i in issues] == ["unsupported_graphic"]
    assert "resampling" in issues[0].detail

    dataset = pydicom.dcmread(tmp_path / "grid.dcm")
    for frame in dataset.PerFrameFunctionalGroupsSequence:
        del frame.DerivationImageSequence
    dataset.save_as(tmp_path / "underived.dcm")
    boxes, issues = read_segmentation(tmp_path / "underived.dcm", instances, DEFAULT_FINDING_MAP, CLASSES)
    assert boxes == [] and [(i.reason, i.source_ref) for i in issues] == [
        ("unsupported_graphic", f"{seg.SOPInstanceUID}#segment1")]

    dataset = pydicom.dcmread(tmp_path / "grid.dcm")
    for frame in dataset.PerFrameFunctionalGroupsSequence:
        frame.DerivationImageSequence[0].SourceImageSequence[0].SpatialLocationsPreserved = "NO"
    dataset.save_as(tmp_path / "moved.dcm")
    boxes, issues = read_segmentation(tmp_path / "moved.dcm", instances, DEFAULT_FINDING_MAP, CLASSES)
    assert boxes == [] and [i.reason for i in issues] == ["unsupported_graphic"]
    assert "Spatial Locations Preserved" in issues[0].detail

    dataset = pydicom.dcmread(tmp_path / "grid.dcm")
    position = dataset.PerFrameFunctionalGroupsSequence[0].PlanePositionSequence[0]
    position.ImagePositionPatient = (np.asarray(position.ImagePositionPatient, float) + 3 * ROW_DIR).tolist()
    dataset.save_as(tmp_path / "shifted.dcm")
    boxes, issues = read_segmentation(tmp_path / "shifted.dcm", instances, DEFAULT_FINDING_MAP, CLASSES)
    assert boxes == [] and [i.reason for i in issues] == ["unsupported_graphic"]
    assert "4.80 columns" in issues[0].detail  # 3 mm along the rows at 0.625 mm per column


def test_an_unreadable_seg_is_one_issue(tmp_path, stack):
    _, instances = stack
    mr = pydicom.dcmread(pydicom.data.get_testdata_file("MR_small.dcm"))
    mr.save_as(tmp_path / "not_a_seg.dcm")
    boxes, issues = read_segmentation(tmp_path / "not_a_seg.dcm", instances, DEFAULT_FINDING_MAP, CLASSES)
    assert boxes == [] and [(i.reason, i.source_ref) for i in issues] == [("unreadable_object", mr.SOPInstanceUID)]


# --------------------------------------------------------------------------- pydicom's own files


def shipped(kind: str) -> list[Path]:
    """pydicom's test files of SR or Segmentation storage classes, listed from disk:
    get_testdata_files() would also try to download the pydicom-data files."""
    found = []
    for path in sorted(p for p in TEST_FILES.rglob("*") if p.is_file() and p.suffix != ".py"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # pydicom's notes on its deliberately odd files
                sop_class = str(pydicom.dcmread(path, stop_before_pixels=True).get("SOPClassUID", ""))
        except Exception:  # noqa: BLE001 - not DICOM, or not readable: not an SR or SEG
            continue
        if (kind == "sr" and sop_class.startswith("1.2.840.10008.5.1.4.1.1.88.")) or (
                kind == "seg" and sop_class in ("1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7")):
            found.append(path)
    return found


SHIPPED_SR, SHIPPED_SEG = shipped("sr"), shipped("seg")


def test_pydicom_ships_sr_and_seg_files():
    assert len(SHIPPED_SR) >= 2 and len(SHIPPED_SEG) >= 1


@pytest.mark.parametrize("path", SHIPPED_SR + SHIPPED_SEG, ids=lambda p: p.relative_to(TEST_FILES).as_posix())
def test_every_shipped_sr_and_seg_file_ends_as_boxes_or_issues(path, stack):
    _, instances = stack
    if path in SHIPPED_SR:
        boxes, issues = read_sr(path, instances)
    else:
        boxes, issues = read_segmentation(path, instances, DEFAULT_FINDING_MAP, CLASSES)
    assert boxes or issues
    assert all(isinstance(issue, ImportIssue) and issue.reason and len(issue.detail.split()) >= 6 for issue in issues)


# --------------------------------------------------------------------------- match_class


def test_match_class_codes_text_order_and_classes():
    herniation = Code("73589001", "SCT", "Herniation of intervertebral disc")
    assert match_class(DEFAULT_FINDING_MAP, [herniation], [], CLASSES) == "disc_herniation"
    assert match_class(DEFAULT_FINDING_MAP, [hd.sr.CodedConcept("90584004", "SCT", "x")], [], CLASSES) == "cord_injury"
    assert match_class(DEFAULT_FINDING_MAP, [("SCT", "60022001")], [], CLASSES) == "disc_herniation"
    assert match_class(DEFAULT_FINDING_MAP, [("SRT", "90584004", "")], [], CLASSES) == "cord_injury"  # old designator
    assert match_class(DEFAULT_FINDING_MAP, [("LN", "73589001")], [], CLASSES) is None  # another scheme
    assert match_class(DEFAULT_FINDING_MAP, [], ["C5/6 disc protrusion"], CLASSES) == "disc_herniation"
    assert match_class(DEFAULT_FINDING_MAP, [], ["Cord contusion"], CLASSES) == "cord_injury"
    assert match_class(DEFAULT_FINDING_MAP, [("99L", "1", "myelopathy with edema")], [], CLASSES) == "cord_injury"
    assert match_class(DEFAULT_FINDING_MAP, [VERTEBRA], ["vertebra"], CLASSES) is None
    # the first entry in list order wins, whatever the order of the concepts and texts
    both = [("SCT", "90584004"), ("SCT", "73589001")]
    assert match_class(DEFAULT_FINDING_MAP, both, [], CLASSES) == "disc_herniation"
    assert match_class(list(reversed(DEFAULT_FINDING_MAP)), both, [], CLASSES) == "cord_injury"
    text_first = [{"text": "(?i)contusion", "class": "cord_injury"}, *DEFAULT_FINDING_MAP]
    assert match_class(text_first, [herniation], ["contusion"], CLASSES) == "cord_injury"
    # entries of classes the study does not have are skipped
    assert match_class(DEFAULT_FINDING_MAP, [herniation, ("SCT", "90584004")], [], ["cord_injury"]) == "cord_injury"
    assert match_class(DEFAULT_FINDING_MAP, [herniation], [], ["cord_injury"]) is None
