"""`spinedet speed`: every model the report compares, timed in one job on one device, interleaved.

Evaluate jobs can land on different machines (on a cluster, on different GPU
models), and a job timed while another one runs is slower for reasons that
are not the model's. So the timing comparison is one job: the models are
loaded together and take turns on the same test slices.

- Batch 1: `speed.slices` test slices spread evenly over the test set,
  after `speed.warmup` warm-up slices. On each slice every
  model runs once, in an order that alternates from slice to slice, so a
  drift in the machine's speed falls on all models alike. Each run is
  timed for the model alone (the network, with its copies to and from the
  device) and end to end (read the PNG to COCO results), in the precision of
  evaluate (spinedet.detect.engine.inference_precision).
- Batch `speed.batch_size`: `speed.iterations` timed
  batches per model after `warmup` untimed ones, interleaved batch by batch.

Writes --out/MODEL.json for every model: latency, throughput, the load on the
machine while it timed (spinedet.study.timing.MachineLoad) and the hardware and
software it ran on.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from spinedet import SpinedetError
from spinedet.detect import engine
from spinedet.study import timing as timing_lib
from spinedet.io import write_json
from spinedet.detect.models import resolve_device

log = logging.getLogger(__name__)

END_TO_END_STEPS = "read PNG, decode to float [1,H,W], copy to device, model, boxes to COCO"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from spinedet.config import add_config_argument

    add_config_argument(parser)
    parser.add_argument("--models", nargs="+", required=True, help="model names (keys of config models:)")
    parser.add_argument("--weights", nargs="+", required=True, type=Path,
                        help="best.pt of each model, in the order of --models")
    parser.add_argument("--test", required=True, type=Path, help="test split COCO JSON")
    parser.add_argument("--images", required=True, type=Path, help="slice PNG root (results/slices)")
    parser.add_argument("--out", required=True, type=Path, help="output folder: one MODEL.json per model")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")


def spread(n_images: int, count: int) -> list[int]:
    """`count` image indices spread evenly over 0..n_images-1 (all of them when count >= n_images)."""
    if count >= n_images:
        return list(range(n_images))
    return sorted({int(i) for i in np.linspace(0, n_images - 1, count).round()})


def turns(names: list[str], step: int) -> list[str]:
    """The models' order on one slice or batch: forward, then backward, and so on."""
    return names if step % 2 == 0 else names[::-1]


@torch.inference_mode()
def time_batch_1(models: dict[str, torch.nn.Module], dataset, device: torch.device, precision: str, warmup: int,
                 slices: int, score_threshold: float) -> dict[str, dict]:
    """Per model: latency statistics of the model alone and end to end, at batch 1, interleaved."""
    indices = spread(len(dataset), warmup + slices)
    if len(indices) <= warmup:
        raise SpinedetError(f"speed.warmup {warmup} leaves none of the {len(dataset)} test images timed")
    names = list(models)
    model_seconds = {name: [] for name in names}
    e2e_seconds = {name: [] for name in names}
    with timing_lib.MachineLoad() as load:
        for step, index in enumerate(tqdm(indices, desc="time batch 1", unit="slice")):
            for name in turns(names, step):
                _, model_s, e2e_s = engine.timed_detection(models[name], dataset, index, device, precision, score_threshold)
                if step >= warmup:
                    model_seconds[name].append(model_s)
                    e2e_seconds[name].append(e2e_s)
    return {
        name: {
            "model": timing_lib.latency_stats(model_seconds[name]),
            "end_to_end": timing_lib.latency_stats(e2e_seconds[name]),
            "images_per_s": len(model_seconds[name]) / sum(model_seconds[name]),
            "machine_load": load.record,
        }
        for name in names
    }


@torch.inference_mode()
def batch_throughput(models: dict[str, torch.nn.Module], dataset, device: torch.device, precision: str,
                     timing_config: dict) -> dict[str, dict]:
    """Per model: images per second at timing_config['batch_size'] (test slices in memory),
    over `iterations` timed batches after `warmup` untimed ones, interleaved batch by batch."""
    warmup, iterations = int(timing_config["warmup"]), int(timing_config["iterations"])
    batch_size = int(timing_config["batch_size"])
    on_device = [dataset.read_image(i).to(device) for i in range(min(len(dataset), batch_size * (warmup + iterations)))]
    names = list(models)
    for model in models.values():
        model.eval()
    seconds = {name: [] for name in names}
    with timing_lib.MachineLoad() as load:
        for step in range(warmup + iterations):
            batch = [on_device[(step * batch_size + j) % len(on_device)] for j in range(batch_size)]
            for name in turns(names, step):
                timing_lib.synchronize(device)
                start = time.perf_counter()
                engine.forward(models[name], batch, precision)
                timing_lib.synchronize(device)
                if step >= warmup:
                    seconds[name].append(time.perf_counter() - start)
    return {
        name: {"batch_size": batch_size, "images_per_s": batch_size * iterations / sum(seconds[name]),
               "seconds_per_image": sum(seconds[name]) / (batch_size * iterations),
               "batch_seconds": timing_lib.latency_stats(seconds[name]), "machine_load": load.record}
        for name in names
    }


def time_models(models: dict[str, torch.nn.Module], dataset, device: torch.device, config: dict) -> dict[str, dict]:
    """timing JSON per model (see the module docstring)."""
    timing_config = config["speed"]
    score_threshold = float(config["evaluate"]["score_threshold"])
    for model in models.values():
        model.to(device).eval()
        engine.set_score_threshold(model, score_threshold)
    precision = engine.inference_precision(device, config["train"]["cpu_inference_precision"])
    latency = time_batch_1(models, dataset, device, precision, int(timing_config["warmup"]),
                           int(timing_config["slices"]), score_threshold)
    batched = batch_throughput(models, dataset, device, precision, timing_config)
    environment = timing_lib.environment(device)
    results = {}
    for name in models:
        results[name] = {
            "model": name,
            "device": device.type,
            "precision": precision,
            "interleaved_with": [other for other in models if other != name],
            "warmup": int(timing_config["warmup"]),
            "iterations": int(timing_config["iterations"]),
            "latency_s": {"model": latency[name]["model"], "end_to_end": latency[name]["end_to_end"]},
            "end_to_end_steps": END_TO_END_STEPS,
            "throughput": [
                {"batch_size": 1, "images_per_s": latency[name]["images_per_s"],
                 "machine_load": latency[name]["machine_load"]},
                batched[name],
            ],
            **environment,
        }
        log.info("%s: model median %.4f s/slice (min %.4f), end to end %.4f; batch %d %.1f slices/s", name,
                 latency[name]["model"]["median"], latency[name]["model"]["min"],
                 latency[name]["end_to_end"]["median"], batched[name]["batch_size"], batched[name]["images_per_s"])
    return results


def speed(config: dict, names: list[str], weights: list[Path], test: Path, images: Path, out: Path,
          threads: int) -> dict[str, dict]:
    """The verb on a loaded config: load every model, time them together, write one JSON each."""
    from spinedet.dataset.data import CocoSlices, load_coco
    from spinedet.detect.models import load_trained

    if len(names) != len(weights):
        raise SpinedetError(f"--weights: {len(weights)} file(s) for {len(names)} model(s)")
    unknown = [name for name in names if name not in config["models"]]
    if unknown:
        raise SpinedetError(f"--models {', '.join(unknown)}: not in config models ({', '.join(config['models'])})")
    torch.set_num_threads(threads)
    device = resolve_device(config["train"]["device"])
    models = {name: load_trained(path, device)[0] for name, path in zip(names, weights)}
    test_coco = load_coco(test)
    if not test_coco["images"]:
        raise SpinedetError("the test split has no images: nothing to time")
    results = time_models(models, CocoSlices(test_coco, images), device, config)
    for name, result in results.items():
        write_json(out / f"{name}.json", result)
    return results


def run(args: argparse.Namespace) -> int:
    from spinedet.config import load

    config = load(args.config)
    speed(config, args.models, args.weights, args.test, args.images, args.out, args.threads)
    return 0
