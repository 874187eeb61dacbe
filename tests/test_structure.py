"""The package's shape: stage modules (one per `spinedet` verb) import the
shared core, never each other, and every write of the core is atomic."""

import ast
import json
from pathlib import Path

import pytest

from spinedet import SpinedetError, io
from spinedet.cli import STAGES

PACKAGE = Path(__file__).resolve().parents[1] / "workflow" / "spinedet"


def spinedet_imports(module: Path) -> set[str]:
    """The spinedet modules a source file imports, at any depth of its code."""
    found = set()
    for node in ast.walk(ast.parse(module.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("spinedet"):
            if node.module == "spinedet":
                found.update(f"spinedet.{alias.name}" for alias in node.names)
            else:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("spinedet."))
    return found


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_a_stage_imports_the_core_never_another_stage(stage):
    imported = {name.split(".")[1] for name in spinedet_imports(PACKAGE / f"{stage}.py") if "." in name}
    assert not imported & (set(STAGES) - {stage}), f"{stage} imports the stage(s) {imported & set(STAGES)}"


def test_the_core_imports_no_stage():
    core = [path for path in PACKAGE.glob("*.py") if path.stem not in STAGES and path.stem != "cli"]
    assert {"io", "engine", "dicom", "dicom_to_nifti", "canonical", "quarantine", "models", "data", "metrics"} <= {
        path.stem for path in core}
    for path in core:
        imported = {name.split(".")[1] for name in spinedet_imports(path) if "." in name}
        assert not imported & set(STAGES), f"core module {path.stem} imports {imported & set(STAGES)}"


def test_writes_are_atomic_and_leave_no_temporary_file(tmp_path):
    target = tmp_path / "deep" / "table.csv"
    io.write_csv(target, [{"a": 1, "b": None, "extra": "left out"}, {"a": 2, "b": "x"}], ["a", "b"], none_as="-")
    assert target.read_text() == "a,b\n1,-\n2,x\n"
    assert io.read_csv(target) == [{"a": "1", "b": "-"}, {"a": "2", "b": "x"}]
    io.write_json(tmp_path / "data.json", {"b": 1, "a": [1, 2]}, sort_keys=True)
    assert json.loads((tmp_path / "data.json").read_text()) == {"a": [1, 2], "b": 1}
    assert io.read_json(tmp_path / "data.json") == {"a": [1, 2], "b": 1}
    assert not list(tmp_path.rglob("*.tmp"))


def test_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "summary.json"
    io.write_json(target, {"old": True})

    def refuse(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(io.os, "replace", refuse)
    with pytest.raises(OSError, match="disk full"):
        io.write_json(target, {"new": True})
    assert json.loads(target.read_text()) == {"old": True}


def test_reading_a_missing_or_broken_file_names_it(tmp_path):
    with pytest.raises(SpinedetError, match="file not found: .*gone.csv"):
        io.read_csv(tmp_path / "gone.csv")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(SpinedetError, match="broken.json is not valid JSON"):
        io.read_json(tmp_path / "broken.json")
