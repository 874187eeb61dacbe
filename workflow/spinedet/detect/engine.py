"""Running a detector: the one inference path of validation (train),
evaluation and predict.

Every caller gets the same thing: the model in eval mode, no autograd, the
backbone (body and FPN) in the precision of `inference_precision` (float16
autocast on CUDA, as in training; bfloat16 autocast on a CPU with native
bfloat16 instructions; else float32) and the RPN, box head, box decoding and
NMS in float32, outputs as float32 tensors on the CPU. The model keeps boxes
down to the configured score threshold.
"""

from __future__ import annotations

import contextlib
import time
from collections import OrderedDict

import torch



def synchronize(device: torch.device) -> None:
    """Wait for the device's queued kernels: CUDA runs asynchronously, so a clock
    read without this measures only the launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def set_score_threshold(model: torch.nn.Module, score_threshold: float) -> None:
    """Let the model keep every box down to `score_threshold` (torchvision's
    Faster R-CNN drops boxes below its own box_score_thresh, 0.05 by default)."""
    roi_heads = getattr(model, "roi_heads", None)
    if roi_heads is not None and hasattr(roi_heads, "score_thresh"):
        roi_heads.score_thresh = float(score_threshold)


AUTOCAST_DTYPES = {"float32": None, "float16": torch.float16, "bfloat16": torch.bfloat16}


def cpu_has_native_bfloat16() -> bool:
    """AVX512-BF16 or AMX: bfloat16 matrix products in hardware. Without them
    oneDNN emulates bfloat16 and is slower than float32."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()  # noqa: SLF001


def inference_precision(device: torch.device, cpu_precision: str = "auto") -> str:
    """The precision of every forward pass outside training (config
    `train.cpu_inference_precision` on the CPU): float16 on CUDA; on the CPU
    bfloat16 or float32 as asked, `auto` = bfloat16 where the CPU has it natively."""
    if device.type == "cuda":
        return "float16"
    if cpu_precision == "auto":
        return "bfloat16" if cpu_has_native_bfloat16() else "float32"
    if cpu_precision not in ("bfloat16", "float32"):
        raise ValueError(f"CPU inference precision {cpu_precision!r} is not one of auto, bfloat16, float32")
    return cpu_precision


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast context of `precision` (float32: none)."""
    dtype = AUTOCAST_DTYPES[precision]
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype is not None)


@torch.inference_mode()
def forward(model: torch.nn.Module, images: list[torch.Tensor], precision: str) -> list[dict]:
    """torchvision's GeneralizedRCNN.forward in eval mode (images on the model's
    device), with only the backbone under autocast: its features reach the RPN
    and the box head as float32. Autocast over the whole detector would also
    round the box regression and the scores; on the demo's weights that cost
    bfloat16 3.6 (ResNet-50-FPN) and 7.0 (VGG-16-FPN) points of test AP50,
    while the backbone alone changed it by less than 0.5 (benchmarks/README.md)."""
    model.eval()
    original_sizes = [(int(image.shape[-2]), int(image.shape[-1])) for image in images]
    image_list, _ = model.transform(images)
    with autocast(image_list.tensors.device, precision):
        features = model.backbone(image_list.tensors)
    if isinstance(features, torch.Tensor):
        features = OrderedDict([("0", features)])
    features = OrderedDict((name, feature.float()) for name, feature in features.items())
    proposals, _ = model.rpn(image_list, features)
    detections, _ = model.roi_heads(features, proposals, image_list.image_sizes)
    return model.transform.postprocess(detections, image_list.image_sizes, original_sizes)


def infer(model: torch.nn.Module, images: list[torch.Tensor], device: torch.device, precision: str) -> list[dict]:
    """torchvision detections (boxes xyxy, labels, scores) for a list of [C, H, W] images."""
    outputs = forward(model, [image.to(device) for image in images], precision)
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


def timed_detection(model: torch.nn.Module, dataset, index: int, device: torch.device, precision: str,
                    score_threshold: float) -> tuple[list[dict], float, float]:
    """COCO results of one image of a spinedet.dataset.data.CocoSlices dataset at batch 1,
    with the seconds of the network alone (with its copies to and from the
    device) and end to end (read the PNG to COCO results)."""
    synchronize(device)
    start = time.perf_counter()
    image = dataset.read_image(index)
    model_start = time.perf_counter()
    output = infer(model, [image], device, precision)[0]  # ends with .cpu(): synchronised
    model_seconds = time.perf_counter() - model_start
    results = to_coco_results(output, dataset.images[index]["id"], score_threshold)
    return results, model_seconds, time.perf_counter() - start


def predict_coco(model: torch.nn.Module, loader, device: torch.device, precision: str,
                 score_threshold: float = 0.0) -> list[dict]:
    """COCO results for every image of a loader of (images, targets) batches (spinedet.dataset.data.collate)."""
    results = []
    for images, targets in loader:
        for target, output in zip(targets, infer(model, images, device, precision)):
            results += to_coco_results(output, int(target["image_id"]), score_threshold)
    return results
