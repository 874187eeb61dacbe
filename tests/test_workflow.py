"""The whole smoke study through snakemake, as a user runs it: the report
holds both models' rows, nothing under results/ or logs/ carries PHI, the
browser shows the comparison, and a rerun changes nothing."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from browser import CHROMIUM, chromium, parse
from phi import collect_phi, scan_tree

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


def test_report_has_a_row_per_model(smoke_study):
    with (smoke_study / "results" / "report" / "summary.csv").open() as fh:
        assert [row["model"] for row in csv.DictReader(fh)] == MODELS
    assert (smoke_study / "results" / "report" / "report.md").stat().st_size > 0


def test_no_phi_outside_restricted(smoke_study):
    phi = collect_phi(smoke_study / "export" / "DICOM")
    assert len(phi) > 50
    leaks = [str(hit) for root in ("results", "logs", "benchmarks") for hit in scan_tree(smoke_study / root, phi)]
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
