"""Boxes from DICOM SR TID 1500 measurement reports (OHIF, highdicom, dcmqi).

`read_measurement_report` reads one SR with highdicom and turns every
measurement group of its Imaging Measurements container into boxes or issues:
its class from the finding map (finding type, category, sites, qualitative
evaluations, tracking identifier, free text), its region into the bounding box
of the shape on the referenced MR instance (and frame, for Enhanced MR).

Coordinates. SCOORD Graphic Data are (column, row) pairs at sub-pixel
resolution whose origin 0.0\\0.0 is the top left hand corner of the top left
pixel: the bottom right corner of that pixel is 1.0\\1.0, the bottom right
corner of the bottom right pixel Columns\\Rows (PS3.3 C.18.6.1, the Spatial
Coordinates Macro, in the wording of the presentation state's Graphic Data,
C.10.5.1.2; highdicom.spatial.ImageToReferenceTransformer documents the same
origin and shifts pixel indices by 0.5 for it). These are the project's
pixel-edge coordinates, so a rectangle's vertices are its box edges, with no
0.5 shift. SCOORD3D points (patient LPS, mm) go through spinedet.geometry:
`lps_to_pixel` gives index coordinates (pixel centres on integers) and the
distance off the image plane; + 0.5 makes them edges.

Every group that gives no box becomes an ImportIssue; nothing raises.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import UID, Comprehensive3DSRStorage, ComprehensiveSRStorage, EnhancedSRStorage

from spinedet.geometry import lps_to_pixel, slice_normal
from spinedet.ingest.annotations.findings import (
    ImportedBox,
    ImportIssue,
    box_fields,
    describe_concept,
    exception_text,
    match_class,
    object_ref,
    unreadable_issue,
)
from spinedet.ingest.dicom import image_planes

SOURCE = "sr"
SR_STORAGE_PREFIX = "1.2.840.10008.5.1.4.1.1.88."
# The SR storage classes that can hold a TID 1500 report's image regions, and
# highdicom's reader of each.
READERS = {
    ComprehensiveSRStorage: hd.sr.ComprehensiveSR,
    Comprehensive3DSRStorage: hd.sr.Comprehensive3DSR,
    EnhancedSRStorage: hd.sr.EnhancedSR,
}
MEASUREMENT_REPORT_TEMPLATE = "1500"
PLANAR_TEMPLATE, VOLUMETRIC_TEMPLATE = "1410", "1411"
# Graphic types this importer turns into boxes.
REGION_TYPES = ("POLYLINE", "POLYGON", "CIRCLE", "ELLIPSE", "POINT", "MULTIPOINT")
# A polyline is closed when its last point is its first, to this many pixels
# (2-D, pixel units) or mm (3-D).
CLOSED_TOLERANCE = 1e-3
# A 3-D region on a single-slice series without SliceThickness must lie on
# the plane to this distance (mm).
PLANE_TOLERANCE_MM = 0.01


@dataclass
class _Region:
    """One drawn shape: `points` (N, 2) pixel-edge coordinates of the
    referenced image or (N, 3) LPS mm; `reference` (SOPInstanceUID, frame
    numbers or None) when the shape names its image."""

    graphic_type: str
    points: np.ndarray
    reference: tuple[str, list[int] | None] | None
    suffix: str = ""

    @property
    def is_3d(self) -> bool:
        return self.points.shape[1] == 3


class _Unusable(Exception):
    """A region that gives no box: an ImportIssue's reason and detail."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def read_measurement_report(path, instances: dict[str, dict], finding_map: list[dict], classes,
                            point_box_mm: dict[str, float]) -> tuple[list[ImportedBox], list[ImportIssue]]:
    """Boxes and issues of one DICOM SR file (see the module docstring).

    `instances`: SOPInstanceUID -> files.csv row of every accepted MR image.
    A SCOORD3D region without an image reference goes to the nearest image
    plane of the report's study among them: pass only the target series'
    instances when the study has several series of the same geometry.
    `point_box_mm`: class -> side (mm) of the square box around a POINT.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            # pydicom and highdicom warn with header values verbatim (a UID, a name): never into logs/
            warnings.simplefilter("ignore")
            return _read_report(path, instances, finding_map, list(classes), point_box_mm)
    except Exception as exc:  # noqa: BLE001 - one bad object is an issue, never an exception
        return [], [unreadable_issue(SOURCE, path, exc)]


def _read_report(path: Path, instances: dict[str, dict], finding_map: list[dict], classes: list[str],
                 point_box_mm: dict[str, float]) -> tuple[list[ImportedBox], list[ImportIssue]]:
    dataset = pydicom.dcmread(path)
    sr_uid = str(dataset.get("SOPInstanceUID", "") or "")
    ref = object_ref(path, sr_uid)
    patient_id = str(dataset.get("PatientID", "") or "")
    try:
        why_not = _not_a_measurement_report(dataset)
        if why_not:
            return [], [ImportIssue(SOURCE, ref, "sr_not_measurement_report", why_not, patient_id)]
        groups = _measurement_groups(dataset)
    except Exception as exc:  # noqa: BLE001 - highdicom cannot parse the content tree
        return [], [unreadable_issue(SOURCE, path, exc, sr_uid, patient_id)]
    if not groups:
        return [], [ImportIssue(SOURCE, ref, "empty_report", "a TID 1500 measurement report without "
                                "measurement groups: nothing was drawn, nothing to import", patient_id)]

    context = _Context(instances, finding_map, classes, point_box_mm,
                       str(dataset.get("StudyInstanceUID", "") or ""), patient_id)
    boxes, issues = [], []
    for number, group in enumerate(groups, start=1):
        group_ref = f"{ref}#roi{number}"
        try:
            found, problems = _read_group(group, group_ref, context)
        except Exception as exc:  # noqa: BLE001 - the other groups go on
            found, problems = [], [ImportIssue(
                SOURCE, group_ref, "unreadable_object", f"this measurement group cannot be read "
                f"({exception_text(exc, path)}): check it in the annotation tool and re-export", patient_id)]
        boxes += found
        issues += problems
    return boxes, issues


@dataclass
class _Context:
    instances: dict[str, dict]
    finding_map: list[dict]
    classes: list[str]
    point_box_mm: dict[str, float]
    study_uid: str
    patient_id: str
    _planes_by_series: dict | None = None
    _half_slabs: dict = field(default_factory=dict)

    def series_planes(self) -> dict[str, list[tuple[dict, dict]]]:
        """series_uid -> (files.csv row, plane) of every image (every frame) of the instances."""
        if self._planes_by_series is None:
            self._planes_by_series = defaultdict(list)
            for row in self.instances.values():
                self._planes_by_series[row.get("series_uid", "")] += _planes(row)
        return self._planes_by_series

    def study_planes(self) -> list[tuple[dict, dict]]:
        """(files.csv row, plane) of every image of the report's study."""
        return [(row, plane) for planes in self.series_planes().values() for row, plane in planes
                if row.get("study_uid") == self.study_uid]

    def half_slab(self, row: dict, plane: dict) -> float:
        """Half the slice spacing of the plane's series (its planes of the same
        orientation), else half its slice thickness, else PLANE_TOLERANCE_MM."""
        iop = np.asarray(plane["iop"], dtype=float)
        key = (row.get("series_uid", ""), tuple(np.round(iop, 4)), row.get("slice_thickness", ""))
        if key not in self._half_slabs:
            normal = slice_normal(iop)
            positions = sorted({round(float(np.dot(p["ipp"], normal)), 3)
                                for _, p in self.series_planes().get(key[0], [])
                                if np.allclose(p["iop"], iop, atol=1e-4)})
            steps = [step for step in np.diff(positions) if step > 1e-3]
            if steps:
                self._half_slabs[key] = float(np.median(steps)) / 2
            else:
                try:
                    thickness = float(row.get("slice_thickness") or 0)
                except ValueError:
                    thickness = 0.0
                self._half_slabs[key] = thickness / 2 if thickness > 0 else PLANE_TOLERANCE_MM
        return self._half_slabs[key]


def _planes(row: dict) -> list[tuple[dict, dict]]:
    """(row, plane) of each image of a files.csv row (spinedet.ingest.dicom.image_planes); none when unreadable."""
    try:
        return [(row, plane) for plane in image_planes(row)]
    except (ValueError, KeyError, TypeError):
        return []


# --------------------------------------------------------------------------
# The document


def _not_a_measurement_report(dataset: Dataset) -> str:
    """Why the document is not a TID 1500 report this reader can use ('' when it is).

    A root container named Imaging Measurement Report without its template
    identifier (allowed by the standard) gets it, so highdicom reads it as one.
    """
    sop_class = str(dataset.get("SOPClassUID", "") or "")
    name = UID(sop_class).name if sop_class else "missing"
    if not sop_class.startswith(SR_STORAGE_PREFIX):
        return f"SOP class {name} is not a structured report: nothing to import as SR"
    if sop_class not in READERS:
        return (f"{name} cannot hold the image regions of a TID 1500 measurement report: export the "
                "annotations as Comprehensive (3D) SR")
    templates = dataset.get("ContentTemplateSequence") or []
    template = str(templates[0].get("TemplateIdentifier", "")) if templates else ""
    concepts = dataset.get("ConceptNameCodeSequence") or []
    title = concepts[0] if concepts else Dataset()
    is_report_title = (title.get("CodingSchemeDesignator"), title.get("CodeValue")) == (
        codes.DCM.ImagingMeasurementReport.scheme_designator, codes.DCM.ImagingMeasurementReport.value)
    if template == MEASUREMENT_REPORT_TEMPLATE:
        return ""
    if not template and is_report_title:
        item = Dataset()
        item.MappingResource = "DCMR"
        item.TemplateIdentifier = MEASUREMENT_REPORT_TEMPLATE
        dataset.ContentTemplateSequence = [item]
        return ""
    what = f"'{title.get('CodeMeaning', '')}'" if title else "untitled"
    return (f"the document ({what}, template {template or 'none'}) is not a TID 1500 measurement report: "
            "it holds no measurement groups with image regions to import")


def _measurement_groups(dataset: Dataset) -> list:
    """The Measurement Group containers of the report's Imaging Measurements, in document order."""
    document = READERS[dataset.SOPClassUID].from_dataset(dataset, copy=False)
    containers = hd.sr.utils.find_content_items(document.content[0], name=codes.DCM.ImagingMeasurements,
                                                value_type=hd.sr.ValueTypeValues.CONTAINER)
    groups = []
    for container in containers:
        groups += hd.sr.utils.find_content_items(container, name=codes.DCM.MeasurementGroup,
                                                 value_type=hd.sr.ValueTypeValues.CONTAINER)
    return groups


def _group_kind(item) -> str:
    """'planar' (TID 1410), 'volumetric' (TID 1411) or 'none' (no region, e.g. TID 1501).

    Without a template identifier, as highdicom decides: one image region (2-D
    or 3-D) or a segmentation frame is planar; several 2-D regions, a volume
    surface or a referenced segment are volumetric.
    """
    template = getattr(item, "template_id", None)
    if template == PLANAR_TEMPLATE:
        return "planar"
    if template == VOLUMETRIC_TEMPLATE:
        return "volumetric"
    children = list(getattr(item, "ContentSequence", None) or [])
    regions = [child for child in children if child.name == codes.DCM.ImageRegion]
    several_2d = sum(child.ValueType == "SCOORD" for child in regions) > 1
    if several_2d or any(child.name in (codes.DCM.VolumeSurface, codes.DCM.ReferencedSegment) for child in children):
        return "volumetric"
    if len(regions) == 1 or any(child.name == codes.DCM.ReferencedSegmentationFrame for child in children):
        return "planar"
    return "none"


# --------------------------------------------------------------------------
# One measurement group


def _read_group(item, group_ref: str, context: _Context) -> tuple[list[ImportedBox], list[ImportIssue]]:
    kind = _group_kind(item)
    template_class = {
        "planar": hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations,
        "volumetric": hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations,
        "none": hd.sr.MeasurementsAndQualitativeEvaluations,
    }[kind]
    group = template_class.from_sequence([item])
    concepts, texts = _finding_terms(group, item)
    label = match_class(context.finding_map, concepts, texts, context.classes)
    if label is None:
        return [], [ImportIssue(
            SOURCE, group_ref, "unknown_finding", f"finding type {describe_concept(group.finding_type)} "
            f"matches none of the classes {context.classes}: add its code or text to finding_map, or relabel "
            "the ROI", context.patient_id)]
    try:
        regions = _regions(group, kind)
    except _Unusable as unusable:
        return [], [ImportIssue(SOURCE, group_ref, unusable.reason, unusable.detail, context.patient_id, label)]
    boxes, issues = [], []
    for region in regions:
        found, problems = _region_boxes(region, label, f"{group_ref}{region.suffix}", context)
        boxes += found
        issues += problems
    return boxes, issues


def _finding_terms(group, item) -> tuple[list, list[str]]:
    """The coded concepts and texts that say what a group marks: finding type,
    category and sites (highdicom), then the value of every other coded or
    text item of the group (qualitative evaluations, OHIF's free-text label
    coded as CORNERSTONEFREETEXT, a finding site under an old concept name)."""
    concepts = [group.finding_type, group.finding_category, *(site.value for site in group.finding_sites)]
    texts = [group.tracking_identifier]
    for child in getattr(item, "ContentSequence", None) or []:
        if child.ValueType == "CODE" and child.get("ConceptCodeSequence"):
            code = child.ConceptCodeSequence[0]
            concepts.append((code.get("CodingSchemeDesignator", ""), code.get("CodeValue", ""),
                             code.get("CodeMeaning", "")))
        elif child.ValueType == "TEXT":
            texts.append(str(child.get("TextValue", "") or ""))
    return [concept for concept in concepts if concept is not None], [text for text in texts if text]


def _image_reference(item) -> tuple[str, list[int] | None] | None:
    """(SOPInstanceUID, frame numbers or None) of the first image a content item is SELECTED FROM."""
    for child in getattr(item, "ContentSequence", None) or []:
        if child.ValueType != "IMAGE" or not child.get("ReferencedSOPSequence"):
            continue
        sop = child.ReferencedSOPSequence[0]
        frames = sop.get("ReferencedFrameNumber")
        if frames is None or frames == "":
            numbers = None
        else:
            numbers = [int(f) for f in (frames if isinstance(frames, (list, tuple, pydicom.multival.MultiValue))
                                        else [frames])]
        return str(sop.get("ReferencedSOPInstanceUID", "")), numbers
    return None


def _scoord(item, suffix: str = "") -> _Region:
    width = 3 if item.ValueType == "SCOORD3D" else 2
    points = np.asarray(item.GraphicData, dtype=float).reshape(-1, width)
    return _Region(str(item.GraphicType).strip().upper(), points, _image_reference(item), suffix)


def _regions(group, kind: str) -> list[_Region]:
    """The shapes of a group, or _Unusable when it has none this importer reads."""
    if kind == "none":
        raise _Unusable("unsupported_graphic", "the measurement group has no image region (a measurement "
                        "of a whole image): draw a shape around the finding")
    try:
        reference_type = group.reference_type
    except RuntimeError:
        reference_type = None
    roi = group.roi
    if roi is None:
        if reference_type in (codes.DCM.ReferencedSegmentationFrame, codes.DCM.ReferencedSegment):
            raise _Unusable("unsupported_graphic", "the region is a segment of a DICOM SEG object: import "
                            "that SEG itself")
        raise _Unusable("unsupported_graphic", "the measurement group has no SCOORD or SCOORD3D image "
                        "region (e.g. an RT structure set ROI): export the ROI as a shape or as a SEG")
    if isinstance(roi, list):  # volumetric: one 2-D region per image
        return [_scoord(region, f"/region{k}" if len(roi) > 1 else "") for k, region in enumerate(roi, start=1)]
    if isinstance(roi, hd.sr.VolumeSurface):
        graphic_type = roi.graphic_type.value
        if graphic_type not in REGION_TYPES:
            raise _Unusable("unsupported_graphic", f"a {graphic_type} volume surface spans slices: draw the "
                            "finding on the slice where it is largest")
        elements = [np.asarray(roi.graphic_data, dtype=float)] if graphic_type == "POINT" else [
            np.asarray(data, dtype=float) for data in roi.graphic_data]
        return [_Region(graphic_type, data.reshape(-1, 3), None, f"/region{k}" if len(elements) > 1 else "")
                for k, data in enumerate(elements, start=1)]
    region = _scoord(roi)
    if region.is_3d and region.reference is None:
        region.reference = _image_reference(group[0])
    return [region]


# --------------------------------------------------------------------------
# Regions to boxes


def _region_boxes(region: _Region, label: str, ref: str, context: _Context) -> tuple[list[ImportedBox], list[ImportIssue]]:
    try:
        placements = _place_3d(region, context) if region.is_3d else _place_2d(region, context)
        shapes = [(row, plane, _extents(region.graphic_type, points, label, context.point_box_mm,
                                        plane["pixel_spacing"]))
                  for row, plane, points in placements]
    except _Unusable as unusable:
        row = context.instances.get(region.reference[0]) if region.reference else None
        patient = (row or {}).get("patient_id", "") or context.patient_id
        return [], [ImportIssue(SOURCE, ref, unusable.reason, unusable.detail, patient, label)]
    boxes, issues = [], []
    for row, plane, extents in shapes:
        frame = plane["frame_number"]
        for suffix, box in extents:
            box_ref = f"{ref}{suffix}" + (f":frame{frame}" if len(shapes) > 1 else "")
            clipped = _clip(box, int(row["columns"]), int(row["rows"]))
            if clipped is None:
                issues.append(ImportIssue(
                    SOURCE, box_ref, "outside_image", f"the box x {_fmt(box[0])}..{_fmt(box[2])}, y "
                    f"{_fmt(box[1])}..{_fmt(box[3])} lies outside the {row['columns']} x {row['rows']} image: "
                    "redraw it on the image", row.get("patient_id", "") or context.patient_id, label))
                continue
            boxes.append(ImportedBox(**box_fields(row), frame_number=frame, label=label,
                                     x_min=clipped[0], y_min=clipped[1], x_max=clipped[2], y_max=clipped[3],
                                     source=SOURCE, source_ref=box_ref))
    return boxes, issues


def _unknown_instance(uid: str) -> _Unusable:
    return _Unusable("references_unknown_instance", f"the region is drawn on instance {uid or '(none given)'}, "
                     "which is not an accepted MR image of the inventory (another modality, another export, or "
                     "quarantined): export the report together with the MR images it was drawn on")


def _place_2d(region: _Region, context: _Context) -> list[tuple[dict, dict, np.ndarray]]:
    """(files.csv row, plane, edge points) of each image (frame) the 2-D region is on."""
    if region.reference is None:
        raise _Unusable("references_unknown_instance", "the region names no image (no SELECTED FROM image "
                        "reference): re-export the report from the annotation tool")
    uid, frames = region.reference
    row = context.instances.get(uid)
    if row is None:
        raise _unknown_instance(uid)
    wanted = _frames(row, frames)
    placed = [(row, plane, region.points) for _, plane in _planes(row) if plane["frame_number"] in wanted]
    if not placed:
        raise _Unusable("unknown_frame", f"the region's frame reference {frames or '(none)'} matches no frame of "
                        "the instance: re-export the report from the images it was drawn on")
    return placed


def _frames(row: dict, frames: list[int] | None) -> list[int | None]:
    """The frame numbers a reference names on an instance: [None] for a single-frame image."""
    count = int(row.get("frames") or 1)
    if count > 1:
        if not frames:
            raise _Unusable("unknown_frame", f"the instance is a multi-frame image of {count} frames and the "
                            "region gives no frame number: re-export the report with its frame reference")
        wrong = [f for f in frames if not 1 <= f <= count]
        if wrong:
            raise _Unusable("unknown_frame", f"frame {wrong[0]} is not one of the instance's {count} frames: "
                            "re-export the report from the images it was drawn on")
        return list(dict.fromkeys(frames))
    if frames and any(f != 1 for f in frames):
        raise _Unusable("unknown_frame", f"frame {frames[0]} given for a single-frame instance: re-export the "
                        "report from the images it was drawn on")
    # None for a classic image, 1 for an Enhanced MR file of one frame
    return [_planes(row)[0][1]["frame_number"]]


def _place_3d(region: _Region, context: _Context) -> list[tuple[dict, dict, np.ndarray]]:
    """The image plane a 3-D region lies on, and its points as pixel-edge coordinates there.

    The referenced instance (and frame) when the region names one, else the
    nearest plane of the report's study whose slab (half the series' slice
    spacing, or half the slice thickness of a single slice) holds every point.
    """
    if region.reference is not None:
        uid, frames = region.reference
        row = context.instances.get(uid)
        if row is None:
            raise _unknown_instance(uid)
        candidates = _planes(row)
        if frames:
            wanted = _frames(row, frames)
            candidates = [(r, p) for r, p in candidates if p["frame_number"] in wanted]
    else:
        candidates = context.study_planes()
        if not candidates:
            raise _Unusable("references_unknown_instance", "no accepted MR image of the report's study is in "
                            "the inventory: export the report together with the MR images it was drawn on")
    if not candidates:
        raise _Unusable("unknown_frame", f"the region's frame reference {region.reference[1]} matches no frame "
                        "of the instance: re-export the report from the images it was drawn on")
    scored = []
    for row, plane in candidates:
        pixel = lps_to_pixel(region.points, plane["ipp"], plane["iop"], plane["pixel_spacing"])
        distance = float(np.max(np.abs(pixel[:, 2])))
        order = (distance, str(row.get("series_uid", "")), _number(row.get("instance_number")),
                 plane["frame_number"] or 0)
        scored.append((order, context.half_slab(row, plane), row, plane, pixel))
    scored.sort(key=lambda s: s[0])
    inside = [s for s in scored if s[0][0] <= s[1]]
    if not inside:
        distance, half = scored[0][0][0], scored[0][1]
        if region.reference is not None:
            raise _Unusable("outside_image", f"the 3-D region lies {distance:.2f} mm off the plane of the image "
                            f"it references (half slab {half:.2f} mm): redraw it on that image")
        raise _Unusable("references_unknown_instance", f"the 3-D region lies {distance:.2f} mm from the nearest "
                        f"image plane of the study (half slab {half:.2f} mm): it is on no accepted MR image; "
                        "export the report together with the images it was drawn on")
    _, _, row, plane, pixel = inside[0]
    # lps_to_pixel gives index coordinates (pixel centres on integers): + 0.5 makes them edges.
    return [(row, plane, pixel[:, :2] + 0.5)]


def _number(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("inf")


def _closed(points: np.ndarray) -> bool:
    return len(points) >= 4 and bool(np.allclose(points[0], points[-1], atol=CLOSED_TOLERANCE))


def _extents(graphic_type: str, points: np.ndarray, label: str, point_box_mm: dict[str, float],
             pixel_spacing: list[float]) -> list[tuple[str, tuple[float, float, float, float]]]:
    """(suffix, (x_min, y_min, x_max, y_max)) of each box a shape gives, from its
    pixel-edge points: the bounding box of a closed polyline, polygon, circle
    or ellipse; a square of point_box_mm[label] mm around each point."""
    # SCOORD points are pixel edges already (0.0 is the top left corner of
    # the top left pixel, see the module docstring): extents need no shift.
    points = np.asarray(points, dtype=float)
    if graphic_type == "POLYLINE" and not _closed(points):
        raise _Unusable("unsupported_graphic", "an open POLYLINE (a line or distance measurement, not a "
                        "region): draw a closed shape (rectangle, polygon, ellipse) around the finding")
    if graphic_type in ("POLYLINE", "POLYGON"):
        if len(points) < 3:
            raise _Unusable("unsupported_graphic", f"a {graphic_type} of {len(points)} points encloses no "
                            "region: draw a closed shape around the finding")
        low, high = points.min(axis=0), points.max(axis=0)
    elif graphic_type == "CIRCLE":
        _expect(graphic_type, points, 2)
        radius = float(np.linalg.norm(points[1] - points[0]))
        low, high = points[0] - radius, points[0] + radius
    elif graphic_type == "ELLIPSE":
        _expect(graphic_type, points, 4)
        # c + u cos t + v sin t with u, v the semi-axes: the extent along each
        # image axis is sqrt(u_i^2 + v_i^2) (also for conjugate semi-axes,
        # which is what the axes become after a 3-D projection).
        centre = (points[0] + points[1]) / 2
        u, v = (points[1] - points[0]) / 2, (points[3] - points[2]) / 2
        half = np.sqrt(u ** 2 + v ** 2)
        low, high = centre - half, centre + half
    elif graphic_type in ("POINT", "MULTIPOINT"):
        side = point_box_mm.get(label)
        if not side or float(side) <= 0:
            raise _Unusable("unsupported_graphic", f"a {graphic_type} gives a box only with a size: set "
                            f"point_box_mm for class {label}")
        # PixelSpacing is (row spacing, column spacing): x (columns) uses the second.
        half = np.array([float(side) / pixel_spacing[1], float(side) / pixel_spacing[0]]) / 2
        return [(f"/point{k}" if len(points) > 1 else "", _box(point - half, point + half))
                for k, point in enumerate(points, start=1)]
    else:
        raise _Unusable("unsupported_graphic", f"graphic type {graphic_type or 'none'} is not a region this "
                        f"importer reads ({', '.join(REGION_TYPES)})")
    if np.any(high - low <= 0):
        raise _Unusable("unsupported_graphic", f"the {graphic_type} has no area (all points on one line): draw "
                        "a shape around the finding")
    return [("", _box(low, high))]


def _expect(graphic_type: str, points: np.ndarray, count: int) -> None:
    if len(points) != count:
        raise _Unusable("unsupported_graphic", f"a {graphic_type} needs {count} points, this one has "
                        f"{len(points)}: re-export it from the annotation tool")


def _box(low, high) -> tuple[float, float, float, float]:
    return (float(low[0]), float(low[1]), float(high[0]), float(high[1]))


def _clip(box, columns: int, rows: int) -> tuple | None:
    """The box clipped to the image [0, columns] x [0, rows]; None when nothing is left."""
    x_min, y_min = max(box[0], 0.0), max(box[1], 0.0)
    x_max, y_max = min(box[2], float(columns)), min(box[3], float(rows))
    if x_max <= x_min or y_max <= y_min:
        return None
    return tuple(_edge(v) for v in (x_min, y_min, x_max, y_max))


def _edge(value: float):
    """Whole pixels (within rounding) as int, else to 1e-4 pixel."""
    rounded = round(value)
    return int(rounded) if abs(value - rounded) <= 1e-6 else round(float(value), 4)


def _fmt(value: float) -> str:
    return f"{value:.4g}"
