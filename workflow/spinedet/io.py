"""Reading and writing the pipeline's tables and JSON files.

Every write is atomic: the content goes to a temporary file beside the
target, which is then renamed over it. A reader, or a rerun after an
interrupted job, sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from spinedet import SpinedetError


def write_atomically(path: str | Path, write: Callable[[Path], None]) -> None:
    """Let `write` fill a temporary file, then rename it over `path`
    (e.g. `write_atomically(path, lambda tmp: torch.save(obj, tmp))`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def write_bytes(path: str | Path, data: bytes) -> None:
    write_atomically(path, lambda tmp: tmp.write_bytes(data))


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, data, *, indent: int = 1, sort_keys: bool = False) -> None:
    write_text(path, json.dumps(data, indent=indent, sort_keys=sort_keys) + "\n")


def read_json(path: str | Path):
    path = Path(path)
    if not path.is_file():
        raise SpinedetError(f"file not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SpinedetError(f"{path} is not valid JSON ({exc})") from None


def write_csv(path: str | Path, rows: list[dict], columns: list[str], *, none_as: str | None = None) -> None:
    """One row per dict, in `columns` order; other keys are left out.
    `none_as` writes that text for None values (csv writes "" by default)."""
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        if none_as is not None:
            row = {key: none_as if value is None else value for key, value in row.items()}
        writer.writerow(row)
    write_text(path, buffer.getvalue())


def read_csv(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise SpinedetError(f"file not found: {path}")
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def copy_file(source: str | Path, target: str | Path) -> None:
    write_atomically(target, lambda tmp: shutil.copyfile(source, tmp))
