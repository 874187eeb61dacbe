"""The package's shape: a small core under wings that follow the DAG (ingest,
dataset, detect, study; demo beside them), imports that run one way, stage
modules (one per `spinedet` verb) that never import each other, and every
write of the core atomic."""

import ast
import json
from pathlib import Path

import pytest

from spinedet import SpinedetError, io
from spinedet.cli import STAGES, stage_module

PACKAGE = Path(__file__).resolve().parents[1] / "workflow" / "spinedet"
CORE = {"__init__", "cli", "config", "config_check", "io", "geometry"}
# A wing may import the core, its own modules and the wings below it, never one above.
WING_ORDER = ["ingest", "dataset", "detect", "study"]
WINGS = {*WING_ORDER, "demo"}
STAGE_MODULES = {stage_module(stage) for stage in STAGES}


def spinedet_imports(module: Path) -> set[str]:
    """The spinedet modules a source file imports, at any depth of its code
    (`from spinedet.study import metrics` counts as spinedet.study.metrics)."""
    found = set()
    for node in ast.walk(ast.parse(module.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("spinedet"):
            if node.module == "spinedet" or node.module.removeprefix("spinedet.") in WINGS:
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
            else:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("spinedet."))
    return found


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def wing_of(name: str) -> str | None:
    """The wing of a dotted module name, None for the core."""
    parts = name.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in WINGS else None


ALL_MODULES = sorted(PACKAGE.rglob("*.py"))


def test_the_top_level_is_the_small_core_and_the_wings():
    top_modules = {path.stem for path in PACKAGE.glob("*.py")}
    assert top_modules == CORE and len(top_modules) <= 6
    packages = {path.parent.name for path in PACKAGE.glob("*/__init__.py")}
    assert packages == WINGS
    for wing in WINGS:
        assert (PACKAGE / wing / "__init__.py").read_text().startswith('"""'), f"{wing}/__init__.py says what the wing holds"


def test_every_verb_lives_in_its_wing():
    assert {stage_module(stage).split(".")[1] for stage in STAGES} == WINGS
    for stage in STAGES:
        source = PACKAGE.parent / (stage_module(stage).replace(".", "/") + ".py")
        assert source.read_text().startswith(f'"""`spinedet {stage}`'), f"{source} opens with its verb"


@pytest.mark.parametrize("path", ALL_MODULES, ids=lambda path: module_name(path))
def test_imports_run_one_way(path):
    """core <- ingest <- dataset <- detect <- study; demo uses the core only, and nothing uses demo."""
    own = wing_of(module_name(path) + ".x") if path.name == "__init__.py" else wing_of(module_name(path))
    for imported in spinedet_imports(path):
        target = wing_of(imported)
        if target is None or target == own:
            continue
        where = f"{module_name(path)} imports {imported}"
        assert own is not None, f"the core never imports a wing: {where}"
        assert "demo" not in (own, target), f"demo stands beside the pipeline: {where}"
        assert WING_ORDER.index(target) < WING_ORDER.index(own), f"a wing never imports a wing above it: {where}"


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_a_stage_imports_the_core_never_another_stage(stage):
    path = PACKAGE.parent / (stage_module(stage).replace(".", "/") + ".py")
    others = spinedet_imports(path) & (STAGE_MODULES - {stage_module(stage)})
    assert not others, f"{stage} imports the stage(s) {others}"


def test_the_import_check_sees_a_wrong_way_import(tmp_path):
    wrong = tmp_path / "wrong.py"
    wrong.write_text("from spinedet.study import metrics\nfrom spinedet.detect.engine import forward\n")
    assert spinedet_imports(wrong) == {"spinedet.study.metrics", "spinedet.detect.engine"}
    assert wing_of("spinedet.study.metrics") == "study" and wing_of("spinedet.io") is None


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
