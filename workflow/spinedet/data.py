"""Slice datasets for the detectors: COCO JSON + 8-bit grayscale PNGs (written by
the slices stage, merged by split), the training augmentation and the collate
function.

Targets follow torchvision's detection convention: boxes as float
[x_min, y_min, x_max, y_max] in pixel-edge coordinates, labels int64 with
0 = background, so a COCO `category_id` (1..n in `classes` order) is the label.
Slices without boxes stay in the dataset as negatives (boxes of shape (0, 4)).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

from spinedet import SpinedetError

# Jitter small enough to keep the anatomy plausible.
AFFINE_DEGREES = 5.0
AFFINE_TRANSLATE = 0.05
AFFINE_SCALE = (0.95, 1.05)
BRIGHTNESS = 0.2
CONTRAST = 0.2


def load_coco(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise SpinedetError(f"COCO file not found: {path}")
    try:
        coco = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SpinedetError(f"{path} is not valid JSON ({exc})") from exc
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco.get(key), list):
            raise SpinedetError(f"{path} is not a COCO dataset: no '{key}' list")
    return coco


def category_names(coco: dict) -> list[str]:
    """Category names in id order."""
    return [c["name"] for c in sorted(coco["categories"], key=lambda c: c["id"])]


def check_categories(coco: dict, classes: list[str], source: str) -> None:
    """The contract: category ids 1..n name the config's `classes` in order."""
    expected = [{"id": i + 1, "name": name} for i, name in enumerate(classes)]
    found = [{"id": c["id"], "name": c["name"]} for c in sorted(coco["categories"], key=lambda c: c["id"])]
    if found != expected:
        raise SpinedetError(f"{source}: categories {found} do not match config classes {classes} (ids 1..n in order)")


def image_size(coco: dict) -> int:
    """The largest slice side in a COCO dataset: the detectors' min_size = max_size."""
    if not coco["images"]:
        raise SpinedetError("COCO dataset has no images: cannot tell the slice size")
    return max(max(int(img["width"]), int(img["height"])) for img in coco["images"])


def coco_to_xyxy(bbox: list[float]) -> list[float]:
    x, y, w, h = bbox
    return [x, y, x + w, y + h]


class CocoSlices(torch.utils.data.Dataset):
    """(image float [1, H, W] in 0..1, {"boxes", "labels", "image_id"}) per COCO image."""

    def __init__(self, coco_json: str | Path | dict, image_root: str | Path, transforms=None):
        self.coco = coco_json if isinstance(coco_json, dict) else load_coco(coco_json)
        self.image_root = Path(image_root)
        if not self.image_root.is_dir():
            raise SpinedetError(f"image folder not found: {self.image_root}")
        self.transforms = transforms
        self.images = sorted(self.coco["images"], key=lambda img: img["id"])
        self.boxes_by_image: dict[int, list[dict]] = {img["id"]: [] for img in self.images}
        for ann in self.coco["annotations"]:
            if ann["image_id"] not in self.boxes_by_image:
                raise SpinedetError(f"annotation {ann.get('id')} refers to unknown image_id {ann['image_id']}")
            self.boxes_by_image[ann["image_id"]].append(ann)

    def __len__(self) -> int:
        return len(self.images)

    def read_image(self, index: int) -> torch.Tensor:
        path = self.image_root / self.images[index]["file_name"]
        if not path.is_file():
            raise SpinedetError(f"slice image not found: {path}")
        with Image.open(path) as png:
            pixels = np.asarray(png.convert("L"))
        return torch.from_numpy(pixels.copy()).float().div_(255.0).unsqueeze(0)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        info = self.images[index]
        image = self.read_image(index)
        anns = self.boxes_by_image[info["id"]]
        boxes = torch.tensor([coco_to_xyxy(a["bbox"]) for a in anns], dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor([a["category_id"] for a in anns], dtype=torch.int64)
        if self.transforms is not None:
            image, boxes, labels = apply_transforms(self.transforms, image, boxes, labels)
        return image, {"boxes": boxes, "labels": labels, "image_id": int(info["id"])}


def apply_transforms(transforms, image: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor):
    """Run v2 transforms so boxes follow the image; return plain tensors."""
    wrapped_boxes = tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=tuple(image.shape[-2:]))
    image, target = transforms(tv_tensors.Image(image), {"boxes": wrapped_boxes, "labels": labels})
    return (
        image.as_subclass(torch.Tensor),
        target["boxes"].as_subclass(torch.Tensor).float().reshape(-1, 4),
        target["labels"],
    )


def train_transforms(hflip: bool = False) -> v2.Compose:
    """Small geometric and intensity jitter; boxes follow, degenerate ones are dropped.

    hflip is off by default: on a sagittal slice a horizontal flip swaps
    anterior and posterior, producing anatomy that never occurs.
    """
    steps = [v2.RandomHorizontalFlip(p=0.5)] if hflip else []
    steps += [
        v2.RandomAffine(degrees=AFFINE_DEGREES, translate=(AFFINE_TRANSLATE,) * 2, scale=AFFINE_SCALE),
        v2.ColorJitter(brightness=BRIGHTNESS, contrast=CONTRAST),
        v2.ClampBoundingBoxes(),
        v2.SanitizeBoundingBoxes(min_size=1.0),
    ]
    return v2.Compose(steps)


def collate(batch: list) -> tuple[list[torch.Tensor], list[dict]]:
    """Detection batches are lists: slices may differ in size and box count."""
    images, targets = zip(*batch) if batch else ((), ())
    return list(images), list(targets)
