"""Running a detector: the one inference path of validation (train),
evaluation and predict.

Every caller gets the same thing: the model in eval mode, no autograd, mixed
precision on CUDA (as in training) and fp32 on the CPU, outputs as float32
tensors on the CPU. The model keeps boxes down to the configured score
threshold.
"""

from __future__ import annotations

import contextlib
import time

import torch

from spinedet.timing import synchronize


def set_score_threshold(model: torch.nn.Module, score_threshold: float) -> None:
    """Let the model keep every box down to `score_threshold` (torchvision's
    Faster R-CNN drops boxes below its own box_score_thresh, 0.05 by default)."""
    roi_heads = getattr(model, "roi_heads", None)
    if roi_heads is not None and hasattr(roi_heads, "score_thresh"):
        roi_heads.score_thresh = float(score_threshold)


def precision(device: torch.device, amp: bool = True) -> contextlib.AbstractContextManager:
    """Autocast on CUDA, nothing on the CPU: the precision of every forward pass
    (`amp=False` forces fp32 on CUDA too, to check AMP against it)."""
    return torch.autocast(device_type="cuda", enabled=amp and device.type == "cuda")


@torch.inference_mode()
def infer(model: torch.nn.Module, images: list[torch.Tensor], device: torch.device,
          amp: bool = True) -> list[dict]:
    """torchvision detections (boxes xyxy, labels, scores) for a list of [C, H, W] images."""
    model.eval()
    with precision(device, amp):
        outputs = model([image.to(device) for image in images])
    return [{key: (value.float() if value.is_floating_point() else value).cpu() for key, value in output.items()}
            for output in outputs]


def to_coco_results(output: dict, image_id: int, score_threshold: float = 0.0) -> list[dict]:
    """One image's detections as COCO results entries ([x, y, w, h] to 0.001 px, score to 1e-6)."""
    keep = output["scores"] >= score_threshold
    results = []
    for (x1, y1, x2, y2), label, score in zip(output["boxes"][keep].tolist(), output["labels"][keep].tolist(),
                                              output["scores"][keep].tolist()):
        results.append({
            "image_id": int(image_id),
            "category_id": int(label),
            "bbox": [round(x1, 3), round(y1, 3), round(x2 - x1, 3), round(y2 - y1, 3)],
            "score": round(score, 6),
        })
    return results


def timed_detection(model: torch.nn.Module, dataset, index: int, device: torch.device, score_threshold: float,
                    amp: bool = True) -> tuple[list[dict], float, float]:
    """COCO results of one image of a spinedet.data.CocoSlices dataset at batch 1,
    with the seconds of the network alone (with its copies to and from the
    device) and end to end (read the PNG to COCO results)."""
    synchronize(device)
    start = time.perf_counter()
    image = dataset.read_image(index)
    model_start = time.perf_counter()
    output = infer(model, [image], device, amp)[0]  # ends with .cpu(): synchronised
    model_seconds = time.perf_counter() - model_start
    results = to_coco_results(output, dataset.images[index]["id"], score_threshold)
    return results, model_seconds, time.perf_counter() - start


def predict_coco(model: torch.nn.Module, loader, device: torch.device, score_threshold: float = 0.0) -> list[dict]:
    """COCO results for every image of a loader of (images, targets) batches (spinedet.data.collate)."""
    results = []
    for images, targets in loader:
        for target, output in zip(targets, infer(model, images, device)):
            results += to_coco_results(output, int(target["image_id"]), score_threshold)
    return results
