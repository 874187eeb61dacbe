"""`spinedet annotations`: every annotation of the study in one table.

Reads the annotation sheet (`annotations:`, optional), every TID 1500
measurement report (SR) and every segmentation (SEG) the inventory found in
the export, and (optional, `--coco` with `--manifest`) a COCO file of boxes
drawn in CVAT or Label Studio on the slices of `spinedet
export-for-annotation`, with a copy of that export's manifest.csv; writes
under --out (restricted/annotations/):
- annotations.csv: one row per box in DICOM pixel coordinates of its instance
  (the sheet's columns, plus `source`: csv, sr, seg, coco, and `source_ref`:
  the sheet's line, the object's SOPInstanceUID and its ROI or segment
  component, or the COCO file's annotation id); the sheet's rows come first,
  in their order, the COCO's last;
- import_issues.csv: every ROI, segment or box that cannot be used, with its
  reason (unknown_finding, unsupported_graphic, references_unknown_instance,
  unknown_frame, outside_image, empty_segment, empty_report, not_in_cohort,
  duplicate, sr_not_measurement_report, unreadable_object; for COCO boxes
  also unknown_image, unknown_label) and what to do;
and --summary (results/annotations/summary.json): PHI-free counts by source and reason.
deidentify reads annotations.csv; everything downstream is as for a sheet.
"""

from __future__ import annotations

import argparse
import logging
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from spinedet import SpinedetError
from spinedet.ingest.annotations.coco import read_coco, read_manifest
from spinedet.ingest.annotations.findings import ImportedBox, ImportIssue
from spinedet.ingest.annotations.seg import read_segmentation
from spinedet.ingest.annotation_sheet import COORDINATES, TABLE_COLUMNS, read_annotations
from spinedet.ingest.annotations.sr import read_measurement_report
from spinedet.io import read_csv, write_csv, write_json

log = logging.getLogger(__name__)

ISSUE_COLUMNS = ["source", "source_ref", "patient_id", "label", "reason", "detail"]
SOURCES = ("csv", "sr", "seg", "coco")
# Two objects giving the same box: within this many pixels on every edge.
DUPLICATE_PX = 1.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from spinedet.config import add_config_argument

    add_config_argument(parser)
    parser.add_argument("--files", required=True, type=Path, help="restricted inventory files.csv")
    parser.add_argument("--cohort", required=True, type=Path, help="cohort.csv (patient_id, group)")
    parser.add_argument("--sheet", type=Path, default=None,
                        help="annotations.csv in DICOM pixel coordinates (optional: SR and SEG may be all)")
    parser.add_argument("--coco", type=Path, default=None,
                        help="COCO file exported from CVAT or Label Studio, drawn on the images of "
                             "spinedet export-for-annotation (optional; needs --manifest)")
    parser.add_argument("--manifest", type=Path, default=None,
                        help="a copy of that export's manifest.csv (restricted/annotation_export/manifest.csv)")
    parser.add_argument("--out", required=True, type=Path, help="restricted annotations folder")
    parser.add_argument("--summary", required=True, type=Path, help="PHI-free summary.json")


def sheet_rows(path: Path) -> list[dict]:
    """The sheet's rows as table rows, verbatim, in file order."""
    rows = []
    for line, row in read_annotations(path):
        rows.append({**{column: str(row.get(column, "")) for column in TABLE_COLUMNS},
                     "source": "csv", "source_ref": f"{path.name} line {line}"})
    return rows


def box_row(box: ImportedBox) -> dict:
    """A box of an SR, SEG or COCO file as a table row (coordinates to 1/1000 px)."""
    return {
        "study_uid": box.study_uid, "series_uid": box.series_uid, "sop_instance_uid": box.sop_instance_uid,
        "instance_number": box.instance_number, "frame_number": "" if box.frame_number is None else str(box.frame_number),
        "label": box.label, **{c: f"{float(getattr(box, c)):.3f}".rstrip("0").rstrip(".") for c in COORDINATES},
        "source": box.source, "source_ref": box.source_ref,
    }


def issue_row(issue: ImportIssue) -> dict:
    return {"source": issue.source, "source_ref": issue.source_ref, "patient_id": issue.patient_id,
            "label": issue.label, "reason": issue.reason, "detail": issue.detail}


def same_box(a: dict, b: dict) -> bool:
    return (a["sop_instance_uid"], a["frame_number"], a["label"]) == (b["sop_instance_uid"], b["frame_number"],
                                                                     b["label"]) and all(
        abs(float(a[c]) - float(b[c])) <= DUPLICATE_PX for c in COORDINATES)


def origin(row: dict) -> str:
    """The object a row comes from: the sheet, an SR or SEG (its SOPInstanceUID), the COCO file."""
    return row["source_ref"].split("#")[0] if row["source"] in ("sr", "seg") else row["source"]


def drop_duplicates(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """Keep the first of boxes that two objects give alike (within DUPLICATE_PX): two
    sources, or two revisions of one report (a viewer saves a new SR each time, and a PACS
    exports them all); the sheet's rows come first. Boxes repeated within one object are
    kept: that is its author's business (as the sheet's own duplicates always were)."""
    kept, issues = [], []
    by_instance: dict[str, list[dict]] = {}
    for row in rows:
        earlier = next((k for k in by_instance.get(row["sop_instance_uid"], [])
                        if origin(k) != origin(row) and _numeric(row) and _numeric(k) and same_box(k, row)), None)
        if earlier is not None:
            issues.append({"source": row["source"], "source_ref": row["source_ref"], "patient_id": "",
                           "label": row["label"], "reason": "duplicate",
                           "detail": f"the same box (within {DUPLICATE_PX:g} px) as {earlier['source_ref']}: "
                                     "kept once"})
            continue
        kept.append(row)
        by_instance.setdefault(row["sop_instance_uid"], []).append(row)
    return kept, issues


def _numeric(row: dict) -> bool:
    try:
        [float(row[c]) for c in COORDINATES]
    except ValueError:
        return False
    return bool(row["sop_instance_uid"])


def collect(config: dict, file_rows: list[dict], cohort: set[str], sheet: Path | None,
            coco: tuple[Path, list[dict]] | None = None) -> tuple[list[dict], list[dict]]:
    """(table rows, issue rows) from the sheet, every SR and SEG of files.csv and
    `coco`: (COCO file, its export's manifest rows), read last."""
    classes = list(config["classes"])
    settings = config["annotation_import"]
    finding_map = settings["finding_map"]
    sizes = settings["point_box_mm"]
    point_box_mm = {name: float(sizes.get(name, sizes["default"])) for name in classes}
    # images of patients outside the cohort too: their regions are listed as not_in_cohort,
    # not as references to unknown images
    instances = {row["sop_instance_uid"]: row for row in file_rows if row["kind"] == "image" and (
        row["status"] == "ok" or row["reason"] == "not_in_cohort")}
    rows = sheet_rows(sheet) if sheet is not None else []
    issues: list[dict] = []
    objects = [row for row in file_rows if row["status"] == "ok" and row["kind"] in ("sr", "seg")]
    for obj in tqdm(objects, desc="annotation objects", unit="object", disable=not objects):
        path = Path(obj["path"])
        if obj["kind"] == "sr":
            boxes, problems = read_measurement_report(path, instances, finding_map, classes, point_box_mm)
        else:
            boxes, problems = read_segmentation(path, instances, finding_map, classes)
        add_boxes(rows, issues, boxes, problems, cohort)
    if coco is not None:
        # after the sheet, SR and SEG: a box they already give is the COCO's duplicate
        boxes, problems = read_coco(coco[0], coco[1], instances, classes)
        add_boxes(rows, issues, boxes, problems, cohort)
    rows, duplicates = drop_duplicates(rows)
    return rows, issues + duplicates


def add_boxes(rows: list[dict], issues: list[dict], boxes: list[ImportedBox], problems: list[ImportIssue],
              cohort: set[str]) -> None:
    """Add one object's boxes to the table rows (those of a patient outside the cohort as issues)
    and its issues to the issue rows."""
    issues += [issue_row(problem) for problem in problems]
    for box in boxes:
        if box.patient_id not in cohort:
            issues.append(issue_row(ImportIssue(
                box.source, box.source_ref, "not_in_cohort",
                "the referenced image's patient is not in cohort.csv: add the patient to the cohort, or "
                "leave the object out", box.patient_id, box.label)))
        else:
            rows.append(box_row(box))


def summary(rows: list[dict], issues: list[dict], objects: Counter, coco: bool = False) -> dict:
    """PHI-free counts: objects read, boxes and unusable items by source, items by reason.
    The coco source is counted when a COCO file was given."""
    boxes = Counter(row["source"] for row in rows)
    unusable = Counter(issue["source"] for issue in issues)
    sources = SOURCES if coco else tuple(source for source in SOURCES if source != "coco")
    return {
        "objects": {kind: objects.get(kind, 0) for kind in ("sr", "seg")},
        "boxes_by_source": {source: boxes.get(source, 0) for source in sources},
        "unusable_by_source": {source: unusable.get(source, 0) for source in sources},
        "unusable_by_reason": dict(sorted(Counter(issue["reason"] for issue in issues).items())),
        "boxes_by_label": dict(sorted(Counter(row["label"] for row in rows).items())),
    }


def run(args: argparse.Namespace) -> int:
    from spinedet.config import load

    config = load(args.config)
    file_rows = read_csv(args.files)
    cohort = {row["patient_id"] for row in read_csv(args.cohort)}
    if args.sheet is not None and not args.sheet.is_file():
        raise SpinedetError(f"annotations sheet not found: {args.sheet}")
    coco = None
    if (args.coco is None) != (args.manifest is None):
        raise SpinedetError("--coco and --manifest go together: the COCO file of the annotation tool and the "
                            "manifest.csv of the export its images came from")
    if args.coco is not None:
        if not args.coco.is_file():
            raise SpinedetError(f"COCO file not found: {args.coco}")
        coco = (args.coco, read_manifest(args.manifest))
    rows, issues = collect(config, file_rows, cohort, args.sheet, coco)
    write_csv(args.out / "annotations.csv", rows, TABLE_COLUMNS)
    write_csv(args.out / "import_issues.csv", issues, ISSUE_COLUMNS)
    objects = Counter(row["kind"] for row in file_rows if row["status"] == "ok" and row["kind"] in ("sr", "seg"))
    counts = summary(rows, issues, objects, coco=coco is not None)
    write_json(args.summary, counts, indent=2)
    log.info("%d boxes (%s), %d unusable items listed in import_issues.csv (%s)", len(rows),
             ", ".join(f"{source} {n}" for source, n in counts["boxes_by_source"].items()), len(issues),
             ", ".join(f"{reason} {n}" for reason, n in counts["unusable_by_reason"].items()) or "none")
    if not rows:
        raise SpinedetError("no usable annotation in the sheet, SR or SEG objects or the COCO file: nothing to "
                            f"train on (see {args.out / 'import_issues.csv'})")
    return 0
