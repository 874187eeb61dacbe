"""predict's detections as a DICOM SR a viewer draws: a Comprehensive 3D SR
holding a TID 1500 Measurement Report (highdicom).

One Planar ROI Measurement Group (TID 1410) per detection:
- region: a closed 5-point POLYLINE (x_min,y_min) (x_max,y_min) (x_max,y_max)
  (x_min,y_max) (x_min,y_min) in the source instance's pixel-edge
  coordinates (SCOORD: 0.0\\0.0 is the top left corner of the top left pixel,
  so box edges are graphic data as they are), with the frame number for a
  frame of an Enhanced MR instance; this is how OHIF stores its rectangles;
- finding type: the class's code, the first `code` entry of the class in
  `annotation_import.finding_map` (so `spinedet annotations` reads the SR back
  as boxes of that class);
- the score: a NUM measurement "Score" (SCT 246262008), unit "1" (UCUM, no
  units);
- algorithm identification (TID 4019): name "spinedet", spinedet's version,
  parameters model=<name>, weights_sha256=<hex>, score_threshold=<t>.

Patient and study attributes are copied from the evidence (the analysed
series' instances): the SR identifies the patient and, like detections.json,
is clinical output that never goes under results/.

`read_detection_sr` reads such an SR back (highdicom) into box dicts, the
shape of detections.json's `dicom` boxes, with label and score.
"""

from __future__ import annotations

import datetime
import hashlib
import warnings
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as dicom_codes
from pydicom.uid import generate_uid

from spinedet import SpinedetError, __version__, silence_dicom_libraries
from spinedet.io import write_atomically

ALGORITHM_NAME = "spinedet"
MANUFACTURER = "spinedet"
SERIES_DESCRIPTION = "spinedet detections (TID 1500)"
SERIES_NUMBER = 9901
SR_FILE = "detections_sr.dcm"

# Procedure reported (DCID 100, extensible): LOINC 24935-9 "MR Cervical spine", as the demo's SR.
PROCEDURE_REPORTED = hd.sr.CodedConcept("24935-9", "LN", "MR Cervical spine")
# The detector's score: SNOMED CT 246262008 |Score (attribute)|, without unit (UCUM "1").
SCORE = hd.sr.CodedConcept.from_code(dicom_codes.SCT.Score)
NO_UNITS = hd.sr.CodedConcept.from_code(dicom_codes.UCUM.NoUnits)
BOX_KEYS = ("x_min", "y_min", "x_max", "y_max")


def class_codes(config: dict) -> dict[str, tuple[str, str, str]]:
    """Each class's finding code (scheme, value, meaning): the first `code` entry of the class
    in annotation_import.finding_map (the defaults when the config has none)."""
    from spinedet.config import finding_codes
    from spinedet.ingest.annotations.findings import DEFAULT_FINDING_MAP

    finding_map = (config.get("annotation_import") or {}).get("finding_map") or DEFAULT_FINDING_MAP
    return finding_codes({"annotation_import": {"finding_map": finding_map}})


def weights_sha256(path: Path | None) -> str | None:
    """The SHA-256 (hex) of the weights file; None without a file."""
    if path is None or not Path(path).is_file():
        return None
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def algorithm_identification(model_name: str | None, sha256: str | None,
                             score_threshold: float) -> hd.sr.AlgorithmIdentification:
    parameters = [f"model={model_name or 'unknown'}"]
    if sha256:
        parameters.append(f"weights_sha256={sha256}")
    parameters.append(f"score_threshold={score_threshold:g}")
    return hd.sr.AlgorithmIdentification(name=ALGORITHM_NAME, version=__version__, parameters=parameters)


def _uid(sources: Sequence[Dataset], *parts: object) -> str:
    """A UID that depends only on the sources' SOP Instance UIDs and `parts`: the same
    prediction (input, weights, threshold) gives the same SR UIDs, so storing it twice
    into a PACS does not add a second report."""
    return generate_uid(entropy_srcs=[*(str(ds.SOPInstanceUID) for ds in sources), *(str(p) for p in parts)])


def read_sources(paths: Sequence[Path]) -> list[Dataset]:
    """The evidence: headers (no pixels) of the analysed series' instances."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns with header values verbatim
        return [pydicom.dcmread(path, stop_before_pixels=True) for path in dict.fromkeys(map(str, paths))]


def _score_inferred_from_region(group, region: hd.sr.ImageRegion) -> None:
    """The score NUM gets its region as INFERRED FROM coordinates (TID 300 row 8, TID 320).
    OHIF (3.13) looks for a finding's coordinates under each NUM of the group: without them it
    lists no finding of the report ("No spatial coordinates group found"). highdicom refuses
    referenced coordinates in a Planar ROI group's measurements, so they are added after it
    is built."""
    reference = region.ContentSequence[0].ReferencedSOPSequence[0]
    frames = reference.get("ReferencedFrameNumber")
    source = hd.sr.SourceImageForRegion(
        referenced_sop_class_uid=str(reference.ReferencedSOPClassUID),
        referenced_sop_instance_uid=str(reference.ReferencedSOPInstanceUID),
        referenced_frame_numbers=None if frames is None else [int(f) for f in np.atleast_1d(frames)],
    )
    coordinates = hd.sr.CoordinatesForMeasurement(
        graphic_type=region.GraphicType,
        graphic_data=np.asarray(region.GraphicData, dtype=float).reshape(-1, 2),
        source_image=source,
    )
    if "PixelOriginInterpretation" in region:
        coordinates.PixelOriginInterpretation = region.PixelOriginInterpretation
    for item in group[0].ContentSequence:
        if item.ValueType == "NUM":
            item.ContentSequence = [*item.get("ContentSequence", []), coordinates]


def detection_report(
    sources: list[Dataset],
    detections: list[dict],
    codes: dict[str, tuple[str, str, str]],
    model_name: str | None,
    sha256: str | None,
    score_threshold: float,
    series_number: int = SERIES_NUMBER,
) -> Dataset:
    """The Comprehensive 3D SR of `detections` (predict's, each with its `dicom` box) on
    `sources` (the analysed series' instances, one series). Raises SpinedetError when a
    detection's class has no code, or its instance is not among the sources."""
    if not sources:
        raise SpinedetError("no source instances for the SR")
    if len({str(ds.SeriesInstanceUID) for ds in sources}) != 1:
        raise SpinedetError("the SR's source instances must all belong to one series")
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    algorithm = algorithm_identification(model_name, sha256, score_threshold)
    # the UIDs follow the content too: another set of findings (other precision, other codes)
    # is another report, never a second copy under the first one's UID, which a PACS would drop
    content = hashlib.sha256(repr(sorted(
        (str(det["label"]), codes.get(str(det["label"])), round(float(det["score"]), 4),
         tuple(sorted((k, str(v)) for k, v in (det.get("dicom") or {}).items())))
        for det in detections)).encode()).hexdigest()
    series_uid = _uid(sources, "spinedet detections", "series", sha256, score_threshold, __version__, content)
    sop_uid = _uid(sources, "spinedet detections", "instance", series_uid)

    groups = []
    for number, det in enumerate(detections, start=1):
        box = det.get("dicom")
        if not box:
            continue
        label = str(det["label"])
        if label not in codes:
            raise SpinedetError(f"class {label!r} has no code in annotation_import.finding_map: add a `code` "
                                "entry for it, so that the SR can name its finding type")
        source = by_uid.get(str(box["sop_instance_uid"]))
        if source is None:
            raise SpinedetError(f"detection {number} lies on an instance that is not in the analysed series")
        frame = box.get("frame_number")
        multiframe = "NumberOfFrames" in source
        if multiframe and not frame:
            raise SpinedetError(f"detection {number} lies on a multi-frame instance but names no frame")
        x0, y0, x1, y1 = (float(box[key]) for key in BOX_KEYS)
        corners = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=float)
        region = hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
            graphic_data=corners,
            source_image=hd.sr.SourceImageForRegion(
                referenced_sop_class_uid=str(source.SOPClassUID),
                referenced_sop_instance_uid=str(source.SOPInstanceUID),
                referenced_frame_numbers=[int(frame)] if multiframe and frame else None,
            ),
            pixel_origin_interpretation=hd.sr.PixelOriginInterpretationValues.FRAME if multiframe else None,
        )
        scheme, value, meaning = codes[label]
        group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=_uid(sources, "spinedet detections", "tracking", sop_uid, number),
                identifier=f"detection {number}",
            ),
            referenced_region=region,
            finding_type=hd.sr.CodedConcept(value=value, scheme_designator=scheme, meaning=meaning),
            algorithm_id=algorithm,
            measurements=[hd.sr.Measurement(name=SCORE, value=float(det["score"]), unit=NO_UNITS,
                                            algorithm_id=algorithm)],
        )
        _score_inferred_from_region(group, region)
        groups.append(group)

    observer = hd.sr.ObserverContext(
        observer_type=dicom_codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=_uid(sources, "spinedet detections", "device", model_name, sha256),
            name=ALGORITHM_NAME,
            manufacturer_name=MANUFACTURER,
            model_name=model_name or None,
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=PROCEDURE_REPORTED,
        imaging_measurements=groups,
    )
    now = datetime.datetime.now()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # highdicom warns with header values verbatim
        return hd.sr.Comprehensive3DSR(
            evidence=sources,
            content=report,
            series_instance_uid=series_uid,
            series_number=series_number,
            sop_instance_uid=sop_uid,
            instance_number=1,
            manufacturer=MANUFACTURER,
            manufacturer_model_name=model_name or None,
            software_versions=f"spinedet {__version__}",
            is_complete=True,
            is_final=False,
            is_verified=False,
            series_description=SERIES_DESCRIPTION,
            content_date=now.strftime("%Y%m%d"),
            content_time=now.strftime("%H%M%S"),
        )


def write_detection_sr(path: Path, source_paths: Sequence[Path], detections: list[dict],
                       codes: dict[str, tuple[str, str, str]], model_name: str | None, sha256: str | None,
                       score_threshold: float) -> dict:
    """Build the SR of `detections` and save it at `path` atomically; what detections.json
    records of it (file, SOP instance UID, how many detections it holds)."""
    silence_dicom_libraries()  # highdicom logs the UIDs of the sources it copies from
    sources = read_sources(source_paths)
    dataset = detection_report(sources, detections, codes, model_name, sha256, score_threshold)
    write_atomically(path, lambda tmp: pydicom.dcmwrite(tmp, dataset, enforce_file_format=True))
    return {
        "file": Path(path).name,
        "sop_instance_uid": str(dataset.SOPInstanceUID),
        "series_instance_uid": str(dataset.SeriesInstanceUID),
        "detections": sum(1 for det in detections if det.get("dicom")),
    }


def read_detection_sr(source: Path | Dataset, codes: dict[str, tuple[str, str, str]] | None = None) -> list[dict]:
    """The detections of an SR (a path or a dataset) read back with highdicom: per Planar ROI
    group {sop_instance_uid, frame_number, x_min, y_min, x_max, y_max, label, score}; `label`
    is the class whose code is the finding type (given `codes`), else the code's meaning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dataset = source if isinstance(source, Dataset) else pydicom.dcmread(source)
        sr = hd.sr.Comprehensive3DSR.from_dataset(dataset)
    by_code = {(scheme, value): label for label, (scheme, value, _) in (codes or {}).items()}
    found = []
    for group in sr.content.get_planar_roi_measurement_groups():
        region = group.roi
        points = np.asarray(region.value, dtype=float)
        reference = region.ContentSequence[0].ReferencedSOPSequence[0]  # the SELECTED FROM image
        frames = reference.get("ReferencedFrameNumber")
        if frames is not None and not isinstance(frames, int):
            frames = next(iter(frames), None)
        finding = group.finding_type
        label = by_code.get((finding.scheme_designator, finding.value), finding.meaning)
        scores = [m.value for m in group.get_measurements(name=SCORE)]
        found.append({
            "sop_instance_uid": str(reference.ReferencedSOPInstanceUID),
            "frame_number": None if frames is None else int(frames),
            "x_min": float(points[:, 0].min()), "y_min": float(points[:, 1].min()),
            "x_max": float(points[:, 0].max()), "y_max": float(points[:, 1].max()),
            "label": label,
            "score": float(scores[0]) if scores else None,
        })
    return found
