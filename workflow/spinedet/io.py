"""Reading and writing the pipeline's tables and JSON files.

Every write is atomic: the content goes to a temporary file beside the
target, which is then renamed over it. A reader, or a rerun after an
interrupted job, sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pandas as pd

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
    None (and a missing key) is written as `none_as`, "" by default."""
    # object dtype: each value is written as str() gives it (1 stays 1, not 1.0)
    table = pd.DataFrame([[row.get(column) for column in columns] for row in rows], columns=columns, dtype=object)
    write_text(path, table.to_csv(index=False, lineterminator="\n", na_rep=none_as or ""))


def read_table(path: str | Path, what: str = "file") -> pd.DataFrame:
    """A CSV as a table of strings: "" for an empty or missing cell, a leading
    byte-order mark (Excel's "CSV UTF-8") ignored. Row i is line i + 2 of the
    file when no cell spans lines and no line is blank."""
    path = Path(path)
    if not path.is_file():
        raise SpinedetError(f"{what} not found: {path}")
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig").fillna("")
    except pd.errors.EmptyDataError:
        return pd.DataFrame()
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise SpinedetError(f"{path} is not a readable CSV file ({exc})") from None


def read_csv(path: str | Path) -> list[dict]:
    """Every row as a dict of strings, in file order (see read_table)."""
    return read_table(path).to_dict(orient="records")


def copy_file(source: str | Path, target: str | Path) -> None:
    write_atomically(target, lambda tmp: shutil.copyfile(source, tmp))
