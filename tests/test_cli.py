"""The `spinedet` command itself: every stage is listed, and library chatter
about bad header values (which quotes the value) never reaches a rule's log."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from spinedet import cli

REPO_CONFIG = str(Path(__file__).resolve().parents[1] / "config.yaml")


def test_help_lists_every_stage(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert all(stage in out for stage in cli.STAGES)


def test_invalid_header_values_are_not_echoed_to_the_log(tmp_path):
    secret_uid = "1.2.3.HOSPXSECRET.19700101"
    dataset = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    dataset.StudyInstanceUID = secret_uid  # letters: an invalid UI value pydicom warns about
    (tmp_path / "raw").mkdir()
    dataset.save_as(tmp_path / "raw" / "image", enforce_file_format=True)
    (tmp_path / "cohort.csv").write_text(f"patient_id,group\n{dataset.PatientID},disc\n")
    # A separate process, as a rule runs it: pytest's own warning capture
    # would hide the leak.
    run = subprocess.run(
        [sys.executable, "-m", "spinedet.cli", "inventory", "--config", REPO_CONFIG,
         '{"inventory": {"orientation": "axial", "description_pattern": ""}}',  # MR_small: a target
         "--raw", str(tmp_path / "raw"),
         "--cohort", str(tmp_path / "cohort.csv"), "--out", str(tmp_path / "inventory"),
         "--summary", str(tmp_path / "summary.json")],
        capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert secret_uid in (tmp_path / "inventory" / "files.csv").read_text()
    assert secret_uid not in run.stdout + run.stderr


def test_version_and_verbose_before_or_after_the_verb(capsys):
    from spinedet import __version__

    with pytest.raises(SystemExit) as exited:
        cli.main(["--version"])
    assert exited.value.code == 0 and capsys.readouterr().out.strip() == f"spinedet {__version__}"
    parser = cli.build_parser()  # the verb's own arguments are added when it runs
    assert parser.parse_args(["-v", "split"]).verbose is True
    assert parser.parse_args(["split", "-v"]).verbose is True
    assert parser.parse_args(["split", "--verbose"]).verbose is True
    assert parser.parse_args(["split"]).verbose is False


def test_writing_and_reading_sr_and_seg_logs_no_uid(tmp_path):
    """highdicom logs the UIDs of the datasets it copies from: the CLI keeps them out of
    the rule's log (results/logs/ is outside restricted/)."""
    export = tmp_path / "export"
    run = subprocess.run([sys.executable, "-m", "spinedet.cli", "synthesize", "--out", str(export), "--patients", "3",
                          "--matrix", "64", "--seed", "8", "--annotation-format", "mixed"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    uids = {str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
            for path in (export / "DICOM").rglob("*") if path.is_file()}
    assert len(uids) > 50
    assert not [uid for uid in uids if uid in run.stdout + run.stderr]
