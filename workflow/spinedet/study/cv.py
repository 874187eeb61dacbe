"""`spinedet cv`: the cross-validation summary (`split.folds` = k >= 2).

Each model was trained k times (fold i: trained on the other folds of
train+val, selected on fold i) and every fold's weights tested on the same
fixed test split. This verb reads each fold's metrics.json and detections.json
and writes:
- cv_summary.csv: one row per model: folds, AP50 mean and sd over the folds
  (overall and per class), and the AP50 of the fold ensemble;
- cv_ensemble.json: per model, the ensemble's AP50 (overall and per class) and
  how it was made.

The ensemble merges the k folds' detections image by image and class by
class with non-maximum suppression (torchvision.ops.batched_nms, IoU 0.5): of
overlapping boxes the highest-scored one stays, as it is.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

from spinedet import SpinedetError
from spinedet.study import metrics as metrics_lib
from spinedet.io import read_json, write_csv, write_json

log = logging.getLogger(__name__)

ENSEMBLE_IOU = 0.5
ENSEMBLE_METHOD = (f"the folds' detections pooled per slice and class, then non-maximum suppression at IoU "
                   f"{ENSEMBLE_IOU} (the highest-scored of overlapping boxes kept, score unchanged)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from spinedet.config import add_config_argument

    add_config_argument(parser)
    parser.add_argument("--models", nargs="+", required=True, help="model names")
    parser.add_argument("--metrics", nargs="+", required=True, type=Path,
                        help="every fold's metrics.json, model by model, fold by fold (models x folds files)")
    parser.add_argument("--detections", nargs="+", required=True, type=Path,
                        help="every fold's detections.json, in the order of --metrics")
    parser.add_argument("--test", required=True, type=Path, help="test split COCO JSON")
    parser.add_argument("--summary", required=True, type=Path, help="cv_summary.csv to write")
    parser.add_argument("--ensemble", required=True, type=Path, help="cv_ensemble.json to write")


def ensemble_detections(fold_detections: list[list[dict]], iou_threshold: float = ENSEMBLE_IOU) -> list[dict]:
    """The folds' COCO results merged by class-wise NMS on each image."""
    import torch
    from torchvision.ops import batched_nms

    pooled = [det for detections in fold_detections for det in detections]
    by_image: dict[int, list[dict]] = {}
    for det in pooled:
        by_image.setdefault(det["image_id"], []).append(det)
    merged = []
    for image_id in sorted(by_image):
        dets = by_image[image_id]
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (d["bbox"] for d in dets)], dtype=torch.float64)
        scores = torch.tensor([d["score"] for d in dets], dtype=torch.float64)
        labels = torch.tensor([d["category_id"] for d in dets])
        keep = batched_nms(boxes, scores, labels, iou_threshold)
        merged += [dets[int(i)] for i in keep]
    return merged


def mean_sd(values: list[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation over the folds with a value."""
    defined = np.asarray([v for v in values if v is not None], dtype=float)
    if defined.size == 0:
        return None, None
    return float(defined.mean()), float(defined.std(ddof=1)) if defined.size > 1 else None


def summarise(config: dict, models: list[str], fold_metrics: dict[str, list[dict]],
              fold_detections: dict[str, list[list[dict]]], test_coco: dict) -> tuple[list[dict], dict]:
    """(cv_summary.csv rows, cv_ensemble.json body)."""
    classes = list(config["classes"])
    rows, ensembles = [], {}
    for model in models:
        folds = fold_metrics[model]
        row = {"model": model, "folds": len(folds)}
        row["ap50_mean"], row["ap50_sd"] = mean_sd([m["ap50"] for m in folds])
        for name in classes:
            row[f"ap50_{name}_mean"], row[f"ap50_{name}_sd"] = mean_sd([m["ap50_per_class"].get(name) for m in folds])
        merged = ensemble_detections(fold_detections[model])
        ensemble = metrics_lib.coco_summary(test_coco, merged, classes)
        row["ensemble_ap50"] = ensemble["ap50"]
        for name in classes:
            row[f"ensemble_ap50_{name}"] = ensemble["ap50_per_class"].get(name)
        rows.append(row)
        ensembles[model] = {"folds": len(folds), "detections": len(merged), "ap50": ensemble["ap50"],
                            "ap50_per_class": ensemble["ap50_per_class"]}
        log.info("%s: AP50 %.3f ± %s over %d folds, fold ensemble %.3f", model, row["ap50_mean"] or 0.0,
                 "n/a" if row["ap50_sd"] is None else f"{row['ap50_sd']:.3f}", len(folds), row["ensemble_ap50"] or 0.0)
    return rows, {"method": ENSEMBLE_METHOD, "iou_threshold": ENSEMBLE_IOU, "models": ensembles}


def run(args: argparse.Namespace) -> int:
    from spinedet.config import load

    config = load(args.config)
    folds = int(config["split"]["folds"])
    expected = folds * len(args.models)
    if folds < 2:
        raise SpinedetError(f"split.folds is {folds}: cross-validation needs at least 2 folds")
    if len(args.metrics) != expected or len(args.detections) != expected:
        raise SpinedetError(f"{len(args.models)} models x {folds} folds need {expected} --metrics and --detections "
                            f"files, got {len(args.metrics)} and {len(args.detections)}")
    fold_metrics = {m: [read_json(p) for p in args.metrics[i * folds:(i + 1) * folds]]
                    for i, m in enumerate(args.models)}
    fold_detections = {m: [read_json(p) for p in args.detections[i * folds:(i + 1) * folds]]
                       for i, m in enumerate(args.models)}
    rows, ensemble = summarise(config, args.models, fold_metrics, fold_detections, read_json(args.test))
    write_csv(args.summary, rows, list(rows[0]))
    write_json(args.ensemble, ensemble, indent=1)
    return 0
