"""`spinedet split`: patient-level train/val/test split, stratified by group.

Reads every patient's `coco.json` under `--slices` (`sub-*/coco.json`, from
`spinedet slices`) and writes, under
`--out` (= `results/split`):

- `assignments.csv`: `patient, group, split` (+ `fold` when `split.folds` >= 2),
  one row per patient with images, sorted by patient;
- `train.json`, `val.json`, `test.json`: merged COCO, image and annotation
  ids renumbered 1.. in (patient, slice_index) order, `file_name` unchanged
  (relative to `results/slices`);
- `group_counts.csv`: patients per group (rows, in config `groups` order,
  plus a `total` row) and split (columns `train, val, test, total`).

How patients are split. A patient's group is the `group` of its COCO
images. Every group's count in every split is within +-1 of its target
(fraction x group size), and the split sizes are the cohort's targets
rounded (largest remainder). scikit-learn's stratified splitters do not
guarantee the per-group bound: the two-stage `train_test_split(...,
stratify=...)` (test first, then val from the rest) puts, for groups of
2, 3 and 18 patients with 70/10/20, 11 of the 18 in train (target 12.6),
and it refuses groups of a single patient. So the counts per group and
split are allocated here (`allocate_counts`): each group's targets are
floored and the leftover patients go, one per split at most, to the splits
that still lack patients overall (larger fractional remainders first; ties
in the order train, val, test). This always succeeds and never moves a
count more than one from its target. A group too small to reach every
split (e.g. 1 or 2 patients) is handled the same way: its patients go
where the rounding puts them, some splits get none of that group, and a
warning says which. scikit-learn's `train_test_split` with the fixed
`seed` then draws which patients of a group fill those counts.

Patients whose COCO holds no images (e.g. normal patients when
`slices.mode` is `annotated`) contribute nothing to any split and are left
out, with a log line.

Folds (`split.folds` = k >= 2): `StratifiedKFold(k, shuffle, seed)` over the
train+val patients, stratified by group; test patients stay held out and
have an empty `fold`. For each fold i, `fold{i}/train.json` holds the
train+val patients of the other folds and `fold{i}/val.json` those of fold i.

Same inputs and seed give byte-identical outputs (the order the COCO files
are read in does not matter).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import warnings
from pathlib import Path

from sklearn.model_selection import StratifiedKFold, train_test_split
from tqdm import tqdm

from spinedet import SpinedetError
from spinedet.io import write_csv, write_json

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


def read_patient_coco(path: Path) -> dict:
    """One patient's COCO, checked: all images of one patient and one group."""
    path = Path(path)
    try:
        coco = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SpinedetError(f"cannot read COCO file {path}: {exc}") from exc
    for key in ("images", "annotations", "categories"):
        if key not in coco:
            raise SpinedetError(f"COCO file {path} lacks '{key}'")
    patients = {image["patient"] for image in coco["images"]}
    groups = {image["group"] for image in coco["images"]}
    if len(patients) > 1 or len(groups) > 1:
        raise SpinedetError(
            f"COCO file {path} mixes patients {sorted(patients)} or groups {sorted(groups)}"
        )
    return coco


def check_fractions(fractions: dict) -> dict[str, float]:
    if set(fractions) != set(SPLITS):
        raise SpinedetError(f"config split.fractions must have keys {list(SPLITS)}, got {sorted(fractions)}")
    values = {name: float(fractions[name]) for name in SPLITS}
    if any(value < 0 for value in values.values()) or not math.isclose(sum(values.values()), 1.0, abs_tol=1e-6):
        raise SpinedetError(f"config split.fractions must be >= 0 and sum to 1, got {values}")
    total = sum(values.values())
    return {name: value / total for name, value in values.items()}


def largest_remainder(targets: dict[str, float], total: int) -> dict[str, int]:
    """Round `targets` (summing to `total`) to integers summing to `total`."""
    counts = {name: math.floor(value + 1e-9) for name, value in targets.items()}
    # Remainders are rounded so that float noise (5.6 - 5 < 1.6 - 1) does not break ties.
    order = sorted(targets, key=lambda name: (-round(targets[name] - counts[name], 9), SPLITS.index(name)))
    for name in order[: total - sum(counts.values())]:
        counts[name] += 1
    return counts


def allocate_counts(group_sizes: dict[str, int], fractions: dict[str, float]) -> dict[str, dict[str, int]]:
    """Patients per group and split: each within +-1 of fraction x group size,
    split totals equal to the cohort's rounded targets (see the module docstring)."""
    targets = {g: {s: fractions[s] * n for s in SPLITS} for g, n in group_sizes.items()}
    counts = {g: {s: math.floor(t + 1e-9) for s, t in row.items()} for g, row in targets.items()}
    split_totals = largest_remainder(
        {s: fractions[s] * sum(group_sizes.values()) for s in SPLITS}, sum(group_sizes.values())
    )
    still_needed = {s: split_totals[s] - sum(counts[g][s] for g in counts) for s in SPLITS}
    leftover = {g: group_sizes[g] - sum(counts[g].values()) for g in counts}
    # Ryser's construction of a 0/1 matrix with given row and column sums:
    # groups with most leftovers first, each into the splits that need most.
    for group in sorted(counts, key=lambda g: (-leftover[g], g)):
        remainder = {s: round(targets[group][s] - counts[group][s], 9) for s in SPLITS}
        chosen = sorted(SPLITS, key=lambda s: (-still_needed[s], -remainder[s], SPLITS.index(s)))
        for split in chosen[: leftover[group]]:
            counts[group][split] += 1
            still_needed[split] -= 1
    return counts


def draw(members: list[str], count: int, seed: int) -> tuple[list[str], list[str]]:
    """Draw `count` of `members` with scikit-learn; return (drawn, rest), both sorted."""
    if count == 0:
        return [], sorted(members)
    if count == len(members):
        return sorted(members), []
    rest, drawn = train_test_split(sorted(members), test_size=count, random_state=seed, shuffle=True)
    return sorted(drawn), sorted(rest)


def assign_splits(patient_groups: dict[str, str], fractions: dict[str, float], seed: int) -> dict[str, str]:
    """Patient -> split, stratified by group with per-group counts from allocate_counts."""
    by_group: dict[str, list[str]] = {}
    for patient, group in sorted(patient_groups.items()):
        by_group.setdefault(group, []).append(patient)
    counts = allocate_counts({g: len(p) for g, p in by_group.items()}, fractions)
    assignment = {}
    for group, members in sorted(by_group.items()):
        test, rest = draw(members, counts[group]["test"], seed)
        val, train = draw(rest, counts[group]["val"], seed)
        for split, patients in (("train", train), ("val", val), ("test", test)):
            assignment.update({patient: split for patient in patients})
        missing = [s for s in SPLITS if fractions[s] > 0 and counts[group][s] == 0]
        if missing:
            log.warning(
                "group %s has %d patient(s): none in %s", group, len(members), ", ".join(missing)
            )
    return assignment


def assign_folds(
    patient_groups: dict[str, str], assignment: dict[str, str], folds: int, seed: int
) -> dict[str, int]:
    """Cross-validation fold (0..folds-1) of each train+val patient, stratified by group."""
    patients = sorted(p for p, split in assignment.items() if split != "test")
    if folds > len(patients):
        raise SpinedetError(f"config split.folds = {folds} but only {len(patients)} train+val patients")
    groups = [patient_groups[p] for p in patients]
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    fold_of = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for fold, (_, held_out) in enumerate(splitter.split(patients, groups)):
            fold_of.update({patients[i]: fold for i in held_out})
    for warning in caught:
        log.warning("folds: %s", warning.message)
    return fold_of


def merge_cocos(cocos: list[dict], categories: list[dict], split_name: str) -> dict:
    """One COCO from per-patient COCOs: images in (patient, slice_index) order, ids renumbered."""
    images, annotations = [], []
    for coco in sorted(cocos, key=lambda c: c["images"][0]["patient"]):
        new_image_id = {}
        for image in sorted(coco["images"], key=lambda i: (i["slice_index"], i["file_name"])):
            new_image_id[image["id"]] = len(images) + 1
            images.append({**image, "id": len(images) + 1})
        for annotation in sorted(coco["annotations"], key=lambda a: (new_image_id[a["image_id"]], a["id"])):
            annotations.append(
                {**annotation, "id": len(annotations) + 1, "image_id": new_image_id[annotation["image_id"]]}
            )
    return {
        "info": {"split": split_name},
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }


def write_split(coco_paths: list[Path], out_dir: Path, config: dict) -> dict[str, str]:
    """Split the patients of `coco_paths` and write the outputs; return patient -> split."""
    fractions = check_fractions(config["split"]["fractions"])
    folds = int(config["split"].get("folds", 0))
    if folds == 1:
        raise SpinedetError("config split.folds must be 0 (no folds) or at least 2")
    groups = list(config["groups"])
    classes = list(config["classes"])
    expected_categories = [{"id": i, "name": name} for i, name in enumerate(classes, start=1)]

    patient_cocos: dict[str, dict] = {}
    for path in tqdm(sorted(Path(p) for p in coco_paths), desc="reading COCO files", unit="patient"):
        coco = read_patient_coco(path)
        if not coco["images"]:
            log.info("%s holds no images: left out of the split", path.parent.name)
            continue
        patient, group = coco["images"][0]["patient"], coco["images"][0]["group"]
        if patient in patient_cocos:
            raise SpinedetError(f"patient {patient} appears in more than one COCO file ({path})")
        if group not in groups:
            raise SpinedetError(f"{path}: group {group!r} is not in config groups {groups}")
        categories = [{"id": c["id"], "name": c["name"]} for c in coco["categories"]]
        if categories != expected_categories:
            raise SpinedetError(f"{path}: categories {categories} do not match config classes {classes}")
        patient_cocos[patient] = coco
    if not patient_cocos:
        raise SpinedetError("no patient has any image: nothing to split")

    categories = next(iter(patient_cocos.values()))["categories"]
    patient_groups = {p: c["images"][0]["group"] for p, c in patient_cocos.items()}
    assignment = assign_splits(patient_groups, fractions, int(config["seed"]))
    fold_of = assign_folds(patient_groups, assignment, folds, int(config["seed"])) if folds else {}

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_assignments(out_dir / "assignments.csv", patient_groups, assignment, fold_of if folds else None)
    write_group_counts(out_dir / "group_counts.csv", patient_groups, assignment, groups)
    for split in SPLITS:
        cocos = [patient_cocos[p] for p in sorted(patient_cocos) if assignment[p] == split]
        merged = merge_cocos(cocos, categories, split)
        write_json(out_dir / f"{split}.json", merged, sort_keys=True)
        log.info(
            "%s: %d patients, %d images, %d boxes",
            split,
            len(cocos),
            len(merged["images"]),
            len(merged["annotations"]),
        )
    for fold in range(folds):
        # fold i: trained on the other folds of train+val, selected on fold i
        for part, patients in (("train", [p for p in fold_of if fold_of[p] != fold]),
                               ("val", [p for p in fold_of if fold_of[p] == fold])):
            merged = merge_cocos([patient_cocos[p] for p in sorted(patients)], categories, f"fold{fold}_{part}")
            write_json(out_dir / f"fold{fold}" / f"{part}.json", merged, sort_keys=True)
        log.info("fold %d: %d train, %d val patients", fold, sum(f != fold for f in fold_of.values()),
                 sum(f == fold for f in fold_of.values()))
    return assignment


def write_assignments(path: Path, patient_groups, assignment, fold_of: dict[str, int] | None) -> None:
    columns = ["patient", "group", "split"] + (["fold"] if fold_of is not None else [])
    rows = [{"patient": patient, "group": patient_groups[patient], "split": assignment[patient],
             "fold": "" if fold_of is None else fold_of.get(patient, "")}
            for patient in sorted(assignment)]
    write_csv(path, rows, columns)


def write_group_counts(path: Path, patient_groups, assignment, groups: list[str]) -> None:
    rows = []
    for group in [*groups, "total"]:
        counts = {split: sum(1 for p, s in assignment.items() if s == split and group in ("total", patient_groups[p]))
                  for split in SPLITS}
        rows.append({"group": group, **counts, "total": sum(counts.values())})
    write_csv(path, rows, ["group", *SPLITS, "total"])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from spinedet.config import add_config_argument

    add_config_argument(parser)
    parser.add_argument("--slices", required=True, type=Path,
                        help="slices root holding sub-<p>/coco.json (results/slices)")
    parser.add_argument("--out", required=True, type=Path, help="split folder, e.g. results/split")


def run(args: argparse.Namespace) -> int:
    from spinedet.config import load

    config = load(args.config)
    cocos = sorted(args.slices.glob("sub-*/coco.json"))
    if not cocos:
        raise SpinedetError(f"{args.slices} holds no sub-*/coco.json: run `spinedet slices` first")
    write_split(cocos, args.out, config)
    return 0
