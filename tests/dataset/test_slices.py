"""`spinedet slices`: canonical orientation, box mapping, slice selection, outputs."""

from __future__ import annotations

import csv
import itertools
import json
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml
from PIL import Image
from pycocotools.coco import COCO

from spinedet import SpinedetError
from spinedet.cli import main
from spinedet.dataset.canonical import to_canonical, window_to_uint8
from spinedet.dataset.slices import DROPPED_COLUMNS, map_box, select_slices, write_all_slices, write_patient_slices

CLASSES = ["disc_herniation", "cord_injury"]

# Phantom labels; the PNG shows label * 255 / MAX_LABEL with a [0, 100] percentile window.
BODY, CANAL, C2, T1, LESION, RIGHT_MARKER = 1, 2, 3, 4, 5, 6
MAX_LABEL = RIGHT_MARKER

# World (RAS mm) voxel spacing and voxel count along x (left-right), y (posterior-anterior),
# z (inferior-superior): 7 sagittal slices of 3 mm, 41 x 61 in-plane pixels of 1.5 mm.
SPACING = np.array([3.0, 1.5, 1.5])
COUNTS = np.array([7, 41, 61])


def make_config(**slices) -> dict:
    settings = {"mode": "mid", "half_width": 3, "window_percentiles": [0.0, 100.0], "min_box_px": 2}
    settings.update(slices)
    return {"classes": CLASSES, "groups": ["disc", "injured", "normal"], "slices": settings}


def rotation(degrees: tuple[float, float, float]) -> np.ndarray:
    """Rotation about x, then y, then z by the given angles (degrees)."""
    ax, ay, az = np.radians(degrees)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def phantom_affine(world_axis_of_voxel_axis, signs, degrees=(0.0, 0.0, 0.0)):
    """Affine and shape of a volume whose voxel axis v runs along world axis
    `world_axis_of_voxel_axis[v]` with sign `signs[v]`, rotated by `degrees`,
    centred on the world origin."""
    columns = np.zeros((3, 3))
    for voxel_axis, (world_axis, sign) in enumerate(zip(world_axis_of_voxel_axis, signs)):
        columns[world_axis, voxel_axis] = sign * SPACING[world_axis]
    linear = rotation(degrees) @ columns
    shape = tuple(int(COUNTS[w]) for w in world_axis_of_voxel_axis)
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = -linear @ ((np.array(shape) - 1) / 2)
    return affine, shape


def phantom_labels(affine: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Label each voxel by where its centre lies in patient RAS coordinates."""
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    x, y, z = np.moveaxis(ijk @ affine[:3, :3].T + affine[:3, 3], -1, 0)
    labels = np.zeros(shape, dtype=np.float32)
    midline = np.abs(x) <= 8
    labels[midline & (y >= 3) & (y <= 18) & (np.abs(z) <= 30)] = BODY  # vertebral bodies, anterior
    labels[midline & (y >= -15) & (y <= -3) & (np.abs(z) <= 30)] = CANAL  # canal, posterior
    labels[midline & (y >= 3) & (y <= 18) & (z > 30) & (z <= 42)] = C2  # superior
    labels[midline & (y >= 3) & (y <= 18) & (z < -30) & (z >= -42)] = T1  # inferior
    labels[(np.abs(x) <= 1.5) & (y >= -12) & (y <= -6) & (z >= 0) & (z <= 8)] = LESION
    labels[(x >= 4) & (x <= 8) & (y >= -28) & (y <= -22) & (np.abs(z) <= 5)] = RIGHT_MARKER
    return labels


def lesion_boxes(labels: np.ndarray, slice_axis: int) -> list[dict]:
    """The tight voxel box of the lesion on every slice that shows it (boxes.json format)."""
    axes = [a for a in range(3) if a != slice_axis]
    boxes = []
    for k in range(labels.shape[slice_axis]):
        rows, cols = np.nonzero(np.take(labels, k, axis=slice_axis) == LESION)
        if rows.size:
            boxes.append(
                {
                    "label": "disc_herniation",
                    "slice": k,
                    "min": [int(rows.min()), int(cols.min())],
                    "max": [int(rows.max()) + 1, int(cols.max()) + 1],
                    "axes": axes,
                }
            )
    return boxes


def write_patient(root: Path, pseudonym: str, data, affine, boxes, slice_axis, group="disc"):
    """Write a deidentify-style volume and boxes file; return their paths."""
    anat = root / "deid" / f"sub-{pseudonym}" / "anat"
    anat.mkdir(parents=True, exist_ok=True)
    volume = anat / f"sub-{pseudonym}_T2w.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine), volume)
    boxes_path = anat.parent / f"sub-{pseudonym}_boxes.json"
    boxes_path.write_text(
        json.dumps({"pseudonym": pseudonym, "group": group, "slice_axis": slice_axis, "boxes": boxes})
    )
    return volume, boxes_path


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


def label_mask(pixels: np.ndarray, label: int) -> np.ndarray:
    return np.abs(pixels.astype(float) - label * 255 / MAX_LABEL) < 1


def check_anatomy(out: Path, coco: dict, n_slices: int) -> None:
    """Bodies left of the canal, C2 above T1, the lesion exactly inside its box,
    the right-side marker right of the middle slice."""
    mid = n_slices // 2
    seen_mid = False
    for image in coco["images"]:
        pixels = read_png(out / image["file_name"])
        assert pixels.shape == (image["height"], image["width"])
        body, canal = label_mask(pixels, BODY), label_mask(pixels, CANAL)
        c2, t1 = label_mask(pixels, C2), label_mask(pixels, T1)
        if body.any() and canal.any():
            assert np.nonzero(body)[1].mean() < np.nonzero(canal)[1].mean(), image["file_name"]
        if c2.any() and t1.any():
            assert np.nonzero(c2)[0].mean() < np.nonzero(t1)[0].mean(), image["file_name"]
        if image["slice_index"] == mid:
            seen_mid = True
            assert body.any() and canal.any() and c2.any() and t1.any()
        if label_mask(pixels, RIGHT_MARKER).any():
            assert image["slice_index"] > mid

        lesion_rows, lesion_cols = np.nonzero(label_mask(pixels, LESION))
        boxes = [a["bbox"] for a in coco["annotations"] if a["image_id"] == image["id"]]
        if lesion_rows.size == 0:
            assert boxes == []
            continue
        assert len(boxes) == 1
        x, y, w, h = boxes[0]
        assert [x, y, x + w, y + h] == [
            lesion_cols.min(),
            lesion_rows.min(),
            lesion_cols.max() + 1,
            lesion_rows.max() + 1,
        ]
    assert seen_mid


SIGNED_PERMUTATIONS = [
    (perm, signs)
    for perm in itertools.permutations(range(3))
    for signs in itertools.product((1, -1), repeat=3)
]
OBLIQUE = [
    ((1, 2, 0), (1, -1, -1), (4.0, 0.0, 0.0)),
    ((1, 2, 0), (1, -1, 1), (0.0, -5.0, 3.0)),
    ((2, 1, 0), (-1, 1, -1), (3.0, 3.0, -5.0)),
    ((0, 1, 2), (-1, 1, 1), (-6.0, 2.0, 4.0)),
]
ORIENTATIONS = [(perm, signs, (0.0, 0.0, 0.0)) for perm, signs in SIGNED_PERMUTATIONS] + OBLIQUE


@pytest.mark.parametrize(
    "world_axes, signs, degrees",
    ORIENTATIONS,
    ids=[f"axes{p}-signs{s}-rot{d}".replace(" ", "") for p, s, d in ORIENTATIONS],
)
def test_every_orientation_comes_out_canonical(tmp_path, world_axes, signs, degrees):
    affine, shape = phantom_affine(world_axes, signs, degrees)
    labels = phantom_labels(affine, shape)
    slice_axis = world_axes.index(0)
    boxes = lesion_boxes(labels, slice_axis)
    assert boxes, "the phantom lesion must be visible"
    volume, boxes_path = write_patient(tmp_path, "P1", labels, affine, boxes, slice_axis)

    coco = write_patient_slices(volume, boxes_path, tmp_path / "slices", make_config())

    assert len(coco["images"]) == COUNTS[0]
    assert len(coco["annotations"]) == len(boxes)
    check_anatomy(tmp_path / "slices", coco, int(COUNTS[0]))


def test_map_box_through_a_flip_uses_pixel_edges():
    # Voxel axis 0 is left-right already; axis 1 runs inferior->superior (flipped
    # to superior->inferior) and axis 2 anterior->posterior (kept).
    affine = np.diag([1.0, 1.0, -1.0, 1.0])[[0, 2, 1, 3]]  # axis1 -> +z (S), axis2 -> -y (P)
    image = nib.Nifti1Image(np.zeros((3, 10, 20), dtype=np.float32), affine)
    canonical = to_canonical(image)
    assert canonical.data.shape == (3, 10, 20)
    box = {"label": "cord_injury", "slice": 1, "min": [2, 5], "max": [4, 9], "axes": [1, 2]}
    mapped = map_box(box, 0, canonical.old_to_new)
    # Rows 2..3 on a 10-row axis flip to rows 6..7: edges [6, 8); columns stay [5, 9).
    assert (mapped.slice_index, mapped.y_min, mapped.y_max, mapped.x_min, mapped.x_max) == (1, 6, 8, 5, 9)


def test_window_to_uint8_uses_volume_percentiles():
    data = np.arange(101, dtype=np.float32)
    pixels = window_to_uint8(data, [10.0, 90.0])
    assert pixels.dtype == np.uint8
    assert pixels[:11].max() == 0 and pixels[90:].min() == 255
    assert pixels[50] == 128
    assert not window_to_uint8(np.full((4, 4), 7.0), [1.0, 99.0]).any()


def test_select_slices():
    assert select_slices(7, "mid", 2, {0}) == [1, 2, 3, 4, 5]
    assert select_slices(6, "mid", 1, set()) == [2, 3, 4]
    assert select_slices(3, "mid", 5, set()) == [0, 1, 2]
    assert select_slices(7, "annotated", 2, {6, 0, 9}) == [0, 6]
    with pytest.raises(SpinedetError, match="slices.mode"):
        select_slices(7, "all", 2, set())


def simple_patient(tmp_path, boxes, pseudonym="P2", group="disc"):
    """A canonical-ish volume (axes L->R, P->A, I->S) of 9 x 32 x 48 with a gradient."""
    affine = np.diag([3.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = [-12.0, -16.0, -24.0]
    data = np.arange(9 * 32 * 48, dtype=np.float32).reshape(9, 32, 48)
    return write_patient(tmp_path, pseudonym, data, affine, boxes, 0, group)


def read_dropped(path: Path) -> list[dict]:
    with path.open() as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == DROPPED_COLUMNS
        return list(reader)


def test_boxes_clipped_or_dropped_with_reasons(tmp_path):
    # Volume axes: 0 left->right, 1 posterior->anterior (32), 2 inferior->superior (48).
    # Canonical image: 48 rows (superior first), 32 columns (anterior first).
    boxes = [
        {"label": "disc_herniation", "slice": 4, "min": [10, 20], "max": [15, 30], "axes": [1, 2]},
        {"label": "cord_injury", "slice": 4, "min": [-5, 40], "max": [3, 60], "axes": [1, 2]},
        {"label": "disc_herniation", "slice": 3, "min": [10, 20], "max": [11, 30], "axes": [1, 2]},
        {"label": "disc_herniation", "slice": 5, "min": [40, 20], "max": [45, 30], "axes": [1, 2]},
        {"label": "fracture", "slice": 4, "min": [10, 20], "max": [15, 30], "axes": [1, 2]},
        {"label": "disc_herniation", "slice": 0, "min": [10, 20], "max": [15, 30], "axes": [1, 2]},
        {"label": "cord_injury", "slice": 12, "min": [10, 20], "max": [15, 30], "axes": [1, 2]},
    ]
    volume, boxes_path = simple_patient(tmp_path, boxes)
    out = tmp_path / "slices"
    coco = write_patient_slices(volume, boxes_path, out, make_config(half_width=1))

    assert [image["slice_index"] for image in coco["images"]] == [3, 4, 5]
    assert [image["file_name"] for image in coco["images"]] == [
        f"sub-P2/sub-P2_slice-0{k}.png" for k in (3, 4, 5)
    ]
    image4 = next(image for image in coco["images"] if image["slice_index"] == 4)
    assert (image4["width"], image4["height"]) == (32, 48)
    kept = sorted((a["category_id"], a["bbox"]) for a in coco["annotations"])
    # Anterior (high voxel index on axis 1) goes left: x = 32 - max; superior goes up: y = 48 - max.
    assert kept == [
        (1, [17.0, 18.0, 5.0, 10.0]),
        (2, [29.0, 0.0, 3.0, 8.0]),  # clipped at the posterior and superior edges
    ]
    for annotation in coco["annotations"]:
        assert annotation["area"] == annotation["bbox"][2] * annotation["bbox"][3]
        assert annotation["iscrowd"] == 0

    dropped = read_dropped(out / "sub-P2" / "dropped_boxes.csv")
    reasons = {(row["label"], row["volume_slice"]): row["reason"] for row in dropped}
    assert reasons == {
        ("disc_herniation", "3"): "smaller_than_min_box_px",
        ("disc_herniation", "5"): "outside_image",
        ("fracture", "4"): "unknown_label",
        ("disc_herniation", "0"): "outside_window",
        ("cord_injury", "12"): "slice_out_of_range",
    }


def test_annotated_mode_writes_only_annotated_slices(tmp_path):
    boxes = [
        {"label": "cord_injury", "slice": 1, "min": [10, 20], "max": [15, 30], "axes": [1, 2]},
        {"label": "cord_injury", "slice": 7, "min": [10, 20], "max": [15, 30], "axes": [1, 2]},
        {"label": "cord_injury", "slice": 7, "min": [1, 2], "max": [6, 9], "axes": [1, 2]},
    ]
    volume, boxes_path = simple_patient(tmp_path, boxes)
    coco = write_patient_slices(volume, boxes_path, tmp_path / "slices", make_config(mode="annotated"))
    assert [image["slice_index"] for image in coco["images"]] == [1, 7]
    assert [a["image_id"] for a in coco["annotations"]] == [1, 2, 2]
    assert [a["id"] for a in coco["annotations"]] == [1, 2, 3]
    assert read_dropped(tmp_path / "slices" / "sub-P2" / "dropped_boxes.csv") == []


def test_normal_patient_gets_the_mid_window_without_boxes(tmp_path):
    volume, boxes_path = simple_patient(tmp_path, [], pseudonym="N1", group="normal")
    out = tmp_path / "slices"
    coco = write_patient_slices(volume, boxes_path, out, make_config(half_width=2))
    assert [image["slice_index"] for image in coco["images"]] == [2, 3, 4, 5, 6]
    assert {image["group"] for image in coco["images"]} == {"normal"}
    assert {image["patient"] for image in coco["images"]} == {"N1"}
    assert coco["annotations"] == []
    assert (out / "sub-N1" / "dropped_boxes.csv").read_text() == ",".join(DROPPED_COLUMNS) + "\n"

    annotated = write_patient_slices(volume, boxes_path, out, make_config(mode="annotated"))
    assert annotated["images"] == []
    assert sorted(p.name for p in (out / "sub-N1").iterdir()) == ["coco.json", "dropped_boxes.csv"]


def test_outputs_are_deterministic_and_carry_no_metadata(tmp_path):
    affine, shape = phantom_affine((1, 2, 0), (1, -1, -1), (4.0, 0.0, 0.0))
    labels = phantom_labels(affine, shape)
    noisy = labels * 100 + np.random.default_rng(0).normal(0, 5, shape)
    volume, boxes_path = write_patient(tmp_path, "P3", noisy, affine, lesion_boxes(labels, 2), 2)
    config = make_config(window_percentiles=[1.0, 99.0])
    first, second = tmp_path / "first", tmp_path / "second"
    write_patient_slices(volume, boxes_path, first, config)
    write_patient_slices(volume, boxes_path, second, config)

    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert len(files) == 7 + 2
    for relative in files:
        assert (first / relative).read_bytes() == (second / relative).read_bytes(), relative
    for png in first.rglob("*.png"):
        with Image.open(png) as image:
            assert image.format == "PNG" and image.mode == "L"
            assert image.info == {}
            assert image.text == {}


def test_coco_loads_with_pycocotools_and_boxes_lie_inside_images(tmp_path, capsys):
    affine, shape = phantom_affine((0, 1, 2), (-1, 1, 1), (-6.0, 2.0, 4.0))
    labels = phantom_labels(affine, shape)
    boxes = lesion_boxes(labels, 0) + [
        {"label": "cord_injury", "slice": 3, "min": [-4, -4], "max": [10, 12], "axes": [1, 2]}
    ]
    volume, boxes_path = write_patient(tmp_path, "P4", labels, affine, boxes, 0)
    write_patient_slices(volume, boxes_path, tmp_path / "slices", make_config())

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        coco = COCO(str(tmp_path / "slices" / "sub-P4" / "coco.json"))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == CLASSES
    assert coco.getCatIds() == [1, 2]
    assert len(coco.getAnnIds()) == len(boxes)
    for annotation in coco.loadAnns(coco.getAnnIds()):
        image = coco.imgs[annotation["image_id"]]
        x, y, w, h = annotation["bbox"]
        assert 0 <= x < x + w <= image["width"]
        assert 0 <= y < y + h <= image["height"]


def test_slice_axis_that_is_not_left_right_is_an_error(tmp_path):
    boxes = [{"label": "cord_injury", "slice": 4, "min": [1, 1], "max": [5, 5], "axes": [0, 1]}]
    affine = np.diag([3.0, 1.0, 1.0, 1.0])
    volume, boxes_path = write_patient(tmp_path, "P5", np.ones((9, 32, 48)), affine, boxes, 2)
    with pytest.raises(SpinedetError, match="left-right"):
        write_patient_slices(volume, boxes_path, tmp_path / "slices", make_config())


def test_volume_of_another_patient_is_an_error(tmp_path):
    volume, _ = simple_patient(tmp_path, [], pseudonym="A1")
    _, other_boxes = simple_patient(tmp_path, [], pseudonym="B2")
    with pytest.raises(SpinedetError, match="sub-B2"):
        write_patient_slices(volume, other_boxes, tmp_path / "slices", make_config())


def test_cli_writes_the_rule_outputs(tmp_path):
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump({"slices": {"half_width": 1}}))
    boxes = [{"label": "disc_herniation", "slice": 4, "min": [10, 20], "max": [15, 30], "axes": [1, 2]}]
    simple_patient(tmp_path, boxes)
    participants = write_participants(tmp_path / "deid", {"P2": "disc"})
    out = tmp_path / "results" / "slices"
    argv = ["slices", "--config", str(config_path), "--participants", str(participants)]
    assert main([*argv, "--out", str(out)]) == 0
    coco = json.loads((out / "sub-P2" / "coco.json").read_text())
    assert len(coco["images"]) == 3 and len(coco["annotations"]) == 1
    assert (out / "sub-P2" / "dropped_boxes.csv").is_file()


def write_participants(deid: Path, groups: dict[str, str]) -> Path:
    path = deid / "participants.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("pseudonym,group\n" + "".join(f"{p},{g}\n" for p, g in groups.items()))
    return path


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_all_patients_in_one_call_give_the_same_files_for_any_worker_count(tmp_path):
    boxes = [{"label": "disc_herniation", "slice": 4, "min": [10, 20], "max": [15, 30], "axes": [1, 2]},
             {"label": "cord_injury", "slice": 0, "min": [10, 20], "max": [15, 30], "axes": [1, 2]}]
    for pseudonym, group in [("A1", "disc"), ("B2", "injured"), ("C3", "normal")]:
        simple_patient(tmp_path, boxes if group != "normal" else [], pseudonym=pseudonym, group=group)
    participants = write_participants(tmp_path / "deid", {"A1": "disc", "B2": "injured", "C3": "normal"})
    config = make_config()
    one, two = tmp_path / "one", tmp_path / "two"
    assert write_all_slices(participants, one, config, workers=1) == 3 * 7  # 9 slices, mid ± 3
    assert write_all_slices(participants, two, config, workers=2) == 3 * 7
    written = tree_bytes(one)
    assert written == tree_bytes(two)
    assert {name.split("/")[0] for name in written} == {"sub-A1", "sub-B2", "sub-C3"}
    # the same as one patient at a time
    single = tmp_path / "single"
    for pseudonym in ("A1", "B2", "C3"):
        deid = tmp_path / "deid" / f"sub-{pseudonym}"
        write_patient_slices(deid / "anat" / f"sub-{pseudonym}_T2w.nii.gz", deid / f"sub-{pseudonym}_boxes.json",
                             single, config)
    assert tree_bytes(single) == written


def test_a_participant_without_its_volume_or_no_participant_at_all_is_a_clear_error(tmp_path):
    empty = write_participants(tmp_path / "empty", {})
    with pytest.raises(SpinedetError, match="lists no patient: nothing to slice"):
        write_all_slices(empty, tmp_path / "out", make_config())
    simple_patient(tmp_path, [])
    participants = write_participants(tmp_path / "deid", {"P2": "disc", "Q9": "normal"})
    with pytest.raises(SpinedetError, match=r"lists sub-Q9, but .* holds 0 volumes, not 1: rerun deidentify"):
        write_all_slices(participants, tmp_path / "out", make_config())


# --------------------------------------------------------------------------
# Integration: synthetic export -> inventory -> convert -> deidentify -> slices


@pytest.fixture(scope="module")
def smoke_slices(smoke_export, tmp_path_factory):
    """Run the ingest stages and `spinedet slices` (every slice) on the smoke export."""
    work = tmp_path_factory.mktemp("slices_pipeline")
    results, restricted = work / "results", work / "restricted"
    config_path = work / "config.yaml"
    config_path.write_text(
        yaml.safe_dump(
            {
                "raw": str(smoke_export / "DICOM"),
                "annotations": str(smoke_export / "annotations.csv"),
                "cohort": str(smoke_export / "cohort.csv"),
                "results": str(results),
                "restricted": str(restricted),
                "demo": {"enabled": False},
                "slices": {"mode": "mid", "half_width": 50},
            }
        )
    )
    config = ["--config", str(config_path)]
    inventory = restricted / "inventory"
    steps = [
        ["inventory", *config, "--raw", str(smoke_export / "DICOM"), "--cohort", str(smoke_export / "cohort.csv"),
         "--out", str(inventory), "--summary", str(results / "inventory" / "summary.json")],
        ["convert", *config, "--series", str(inventory / "series.csv"), "--selection",
         str(inventory / "selection.csv"), "--out", str(restricted / "convert")],
        ["deidentify", *config, "--conversions", str(restricted / "convert" / "conversions.csv"),
         "--files", str(inventory / "files.csv"), "--selection", str(inventory / "selection.csv"),
         "--annotations", str(smoke_export / "annotations.csv"), "--restricted", str(restricted),
         "--out", str(results / "deid")],
    ]
    for argv in steps:
        assert main(argv) == 0, argv[0]
    subjects = sorted(p.name for p in (results / "deid").glob("sub-*"))
    argv = ["slices", *config, "--participants", str(results / "deid" / "participants.csv"),
            "--out", str(results / "slices")]
    assert main(argv) == 0
    return results, restricted, subjects


def dicom_in_canonical_order(truth, files_by_uid: dict[str, str]):
    """The target series' pixel arrays and lesion masks, put in the canonical display
    orientation from the DICOM geometry alone (independent of the NIfTI affine):
    slices left -> right, rows superior -> inferior, columns anterior -> posterior."""
    import pydicom

    row_dir, col_dir = truth.iop[:3], truth.iop[3:]
    normal = np.cross(row_dir, col_dir)
    # LPS: +x is the patient's left, +y posterior, +z superior.
    order = np.arange(len(truth.instance_numbers))
    if normal[0] * truth.slice_step > 0:  # spatial slice k moves to the left as k grows
        order = order[::-1]
    assert abs(row_dir[1]) > 0.9 and abs(col_dir[2]) > 0.9, "the smoke target series is sagittal"
    flip_columns, flip_rows = row_dir[1] < 0, col_dir[2] > 0

    def display(array):
        array = array[..., :, ::-1] if flip_columns else array
        return array[..., ::-1, :] if flip_rows else array

    pixels = np.stack(
        [pydicom.dcmread(files_by_uid[truth.sop_instance_uids[k]]).pixel_array.astype(float) for k in order]
    )
    return display(pixels), display(truth.masks[:, order])


def mask_box(mask: np.ndarray) -> list[float]:
    rows, cols = np.nonzero(mask)
    return [float(cols.min()), float(rows.min()), float(cols.max() + 1 - cols.min()), float(rows.max() + 1 - rows.min())]


def test_smoke_export_slices_are_canonical_and_boxes_cover_the_lesions(smoke_export, smoke_slices):
    from spinedet.demo.rendering import visible_slices
    from spinedet.demo.truth import load_truth

    results, restricted, subjects = smoke_slices
    with (restricted / "pseudonyms.csv").open() as fh:
        pseudonym_of = {row["patient_id"]: row["pseudonym"] for row in csv.DictReader(fh)}
    with (restricted / "inventory" / "files.csv").open() as fh:
        files_by_uid = {row["sop_instance_uid"]: row["path"] for row in csv.DictReader(fh) if row["status"] == "ok"}
    truths = load_truth(smoke_export)
    assert sorted(f"sub-{pseudonym_of[p]}" for p in truths) == subjects
    geometries = {(bool(t.iop[1] < 0), bool(np.abs(t.iop[[0, 2, 3, 4]]).max() > 1e-3)) for t in truths.values()}
    assert len(geometries) > 1, "the smoke export should mix row-flipped and oblique series"

    checked_boxes = 0
    for patient_id, truth in truths.items():
        pseudonym = pseudonym_of[patient_id]
        coco = json.loads((results / "slices" / f"sub-{pseudonym}" / "coco.json").read_text())
        dropped = read_dropped(results / "slices" / f"sub-{pseudonym}" / "dropped_boxes.csv")
        pixels, masks = dicom_in_canonical_order(truth, files_by_uid)
        assert len(coco["images"]) == len(pixels), "half_width 50 writes every slice"
        annotated = [visible_slices(lesion_masks) for lesion_masks in masks]  # the synthesizer's rule

        expected_boxes, written_boxes = set(), set()
        for image in coco["images"]:
            png = read_png(results / "slices" / image["file_name"]).astype(float)
            dicom = pixels[image["slice_index"]]
            assert png.shape == dicom.shape
            # The PNG is the DICOM slice through a clipped linear window: same orientation
            # correlates almost perfectly, any flip does not.
            correlation = {
                flip: np.corrcoef(png.ravel(), variant.ravel())[0, 1]
                for flip, variant in {
                    "none": dicom, "columns": dicom[:, ::-1], "rows": dicom[::-1, :], "both": dicom[::-1, ::-1]
                }.items()
            }
            assert correlation["none"] > 0.95, (pseudonym, image["slice_index"], correlation)
            assert correlation["none"] == max(correlation.values())
            # ... and it is that slice, not a neighbour (slices run left -> right).
            by_slice = [np.corrcoef(png.ravel(), other.ravel())[0, 1] for other in pixels]
            assert int(np.argmax(by_slice)) == image["slice_index"], (pseudonym, by_slice)

            for lesion, label in enumerate(truth.labels):
                if not annotated[lesion][image["slice_index"]]:
                    continue
                box = (CLASSES.index(label) + 1, *mask_box(masks[lesion, image["slice_index"]]))
                too_small = any(
                    row["label"] == label and int(row["slice_index"]) == image["slice_index"]
                    and row["reason"] == "smaller_than_min_box_px"
                    for row in dropped
                )
                if not too_small:
                    expected_boxes.add((image["id"], *box))
            written_boxes |= {
                (a["image_id"], a["category_id"], *a["bbox"]) for a in coco["annotations"] if a["image_id"] == image["id"]
            }
        assert written_boxes == expected_boxes, pseudonym
        checked_boxes += len(written_boxes)
    assert checked_boxes > 0


def test_smoke_slices_feed_the_split(smoke_slices, tmp_path):
    results, _, subjects = smoke_slices
    cocos = [results / "slices" / subject / "coco.json" for subject in subjects]
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump({"results": str(results), "restricted": str(tmp_path / "restricted")}))
    out = tmp_path / "split"
    assert main(["split", "--config", str(config_path), "--slices", str(results / "slices"), "--out", str(out)]) == 0
    with (out / "assignments.csv").open() as fh:
        assert sorted(f"sub-{row['patient']}" for row in csv.DictReader(fh)) == subjects
    images = 0
    for split in ("train", "val", "test"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            coco = COCO(str(out / f"{split}.json"))
        for image in coco.imgs.values():
            assert (results / "slices" / image["file_name"]).is_file()
        images += len(coco.imgs)
    assert images == sum(len(json.loads(Path(c).read_text())["images"]) for c in cocos)


def test_images_carry_their_pixel_spacing_from_the_affine(tmp_path):
    # Volume axes L->R (3 mm), P->A (0.7 mm), I->S (0.9 mm): canonical rows run
    # superior->inferior (0.9 mm), columns anterior->posterior (0.7 mm).
    affine = np.diag([3.0, 0.7, 0.9, 1.0])
    data = np.arange(9 * 32 * 48, dtype=np.float32).reshape(9, 32, 48)
    volume, boxes_path = write_patient(tmp_path, "P3", data, affine, [], 0, "normal")
    coco = write_patient_slices(volume, boxes_path, tmp_path / "slices", make_config(half_width=1))
    for image in coco["images"]:
        assert (image["height"], image["width"]) == (48, 32)
        assert image["pixel_height_mm"] == pytest.approx(0.9)
        assert image["pixel_width_mm"] == pytest.approx(0.7)
