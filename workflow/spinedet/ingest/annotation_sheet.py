"""The annotation sheet: boxes in DICOM pixel coordinates, one row each.

Two files have this form: the user's `annotations.csv` (the `annotations:`
config key) and the one table `spinedet annotations` writes from every source
(restricted/annotations/annotations.csv, which deidentify reads). Coordinates
are pixel edges of the instance's grid (docs/data-contracts.md).
"""

from __future__ import annotations

from pathlib import Path

from spinedet import SpinedetError
from spinedet.io import read_table

COORDINATES = ("x_min", "y_min", "x_max", "y_max")
# The table `spinedet annotations` writes: the sheet's columns, then where each row came from.
TABLE_COLUMNS = ["study_uid", "series_uid", "sop_instance_uid", "instance_number", "frame_number", "label",
                 *COORDINATES, "source", "source_ref"]


def read_annotations(path: Path) -> list[tuple[int, dict]]:
    """(line number in the file, row) for every annotation; the header is line 1.
    Cells are strings as written ("" when empty)."""
    path = Path(path)
    table = read_table(path, "annotations file")
    columns = set(table.columns)
    needed = {"series_uid", "label", *COORDINATES}
    missing = needed - columns
    if missing or not columns & {"sop_instance_uid", "instance_number"}:
        what = ", ".join(sorted(missing)) or "sop_instance_uid or instance_number"
        raise SpinedetError(f"{path}: missing column(s) {what}")
    return list(enumerate(table.to_dict(orient="records"), start=2))
