"""`spinedet convert`: each selected series to one NIfTI volume with the real dcm2niix.

The files of a series are linked into a private folder under numbered names
(so no raw file name, which may carry identity, reaches dcm2niix's output)
and converted with `-z y -b y -ba y -f series`: the output name never holds
dcm2niix's identity placeholders. dcm2niix's own output is printed (the
rule sends it to the log). A series whose conversion fails, gives no volume
or more than one volume is quarantined in conversions.csv with dcm2niix's
message; the other series go on.

Everything here stays under restricted/: the volumes' sidecars still carry
identity until `spinedet deidentify` scrubs them.
"""

from __future__ import annotations

import argparse
import logging
import re
import shutil
import sys
from pathlib import Path

from tqdm import tqdm

from spinedet import SpinedetError
from spinedet.ingest.dicom_to_nifti import find_dcm2niix, run_dcm2niix
from spinedet.io import read_csv, write_csv

log = logging.getLogger(__name__)

CONVERSION_COLUMNS = ["row", "patient_id", "series_uid", "status", "nifti", "sidecar", "message"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from spinedet.config import add_config_argument

    add_config_argument(parser)
    parser.add_argument("--series", required=True, type=Path, help="restricted inventory series.csv")
    parser.add_argument("--selection", required=True, type=Path, help="restricted inventory selection.csv")
    parser.add_argument("--out", required=True, type=Path, help="restricted conversion folder")


def convert_all(series_rows: list[dict], selection: list[dict], out: Path) -> list[dict]:
    """Convert every selected series into `out/NNNN/` (NNNN = selection row); conversions rows."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    binary = find_dcm2niix()
    series_by_uid = {row["series_uid"]: row for row in series_rows}
    chosen = [row for row in selection if row["status"] == "selected"]
    folders = {f"{int(row['row']):04d}" for row in chosen}
    for stale in out.iterdir():
        if stale.is_dir() and re.fullmatch(r"\d{4,}", stale.name) and stale.name not in folders:
            shutil.rmtree(stale)

    conversions = []
    for row in tqdm(chosen, desc="convert", unit="series"):
        folder = out / f"{int(row['row']):04d}"
        candidates = [row["series_uid"], *(uid for uid in (row.get("fallbacks") or "").split(";") if uid)]
        failures = []
        for number, series_uid in enumerate(candidates):
            record = {"row": row["row"], "patient_id": row["patient_id"], "series_uid": series_uid,
                      **convert_series(series_by_uid.get(series_uid), folder, out, binary, row["row"])}
            if record["status"] == "converted":
                break
            failures.append(record["message"] if len(candidates) == 1 else
                            f"{'selected' if number == 0 else f'fallback {number}'} series: {record['message']}")
        if failures:
            if record["status"] == "converted":
                record["message"] = (f"converted fallback {len(failures)} of the inventory's ranking after "
                                     + "; ".join(failures))
                log.warning("selection row %s: %s", row["row"], record["message"])
            else:
                record["message"] = "; ".join(failures)
                log.warning("selection row %s quarantined: %s", row["row"], record["message"])
        conversions.append(record)
    return conversions


def convert_series(series: dict | None, folder: Path, out: Path, binary: str, selection_row) -> dict:
    """dcm2niix on one series.csv row: status, nifti, sidecar and message."""
    if series is None or not series["files"]:
        return {"status": "quarantined", "nifti": "", "sidecar": "",
                "message": "the selected series is not in series.csv: rerun the inventory"}
    try:
        result = run_dcm2niix([Path(f) for f in series["files"].split(";")], folder, work_dir=out, binary=binary,
                              pixels_per_image=int(series["rows"]) * int(series["columns"]),
                              images=int(series["n_slices"]))
    except OSError as exc:
        result = {"status": "quarantined", "nifti": "", "sidecar": "", "output": "",
                  "message": f"conversion failed: {exc.strerror or type(exc).__name__}"}
    print(f"--- selection row {selection_row}: dcm2niix ---\n{result['output'].rstrip()}", flush=True)
    missing = int(series.get("missing_slices") or 0)
    if result["status"] != "converted" and missing:
        result["message"] = (f"{missing} slice(s) missing from the series (a gap in slice positions, see "
                             f"series.csv): re-export the complete series. dcm2niix: {result['message']}")
    return {key: result[key] for key in ("status", "nifti", "sidecar", "message")}


def run(args: argparse.Namespace) -> int:
    from spinedet.config import load

    load(args.config)  # validates; conversion itself has no settings
    conversions = convert_all(read_csv(args.series), read_csv(args.selection), args.out)
    write_csv(args.out / "conversions.csv", conversions, CONVERSION_COLUMNS)
    converted = sum(1 for c in conversions if c["status"] == "converted")
    log.info("%d of %d selected series converted, %d quarantined", converted, len(conversions),
             len(conversions) - converted)
    sys.stdout.flush()
    if conversions and not converted:
        raise SpinedetError(
            f"0 of {len(conversions)} selected series converted: nothing to "
            "de-identify. Each series' dcm2niix message is in restricted/convert/conversions.csv "
            "(under snakemake, add --keep-incomplete to keep the tables of a failed job)")
    return 0
