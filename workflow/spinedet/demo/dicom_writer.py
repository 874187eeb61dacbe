"""Writing MR Image Storage files as a scanner export does (12-bit pixels, full headers),
and Enhanced MR Image Storage (one multi-frame file per series) as modern scanners do."""

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
    enhanced: bool = False,
) -> list[dict]:
    """Write a volume (n_slices, rows, cols) uint16 as one MR series, one file per slice,
    or with ``enhanced`` as one Enhanced MR Image Storage file (frame k = instance k).

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

    Returns, per slice: {path, sop_instance_uid, instance_number, frame_number (None
    unless enhanced), slice_index, series_uid}.
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
    written, datasets = [], []
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
        path = out_dir / file_name(1 if enhanced else instance_number)
        if enhanced:
            datasets.append(ds)
        else:
            write_dataset(ds, path)
        written.append({"path": path, "sop_instance_uid": sop_uid, "instance_number": instance_number,
                        "frame_number": None, "slice_index": slice_index, "series_uid": series_uid})
    if enhanced:
        sop_uid = generate_uid(entropy_srcs=[series_uid, "enhanced instance"])
        write_dataset(enhanced_dataset(datasets, sop_uid), written[0]["path"])
        for item in written:
            item.update(sop_instance_uid=sop_uid, frame_number=item["instance_number"], instance_number=1)
    return written


# --------------------------------------------------------------------------
# Enhanced MR (multi-frame), as Siemens XA and Philips export by default


def _item(**attributes) -> Dataset:
    item = Dataset()
    for keyword, value in attributes.items():
        setattr(item, keyword, value)
    return item


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    return _item(CodeValue=value, CodingSchemeDesignator=scheme, CodeMeaning=meaning)


ACQUISITION_SECONDS = 184.0

# Classic MR Image attributes that the enhanced IOD keeps in its functional
# groups and pulse sequence module instead of at the top level.
_CLASSIC_ONLY = (
    "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness", "SpacingBetweenSlices",
    "SliceLocation", "ScanningSequence", "SequenceVariant", "ScanOptions", "SequenceName", "AngioFlag",
    "RepetitionTime", "EchoTime", "EchoTrainLength", "NumberOfAverages", "ImagingFrequency", "ImagedNucleus",
    "EchoNumbers", "NumberOfPhaseEncodingSteps", "PercentSampling", "PercentPhaseFieldOfView", "PixelBandwidth",
    "ReceiveCoilName", "TransmitCoilName", "InPlanePhaseEncodingDirection", "FlipAngle", "VariableFlipAngleFlag",
    "SAR", "dBdt", "WindowCenter", "WindowWidth", "AcquisitionNumber", "AcquisitionDate", "AcquisitionTime",
    "ContentDate", "ContentTime", "ImageType",
)


def enhanced_dataset(frames: list[Dataset], sop_instance_uid: str) -> Dataset:
    """One Enhanced MR Image Storage instance holding `frames` (classic MR
    instances of one series, in frame order): their pixels, each frame's
    position in its per-frame functional group, everything common in the
    shared group."""
    from pydicom.sequence import Sequence
    from pydicom.uid import EnhancedMRImageStorage

    first = frames[0]
    ds = _base_dataset(sop_instance_uid)
    ds.file_meta.MediaStorageSOPClassUID = EnhancedMRImageStorage
    for element in first:
        if element.keyword not in _CLASSIC_ONLY and element.tag != 0x7FE00010:
            ds.add(element)
    ds.SOPClassUID = EnhancedMRImageStorage
    ds.SOPInstanceUID = sop_instance_uid
    date = str(first.get("AcquisitionDate") or first.get("SeriesDate") or first.StudyDate)
    time = str(first.get("AcquisitionTime") or first.get("SeriesTime") or first.StudyTime)
    ds.ContentDate, ds.ContentTime = date, time
    ds.AcquisitionDateTime = date + time
    ds.InstanceNumber = 1
    ds.NumberOfFrames = len(frames)
    ds.DeviceSerialNumber = ds.get("DeviceSerialNumber") or "SIM0001"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "SPINE", "NONE"]
    ds.PixelPresentation = "MONOCHROME"
    ds.VolumetricProperties = "VOLUME"
    ds.VolumeBasedCalculationTechnique = "NONE"
    ds.ComplexImageComponent = "MAGNITUDE"
    ds.AcquisitionContrast = "T2"
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.PresentationLUTShape = "IDENTITY"
    ds.AcquisitionContextSequence = Sequence([])
    # MR Image and Spectroscopy Instance macro
    ds.AcquisitionDuration = ACQUISITION_SECONDS
    ds.ContentQualification = "PRODUCT"
    ds.ResonantNucleus = "1H"
    ds.KSpaceFiltering = "NONE"
    ds.ApplicableSafetyStandardAgency = "IEC"
    # MR Pulse Sequence module: a 2D turbo spin echo
    pulse = dict(PulseSequenceName=str(first.get("SequenceName", "tse2d"))[:16].lstrip("*"),
                 MRAcquisitionType=first.get("MRAcquisitionType", "2D"), EchoPulseSequence="SPIN",
                 MultipleSpinEcho="YES", MultiPlanarExcitation="YES", PhaseContrast="NO",
                 TimeOfFlightContrast="NO", SteadyStatePulseSequence="NONE", EchoPlanarPulseSequence="NO",
                 SaturationRecovery="NO", SpectrallySelectedSuppression="NONE", OversamplingPhase="NONE",
                 GeometryOfKSpaceTraversal="RECTILINEAR", RectilinearPhaseEncodeReordering="LINEAR",
                 SegmentedKSpaceTraversal="PARTIAL", NumberOfKSpaceTrajectories=1)
    for keyword, value in pulse.items():
        setattr(ds, keyword, value)

    dimension_uid = generate_uid(entropy_srcs=[sop_instance_uid, "dimension organization"])
    ds.DimensionOrganizationSequence = Sequence([_item(DimensionOrganizationUID=dimension_uid)])
    ds.DimensionIndexSequence = Sequence([
        _item(DimensionOrganizationUID=dimension_uid, DimensionIndexPointer=0x00209056,
              FunctionalGroupPointer=0x00209111, DimensionDescriptionLabel="Stack ID"),
        _item(DimensionOrganizationUID=dimension_uid, DimensionIndexPointer=0x00209057,
              FunctionalGroupPointer=0x00209111, DimensionDescriptionLabel="In-Stack Position Number"),
    ])

    shared = _item(
        PixelMeasuresSequence=Sequence([_item(PixelSpacing=first.PixelSpacing, SliceThickness=first.SliceThickness,
                                              **({"SpacingBetweenSlices": first.SpacingBetweenSlices}
                                                 if "SpacingBetweenSlices" in first else {}))]),
        PlaneOrientationSequence=Sequence([_item(ImageOrientationPatient=first.ImageOrientationPatient)]),
        FrameAnatomySequence=Sequence([_item(
            FrameLaterality="U",
            AnatomicRegionSequence=Sequence([_code("122494005", "SCT", "Cervical spine")]))]),
        PixelValueTransformationSequence=Sequence([_item(RescaleIntercept="0", RescaleSlope="1",
                                                         RescaleType="US")]),
        FrameVOILUTSequence=Sequence([_item(WindowCenter=first.get("WindowCenter", "2048"),
                                            WindowWidth=first.get("WindowWidth", "4096"))]),
        MRImageFrameTypeSequence=Sequence([_item(
            FrameType=["ORIGINAL", "PRIMARY", "SPINE", "NONE"], PixelPresentation="MONOCHROME",
            VolumetricProperties="VOLUME", VolumeBasedCalculationTechnique="NONE",
            ComplexImageComponent="MAGNITUDE", AcquisitionContrast="T2")]),
        MRTimingAndRelatedParametersSequence=Sequence([_item(
            RepetitionTime=first.get("RepetitionTime", "3500"), FlipAngle=first.get("FlipAngle", "150"),
            EchoTrainLength=int(first.get("EchoTrainLength", 17)),
            RFEchoTrainLength=int(first.get("EchoTrainLength", 17)), GradientEchoTrainLength=0,
            SpecificAbsorptionRateSequence=Sequence([_item(SpecificAbsorptionRateDefinition="IEC_WHOLE_BODY",
                                                           SpecificAbsorptionRateValue=first.get("SAR", "0.8"))]),
            GradientOutputType="DB_DT", GradientOutput=first.get("dBdt", "0"),
            OperatingModeSequence=Sequence([
                _item(OperatingModeType="STATIC FIELD", OperatingMode="IEC_NORMAL"),
                _item(OperatingModeType="RF", OperatingMode="IEC_NORMAL"),
                _item(OperatingModeType="GRADIENT", OperatingMode="IEC_NORMAL"),
            ]))]),
        MRFOVGeometrySequence=Sequence([_item(
            InPlanePhaseEncodingDirection={"COL": "COLUMN"}.get(str(first.get("InPlanePhaseEncodingDirection")),
                                                                "ROW"),
            MRAcquisitionFrequencyEncodingSteps=int(first.Columns),
            MRAcquisitionPhaseEncodingStepsInPlane=int(first.get("NumberOfPhaseEncodingSteps", first.Rows)),
            PercentSampling=first.get("PercentSampling", "100"),
            PercentPhaseFieldOfView=first.get("PercentPhaseFieldOfView", "100"))]),
        MREchoSequence=Sequence([_item(EffectiveEchoTime=first.get("EchoTime", "104"))]),
        MRModifierSequence=Sequence([_item(
            InversionRecovery="NO", FlowCompensation="NONE", T2Preparation="NO",
            SpectrallySelectedExcitation="NONE", SpatialPresaturation="NONE", PartialFourier="NO",
            ParallelAcquisition="NO")]),
        MRImagingModifierSequence=Sequence([_item(
            MagnetizationTransfer="NONE", BloodSignalNulling="NO", Tagging="NONE",
            TransmitterFrequency=first.get("ImagingFrequency", "63.676"),
            PixelBandwidth=first.get("PixelBandwidth", "190"))]),
        MRReceiveCoilSequence=Sequence([_item(
            ReceiveCoilName=first.get("ReceiveCoilName", "NeckSpine"),
            ReceiveCoilManufacturerName=first.get("Manufacturer", "SpineSim"), ReceiveCoilType="MULTICOIL",
            QuadratureReceiveCoil="NO",
            MultiCoilDefinitionSequence=Sequence([_item(MultiCoilElementName="NE1", MultiCoilElementUsed="YES")]))]),
        MRTransmitCoilSequence=Sequence([_item(
            TransmitCoilName=first.get("TransmitCoilName", "Body"),
            TransmitCoilManufacturerName=first.get("Manufacturer", "SpineSim"), TransmitCoilType="BODY")]),
        MRAveragesSequence=Sequence([_item(NumberOfAverages=first.get("NumberOfAverages", "1"))]),
    )
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per_frame = []
    for number, frame in enumerate(frames, start=1):
        per_frame.append(_item(
            FrameContentSequence=Sequence([_item(
                FrameAcquisitionNumber=number, FrameReferenceDateTime=ds.AcquisitionDateTime,
                FrameAcquisitionDateTime=ds.AcquisitionDateTime,
                FrameAcquisitionDuration=1000.0 * ACQUISITION_SECONDS / len(frames),
                DimensionIndexValues=[1, number], StackID="1", InStackPositionNumber=number)]),
            PlanePositionSequence=Sequence([_item(ImagePositionPatient=frame.ImagePositionPatient)]),
        ))
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    ds.PixelData = b"".join(frame.PixelData for frame in frames)
    return ds
