"""A Faster R-CNN small enough for unit tests, a six-slice test split and a
saved `best.pt` of it: what the evaluate and speed tests run on (the
fixtures `tiny_arch` and `test_split` are in conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import MultiScaleRoIAlign

from spinedet.detect import models

CLASSES = ["disc_herniation", "cord_injury"]
SIZE = 64


def tiny_detector(model_cfg: dict, num_classes: int, image_size: int, load_weights: bool = True) -> FasterRCNN:
    """A Faster R-CNN small enough for a unit test (one 8-channel conv as backbone)."""
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3, stride=4, padding=1), nn.ReLU())
    backbone.out_channels = 8
    model = FasterRCNN(
        backbone,
        rpn_anchor_generator=AnchorGenerator(sizes=((8, 16),), aspect_ratios=((1.0,),)),
        box_roi_pool=MultiScaleRoIAlign(["0"], output_size=7, sampling_ratio=2),
        box_head=TwoMLPHead(8 * 7 * 7, 32),
        box_predictor=FastRCNNPredictor(32, num_classes),
        min_size=image_size,
        max_size=image_size,
    )
    return models.use_grayscale_transform(model)


def write_slices(root: Path, size: int = SIZE, count: int = 6, box: tuple[int, int, int, int] = (24, 20, 16, 10),
                 lesion_free: tuple[int, ...] = (6,)) -> dict:
    """`count` noise slices of `size` px, two per patient, under root/slices, with a
    bright lesion and its box [x, y, w, h] on every slice not in `lesion_free`
    (classes alternating); their COCO dict."""
    slices = root / "slices"
    rng = np.random.default_rng(0)
    x, y, w, h = box
    images, annotations = [], []
    for image_id in range(1, count + 1):
        patient = f"p{(image_id - 1) // 2}"
        name = f"sub-{patient}/sub-{patient}_slice-{image_id:02d}.png"
        pixels = rng.integers(0, 60, (size, size), dtype=np.uint8)
        if image_id not in lesion_free:
            pixels[y:y + h, x:x + w] = 220
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": 1 + image_id % 2,
                                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
        (slices / f"sub-{patient}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(slices / name)
        images.append({"id": image_id, "file_name": name, "width": size, "height": size,
                       "patient": patient, "group": "disc", "slice_index": image_id})
    return {"images": images, "annotations": annotations,
            "categories": [{"id": k + 1, "name": c} for k, c in enumerate(CLASSES)]}


def write_test_split(root: Path) -> tuple[Path, Path, dict]:
    """Six 64x64 slices of three patients (one slice without lesions) and their COCO:
    (test.json, slice root, COCO)."""
    coco = write_slices(root)
    test_json = root / "test.json"
    test_json.write_text(json.dumps(coco))
    return test_json, root / "slices", coco


def save_best(path: Path, classes=CLASSES) -> Path:
    torch.manual_seed(0)
    model = tiny_detector({}, len(classes) + 1, SIZE)
    torch.save({"model": model.state_dict(), "model_config": {"arch": "tiny_test"}, "classes": classes,
                "image_size": SIZE, "epoch": 3, "val_ap50": 0.25, "model_name": "tiny"}, path)
    return path


def study_config() -> dict:
    return {
        "seed": 11,
        "classes": CLASSES,
        "models": {"tiny": {"arch": "tiny_test"}},
        "train": {"device": "cpu", "cpu_inference_precision": "auto"},
        "evaluate": {"score_threshold": 0.05, "froc_iou": 0.5, "froc_fps": [0.125, 0.25, 0.5, 1, 2, 4, 8],
                     "bootstrap": 20,
                     "operating_point": {"sensitivity": 0.9, "score_threshold": None}},
    }
