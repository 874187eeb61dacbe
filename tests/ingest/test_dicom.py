"""spinedet.ingest.dicom.read_file on every test file pydicom ships: none raises, each is ok or quarantined with a reason."""

import json
import math
from pathlib import Path

import pydicom.data
import pytest

from spinedet.ingest.dicom import read_file
from spinedet.geometry import PLANE_BY_AXIS, orientation_label
from spinedet.ingest.quarantine import REASONS

# Listed from disk: get_testdata_files() would also try to download the
# pydicom-data files that are not installed.
TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"
FILES = sorted(p for p in TEST_FILES.rglob("*") if p.is_file() and p.suffix != ".py")
MIN_FILES = 150  # pydicom 3.0 ships 176

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
ORIENTATIONS = {*PLANE_BY_AXIS, "oblique"}


def file_id(path: Path) -> str:
    # The path under test_files/: names alone repeat (README.txt, DICOMDIR).
    return path.relative_to(TEST_FILES).as_posix()


def numbers(value: str, count: int) -> list[float]:
    values = json.loads(value)
    assert len(values) == count and all(math.isfinite(v) for v in values), value
    return values


def test_the_pydicom_test_files_are_found():
    assert len(FILES) >= MIN_FILES, f"only {len(FILES)} files under {TEST_FILES}"


@pytest.mark.parametrize("path", FILES, ids=file_id)
def test_every_pydicom_test_file_is_ok_or_quarantined_with_its_reason(path):
    row = read_file(path)
    assert row["status"] in ("ok", "quarantined")
    assert row["kind"] in ("image", "dicomdir", "sr", "seg", "other")
    if row["status"] == "quarantined":
        assert row["reason"] in REASONS
        assert len(row["detail"].split()) >= 4, row["detail"]  # a sentence, not a code
    else:
        assert row["reason"] == ""
    if row["status"] == "ok" and row["kind"] == "image":
        assert row["rows"] > 0 and row["columns"] > 0
        numbers(row["image_position"], 3)
        iop = numbers(row["image_orientation"], 6)
        assert all(v > 0 for v in numbers(row["pixel_spacing"], 2))
        assert row["orientation"] in ORIENTATIONS
        assert row["orientation"] == orientation_label(iop)


@pytest.mark.parametrize("name", [
    "MR_small.dcm",
    "MR_small_implicit.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_expb.dcm",
    "MR_small_padded.dcm",
    "MR_small_RLE.dcm",
    "MR_small_jp2klossless.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
])
def test_mr_small_is_the_same_ok_image_in_every_transfer_syntax(name):
    row = read_file(TEST_FILES / name)
    assert (row["status"], row["kind"], row["reason"]) == ("ok", "image", "")
    assert row["sop_class_uid"] == MR_IMAGE_STORAGE
    assert (row["rows"], row["columns"]) == (64, 64)
    assert json.loads(row["image_position"]) == [-83.9063, -91.2, 6.6406]
    assert json.loads(row["image_orientation"]) == [1, 0, 0, 0, 1, 0]
    assert json.loads(row["pixel_spacing"]) == [0.3125, 0.3125]
    assert row["orientation"] == "axial"


@pytest.mark.parametrize(("name", "orientation"), [
    ("dicomdirtests/98892003/MR1/4919", "sagittal"),
    ("dicomdirtests/98892003/MR2/4950", "coronal"),
    ("dicomdirtests/98892003/MR2/4981", "axial"),
    ("dicomdirtests/98892003/MR700/4467", "oblique"),  # normal 41° from L-R, beyond the 30° of a plane
])
def test_orientation_of_the_dicomdir_mr_images(name, orientation):
    row = read_file(TEST_FILES / name)
    assert (row["status"], row["kind"], (row["rows"], row["columns"])) == ("ok", "image", (16, 16))
    assert row["orientation"] == orientation


@pytest.mark.parametrize(("name", "status", "kind", "reason"), [
    ("CT_small.dcm", "quarantined", "image", "unsupported_sop_class"),
    ("test-SR.dcm", "quarantined", "sr", "sr_not_measurement_report"),  # Comprehensive SR, no TID 1500
    ("reportsi.dcm", "quarantined", "image", "unsupported_sop_class"),
    ("rtplan.dcm", "quarantined", "image", "unsupported_sop_class"),
    ("waveform_ecg.dcm", "quarantined", "image", "unsupported_sop_class"),
    ("ExplVR_BigEndNoMeta.dcm", "quarantined", "image", "unsupported_sop_class"),  # no preamble: still DICOM
    ("nested_priv_SQ.dcm", "quarantined", "image", "unsupported_sop_class"),  # no SOP class at all
    ("priv_SQ.dcm", "quarantined", "image", "no_pixel_data"),  # MR Image Storage in its file meta only
    ("MR_truncated.dcm", "quarantined", "other", "truncated"),
    ("rtplan_truncated.dcm", "quarantined", "other", "truncated"),
    ("dicomdirtests/DICOMDIR", "ok", "dicomdir", ""),
    ("dicomdirtests/DICOMDIR-bigEnd", "ok", "dicomdir", ""),
    ("dicomdirtests/TINY_ALPHA/DICOMDIR", "ok", "dicomdir", ""),
    ("README.txt", "quarantined", "other", "not_dicom"),
    ("test1.json", "quarantined", "other", "not_dicom"),
    ("crayons.icc", "quarantined", "other", "not_dicom"),
    ("zipMR.gz", "quarantined", "other", "not_dicom"),  # MR_small, gzipped: not read through gzip
    # CT_small's dataset after one stray leading byte: pydicom reads no element of it.
    ("no_meta.dcm", "quarantined", "other", "not_dicom"),
])
def test_known_outcomes(name, status, kind, reason):
    row = read_file(TEST_FILES / name)
    assert (row["status"], row["kind"], row["reason"]) == (status, kind, reason), row["detail"]


def test_unsupported_sop_class_detail_names_the_class():
    row = read_file(TEST_FILES / "CT_small.dcm")
    assert "CT Image Storage (1.2.840.10008.5.1.4.1.1.2)" in row["detail"]
    assert "MR Image Storage" in row["detail"]


def test_truncated_detail_says_where_the_file_ends():
    row = read_file(TEST_FILES / "MR_truncated.dcm")
    assert "(7FE0,0010)" in row["detail"] and "re-export" in row["detail"]
