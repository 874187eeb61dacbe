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
import math
from collections import Counter
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


def pixel_spacing_mm(coco: dict) -> list[float] | None:
    """Median (row, column) pixel spacing in mm of a COCO dataset's slices, None when not recorded."""
    spacings = [(img["pixel_height_mm"], img["pixel_width_mm"]) for img in coco["images"]
                if img.get("pixel_height_mm") and img.get("pixel_width_mm")]
    if not spacings:
        return None
    return [round(float(v), 4) for v in np.median(np.asarray(spacings, dtype=float), axis=0)]


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
        missing = [img["file_name"] for img in self.images if not (self.image_root / img["file_name"]).is_file()]
        if missing:
            # Snakemake (7.7 and later) does not remake a file deleted from a finished
            # output while the files made from it are up to date: say how.
            raise SpinedetError(
                f"{len(missing)} of the {len(self.images)} slice images the COCO file names are missing from "
                f"{self.image_root} (first: {missing[0]}); regenerate them with `snakemake --forcerun slices`")
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


class LesionCrop(torch.nn.Module):
    """A square training crop of `size` px; with probability `lesion_share` it
    holds a randomly chosen box whole, at a random place in the crop.

    The lesions lie in a narrow band along the canal, so most of a whole slice
    teaches the detector only "background". Boxes the crop cuts keep their
    visible part when at least half of them is left, else they are dropped
    (a sliver is no lesion to learn). Slices no larger than `size` pass as
    they are. Crops keep their native pixels: the model must not resize them
    (see models.GrayscaleRCNNTransform).
    """

    def __init__(self, size: int, lesion_share: float = 0.7, min_visible: float = 0.5):
        super().__init__()
        self.size = int(size)
        self.lesion_share = float(lesion_share)
        self.min_visible = float(min_visible)

    def window(self, height: int, width: int, boxes: torch.Tensor) -> tuple[int, int, int, int]:
        """(top, left, crop height, crop width), drawn with torch's RNG."""
        crop_h, crop_w = min(self.size, height), min(self.size, width)
        top_max, left_max = height - crop_h, width - crop_w
        if len(boxes) and float(torch.rand(())) < self.lesion_share:
            x0, y0, x1, y1 = boxes[int(torch.randint(len(boxes), ()))].tolist()
            # every window position that holds the box whole (or as much of it as fits)
            left_lo, left_hi = max(0, math.ceil(x1) - crop_w), min(left_max, math.floor(x0))
            top_lo, top_hi = max(0, math.ceil(y1) - crop_h), min(top_max, math.floor(y0))
            left_lo, top_lo = min(left_lo, left_hi), min(top_lo, top_hi)
        else:
            left_lo, left_hi, top_lo, top_hi = 0, left_max, 0, top_max
        top = int(torch.randint(top_lo, top_hi + 1, ()))
        left = int(torch.randint(left_lo, left_hi + 1, ()))
        return top, left, crop_h, crop_w

    def forward(self, image: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor):
        height, width = image.shape[-2:]
        if height <= self.size and width <= self.size:
            return image, boxes, labels
        top, left, crop_h, crop_w = self.window(height, width, boxes)
        image = image[..., top:top + crop_h, left:left + crop_w]
        shifted = boxes - torch.tensor([left, top, left, top], dtype=boxes.dtype)
        clipped = torch.stack([
            shifted[:, 0].clamp(0, crop_w), shifted[:, 1].clamp(0, crop_h),
            shifted[:, 2].clamp(0, crop_w), shifted[:, 3].clamp(0, crop_h),
        ], dim=1).reshape(-1, 4)
        area = (shifted[:, 2] - shifted[:, 0]) * (shifted[:, 3] - shifted[:, 1])
        visible = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
        keep = visible >= self.min_visible * area.clamp(min=1e-6)
        return image, clipped[keep], labels[keep]


class TrainingSlices(torch.utils.data.Dataset):
    """CocoSlices for training: jitter on the whole slice, then an optional box-aware crop."""

    def __init__(self, slices: CocoSlices, crop: LesionCrop | None):
        self.slices = slices
        self.crop = crop

    def __len__(self) -> int:
        return len(self.slices)

    def __getitem__(self, index: int):
        image, target = self.slices[index]
        if self.crop is not None:
            image, target["boxes"], target["labels"] = self.crop(image, target["boxes"], target["labels"])
        return image, target


def sampling_weights(coco: dict, negative_share: float) -> list[float]:
    """Per-image weights for class-balanced sampling, in image id order.

    Lesion-free slices together get `negative_share` of the draws; the rest is
    shared equally by the classes, each lesion slice counted under the rarest
    class it shows, so a class seen on few slices is drawn about as often as
    a common one (slices showing both count for the rarer only).
    """
    images = sorted(coco["images"], key=lambda img: img["id"])
    image_classes: dict[int, set[int]] = {img["id"]: set() for img in images}
    for ann in coco["annotations"]:
        image_classes[ann["image_id"]].add(int(ann["category_id"]))
    slices_showing = Counter(k for found in image_classes.values() for k in found)
    # each lesion slice counts for the rarest class it shows
    assigned = {image_id: min(found, key=lambda k: (slices_showing[k], k))
                for image_id, found in image_classes.items() if found}
    per_class = Counter(assigned.values())
    negatives = len(images) - len(assigned)
    if not per_class:
        return [1.0] * len(images)
    lesion_share = 1 - negative_share if negatives else 1.0
    weights = []
    for img in images:
        if img["id"] in assigned:
            k = assigned[img["id"]]
            weights.append(lesion_share / len(per_class) / per_class[k])
        else:
            weights.append(negative_share / negatives)
    return weights


def collate(batch: list) -> tuple[list[torch.Tensor], list[dict]]:
    """Detection batches are lists: slices may differ in size and box count."""
    images, targets = zip(*batch) if batch else ((), ())
    return list(images), list(targets)
