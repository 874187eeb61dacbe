"""Writing MR Image Storage files as a scanner export does (12-bit pixels, full headers)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, PYDICOM_IMPLEMENTATION_UID, generate_uid

from spinedet import SpinedetError

MAX_STORED = 4095  # 12 bits stored
TARGET_DESCRIPTION = "T2_TSE_SAG"


def ds_number(value: float) -> str:
    """A decimal string of at most 16 characters."""
    value = round(float(value), 6)
    if abs(value) < 1e-6:
        value = 0.0
    text = f"{value:.10g}"
    return text if len(text) <= 16 else f"{value:.8g}"


def _ds_list(values) -> list[str]:
    return [ds_number(v) for v in values]


def slice_normal(iop: Sequence[float]) -> np.ndarray:
    """The slice normal n = row direction x column direction."""
    iop = np.asarray(iop, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    return normal / np.linalg.norm(normal)


def _apply_header(ds: Dataset, header: dict) -> None:
    """Set DICOM attributes from {keyword: value}; "PrivateBlocks" holds
    [(group, creator, {element_offset: (VR, value)})]."""
    for keyword, value in header.items():
        if keyword == "PrivateBlocks":
            for group, creator, elements in value:
                block = ds.private_block(group, creator, create=True)
                for offset, (vr, element_value) in elements.items():
                    block.add_new(offset, vr, element_value)
        else:
            setattr(ds, keyword, value)


def _base_dataset(sop_instance_uid: str) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "SPINESIM_1"
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    return ds


# Type 1/2 attributes that must be present even when the caller's header is minimal.
_REQUIRED_EMPTY = [
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
    "ReferringPhysicianName", "StudyID", "AccessionNumber",
]

# MR Image module defaults: a 2D turbo spin echo T2.
DEFAULT_MR_ATTRIBUTES = {
    "ImageType": ["ORIGINAL", "PRIMARY", "OTHER", "ND", "NORM"],
    "ScanningSequence": "SE",
    "SequenceVariant": ["SK", "SP", "OSP"],
    "ScanOptions": "PFP",
    "MRAcquisitionType": "2D",
    "SequenceName": "*tse2d1_17",
    "AngioFlag": "N",
    "RepetitionTime": "3500",
    "EchoTime": "104",
    "EchoTrainLength": 17,
    "NumberOfAverages": "2",
    "ImagingFrequency": "63.676",
    "ImagedNucleus": "1H",
    "EchoNumbers": "1",
    "MagneticFieldStrength": "1.5",
    "NumberOfPhaseEncodingSteps": "230",
    "PercentSampling": "100",
    "PercentPhaseFieldOfView": "100",
    "PixelBandwidth": "190",
    "ReceiveCoilName": "NeckSpine",
    "TransmitCoilName": "Body",
    "InPlanePhaseEncodingDirection": "COL",
    "FlipAngle": "150",
    "VariableFlipAngleFlag": "N",
    "SAR": "0.8",
    "dBdt": "0",
    "PatientPosition": "HFS",
    "BodyPartExamined": "CSPINE",
    "Manufacturer": "SpineSim",
    "ManufacturerModelName": "SpineSim MR 1.5T",
    "SoftwareVersions": "spinedet-phantom 1",
}


def image_dataset(pixels: np.ndarray, *, position, orientation, pixel_spacing, slice_thickness,
                   spacing_between_slices, header: dict, series: dict, instance_number: int,
                   sop_instance_uid: str) -> Dataset:
    """One MR Image Storage instance (12 bits stored, MONOCHROME2)."""
    if pixels.dtype != np.uint16 or pixels.ndim != 2:
        raise SpinedetError(f"pixels must be a 2D uint16 array, got {pixels.dtype} {pixels.shape}")
    if pixels.size and int(pixels.max()) > MAX_STORED:
        raise SpinedetError(f"pixel values exceed 12 bits stored (max {int(pixels.max())})")
    ds = _base_dataset(sop_instance_uid)
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = sop_instance_uid
    ds.Modality = "MR"
    for keyword in _REQUIRED_EMPTY:
        setattr(ds, keyword, "")
    ds.PositionReferenceIndicator = ""
    _apply_header(ds, DEFAULT_MR_ATTRIBUTES)
    _apply_header(ds, header)
    _apply_header(ds, series)
    normal = slice_normal(orientation)
    ds.InstanceNumber = instance_number
    ds.ImagePositionPatient = _ds_list(position)
    ds.ImageOrientationPatient = _ds_list(orientation)
    ds.PixelSpacing = _ds_list(pixel_spacing)
    ds.SliceThickness = ds_number(slice_thickness)
    if spacing_between_slices is not None:
        ds.SpacingBetweenSlices = ds_number(spacing_between_slices)
    ds.SliceLocation = ds_number(float(np.dot(position, normal)))
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
    return ds


def write_dataset(ds: Dataset, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    dcmwrite(path, ds, enforce_file_format=True)


def display_window(volume: np.ndarray) -> tuple[str, str]:
    low, high = np.percentile(volume, [1.0, 99.5])
    return ds_number(round((low + high) / 2)), ds_number(max(round(high - low), 1))


def write_series(
    out_dir: Path,
    volume: np.ndarray,
    *,
    ipp_first: Sequence[float],
    iop: Sequence[float],
    pixel_spacing: Sequence[float],
    slice_step: float,
    reverse_order: bool = False,
    header: dict | None = None,
    series_number: int = 1,
    description: str = TARGET_DESCRIPTION,
    file_name: Callable[[int], str] | None = None,
    slice_thickness: float | None = None,
    series_attributes: dict | None = None,
) -> list[dict]:
    """Write a volume (n_slices, rows, cols) uint16 as one MR series, one file per slice.

    Geometry: slice k (spatial order) has its first pixel centre at
    ``ipp_first + k * slice_step * n`` with ``n = cross(iop[:3], iop[3:])``;
    ``pixel_spacing`` is (row spacing, column spacing) as in DICOM.
    ``reverse_order`` numbers the instances against the spatial order
    (instance 1 = last slice). ``header`` holds patient/study attributes by
    DICOM keyword (plus "PrivateBlocks", see `_apply_header`);
    ``series_attributes`` overrides MR attributes (TR, TE, ImageType...).
    UIDs not given in ``header`` are derived from its content, so the same
    call writes the same files. ``file_name(instance_number)`` is a path
    relative to ``out_dir`` (default ``IM{instance:06d}``).

    Returns, per instance: {path, sop_instance_uid, instance_number, slice_index, series_uid}.
    """
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise SpinedetError(f"volume must be (n_slices, rows, cols), got shape {volume.shape}")
    header = dict(header or {})
    out_dir = Path(out_dir)
    study_uid = header.setdefault("StudyInstanceUID", generate_uid(entropy_srcs=["study", repr(sorted(header.items(), key=str))]))
    header.setdefault("FrameOfReferenceUID", generate_uid(entropy_srcs=[study_uid, "frame-of-reference"]))
    series_uid = header.pop("SeriesInstanceUID", None) or generate_uid(entropy_srcs=[study_uid, "series", str(series_number), description])
    center, width = display_window(volume)
    series = {
        "SeriesInstanceUID": series_uid,
        "SeriesNumber": series_number,
        "SeriesDescription": description,
        "ProtocolName": description,
        "AcquisitionNumber": 1,
        "WindowCenter": center,
        "WindowWidth": width,
        **(series_attributes or {}),
    }
    normal = slice_normal(iop)
    ipp_first = np.asarray(ipp_first, dtype=float)
    n_slices = volume.shape[0]
    file_name = file_name or (lambda number: f"IM{number:06d}")
    written = []
    for instance_number in range(1, n_slices + 1):
        slice_index = n_slices - instance_number if reverse_order else instance_number - 1
        sop_uid = generate_uid(entropy_srcs=[series_uid, "instance", str(instance_number)])
        ds = image_dataset(
            volume[slice_index].astype(np.uint16),
            position=ipp_first + slice_index * slice_step * normal,
            orientation=iop,
            pixel_spacing=pixel_spacing,
            slice_thickness=abs(slice_step) if slice_thickness is None else slice_thickness,
            spacing_between_slices=abs(slice_step),
            header=header,
            series=series,
            instance_number=instance_number,
            sop_instance_uid=sop_uid,
        )
        path = out_dir / file_name(instance_number)
        write_dataset(ds, path)
        written.append({"path": path, "sop_instance_uid": sop_uid, "instance_number": instance_number,
                        "slice_index": slice_index, "series_uid": series_uid})
    return written
