"""Inference cost of the detectors on CPU: native slice size vs torchvision's
default resize (min_size=800), and VGG-16 vs ResNet-50-FPN.

Ratios against a baseline measured in the same process, on the same random
inputs; untrained weights (the cost of a forward pass does not depend on them,
except through the number of proposals, which is capped the same way).

    .venv/bin/python benchmarks/inference_size.py --size 256 --iterations 10
"""

from __future__ import annotations

import argparse
import json

import torch

from spinedet.models import build_model
from spinedet.timing import environment, latency_stats, timed_calls

BASE_CFG = {"pretrained": "none"}
VARIANTS = {
    "resnet50_native": {"arch": "fasterrcnn_resnet50_fpn"},
    "resnet50_min800": {"arch": "fasterrcnn_resnet50_fpn", "min_size": 800, "max_size": 1333},
    "vgg16_native": {"arch": "fasterrcnn_vgg16", "anchor_sizes": [[16, 32, 64, 128]]},
}


def measure(model_cfg: dict, size: int, images: list[torch.Tensor], warmup: int, iterations: int) -> dict:
    model = build_model({**BASE_CFG, **model_cfg}, num_classes=3, image_size=size).eval()
    device = torch.device("cpu")
    with torch.inference_mode():
        seconds = timed_calls(lambda i: model([images[i % len(images)]]), warmup, iterations, device)
    return latency_stats(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    images = [torch.rand(1, args.size, args.size) for _ in range(4)]
    results = {name: measure(cfg, args.size, images, args.warmup, args.iterations)
               for name, cfg in VARIANTS.items()}
    baseline = results["resnet50_native"]["median"]
    print(f"{'variant':<18} {'median s/img':>12} {'p95':>8} {'ratio':>7}")
    for name, stats in results.items():
        print(f"{name:<18} {stats['median']:>12.3f} {stats['p95']:>8.3f} {stats['median'] / baseline:>7.2f}")
    print(json.dumps({"size": args.size, "results": results,
                      "environment": environment(torch.device("cpu"))}, indent=1))


if __name__ == "__main__":
    main()
