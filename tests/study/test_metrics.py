"""Metrics against referees: pycocotools and faster-coco-eval (an independent
implementation) on hand-made fixtures, FROC on hand-computed numbers, and the
patient bootstrap's equivalence to COCOeval on duplicated images."""

from __future__ import annotations

import contextlib
import copy
import io

import numpy as np
import pytest

from spinedet import SpinedetError
from spinedet.study import metrics

CLASSES = ["disc_herniation", "cord_injury"]


def make_coco(images: list[tuple[int, str]], boxes: list[tuple[int, int, list[float]]]) -> dict:
    """COCO ground truth from (image_id, patient) and (image_id, category_id, bbox)."""
    return {
        "images": [{"id": i, "file_name": f"sub-{p}/sub-{p}_slice-{i:02d}.png", "width": 100,
                    "height": 100, "patient": p, "group": "disc", "slice_index": i} for i, p in images],
        "annotations": [{"id": n + 1, "image_id": i, "category_id": c, "bbox": b, "area": b[2] * b[3],
                         "iscrowd": 0} for n, (i, c, b) in enumerate(boxes)],
        "categories": [{"id": k + 1, "name": name} for k, name in enumerate(CLASSES)],
    }


def det(image_id: int, category_id: int, bbox: list[float], score: float) -> dict:
    return {"image_id": image_id, "category_id": category_id, "bbox": bbox, "score": score}


@pytest.fixture
def referee_fixture():
    """Six images of three patients; detections at IoUs from 0.25 to 1, a wrong
    class, duplicates, tied scores, an image without ground truth."""
    gt = make_coco(
        [(1, "pa"), (2, "pa"), (3, "pb"), (4, "pb"), (5, "pc"), (6, "pc")],
        [
            (1, 1, [20, 30, 20, 10]), (1, 2, [60, 60, 15, 15]),
            (2, 1, [10, 10, 30, 20]), (2, 1, [50, 50, 10, 10]),
            (3, 2, [30, 30, 20, 20]),
            (4, 1, [40, 20, 16, 12]),
            (5, 1, [5, 5, 10, 10]), (5, 2, [70, 70, 20, 10]),
        ],
    )
    detections = [
        det(1, 1, [21, 31, 20, 10], 0.92), det(1, 1, [26, 30, 20, 10], 0.55),
        det(1, 2, [62, 58, 15, 15], 0.81), det(1, 2, [0, 0, 8, 8], 0.30),
        det(2, 1, [10, 10, 30, 20], 0.88), det(2, 1, [53, 52, 10, 10], 0.67),
        det(2, 2, [10, 10, 30, 20], 0.45),
        det(3, 2, [32, 31, 20, 20], 0.77), det(3, 2, [30, 30, 10, 10], 0.77),
        det(4, 1, [41, 21, 16, 12], 0.50), det(4, 1, [0, 0, 5, 5], 0.95),
        det(5, 1, [6, 5, 10, 10], 0.60), det(5, 2, [72, 71, 20, 10], 0.35),
        det(6, 1, [30, 30, 10, 10], 0.66), det(6, 2, [40, 40, 5, 5], 0.20),
    ]
    return gt, detections


def random_fixture(seed: int = 5, patients: int = 12):
    """Many images with jittered true boxes, false positives, scores rounded to
    two decimals (ties across images) and one image with 130 detections."""
    rng = np.random.default_rng(seed)
    images, boxes, detections = [], [], []
    image_id = 0
    for p in range(patients):
        for _ in range(3):
            image_id += 1
            images.append((image_id, f"p{p:02d}"))
            for category in (1, 2):
                for _ in range(rng.integers(0, 3)):
                    x, y = rng.uniform(0, 70, 2)
                    w, h = rng.uniform(6, 25, 2)
                    boxes.append((image_id, category, [x, y, w, h]))
                    if rng.random() < 0.8:
                        jitter = rng.normal(0, 1.5, 4)
                        detections.append(det(image_id, category, [x + jitter[0], y + jitter[1],
                                                                   max(1.0, w + jitter[2]), max(1.0, h + jitter[3])],
                                              round(float(rng.uniform(0.3, 1.0)), 2)))
                for _ in range(rng.integers(0, 4)):
                    x, y = rng.uniform(0, 80, 2)
                    detections.append(det(image_id, category, [x, y, 10, 10], round(float(rng.uniform(0, 0.9)), 2)))
    # An image crowded with 130 false positives; its one lesion is found only
    # by the lowest-scored detection, which COCO's maxDets=100 cuts off.
    crowded = images[4][0]
    for n in range(130):
        detections.append(det(crowded, 1, [n % 50, n // 50 * 20, 12, 12], round(float(rng.uniform(0.1, 0.6)), 2)))
    boxes.append((crowded, 1, [80, 80, 15, 15]))
    detections.append(det(crowded, 1, [80, 80, 15, 15], 0.05))
    return make_coco(images, boxes), detections


def faster_coco_eval_stats(gt: dict, detections: list[dict]) -> np.ndarray:
    from faster_coco_eval import COCO, COCOeval_faster

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(copy.deepcopy(gt))
        coco_dt = coco_gt.loadRes(copy.deepcopy(detections))
        evaluator = COCOeval_faster(coco_gt, coco_dt, iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return np.asarray(evaluator.stats)


def test_coco_summary_matches_pycocotools_and_faster_coco_eval(referee_fixture):
    gt, detections = referee_fixture
    ours = metrics.coco_summary(gt, detections, CLASSES)
    reference = metrics.run_cocoeval(gt, detections).stats
    independent = faster_coco_eval_stats(gt, detections)
    for key, index in [("ap", 0), ("ap50", 1), ("ap75", 2), ("ar100", 8)]:
        assert ours[key] == pytest.approx(reference[index], abs=1e-6)
        assert ours[key] == pytest.approx(independent[index], abs=1e-6)
    # The fixture is not trivial: neither perfect nor hopeless.
    assert 0.2 < ours["ap50"] < 0.95
    assert ours["ap"] < ours["ap50"]


def test_numpy_ap50_equals_pycocotools_and_faster_coco_eval(referee_fixture):
    gt, detections = referee_fixture
    matches = metrics.match_detections(gt, detections, CLASSES, 0.5)
    per_class = metrics.ap_per_class(matches)
    summary = metrics.coco_summary(gt, detections, CLASSES)
    for name in CLASSES:
        assert per_class[name] == pytest.approx(summary["ap50_per_class"][name], abs=1e-6)
    mean = metrics.mean_defined(per_class.values())
    assert mean == pytest.approx(metrics.run_cocoeval(gt, detections).stats[1], abs=1e-6)
    assert mean == pytest.approx(faster_coco_eval_stats(gt, detections)[1], abs=1e-6)


def test_ap_at_iou_01_counts_loose_boxes(referee_fixture):
    gt, detections = referee_fixture
    summary = metrics.coco_summary(gt, detections, CLASSES)
    matches = metrics.match_detections(gt, detections, CLASSES, 0.1)
    assert summary["ap_iou10"] == pytest.approx(metrics.mean_defined(metrics.ap_per_class(matches).values()), abs=1e-6)
    assert summary["ap_iou10"] > summary["ap50"]


def test_numpy_ap50_equals_pycocotools_on_many_images_with_ties_and_max_dets():
    gt, detections = random_fixture()
    matches = metrics.match_detections(gt, detections, CLASSES, 0.5)
    summary = metrics.coco_summary(gt, detections, CLASSES)
    ours = metrics.ap_per_class(matches)
    for name in CLASSES:
        assert ours[name] == pytest.approx(summary["ap50_per_class"][name], abs=1e-6)
    assert metrics.mean_defined(ours.values()) == pytest.approx(summary["ap50"], abs=1e-6)
    uncapped = metrics.ap_per_class(metrics.match_detections(gt, detections, CLASSES, 0.5, max_dets=None))
    assert uncapped["disc_herniation"] > ours["disc_herniation"] + 1e-4


def test_bootstrap_draw_equals_cocoeval_on_duplicated_images():
    """A resample where patients appear twice, evaluated by pycocotools with
    the duplicated images under new ids, gives the AP50 our bootstrap computes."""
    gt, detections = random_fixture(seed=11, patients=6)
    matches = metrics.match_detections(gt, detections, CLASSES, 0.5)
    by_patient = metrics.patient_image_indices(gt, matches.image_ids)
    patients = list(by_patient)
    draw = [patients[i] for i in (3, 0, 3, 5, 5, 1)]

    resampled = {"images": [], "annotations": [], "categories": gt["categories"]}
    resampled_detections = []
    for patient in draw:
        for index in by_patient[patient]:
            old_id = matches.image_ids[index]
            new_id = len(resampled["images"]) + 1
            image = next(im for im in gt["images"] if im["id"] == old_id)
            resampled["images"].append(image | {"id": new_id})
            for ann in gt["annotations"]:
                if ann["image_id"] == old_id:
                    resampled["annotations"].append(
                        ann | {"id": len(resampled["annotations"]) + 1, "image_id": new_id})
            resampled_detections += [d | {"image_id": new_id} for d in detections if d["image_id"] == old_id]

    indices = np.asarray([i for p in draw for i in by_patient[p]])
    ours = metrics.ap_per_class(matches, indices)
    reference = metrics.coco_summary(resampled, resampled_detections, CLASSES)
    for name in CLASSES:
        assert ours[name] == pytest.approx(reference["ap50_per_class"][name], abs=1e-6)
    # Counting twice matters: the resample is not the set of distinct patients.
    distinct = np.asarray([i for p in sorted(set(draw)) for i in by_patient[p]])
    assert metrics.ap_per_class(matches, distinct) != ours


def test_bootstrap_is_seeded_and_brackets_the_point_estimate():
    gt, detections = random_fixture(seed=2, patients=12)
    matches = metrics.match_detections(gt, detections, CLASSES, 0.5)
    by_patient = metrics.patient_image_indices(gt, matches.image_ids)
    first = metrics.bootstrap_ap50(matches, by_patient, draws=200, seed=42)
    again = metrics.bootstrap_ap50(matches, by_patient, draws=200, seed=42)
    other = metrics.bootstrap_ap50(matches, by_patient, draws=200, seed=43)
    assert first == again
    assert first["ap50"] != other["ap50"]
    point = metrics.mean_defined(metrics.ap_per_class(matches).values())
    assert first["ap50"]["low"] <= point <= first["ap50"]["high"]
    assert first["ap50"]["low"] < first["ap50"]["high"]
    for name, value in metrics.ap_per_class(matches).items():
        interval = first["ap50_per_class"][name]
        assert interval["low"] <= value <= interval["high"]
        assert interval["valid_draws"] == 200
    assert first["patients"] == 12


def test_bootstrap_with_no_draws_gives_no_interval(referee_fixture):
    gt, detections = referee_fixture
    matches = metrics.match_detections(gt, detections, CLASSES, 0.5)
    result = metrics.bootstrap_ap50(matches, metrics.patient_image_indices(gt, matches.image_ids), draws=0, seed=1)
    assert result["ap50"] == {"low": None, "high": None, "valid_draws": 0, "estimable": False,
                              "reason": "no bootstrap draws", "boxes": 8, "patients": 3}


def test_bootstrap_requires_patient_on_images(referee_fixture):
    gt, _ = referee_fixture
    del gt["images"][0]["patient"]
    with pytest.raises(SpinedetError, match="patient"):
        metrics.patient_image_indices(gt, [im["id"] for im in gt["images"]])


@pytest.fixture
def froc_fixture():
    """Four images (image 4 without lesions). At IoU 0.5, class 1 goes
    TP .9, FP .8 (duplicate), FP .7 (image 4), TP .6 (IoU 2/3), FP .5 (IoU 1/4);
    class 2 goes TP .95, FP .4."""
    gt = make_coco(
        [(1, "pa"), (2, "pa"), (3, "pb"), (4, "pb")],
        [(1, 1, [10, 10, 10, 10]), (2, 1, [10, 10, 10, 10]), (3, 1, [10, 10, 10, 10]),
         (2, 2, [40, 40, 10, 10])],
    )
    detections = [
        det(1, 1, [10, 10, 10, 10], 0.9), det(1, 1, [10, 10, 10, 10], 0.8),
        det(4, 1, [50, 50, 10, 10], 0.7), det(2, 1, [12, 10, 10, 10], 0.6),
        det(3, 1, [16, 10, 10, 10], 0.5),
        det(2, 2, [40, 40, 10, 10], 0.95), det(1, 2, [40, 40, 10, 10], 0.4),
    ]
    return gt, detections


FPS = [0.125, 0.25, 0.5, 1, 2, 4, 8]


def test_froc_hand_computed_at_iou_05(froc_fixture):
    gt, detections = froc_fixture
    result = metrics.froc(metrics.match_detections(gt, detections, CLASSES, 0.5, max_dets=None), FPS, 0.5)
    third = 1 / 3
    assert result["per_class"]["disc_herniation"]["sensitivity"] == pytest.approx(
        [third, third, 2 * third, 2 * third, 2 * third, 2 * third, 2 * third])
    assert result["per_class"]["disc_herniation"]["cpm"] == pytest.approx(4 / 7)
    assert result["per_class"]["cord_injury"]["sensitivity"] == pytest.approx([1.0] * 7)
    assert result["per_class"]["cord_injury"]["cpm"] == pytest.approx(1.0)
    assert result["overall"]["sensitivity"] == pytest.approx([0.5, 0.5, 0.75, 0.75, 0.75, 0.75, 0.75])
    assert result["cpm"] == pytest.approx(4.75 / 7)
    assert result["n_images"] == 4


def test_froc_hand_computed_at_iou_01(froc_fixture):
    gt, detections = froc_fixture
    result = metrics.froc(metrics.match_detections(gt, detections, CLASSES, 0.1, max_dets=None), FPS, 0.1)
    third = 1 / 3
    assert result["per_class"]["disc_herniation"]["sensitivity"] == pytest.approx(
        [third, third, 1, 1, 1, 1, 1])
    assert result["per_class"]["disc_herniation"]["cpm"] == pytest.approx(17 / 21)


def test_froc_tied_scores_are_one_threshold():
    """Two detections with one score, one TP and one FP: the curve cannot stop
    between them, so at 0 FPs per image the sensitivity is 0."""
    gt = make_coco([(1, "pa"), (2, "pa")], [(1, 1, [10, 10, 10, 10])])
    detections = [det(2, 1, [50, 50, 10, 10], 0.7), det(1, 1, [10, 10, 10, 10], 0.7)]
    result = metrics.froc(metrics.match_detections(gt, detections, CLASSES, 0.5, max_dets=None), [0.25, 0.5], 0.5)
    assert result["per_class"]["disc_herniation"]["sensitivity"] == [0.0, 1.0]
    assert result["per_class"]["cord_injury"]["cpm"] is None


def test_no_detections_scores_zero_for_classes_with_ground_truth(froc_fixture):
    gt, _ = froc_fixture
    config = {"froc_iou": 0.5, "froc_fps": FPS, "bootstrap": 10}
    result = metrics.evaluate_detections(gt, [], CLASSES, config, seed=1)
    assert result["ap50"] == 0.0
    assert result["ap50_per_class"] == {"disc_herniation": 0.0, "cord_injury": 0.0}
    assert result["cpm"] == 0.0
    # two patients with lesions: too few for a patient bootstrap
    assert result["bootstrap"]["ap50"] | {"reason": ""} == {
        "low": None, "high": None, "valid_draws": 10, "estimable": False, "reason": "", "boxes": 4, "patients": 2}


def test_evaluate_detections_body(referee_fixture):
    gt, detections = referee_fixture
    config = {"froc_iou": 0.5, "froc_fps": FPS, "bootstrap": 30}
    result = metrics.evaluate_detections(gt, detections, CLASSES, config, seed=3)
    assert result["n_images"] == 6 and result["n_patients"] == 3
    assert result["n_gt"] == {"disc_herniation": 5, "cord_injury": 3}
    assert len(result["pr_curves"]["recall"]) == 101
    precision = result["pr_curves"]["precision"]["cord_injury"]
    assert len(precision) == 101 and precision == sorted(precision, reverse=True)
    assert result["cpm"] == result["froc"]["overall"]["cpm"]
    assert result["bootstrap"]["draws"] == 30


def test_box_iou_xywh():
    iou = metrics.box_iou_xywh(np.array([[0, 0, 10, 10]]), np.array([[5, 0, 10, 10], [20, 20, 5, 5], [0, 0, 10, 10]]))
    assert iou.tolist() == [[pytest.approx(50 / 150), 0.0, 1.0]]


def test_detection_on_unknown_image_is_an_error(referee_fixture):
    gt, detections = referee_fixture
    with pytest.raises(SpinedetError, match="image 99"):
        metrics.match_detections(gt, detections + [det(99, 1, [0, 0, 1, 1], 0.5)], CLASSES, 0.5)


# ---------------------------------------------------------------- PASCAL VOC AP


def devkit_voc_ap(gt_boxes: dict, detections: list[tuple[int, float, list[float]]], eleven_point: bool) -> float:
    """An independent transcription of the PASCAL VOC devkit's voc_eval/voc_ap
    (one class): detections sorted by score over all images, each matched to
    its image's best-overlap box, TP when IoU > 0.5 and the box is unclaimed.
    Continuous boxes [x, y, w, h] (no +1 pixel), plain loops."""
    claimed = {image: [False] * len(boxes) for image, boxes in gt_boxes.items()}
    n_gt = sum(len(boxes) for boxes in gt_boxes.values())
    tp, fp = [], []
    # ties: image order (the devkit's unstable argsort leaves them arbitrary)
    for image, _score, (x, y, w, h) in sorted(detections, key=lambda d: (-d[1], d[0])):
        best, best_index = -1.0, -1
        for index, (gx, gy, gw, gh) in enumerate(gt_boxes.get(image, [])):
            iw = min(x + w, gx + gw) - max(x, gx)
            ih = min(y + h, gy + gh) - max(y, gy)
            inter = max(iw, 0.0) * max(ih, 0.0)
            overlap = inter / (w * h + gw * gh - inter)
            if overlap > best:
                best, best_index = overlap, index
        hit = best > 0.5 and not claimed[image][best_index]
        if hit:
            claimed[image][best_index] = True
        tp.append(1.0 if hit else 0.0)
        fp.append(0.0 if hit else 1.0)
    tp_sum = np.cumsum(tp)
    fp_sum = np.cumsum(fp)
    rec = tp_sum / n_gt
    prec = tp_sum / np.maximum(tp_sum + fp_sum, np.finfo(np.float64).eps)
    if eleven_point:
        ap = 0.0
        for t in np.arange(0.0, 1.1, 0.1):
            p = 0.0 if np.sum(rec >= t) == 0 else np.max(prec[rec >= t])
            ap += p / 11.0
        return ap
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    for i in range(mpre.size - 1, 0, -1):
        mpre[i - 1] = max(mpre[i - 1], mpre[i])
    i = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def test_voc_ap_hand_computed():
    # 3 lesions; by score: TP, FP, TP, FP, TP -> recall 1/3, 1/3, 2/3, 2/3, 1; precision 1, 1/2, 2/3, 1/2, 3/5
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    is_tp = np.array([True, False, True, False, True])
    # all-point: 1/3 * 1 + 1/3 * 2/3 + 1/3 * 3/5
    assert metrics.voc_average_precision(scores, is_tp, 3, eleven_point=False) == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
    # 11-point: recall >= 0, .1, .2, .3 -> 1; .4, .5, .6 -> 2/3; .7 ... 1 -> 3/5
    assert metrics.voc_average_precision(scores, is_tp, 3, eleven_point=True) == pytest.approx(
        (4 * 1 + 3 * 2 / 3 + 4 * 3 / 5) / 11)
    assert metrics.voc_average_precision(scores, is_tp, 0, eleven_point=True) is None
    assert metrics.voc_average_precision(np.zeros(0), np.zeros(0, bool), 2, eleven_point=False) == 0.0


def test_voc_matching_takes_only_the_best_overlap_box_and_iou_above_half():
    gt = np.array([[0, 0, 10, 10], [4, 0, 10, 10]], dtype=float)
    # best overlap is box 1 (IoU 1), already claimed by the first detection: FP,
    # although box 0 overlaps it by IoU 6/14 < 0.5 anyway; the third is box 0 exactly.
    dets = np.array([[4, 0, 10, 10], [4, 0, 10, 10], [0, 0, 10, 10]], dtype=float)
    _, tp = metrics.match_image(gt, dets, np.array([0.9, 0.8, 0.7]), 0.5, None, style="voc")
    assert tp.tolist() == [True, False, True]
    # IoU exactly 0.5 counts for COCO (>=), not for VOC (>)
    half = np.array([[0, 0, 10, 10]], dtype=float)
    shifted = np.array([[0, 0, 10, 5]], dtype=float)  # IoU 50/100
    assert metrics.match_image(half, shifted, np.array([1.0]), 0.5, None, style="voc")[1].tolist() == [False]
    assert metrics.match_image(half, shifted, np.array([1.0]), 0.5)[1].tolist() == [True]


@pytest.mark.parametrize("seed", [5, 6, 7])
def test_voc_ap50_equals_an_independent_devkit_transcription(seed):
    gt, detections = random_fixture(seed)
    result = metrics.voc_ap50(metrics.match_detections(gt, detections, CLASSES, 0.5, max_dets=None, style="voc"))
    for k, name in enumerate(CLASSES):
        boxes: dict = {}
        for ann in gt["annotations"]:
            if ann["category_id"] == k + 1:
                boxes.setdefault(ann["image_id"], []).append(ann["bbox"])
        dets = [(d["image_id"], d["score"], d["bbox"]) for d in detections if d["category_id"] == k + 1]
        assert result["voc07_11point"]["per_class"][name] == pytest.approx(devkit_voc_ap(boxes, dets, True), abs=1e-12)
        assert result["voc10_all_point"]["per_class"][name] == pytest.approx(devkit_voc_ap(boxes, dets, False),
                                                                             abs=1e-12)
    assert result["voc10_all_point"]["map"] == pytest.approx(np.mean(list(result["voc10_all_point"]["per_class"].values())))


# ---------------------------------------------------------------- paired comparison


def ap_matches(gt: dict, detections: list[dict]) -> metrics.Matches:
    return metrics.match_detections(gt, detections, CLASSES, 0.5)


def test_identical_models_differ_by_zero_with_p_one():
    gt, detections = random_fixture(5)
    matches = ap_matches(gt, detections)
    by_patient = metrics.patient_image_indices(gt, matches.image_ids)
    result = metrics.paired_comparison(matches, matches, by_patient, draws=50, permutations=200, seed=1)
    assert result["delta"] == 0.0 and result["ci95"] == [0.0, 0.0] and result["p_value"] == 1.0
    assert result["n_patients"] == 12 and result["exact_permutation"] is False
    for name in CLASSES:
        assert result["per_class"][name]["delta"] == 0.0 and result["per_class"][name]["p_value"] == 1.0


def perfect_and_blind(patients: int):
    """One lesion per patient; model a finds each exactly, model b only misses."""
    gt = make_coco([(p + 1, f"p{p:02d}") for p in range(patients)],
                   [(p + 1, 1, [10, 10, 20, 20]) for p in range(patients)])
    found = [det(p + 1, 1, [10, 10, 20, 20], 0.9) for p in range(patients)]
    missed = [det(p + 1, 1, [60, 60, 20, 20], 0.9) for p in range(patients)]
    return gt, ap_matches(gt, found), ap_matches(gt, missed)


def test_a_model_that_finds_every_lesion_beats_one_that_finds_none():
    gt, a, b = perfect_and_blind(12)
    by_patient = metrics.patient_image_indices(gt, a.image_ids)
    result = metrics.paired_comparison(a, b, by_patient, draws=200, permutations=2000, seed=1)
    assert result["ap50_a"] == 1.0 and result["ap50_b"] == 0.0 and result["delta"] == 1.0
    assert result["p_value"] < 0.01
    assert result["ci95"] == [1.0, 1.0]
    assert result["per_class"]["cord_injury"]["delta"] is None  # no ground truth of that class
    reverse = metrics.paired_comparison(b, a, by_patient, draws=200, permutations=2000, seed=1)
    assert reverse["delta"] == -1.0 and reverse["p_value"] == result["p_value"]


def test_few_patients_enumerate_every_swap_exactly():
    gt, a, b = perfect_and_blind(4)
    by_patient = metrics.patient_image_indices(gt, a.image_ids)
    result = metrics.paired_comparison(a, b, by_patient, draws=20, permutations=100, seed=1)
    # 16 swaps; only "none" and "all" reach |delta| = 1
    assert result["exact_permutation"] is True and result["permutations"] == 16
    assert result["p_value"] == pytest.approx(2 / 16)


def test_paired_comparison_refuses_different_test_sets():
    gt, a, _ = perfect_and_blind(4)
    gt_other, other, _ = perfect_and_blind(5)
    with pytest.raises(SpinedetError, match="same test images"):
        metrics.paired_comparison(a, other, metrics.patient_image_indices(gt, a.image_ids), 10, 10, 0)


def test_class_counts_and_a_class_from_too_few_patients_has_no_interval():
    gt = make_coco([(1, "pa"), (2, "pb"), (3, "pc"), (4, "pd")],
                   [(1, 1, [10, 10, 20, 20]), (2, 1, [10, 10, 20, 20]), (3, 1, [10, 10, 20, 20]),
                    (4, 2, [40, 40, 10, 30]), (4, 2, [60, 40, 10, 30])])
    detections = [det(i, 1, [10, 10, 20, 20], 0.8) for i in (1, 2)] + [det(4, 2, [40, 40, 10, 30], 0.7)]
    matches = ap_matches(gt, detections)
    by_patient = metrics.patient_image_indices(gt, matches.image_ids)
    assert metrics.class_counts(matches, by_patient) == {"disc_herniation": {"boxes": 3, "patients": 3},
                                                         "cord_injury": {"boxes": 2, "patients": 1}}
    boot = metrics.bootstrap_ap50(matches, by_patient, draws=40, seed=0)
    cord = boot["ap50_per_class"]["cord_injury"]
    assert cord["estimable"] is False and cord["low"] is None and cord["high"] is None
    assert "1 patient" in cord["reason"]
    assert cord["patients"] == 1 and cord["boxes"] == 2
    disc = boot["ap50_per_class"]["disc_herniation"]
    assert disc["estimable"] is True and disc["low"] <= disc["high"] and disc["patients"] == 3


# ---------------------------------------------------------------- patients


def test_wilson_interval_known_values():
    assert metrics.wilson_interval(5, 10) == pytest.approx([0.2366, 0.7634], abs=1e-4)
    assert metrics.wilson_interval(0, 10) == pytest.approx([0.0, 0.2775], abs=1e-4)
    assert metrics.wilson_interval(10, 10) == pytest.approx([0.7225, 1.0], abs=1e-4)
    assert metrics.wilson_interval(0, 0) is None


def patients_fixture():
    """pa: herniation found (IoU 0.64); pb: cord injury found only loosely (IoU 0.2);
    pc: no lesion, no detection; pd: no lesion, a false detection at 0.7."""
    gt = make_coco([(1, "pa"), (2, "pa"), (3, "pb"), (4, "pc"), (5, "pd")],
                   [(1, 1, [10, 10, 20, 20]), (3, 2, [10, 10, 10, 30])])
    detections = [det(1, 1, [14, 10, 20, 20], 0.9), det(2, 1, [50, 50, 10, 10], 0.3),
                  det(3, 2, [18, 10, 10, 30], 0.6), det(5, 1, [40, 40, 10, 10], 0.7)]
    return gt, detections


def test_patient_level_sensitivity_specificity_and_confusion():
    gt, detections = patients_fixture()
    result = metrics.patient_level(gt, detections, CLASSES, threshold=0.5)
    overall = result["overall"]
    assert result["patients"] == 4
    assert (overall["sensitivity_iou10"]["k"], overall["sensitivity_iou10"]["n"]) == (2, 2)
    assert (overall["sensitivity_iou50"]["k"], overall["sensitivity_iou50"]["n"]) == (1, 2)
    assert (overall["specificity"]["k"], overall["specificity"]["n"]) == (1, 2)
    assert overall["confusion_iou50"] == {"tp": 1, "fn": 1, "tn": 1, "fp": 1}
    assert overall["specificity"]["ci95"] == metrics.wilson_interval(1, 2)
    herniation = result["per_class"]["disc_herniation"]
    assert herniation["sensitivity_iou50"]["value"] == 1.0 and herniation["specificity"]["value"] == 0.5
    cord = result["per_class"]["cord_injury"]
    assert cord["sensitivity_iou50"]["value"] == 0.0 and cord["sensitivity_iou10"]["value"] == 1.0
    assert cord["specificity"]["value"] == 1.0  # pd's false detection is a herniation
    # above the false detection's score the healthy patients are all clear
    strict = metrics.patient_level(gt, detections, CLASSES, threshold=0.8)["overall"]
    assert strict["confusion_iou50"] == {"tp": 1, "fn": 1, "tn": 2, "fp": 0}
    assert strict["sensitivity_iou10"]["k"] == 1


def test_operating_threshold_reaches_the_target_sensitivity_on_validation():
    gt = make_coco([(k + 1, f"p{k}") for k in range(4)], [(k + 1, 1, [10, 10, 20, 20]) for k in range(4)])
    detections = [det(k + 1, 1, [10, 10, 20, 20], score) for k, score in enumerate([0.9, 0.8, 0.6])]
    detections.append(det(4, 1, [60, 60, 20, 20], 0.95))  # patient 4's lesion is missed
    choose = metrics.operating_threshold
    assert choose(gt, detections, CLASSES, 0.5, floor=0.05)["score_threshold"] == 0.8
    assert choose(gt, detections, CLASSES, 0.75, floor=0.05)["score_threshold"] == 0.6
    unreachable = choose(gt, detections, CLASSES, 1.0, floor=0.05)
    assert unreachable["score_threshold"] == 0.05 and unreachable["reached"] is False
    assert unreachable["validation_patients_with_lesion"] == 4
