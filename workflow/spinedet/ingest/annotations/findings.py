"""Which study class a label of a clinical tool means, and the rows both importers return.

A DICOM SR measurement group or a SEG segment says what it marks with coded
concepts (SNOMED CT, DCM, or a tool's own scheme, such as OHIF's
CORNERSTONEFREETEXT whose meaning is the reader's typed label) and with free
text (a tracking identifier, a segment label). A `finding_map` (config) maps
them to the study's classes: an entry `{"code": {"scheme", "value"}, "class"}`
matches a coded concept, an entry `{"text": regex, "class"}` is searched in
the texts and in the meanings of the coded concepts. `match_class` returns the
class of the first entry, in list order, that matches.

`ImportedBox` (a box in DICOM pixel-edge coordinates of one instance, and
frame for an Enhanced MR instance) and `ImportIssue` (an item that gives no
box, with a reason code and a detail a person can act on) are the rows of
`spinedet.ingest.annotations.sr` and `.seg`.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

# `meaning` is for people (and for the code a writer uses): matching compares scheme and value only.
DEFAULT_FINDING_MAP = [
    # 73589001 |Herniation of intervertebral disc (disorder)|
    {"code": {"scheme": "SCT", "value": "73589001", "meaning": "Herniation of intervertebral disc"},
     "class": "disc_herniation"},
    # 60022001 |Prolapsed cervical intervertebral disc (disorder)|
    {"code": {"scheme": "SCT", "value": "60022001", "meaning": "Prolapsed cervical intervertebral disc"},
     "class": "disc_herniation"},
    # 90584004 |Injury of spinal cord (disorder)|
    {"code": {"scheme": "SCT", "value": "90584004", "meaning": "Injury of spinal cord"}, "class": "cord_injury"},
    {"text": r"(?i)(disc|disk).*(hernia|prolap|protru|extru|bulg)|hernia", "class": "disc_herniation"},
    {"text": r"(?i)(cord|myel).*(injur|contus|lesion|edema|oedema)|sci\b", "class": "cord_injury"},
]

# The code a writer (a test, a tool export) should give each default class.
FINDING_CODES = {
    "disc_herniation": ("SCT", "73589001", "Herniation of intervertebral disc"),
    "cord_injury": ("SCT", "90584004", "Injury of spinal cord"),
}

# SNOMED CT concept ids (numeric) written under the retired designator SRT
# (dcmqi and Slicer before 2019) are the same codes as under SCT; SRT's own
# SNOMED RT codes (T-62000) are not.
SNOMED_RT, SNOMED_CT = "SRT", "SCT"

# Longest excerpt of an exception message kept in a detail.
MESSAGE_CHARS = 200


@dataclass(frozen=True)
class ImportedBox:
    """One box of an imported annotation, in DICOM pixel-edge coordinates of
    the referenced instance (x = column, y = row; pixel (c, r) covers
    [c, c+1) x [r, r+1)); `frame_number` (1-based) only for a multi-frame
    instance. `source` is "sr" or "seg", `source_ref` the object and item."""

    patient_id: str
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    instance_number: str
    frame_number: int | None
    label: str
    x_min: float
    y_min: float
    x_max: float
    y_max: float
    source: str
    source_ref: str


@dataclass(frozen=True)
class ImportIssue:
    """An annotation item (or a whole object) that gives no box: `reason` is a
    code, `detail` one sentence saying what to do; `label` is the class when
    it is known."""

    source: str
    source_ref: str
    reason: str
    detail: str
    patient_id: str = ""
    label: str = ""


def _code(concept) -> tuple[str, str, str] | None:
    """(scheme, value, meaning) of a pydicom Code, a highdicom CodedConcept or
    a tuple (scheme, value[, meaning]); None for anything else."""
    if concept is None:
        return None
    if isinstance(concept, (tuple, list)):
        if len(concept) < 2:
            return None
        scheme, value, *rest = concept
        meaning = rest[0] if rest else ""
    else:
        scheme = getattr(concept, "scheme_designator", None)
        value = getattr(concept, "value", None)
        meaning = getattr(concept, "meaning", "")
        if scheme is None or value is None:
            return None
    return str(scheme).strip(), str(value).strip(), str(meaning or "").strip()


def _key(scheme, value) -> tuple[str, str]:
    """(scheme, value) as compared: a SNOMED CT id under SRT counts as SCT."""
    scheme, value = str(scheme).strip(), str(value).strip()
    return (SNOMED_CT, value) if scheme == SNOMED_RT and value.isdigit() else (scheme, value)


def match_class(finding_map: list[dict], concepts: list, texts: list[str], classes) -> str | None:
    """The class of the first `finding_map` entry that matches a coded concept
    (same scheme designator and code value) or whose `text` regex is found in
    one of `texts` or in a concept's meaning; entries whose class is not one
    of `classes` are skipped. None when no entry matches."""
    codes = [code for code in map(_code, concepts) if code is not None]
    keys = {_key(scheme, value) for scheme, value, _ in codes}
    words = [str(text) for text in texts if text] + [meaning for _, _, meaning in codes if meaning]
    for entry in finding_map:
        if entry.get("class") not in classes:
            continue
        code = entry.get("code")
        if code and _key(code["scheme"], code["value"]) in keys:
            return entry["class"]
        pattern = entry.get("text")
        if pattern and any(re.search(pattern, word) for word in words):
            return entry["class"]
    return None


def describe_concept(concept) -> str:
    """'meaning' (scheme value) of a coded concept, for a detail; '(none)' when absent."""
    code = _code(concept)
    if code is None:
        return "(none)"
    scheme, value, meaning = code
    return f"'{meaning}' ({scheme} {value})" if meaning else f"{scheme} {value}"


def object_ref(path: Path, uid: str = "") -> str:
    """How an issue names a whole object: its SOPInstanceUID, else (unreadable
    header) the start of the file's SHA-256: file names and folders of an
    export can hold patient names."""
    if uid:
        return uid
    try:
        digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return "sha256:unavailable"
    return f"sha256:{digest[:16]}"


def exception_text(exc: BaseException, path: Path | None = None) -> str:
    """'Type: message' of an exception, without the file's path (folder
    names can hold patient names) and cut to MESSAGE_CHARS."""
    message = str(exc)
    if path is not None:
        message = message.replace(str(path), "<file>").replace(Path(path).as_posix(), "<file>")
    message = " ".join(message.split())
    if len(message) > MESSAGE_CHARS:
        message = message[:MESSAGE_CHARS] + "..."
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def unreadable_issue(source: str, path: Path, exc: BaseException, uid: str = "", patient_id: str = "") -> ImportIssue:
    """The one issue of an object that cannot be read at all."""
    what = "structured report" if source == "sr" else "segmentation"
    return ImportIssue(source, object_ref(path, uid), "unreadable_object",
                       f"the {what} cannot be read ({exception_text(exc, path)}): re-export it from the "
                       "annotation tool", patient_id)


def box_fields(row: dict) -> dict:
    """The identity columns of a box from the instance's files.csv row."""
    return {key: str(row.get(key) or "") for key in
            ("patient_id", "study_uid", "series_uid", "sop_instance_uid", "instance_number")}
