"""`spinedet deidentify`: pseudonymise, scrub, and move annotations into voxel space.

- Pseudonyms, paths, scrubbed volumes: spinedet.ingest.deid_tree (HMAC of
  the PatientID). The table patient_id -> pseudonym stays in
  restricted/pseudonyms.csv.
- The sidecar keeps only an allowlist of acquisition parameters.
- Each annotation (DICOM pixel box on one instance, or on one frame of a
  multi-frame instance) is mapped through the geometry of that image and
  the volume's affine (spinedet.geometry);
  an annotation that cannot be mapped is listed in annotation_issues.csv
  by its line in annotations.csv, with the pseudonym, never a UID.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from collections import defaultdict
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm import tqdm

from spinedet import SpinedetError
from spinedet.ingest.annotation_sheet import COORDINATES, read_annotations
from spinedet.ingest.deid_tree import (
    PSEUDONYM_COLUMNS,
    finish_tree,
    load_or_create_key,
    pseudonymise,
    scrubbed_nifti_bytes,
    scrubbed_sidecar,
    subject_paths,
    write_json_sorted,
    write_subject_boxes,
)
from spinedet.ingest.dicom import image_planes
from spinedet.geometry import GeometryError, pixel_box_to_voxel_box, volume_slice_axis
from spinedet.io import read_csv, write_bytes, write_csv

log = logging.getLogger(__name__)

def add_arguments(parser: argparse.ArgumentParser) -> None:
    from spinedet.config import add_config_argument

    add_config_argument(parser)
    parser.add_argument("--conversions", required=True, type=Path, help="restricted conversions.csv")
    parser.add_argument("--files", required=True, type=Path, help="restricted inventory files.csv")
    parser.add_argument("--selection", required=True, type=Path, help="restricted inventory selection.csv")
    parser.add_argument("--annotations", required=True, type=Path, help="annotations.csv (DICOM pixel boxes)")
    parser.add_argument("--restricted", required=True, type=Path, help="restricted folder (key, key table)")
    parser.add_argument("--key-file", type=Path, default=None,
                        help="HMAC key file (hex); default: the workflow's key (config deidentify.key_file; "
                             "with the demo, the export's pseudonym.key; else restricted/pseudonym.key)")
    parser.add_argument("--out", required=True, type=Path, help="de-identified output folder")


# --------------------------------------------------------------------------
# Series


def bids_suffix(series_description: str) -> str:
    """The BIDS-style suffix of the selected series, from its description: STIR,
    T1w or T2w (STIR first: "T2 STIR" is a STIR); MR when none applies."""
    for pattern, suffix in (("(?i)stir", "STIR"), ("(?i)t1", "T1w"), ("(?i)t2", "T2w")):
        if re.search(pattern, series_description or ""):
            return suffix
    return "MR"


# --------------------------------------------------------------------------
# Annotations


class AnnotationIssue(Exception):
    """An annotation that cannot be used; `reason` is a short code, `detail` PHI-free text."""

    def __init__(self, reason: str, detail: str, patient_id: str = ""):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.patient_id = patient_id


class InstanceIndex:
    """Lookup of instances in files.csv by SOPInstanceUID or (series, InstanceNumber)."""

    def __init__(self, file_rows: list[dict]):
        self.by_uid: dict[str, dict] = {}
        self.by_number: dict[tuple[str, str], list[dict]] = defaultdict(list)
        self.quarantined_by_uid: dict[str, dict] = {}
        self.series_patient: dict[str, str] = {}
        for row in file_rows:
            if row["status"] == "ok" and row["kind"] == "image":
                self.by_uid[row["sop_instance_uid"]] = row
                self.by_number[(row["series_uid"], _instance_number(row["instance_number"]))].append(row)
                self.series_patient.setdefault(row["series_uid"], row["patient_id"])
            elif row["status"] == "quarantined" and row["sop_instance_uid"]:
                self.quarantined_by_uid.setdefault(row["sop_instance_uid"], row)

    def find(self, annotation: dict) -> dict:
        series_uid = (annotation.get("series_uid") or "").strip()
        sop_uid = (annotation.get("sop_instance_uid") or "").strip()
        number = _instance_number(annotation.get("instance_number") or "")
        owner = self.series_patient.get(series_uid, "")
        if sop_uid:
            row = self.by_uid.get(sop_uid)
            if row is None:
                quarantined = self.quarantined_by_uid.get(sop_uid)
                if quarantined is not None:
                    raise AnnotationIssue("instance_quarantined", "the annotated file was quarantined "
                                          f"by the inventory ({quarantined['reason']})",
                                          quarantined["patient_id"])
                raise AnnotationIssue("unknown_instance", "no file of the export has this "
                                      "sop_instance_uid", owner)
            if series_uid and row["series_uid"] != series_uid:
                raise AnnotationIssue("unknown_instance", "the sop_instance_uid belongs to another "
                                      "series than series_uid", row["patient_id"])
            return row
        if not number:
            raise AnnotationIssue("unknown_instance", "neither sop_instance_uid nor instance_number "
                                  "is given", owner)
        matches = self.by_number.get((series_uid, number), [])
        if not matches:
            raise AnnotationIssue("unknown_instance", f"series_uid has no usable instance number "
                                  f"{number}" if owner else "no file of the export has this series_uid",
                                  owner)
        if len(matches) > 1:
            raise AnnotationIssue("unknown_instance", f"instance number {number} is ambiguous: "
                                  f"{len(matches)} files of the series carry it; give sop_instance_uid",
                                  owner)
        return matches[0]


def _instance_number(value: str) -> str:
    """InstanceNumber as a canonical string ('7', '7.0' and ' 7' are the same)."""
    value = str(value).strip()
    try:
        return str(int(float(value)))
    except ValueError:
        return value


def map_annotation(annotation: dict, instances: InstanceIndex, volumes: dict[str, dict],
                   classes: list[str]) -> tuple[str, dict]:
    """(patient_id, box dict for boxes.json) of one annotation, or raise AnnotationIssue.

    `volumes` maps series_uid -> {"affine", "shape", "slice_axis", "patient_id"}
    of the converted target series.
    """
    label = (annotation.get("label") or "").strip()
    try:
        instance = instances.find(annotation)
        lookup_issue, patient_id = None, instance["patient_id"]
    except AnnotationIssue as issue:
        instance, lookup_issue, patient_id = None, issue, issue.patient_id
    if label not in classes:
        raise AnnotationIssue("unknown_label", f"label is not one of the config's classes {classes}",
                              patient_id)
    try:
        box = [float(annotation[c]) for c in COORDINATES]
    except (TypeError, ValueError):
        box = [float("nan")]
    if not all(np.isfinite(box)):
        raise AnnotationIssue("malformed", "x_min, y_min, x_max, y_max must be numbers", patient_id)
    x_min, y_min, x_max, y_max = box
    if x_max <= x_min or y_max <= y_min:
        raise AnnotationIssue("inverted_box", f"x {x_min:g}..{x_max:g}, y {y_min:g}..{y_max:g}: "
                              "max must exceed min", patient_id)
    if lookup_issue is not None:
        raise lookup_issue
    plane = annotated_plane(instance, annotation.get("frame_number"), patient_id)
    rows, columns = int(instance["rows"]), int(instance["columns"])
    if x_min < 0 or y_min < 0 or x_max > columns or y_max > rows:
        raise AnnotationIssue("outside_image", f"x {x_min:g}..{x_max:g}, y {y_min:g}..{y_max:g} "
                              f"leaves the {columns} x {rows} image", patient_id)
    volume = volumes.get(instance["series_uid"])
    if volume is None:
        raise AnnotationIssue("series_not_converted", "the annotated series is not this patient's "
                              "converted target series (not selected, or its conversion was "
                              "quarantined)", patient_id)
    try:
        voxel_box = pixel_box_to_voxel_box(
            box,
            plane["ipp"],
            plane["iop"],
            plane["pixel_spacing"],
            volume["affine"],
            shape=volume["shape"],
        )
    except GeometryError as exc:
        raise AnnotationIssue("geometry", str(exc), patient_id) from None
    if voxel_box.slice_axis != volume["slice_axis"]:
        raise AnnotationIssue("geometry", "the annotated image is not a slice of the volume", patient_id)
    return patient_id, {"label": label, **voxel_box.as_dict()}


def annotated_plane(instance: dict, frame_number, patient_id: str) -> dict:
    """The image an annotation lies on: its frame (1-based `frame_number`) of a
    multi-frame instance, the instance itself otherwise."""
    planes = image_planes(instance)
    text = "" if frame_number is None else str(frame_number).strip()
    if not text:
        if len(planes) > 1:
            raise AnnotationIssue("unknown_frame", f"the annotated instance is a multi-frame image of "
                                  f"{len(planes)} frames: give frame_number", patient_id)
        return planes[0]
    number = _instance_number(text)
    if not number.isdigit() or not 1 <= int(number) <= len(planes):
        raise AnnotationIssue("unknown_frame", f"frame_number {text} is not one of the instance's frames "
                              f"(1..{len(planes)})", patient_id)
    return planes[int(number) - 1]


# --------------------------------------------------------------------------
# The whole step


def deidentify(conversions: list[dict], file_rows: list[dict], selection: list[dict],
               annotations: list[tuple[int, dict]], key: bytes, config: dict, out: Path,
               restricted: Path) -> dict:
    """Write everything; returns counts {"participants", "boxes", "issues"}."""
    out, restricted = Path(out), Path(restricted)
    length = config["deidentify"]["pseudonym_length"]
    classes = list(config["classes"])
    groups = {row["patient_id"]: row["group"] for row in selection}
    pseudonyms = pseudonymise(list(groups), key, length)
    write_csv(restricted / "pseudonyms.csv",
              [{"patient_id": pid, "pseudonym": p} for pid, p in pseudonyms.items()], PSEUDONYM_COLUMNS)

    instances = InstanceIndex(file_rows)
    first_file_of_series: dict[str, dict] = {}
    for row in file_rows:
        if row["status"] == "ok" and row["kind"] == "image":
            first_file_of_series.setdefault(row["series_uid"], row)

    volumes: dict[str, dict] = {}
    participants = []
    converted = [c for c in conversions if c["status"] == "converted"]
    for conversion in tqdm(converted, desc="deidentify", unit="patient"):
        patient_id = conversion["patient_id"]
        if patient_id not in pseudonyms:
            raise SpinedetError(f"selection row {conversion['row']}: a converted patient is missing from "
                                "selection.csv: rerun inventory and convert")
        first = first_file_of_series.get(conversion["series_uid"])
        if first is None:
            raise SpinedetError(f"selection row {conversion['row']}: the converted series has no ok file "
                                "in files.csv: rerun inventory and convert")
        paths = subject_paths(out, pseudonyms[patient_id], bids_suffix(first["series_description"]))
        write_bytes(paths["nifti"], scrubbed_nifti_bytes(Path(conversion["nifti"])))
        write_json_sorted(paths["sidecar"], scrubbed_sidecar(Path(conversion["sidecar"]),
                                                       json.loads(first["pixel_spacing"])))
        image = nib.load(conversion["nifti"])
        iop = json.loads(first["image_orientation"])
        volumes[conversion["series_uid"]] = {
            "patient_id": patient_id,
            "affine": image.affine,
            "shape": image.shape,
            "slice_axis": volume_slice_axis(iop, image.affine),
        }
        participants.append({"pseudonym": pseudonyms[patient_id], "group": groups[patient_id]})

    boxes = defaultdict(list)
    issues = []
    for line, annotation in annotations:
        try:
            patient_id, box = map_annotation(annotation, instances, volumes, classes)
            boxes[patient_id].append(box)
        except AnnotationIssue as issue:
            label = (annotation.get("label") or "").strip()
            issues.append({
                "pseudonym": pseudonyms.get(issue.patient_id, ""),
                "row": line,
                "label": label if label in classes else "",
                "reason": issue.reason,
                "detail": issue.detail,
            })

    for volume in volumes.values():
        patient_id = volume["patient_id"]
        write_subject_boxes(out, pseudonyms[patient_id], groups[patient_id], volume["slice_axis"],
                            boxes.get(patient_id, []))
    finish_tree(out, participants, issues)
    return {"participants": len(participants), "boxes": sum(len(b) for b in boxes.values()),
            "issues": len(issues)}


def run(args: argparse.Namespace) -> int:
    from spinedet.config import load, pseudonym_key_file

    config = load(args.config)
    if Path(args.restricted).resolve().is_relative_to(Path(args.out).resolve()):
        raise SpinedetError(f"the restricted folder {args.restricted} lies inside --out {args.out}: "
                            "the key would leave restricted/")
    key = load_or_create_key(args.restricted, args.key_file or pseudonym_key_file(config))
    counts = deidentify(
        conversions=read_csv(args.conversions),
        file_rows=read_csv(args.files),
        selection=read_csv(args.selection),
        annotations=read_annotations(args.annotations),
        key=key,
        config=config,
        out=args.out,
        restricted=args.restricted,
    )
    log.info("%d participants, %d boxes in voxel space, %d annotations quarantined (see "
             "annotation_issues.csv)", counts["participants"], counts["boxes"], counts["issues"])
    if not counts["participants"]:
        raise SpinedetError("0 patients de-identified: no converted series belongs to a cohort patient; "
                            "nothing to slice (see restricted/convert/conversions.csv)")
    return 0
