"""Shared fixtures.

`smoke_export`: a small synthetic hospital export (6 patients, matrix 128),
written once per test session. Its root holds DICOM/, annotations.csv,
cohort.csv, truth/ (read with `spinedet.demo.truth.load_truth`) and
preview.png. Treat it as read-only: copy it before changing anything.
"""

from __future__ import annotations

from pathlib import Path

import pytest

SMOKE_PATIENTS = 6
SMOKE_MATRIX = 128
SMOKE_SEED = 3


@pytest.fixture(scope="session")
def smoke_export(tmp_path_factory) -> Path:
    from spinedet.demo.synthesize import synthesize

    root = tmp_path_factory.mktemp("smoke_export")
    synthesize(root, patients=SMOKE_PATIENTS, matrix=SMOKE_MATRIX, seed=SMOKE_SEED, preview=root / "preview.png")
    return root


@pytest.fixture
def tiny_arch(monkeypatch):
    """The tiny test detector (tests/tiny_detector.py) registered as architecture `tiny_test`."""
    from spinedet.detect import models
    from tiny_detector import tiny_detector

    monkeypatch.setitem(models.ARCHITECTURES, "tiny_test", tiny_detector)


@pytest.fixture
def test_split(tmp_path: Path) -> tuple[Path, Path, dict]:
    """(test.json, slice root, COCO) of six 64x64 slices of three patients."""
    from tiny_detector import write_test_split

    return write_test_split(tmp_path)
