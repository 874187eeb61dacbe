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

from pathlib import Path

import torch

from spinedet.config import load
from spinedet.detect.models import build_model
from spinedet.study.timing import environment, latency_stats, timed_calls

REPO = Path(__file__).resolve().parents[1]


def variants(config: dict) -> dict:
    """The study's two models as configured, and ResNet-50 at torchvision's default resize."""
    resnet50, vgg16 = config["models"]["resnet50"], config["models"]["vgg16"]
    return {
        "resnet50_native": resnet50,
        "resnet50_min800": {**resnet50, "min_size": 800, "max_size": 1333},
        "vgg16_native": vgg16,
    }


def measure(model_cfg: dict, size: int, images: list[torch.Tensor], warmup: int, iterations: int) -> dict:
    model = build_model({**model_cfg, "pretrained": "none"}, num_classes=3, image_size=size).eval()
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
    parser.add_argument("--config", default=str(REPO / "config.yaml"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    images = [torch.rand(1, args.size, args.size) for _ in range(4)]
    results = {name: measure(cfg, args.size, images, args.warmup, args.iterations)
               for name, cfg in variants(load(args.config)).items()}
    baseline = results["resnet50_native"]["median"]
    print(f"{'variant':<18} {'median s/img':>12} {'p95':>8} {'ratio':>7}")
    for name, stats in results.items():
        print(f"{name:<18} {stats['median']:>12.3f} {stats['p95']:>8.3f} {stats['median'] / baseline:>7.2f}")
    print(json.dumps({"size": args.size, "results": results,
                      "environment": environment(torch.device("cpu"))}, indent=1))


if __name__ == "__main__":
    main()
