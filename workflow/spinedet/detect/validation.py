"""COCO AP50 on the validation split: the score `spinedet train` keeps the best
epoch by. pycocotools' COCOeval, run quietly; `spinedet.study.metrics` builds
the test split's summaries on the same run."""

from __future__ import annotations

import contextlib
import copy
import io

import numpy as np


def with_box_areas(coco_gt: dict) -> dict:
    """A copy of the ground truth where every annotation has `area` and `iscrowd`
    (pycocotools needs both; COCO files written by hand may lack them)."""
    coco_gt = copy.deepcopy(coco_gt)
    for ann in coco_gt.get("annotations", []):
        ann.setdefault("area", float(ann["bbox"][2] * ann["bbox"][3]))
        ann.setdefault("iscrowd", 0)
    coco_gt.setdefault("info", {})
    return coco_gt


def run_cocoeval(coco_gt: dict, detections: list[dict], iou_thresholds: list[float] | None = None):
    """Run pycocotools' bbox COCOeval (evaluate, accumulate, summarize) quietly.

    Returns the COCOeval object, or None when there are no detections at all
    (pycocotools cannot load an empty result list).
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if not detections:
        return None
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = with_box_areas(coco_gt)
        gt.createIndex()
        dt = gt.loadRes(copy.deepcopy(detections))
        evaluator = COCOeval(gt, dt, iouType="bbox")
        if iou_thresholds is not None:
            evaluator.params.iouThrs = np.asarray(iou_thresholds, dtype=float)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


def validation_ap50(coco_gt: dict, detections: list[dict]) -> float | None:
    """COCO AP at IoU 0.5, the validation score that picks the best epoch:
    None when the ground truth has no box, 0 without detections."""
    if not coco_gt["annotations"]:
        return None
    evaluator = run_cocoeval(coco_gt, detections)
    return 0.0 if evaluator is None else defined(evaluator.stats[1])


def defined(value: float) -> float | None:
    """COCO marks undefined values (no ground truth) with -1; JSON gets null."""
    return None if value < 0 else float(value)
