"""Detection metrics on COCO data: pycocotools summaries, PASCAL VOC AP, FROC, a
patient-level bootstrap of AP50, the paired comparison of two models, and
per-patient sensitivity and specificity at an operating point.

Ground truth is a COCO dict (the split's test.json), detections a COCO results
list (`image_id, category_id, bbox [x, y, w, h], score`). Everything here is
plain numpy/pycocotools, independent of torch.

The bootstrap cannot afford a full COCOeval per draw, so AP50 is re-implemented
the COCO way (per-image greedy matching by score, 101-point interpolated
precision, maxDets=100, area 'all') on matches computed once per image; a test
checks it against pycocotools to 1e-6.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from spinedet import SpinedetError
from spinedet.detect.validation import defined as _defined
from spinedet.detect.validation import run_cocoeval

log = logging.getLogger(__name__)

# COCO's recall grid for interpolated precision: 0, 0.01, ..., 1.
RECALL_GRID = np.linspace(0.0, 1.0, 101)
COCO_MAX_DETS = 100
# A bootstrap over fewer patients with lesions of a class cannot give that class
# an interval: with one patient every draw holds the same lesions or none.
MIN_PATIENTS_FOR_CI = 3
# FROC curves for figures are sampled on this grid of false positives per image.
FROC_CURVE_FPS = np.geomspace(1 / 16, 16, 41)


def _class_precision(evaluator, iou_index: int, class_index: int) -> np.ndarray:
    """Interpolated precision on RECALL_GRID for one class, area 'all', maxDets=100."""
    return evaluator.eval["precision"][iou_index, :, class_index, 0, -1]


def coco_summary(coco_gt: dict, detections: list[dict], classes: list[str]) -> dict:
    """AP@[.5:.95], AP50, AP75, AR@100, AP at IoU 0.1, per-class AP50 and the
    per-class precision-recall curves at IoU 0.5, all from pycocotools.

    Category ids are 1..n in `classes` order (data contract). Values are
    fractions in 0..1, None where a class has no ground truth.
    """
    category_ids = list(range(1, len(classes) + 1))
    n_gt = {name: 0 for name in classes}
    for ann in coco_gt.get("annotations", []):
        n_gt[classes[ann["category_id"] - 1]] += 1
    has_gt = {name: n_gt[name] > 0 for name in classes}

    standard = run_cocoeval(coco_gt, detections)
    at_iou10 = run_cocoeval(coco_gt, detections, iou_thresholds=[0.1])
    if standard is None:
        # No detections: every class with ground truth scores zero.
        zero_if_gt = {name: (0.0 if has_gt[name] else None) for name in classes}
        any_gt = any(has_gt.values())
        ap_all = 0.0 if any_gt else None
        return {
            "n_gt": n_gt,
            "ap": ap_all,
            "ap50": ap_all,
            "ap75": ap_all,
            "ar100": ap_all,
            "ap_iou10": ap_all,
            "ap50_per_class": zero_if_gt,
            "ap_iou10_per_class": dict(zero_if_gt),
            "pr_curves": {
                "recall": RECALL_GRID.tolist(),
                "precision": {n: ([0.0] * len(RECALL_GRID) if has_gt[n] else None) for n in classes},
            },
        }

    if list(standard.params.catIds) != category_ids:
        raise SpinedetError(f"test COCO categories {list(standard.params.catIds)} are not 1..n in the config's "
                            f"classes order {classes}")
    # stats: 0 AP, 1 AP50, 2 AP75, ..., 8 AR@100 (area all)
    stats = standard.stats
    iou50 = int(np.argmin(np.abs(standard.params.iouThrs - 0.5)))
    per_class, curves, per_class_iou10 = {}, {}, {}
    for index, name in enumerate(classes):
        precision = _class_precision(standard, iou50, index)
        per_class[name] = _defined(precision.mean()) if has_gt[name] else None
        curves[name] = precision.tolist() if has_gt[name] else None
        precision10 = _class_precision(at_iou10, 0, index)
        per_class_iou10[name] = _defined(precision10.mean()) if has_gt[name] else None
    precision10_all = at_iou10.eval["precision"][0, :, :, 0, -1]
    defined10 = precision10_all[precision10_all > -1]
    return {
        "n_gt": n_gt,
        "ap": _defined(stats[0]),
        "ap50": _defined(stats[1]),
        "ap75": _defined(stats[2]),
        "ar100": _defined(stats[8]),
        "ap_iou10": float(defined10.mean()) if defined10.size else None,
        "ap50_per_class": per_class,
        "ap_iou10_per_class": per_class_iou10,
        "pr_curves": {"recall": RECALL_GRID.tolist(), "precision": curves},
    }


def box_iou_xywh(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    """IoU matrix between [N, 4] and [M, 4] boxes in COCO [x, y, w, h] (pixel edges)."""
    a = np.asarray(boxes_a, dtype=float).reshape(-1, 4)
    b = np.asarray(boxes_b, dtype=float).reshape(-1, 4)
    ax2, ay2 = a[:, 0] + a[:, 2], a[:, 1] + a[:, 3]
    bx2, by2 = b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]
    inter_w = np.minimum(ax2[:, None], bx2[None, :]) - np.maximum(a[:, 0][:, None], b[:, 0][None, :])
    inter_h = np.minimum(ay2[:, None], by2[None, :]) - np.maximum(a[:, 1][:, None], b[:, 1][None, :])
    inter = np.clip(inter_w, 0, None) * np.clip(inter_h, 0, None)
    union = (a[:, 2] * a[:, 3])[:, None] + (b[:, 2] * b[:, 3])[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / union, 0.0)


def match_image(gt_boxes: np.ndarray, det_boxes: np.ndarray, det_scores: np.ndarray, iou_threshold: float,
                max_dets: int | None = COCO_MAX_DETS, style: str = "coco") -> tuple[np.ndarray, np.ndarray]:
    """Match one image's detections of one class to its ground truth.

    Detections are taken highest score first (stable for ties), at most
    `max_dets`. COCO style: each one claims the unmatched ground-truth box of
    highest IoU >= threshold (a later box wins an IoU tie, as in pycocotools).
    VOC style (the PASCAL devkit's): each looks only at the box it overlaps
    most, and is a true positive when that IoU is above (not at) the threshold
    and that box is still unclaimed; boxes are continuous coordinates (no +1
    pixel widths). Returns the kept scores (sorted) and whether each is a true
    positive.
    """
    order = np.argsort(-np.asarray(det_scores, dtype=float), kind="mergesort")
    if max_dets is not None:
        order = order[:max_dets]
    scores = np.asarray(det_scores, dtype=float)[order]
    is_tp = np.zeros(len(order), dtype=bool)
    if len(order) == 0 or len(gt_boxes) == 0:
        return scores, is_tp
    ious = box_iou_xywh(np.asarray(det_boxes)[order], gt_boxes)
    gt_taken = np.zeros(len(gt_boxes), dtype=bool)
    threshold = min(iou_threshold, 1 - 1e-10)
    for d in range(len(order)):
        if style == "voc":
            best_gt = int(np.argmax(ious[d]))
            if ious[d, best_gt] <= iou_threshold or gt_taken[best_gt]:
                best_gt = -1
        else:
            best_iou, best_gt = threshold, -1
            for g in range(len(gt_boxes)):
                if gt_taken[g] or ious[d, g] < best_iou:
                    continue
                best_iou, best_gt = ious[d, g], g
        if best_gt >= 0:
            gt_taken[best_gt] = True
            is_tp[d] = True
    return scores, is_tp


@dataclass
class Matches:
    """Per-image, per-class matching results, computed once and reused by the
    bootstrap and FROC. Lists are indexed [class][image], images in `image_ids` order."""

    image_ids: list[int]
    classes: list[str]
    scores: list[list[np.ndarray]]
    is_tp: list[list[np.ndarray]]
    n_gt: np.ndarray  # [class, image]


def match_detections(coco_gt: dict, detections: list[dict], classes: list[str],
                     iou_threshold: float, max_dets: int | None = COCO_MAX_DETS, style: str = "coco") -> Matches:
    """Match every image's detections to its ground truth, class by class, the
    COCO way or the PASCAL VOC way (style="voc", see match_image).

    Images are taken in increasing id order (as pycocotools does), including
    images with neither ground truth nor detections.
    """
    image_ids = sorted(image["id"] for image in coco_gt["images"])
    known = set(image_ids)
    gt_by_key: dict[tuple[int, int], list] = {}
    for ann in coco_gt.get("annotations", []):
        if ann.get("iscrowd", 0):
            raise SpinedetError(f"crowd annotation {ann.get('id')} in the test set: not supported")
        gt_by_key.setdefault((ann["image_id"], ann["category_id"]), []).append(ann["bbox"])
    dt_by_key: dict[tuple[int, int], list] = {}
    for det in detections:
        if det["image_id"] not in known:
            raise SpinedetError(f"detection for image {det['image_id']}, which is not in the test set")
        dt_by_key.setdefault((det["image_id"], det["category_id"]), []).append(det)

    scores, is_tp = [], []
    n_gt = np.zeros((len(classes), len(image_ids)), dtype=int)
    for k in range(len(classes)):
        class_scores, class_tp = [], []
        for i, image_id in enumerate(image_ids):
            gt_boxes = np.asarray(gt_by_key.get((image_id, k + 1), []), dtype=float).reshape(-1, 4)
            dets = dt_by_key.get((image_id, k + 1), [])
            det_boxes = np.asarray([d["bbox"] for d in dets], dtype=float).reshape(-1, 4)
            det_scores = np.asarray([d["score"] for d in dets], dtype=float)
            s, tp = match_image(gt_boxes, det_boxes, det_scores, iou_threshold, max_dets, style)
            class_scores.append(s)
            class_tp.append(tp)
            n_gt[k, i] = len(gt_boxes)
        scores.append(class_scores)
        is_tp.append(class_tp)
    return Matches(image_ids, list(classes), scores, is_tp, n_gt)


def precision_recall(scores: np.ndarray, is_tp: np.ndarray, n_gt: int) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall after each detection, highest score first (stable for ties)."""
    order = np.argsort(-np.asarray(scores, dtype=float), kind="mergesort")
    tp = np.asarray(is_tp, dtype=bool)[order]
    tp_sum = np.cumsum(tp).astype(float)
    fp_sum = np.cumsum(~tp).astype(float)
    return tp_sum / (fp_sum + tp_sum + np.spacing(1)), tp_sum / n_gt


def coco_average_precision(scores: np.ndarray, is_tp: np.ndarray, n_gt: int) -> float | None:
    """101-point interpolated AP exactly as pycocotools' accumulate() computes it.

    `scores`/`is_tp` are detections concatenated image by image (each image's
    already sorted by score); they are stably re-sorted by score. None when
    there is no ground truth.
    """
    if n_gt == 0:
        return None
    if len(scores) == 0:
        return 0.0
    precision, recall = precision_recall(scores, is_tp, n_gt)
    # precision envelope: best precision at any higher recall
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    at = np.searchsorted(recall, RECALL_GRID, side="left")
    interpolated = np.where(at < len(precision), precision[np.minimum(at, len(precision) - 1)], 0.0)
    return float(interpolated.mean())


def ap_per_class(matches: Matches, image_indices: np.ndarray | None = None) -> dict[str, float | None]:
    """COCO AP of each class over the given images (by index into matches.image_ids,
    repeats allowed and counted), or over all images."""
    if image_indices is None:
        image_indices = np.arange(len(matches.image_ids))
    result = {}
    for k, name in enumerate(matches.classes):
        if len(image_indices):
            scores = np.concatenate([matches.scores[k][i] for i in image_indices])
            is_tp = np.concatenate([matches.is_tp[k][i] for i in image_indices])
        else:
            scores, is_tp = np.zeros(0), np.zeros(0, dtype=bool)
        result[name] = coco_average_precision(scores, is_tp, int(matches.n_gt[k, image_indices].sum()))
    return result


def mean_defined(values) -> float | None:
    """Mean over the values that are defined (classes that have ground truth)."""
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None


def patient_image_indices(coco_gt: dict, image_ids: list[int]) -> dict[str, list[int]]:
    """Indices into `image_ids` of each patient's images (COCO images carry `patient`)."""
    patient_of = {}
    for image in coco_gt["images"]:
        if "patient" not in image:
            raise SpinedetError(f"test image {image['id']} has no 'patient' field: cannot bootstrap by patient")
        patient_of[image["id"]] = str(image["patient"])
    by_patient: dict[str, list[int]] = {}
    for index, image_id in enumerate(image_ids):
        by_patient.setdefault(patient_of[image_id], []).append(index)
    return dict(sorted(by_patient.items()))


def bootstrap_ap50(matches: Matches, images_by_patient: dict[str, list[int]],
                   draws: int, seed: int) -> dict:
    """Patient-level bootstrap of AP50: resample patients with replacement; a
    patient drawn twice contributes its images twice (as duplicated images with
    new ids would in COCOeval). Returns 95 % percentile intervals for the mean
    AP50 and each class's AP50, and how many draws defined each (a draw without
    ground truth of a class leaves that class undefined)."""
    rng = np.random.default_rng(seed)
    patients = list(images_by_patient)
    per_draw = {name: np.full(draws, np.nan) for name in ["mean", *matches.classes]}
    for d in tqdm(range(draws), desc="bootstrap", unit="draw", leave=False):
        chosen = rng.integers(0, len(patients), size=len(patients))
        image_indices = np.asarray(
            [i for p in chosen for i in images_by_patient[patients[p]]], dtype=int)
        per_class = ap_per_class(matches, image_indices)
        mean = mean_defined(per_class.values())
        per_draw["mean"][d] = np.nan if mean is None else mean
        for name, value in per_class.items():
            per_draw[name][d] = np.nan if value is None else value

    def interval(values: np.ndarray, counts: dict) -> dict:
        valid = values[~np.isnan(values)]
        entry = {"low": None, "high": None, "valid_draws": int(valid.size), **counts}
        if counts["patients"] < MIN_PATIENTS_FOR_CI:
            return {**entry, "estimable": False,
                    "reason": f"the test lesions come from {counts['patients']} patient"
                              f"{'' if counts['patients'] == 1 else 's'}; a patient bootstrap needs "
                              f"at least {MIN_PATIENTS_FOR_CI}"}
        if valid.size == 0:
            return {**entry, "estimable": False, "reason": "no bootstrap draws"}
        low, high = np.percentile(valid, [2.5, 97.5])
        return {**entry, "low": float(low), "high": float(high), "estimable": True}

    counts = class_counts(matches, images_by_patient)
    lesion_patients = sum(int(matches.n_gt[:, indices].sum() > 0) for indices in images_by_patient.values())
    overall = {"boxes": int(matches.n_gt.sum()), "patients": lesion_patients}
    return {
        "unit": "patient",
        "draws": draws,
        "seed": seed,
        "patients": len(patients),
        "level": 0.95,
        "method": "percentile",
        "ap50": interval(per_draw["mean"], overall),
        "ap50_per_class": {name: interval(per_draw[name], counts[name]) for name in matches.classes},
    }


# ---------------------------------------------------------------- PASCAL VOC AP


def voc_average_precision(scores: np.ndarray, is_tp: np.ndarray, n_gt: int, eleven_point: bool) -> float | None:
    """PASCAL VOC AP: the 11-point form of VOC2007 (mean of the best precision
    at recall >= 0, 0.1, ..., 1) or the all-point form of VOC2010 and later (area
    under the precision envelope). None without ground truth."""
    if n_gt == 0:
        return None
    precision, recall = precision_recall(scores, is_tp, n_gt)
    if eleven_point:
        return float(np.mean([precision[recall >= t].max() if (recall >= t).any() else 0.0
                              for t in np.arange(0.0, 1.1, 0.1)]))  # the devkit's grid, float steps and all
    recall_edges = np.r_[0.0, recall, 1.0]
    envelope = np.maximum.accumulate(np.r_[0.0, precision, 0.0][::-1])[::-1]
    steps = np.flatnonzero(recall_edges[1:] != recall_edges[:-1])
    return float(np.sum((recall_edges[steps + 1] - recall_edges[steps]) * envelope[steps + 1]))


def voc_ap50(matches: Matches) -> dict:
    """VOC2007 11-point and VOC2010 all-point AP at IoU 0.5, per class and their
    mean over classes with ground truth. `matches` from match_detections(...,
    0.5, max_dets=None, style="voc")."""
    result = {"iou_threshold": 0.5, "matching": "PASCAL VOC devkit: IoU > 0.5, best-overlap box only, all detections"}
    for form, eleven_point in (("voc07_11point", True), ("voc10_all_point", False)):
        per_class = {}
        for k, name in enumerate(matches.classes):
            scores = np.concatenate(matches.scores[k]) if matches.image_ids else np.zeros(0)
            is_tp = np.concatenate(matches.is_tp[k]) if matches.image_ids else np.zeros(0, bool)
            per_class[name] = voc_average_precision(scores, is_tp, int(matches.n_gt[k].sum()), eleven_point)
        result[form] = {"map": mean_defined(per_class.values()), "per_class": per_class}
    return result


# ---------------------------------------------------------------- two models, same patients


def class_counts(matches: Matches, images_by_patient: dict[str, list[int]]) -> dict[str, dict]:
    """The ground truth behind each class's figures: boxes, and patients with at least one."""
    return {name: {"boxes": int(matches.n_gt[k].sum()),
                   "patients": sum(int(matches.n_gt[k, indices].sum() > 0) for indices in images_by_patient.values())}
            for k, name in enumerate(matches.classes)}


def _mixed_ap50(a: Matches, b: Matches, take_a: np.ndarray, image_indices: np.ndarray) -> np.ndarray:
    """[mean, class 1, class 2, ...] AP50 of detections taken image by image from
    `a` where take_a[image] else from `b` (NaN: no ground truth)."""
    values = []
    for k in range(len(a.classes)):
        scores = [a.scores[k][i] if take_a[i] else b.scores[k][i] for i in image_indices]
        is_tp = [a.is_tp[k][i] if take_a[i] else b.is_tp[k][i] for i in image_indices]
        ap = coco_average_precision(np.concatenate(scores) if scores else np.zeros(0),
                                    np.concatenate(is_tp) if is_tp else np.zeros(0, bool),
                                    int(a.n_gt[k, image_indices].sum()))
        values.append(np.nan if ap is None else ap)
    values = np.asarray(values, dtype=float)
    mean = np.nanmean(values) if np.isfinite(values).any() else np.nan
    return np.r_[mean, values]


def paired_comparison(a: Matches, b: Matches, images_by_patient: dict[str, list[int]], draws: int,
                      permutations: int, seed: int) -> dict:
    """AP50 of model a minus model b on the same test patients, overall (mean over
    classes) and per class:
    - a 95 % CI from a paired patient bootstrap: each draw resamples patients
      once and scores both models on that same resample;
    - a two-sided p-value from a paired permutation test: each permutation swaps
      the two models' detections within a random half of the patients; p is the
      share of permutations whose |delta| reaches the observed one (all 2^n
      swaps when that is no more than `permutations`, then p is exact; else
      random ones, counted with the observed assignment, (1 + hits) / (1 + n)).
    """
    if a.image_ids != b.image_ids or a.classes != b.classes or not np.array_equal(a.n_gt, b.n_gt):
        raise SpinedetError("the two models were not scored on the same test images and ground truth")
    names = ["mean", *a.classes]
    patients = list(images_by_patient)
    patient_of_image = np.zeros(len(a.image_ids), dtype=int)
    for p, patient in enumerate(patients):
        patient_of_image[images_by_patient[patient]] = p
    every_image = np.arange(len(a.image_ids))
    own = np.ones(len(a.image_ids), dtype=bool)

    def delta(take_a: np.ndarray, image_indices: np.ndarray) -> np.ndarray:
        return _mixed_ap50(a, b, take_a, image_indices) - _mixed_ap50(a, b, ~take_a, image_indices)

    ap_a, ap_b = _mixed_ap50(a, b, own, every_image), _mixed_ap50(a, b, ~own, every_image)
    observed = ap_a - ap_b
    rng = np.random.default_rng(seed)

    boot = np.full((draws, len(names)), np.nan)
    for d in tqdm(range(draws), desc="paired bootstrap", unit="draw", leave=False):
        chosen = rng.integers(0, len(patients), size=len(patients))
        image_indices = np.asarray([i for p in chosen for i in images_by_patient[patients[p]]], dtype=int)
        boot[d] = delta(own, image_indices)

    exact = 2 ** len(patients) <= permutations
    if exact:
        swaps = ((np.arange(2 ** len(patients))[:, None] >> np.arange(len(patients))) & 1).astype(bool)
    else:
        swaps = rng.random((permutations, len(patients))) < 0.5
    hits = np.zeros(len(names))
    for swap in tqdm(swaps, desc="permutations", unit="swap", leave=False):
        permuted = delta(~swap[patient_of_image], every_image)
        hits += np.abs(permuted) >= np.abs(observed) - 1e-12
    p_values = hits / len(swaps) if exact else (1 + hits) / (1 + len(swaps))

    def entry(j: int) -> dict:
        if np.isnan(observed[j]):
            return {"ap50_a": None, "ap50_b": None, "delta": None, "ci95": None, "p_value": None}
        valid = boot[:, j][~np.isnan(boot[:, j])]
        ci = [float(v) for v in np.percentile(valid, [2.5, 97.5])] if valid.size else None
        return {"ap50_a": float(ap_a[j]), "ap50_b": float(ap_b[j]), "delta": float(observed[j]), "ci95": ci,
                "p_value": float(min(p_values[j], 1.0))}

    return {"metric": "ap50", "n_patients": len(patients), "draws": draws,
            "permutations": len(swaps), "exact_permutation": exact, "seed": seed,
            **entry(0), "per_class": {name: entry(j) for j, name in enumerate(names) if name != "mean"}}


def _operating_points(scores: np.ndarray, is_tp: np.ndarray, n_images: int, n_gt: int):
    """(FPs per image, sensitivity) at every score threshold, starting from the
    'no detection' point. Tied scores form one threshold."""
    order = np.argsort(-scores, kind="mergesort")
    scores, is_tp = scores[order], is_tp[order]
    end_of_threshold = np.r_[scores[1:] != scores[:-1], True] if len(scores) else np.zeros(0, bool)
    tp_sum = np.cumsum(is_tp)[end_of_threshold]
    fp_sum = np.cumsum(~is_tp)[end_of_threshold]
    fps_per_image = np.r_[0.0, fp_sum / n_images]
    sensitivity = np.r_[0.0, tp_sum / n_gt] if n_gt else np.full(len(tp_sum) + 1, np.nan)
    return fps_per_image, sensitivity


def sensitivity_at(fps_per_image: np.ndarray, sensitivity: np.ndarray, rates) -> list[float]:
    """Best sensitivity reachable with at most `rate` false positives per image."""
    return [float(sensitivity[fps_per_image <= rate].max()) for rate in rates]


def froc(matches: Matches, fps_rates: list[float], iou_threshold: float) -> dict:
    """FROC: sensitivity at the given false-positive rates per image, per class and
    over all classes pooled, and their mean (CPM). FPs per image divide by every
    test image, those without ground truth included. `matches` must come from
    match_detections(..., iou_threshold, max_dets=None)."""
    n_images = len(matches.image_ids)

    def summary(scores: np.ndarray, is_tp: np.ndarray, n_gt: int) -> dict:
        if n_gt == 0:
            return {"n_gt": 0, "sensitivity": None, "cpm": None, "curve": None}
        fps, sens = _operating_points(scores, is_tp, n_images, n_gt)
        at_rates = sensitivity_at(fps, sens, fps_rates)
        return {
            "n_gt": int(n_gt),
            "sensitivity": at_rates,
            "cpm": float(np.mean(at_rates)),
            "curve": {"fps_per_image": FROC_CURVE_FPS.tolist(),
                      "sensitivity": sensitivity_at(fps, sens, FROC_CURVE_FPS)},
        }

    per_class = {}
    all_scores, all_tp = [], []
    for k, name in enumerate(matches.classes):
        scores = np.concatenate(matches.scores[k]) if n_images else np.zeros(0)
        is_tp = np.concatenate(matches.is_tp[k]) if n_images else np.zeros(0, bool)
        per_class[name] = summary(scores, is_tp, int(matches.n_gt[k].sum()))
        all_scores.append(scores)
        all_tp.append(is_tp)
    overall = summary(np.concatenate(all_scores), np.concatenate(all_tp), int(matches.n_gt.sum()))
    return {
        "iou_threshold": float(iou_threshold),
        "fps_per_image": [float(r) for r in fps_rates],
        "n_images": n_images,
        "per_class": per_class,
        "overall": overall,
        "cpm": overall["cpm"],
    }


# ---------------------------------------------------------------- patients


WILSON_Z = 1.959963984540054  # two-sided 95 %


def wilson_interval(successes: int, n: int) -> list[float] | None:
    """Wilson score 95 % interval of a proportion (None when n is 0)."""
    if n == 0:
        return None
    p, z2 = successes / n, WILSON_Z ** 2
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = WILSON_Z * np.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return [float(max(0.0, centre - half)), float(min(1.0, centre + half))]


def best_hit_scores(coco_gt: dict, detections: list[dict], classes: list[str], iou_threshold: float) -> dict:
    """Per patient: for each class, the highest score of a detection of that class
    that overlaps one of the patient's boxes of that class on the same slice by
    IoU >= threshold (None: the patient has no such box; -1: none is hit), and
    the highest score of any detection of that class ('flag', -1 without one)."""
    patient_of = {image["id"]: str(image["patient"]) for image in coco_gt["images"]}
    gt: dict[tuple[int, int], list] = {}
    for ann in coco_gt.get("annotations", []):
        gt.setdefault((ann["image_id"], ann["category_id"]), []).append(ann["bbox"])
    result = {patient: {"hit": {name: None for name in classes}, "flag": dict.fromkeys(classes, -1.0)}
              for patient in sorted(set(patient_of.values()))}
    for (image_id, category_id), _boxes in gt.items():
        result[patient_of[image_id]]["hit"][classes[category_id - 1]] = -1.0
    for det in detections:
        patient = result[patient_of[det["image_id"]]]
        name = classes[det["category_id"] - 1]
        patient["flag"][name] = max(patient["flag"][name], float(det["score"]))
        boxes = gt.get((det["image_id"], det["category_id"]))
        if boxes and box_iou_xywh(np.asarray([det["bbox"]]), np.asarray(boxes)).max() >= iou_threshold:
            patient["hit"][name] = max(patient["hit"][name], float(det["score"]))
    return result


def _lesion_and_flag(patient: dict, classes: list[str]) -> tuple[float | None, float]:
    """(best hit over the patient's lesion classes or None without lesions, best detection score)."""
    hits = [patient["hit"][name] for name in classes if patient["hit"][name] is not None]
    return (max(hits) if hits else None), max(patient["flag"][name] for name in classes)


def operating_threshold(val_gt: dict, val_detections: list[dict], classes: list[str], target_sensitivity: float,
                        floor: float) -> dict:
    """The highest score threshold at which at least `target_sensitivity` of the
    validation patients with a lesion have one of their lesions found (IoU >= 0.5).
    When no threshold reaches it, the lowest one kept (`floor`)."""
    scores = best_hit_scores(val_gt, val_detections, classes, 0.5)
    hits = sorted((best for best, _ in (_lesion_and_flag(p, classes) for p in scores.values()) if best is not None),
                  reverse=True)
    needed = int(np.ceil(target_sensitivity * len(hits) - 1e-9))
    reached = bool(hits) and needed >= 1 and hits[needed - 1] >= floor
    threshold = hits[needed - 1] if reached else floor
    return {"score_threshold": float(threshold), "chosen_on": "validation", "target_sensitivity": target_sensitivity,
            "reached": reached, "validation_patients_with_lesion": len(hits)}


def patient_level(coco_gt: dict, detections: list[dict], classes: list[str], threshold: float) -> dict:
    """Per-patient results at score >= threshold: sensitivity (patients with a
    lesion, one of whose lesions is found at IoU >= 0.1 and >= 0.5), specificity
    (patients without any lesion on their test slices and without a detection),
    per class and over all classes, with Wilson 95 % CIs and confusion counts."""
    kept = [det for det in detections if det["score"] >= threshold]
    at = {iou: best_hit_scores(coco_gt, kept, classes, iou) for iou in (0.1, 0.5)}

    def proportion(successes: int, n: int) -> dict:
        return {"value": successes / n if n else None, "ci95": wilson_interval(successes, n), "k": successes, "n": n}

    def summary(names: list[str]) -> dict:
        lesion, found = {0.1: 0, 0.5: 0}, {0.1: 0, 0.5: 0}
        negatives = flagged = 0
        for patient in at[0.5]:
            for iou in (0.1, 0.5):
                best, _ = _lesion_and_flag(at[iou][patient], names)
                if best is not None:
                    lesion[iou] += 1
                    found[iou] += best >= 0
            if all(at[0.5][patient]["hit"][name] is None for name in classes):  # no lesion of any class
                negatives += 1
                flagged += any(at[0.5][patient]["flag"][name] >= 0 for name in names)
        return {
            "sensitivity_iou10": proportion(found[0.1], lesion[0.1]),
            "sensitivity_iou50": proportion(found[0.5], lesion[0.5]),
            "specificity": proportion(negatives - flagged, negatives),
            "confusion_iou50": {"tp": found[0.5], "fn": lesion[0.5] - found[0.5],
                                "tn": negatives - flagged, "fp": flagged},
        }

    return {"score_threshold": float(threshold), "patients": len(at[0.5]), "overall": summary(list(classes)),
            "per_class": {name: summary([name]) for name in classes}}


def evaluate_detections(coco_gt: dict, detections: list[dict], classes: list[str],
                        evaluate_config: dict, seed: int) -> dict:
    """All test-set metrics for one model: the COCO summary, FROC and the
    patient-level bootstrap CIs (the metrics.json body, without model info)."""
    summary = coco_summary(coco_gt, detections, classes)
    froc_matches = match_detections(coco_gt, detections, classes,
                                    evaluate_config["froc_iou"], max_dets=None)
    ap_matches = match_detections(coco_gt, detections, classes, 0.5, max_dets=COCO_MAX_DETS)
    images_by_patient = patient_image_indices(coco_gt, ap_matches.image_ids)
    draws = int(evaluate_config["bootstrap"])
    log.info("bootstrap: %d draws over %d patients", draws, len(images_by_patient))
    froc_result = froc(froc_matches, evaluate_config["froc_fps"], evaluate_config["froc_iou"])
    voc_matches = match_detections(coco_gt, detections, classes, 0.5, max_dets=None, style="voc")
    return {
        "classes": list(classes),
        "n_images": len(ap_matches.image_ids),
        "n_patients": len(images_by_patient),
        **summary,
        "cpm": froc_result["cpm"],
        "froc": froc_result,
        "class_counts": class_counts(ap_matches, images_by_patient),
        "voc": voc_ap50(voc_matches),
        "bootstrap": bootstrap_ap50(ap_matches, images_by_patient, draws, seed),
    }
