"""A reusable PHI leak scanner for tests.

    phi = collect_phi(raw_export_root)        # {value: "PatientName", ...}
    hits = scan_tree(results_dir, phi)        # [] when nothing leaked

`collect_phi` reads every DICOM header under an export (nested sequences
and file meta included) and gathers the identifying values: all person
names (VR PN), dates and times (DA, TM, DT), instance UIDs (study, series,
SOP, frame of reference, ... every UI value that is not a registered DICOM
UID such as a SOP class or transfer syntax), and the identifying text
attributes in PHI_TEXT_KEYWORDS (IDs, accession, institution, station,
serial number, addresses, ...).

Each value is searched in several spellings: dates as YYYYMMDD and
YYYY-MM-DD; times as HHMMSS, HH:MM:SS and, as dcm2niix writes them into
the NIfTI descrip, without leading zeros (90912 for 090912, searched from
5 characters); names as the whole DICOM name and
each component (family, given, ...) plus "given family" / "family given" /
"family, given"; every value also as it would appear JSON-escaped.

To keep chance collisions with numbers in the outputs away, values shorter
than MIN_LENGTH (6) characters are not searched, except name parts, which
are searched from MIN_NAME_LENGTH (3). A value only counts where it is not
glued to further letters or digits (so the date 20190312 is not found
inside 201903121, and a UID is not found inside a longer digit run), and
an all-digit value not as the fraction of a number below one (the time
152956 in a score 0.152956).
Matching ignores ASCII case.

`scan_tree` looks at every file and folder under a root: its relative
path, and its content with compression undone: gzip files (.nii.gz; the
gzip header too, which may carry a file name), zip archives (.pt, .npz:
member names and contents), PNG chunks (tEXt as is, zTXt/iTXt
decompressed). Pixel and voxel data (PNG IDAT, NIfTI data after
vox_offset) are binary: in them only values of MIN_LENGTH or more count,
as a 3-letter name turns up by chance in a few MB of arbitrary bytes.
Compressed bytes themselves are not searched for the same reason.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import struct
import zipfile
import zlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.uid import UID

MIN_LENGTH = 6
MIN_NAME_LENGTH = 3

PHI_TEXT_KEYWORDS = {
    "PatientID",
    "OtherPatientIDs",
    "IssuerOfPatientID",
    "AccessionNumber",
    "StudyID",
    "InstitutionName",
    "InstitutionAddress",
    "InstitutionalDepartmentName",
    "StationName",
    "DeviceSerialNumber",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "ReferringPhysicianAddress",
    "ReferringPhysicianTelephoneNumbers",
    "RequestedProcedureID",
    "ScheduledProcedureStepID",
    "PerformedProcedureStepID",
    "AdmissionID",
    "MedicalRecordLocator",
    "MilitaryRank",
    "BranchOfService",
    "RegionOfResidence",
}
NOT_PHI_UID_KEYWORDS = {"ImplementationClassUID"}  # the writing toolkit, the same everywhere

_ALNUM_BYTES = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
_ALNUM_RUN = re.compile(rb"[a-z0-9]+")


# --------------------------------------------------------------------------
# Collecting PHI values from raw headers


def _name_variants(value) -> list[tuple[str, int]]:
    name = pydicom.valuerep.PersonName(value)
    parts = [name.family_name, name.given_name, name.middle_name, name.name_prefix, name.name_suffix]
    parts = [p.strip() for p in parts if p and p.strip()]
    variants = [(str(value).strip(), MIN_NAME_LENGTH)] + [(p, MIN_NAME_LENGTH) for p in parts]
    family, given = name.family_name.strip(), name.given_name.strip()
    if family and given:
        variants += [(f"{given} {family}", MIN_NAME_LENGTH), (f"{family} {given}", MIN_NAME_LENGTH),
                     (f"{family}, {given}", MIN_NAME_LENGTH)]
    return variants


def _date_variants(value: str) -> list[str]:
    value = value.strip()
    if re.fullmatch(r"\d{8}", value):
        return [value, f"{value[:4]}-{value[4:6]}-{value[6:]}"]
    return [value]


def _time_variants(value: str) -> list[tuple[str, int]]:
    value = value.strip()
    whole = value.split(".")[0]
    variants = [(value, MIN_LENGTH), (whole, MIN_LENGTH)]
    if re.fullmatch(r"\d{6}", whole):
        variants.append((f"{whole[:2]}:{whole[2:4]}:{whole[4:]}", MIN_LENGTH))
        # dcm2niix writes times as numbers, "Time=90912.000" for 09:09:12
        variants.append((whole.lstrip("0"), MIN_LENGTH - 1))
    return variants


def _element_values(element) -> list[str]:
    value = element.value
    if value is None or value == "":
        return []
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        return [str(v) for v in value if v not in (None, "")]
    return [str(value)]


def phi_values_of_dataset(dataset) -> dict[str, str]:
    """{value spelling: attribute keyword} for one dataset (sequences and file meta included)."""
    found: dict[str, str] = {}

    def add(text: str, keyword: str, min_length: int = MIN_LENGTH) -> None:
        text = text.strip()
        if len(text) >= min_length:
            found.setdefault(text, keyword)
            escaped = json.dumps(text)[1:-1]
            if escaped != text:
                found.setdefault(escaped, keyword)

    elements = list(dataset.iterall())
    if getattr(dataset, "file_meta", None) is not None:
        elements += list(dataset.file_meta.iterall())
    for element in elements:
        if element.tag.is_private or element.VR == "SQ":
            continue
        keyword = element.keyword or str(element.tag)
        for value in _element_values(element):
            if element.VR == "PN":
                for text, min_length in _name_variants(value):
                    add(text, keyword, min_length)
            elif element.VR == "DA":
                for text in _date_variants(value):
                    add(text, keyword)
            elif element.VR == "TM":
                for text, min_length in _time_variants(value):
                    add(text, keyword, min_length)
            elif element.VR == "DT":
                add(value, keyword)
                for text in _date_variants(value[:8]):
                    add(text, keyword)
                for text, min_length in _time_variants(value[8:]):
                    add(text, keyword, min_length)
            elif element.VR == "UI":
                if keyword not in NOT_PHI_UID_KEYWORDS and UID(value).name == value:
                    add(value, keyword)  # an instance UID, not a registered (public) one
            elif keyword in PHI_TEXT_KEYWORDS:
                add(value, keyword)
    return found


def collect_phi(raw_root: str | Path) -> dict[str, str]:
    """PHI values of every readable DICOM header under `raw_root` ({value: keyword})."""
    found: dict[str, str] = {}
    for path in sorted(Path(raw_root).rglob("*")):
        if not path.is_file():
            continue
        try:
            dataset = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        except Exception:  # noqa: BLE001 - junk files simply hold no header to collect
            continue
        for value, keyword in phi_values_of_dataset(dataset).items():
            found.setdefault(value, keyword)
    return found


# --------------------------------------------------------------------------
# Scanning


@dataclass(frozen=True)
class Hit:
    path: str  # relative to the scanned root
    where: str  # "name", "content", "content (gunzipped)", ...
    value: str
    keyword: str

    def __str__(self) -> str:
        return f"{self.path} [{self.where}]: {self.keyword} {self.value!r}"


class PhiMatcher:
    """Finds PHI values in bytes quickly.

    Each value is anchored on its longest run of letters/digits. A match of
    the whole value, with non-alphanumeric neighbours, makes that anchor a
    complete alphanumeric run of the text, so only such runs need checking.
    """

    def __init__(self, values: dict[str, str]):
        self.by_anchor: dict[bytes, list[tuple[bytes, int, str, str]]] = defaultdict(list)
        for value, keyword in values.items():
            needle = value.lower().encode("utf-8")
            runs = list(_ALNUM_RUN.finditer(needle))
            if not runs:
                continue
            anchor = max(runs, key=lambda m: len(m.group()))
            self.by_anchor[anchor.group()].append((needle, anchor.start(), value, keyword))
        shortest = min((len(a) for a in self.by_anchor), default=1)
        self.runs = re.compile(rb"[a-z0-9]{%d,}" % shortest)

    def find(self, data: bytes, min_length: int = 0) -> dict[str, str]:
        """{value: keyword} of the values (of at least `min_length` characters) found in `data`."""
        data = data.lower()
        found: dict[str, str] = {}
        for run in self.runs.finditer(data):
            for needle, offset, value, keyword in self.by_anchor.get(run.group(), ()):
                if len(value) < min_length:
                    continue
                start, end = run.start() - offset, run.start() - offset + len(needle)
                if (start >= 0 and data.startswith(needle, start)
                        and (start == 0 or data[start - 1] not in _ALNUM_BYTES)
                        and (end >= len(data) or data[end] not in _ALNUM_BYTES)
                        and not _is_decimal_fraction(data, start, needle)):
                    found.setdefault(value, keyword)
        return found


def _is_decimal_fraction(data: bytes, start: int, needle: bytes) -> bool:
    """An all-digit value right after a lone "0." is the fraction of a number below
    one (a time 152956 in a score 0.152956), not a value written out; after any
    other "<digits>." (a UID-like 3.20190312.152956) it still counts."""
    return (needle.isdigit() and data[max(0, start - 2):start] == b"0."
            and (start == 2 or (data[start - 3] not in _ALNUM_BYTES and data[start - 3] != ord("."))))


def _png_chunks(data: bytes) -> tuple[bytes, list[bytes]]:
    """(every chunk but the image data, decompressed zTXt/iTXt payloads) of a PNG."""
    kept, texts, position = [], [], 8
    while position + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[position:position + 8])
        body = data[position + 8:position + 8 + length]
        position += 12 + length
        if kind != b"IDAT":
            kept.append(kind + body)
        try:
            if kind == b"zTXt":
                texts.append(zlib.decompress(body.split(b"\0", 1)[1][1:]))
            elif kind == b"iTXt":
                _keyword, rest = body.split(b"\0", 1)
                if rest[0] == 1:  # compressed
                    texts.append(zlib.decompress(rest[2:].split(b"\0", 2)[2]))
        except (IndexError, zlib.error):
            continue
    return b"\n".join(kept), texts


def _gzip_header(data: bytes) -> bytes:
    """The gzip header up to the compressed data: it may carry a file name and a comment."""
    flags, end = data[3], 10
    if flags & 0x04:  # FEXTRA
        end += 2 + int.from_bytes(data[10:12], "little")
    for flag in (0x08, 0x10):  # FNAME, FCOMMENT: zero-terminated
        if flags & flag:
            end = data.index(b"\0", end) + 1
    return data[:end]


def _payload_parts(label: str, data: bytes) -> list[tuple[str, bytes, bool]]:
    """Split a NIfTI-1 payload into header (text fields, extensions) and voxel data."""
    if len(data) >= 352 and struct.unpack("<i", data[:4])[0] == 348 and data[344:347] in (b"n+1", b"ni1"):
        vox_offset = max(352, int(struct.unpack("<f", data[108:112])[0]))
        return [(f"{label} NIfTI header", data[:vox_offset], False),
                (f"{label} NIfTI voxels", data[vox_offset:], True)]
    return [(label, data, False)]


def file_contents(path: Path) -> list[tuple[str, bytes, bool]]:
    """(label, bytes, is_binary) of what a file holds, compression undone.

    Compressed streams are scanned decompressed (their raw bytes are noise
    in which short names would turn up by chance), PNG image data and
    NIfTI voxel data and torch tensor storages as binary: only values of
    MIN_LENGTH or more.
    """
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        try:
            return [("gzip header", _gzip_header(data), False),
                    *_payload_parts("content (gunzipped)", gzip.decompress(data))]
        except (OSError, EOFError, ValueError, IndexError):
            pass
    if data[:4] == b"PK\x03\x04":
        try:
            parts = []
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                for member in archive.namelist():
                    parts.append((f"name (zip member {member})", member.encode(), False))
                    # torch.save archives keep each tensor's raw storage in
                    # <name>/data/<n>: numbers, scanned as binary.
                    is_tensor_storage = re.search(r"/data/\d+$", member) is not None
                    parts.append((f"content (zip member {member})", archive.read(member), is_tensor_storage))
            return parts
        except zipfile.BadZipFile:
            pass
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        chunks, texts = _png_chunks(data)
        return [("PNG chunks", chunks, False), *[("content (PNG text chunk)", t, False) for t in texts]]
    return _payload_parts("content", data)


LOG_RECORD_TIME = re.compile(rb"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2},\d{3} (?=[A-Z]+ )")


def scan_tree(root: str | Path, phi: dict[str, str]) -> list[Hit]:
    """Every place under `root` (file and folder names, file contents) holding a PHI value."""
    root = Path(root)
    matcher = PhiMatcher(phi)
    hits: list[Hit] = []
    for folder, dirs, names in os.walk(root):
        for name in sorted(dirs):
            relative = Path(folder, name).relative_to(root).as_posix()
            for value, keyword in matcher.find(relative.encode("utf-8")).items():
                hits.append(Hit(relative + "/", "name", value, keyword))
        for name in sorted(names):
            path = Path(folder, name)
            relative = path.relative_to(root).as_posix()
            for value, keyword in matcher.find(relative.encode("utf-8")).items():
                hits.append(Hit(relative, "name", value, keyword))
            if not path.is_file():
                continue
            for where, content, binary in file_contents(path):
                if path.suffix == ".log":
                    # The logger's own clock ("2026-11-30 14:16:50,123 INFO ...") is no
                    # PHI, but can equal a synthetic StudyTime to the second.
                    content = LOG_RECORD_TIME.sub(b"", content)
                for value, keyword in matcher.find(content, MIN_LENGTH if binary else 0).items():
                    hits.append(Hit(relative, where, value, keyword))
    return hits
