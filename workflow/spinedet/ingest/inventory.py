"""`spinedet inventory`: account for every file of a raw export, pick one target series per patient.

Reads DICOM headers only (large values such as the pixel data are skipped
by position, never loaded). Every file gets one row in files.csv, `ok` or
`quarantined` with a reason code and a detail a person can act on; ok
images are grouped into series, and one target series is chosen per cohort
patient by the config's `inventory:` rules. Patients of the cohort without
a target series are listed in selection.csv with the reason.

Everything written under `--out` carries identity (paths, IDs, UIDs) and
belongs in restricted/; `--summary` holds PHI-free counts only.
"""

from __future__ import annotations

import argparse
import logging
from collections import Counter, defaultdict
from pathlib import Path

from tqdm import tqdm

from spinedet import SpinedetError
from spinedet.ingest.dicom import (
    build_series,
    is_multi_volume,
    is_target,
    missing_slices,
    quarantine_row,
    read_file,
    series_rank,
    walk_export,
)
from spinedet.io import read_table, write_csv, write_json

log = logging.getLogger(__name__)

FILE_COLUMNS = [
    "path",
    "status",
    "kind",
    "reason",
    "detail",
    "patient_id",
    "study_uid",
    "series_uid",
    "sop_instance_uid",
    "instance_number",
    "sop_class_uid",
    "series_number",
    "series_description",
    "rows",
    "columns",
    "frames",
    "image_position",
    "frame_positions",
    "image_orientation",
    "pixel_spacing",
    "slice_thickness",
    "orientation",
]
SERIES_COLUMNS = [
    "patient_id",
    "study_uid",
    "series_uid",
    "series_number",
    "description",
    "orientation",
    "n_slices",
    "positions",
    "missing_slices",
    "pixel_spacing",
    "slice_thickness",
    "rows",
    "columns",
    "files",
    "selected",
]
SELECTION_COLUMNS = ["row", "patient_id", "group", "series_uid", "status", "reason", "fallbacks"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from spinedet.config import add_config_argument

    add_config_argument(parser)
    parser.add_argument("--raw", required=True, type=Path, help="root of the raw DICOM export")
    parser.add_argument("--cohort", required=True, type=Path, help="cohort.csv (patient_id, group)")
    parser.add_argument("--out", required=True, type=Path, help="restricted inventory folder")
    parser.add_argument("--summary", required=True, type=Path, help="PHI-free summary.json")


# --------------------------------------------------------------------------
# The whole export


def read_cohort(path: Path, groups: list[str]) -> dict[str, str]:
    """cohort.csv as {patient_id: group}, in file order; errors name the line, not the patient."""
    path = Path(path)
    table = read_table(path, "cohort file")
    missing = {"patient_id", "group"} - set(table.columns)
    if missing:
        raise SpinedetError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
    cohort: dict[str, str] = {}
    for line, record in enumerate(table.to_dict(orient="records"), start=2):
        patient_id = record["patient_id"].strip()
        group = record["group"].strip()
        if not patient_id:
            raise SpinedetError(f"{path} line {line}: empty patient_id")
        if group not in groups:
            raise SpinedetError(f"{path} line {line}: group {group!r} is not one of the config's "
                                f"groups {groups}")
        if patient_id in cohort:
            raise SpinedetError(f"{path} line {line}: this patient_id is listed twice")
        cohort[patient_id] = group
    return cohort


def classify_files(paths: list[Path], cohort: dict[str, str]) -> list[dict]:
    """One files.csv row per path (in the given order): header checks, then duplicates, then cohort.

    The `path` column is the path as found under the raw root given on the
    command line (relative to the working directory when that root is).
    """
    rows = []
    first_path_of_instance: dict[str, str] = {}
    for path in tqdm(paths, desc="inventory", unit="file"):
        row = {column: "" for column in FILE_COLUMNS}
        try:
            row.update(read_file(path))
        except OSError as exc:
            row.update(quarantine_row("unreadable", f"cannot read the file ({exc.strerror}): check "
                                   "its permissions"))
        row["path"] = path.as_posix()
        if row["status"] == "ok" and row["kind"] in ("image", "sr", "seg"):
            uid = row["sop_instance_uid"]
            if uid in first_path_of_instance:
                row.update(status="quarantined", reason="duplicate",
                           detail=f"same SOPInstanceUID as {first_path_of_instance[uid]} (kept): "
                                  "remove the copy")
            else:
                first_path_of_instance[uid] = row["path"]
                # an SR's or SEG's regions of a patient outside the cohort are listed by
                # `spinedet annotations` (import_issues.csv), each with its reason
                if row["kind"] == "image" and row["patient_id"] not in cohort:
                    row.update(status="quarantined", reason="not_in_cohort",
                               detail="PatientID is not listed in cohort.csv: add the patient "
                                      "to the cohort or leave the file out")
        rows.append(row)
    return rows


def _describe(series: dict) -> str:
    return f"{series['orientation']} {series['description']!r} ({series['n_slices']} slices)"


def select_series(series_rows: list[dict], file_rows: list[dict], cohort: dict[str, str],
                  rules: dict) -> list[dict]:
    """One selection.csv row per cohort patient; marks the chosen series `selected` in place.
    Among the series meeting the rules, the first by `series_rank` (spinedet.ingest.dicom)."""
    rank = series_rank(rules)
    by_patient: dict[str, list[dict]] = defaultdict(list)
    for series in series_rows:
        by_patient[series["patient_id"]].append(series)
    quarantined = defaultdict(Counter)
    for row in file_rows:
        if row["status"] == "quarantined" and row["patient_id"]:
            quarantined[row["patient_id"]][row["reason"]] += 1
    rule_text = (f"{rules['orientation']}, description matching {rules['description_pattern']!r}"
                 + (f" and not {rules['exclude_pattern']!r}" if rules.get("exclude_pattern") else ""))

    selection = []
    for number, (patient_id, group) in enumerate(cohort.items(), start=1):
        candidates = by_patient.get(patient_id, [])
        record = {"row": number, "patient_id": patient_id, "group": group, "series_uid": "", "fallbacks": ""}
        targets = sorted((s for s in candidates if is_target(s, rules)), key=rank)
        if targets:
            chosen = targets[0]
            chosen["selected"] = True
            others = f"; {len(targets) - 1} other matching series not used" if len(targets) > 1 else ""
            warning = ""
            if missing_slices(chosen):
                warning = (f"; WARNING: {missing_slices(chosen)} slice(s) missing (a gap in slice positions): "
                           "re-export the complete series")
            elif is_multi_volume(chosen):
                warning = (f"; WARNING: {chosen['n_slices']} images at {chosen['positions']} positions "
                           "(a 4-D series) and no 3-D one matches the rules")
            # convert tries these, in this order, when the chosen series does not convert
            record.update(series_uid=chosen["series_uid"], status="selected",
                          reason=f"{_describe(chosen)} meets the rules ({rule_text}){others}{warning}",
                          fallbacks=";".join(s["series_uid"] for s in targets[1:]))
        elif candidates:
            found = ", ".join(_describe(s) for s in candidates)
            record.update(status="no_target_series",
                          reason=f"none of {len(candidates)} series is {rule_text}: found {found}")
        elif quarantined.get(patient_id):
            counts = ", ".join(f"{reason}: {n}" for reason, n in sorted(quarantined[patient_id].items()))
            record.update(status="no_files",
                          reason=f"all files of this patient were quarantined ({counts}); see files.csv")
        else:
            record.update(status="no_files", reason="no file of this patient in the export")
        selection.append(record)
    return selection


def summarize(file_rows: list[dict], series_rows: list[dict], selection: list[dict],
              cohort: dict[str, str]) -> dict:
    """PHI-free counts for the report (no IDs, paths, descriptions or dates)."""
    status = Counter(row["status"] for row in file_rows)
    reasons = Counter(row["reason"] for row in file_rows if row["status"] == "quarantined")
    kinds = Counter(row["kind"] for row in file_rows if row["status"] == "ok")
    selection_status = Counter(row["status"] for row in selection)
    outside = {row["patient_id"] for row in file_rows if row["reason"] == "not_in_cohort"}
    return {
        "files_in": len(file_rows),
        "ok": status["ok"],
        "ok_by_kind": dict(sorted(kinds.items())),
        "quarantined": status["quarantined"],
        "quarantined_by_reason": dict(sorted(reasons.items())),
        "series": len(series_rows),
        "series_by_orientation": dict(sorted(Counter(s["orientation"] for s in series_rows).items())),
        "cohort_patients": len(cohort),
        "patients_selected": selection_status["selected"],
        "patients_without_target": selection_status["no_target_series"],
        "patients_without_files": selection_status["no_files"],
        "patients_not_in_cohort": len(outside),
    }


def inventory(raw: Path, cohort_path: Path, config: dict) -> tuple[list, list, list, dict]:
    """Run the whole inventory in memory: (files, series, selection, summary)."""
    raw = Path(raw)
    cohort = read_cohort(cohort_path, config["groups"])
    paths, not_files = walk_export(raw)
    log.info("%d files under the raw export, %d other entries, %d cohort patients", len(paths), len(not_files),
             len(cohort))
    file_rows = classify_files(paths, cohort) + [{**{c: "" for c in FILE_COLUMNS}, **row} for row in not_files]
    file_rows.sort(key=lambda row: row["path"])
    series_rows = build_series(file_rows)
    selection = select_series(series_rows, file_rows, cohort, config["inventory"])
    summary = summarize(file_rows, series_rows, selection, cohort)
    return file_rows, series_rows, selection, summary


def run(args: argparse.Namespace) -> int:
    from spinedet.config import load

    config = load(args.config)
    file_rows, series_rows, selection, summary = inventory(args.raw, args.cohort, config)
    write_csv(args.out / "files.csv", file_rows, FILE_COLUMNS)
    write_csv(args.out / "series.csv", series_rows, SERIES_COLUMNS)
    write_csv(args.out / "selection.csv", selection, SELECTION_COLUMNS)
    write_json(args.summary, summary, indent=2)
    log.info(
        "files in %d = ok %d + quarantined %d %s; %d series; %d of %d patients have a target series",
        summary["files_in"], summary["ok"], summary["quarantined"], summary["quarantined_by_reason"],
        summary["series"], summary["patients_selected"], summary["cohort_patients"],
    )
    check_something_to_convert(summary)
    return 0


def check_something_to_convert(summary: dict) -> None:
    """Stop here, saying why, when no cohort patient has a target series: every
    later stage would have nothing to work on. The tables are written first;
    the message holds counts only (no ID or description: logs/ is not restricted/)."""
    if summary["patients_selected"]:
        return
    if summary["files_in"] == 0:
        why = "the raw export (config `raw`) holds no file"
    elif summary["ok"] == 0:
        why = f"all {summary['files_in']} files were quarantined ({summary['quarantined_by_reason']})"
    else:
        why = (f"{summary['patients_without_target']} have series but none meets the inventory rules "
               f"(series by orientation: {summary['series_by_orientation']}), "
               f"{summary['patients_without_files']} have no usable file")
    raise SpinedetError(
        f"0 of {summary['cohort_patients']} cohort patients have a target series: {why}. "
        "Nothing to convert. Each patient's reason is in restricted/inventory/selection.csv "
        "(under snakemake, add --keep-incomplete to keep the tables of a failed job)")
