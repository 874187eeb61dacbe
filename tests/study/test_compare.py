"""`spinedet compare`: the paired comparison of every model pair, written as comparison.json."""

from __future__ import annotations

import json
from pathlib import Path

from spinedet import cli

REPO = Path(__file__).resolve().parents[2]


def write_study(tmp_path: Path, patients: int = 10) -> tuple[Path, dict[str, Path]]:
    """A test split with one herniation per patient and three models' detections:
    `finder` finds every lesion, `twin` is the same, `blind` finds none."""
    images = [{"id": p + 1, "file_name": f"sub-p{p}/sub-p{p}_slice-01.png", "width": 64, "height": 64,
               "patient": f"p{p}", "group": "disc", "slice_index": 1} for p in range(patients)]
    annotations = [{"id": p + 1, "image_id": p + 1, "category_id": 1, "bbox": [10, 10, 12, 8], "area": 96,
                    "iscrowd": 0} for p in range(patients)]
    test = {"images": images, "annotations": annotations,
            "categories": [{"id": 1, "name": "disc_herniation"}, {"id": 2, "name": "cord_injury"}]}
    (tmp_path / "test.json").write_text(json.dumps(test))
    hit = [{"image_id": p + 1, "category_id": 1, "bbox": [10, 10, 12, 8], "score": 0.9} for p in range(patients)]
    miss = [{"image_id": p + 1, "category_id": 1, "bbox": [40, 40, 12, 8], "score": 0.9} for p in range(patients)]
    detections = {}
    for name, dets in (("finder", hit), ("twin", hit), ("blind", miss)):
        detections[name] = tmp_path / f"{name}.json"
        detections[name].write_text(json.dumps(dets))
    return tmp_path / "test.json", detections


def run_compare(tmp_path: Path, models: list[str], detections: list[Path], test: Path) -> int:
    return cli.main(["compare", "--config", str(REPO / "config.yaml"),
                     '{"evaluate": {"bootstrap": 100}, "compare": {"permutations": 500}}',
                     "--models", *models, "--detections", *map(str, detections), "--test", str(test),
                     "--out", str(tmp_path / "comparison.json")])


def test_compare_writes_every_pair_with_the_contracted_keys(tmp_path):
    test, detections = write_study(tmp_path)
    assert run_compare(tmp_path, list(detections), list(detections.values()), test) == 0
    comparison = json.loads((tmp_path / "comparison.json").read_text())
    pairs = {(pair["a"], pair["b"]): pair for pair in comparison["pairs"]}
    assert list(pairs) == [("finder", "twin"), ("finder", "blind"), ("twin", "blind")]
    for pair in pairs.values():
        assert {"a", "b", "metric", "delta", "ci95", "p_value", "n_patients", "per_class"} <= pair.keys()
        assert pair["metric"] == "ap50" and pair["n_patients"] == 10
        assert set(pair["per_class"]) == {"disc_herniation", "cord_injury"}
    same = pairs[("finder", "twin")]
    assert same["delta"] == 0.0 and same["ci95"] == [0.0, 0.0] and same["p_value"] == 1.0
    better = pairs[("finder", "blind")]
    assert better["delta"] == 1.0 and better["p_value"] < 0.01
    assert better["per_class"]["disc_herniation"]["delta"] == 1.0
    assert better["per_class"]["cord_injury"]["delta"] is None  # no cord injury in the test set
    assert comparison["class_counts"]["disc_herniation"] == {"boxes": 10, "patients": 10}


def test_compare_refuses_models_and_detections_that_do_not_pair_up(tmp_path, caplog):
    test, detections = write_study(tmp_path)
    assert run_compare(tmp_path, ["finder", "blind"], [detections["finder"]], test) == 2
    assert "2 --models but 1 --detections" in caplog.text


def test_one_model_has_nothing_to_pair(tmp_path, caplog):
    test, detections = write_study(tmp_path)
    with caplog.at_level("INFO"):
        assert run_compare(tmp_path, ["finder"], [detections["finder"]], test) == 0
    comparison = json.loads((tmp_path / "comparison.json").read_text())
    assert comparison["pairs"] == []
    assert comparison["note"] == "One model in this study (finder): nothing to pair."
    assert "nothing to pair" in caplog.text
