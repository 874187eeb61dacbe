"""The export's lesion annotations as DICOM objects a viewer can load beside the
images: a TID 1500 Measurement Report (Comprehensive 3D SR) with one rectangle
per box, stored as OHIF stores its rectangle tool, and a binary Segmentation
of the phantom's lesion masks.

Both are byte-reproducible: UIDs are derived from the source SOP Instance UIDs
and every date and time from the sources' StudyDate/StudyTime, never from the
clock.

In `synthesize_patient`, after `write_series` wrote the target series `t2`:

    sources = [pydicom.dcmread(path) for path in dict.fromkeys(item["path"] for item in t2)]
    sr = measurement_report(sources, annotations, codes, series_number=...)
    seg = segmentation(sources, label_masks(masks, [lesion.label for lesion in lesions],
                                            [item["slice_index"] for item in t2]), codes, series_number=...)

(a patient without boxes gets no SR, one without mask pixels no SEG: both raise
ValueError).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom import dcmwrite
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as dicom_codes
from pydicom.uid import generate_uid

from spinedet import __version__
from spinedet.io import write_atomically

MANUFACTURER = "spinedet demo"
SR_DESCRIPTION = "Lesion annotations (TID 1500)"
SEG_DESCRIPTION = "Lesion masks (SEG)"

# Procedure reported (TID 1500, DCID 100, extensible): LOINC 24935-9 "MR Cervical
# spine" from the LOINC radiology (Playbook) codes. Neither pydicom's nor
# highdicom's code dictionaries hold a cervical spine MRI procedure (their CID 100
# has only "MRI unspecified body region", LN 25056-3); the SNOMED CT equivalent
# is 241646009 "Magnetic resonance imaging of cervical spine".
PROCEDURE_REPORTED = hd.sr.CodedConcept("24935-9", "LN", "MR Cervical spine")

# Segmented property category (DCID 7150): SCT 49755003, pydicom's
# codes.SCT.MorphologicallyAbnormalStructure.
ABNORMAL_STRUCTURE = hd.sr.CodedConcept.from_code(dicom_codes.SCT.MorphologicallyAbnormalStructure)


def _coded(code: tuple[str, str, str]) -> hd.sr.CodedConcept:
    """(coding scheme designator, code value, code meaning) as a coded concept."""
    scheme, value, meaning = code
    return hd.sr.CodedConcept(value=value, scheme_designator=scheme, meaning=meaning)


def _label_code(codes: dict[str, tuple[str, str, str]], label: str) -> hd.sr.CodedConcept:
    if label not in codes:
        raise ValueError(f"no code for label {label!r} (codes are given for {sorted(codes)})")
    return _coded(codes[label])


def _uid(sources: Sequence[Dataset], *parts: object) -> str:
    """A UID that depends only on the sources' SOP Instance UIDs and `parts`."""
    return generate_uid(entropy_srcs=[*(str(ds.SOPInstanceUID) for ds in sources), *(str(p) for p in parts)])


def _study_moment(sources: Sequence[Dataset]) -> tuple[str, str]:
    """(date, time) of the study: every date and time of the new object."""
    first = sources[0]
    return str(first.StudyDate), str(first.get("StudyTime") or "000000")


def _check_sources(sources: Sequence[Dataset]) -> None:
    if not sources:
        raise ValueError("no source images given")
    if len({str(ds.SeriesInstanceUID) for ds in sources}) != 1:
        raise ValueError("the source images must all belong to one series")
    if len(sources) > 1 and any("NumberOfFrames" in ds for ds in sources):
        raise ValueError("give either one multi-frame (Enhanced MR) source or single-frame sources, not both")


def _fix_moments(ds: Dataset, date: str, time: str) -> None:
    """Replace what highdicom takes from the clock (instance creation, highdicom's
    contribution) by the study's date and time."""
    ds.InstanceCreationDate = date
    ds.InstanceCreationTime = time
    for item in ds.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            item.ContributionDateTime = date + time


def measurement_report(sources: list[Dataset], boxes: list[dict], codes: dict[str, tuple[str, str, str]],
                       series_number: int, instance_number: int = 1) -> Dataset:
    """A TID 1500 Measurement Report (Comprehensive 3D SR) of `boxes` on `sources`.

    ``sources`` are the MR images of one patient's target series as the demo
    writes them: classic MR Image Storage (one dataset per slice) or one Enhanced
    MR Image Storage dataset. Each box is a dict {sop_instance_uid, frame_number
    (int, or None for a single-frame instance), label, x_min, y_min, x_max, y_max}
    in pixel-edge coordinates of that instance (x = column, y = row; pixel (c, r)
    covers [c, c+1) x [r, r+1)), as in annotations.csv. ``codes`` maps each label
    to (coding scheme designator, code value, code meaning): the finding type.

    Each box becomes one Planar ROI measurement group, as OHIF stores its
    rectangle tool: a closed 5-point POLYLINE (x_min,y_min) (x_max,y_min)
    (x_max,y_max) (x_min,y_max) (x_min,y_min) on the referenced image (and frame),
    the label's code as finding type, tracking identifier "lesion <n>" (n = the
    box's place in `boxes`, from 1) and a tracking UID. The observer is a device,
    "spinedet demo". Patient and study attributes are copied from the sources.
    Raises ValueError when `boxes` is empty or a box does not fit its source.
    """
    _check_sources(sources)
    if not boxes:
        raise ValueError("no boxes given: nothing to report (a series without lesions gets no SR)")
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    date, time = _study_moment(sources)
    series_uid = _uid(sources, "spinedet annotations", "SR series", series_number)
    sop_uid = _uid(sources, "spinedet annotations", "SR instance", series_uid, instance_number)

    groups = []
    for number, box in enumerate(boxes, start=1):
        uid = str(box["sop_instance_uid"])
        if uid not in by_uid:
            raise ValueError(f"box {number} refers to instance {uid}, which is not among the sources")
        source = by_uid[uid]
        multiframe = "NumberOfFrames" in source
        frame = box.get("frame_number")
        frame = None if frame is None or frame == "" else int(frame)
        if multiframe and (frame is None or not 1 <= frame <= int(source.NumberOfFrames)):
            raise ValueError(f"box {number}: frame number {frame} is not a frame of the multi-frame source "
                             f"(1..{source.NumberOfFrames})")
        if not multiframe and frame is not None:
            raise ValueError(f"box {number}: frame number {frame} given for a single-frame source")
        x0, y0, x1, y1 = (float(box[key]) for key in ("x_min", "y_min", "x_max", "y_max"))
        if not (0 <= x0 < x1 <= int(source.Columns) and 0 <= y0 < y1 <= int(source.Rows)):
            raise ValueError(f"box {number} ({x0:g}, {y0:g}, {x1:g}, {y1:g}) is empty or outside the "
                             f"{source.Columns}x{source.Rows} image")
        # SCOORD Graphic Data (0070,0022) are (column, row) pairs: 0.0\0.0 is the top
        # left corner of the top left pixel, 1.0\1.0 its bottom right corner and
        # Columns\Rows the bottom right corner of the bottom right pixel (PS3.3
        # C.18.6, Spatial Coordinates Macro; highdicom.spatial's
        # ImageToReferenceTransformer docstring states the same). Pixel-edge box
        # coordinates are SCOORD coordinates as they are, without a half-pixel shift.
        corners = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=float)
        region = hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
            graphic_data=corners,
            source_image=hd.sr.SourceImageForRegion(
                referenced_sop_class_uid=str(source.SOPClassUID),
                referenced_sop_instance_uid=uid,
                referenced_frame_numbers=None if frame is None else [frame],
            ),
            pixel_origin_interpretation=hd.sr.PixelOriginInterpretationValues.FRAME if multiframe else None,
        )
        groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=_uid(sources, "spinedet annotations", "tracking", sop_uid, number),
                identifier=f"lesion {number}",
            ),
            referenced_region=region,
            finding_type=_label_code(codes, str(box["label"])),
        ))

    observer = hd.sr.ObserverContext(
        observer_type=dicom_codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=_uid(sources, "spinedet annotations", "device observer"),
            name=MANUFACTURER,
            manufacturer_name=MANUFACTURER,
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=PROCEDURE_REPORTED,
        imaging_measurements=groups,
    )
    ds = hd.sr.Comprehensive3DSR(
        evidence=sources,
        content=report,
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=sop_uid,
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        is_complete=True,
        series_description=SR_DESCRIPTION,
        content_date=date,
        content_time=time,
        series_date=date,
        series_time=time,
    )
    _fix_moments(ds, date, time)
    return ds


def label_masks(masks: np.ndarray, labels: Sequence[str], slice_indices: Sequence[int]) -> dict[str, np.ndarray]:
    """The phantom's lesion masks as `segmentation` takes them: {label: bool
    (len(slice_indices), rows, cols)}, the union of that label's lesions.

    ``masks`` is bool (n_lesions, n_slices, rows, cols) in spatial slice order
    (`render_series`'s masks; `CaseTruth.masks`), ``labels`` the lesions' labels
    and ``slice_indices[i]`` the spatial slice of the i-th source image (classic)
    or frame (Enhanced MR): in `synthesize_patient`, ``[item["slice_index"] for
    item in t2]``; from the truth, ``np.argsort(truth.instance_numbers)``.
    """
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 4 or len(masks) != len(labels):
        raise ValueError(f"masks must be (n_lesions={len(labels)}, n_slices, rows, cols), got {masks.shape}")
    order = np.asarray(slice_indices, dtype=int)
    result = {}
    for label in dict.fromkeys(labels):
        lesions = [index for index, name in enumerate(labels) if name == label]
        result[label] = masks[lesions].any(axis=0)[order]
    return result


def segmentation(sources: list[Dataset], masks: dict[str, np.ndarray], codes: dict[str, tuple[str, str, str]],
                 series_number: int, instance_number: int = 1) -> Dataset:
    """A binary Segmentation of `sources` with one segment per label of `masks`
    that holds any pixel.

    ``masks[label]`` is a bool array aligned with the source frames: for classic
    sources (one dataset per slice) shape (len(sources), rows, cols) in the order
    of `sources`; for one Enhanced MR source (frames, rows, cols) in frame order.
    In the demo these are the phantom's lesion masks (`render_series` in
    `synthesize_patient`, kept in truth/ as `CaseTruth.masks`): bool (n_lesions,
    n_slices, rows, cols) in *spatial* slice order, which `label_masks` merges
    per label and reorders to the sources' order. They hold every pixel at
    least half filled by a lesion, also on the edge slices that get no box.

    Each segment: label name as segment label, category "Morphologically
    abnormal structure" (SCT 49755003), the label's code as property type,
    algorithm type MANUAL. Frames without any segment pixel are left out.
    Raises ValueError when no mask holds any pixel.
    """
    _check_sources(sources)
    multiframe = len(sources) == 1 and "NumberOfFrames" in sources[0]
    n_frames = int(sources[0].NumberOfFrames) if multiframe else len(sources)
    shape = (n_frames, int(sources[0].Rows), int(sources[0].Columns))
    labels, stacked = [], []
    for label, mask in masks.items():
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != shape:
            raise ValueError(f"the mask of {label!r} has shape {mask.shape}, the source frames {shape}")
        if mask.any():
            labels.append(label)
            stacked.append(mask)
    if not labels:
        raise ValueError(f"no mask holds any pixel (labels {sorted(masks)}): nothing to segment")

    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=label,
            segmented_property_category=ABNORMAL_STRUCTURE,
            segmented_property_type=_label_code(codes, label),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        )
        for number, label in enumerate(labels, start=1)
    ]
    date, time = _study_moment(sources)
    series_uid = _uid(sources, "spinedet annotations", "SEG series", series_number)
    sop_uid = _uid(sources, "spinedet annotations", "SEG instance", series_uid, instance_number)
    ds = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=np.stack(stacked, axis=-1),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=sop_uid,
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        manufacturer_model_name="spinedet synthesize",
        software_versions=f"spinedet {__version__}",
        device_serial_number="0",
        series_description=SEG_DESCRIPTION,
        content_date=date,
        content_time=time,
        series_date=date,
        series_time=time,
    )
    _fix_moments(ds, date, time)
    # highdicom draws the dimension organization UID at random.
    dimension_uid = _uid(sources, "spinedet annotations", "SEG dimension organization", sop_uid)
    for item in [*ds.get("DimensionOrganizationSequence", []), *ds.get("DimensionIndexSequence", [])]:
        item.DimensionOrganizationUID = dimension_uid
    return ds


def write(dataset: Dataset, path: str | Path) -> None:
    """Save `dataset` as a DICOM file (with file meta information), atomically."""
    write_atomically(path, lambda tmp: dcmwrite(tmp, dataset, enforce_file_format=True))
