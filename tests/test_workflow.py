"""The whole smoke study through snakemake, as a user runs it: the report
holds both models' rows, nothing under results/ or logs/ carries PHI, the
browser shows the comparison, and a rerun changes nothing."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from browser import CHROMIUM, chromium, parse
from phi import collect_phi, scan_tree

from spinedet.io import read_csv

# Each test here runs or reruns the whole smoke study: make test-slow (and CI) runs them.
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
MODELS = ["resnet50", "vgg16"]


def snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(
        [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
         "--cores", "2", "--configfile", str(REPO / "config.yaml"), str(REPO / "config" / "smoke.yaml"),
         str(workdir / "paths.yaml"), *args],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=1500)


@pytest.fixture(scope="module")
def smoke_study(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("smoke_study")
    paths = {
        "results": str(workdir / "results"),
        "restricted": str(workdir / "restricted"),
        "demo": {"out": str(workdir / "export")},
        "raw": str(workdir / "export" / "DICOM"),
        "annotations": str(workdir / "export" / "annotations.csv"),
        "cohort": str(workdir / "export" / "cohort.csv"),
    }
    (workdir / "paths.yaml").write_text(yaml.safe_dump(paths))
    run = snakemake(workdir)
    assert run.returncode == 0, run.stderr[-5000:]
    return workdir


def copy_or_link_weights(source: str, target: str) -> None:
    """Weights (*.pt, written by rename and only ever replaced) are hard links: a copy of the
    study costs about 40 MB of disk, not 1.2 GB."""
    if source.endswith(".pt"):
        os.link(source, target)
    else:
        shutil.copy2(source, target)


def copy_study(smoke_study: Path, workdir: Path, overrides: dict) -> Path:
    """A copy of the smoke study at `workdir`, its paths moved there and `overrides` added to its config."""
    shutil.copytree(smoke_study, workdir, symlinks=True, copy_function=copy_or_link_weights)
    paths = yaml.safe_load((workdir / "paths.yaml").read_text())
    paths = {key: value.replace(str(smoke_study), str(workdir)) if isinstance(value, str) else value
             for key, value in paths.items()}
    paths["demo"] = {"out": str(workdir / "export")}
    (workdir / "paths.yaml").write_text(yaml.safe_dump({**paths, **overrides}))
    return workdir

def test_report_has_a_row_per_model(smoke_study):
    with (smoke_study / "results" / "report" / "summary.csv").open() as fh:
        assert [row["model"] for row in csv.DictReader(fh)] == MODELS
    assert (smoke_study / "results" / "report" / "report.md").stat().st_size > 0


def test_the_study_compares_the_models_on_the_same_patients(smoke_study):
    comparison = json.loads((smoke_study / "results" / "report" / "comparison.json").read_text())
    [pair] = comparison["pairs"]
    assert (pair["a"], pair["b"], pair["metric"]) == ("resnet50", "vgg16", "ap50")
    assert pair["n_patients"] == json.loads((smoke_study / "results" / "eval" / "resnet50" / "metrics.json")
                                            .read_text())["n_patients"]
    assert "resnet50 minus vgg16: ΔAP50" in (smoke_study / "results" / "report" / "report.md").read_text()


def test_no_phi_outside_restricted(smoke_study):
    phi = collect_phi(smoke_study / "export" / "DICOM")
    assert len(phi) > 50
    leaks = [str(hit) for hit in scan_tree(smoke_study / "results", phi)]  # logs/ included
    assert leaks == []
    # The same scan finds identity where it is allowed to be: it works.
    assert scan_tree(smoke_study / "restricted", phi)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (CI installs it)")
def test_browser_shows_both_models(smoke_study, tmp_path):
    html = (smoke_study / "results" / "report" / "report.html").resolve()
    page = parse(chromium("--dump-dom", html.as_uri(), user_data=tmp_path / "profile").stdout)
    first_cells = [row[0] for row in page.table_rows["comparison"] if row]
    assert all(model in first_cells for model in MODELS)


def test_rerun_has_nothing_to_do(smoke_study):
    run = snakemake(smoke_study, "--dry-run")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Nothing to be done" in run.stdout + run.stderr


def jobs_to_run(run: subprocess.CompletedProcess) -> dict[str, int]:
    """rule -> job count from a dry run's "Job stats" table."""
    lines = (run.stdout + run.stderr).splitlines()
    start = next(i for i, line in enumerate(lines) if line.split() == ["job", "count"])
    counts = {}
    for line in lines[start + 2:]:
        words = line.split()
        if len(words) != 2 or words[0] in ("total", "all"):
            break
        counts[words[0]] = int(words[1])
    return counts


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ({"evaluate": {"bootstrap": 51}}, {"evaluate": 2, "compare": 1, "report": 1}),
        ({"compare": {"permutations": 99}}, {"compare": 1, "report": 1}),
        ({"speed": {"slices": 7}}, {"speed": 1, "report": 1}),
        ({"models": {"resnet50": {"lr": 0.004}}}, {"train": 1, "evaluate": 1, "speed": 1, "compare": 1, "report": 1}),
        ({"slices": {"half_width": 2}},
         {"slices": 1, "split": 1, "train": 2, "evaluate": 2, "speed": 1, "compare": 1, "report": 1}),
        ({"split": {"fractions": {"train": 0.6, "val": 0.2, "test": 0.2}}},
         {"split": 1, "train": 2, "evaluate": 2, "speed": 1, "compare": 1, "report": 1}),
        ({"seed": 5}, {"split": 1, "train": 2, "evaluate": 2, "speed": 1, "compare": 1, "report": 1}),
        ({"resources": {"evaluate": {"mem_mb": 9000}}}, {}),
    ],
)
def test_a_config_change_reruns_exactly_the_rules_that_read_it(smoke_study, tmp_path, override, expected):
    """Snakemake 9's params trigger on each rule's inline config (no hand-kept list)."""
    extra = tmp_path / "override.yaml"
    extra.write_text(yaml.safe_dump(override))
    run = snakemake(smoke_study, "--dry-run", "--configfile", str(REPO / "config.yaml"),
                    str(REPO / "config" / "smoke.yaml"), str(smoke_study / "paths.yaml"), str(extra))
    assert run.returncode == 0, run.stderr[-3000:]
    if not expected:
        assert "Nothing to be done" in run.stdout + run.stderr
    else:
        assert jobs_to_run(run) == expected


def test_every_fault_of_the_corpus_ends_where_it_should(smoke_study):
    """The smoke export carries the fault corpus (config/smoke.yaml demo.faults):
    each case is quarantined with its reason, or processed where it can be."""
    faults = read_csv(smoke_study / "export" / "faults.csv")
    assert {f["kind"] for f in faults} == {"file", "patient", "annotation", "object"} and len(faults) >= 30
    raw = smoke_study / "export" / "DICOM"
    restricted = smoke_study / "restricted"
    files = {row["path"]: row for row in read_csv(restricted / "inventory" / "files.csv")}
    selection = {row["patient_id"]: row for row in read_csv(restricted / "inventory" / "selection.csv")}
    conversions = {row["patient_id"]: row for row in read_csv(restricted / "convert" / "conversions.csv")}
    issues = {row["row"]: row for row in read_csv(smoke_study / "results" / "deid" / "annotation_issues.csv")}
    import_issues = read_csv(restricted / "annotations" / "import_issues.csv")
    wrong = []
    for fault in faults:
        expected = (fault["expect_status"], fault["expect_reason"])
        if fault["kind"] == "file":
            row = files.get((raw / fault["where"]).as_posix(), {})
            found = (row.get("status"), row.get("reason"))
        elif fault["kind"] == "annotation":
            found = ("issue", issues.get(fault["where"], {}).get("reason"))
        elif fault["kind"] == "object":  # ok in files.csv, every region or segment listed with the reason
            row = files.get((raw / fault["where"]).as_posix(), {})
            reasons = {issue["reason"] for issue in import_issues
                       if row.get("sop_instance_uid") and issue["source_ref"].startswith(row["sop_instance_uid"])}
            found = ("issue", reasons.pop() if row.get("status") == "ok" and len(reasons) == 1 else reasons)
        else:
            row = selection.get(fault["where"], {})
            found = (row.get("status"), fault["expect_reason"] if fault["expect_reason"] in row.get("reason", "")
                     else row.get("reason"))
            if fault["expect_conversion"]:
                expected += (fault["expect_conversion"],)
                found += (conversions.get(fault["where"], {}).get("status"),)
        if found != expected:
            wrong.append(f"{fault['fault']}: expected {expected}, found {found}")
    assert wrong == []
    summary = json.loads((smoke_study / "results" / "inventory" / "summary.json").read_text())
    assert summary["files_in"] == summary["ok"] + summary["quarantined"] == len(files)


def test_every_file_under_results_is_a_declared_output(smoke_study):
    """Snakemake sees the whole data flow: each file is an output of a rule or
    lies in a directory() output, or is a rule's declared log or benchmark
    (results/logs/, results/benchmarks/: what a forced dry run names). The one
    exception is training's resume state (models/*/state/), which Snakemake must
    not delete when a preempted job reruns."""
    run = snakemake(smoke_study, "--summary")
    assert run.returncode == 0, run.stderr[-3000:]
    declared = [Path(line.split("\t")[0]) for line in run.stdout.splitlines()[1:] if line.strip()]
    every_job = snakemake(smoke_study, "--dry-run", "--forceall")
    assert every_job.returncode == 0, every_job.stderr[-3000:]
    declared += [Path(line.split(":", 1)[1].strip()) for line in (every_job.stdout + every_job.stderr).splitlines()
                 if line.strip().startswith(("log:", "benchmark:"))]
    assert any(path.parent.name == "logs" for path in declared)
    declared = {path if path.is_absolute() else smoke_study / path for path in declared}
    undeclared = []
    for path in sorted((smoke_study / "results").rglob("*")):
        if path.is_dir() or "state" in path.relative_to(smoke_study / "results").parts[2:3]:
            continue
        if not any(path == out or out in path.parents for out in declared):
            undeclared.append(str(path.relative_to(smoke_study)))
    assert undeclared == []
    assert any(p.name == "slices" for p in declared) and any(p.name == "figures" for p in declared)


def test_a_study_killed_in_training_completes_on_rerun_resuming_its_checkpoint(smoke_study, tmp_path):
    """kill -9 of the training process mid-run, as an OOM killer or a node failure
    would: the same command again finishes the study, and training resumes from
    its last epoch's checkpoint instead of starting over."""
    # long enough to be killed between two epochs
    workdir = copy_study(smoke_study, tmp_path / "study", {"models": {"resnet50": {"epochs": 12}}})
    for done in ("models/resnet50", "eval/resnet50", "report"):  # train it again, from scratch
        shutil.rmtree(workdir / "results" / done)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
               "--cores", "2", "--configfile", str(REPO / "config.yaml"), str(REPO / "config" / "smoke.yaml"),
               str(workdir / "paths.yaml")]
    study = subprocess.Popen(command, cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    train_log = workdir / "results" / "models" / "resnet50" / "state" / "train_log.csv"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and study.poll() is None:
        if train_log.is_file() and len(train_log.read_text().splitlines()) >= 3:  # header + 2 epochs
            break
        time.sleep(0.2)
    trainer = subprocess.run(["pgrep", "-f", f"spinedet train .*{workdir}"], capture_output=True, text=True)
    assert study.poll() is None and trainer.stdout.split(), "training finished before it could be killed"
    for pid in trainer.stdout.split():
        os.kill(int(pid), signal.SIGKILL)
    assert study.wait(timeout=120) != 0
    assert not (workdir / "results" / "models" / "resnet50" / "best.pt").exists()  # no partial output

    rerun = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=1200)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    log = (workdir / "results" / "logs" / "train" / "resnet50.log").read_text()
    resumed = re.search(r"resuming from \S+: epoch (\d+) of 12", log)
    assert resumed and int(resumed.group(1)) >= 3, log[-2000:]
    rows = read_csv(workdir / "results" / "models" / "resnet50" / "train_log.csv")
    assert [int(row["epoch"]) for row in rows] == list(range(1, 13))


def test_cross_validation_with_two_folds_end_to_end(smoke_study, tmp_path):
    """split.folds: 2 on the smoke study: every model trained and tested once per
    fold, the CV summary and the fold ensemble, and the report's CV table."""
    workdir = copy_study(smoke_study, tmp_path / "study", {"split": {"folds": 2}})
    run = snakemake(workdir)
    assert run.returncode == 0, run.stderr[-5000:]
    results = workdir / "results"
    for model in MODELS:
        for fold in (0, 1):
            assert (results / "models" / model / f"fold{fold}" / "best.pt").is_file()
            fold_metrics = json.loads((results / "eval" / model / f"fold{fold}" / "metrics.json").read_text())
            assert fold_metrics["n_patients"] == json.loads((results / "eval" / model / "metrics.json")
                                                            .read_text())["n_patients"]  # the same test split
    summary = list(csv.DictReader((results / "report" / "cv_summary.csv").open()))
    assert [row["model"] for row in summary] == MODELS
    assert all(row["folds"] == "2" and row["ap50_mean"] != "" for row in summary)
    assert json.loads((results / "report" / "cv_ensemble.json").read_text())["models"].keys() == set(MODELS)
    assert 'id="cv"' in (results / "report" / "report.html").read_text()


@pytest.fixture(scope="module")
def format_studies(smoke_study, tmp_path_factory) -> dict[str, Path]:
    """The smoke study (demo.annotation_format: mixed, run to the report) run again to the
    split with the boxes handed over in one form each: the sheet, TID 1500 SRs, SEGs.
    Everything after the split is the same whatever form the boxes came in."""
    studies = {}
    for form in ("csv", "sr", "seg"):
        workdir = tmp_path_factory.mktemp(f"format_{form}") / "study"
        copy_study(smoke_study, workdir, {"demo": {"out": str(workdir / "export"), "annotation_format": form}})
        # Snakemake keeps its records by absolute path: the copy's changed param goes unseen, so
        # synthesize is forced (then everything after it); "--" ends the --configfile list.
        run = snakemake(workdir, "--forcerun", "synthesize", "--",
                        *(str(workdir / "results" / "split" / f"{split}.json") for split in ("train", "val", "test")))
        assert run.returncode == 0, run.stderr[-5000:]
        studies[form] = workdir
    return studies


def test_each_annotation_form_reaches_the_split(smoke_study, format_studies):
    fault_lines = sum(1 for f in read_csv(smoke_study / "export" / "faults.csv") if f["kind"] == "annotation")
    assert (smoke_study / "results" / "report" / "report.html").is_file()  # the mixed study, to the report
    for form, workdir in {"mixed": smoke_study, **format_studies}.items():
        assert (workdir / "results" / "split" / "train.json").is_file(), form
        boxes = json.loads((workdir / "results" / "annotations" / "summary.json").read_text())["boxes_by_source"]
        if form == "mixed":
            assert all(count > 0 for count in boxes.values()), boxes
        else:
            others = {source: count for source, count in boxes.items() if source != form}
            # the fault corpus' bad sheet lines are in the sheet whatever the form
            assert boxes[form] > fault_lines and others == {s: (fault_lines if s == "csv" else 0) for s in others}, boxes


def split_boxes(results: Path) -> dict[tuple, list[list[float]]]:
    found: dict[tuple, list[list[float]]] = {}
    for split in ("train", "val", "test"):
        coco = json.loads((results / "split" / f"{split}.json").read_text())
        names = {image["id"]: image["file_name"] for image in coco["images"]}
        for ann in coco["annotations"]:
            found.setdefault((split, names[ann["image_id"]], ann["category_id"]), []).append(ann["bbox"])
    return {key: sorted(boxes) for key, boxes in found.items()}


def test_boxes_from_measurement_reports_equal_those_from_the_sheet(format_studies):
    """The same phantom boxes, once as annotations.csv and once as OHIF-style SR rectangles:
    the training, validation and test COCO boxes agree to 0.5 px."""
    from_sheet = split_boxes(format_studies["csv"] / "results")
    from_reports = split_boxes(format_studies["sr"] / "results")
    assert from_sheet.keys() == from_reports.keys() and from_sheet
    for key, boxes in from_sheet.items():
        assert len(boxes) == len(from_reports[key]), key
        for a, b in zip(boxes, from_reports[key]):
            assert np.allclose(a, b, atol=0.5), (key, a, b)


def test_boxes_drawn_on_exported_slices_come_back_as_the_sheets(smoke_study, tmp_path):
    """The round trip through an annotation tool: the smoke study with its boxes as the sheet
    (demo.annotation_format: csv) exported for annotation (rule annotation_export), then its
    COCO and a copy of its manifest read back with no sheet (annotations: null,
    annotation_import.coco): the training, validation and test COCO boxes agree to 0.5 px."""
    workdir = tmp_path / "study"
    copy_study(smoke_study, workdir, {"demo": {"out": str(workdir / "export"), "annotation_format": "csv"}})
    results, restricted = workdir / "results", workdir / "restricted"
    split = [str(results / "split" / f"{part}.json") for part in ("train", "val", "test")]
    # Snakemake keeps its records by absolute path, so the copy's changed params go unseen: synthesize
    # is forced (the csv form of the export, then everything after it). "--" ends the list options.
    run = snakemake(workdir, "--forcerun", "synthesize", "--", *split, str(results / "annotation_export" / "coco.json"))
    assert run.returncode == 0, run.stderr[-5000:]
    sources = json.loads((results / "annotations" / "summary.json").read_text())["boxes_by_source"]
    assert sources["csv"] > 0 and sources["sr"] == sources["seg"] == 0, sources
    from_sheet = split_boxes(results)
    exported = json.loads((results / "annotation_export" / "coco.json").read_text())
    labels = restricted / "labels"  # where a user puts the tool's COCO and the manifest's copy
    labels.mkdir()
    shutil.copy(results / "annotation_export" / "coco.json", labels / "coco.json")
    shutil.copy(restricted / "annotation_export" / "manifest.csv", labels / "manifest.csv")
    paths = yaml.safe_load((workdir / "paths.yaml").read_text())
    paths["annotations"] = None
    paths["annotation_import"] = {"coco": str(labels / "coco.json"), "coco_manifest": str(labels / "manifest.csv")}
    (workdir / "paths.yaml").write_text(yaml.safe_dump(paths))

    run = snakemake(workdir, "--", *split)
    assert run.returncode == 0, run.stderr[-5000:]
    summary = json.loads((results / "annotations" / "summary.json").read_text())
    assert summary["boxes_by_source"]["csv"] == 0 and summary["unusable_by_source"]["coco"] == 0
    assert summary["boxes_by_source"]["coco"] == len(exported["annotations"]) > 0
    from_coco = split_boxes(results)
    assert from_sheet.keys() == from_coco.keys() and from_sheet
    for key, boxes in from_sheet.items():
        assert len(boxes) == len(from_coco[key]), key
        for a, b in zip(boxes, from_coco[key]):
            assert np.allclose(a, b, atol=0.5), (key, a, b)
