"""`spinedet split`: patient-level stratified split, merged COCO, folds."""

from __future__ import annotations

import csv
import json
import logging
import random
import warnings
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from pycocotools.coco import COCO

from spinedet import SpinedetError
from spinedet.cli import main
from spinedet.dataset.split import SPLITS, allocate_counts, largest_remainder, write_split

CLASSES = ["disc_herniation", "cord_injury"]
GROUPS = ["disc", "injured", "normal"]
FRACTIONS = {"train": 0.7, "val": 0.1, "test": 0.2}


def make_config(seed=20200901, folds=0, fractions=FRACTIONS) -> dict:
    return {
        "seed": seed,
        "classes": CLASSES,
        "groups": GROUPS,
        "split": {"fractions": dict(fractions), "folds": folds},
    }


def write_patient_coco(slices_dir: Path, patient: str, group: str, n_images: int = 3) -> Path:
    """A per-patient COCO like `spinedet slices` writes, with one box per lesion image."""
    images, annotations = [], []
    for image_id, slice_index in enumerate(range(4, 4 + n_images), start=1):
        images.append(
            {
                "id": image_id,
                "file_name": f"sub-{patient}/sub-{patient}_slice-{slice_index:02d}.png",
                "width": 64,
                "height": 80,
                "patient": patient,
                "group": group,
                "slice_index": slice_index,
            }
        )
        if group != "normal":
            category = 1 if group == "disc" else 2
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category,
                    "bbox": [10.0, 12.0 + slice_index, 8.0, 6.0],
                    "area": 48.0,
                    "iscrowd": 0,
                }
            )
    coco = {
        "info": {"patient": patient, "group": group, "slice_mode": "mid"},
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": i, "name": name, "supercategory": "lesion"} for i, name in enumerate(CLASSES, start=1)
        ],
    }
    path = slices_dir / f"sub-{patient}" / "coco.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(coco, sort_keys=True, indent=1))
    return path


def make_cohort(slices_dir: Path, sizes: dict[str, int]) -> list[Path]:
    paths = []
    for group, size in sizes.items():
        for i in range(size):
            paths.append(write_patient_coco(slices_dir, f"{group[:2]}{i:03d}x", group))
    return paths


def read_csv(path: Path) -> list[dict]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


def check_group_targets(assignments: list[dict], fractions=FRACTIONS) -> None:
    for group in {row["group"] for row in assignments}:
        size = sum(row["group"] == group for row in assignments)
        for split in SPLITS:
            count = sum(row["group"] == group and row["split"] == split for row in assignments)
            assert abs(count - fractions[split] * size) <= 1, (group, split, count, size)


@settings(max_examples=300, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=0, max_value=80), min_size=1, max_size=6),
    train=st.integers(min_value=1, max_value=98),
    val=st.integers(min_value=0, max_value=98),
)
def test_allocation_meets_every_group_target_within_one(sizes, train, val):
    val = min(val, 99 - train)
    fractions = {"train": train / 100, "val": val / 100, "test": (100 - train - val) / 100}
    group_sizes = {f"g{i}": n for i, n in enumerate(sizes)}
    counts = allocate_counts(group_sizes, fractions)
    for group, size in group_sizes.items():
        assert sum(counts[group].values()) == size
        for split in SPLITS:
            assert counts[group][split] >= 0
            assert abs(counts[group][split] - fractions[split] * size) <= 1
    totals = {s: sum(counts[g][s] for g in counts) for s in SPLITS}
    n = sum(sizes)
    assert totals == largest_remainder({s: fractions[s] * n for s in SPLITS}, n)


def test_largest_remainder():
    assert largest_remainder({"train": 7.0, "val": 1.0, "test": 2.0}, 10) == {"train": 7, "val": 1, "test": 2}
    assert largest_remainder({"train": 5.6, "val": 0.8, "test": 1.6}, 8) == {"train": 6, "val": 1, "test": 1}


def test_cohort_split_is_complete_disjoint_and_stratified(tmp_path):
    slices_dir = tmp_path / "slices"
    paths = make_cohort(slices_dir, {"disc": 32, "injured": 8, "normal": 20})
    out = tmp_path / "split"
    assignment = write_split(paths, out, make_config())

    rows = read_csv(out / "assignments.csv")
    assert [row["patient"] for row in rows] == sorted(assignment)
    assert len(rows) == len({row["patient"] for row in rows}) == 60
    check_group_targets(rows)

    seen_patients: dict[str, str] = {}
    for split in SPLITS:
        merged = json.loads((out / f"{split}.json").read_text())
        patients = {image["patient"] for image in merged["images"]}
        assert patients == {row["patient"] for row in rows if row["split"] == split}
        for patient in patients:
            assert patient not in seen_patients, f"{patient} in {seen_patients.get(patient)} and {split}"
            seen_patients[patient] = split
        image_ids = [image["id"] for image in merged["images"]]
        assert image_ids == list(range(1, len(image_ids) + 1))
        annotation_ids = [a["id"] for a in merged["annotations"]]
        assert annotation_ids == list(range(1, len(annotation_ids) + 1))
        assert [(i["patient"], i["slice_index"]) for i in merged["images"]] == sorted(
            (i["patient"], i["slice_index"]) for i in merged["images"]
        )
        for image in merged["images"]:
            assert (slices_dir / image["file_name"]).parent.is_dir()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            coco = COCO(str(out / f"{split}.json"))
        for annotation in coco.loadAnns(coco.getAnnIds()):
            image = coco.imgs[annotation["image_id"]]
            assert image["patient"] in patients
            x, y, w, h = annotation["bbox"]
            assert 0 <= x < x + w <= image["width"] and 0 <= y < y + h <= image["height"]
        # Every lesion patient brings its three boxes along.
        assert len(coco.getAnnIds()) == 3 * sum(1 for p in patients if not p.startswith("no"))
    assert len(seen_patients) == 60

    counts = read_csv(out / "group_counts.csv")
    assert [row["group"] for row in counts] == [*GROUPS, "total"]
    for row in counts[:-1]:
        for split in SPLITS:
            expected = sum(r["group"] == row["group"] and r["split"] == split for r in rows)
            assert int(row[split]) == expected
        assert int(row["total"]) == sum(r["group"] == row["group"] for r in rows)
    assert {s: int(counts[-1][s]) for s in SPLITS} == {"train": 42, "val": 6, "test": 12}


def test_groups_where_two_stage_sklearn_misses_the_target(tmp_path):
    # sklearn's two-stage stratified train_test_split puts 11 of the 18 in train (target 12.6).
    paths = make_cohort(tmp_path / "slices", {"disc": 2, "injured": 3, "normal": 18})
    write_split(paths, tmp_path / "split", make_config(seed=0))
    check_group_targets(read_csv(tmp_path / "split" / "assignments.csv"))


def test_tiny_groups_are_split_with_a_warning(tmp_path, caplog):
    paths = make_cohort(tmp_path / "slices", {"disc": 5, "injured": 1, "normal": 4})
    with caplog.at_level(logging.WARNING, logger="spinedet.dataset.split"):
        write_split(paths, tmp_path / "split", make_config())
    rows = read_csv(tmp_path / "split" / "assignments.csv")
    check_group_targets(rows)
    assert "group injured has 1 patient(s)" in caplog.text
    # The cohort's split sizes are still its rounded targets: 7 / 1 / 2, so val is not empty.
    assert [sum(r["split"] == s for r in rows) for s in SPLITS] == [7, 1, 2]


def test_reruns_are_byte_identical_whatever_the_input_order(tmp_path):
    paths = make_cohort(tmp_path / "slices", {"disc": 13, "injured": 4, "normal": 9})
    shuffled = list(paths)
    random.Random(1).shuffle(shuffled)
    write_split(paths, tmp_path / "first", make_config(folds=3))
    write_split(shuffled, tmp_path / "second", make_config(folds=3))
    names = sorted(str(p.relative_to(tmp_path / "first")) for p in (tmp_path / "first").rglob("*") if p.is_file())
    assert names == ["assignments.csv", *(f"fold{k}/{part}.json" for k in range(3) for part in ("train", "val")),
                     "group_counts.csv", "test.json", "train.json", "val.json"]
    for name in names:
        assert (tmp_path / "first" / name).read_bytes() == (tmp_path / "second" / name).read_bytes()

    other_seed = write_split(paths, tmp_path / "third", make_config(seed=1))
    first = {r["patient"]: r["split"] for r in read_csv(tmp_path / "first" / "assignments.csv")}
    assert other_seed != first


def test_folds_cover_train_and_val_stratified(tmp_path):
    paths = make_cohort(tmp_path / "slices", {"disc": 20, "injured": 7, "normal": 13})
    write_split(paths, tmp_path / "split", make_config(folds=4))
    rows = read_csv(tmp_path / "split" / "assignments.csv")
    assert list(rows[0]) == ["patient", "group", "split", "fold"]
    for row in rows:
        assert (row["fold"] == "") == (row["split"] == "test")
    for group in GROUPS:
        per_fold = [sum(r["group"] == group and r["fold"] == str(k) for r in rows) for k in range(4)]
        assert max(per_fold) - min(per_fold) <= 1, (group, per_fold)
    assert {r["fold"] for r in rows if r["split"] != "test"} == {"0", "1", "2", "3"}
    # fold k: trained on the other folds of train+val, validated on fold k; test patients in neither
    for k in range(4):
        train = {img["patient"] for img in json.loads((tmp_path / "split" / f"fold{k}" / "train.json").read_text())["images"]}
        val = {img["patient"] for img in json.loads((tmp_path / "split" / f"fold{k}" / "val.json").read_text())["images"]}
        assert val == {r["patient"] for r in rows if r["fold"] == str(k)}
        assert train == {r["patient"] for r in rows if r["fold"] not in ("", str(k))}


def test_no_fold_column_without_folds(tmp_path):
    paths = make_cohort(tmp_path / "slices", {"disc": 4, "injured": 2, "normal": 4})
    write_split(paths, tmp_path / "split", make_config())
    assert (tmp_path / "split" / "assignments.csv").read_text().splitlines()[0] == "patient,group,split"


def test_bad_folds_are_errors(tmp_path):
    paths = make_cohort(tmp_path / "slices", {"disc": 3, "injured": 1, "normal": 2})
    with pytest.raises(SpinedetError, match="split.folds"):
        write_split(paths, tmp_path / "split", make_config(folds=1))
    with pytest.raises(SpinedetError, match="split.folds = 9"):
        write_split(paths, tmp_path / "split", make_config(folds=9))


def test_patients_without_images_are_left_out(tmp_path):
    paths = make_cohort(tmp_path / "slices", {"disc": 6, "injured": 2, "normal": 0})
    paths.append(write_patient_coco(tmp_path / "slices", "empty01", "normal", n_images=0))
    write_split(paths, tmp_path / "split", make_config())
    rows = read_csv(tmp_path / "split" / "assignments.csv")
    assert len(rows) == 8 and "empty01" not in {r["patient"] for r in rows}
    counts = {r["group"]: r for r in read_csv(tmp_path / "split" / "group_counts.csv")}
    assert counts["normal"]["total"] == "0"


def test_inconsistent_inputs_are_errors(tmp_path):
    slices_dir = tmp_path / "slices"
    paths = make_cohort(slices_dir, {"disc": 3, "injured": 1, "normal": 2})
    duplicate = write_patient_coco(tmp_path / "copy", "di000x", "disc")
    with pytest.raises(SpinedetError, match="more than one COCO"):
        write_split([*paths, duplicate], tmp_path / "split", make_config())

    stranger = write_patient_coco(tmp_path / "other", "zz001", "fracture")
    with pytest.raises(SpinedetError, match="fracture"):
        write_split([*paths, stranger], tmp_path / "split", make_config())

    config = make_config()
    config["classes"] = ["cord_injury", "disc_herniation"]
    with pytest.raises(SpinedetError, match="categories"):
        write_split(paths, tmp_path / "split", config)

    config = make_config(fractions={"train": 0.7, "val": 0.2, "test": 0.2})
    with pytest.raises(SpinedetError, match="sum to 1"):
        write_split(paths, tmp_path / "split", config)


def test_cli_writes_the_rule_outputs(tmp_path):
    slices = tmp_path / "results" / "slices"
    make_cohort(slices, {"disc": 4, "injured": 2, "normal": 4})
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump({"seed": 5, "split": {"folds": 2}}))
    out = tmp_path / "results" / "split"
    assert main(["split", "--config", str(config_path), "--slices", str(slices), "--out", str(out)]) == 0
    for name in ("train.json", "val.json", "test.json", "assignments.csv", "group_counts.csv"):
        assert (out / name).is_file()
    assert len(read_csv(out / "assignments.csv")) == 10


def test_cli_refuses_a_slices_folder_without_coco_files(tmp_path, caplog):
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump({"seed": 5}))
    (tmp_path / "slices").mkdir()
    argv = ["split", "--config", str(config_path), "--slices", str(tmp_path / "slices"), "--out", str(tmp_path / "split")]
    assert main(argv) == 2
    assert "holds no sub-*/coco.json: run `spinedet slices` first" in caplog.text
