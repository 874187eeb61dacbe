"""Running a detector: the one inference path of validation (train),
evaluation and predict.

Every caller gets the same thing: the model in eval mode, no autograd, mixed
precision on CUDA (as in training) and fp32 on the CPU, outputs as float32
tensors on the CPU. The model keeps boxes down to the configured score
threshold.
"""

from __future__ import annotations

import contextlib

import torch


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


def predict_coco(model: torch.nn.Module, loader, device: torch.device, score_threshold: float = 0.0) -> list[dict]:
    """COCO results for every image of a loader of (images, targets) batches (spinedet.data.collate)."""
    results = []
    for images, targets in loader:
        for target, output in zip(targets, infer(model, images, device)):
            results += to_coco_results(output, int(target["image_id"]), score_threshold)
    return results
