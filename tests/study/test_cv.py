"""`spinedet cv`: the cross-validation summary and the fold ensemble."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from spinedet import cli
from spinedet.study import cv

REPO = Path(__file__).resolve().parents[2]
CLASSES = ["disc_herniation", "cord_injury"]


def det(image_id: int, category_id: int, bbox: list[float], score: float) -> dict:
    return {"image_id": image_id, "category_id": category_id, "bbox": bbox, "score": score}


def test_the_ensemble_keeps_the_best_of_overlapping_boxes_per_class():
    fold_a = [det(1, 1, [10, 10, 20, 20], 0.9), det(1, 2, [10, 10, 20, 20], 0.4), det(2, 1, [0, 0, 5, 5], 0.3)]
    fold_b = [det(1, 1, [11, 10, 20, 20], 0.95), det(1, 1, [60, 60, 10, 10], 0.5)]
    merged = cv.ensemble_detections([fold_a, fold_b])
    assert sorted(merged, key=lambda d: (d["image_id"], -d["score"])) == [
        fold_b[0], fold_b[1], fold_a[1], fold_a[2]]  # fold_a's 0.9 box lies under fold_b's 0.95 one


def cv_test_split():
    """One lesion per slice on 4 slices; fold 0 finds all, fold 1 finds half."""
    images = [{"id": k, "file_name": f"sub-p{k}/s.png", "width": 64, "height": 64, "patient": f"p{k}"}
              for k in range(1, 5)]
    annotations = [{"id": k, "image_id": k, "category_id": 1, "bbox": [10, 10, 20, 20], "area": 400, "iscrowd": 0}
                   for k in range(1, 5)]
    test = {"images": images, "annotations": annotations,
            "categories": [{"id": 1, "name": CLASSES[0]}, {"id": 2, "name": CLASSES[1]}]}
    return test


def write_folds(tmp_path: Path) -> tuple[Path, list[Path], list[Path]]:
    test = cv_test_split()
    (tmp_path / "test.json").write_text(json.dumps(test))
    fold_detections = [[det(k, 1, [10, 10, 20, 20], 0.9) for k in range(1, 5)],
                       [det(k, 1, [10, 10, 20, 20], 0.8) for k in (1, 2)] + [det(3, 1, [40, 40, 10, 10], 0.95)]]
    metrics_paths, detection_paths = [], []
    for model in ("resnet50", "vgg16"):
        for fold, detections in enumerate(fold_detections):
            folder = tmp_path / model / f"fold{fold}"
            folder.mkdir(parents=True)
            (folder / "detections.json").write_text(json.dumps(detections))
            summary = {"ap50": 1.0 if fold == 0 else 0.5, "ap50_per_class": {CLASSES[0]: 1.0 if fold == 0 else 0.5,
                                                                            CLASSES[1]: None}}
            (folder / "metrics.json").write_text(json.dumps(summary))
            metrics_paths.append(folder / "metrics.json")
            detection_paths.append(folder / "detections.json")
    return tmp_path / "test.json", metrics_paths, detection_paths


def test_cv_writes_mean_sd_over_folds_and_the_ensemble(tmp_path):
    test, metrics_paths, detection_paths = write_folds(tmp_path)
    code = cli.main(["cv", "--config", str(REPO / "config.yaml"), '{"split": {"folds": 2}}',
                     "--models", "resnet50", "vgg16", "--metrics", *map(str, metrics_paths),
                     "--detections", *map(str, detection_paths), "--test", str(test),
                     "--summary", str(tmp_path / "cv_summary.csv"), "--ensemble", str(tmp_path / "cv_ensemble.json")])
    assert code == 0
    lines = (tmp_path / "cv_summary.csv").read_text().splitlines()
    header = lines[0].split(",")
    assert header[:4] == ["model", "folds", "ap50_mean", "ap50_sd"] and "ensemble_ap50" in header
    row = dict(zip(header, lines[1].split(",")))
    assert row["model"] == "resnet50" and row["folds"] == "2"
    assert float(row["ap50_mean"]) == 0.75 and float(row["ap50_sd"]) == pytest.approx(0.3535534, abs=1e-6)
    assert row["ap50_cord_injury_mean"] == "" and row["ap50_cord_injury_sd"] == ""
    # fold 0 finds every lesion; pooled with fold 1, its boxes stay on top where they overlap: AP50 1.0
    # except that fold 1's false box at 0.95 on slice 3 now ranks first
    ensemble = json.loads((tmp_path / "cv_ensemble.json").read_text())
    assert ensemble["models"]["resnet50"]["folds"] == 2 and "non-maximum suppression" in ensemble["method"]
    assert float(row["ensemble_ap50"]) == ensemble["models"]["resnet50"]["ap50"]
    assert 0.7 < ensemble["models"]["resnet50"]["ap50"] < 1.0


def test_cv_refuses_a_missing_fold(tmp_path, caplog):
    test, metrics_paths, detection_paths = write_folds(tmp_path)
    code = cli.main(["cv", "--config", str(REPO / "config.yaml"), '{"split": {"folds": 2}}',
                     "--models", "resnet50", "vgg16", "--metrics", *map(str, metrics_paths[:3]),
                     "--detections", *map(str, detection_paths), "--test", str(test),
                     "--summary", str(tmp_path / "s.csv"), "--ensemble", str(tmp_path / "e.json")])
    assert code == 2 and "need 4 --metrics and --detections files, got 3 and 4" in caplog.text
