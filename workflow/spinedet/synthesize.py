"""`spinedet synthesize`: a synthetic hospital export of cervical spine MRI.

For every patient it writes one study like a scanner export would: a 3-plane
localizer, a sagittal T2 (the target, with lesions annotated), a sagittal T1
and a few axial T2 slices, with realistic fake PHI in the headers. Beside the
DICOM tree it writes `annotations.csv` (boxes on the sagittal T2 instances),
`cohort.csv` (patient_id, group) and `truth/` (lesion masks for tests, read
back with `load_truth`).

Everything is derived from the seed: patient i is drawn from
`numpy.random.default_rng([seed, i])`, UIDs are hashes of the seed and the
patient, dates are drawn, never read from the clock. The same seed gives
byte-identical files.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import functools
import io
import logging
import multiprocessing
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from PIL import Image
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, PYDICOM_IMPLEMENTATION_UID, generate_uid
from tqdm import tqdm

from spinedet import SpinedetError, phantom, silence_pydicom

log = logging.getLogger(__name__)

DEFAULT_CLASSES = ("disc_herniation", "cord_injury")
DEFAULT_GROUPS = ("disc", "injured", "normal")
# Ma et al. 2020: 800 disc, 200 injured, 500 normal patients.
GROUP_RATIO = (800, 200, 500)
ROLES = ("disc", "injured", "normal")

MAX_STORED = 4095  # 12 bits stored
TARGET_SUBSAMPLES = 2  # planes averaged across each target slice's thickness (partial volume)
TARGET_DESCRIPTION = "T2_TSE_SAG"
ANNOTATION_COLUMNS = ["study_uid", "series_uid", "sop_instance_uid", "instance_number", "label",
                      "x_min", "y_min", "x_max", "y_max"]
# A lesion is annotated on a slice where its mask has at least MIN_BOX_PIXELS
# pixels and at least VISIBLE_FRACTION of its largest cross-section: the thin
# partial-volume tails at its edges are not boxed.
MIN_BOX_PIXELS = 3
VISIBLE_FRACTION = 0.25


# --------------------------------------------------------------------------
# DICOM writing

def _ds_number(value: float) -> str:
    """A decimal string of at most 16 characters."""
    value = round(float(value), 6)
    if abs(value) < 1e-6:
        value = 0.0
    text = f"{value:.10g}"
    return text if len(text) <= 16 else f"{value:.8g}"


def _ds_list(values) -> list[str]:
    return [_ds_number(v) for v in values]


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


def _image_dataset(pixels: np.ndarray, *, position, orientation, pixel_spacing, slice_thickness,
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
    ds.SliceThickness = _ds_number(slice_thickness)
    if spacing_between_slices is not None:
        ds.SpacingBetweenSlices = _ds_number(spacing_between_slices)
    ds.SliceLocation = _ds_number(float(np.dot(position, normal)))
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
    return ds


def _write(ds: Dataset, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    dcmwrite(path, ds, enforce_file_format=True)


def _window(volume: np.ndarray) -> tuple[str, str]:
    low, high = np.percentile(volume, [1.0, 99.5])
    return _ds_number(round((low + high) / 2)), _ds_number(max(round(high - low), 1))


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
    center, width = _window(volume)
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
        ds = _image_dataset(
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
        _write(ds, path)
        written.append({"path": path, "sop_instance_uid": sop_uid, "instance_number": instance_number,
                        "slice_index": slice_index, "series_uid": series_uid})
    return written


# --------------------------------------------------------------------------
# Series geometry and rendering

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


def _rotation(axis: str, degrees: float) -> np.ndarray:
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


# --------------------------------------------------------------------------
# Cohort, identities, export layout

def group_counts(n_patients: int, groups: Sequence[str] = DEFAULT_GROUPS) -> dict[str, int]:
    """Patients per group in the 800:200:500 ratio, by largest remainder; each group
    gets at least one patient when there are at least as many patients as groups."""
    ratio = np.array(GROUP_RATIO, dtype=float)
    exact = n_patients * ratio / ratio.sum()
    counts = np.floor(exact).astype(int)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: n_patients - counts.sum()]] += 1
    if n_patients >= len(groups):
        for index in range(len(counts)):
            if counts[index] == 0:
                counts[int(np.argmax(counts))] -= 1
                counts[index] = 1
    return dict(zip(groups, (int(c) for c in counts)))


FIRST_NAMES = {
    "M": ["James", "Robert", "Michael", "David", "Thomas", "Daniel", "Paul", "Mark", "Steven", "Andrew",
          "Kevin", "Brian", "George", "Edward", "Ronald", "Anthony", "Jason", "Ryan", "Jacob", "Gary",
          "Nicholas", "Eric", "Stephen", "Jonathan", "Larry", "Justin", "Scott", "Frank", "Raymond", "Samuel"],
    "F": ["Mary", "Patricia", "Jennifer", "Linda", "Elizabeth", "Barbara", "Susan", "Jessica", "Sarah", "Karen",
          "Nancy", "Lisa", "Margaret", "Sandra", "Ashley", "Dorothy", "Kimberly", "Emily", "Donna", "Michelle",
          "Carol", "Amanda", "Melissa", "Deborah", "Stephanie", "Rebecca", "Laura", "Helen", "Sharon", "Cynthia"],
}
LAST_NAMES = ["Smith", "Johnson", "Williams", "Brown", "Jones", "Garcia", "Miller", "Davis", "Rodriguez",
              "Martinez", "Hernandez", "Lopez", "Gonzalez", "Wilson", "Anderson", "Taylor", "Moore", "Jackson",
              "Martin", "Lee", "Thompson", "White", "Harris", "Clark", "Lewis", "Robinson", "Walker", "Young",
              "Allen", "King", "Wright", "Scott", "Torres", "Nguyen", "Hill", "Flores", "Green", "Adams",
              "Nelson", "Baker", "Hall", "Rivera", "Campbell", "Mitchell", "Carter", "Roberts", "Kowalski",
              "Novak", "Schmidt", "Fischer", "Weber", "Meyer", "Wagner", "Becker", "Schulz", "Hoffmann"]
INSTITUTIONS = [
    ("Riverside General Hospital", "1200 River Road, Springfield"),
    ("St. Aldric Medical Center", "45 Cathedral Street, Northbridge"),
    ("Lakeview University Hospital", "3 Lakeview Drive, Eastport"),
    ("Mercy Valley Clinic", "780 Valley Avenue, Westfield"),
]


def _person_name(rng: np.random.Generator, sex: str | None = None) -> str:
    sex = sex or str(rng.choice(["M", "F"]))
    return f"{rng.choice(LAST_NAMES)}^{rng.choice(FIRST_NAMES[sex])}"


def _identity(rng: np.random.Generator, index: int) -> dict:
    """Fake but realistic patient and study attributes (the PHI of the export)."""
    sex = str(rng.choice(["M", "F"]))
    age = int(rng.integers(19, 82))
    study_date = dt.date(2016, 1, 1) + dt.timedelta(days=int(rng.integers(0, 4 * 365)))
    birth_date = study_date - dt.timedelta(days=int(age * 365.25 + rng.integers(1, 360)))
    age = (study_date - birth_date).days * 4 // 1461
    start = dt.datetime.combine(study_date, dt.time(7, 0)) + dt.timedelta(seconds=int(rng.integers(0, 11 * 3600)))
    institution, address = INSTITUTIONS[int(rng.integers(len(INSTITUTIONS)))]
    # MRNs are unique: the last four digits are the patient's index.
    patient_id = f"{int(rng.integers(1000, 9999))}{index % 10000:04d}"
    return {
        "sex": sex,
        "start": start,
        "PatientName": _person_name(rng, sex),
        "PatientID": patient_id,
        "PatientBirthDate": birth_date.strftime("%Y%m%d"),
        "PatientSex": sex,
        "PatientAge": f"{age:03d}Y",
        "PatientWeight": _ds_number(round(float(rng.uniform(50, 110)), 1)),
        "InstitutionName": institution,
        "InstitutionAddress": address,
        "InstitutionalDepartmentName": "Radiology",
        "ReferringPhysicianName": _person_name(rng),
        "PerformingPhysicianName": _person_name(rng),
        "OperatorsName": _person_name(rng),
        "StationName": f"MRC{int(rng.integers(10000, 99999))}",
        "DeviceSerialNumber": str(int(rng.integers(10000, 99999))),
        "AccessionNumber": f"A{int(rng.integers(10**7, 10**8))}{index % 100:02d}",
        "StudyID": str(int(rng.integers(1000, 99999))),
        "StudyDescription": "MR CERVICAL SPINE WO CONTRAST",
    }


def _study_header(identity: dict, study_uid: str, frame_uid: str) -> dict:
    start: dt.datetime = identity["start"]
    header = {key: value for key, value in identity.items() if key[0].isupper()}
    header.update({
        "StudyInstanceUID": study_uid,
        "FrameOfReferenceUID": frame_uid,
        "StudyDate": start.strftime("%Y%m%d"),
        "StudyTime": start.strftime("%H%M%S"),
        "PrivateBlocks": [(0x0029, "SPINESIM PRIVATE 1.0", {
            0x10: ("LO", f"{identity['PatientName'].replace('^', ' ')} MRN {identity['PatientID']}"),
            0x11: ("LT", f"Referred by {identity['ReferringPhysicianName'].replace('^', ' ')}, "
                         f"{identity['InstitutionName']}, born {identity['PatientBirthDate']}"),
        })],
    })
    return header


def _series_times(identity: dict, minutes: float) -> dict:
    moment: dt.datetime = identity["start"] + dt.timedelta(minutes=minutes)
    date, time = moment.strftime("%Y%m%d"), moment.strftime("%H%M%S.%f")[:10]
    return {"SeriesDate": date, "SeriesTime": time, "AcquisitionDate": date, "AcquisitionTime": time,
            "ContentDate": date, "ContentTime": time}


EXPORT_STYLES = ("nested", "nested_dcm", "flat")


def _file_namer(style: str, patient_number: int, series_number: int) -> Callable[[int], str]:
    """Relative paths inside DICOM/ for one series; no PHI in any name."""
    if style == "flat":
        return lambda instance: f"EXP{patient_number:05d}/IM-{series_number:04d}-{instance:04d}.dcm"
    suffix = ".dcm" if style == "nested_dcm" else ""
    return lambda instance: (f"PA{patient_number:06d}/ST000001/SE{series_number:06d}/IM{instance:06d}{suffix}")


# --------------------------------------------------------------------------
# One patient

MR_PROTOCOLS = {
    "T2_SAG": lambda rng: {
        "RepetitionTime": _ds_number(round(rng.uniform(2500, 4000))), "EchoTime": _ds_number(round(rng.uniform(90, 120))),
        "EchoTrainLength": int(rng.integers(13, 24)), "ScanningSequence": "SE", "SequenceVariant": ["SK", "SP", "OSP"],
        "SequenceName": "*tse2d1_17", "FlipAngle": "150"},
    "T1_SAG": lambda rng: {
        "RepetitionTime": _ds_number(round(rng.uniform(450, 700))), "EchoTime": _ds_number(round(rng.uniform(9, 13))),
        "EchoTrainLength": int(rng.integers(3, 6)), "ScanningSequence": "SE", "SequenceVariant": ["SK", "SP", "OSP"],
        "SequenceName": "*tse2d1_3", "FlipAngle": "150"},
    "T2_AX": lambda rng: {
        "RepetitionTime": _ds_number(round(rng.uniform(3500, 5000))), "EchoTime": _ds_number(round(rng.uniform(95, 110))),
        "EchoTrainLength": int(rng.integers(13, 20)), "ScanningSequence": "SE", "SequenceVariant": ["SK", "SP", "OSP"],
        "SequenceName": "*tse2d1_15", "FlipAngle": "150", "InPlanePhaseEncodingDirection": "ROW"},
    "LOCALIZER": lambda rng: {
        "RepetitionTime": "8.6", "EchoTime": "4", "EchoTrainLength": 1, "ScanningSequence": "GR",
        "SequenceVariant": ["SP", "OSP"], "SequenceName": "*fl2d1", "FlipAngle": "20",
        "ImageType": ["ORIGINAL", "PRIMARY", "OTHER", "NORM", "DIS2D"], "NumberOfAverages": "1"},
}


@dataclass
class PatientResult:
    """What synthesize keeps of one patient: annotation rows, truth and a preview slice."""

    patient_id: str
    group: str
    annotations: list[dict]
    truth: dict
    preview_image: np.ndarray
    preview_boxes: list[tuple[str, tuple[int, int, int, int]]]
    files: int


def _target_geometry(rng: np.random.Generator, anatomy: phantom.Anatomy, matrix: int) -> tuple[SeriesGeometry, bool]:
    """The sagittal T2 stack: sometimes oblique, sometimes rows P->A; returns (geometry, reverse_order)."""
    n_slices = int(rng.integers(13, 18))
    thickness = float(rng.choice([3.0, 3.0, 3.5]))
    step = round(thickness + float(rng.uniform(0.3, 0.5)), 2)
    fov = float(rng.uniform(220, 260))
    row_dir, col_dir = np.array([0.0, 1.0, 0.0]), np.array([0.0, 0.0, -1.0])
    if rng.random() < 0.4:
        rotation = _rotation("x", rng.uniform(-8, 8)) @ _rotation("y", rng.uniform(-5, 5))
        row_dir, col_dir = rotation @ row_dir, rotation @ col_dir
    if rng.random() < 0.2:
        row_dir = -row_dir
    reverse_order = bool(rng.random() < 0.3)
    center = anatomy.to_lps(rng.uniform(-3, 3), anatomy.level_s("C4") + rng.uniform(-8, 6), phantom.PVBL + rng.uniform(0, 14))
    geometry = centered_geometry(center, row_dir, col_dir, matrix=matrix, fov=fov, n_slices=n_slices,
                                 slice_step=step, thickness=thickness)
    return geometry, reverse_order


def synthesize_patient(root: Path, *, seed: int, index: int, group: str, role: str, labels: tuple[str, str],
                       matrix: int) -> PatientResult:
    """Draw and write one patient's study under root/DICOM; return its annotations and truth."""
    rng = np.random.default_rng([seed, index])
    identity = _identity(rng, index)
    style = EXPORT_STYLES[int(rng.integers(len(EXPORT_STYLES)))]
    degenerated = int(rng.choice([0, 0, 1, 2])) if role == "normal" else int(rng.choice([0, 1, 2]))
    anatomy = phantom.draw_anatomy(rng, degenerated_discs=degenerated)
    geometry, reverse_order = _target_geometry(rng, anatomy, matrix)
    study_uid = generate_uid(entropy_srcs=["spinedet-synthesize", str(seed), str(index), "study"])
    frame_uid = generate_uid(entropy_srcs=["spinedet-synthesize", str(seed), str(index), "frame"])
    header = _study_header(identity, study_uid, frame_uid)
    series_numbers = dict(zip(["T2_SAG", "T1_SAG", "T2_AX"], (int(n) for n in rng.permutation([2, 3, 4]))))
    series_numbers["LOCALIZER"] = 1
    protocol = {kind: make(rng) for kind, make in MR_PROTOCOLS.items()}
    lesion_rng = np.random.default_rng([seed, index, 1])

    # Lesions are redrawn in the rare case one's box would hold another lesion.
    for _attempt in range(8):
        lesions = phantom.draw_lesions(lesion_rng, anatomy, role, labels)
        volume, masks = render_series(anatomy, lesions, geometry, "T2", np.random.default_rng([seed, index, 2]),
                                      subsamples=TARGET_SUBSAMPLES)
        boxes = lesion_boxes(masks)
        if boxes_are_separate(masks, boxes):
            break
    else:
        raise SpinedetError(f"patient {index}: could not place lesions with separate boxes")

    namer = lambda kind: _file_namer(style, index + 1, series_numbers[kind])  # noqa: E731
    dicom = root / "DICOM"
    minutes = {kind: 1.5 + 4.0 * series_numbers[kind] for kind in series_numbers}
    t2 = write_series(dicom, volume, ipp_first=geometry.ipp_first, iop=geometry.iop, pixel_spacing=geometry.pixel_spacing,
                      slice_step=geometry.slice_step, reverse_order=reverse_order, header=header,
                      series_number=series_numbers["T2_SAG"], description=TARGET_DESCRIPTION, file_name=namer("T2_SAG"),
                      slice_thickness=geometry.thickness,
                      series_attributes={**protocol["T2_SAG"], **_series_times(identity, minutes["T2_SAG"])})
    series_uid = t2[0]["series_uid"]
    by_slice = {item["slice_index"]: item for item in t2}

    annotations = []
    for lesion_index, k, (x0, y0, x1, y1) in boxes:
        annotations.append({
            "study_uid": study_uid, "series_uid": series_uid, "sop_instance_uid": by_slice[k]["sop_instance_uid"],
            "instance_number": by_slice[k]["instance_number"], "label": lesions[lesion_index].label,
            "x_min": x0, "y_min": y0, "x_max": x1, "y_max": y1,
        })

    files = len(t2)
    files += _write_distractors(dicom, rng, anatomy, lesions, geometry, header, identity, series_numbers, protocol,
                                namer, minutes, matrix, seed, index)

    preview_image, preview_boxes = _preview_slice(volume, geometry, anatomy, lesions, boxes)
    truth = {
        "labels": np.array([lesion.label for lesion in lesions], dtype=str),
        "kinds": np.array([lesion.kind for lesion in lesions], dtype=str),
        "levels": np.array([lesion.level for lesion in lesions], dtype=str),
        "masks": masks,
        "instance_numbers": np.array([by_slice[k]["instance_number"] for k in range(geometry.n_slices)]),
        "sop_instance_uids": np.array([by_slice[k]["sop_instance_uid"] for k in range(geometry.n_slices)], dtype=str),
        "ipp_first": geometry.ipp_first,
        "iop": geometry.iop,
        "pixel_spacing": np.array(geometry.pixel_spacing),
        "slice_step": np.array(geometry.slice_step),
        "study_uid": np.array(study_uid),
        "series_uid": np.array(series_uid),
    }
    return PatientResult(identity["PatientID"], group, annotations, truth, preview_image, preview_boxes, files)


def _write_distractors(dicom: Path, rng, anatomy, lesions, target: SeriesGeometry, header, identity, series_numbers,
                       protocol, namer, minutes, matrix, seed, index) -> int:
    """Sagittal T1, axial T2 and the 3-plane localizer: cheap, lower resolution. Returns files written."""
    small = max(64, matrix // 2)
    files = 0
    # sagittal T1: same slab as the T2, nominal orientation
    t1_geometry = centered_geometry(
        target.slice_points(target.n_slices // 2)[target.rows // 2, target.cols // 2]
        - (0.5 if target.n_slices % 2 == 0 else 0.0) * target.slice_step * target.normal,
        [0, 1, 0], [0, 0, -1], matrix=small, fov=target.pixel_spacing[0] * target.rows, n_slices=target.n_slices,
        slice_step=abs(target.slice_step), thickness=target.thickness)
    volume, _ = render_series(anatomy, lesions, t1_geometry, "T1", np.random.default_rng([seed, index, 3]),
                              signal_scale=anatomy.signal_scale * 0.8)
    files += len(write_series(
        dicom, volume, ipp_first=t1_geometry.ipp_first, iop=t1_geometry.iop, pixel_spacing=t1_geometry.pixel_spacing,
        slice_step=t1_geometry.slice_step, header=header, series_number=series_numbers["T1_SAG"], description="T1_TSE_SAG",
        file_name=namer("T1_SAG"), slice_thickness=t1_geometry.thickness,
        series_attributes={**protocol["T1_SAG"], **_series_times(identity, minutes["T1_SAG"])}))

    # axial T2: a few slices parallel to the C5-C6 disc
    disc_s = anatomy.level_s("C5-C6")
    tangent = anatomy.tangent_lps(disc_s)
    angle = np.rad2deg(np.arctan2(-tangent[1], tangent[2]))
    rotation = _rotation("x", angle)
    n_axial = int(rng.integers(5, 9))
    ax_geometry = centered_geometry(anatomy.to_lps(0.0, disc_s, phantom.PVBL + 2), rotation @ [1, 0, 0], rotation @ [0, 1, 0],
                                    matrix=small, fov=float(rng.uniform(150, 180)), n_slices=n_axial, slice_step=4.4,
                                    thickness=4.0)
    volume, _ = render_series(anatomy, lesions, ax_geometry, "T2", np.random.default_rng([seed, index, 4]))
    files += len(write_series(
        dicom, volume, ipp_first=ax_geometry.ipp_first, iop=ax_geometry.iop, pixel_spacing=ax_geometry.pixel_spacing,
        slice_step=ax_geometry.slice_step, header=header, series_number=series_numbers["T2_AX"], description="T2_AX",
        file_name=namer("T2_AX"), slice_thickness=ax_geometry.thickness,
        series_attributes={**protocol["T2_AX"], **_series_times(identity, minutes["T2_AX"])}))

    # localizer: three single images, sagittal, coronal and axial, in one series
    center = anatomy.to_lps(0.0, anatomy.level_s("C4"), phantom.PVBL)
    planes = [([0, 1, 0], [0, 0, -1]), ([1, 0, 0], [0, 0, -1]), ([1, 0, 0], [0, 1, 0])]
    localizer_rng = np.random.default_rng([seed, index, 5])
    series_uid = generate_uid(entropy_srcs=[header["StudyInstanceUID"], "series", str(series_numbers["LOCALIZER"]), "LOCALIZER"])
    attributes = {
        "SeriesInstanceUID": series_uid, "SeriesNumber": series_numbers["LOCALIZER"], "SeriesDescription": "LOCALIZER",
        "ProtocolName": "LOCALIZER", "AcquisitionNumber": 1,
        **protocol["LOCALIZER"], **_series_times(identity, minutes["LOCALIZER"]),
    }
    localizer_namer = namer("LOCALIZER")
    for number, (row_dir, col_dir) in enumerate(planes, start=1):
        plane = centered_geometry(center, row_dir, col_dir, matrix=128, fov=300.0, n_slices=1, slice_step=7.0, thickness=7.0)
        image, _ = render_series(anatomy, [], plane, "T1", localizer_rng, signal_scale=anatomy.signal_scale * 0.7,
                                 snr=anatomy.snr * 0.7)
        window_center, window_width = _window(image)
        sop_uid = generate_uid(entropy_srcs=[series_uid, "instance", str(number)])
        ds = _image_dataset(image[0], position=plane.ipp_first, orientation=plane.iop, pixel_spacing=plane.pixel_spacing,
                            slice_thickness=plane.thickness, spacing_between_slices=None, header=header,
                            series={**attributes, "WindowCenter": window_center, "WindowWidth": window_width},
                            instance_number=number, sop_instance_uid=sop_uid)
        _write(ds, dicom / localizer_namer(number))
        files += 1
    return files


def _preview_slice(volume, geometry: SeriesGeometry, anatomy, lesions, boxes):
    """The slice with most lesion boxes (else the one nearest the midline), in display
    orientation (anterior left, superior up), with its boxes."""
    midline_distance = []
    for k in range(geometry.n_slices):
        centre = geometry.slice_points(k)[geometry.rows // 2, geometry.cols // 2]
        midline_distance.append(abs(centre[0] - anatomy.x_mid))
    box_count = np.zeros(geometry.n_slices)
    for _, k, _ in boxes:
        box_count[k] += 1
    k = int(np.lexsort((midline_distance, -box_count))[0])
    image = volume[k].astype(np.float32)
    flip_x = geometry.iop[1] < 0  # rows run posterior -> anterior
    flip_y = geometry.iop[5] > 0  # columns run inferior -> superior
    slice_boxes = []
    for lesion_index, kk, (x0, y0, x1, y1) in boxes:
        if kk != k:
            continue
        if flip_x:
            x0, x1 = geometry.cols - x1, geometry.cols - x0
        if flip_y:
            y0, y1 = geometry.rows - y1, geometry.rows - y0
        slice_boxes.append((lesions[lesion_index].label, (x0, y0, x1, y1)))
    if flip_x:
        image = image[:, ::-1]
    if flip_y:
        image = image[::-1, :]
    return image, slice_boxes


# --------------------------------------------------------------------------
# Whole export

def synthesize(out: Path, patients: int, matrix: int, seed: int, classes: Sequence[str] = DEFAULT_CLASSES,
               groups: Sequence[str] = DEFAULT_GROUPS, preview: Path | None = None, workers: int = 1) -> dict:
    """Write the export under `out` (DICOM/, annotations.csv, cohort.csv, truth/) and return a PHI-free summary.

    `workers` processes write patients in parallel; the files are the same for any count.

    `classes` name (herniation, cord injury) and `groups` name the (disc,
    injured, normal) groups, in that order.
    """
    if len(classes) != 2:
        raise SpinedetError(f"synthesize needs exactly two classes (herniation, cord injury), got {list(classes)}")
    if len(groups) != 3:
        raise SpinedetError(f"synthesize needs exactly three groups (disc, injured, normal), got {list(groups)}")
    if patients < 1:
        raise SpinedetError(f"--patients must be at least 1, got {patients}")
    if matrix < 64:
        raise SpinedetError(f"--matrix must be at least 64, got {matrix}")
    out = Path(out)
    if (out / "DICOM").exists() and any((out / "DICOM").iterdir()):
        raise SpinedetError(f"{out / 'DICOM'} already holds files; remove it or choose another --out")
    counts = group_counts(patients, groups)
    assignment = np.repeat(np.arange(len(groups)), list(counts.values()))
    assignment = np.random.default_rng([seed, 0xC0 + 0x40]).permutation(assignment)

    jobs = [
        {"root": out, "seed": seed, "index": index, "group": groups[int(assignment[index])],
         "role": ROLES[int(assignment[index])], "labels": tuple(classes), "matrix": matrix}
        for index in range(patients)
    ]
    # Each patient draws from its own generator (seed, index), so the files do
    # not depend on how many workers write them.
    workers = max(1, min(int(workers), patients))
    progress = functools.partial(tqdm, total=patients, desc="synthesize", unit="patient")
    if workers == 1:
        results = [synthesize_patient(**job) for job in progress(jobs)]
    else:
        with multiprocessing.get_context("spawn").Pool(workers, initializer=silence_pydicom) as pool:
            results = list(progress(pool.imap(_synthesize_job, jobs)))

    with (out / "annotations.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=ANNOTATION_COLUMNS)
        writer.writeheader()
        for result in results:
            writer.writerows(result.annotations)
    with (out / "cohort.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["patient_id", "group"])
        writer.writerows((result.patient_id, result.group) for result in results)
    _write_truth(out / "truth", results)
    if preview is not None:
        write_preview(results, Path(preview))

    lesions = {label: int(sum((r.truth["labels"] == label).sum() for r in results)) for label in classes}
    summary = {
        "patients": patients,
        "groups": counts,
        "files": int(sum(r.files for r in results)),
        "annotations": int(sum(len(r.annotations) for r in results)),
        "lesions": lesions,
        "matrix": matrix,
        "seed": seed,
    }
    log.info("synthesized %d patients, %d files, %d boxes in %s", patients, summary["files"], summary["annotations"], out)
    return summary


def _synthesize_job(job: dict) -> PatientResult:
    return synthesize_patient(**job)


def _case_name(index: int, patients: int) -> str:
    return f"case-{index + 1:0{max(3, len(str(patients)))}d}"


def _write_truth(truth_dir: Path, results: list[PatientResult]) -> None:
    truth_dir.mkdir(parents=True, exist_ok=True)
    with (truth_dir / "cases.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["case", "patient_id", "group", "n_lesions"])
        for index, result in enumerate(results):
            case = _case_name(index, len(results))
            np.savez_compressed(truth_dir / f"{case}.npz", **result.truth)
            writer.writerow([case, result.patient_id, result.group, len(result.truth["labels"])])


@dataclass
class CaseTruth:
    """Phantom truth of one patient's sagittal T2 (masks in spatial slice order)."""

    case: str
    patient_id: str
    group: str
    study_uid: str
    series_uid: str
    labels: list[str]
    kinds: list[str]
    levels: list[str]
    masks: np.ndarray  # bool (n_lesions, n_slices, rows, cols), slice k = spatial index
    instance_numbers: np.ndarray  # instance number of spatial slice k
    sop_instance_uids: list[str]
    ipp_first: np.ndarray
    iop: np.ndarray
    pixel_spacing: np.ndarray
    slice_step: float

    def mask(self, lesion: int, instance_number: int) -> np.ndarray:
        """The lesion's mask on the instance, in that instance's pixel grid (rows, cols)."""
        k = int(np.flatnonzero(self.instance_numbers == instance_number)[0])
        return self.masks[lesion, k]


def load_truth(root: Path) -> dict[str, CaseTruth]:
    """Read `root/truth/` back: {patient_id: CaseTruth}."""
    truth_dir = Path(root) / "truth"
    cases_csv = truth_dir / "cases.csv"
    if not cases_csv.is_file():
        raise SpinedetError(f"no truth in {truth_dir} (cases.csv missing)")
    truths = {}
    with cases_csv.open() as fh:
        for row in csv.DictReader(fh):
            with np.load(truth_dir / f"{row['case']}.npz") as data:
                truths[row["patient_id"]] = CaseTruth(
                    case=row["case"], patient_id=row["patient_id"], group=row["group"],
                    study_uid=str(data["study_uid"]), series_uid=str(data["series_uid"]),
                    labels=[str(v) for v in data["labels"]], kinds=[str(v) for v in data["kinds"]],
                    levels=[str(v) for v in data["levels"]], masks=data["masks"],
                    instance_numbers=data["instance_numbers"],
                    sop_instance_uids=[str(v) for v in data["sop_instance_uids"]],
                    ipp_first=data["ipp_first"], iop=data["iop"], pixel_spacing=data["pixel_spacing"],
                    slice_step=float(data["slice_step"]),
                )
    return truths


BOX_COLORS = ["#ff3030", "#30c0ff", "#ffd030"]


def write_preview(results: list[PatientResult], path: Path, max_patients: int = 8) -> None:
    """A montage of each patient's mid-sagittal T2 with its boxes (case names only, no PHI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = results[:max_patients]
    columns = min(4, len(shown))
    rows = int(np.ceil(len(shown) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(3.0 * columns, 3.1 * rows), squeeze=False)
    colors = {}
    for ax in axes.flat:
        ax.axis("off")
    for index, (ax, result) in enumerate(zip(axes.flat, shown)):
        image = result.preview_image
        low, high = np.percentile(image, [1, 99.5])
        ax.imshow(image, cmap="gray", vmin=low, vmax=high, interpolation="bilinear")
        for label, (x0, y0, x1, y1) in result.preview_boxes:
            color = colors.setdefault(label, BOX_COLORS[len(colors) % len(BOX_COLORS)])
            ax.add_patch(plt.Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor=color, linewidth=1))
        ax.set_title(f"{_case_name(index, len(results))}  {result.group}", fontsize=9)
    if colors:
        handles = [plt.Line2D([], [], color=c, label=l) for l, c in colors.items()]
        fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=72)
    plt.close(fig)
    # A palette of grays plus the box colours keeps the PNG small; no text chunks are written.
    box_colors = [tuple(int(c[i:i + 2], 16) for i in (1, 3, 5)) for c in BOX_COLORS]
    grays = [(v, v, v) for v in np.linspace(0, 255, 256 - len(box_colors)).astype(int)]
    palette = Image.new("P", (1, 1))
    palette.putpalette([channel for color in grays + box_colors for channel in color])
    image = Image.open(buffer).convert("RGB").quantize(palette=palette, dither=Image.Dither.NONE)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", optimize=True)


# --------------------------------------------------------------------------
# CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path, help="export root (DICOM/, annotations.csv, cohort.csv, truth/)")
    parser.add_argument("--patients", required=True, type=int, help="number of patients")
    parser.add_argument("--matrix", type=int, default=256, help="in-plane matrix of the sagittal T2 (default 256)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed writes the same files")
    parser.add_argument("--preview", type=Path, default=None, help="write a PNG montage of mid-sagittal slices with boxes")
    parser.add_argument("--config", nargs="+", default=None, help="config file(s); classes and groups are read from it")
    parser.add_argument("--workers", type=int, default=1, help="patients written in parallel (same files for any count)")


def run(args: argparse.Namespace) -> int:
    classes, groups = DEFAULT_CLASSES, DEFAULT_GROUPS
    if args.config:
        from spinedet.config import load

        config = load(args.config)
        classes = tuple(config.get("classes", classes))
        groups = tuple(config.get("groups", groups))
    summary = synthesize(args.out, args.patients, args.matrix, args.seed, classes=classes, groups=groups,
                         preview=args.preview, workers=args.workers)
    log.info("groups: %s; lesions: %s", summary["groups"], summary["lesions"])
    return 0
