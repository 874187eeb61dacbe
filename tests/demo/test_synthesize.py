"""The synthetic export: readable, valid DICOM, true geometry, boxes that match
the phantom's lesion masks, the cohort ratio, determinism, and no PHI in names."""

from __future__ import annotations

import csv
import shutil
import subprocess
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pydicom
import pytest

from spinedet import SpinedetError
from spinedet.demo import phantom
from spinedet.demo.dicom_writer import write_series
from spinedet.demo.identities import group_counts
from spinedet.demo.rendering import centered_geometry, mask_box, render_series, visible_slices
from spinedet.demo.truth import load_truth
from spinedet.demo.synthesize import synthesize

EXPECTED_SERIES = {"T2_TSE_SAG", "T1_TSE_SAG", "T2_AX", "LOCALIZER"}


def read_export(root: Path) -> list[tuple[Path, pydicom.Dataset]]:
    return [(path, pydicom.dcmread(path)) for path in sorted((root / "DICOM").rglob("*")) if path.is_file()]


@pytest.fixture(scope="module")
def export(smoke_export):
    return read_export(smoke_export)


def read_csv(path: Path) -> list[dict]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


def series_of(export) -> dict[str, list[pydicom.Dataset]]:
    series = defaultdict(list)
    for _, ds in export:
        series[ds.SeriesInstanceUID].append(ds)
    return series


# ---------------------------------------------------------------- reading back

def test_every_file_reads_back_as_a_12_bit_mr_image(export):
    assert export
    for path, ds in export:
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.SOPClassUID == pydicom.uid.MRImageStorage
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (16, 12, 11, 0)
        assert ds.PhotometricInterpretation == "MONOCHROME2"
        pixels = ds.pixel_array
        assert pixels.shape == (ds.Rows, ds.Columns)
        assert pixels.max() <= 4095 and pixels.max() > 0, path
        assert ds.Manufacturer == "SpineSim"


def test_each_study_has_target_t1_axial_and_a_three_plane_localizer(smoke_export, export):
    studies = defaultdict(lambda: defaultdict(list))
    for _, ds in export:
        studies[ds.StudyInstanceUID][ds.SeriesDescription].append(ds)
    cohort = read_csv(smoke_export / "cohort.csv")
    assert len(studies) == len(cohort)
    for series in studies.values():
        assert set(series) == EXPECTED_SERIES
        assert 13 <= len(series["T2_TSE_SAG"]) <= 17
        assert len({ds.SeriesInstanceUID for ds in series["LOCALIZER"]}) == 1
        orientations = {tuple(np.round(np.abs(np.asarray(ds.ImageOrientationPatient, float)))) for ds in series["LOCALIZER"]}
        assert len(series["LOCALIZER"]) == 3 and len(orientations) == 3
        for ds in series["T2_TSE_SAG"]:
            normal = np.cross(np.asarray(ds.ImageOrientationPatient[:3], float), np.asarray(ds.ImageOrientationPatient[3:], float))
            assert abs(normal[0]) > 0.98  # slices step left-right: sagittal
            assert ds.MRAcquisitionType == "2D" and float(ds.EchoTime) >= 90


def test_headers_carry_realistic_fake_phi(export):
    for _, ds in export:
        assert len(ds.PatientID) == 8 and ds.PatientID.isdigit()
        assert "^" in str(ds.PatientName)
        for keyword in ("PatientBirthDate", "StudyDate", "StudyTime", "SeriesTime", "AcquisitionDate", "ContentTime",
                        "InstitutionName", "AccessionNumber", "ReferringPhysicianName", "OperatorsName", "StationName"):
            assert str(ds.get(keyword, "")), keyword
        block = ds.private_block(0x0029, "SPINESIM PRIVATE 1.0")
        assert ds.PatientID in block[0x10].value


# ------------------------------------------------------------------- geometry

def test_slice_positions_lie_along_the_normal_with_the_stated_spacing(export):
    for datasets in series_of(export).values():
        if datasets[0].SeriesDescription == "LOCALIZER":
            continue
        iop = np.asarray(datasets[0].ImageOrientationPatient, float)
        assert abs(np.dot(iop[:3], iop[3:])) < 1e-6
        assert np.allclose([np.linalg.norm(iop[:3]), np.linalg.norm(iop[3:])], 1, atol=1e-6)
        normal = np.cross(iop[:3], iop[3:])
        ordered = sorted(datasets, key=lambda ds: ds.InstanceNumber)
        positions = np.array([np.asarray(ds.ImagePositionPatient, float) for ds in ordered])
        offsets = positions - positions[0]
        along = offsets @ normal
        assert np.allclose(offsets, np.outer(along, normal), atol=1e-3)  # no in-plane drift
        steps = np.diff(along)
        spacing = float(ordered[0].SpacingBetweenSlices)
        assert np.allclose(np.abs(steps), spacing, atol=1e-3)
        assert np.all(steps > 0) or np.all(steps < 0)  # monotonic, either order
        for ds in ordered:
            assert list(ds.ImageOrientationPatient) == list(ordered[0].ImageOrientationPatient)
            assert float(ds.SliceThickness) <= spacing


def test_write_series_places_slices_and_numbers_instances(tmp_path):
    volume = np.arange(4 * 5 * 6, dtype=np.uint16).reshape(4, 5, 6)
    iop = [0.0, -1.0, 0.0, 0.0, 0.0, -1.0]  # rows run posterior -> anterior
    written = write_series(
        tmp_path, volume, ipp_first=[10.0, 20.0, 30.0], iop=iop, pixel_spacing=(0.8, 0.6), slice_step=3.3,
        reverse_order=True, header={"PatientID": "X1"}, series_number=7, description="T2_TSE_SAG",
        file_name=lambda number: f"a/b/{number:03d}",
    )
    assert [item["instance_number"] for item in written] == [1, 2, 3, 4]
    assert [item["slice_index"] for item in written] == [3, 2, 1, 0]
    normal = np.cross(iop[:3], iop[3:])
    for item in written:
        assert item["path"] == tmp_path / "a" / "b" / f"{item['instance_number']:03d}"
        ds = pydicom.dcmread(item["path"])
        assert ds.SOPInstanceUID == item["sop_instance_uid"]
        assert ds.InstanceNumber == item["instance_number"] and ds.SeriesNumber == 7
        expected = np.array([10.0, 20.0, 30.0]) + item["slice_index"] * 3.3 * normal
        assert np.allclose(np.asarray(ds.ImagePositionPatient, float), expected)
        assert [float(v) for v in ds.PixelSpacing] == [0.8, 0.6]
        assert np.array_equal(ds.pixel_array, volume[item["slice_index"]])
    # the same call writes the same UIDs
    again = write_series(tmp_path / "again", volume, ipp_first=[10.0, 20.0, 30.0], iop=iop, pixel_spacing=(0.8, 0.6),
                         slice_step=3.3, reverse_order=True, header={"PatientID": "X1"}, series_number=7)
    assert [item["sop_instance_uid"] for item in again] == [item["sop_instance_uid"] for item in written]


def test_write_series_rejects_values_over_12_bits(tmp_path):
    with pytest.raises(SpinedetError, match="12 bits"):
        write_series(tmp_path, np.full((1, 2, 2), 5000, np.uint16), ipp_first=[0, 0, 0], iop=[0, 1, 0, 0, 0, -1],
                     pixel_spacing=(1, 1), slice_step=3)


# ---------------------------------------------------------------- annotations

def test_boxes_are_the_tight_boxes_of_their_lesion_and_hold_no_other(smoke_export, export):
    truths = load_truth(smoke_export)
    by_sop = {ds.SOPInstanceUID: ds for _, ds in export}
    rows = read_csv(smoke_export / "annotations.csv")
    assert rows
    boxes_per_lesion = Counter()
    for row in rows:
        ds = by_sop[row["sop_instance_uid"]]
        truth = truths[ds.PatientID]
        assert row["study_uid"] == ds.StudyInstanceUID == truth.study_uid
        assert row["series_uid"] == ds.SeriesInstanceUID == truth.series_uid
        assert int(row["instance_number"]) == ds.InstanceNumber
        box = tuple(int(row[key]) for key in ("x_min", "y_min", "x_max", "y_max"))
        assert 0 <= box[0] < box[2] <= ds.Columns and 0 <= box[1] < box[3] <= ds.Rows
        matches = [i for i, label in enumerate(truth.labels)
                   if label == row["label"] and truth.mask(i, ds.InstanceNumber).any()
                   and mask_box(truth.mask(i, ds.InstanceNumber)) == box]
        assert len(matches) == 1, row
        lesion = matches[0]
        boxes_per_lesion[(ds.PatientID, lesion)] += 1
        x0, y0, x1, y1 = box
        for other in range(len(truth.labels)):
            if other != lesion:
                assert not truth.mask(other, ds.InstanceNumber)[y0:y1, x0:x1].any()
    # every lesion is annotated on at least one slice, and every visible slice is annotated
    for truth in truths.values():
        for lesion in range(len(truth.labels)):
            visible = int(visible_slices(truth.masks[lesion]).sum())
            assert visible >= 1
            assert boxes_per_lesion[(truth.patient_id, lesion)] == visible


def test_groups_carry_their_lesions(smoke_export):
    truths = load_truth(smoke_export)
    cohort = {row["patient_id"]: row["group"] for row in read_csv(smoke_export / "cohort.csv")}
    assert set(truths) == set(cohort)
    for patient_id, truth in truths.items():
        assert truth.group == cohort[patient_id]
        kinds = Counter(truth.kinds)
        if truth.group == "disc":
            assert 1 <= kinds["herniation"] <= 3 and kinds["cord_injury"] == 0
        elif truth.group == "injured":
            assert kinds["cord_injury"] == 1 and kinds["herniation"] <= 1
        else:
            assert not truth.kinds
        for label, kind in zip(truth.labels, truth.kinds):
            assert label == {"herniation": "disc_herniation", "cord_injury": "cord_injury"}[kind]


# --------------------------------------------------------------------- cohort

@pytest.mark.parametrize("patients, expected", [
    (1500, (800, 200, 500)), (15, (8, 2, 5)), (6, (3, 1, 2)), (3, (1, 1, 1)), (4, (2, 1, 1)), (60, (32, 8, 20)),
])
def test_group_counts_follow_800_200_500(patients, expected):
    counts = group_counts(patients, ["disc", "injured", "normal"])
    assert tuple(counts.values()) == expected
    assert sum(counts.values()) == patients


def test_cohort_matches_the_group_counts(smoke_export):
    cohort = read_csv(smoke_export / "cohort.csv")
    assert Counter(row["group"] for row in cohort) == Counter(group_counts(len(cohort), ["disc", "injured", "normal"]))
    assert len({row["patient_id"] for row in cohort}) == len(cohort)


# ---------------------------------------------------------------- determinism

def file_bytes(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def test_same_seed_same_bytes_and_another_seed_differs(tmp_path):
    from spinedet.cli import main

    # The CLI writes patients in 2 processes, the function in this one: same bytes.
    assert main(["synthesize", "--out", str(tmp_path / "a"), "--patients", "3", "--matrix", "64", "--seed", "11",
                 "--workers", "2"]) == 0
    synthesize(tmp_path / "b", patients=3, matrix=64, seed=11)
    first, second = file_bytes(tmp_path / "a"), file_bytes(tmp_path / "b")
    assert first.keys() == second.keys()
    assert [name for name in first if first[name] != second[name]] == []

    synthesize(tmp_path / "c", patients=3, matrix=64, seed=12)
    pixels = lambda root: [ds.PixelData for _, ds in read_export(root)]  # noqa: E731
    assert pixels(tmp_path / "c") != pixels(tmp_path / "a")
    # The demo's pseudonym key comes from the seed: a fresh clone gets the same split.
    key = (tmp_path / "a" / "pseudonym.key").read_text().strip()
    assert len(bytes.fromhex(key)) == 32 and (tmp_path / "a" / "pseudonym.key").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "c" / "pseudonym.key").read_text().strip() != key


def test_refuses_to_write_over_an_existing_export(smoke_export, tmp_path):
    shutil.copytree(smoke_export / "DICOM", tmp_path / "DICOM")
    with pytest.raises(SpinedetError, match="already holds files"):
        synthesize(tmp_path, patients=1, matrix=64, seed=0)


# ------------------------------------------------------------------- validity

@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) is not installed")
def test_dciodvfy_finds_no_errors_in_any_series_kind(export):
    first_of_kind = {}
    for path, ds in export:
        first_of_kind.setdefault(ds.SeriesDescription, path)
    assert set(first_of_kind) == EXPECTED_SERIES
    for kind, path in first_of_kind.items():
        result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        report = result.stdout + result.stderr
        errors = [line for line in report.splitlines() if "Error" in line]
        assert errors == [], f"{kind}: {errors}"
        assert "MRImage" in report


# ------------------------------------------------------------------------ PHI

def test_no_phi_in_file_or_folder_names(smoke_export, export):
    phi = set()
    for _, ds in export:
        for keyword in ("PatientID", "PatientBirthDate", "StudyDate", "AccessionNumber", "StudyInstanceUID",
                        "SeriesInstanceUID", "SOPInstanceUID", "StudyID"):
            phi.add(str(ds.get(keyword)))
        phi.update(part for part in str(ds.PatientName).split("^") if part)
    names = [str(path.relative_to(smoke_export)) for path in smoke_export.rglob("*")]
    assert names
    leaks = [(name, value) for name in names for value in phi if value and value.lower() in name.lower()]
    assert leaks == []
    # exports name files in several styles, some without an extension
    files = [path for path, _ in export]
    assert any(path.suffix == "" for path in files) or any(path.suffix == ".dcm" for path in files)


def test_truth_and_preview_exist_without_phi(smoke_export):
    cases = read_csv(smoke_export / "truth" / "cases.csv")
    assert [row["case"] for row in cases] == [f"case-{i:03d}" for i in range(1, len(cases) + 1)]
    assert all((smoke_export / "truth" / f"{row['case']}.npz").is_file() for row in cases)
    preview = (smoke_export / "preview.png").read_bytes()
    assert preview.startswith(b"\x89PNG")
    assert b"tEXt" not in preview and b"iTXt" not in preview and b"zTXt" not in preview


# -------------------------------------------------------------------- phantom

def test_lesions_are_large_and_contrasted_at_matrix_256():
    rng = np.random.default_rng(4)
    anatomy = phantom.draw_anatomy(rng)
    lesions = phantom.draw_lesions(rng, anatomy, "injured", ("disc_herniation", "cord_injury"))
    lesions += [lesion for lesion in phantom.draw_lesions(rng, anatomy, "disc", ("disc_herniation", "cord_injury"))
                if lesion.level not in {other.level for other in lesions}][:1]
    center = anatomy.to_lps(0.0, anatomy.level_s("C5"), phantom.PVBL + 8)
    geometry = centered_geometry(center, [0, 1, 0], [0, 0, -1], matrix=256, fov=235, n_slices=1, slice_step=3.4, thickness=3.0)
    points = geometry.slice_points(0)
    image, occupancies = phantom.render(anatomy, lesions, points, "T2", geometry.pixel_spacing[0])
    for lesion, occupancy in zip(lesions, occupancies):
        mask = occupancy >= 0.5
        assert mask.any(), lesion.kind
        x0, y0, x1, y1 = mask_box(mask)
        width, height = x1 - x0, y1 - y0
        inside = image[mask].mean()
        if lesion.kind == "cord_injury":
            assert width >= 5 and height >= 15
            assert inside >= 0.5  # cord is ~0.36 of CSF
        else:
            assert 4 <= min(width, height) and max(width, height) <= 18
            assert inside <= 0.45  # against CSF at 1.0


def test_render_series_masks_follow_the_geometry():
    """The same lesion seen through flipped rows lands on the mirrored columns."""
    rng = np.random.default_rng(8)
    anatomy = phantom.draw_anatomy(rng)
    lesions = phantom.draw_lesions(rng, anatomy, "injured", ("disc_herniation", "cord_injury"))
    center = anatomy.to_lps(0.0, anatomy.level_s("C5"), phantom.PVBL + 8)
    kwargs = dict(matrix=96, fov=230, n_slices=3, slice_step=3.5, thickness=3.0)
    nominal = centered_geometry(center, [0, 1, 0], [0, 0, -1], **kwargs)
    flipped = centered_geometry(center, [0, -1, 0], [0, 0, -1], **kwargs)
    _, masks = render_series(anatomy, lesions, nominal, "T2", np.random.default_rng(0))
    _, flipped_masks = render_series(anatomy, lesions, flipped, "T2", np.random.default_rng(0))
    # flipping the rows also flips the normal, so the spatial slice order reverses
    assert masks.any()
    assert np.array_equal(masks, flipped_masks[:, ::-1, :, ::-1])


# ------------------------------------------------------------------ Enhanced MR

@pytest.fixture(scope="module")
def enhanced_and_classic(tmp_path_factory):
    root = tmp_path_factory.mktemp("enhanced")
    summaries = {name: synthesize(root / name, patients=4, matrix=64, seed=9, enhanced_fraction=fraction)
                 for name, fraction in [("classic", 0.0), ("half", 0.5), ("enhanced", 1.0)]}
    return root, summaries


def test_enhanced_patients_hold_the_classic_pixels_and_positions_frame_by_frame(enhanced_and_classic):
    root, _ = enhanced_and_classic
    classic = series_of(read_export(root / "classic"))
    enhanced = [ds for _, ds in read_export(root / "enhanced") if "NumberOfFrames" in ds]
    # target T2, T1 and axial T2 of each of the 4 patients; the localizer stays classic
    assert len(enhanced) == 12
    for ds in enhanced:
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.4.1"
        frames = sorted(classic[ds.SeriesInstanceUID], key=lambda f: int(f.InstanceNumber))
        assert int(ds.NumberOfFrames) == len(frames)
        assert np.array_equal(ds.pixel_array, np.stack([f.pixel_array for f in frames]))
        positions = [[float(v) for v in group.PlanePositionSequence[0].ImagePositionPatient]
                     for group in ds.PerFrameFunctionalGroupsSequence]
        assert positions == [[float(v) for v in f.ImagePositionPatient] for f in frames]
        shared = ds.SharedFunctionalGroupsSequence[0]
        assert list(shared.PlaneOrientationSequence[0].ImageOrientationPatient) == list(
            frames[0].ImageOrientationPatient)
        assert list(shared.PixelMeasuresSequence[0].PixelSpacing) == list(frames[0].PixelSpacing)


def test_the_enhanced_fraction_leaves_the_other_patients_files_as_they_were(enhanced_and_classic):
    root, summaries = enhanced_and_classic
    assert [summaries[name]["enhanced_mr_patients"] for name in ("classic", "half", "enhanced")] == [0, 2, 4]
    classic = file_bytes(root / "classic")
    half = {str(path.relative_to(root / "half")): ds for path, ds in read_export(root / "half")}
    single_frame = [name for name, ds in half.items() if "NumberOfFrames" not in ds]
    assert len(single_frame) < len(half) < len([name for name in classic if name.startswith("DICOM")])
    assert all((root / "half" / name).read_bytes() == classic[name] for name in single_frame)


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) is not installed")
def test_dciodvfy_finds_no_errors_in_an_enhanced_mr_series(enhanced_and_classic):
    root, _ = enhanced_and_classic
    for path, ds in read_export(root / "enhanced"):
        if "NumberOfFrames" in ds and ds.SeriesDescription == "T2_TSE_SAG":
            result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
            report = result.stdout + result.stderr
            assert [line for line in report.splitlines() if "Error" in line] == []
            assert "EnhancedMRImage" in report
            return
    pytest.fail("no enhanced T2 series in the export")
