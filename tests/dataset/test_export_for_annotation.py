"""`spinedet export-for-annotation`: the study's slices as a CVAT / Label Studio task, and a
manifest whose transforms take a box on an exported PNG back to the DICOM image it was cut from."""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest

from dicom_study import export_argv, run_dicom_study
from phi import collect_phi, scan_tree
from spinedet import SpinedetError, cli
from spinedet.dataset import export_for_annotation
from spinedet.dataset.canonical import to_canonical
from spinedet.geometry import orientation_label, pixel_to_voxel
from spinedet.ingest.dicom import InstanceLocator
from spinedet.io import read_csv

COORDINATES = ("x_min", "y_min", "x_max", "y_max")
AFFINE = ("a11", "a12", "a13", "a21", "a22", "a23")


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> SimpleNamespace:
    study = run_dicom_study(tmp_path_factory.mktemp("export_study"))
    study.out = study.root / "annotation_export"
    assert cli.main(export_argv(study, study.out)) == 0
    study.coco = json.loads((study.out / "coco.json").read_text())
    study.manifest = read_csv(study.out / "manifest.csv")
    return study


def dicom_box(row: dict, bbox: list[float]) -> list[float]:
    """A COCO bbox [x, y, w, h] on an exported PNG through its manifest row: DICOM pixel edges."""
    affine = np.array([float(row[name]) for name in AFFINE]).reshape(2, 3)
    x, y, w, h = bbox
    mapped = np.array([[x, y, 1], [x + w, y, 1], [x, y + h, 1], [x + w, y + h, 1]], dtype=float) @ affine.T
    return [*mapped.min(axis=0), *mapped.max(axis=0)]


def png_chunks(path: Path) -> list[str]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, offset = [], 8
    while offset < len(data):
        length, kind = struct.unpack(">I4s", data[offset:offset + 8])
        chunks.append(kind.decode("ascii"))
        offset += 12 + length
    return chunks


def test_the_task_holds_the_studys_slices_and_boxes(study):
    slice_cocos = [json.loads(path.read_text()) for path in sorted((study.results / "slices").glob("sub-*/coco.json"))]
    expected = sorted(image["file_name"] for coco in slice_cocos for image in coco["images"])
    assert sorted(image["file_name"] for image in study.coco["images"]) == expected
    assert sorted(row["file_name"] for row in study.manifest) == expected
    assert sorted(p.relative_to(study.out / "images").as_posix() for p in (study.out / "images").rglob("*.png")) \
        == expected
    for name in expected:  # the study's PNGs, byte for byte
        assert (study.out / "images" / name).read_bytes() == (study.results / "slices" / name).read_bytes()
    assert len(study.coco["annotations"]) == sum(len(coco["annotations"]) for coco in slice_cocos) > 0
    assert [c["name"] for c in study.coco["categories"]] == ["disc_herniation", "cord_injury"]
    assert [c["id"] for c in study.coco["categories"]] == [1, 2]
    for ann in study.coco["annotations"]:
        assert {"id", "image_id", "category_id", "bbox", "area", "iscrowd"} <= set(ann)
    images = {image["id"]: image for image in study.coco["images"]}
    assert all(set(image) == {"id", "file_name", "width", "height"} for image in images.values())


def test_each_exported_box_maps_back_to_its_dicom_box(study):
    """The manifest's transform takes every pre-annotation back to the annotation table's box on
    the same instance (and frame, for Enhanced MR) within 0.5 px."""
    table = read_csv(study.restricted / "annotations" / "annotations.csv")
    rows = {row["file_name"]: row for row in study.manifest}
    names = {image["id"]: image["file_name"] for image in study.coco["images"]}
    labels = {c["id"]: c["name"] for c in study.coco["categories"]}
    worst, frames = 0.0, set()
    for ann in study.coco["annotations"]:
        row = rows[names[ann["image_id"]]]
        box = dicom_box(row, ann["bbox"])
        same_image = [t for t in table if t["sop_instance_uid"] == row["sop_instance_uid"]
                      and t["frame_number"] == row["frame_number"] and t["label"] == labels[ann["category_id"]]]
        assert same_image, (row["file_name"], ann)
        distance = min(max(abs(float(t[c]) - v) for c, v in zip(COORDINATES, box)) for t in same_image)
        worst = max(worst, distance)
        frames.add(bool(row["frame_number"]))
    assert worst < 0.5
    assert frames == {True, False}  # classic and Enhanced MR instances both carry boxes


def test_an_oblique_series_maps_back(study):
    """One patient's target series is tilted by several degrees: its slices still sit on its
    instances (frames of an Enhanced MR file here) and its boxes come back."""
    files = {row["sop_instance_uid"]: row for row in read_csv(study.inventory / "files.csv")}
    oblique = [row for row in study.manifest
               if not np.allclose(np.abs(json.loads(files[row["sop_instance_uid"]]["image_orientation"])) % 1, 0)]
    assert oblique and all(orientation_label(json.loads(files[r["sop_instance_uid"]]["image_orientation"]))
                           == "sagittal" for r in oblique)
    names = {image["file_name"]: image["id"] for image in study.coco["images"]}
    assert any(ann["image_id"] in {names[r["file_name"]] for r in oblique} for ann in study.coco["annotations"])


def test_nothing_exported_carries_identity(study):
    phi = collect_phi(study.export / "DICOM")
    assert scan_tree(study.out / "images", phi) == []
    assert scan_tree(study.out, phi)  # the manifest carries identity: it belongs in restricted/
    coco_text = (study.out / "coco.json").read_text()
    for row in study.manifest:
        assert row["patient_id"] and row["patient_id"] not in coco_text and row["patient_id"] not in row["file_name"]
        assert row["sop_instance_uid"] not in coco_text
        subject = f"sub-{row['pseudonym']}"
        assert row["file_name"] == f"{subject}/{subject}_slice-{int(row['slice_index']):02d}.png"
    for png in (study.out / "images").rglob("*.png"):
        assert set(png_chunks(png)) <= {"IHDR", "IDAT", "IEND"}, png


def test_all_slices_writes_every_slice_as_slices_does(study, tmp_path):
    out = tmp_path / "all"
    assert cli.main(export_argv(study, out, "--all-slices")) == 0
    manifest = read_csv(out / "manifest.csv")
    volumes = sorted((study.results / "deid").glob("sub-*/anat/*.nii.gz"))
    assert len(manifest) == sum(to_canonical(nib.load(v)).data.shape[0] for v in volumes) > len(study.manifest)
    assert all(row["sop_instance_uid"] for row in manifest)
    for row in study.manifest:  # the study's slices, written the same way
        assert (out / "images" / row["file_name"]).read_bytes() == \
            (study.results / "slices" / row["file_name"]).read_bytes()
    assert len(json.loads((out / "coco.json").read_text())["annotations"]) == len(study.coco["annotations"])


def test_the_deidentified_volume_has_the_converted_affine(study):
    """The export reads results/deid, as slices does: deidentify copies dcm2niix's voxels and affine."""
    pseudonyms = {row["patient_id"]: row["pseudonym"] for row in read_csv(study.restricted / "pseudonyms.csv")}
    for conversion in read_csv(study.restricted / "convert" / "conversions.csv"):
        [deid] = (study.results / "deid" / f"sub-{pseudonyms[conversion['patient_id']]}" / "anat").glob("*.nii.gz")
        assert np.array_equal(nib.load(conversion["nifti"]).affine, nib.load(deid).affine)


def test_a_slice_that_cannot_be_mapped_is_left_out(study, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(export_for_annotation, "RESIDUAL_PX", 0.0)  # every fit is "too far off"
    with caplog.at_level(logging.WARNING), pytest.raises(SpinedetError, match="nothing exported"):
        export_for_annotation.export(
            study.results / "deid" / "participants.csv", study.results / "slices", study.restricted / "pseudonyms.csv",
            study.restricted / "convert" / "conversions.csv", study.inventory / "files.csv", tmp_path / "images",
            tmp_path / "coco.json", tmp_path / "manifest.csv", {"classes": ["disc_herniation", "cord_injury"],
                                                                "slices": {"window_percentiles": [1, 99]}})
    assert "left out" in caplog.text and not (tmp_path / "manifest.csv").exists()


def test_an_in_plane_rotated_pixel_grid_gives_a_rotation_fitted_exactly():
    """DICOM rows and columns turned 10 degrees within the sagittal plane against an axis-aligned
    volume: the transform is no permutation, and it agrees with the geometry at every point."""
    angle = np.radians(10.0)
    rotation = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]])
    row_dir, col_dir = rotation @ [0.0, 1.0, 0.0], rotation @ [0.0, 0.0, -1.0]  # LPS: posterior, inferior
    # The volume: voxel axis 0 left -> right, 1 superior -> inferior, 2 anterior -> posterior (RAS affine).
    affine = np.array([[3.0, 0, 0, -6.0], [0, 0, -0.8, 20.0], [0, -0.9, 0, 30.0], [0, 0, 0, 1]])
    files = []
    for index in range(5):  # DICOM planes on the volume's slices (x_RAS = 3 * index - 6)
        ipp = [-(3.0 * index - 6.0), -25.0, 40.0]
        files.append({"sop_instance_uid": f"1.2.3.{index}", "instance_number": str(index + 1),
                      "image_orientation": json.dumps([*row_dir, *col_dir]), "pixel_spacing": "[0.7, 0.6]",
                      "image_position": json.dumps(ipp), "frame_positions": ""})
    locator = InstanceLocator(files, affine, np.eye(4))
    plane, transform, residual = locator.pixel_transform(3, 40, 50)
    assert plane["sop_instance_uid"] == "1.2.3.3" and residual < 1e-9
    assert abs(transform[0, 1]) > 0.1 and abs(transform[1, 0]) > 0.1  # not a permutation of the axes
    for x, y in [(0.0, 0.0), (12.5, 33.0), (40.0, 50.0)]:
        column, row = transform @ [x, y, 1.0]
        voxel = pixel_to_voxel([[column - 0.5, row - 0.5]], plane["ipp"], plane["iop"], plane["pixel_spacing"],
                               affine)[0]
        assert np.allclose(voxel, [3, y - 0.5, x - 0.5], atol=1e-6)
    assert locator.pixel_transform(9, 40, 50) is None  # beyond the series: no image lies there
