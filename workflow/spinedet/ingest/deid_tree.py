"""The de-identified tree that `spinedet deidentify` (DICOM exports) and
`spinedet bids-import` (BIDS datasets) both write: HMAC pseudonyms, paths
built from the pseudonym only, NIfTI volumes with their text fields cleared,
allowlisted sidecars.

- Pseudonym = HMAC-SHA256(key, patient or subject id) in hex, cut to
  `deidentify.pseudonym_length`. The key lives in restricted/ (generated
  once, mode 0600) or in the configured `deidentify.key_file`; the same key
  gives the same pseudonyms.
- The NIfTI is rewritten with its text fields (descrip, aux_file, db_name,
  intent_name, data_type) cleared and no extensions, gzip'd without a
  time stamp or file name, so reruns are byte-identical. The affine is kept.
"""

from __future__ import annotations

import gzip
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import shutil
import stat
from pathlib import Path

import nibabel as nib

from spinedet import SpinedetError
from spinedet.io import write_csv, write_json

log = logging.getLogger(__name__)

KEY_FILE_NAME = "pseudonym.key"
KEY_BYTES = 32
PSEUDONYM_PATTERN = re.compile(r"[0-9a-zA-Z]+")

# Acquisition parameters that say nothing about who, where or when.
SIDECAR_ALLOWLIST = (
    "Modality",
    "MagneticFieldStrength",
    "ImagingFrequency",
    "Manufacturer",
    "ManufacturersModelName",
    "MRAcquisitionType",
    "ScanningSequence",
    "SequenceVariant",
    "ScanOptions",
    "PulseSequenceType",
    "ImageType",
    "SliceThickness",
    "SpacingBetweenSlices",
    "EchoTime",
    "RepetitionTime",
    "InversionTime",
    "FlipAngle",
    "EchoTrainLength",
    "PixelBandwidth",
    "PercentPhaseFOV",
    "PercentSampling",
    "AcquisitionMatrixPE",
    "ReconMatrixPE",
    "PhaseEncodingSteps",
    "InPlanePhaseEncodingDirectionDICOM",
    "ImageOrientationPatientDICOM",
    "ConversionSoftware",
    "ConversionSoftwareVersion",
)
NIFTI_TEXT_FIELDS = ("descrip", "aux_file", "db_name", "intent_name", "data_type")


# --------------------------------------------------------------------------
# Pseudonyms


def load_or_create_key(restricted: Path, key_file: str | Path | None = None) -> bytes:
    """The HMAC key: from `key_file` (must exist), else restricted/pseudonym.key, created once."""
    if key_file is not None:
        path = Path(key_file)
        if not path.is_file():
            raise SpinedetError(f"pseudonym key file not found: {path} (--key-file, or config key "
                                "'deidentify.key_file')")
    else:
        path = Path(restricted) / KEY_FILE_NAME
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "w") as fh:
                fh.write(secrets.token_hex(KEY_BYTES) + "\n")
            log.info("generated a new pseudonym key in the restricted folder")
    if stat.S_IMODE(path.stat().st_mode) & 0o077:
        log.warning("the pseudonym key file is readable by others: chmod 600 %s", path)
    try:
        key = bytes.fromhex(path.read_text().strip())
    except ValueError:
        raise SpinedetError(f"pseudonym key file {path} must hold one hexadecimal key") from None
    if len(key) < 16:
        raise SpinedetError(f"pseudonym key in {path} is too short: use at least 16 bytes (32 hex digits)")
    return key


def pseudonym(key: bytes, patient_id: str, length: int) -> str:
    """HMAC-SHA256 of the PatientID, hex, first `length` characters."""
    return hmac.new(key, patient_id.encode("utf-8"), hashlib.sha256).hexdigest()[:length]


def pseudonymise(patient_ids: list[str], key: bytes, length: int) -> dict[str, str]:
    """{patient_id: pseudonym}; two patients sharing a pseudonym is an error."""
    table = {pid: pseudonym(key, pid, length) for pid in patient_ids}
    if len(set(table.values())) != len(table):
        raise SpinedetError(f"two patients share a pseudonym of {length} characters: raise "
                            "config key 'deidentify.pseudonym_length'")
    return table


def subject_paths(out: Path, pseudo: str, suffix: str = "T2w") -> dict[str, Path]:
    """Where a subject's files go. Only the pseudonym (alphanumeric) and the
    sequence suffix enter the path."""
    if not PSEUDONYM_PATTERN.fullmatch(pseudo):
        raise ValueError(f"pseudonym must be alphanumeric, got {pseudo!r}")
    subject = Path(out) / f"sub-{pseudo}"
    return {
        "dir": subject,
        "nifti": subject / "anat" / f"sub-{pseudo}_{suffix}.nii.gz",
        "sidecar": subject / "anat" / f"sub-{pseudo}_{suffix}.json",
        "boxes": subject / f"sub-{pseudo}_boxes.json",
    }


# --------------------------------------------------------------------------
# Volume and sidecar


def scrubbed_nifti_bytes(source: Path) -> bytes:
    """The volume as .nii.gz bytes with header text fields and extensions removed.

    gzip gets no file name and mtime 0, so equal volumes give equal bytes.
    """
    image = nib.load(source)
    header = image.header
    for field in NIFTI_TEXT_FIELDS:
        header[field] = b""
    header.extensions.clear()
    raw = image.to_bytes()
    return gzip.compress(raw, compresslevel=6, mtime=0)


def scrubbed_sidecar(source: Path, pixel_spacing: list[float] | None = None) -> dict:
    """The allowlisted keys of a dcm2niix (or BIDS) sidecar (+ PixelSpacing from the DICOM
    header). Raises ValueError (or OSError) for a sidecar that is not a readable JSON object."""
    with Path(source).open(encoding="utf-8") as fh:
        full = json.load(fh)
    if not isinstance(full, dict):
        raise ValueError("the sidecar is not a JSON object")
    kept = {key: full[key] for key in SIDECAR_ALLOWLIST if key in full}
    if pixel_spacing:
        kept["PixelSpacing"] = list(pixel_spacing)
    return kept


PARTICIPANT_COLUMNS = ["pseudonym", "group"]
PSEUDONYM_COLUMNS = ["patient_id", "pseudonym"]
ISSUE_COLUMNS = ["pseudonym", "row", "label", "reason", "detail"]


def write_json_sorted(path: Path, content) -> None:
    write_json(path, content, indent=2, sort_keys=True)


def write_subject_boxes(out: Path, pseudo: str, group: str, slice_axis: int, boxes: list[dict]) -> None:
    """sub-<p>/sub-<p>_boxes.json: the voxel boxes `spinedet slices` reads."""
    write_json_sorted(subject_paths(out, pseudo)["boxes"], {
        "pseudonym": pseudo, "group": group, "slice_axis": slice_axis, "boxes": boxes})


def finish_tree(out: Path, participants: list[dict], issues: list[dict]) -> None:
    """participants.csv and annotation_issues.csv; subject folders of an earlier run
    that are no longer participants are removed."""
    participants.sort(key=lambda p: p["pseudonym"])
    current = {f"sub-{p['pseudonym']}" for p in participants}
    for stale in Path(out).glob("sub-*"):
        if stale.is_dir() and stale.name not in current:
            shutil.rmtree(stale)
    write_csv(Path(out) / "participants.csv", participants, PARTICIPANT_COLUMNS)
    write_csv(Path(out) / "annotation_issues.csv", issues, ISSUE_COLUMNS)
