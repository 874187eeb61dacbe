"""The GPU check: both detectors trained a fixed number of iterations with AMP,
timed with synchronised clocks at batch 1 and batch n, AMP against fp32 AP50
on the same weights, one JSON beside the paper's 0.22 / 0.24 s/image.

It runs the project's own code paths (spinedet.detect.train.train_one_epoch with
autocast and GradScaler, spinedet.study.evaluate.detect and spinedet.study.speed.batch_throughput,
pycocotools AP50), so what it proves holds for `snakemake` on a GPU node.

Data: a results folder with slices/ and split/{train,val,test}.json, made by

    snakemake benchmarks/out/gpu_check/results/split/test.json --cores 2 \\
        --configfile config.yaml config/gpu_check.yaml

(`--build` runs exactly that when --data is missing). Then, on the GPU:

    python benchmarks/gpu_check.py --data benchmarks/out/gpu_check/results \\
        --out benchmarks/results/gpu_check_h200.json

and on a CPU, the same path in a minute (what the tests run):

    python benchmarks/gpu_check.py --device cpu --quick --data DIR --out FILE
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import time
from pathlib import Path

import torch

from spinedet import SpinedetError
from spinedet.detect import engine, train
from spinedet.detect.validation import validation_ap50
from spinedet.study import evaluate, speed, timing
from spinedet.config import load, model_norm
from spinedet.dataset.data import CocoSlices, image_size, load_coco
from spinedet.io import write_json
from spinedet.detect.models import build_model, count_parameters, resolve_device

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO / "benchmarks/out/gpu_check/results"
PAPER_S_PER_IMAGE = {"resnet50": 0.22, "vgg16": 0.24}  # Ma et al. 2020, on their GPU
GOAL_RESNET50_S_PER_IMAGE = 0.011  # issue 13: 20x the paper, at 512 px

log = logging.getLogger("gpu_check")


def settings(args: argparse.Namespace) -> dict:
    """What each model is trained and timed with; --quick shrinks everything to seconds on a CPU."""
    if args.quick:
        return {"iterations": 2, "warmup_iterations": 1, "step_iterations": 1, "batch_size": 2,
                "eval_batch_size": 2, "timing": {"warmup": 1, "iterations": 2}, "max_test_images": 4}
    return {"iterations": args.iterations, "warmup_iterations": 10, "step_iterations": 10,
            "batch_size": args.batch_size, "eval_batch_size": args.eval_batch_size,
            "timing": {"warmup": 5, "iterations": 20}, "max_test_images": None}


def build_data(data: Path) -> None:
    """The GPU check's data through the workflow itself (config/gpu_check.yaml)."""
    target = data / "split" / "test.json"
    command = [sys.executable, "-m", "snakemake", str(target), "--cores", "2",
               "--configfile", str(REPO / "config.yaml"), str(REPO / "config/gpu_check.yaml")]
    log.info("building the data: %s", " ".join(command))
    subprocess.run(command, cwd=REPO, check=True)


def first_images(coco: dict, count: int | None) -> dict:
    """The COCO file cut to its first `count` images (all when None)."""
    if count is None:
        return coco
    images = sorted(coco["images"], key=lambda image: image["id"])[:count]
    kept = {image["id"] for image in images}
    return {**coco, "images": images, "annotations": [a for a in coco["annotations"] if a["image_id"] in kept]}


def timed_training(model, model_cfg: dict, dataset, weights, device: torch.device, iterations: int,
                   warmup_iterations: int, batch_size: int, workers: int, seed: int) -> dict:
    """`iterations` SGD steps through spinedet.detect.train.train_one_epoch (autocast and
    GradScaler on CUDA) after `warmup_iterations` untimed ones."""
    schedule_cfg = {**model_cfg, "epochs": 1}
    optimizer = train.build_optimizer(model, schedule_cfg)
    lr_scheduler = train.build_lr_scheduler(optimizer, schedule_cfg, warmup_iterations + iterations)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
    samples = (warmup_iterations + iterations) * batch_size
    loader = train.make_loader(dataset, batch_size, True, workers, seed, weights, samples)
    batches = iter(loader)

    def run(count: int, epoch: int) -> dict:
        return train.train_one_epoch(model, optimizer, lr_scheduler, scaler, _Batches(batches, count), device, epoch,
                                     clip_grad_norm=model_cfg.get("clip_grad_norm"), desc=f"train {epoch}")

    if warmup_iterations:
        run(warmup_iterations, 0)
    timing.synchronize(device)
    start = time.perf_counter()
    stats = run(iterations, 1)
    timing.synchronize(device)
    seconds = time.perf_counter() - start
    return {"iterations": stats["iters"], "batch_size": batch_size, "seconds": round(seconds, 3),
            "seconds_per_iteration": seconds / max(stats["iters"], 1),
            "images_per_s": stats["iters"] * batch_size / seconds, "final_mean_loss": stats["loss"],
            "amp": device.type == "cuda", "grad_scale": scaler.get_scale() if scaler.is_enabled() else None}


class _Batches:
    """The next `count` batches of one DataLoader iterator, with a length (train_one_epoch takes len())."""

    def __init__(self, batches, count: int):
        self.batches, self.count = batches, count

    def __len__(self) -> int:
        return self.count

    def __iter__(self):
        for _ in range(self.count):
            yield next(self.batches)


def check_model(name: str, config: dict, data: Path, device: torch.device, plan: dict, workers: int) -> dict:
    """Train, then evaluate with AMP and in fp32, one model; every number of its JSON entry."""
    classes = list(config["classes"])
    model_cfg = {**config["models"][name], "pretrained": "none", "norm": model_norm(config["models"][name])}
    images = data / "slices"
    train_coco = load_coco(data / "split" / "train.json")
    test_coco = first_images(load_coco(data / "split" / "test.json"), plan["max_test_images"])
    size = image_size(train_coco)
    seed = int(config["seed"])
    torch.manual_seed(seed)

    # The cost of one training step on whole slices at the native size.
    whole_cfg = {**model_cfg, "crop_size": None}
    step_model = build_model(whole_cfg, num_classes=len(classes) + 1, image_size=size).to(device)
    whole_set, whole_weights = train.training_set(train_coco, images, whole_cfg, classes)
    whole_step = timed_training(step_model, whole_cfg, whole_set, whole_weights, device, plan["step_iterations"],
                                plan["warmup_iterations"], plan["batch_size"], workers, seed)
    del step_model

    # Training as the study configures it (box-aware crops, class-balanced sampling).
    model = build_model(model_cfg, num_classes=len(classes) + 1, image_size=size).to(device)
    train_set, weights = train.training_set(train_coco, images, model_cfg, classes)
    training = timed_training(model, model_cfg, train_set, weights, device, plan["iterations"],
                              plan["warmup_iterations"], plan["batch_size"], workers, seed)
    log.info("%s: %d iterations at batch %d, %.3f s/iteration, mean loss %.3f", name, training["iterations"],
             training["batch_size"], training["seconds_per_iteration"], training["final_mean_loss"])

    score_threshold = float(config["evaluate"]["score_threshold"])
    engine.set_score_threshold(model, score_threshold)
    model.eval()
    dataset = CocoSlices(test_coco, images)
    timing_config = {**plan["timing"], "batch_size": plan["eval_batch_size"]}
    passes = {}
    # "amp": the pipeline's own inference precision (float16 on CUDA; bfloat16 or
    # float32 on the CPU, train.cpu_inference_precision), against float32
    pipeline_precision = engine.inference_precision(device, config["train"]["cpu_inference_precision"])
    for pass_name, precision in (("amp", pipeline_precision), ("fp32", "float32")):
        detections, latency = evaluate.detect(model, dataset, device, precision, score_threshold,
                                              plan["timing"]["warmup"])
        batched = speed.batch_throughput({name: model}, dataset, device, precision, timing_config)[name]
        passes[pass_name] = {
            "precision": precision,
            "ap50": validation_ap50(test_coco, detections),
            "detections": len(detections),
            "batch_1": {"s_per_image_median": latency["model"]["median"], "s_per_image_min": latency["model"]["min"],
                        "latency_s": latency["model"], "end_to_end_s": latency["end_to_end"],
                        "machine_load": latency["machine_load"]},
            f"batch_{timing_config['batch_size']}": {"s_per_image": batched["seconds_per_image"],
                                                    "images_per_s": batched["images_per_s"],
                                                    "batch_seconds": batched["batch_seconds"],
                                                    "machine_load": batched["machine_load"]},
        }
        log.info("%s %s: AP50 %s, batch 1 median %.4f s/image, batch %d %.4f s/image", name, precision,
                 passes[pass_name]["ap50"], latency["model"]["median"], timing_config["batch_size"],
                 batched["seconds_per_image"])
    amp_ap, fp32_ap = passes["amp"]["ap50"], passes["fp32"]["ap50"]
    batch_1 = passes["amp"]["batch_1"]["s_per_image_median"]
    return {
        "arch": model_cfg["arch"],
        "norm": model_cfg["norm"],
        "parameters": count_parameters(model)["total"],
        "image_px": size,
        "train_step_whole_slices": whole_step,
        "training": {**training, "crop_size": model_cfg.get("crop_size"), "sampler": model_cfg.get("sampler")},
        "test_images": len(dataset),
        "test_boxes": len(test_coco["annotations"]),
        "amp": passes["amp"],
        "fp32": passes["fp32"],
        "ap50_amp_minus_fp32": None if amp_ap is None or fp32_ap is None else amp_ap - fp32_ap,
        "s_per_image_batch_1": batch_1,
        "paper_s_per_image": PAPER_S_PER_IMAGE.get(name),
        "times_faster_than_paper": (PAPER_S_PER_IMAGE[name] / batch_1) if name in PAPER_S_PER_IMAGE else None,
    }


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def summary(args: argparse.Namespace, argv: list[str] | None, plan: dict, results: dict, device: torch.device,
            seconds: float, commit: str | None) -> dict:
    resnet50 = results.get("resnet50", {}).get("s_per_image_batch_1")
    return {
        "check": "benchmarks/gpu_check.py",
        "git_commit": commit,
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "quick": args.quick,
        "plan": plan,
        "models": results,
        "goal": {"resnet50_s_per_image_max": GOAL_RESNET50_S_PER_IMAGE, "at_px": 512,
                 "met": None if resnet50 is None else resnet50 <= GOAL_RESNET50_S_PER_IMAGE},
        "seconds": round(seconds, 1),
        **timing.environment(device),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="results folder with slices/ and split/")
    parser.add_argument("--build", action="store_true", help="make --data through snakemake when it is missing")
    parser.add_argument("--out", type=Path, required=True, help="the JSON to write")
    parser.add_argument("--device", default="auto", help="auto | cuda | cpu")
    parser.add_argument("--quick", action="store_true", help="a few iterations and images: the code path in seconds")
    parser.add_argument("--models", nargs="+", default=["resnet50", "vgg16"])
    parser.add_argument("--iterations", type=int, default=400, help="timed training iterations per model")
    parser.add_argument("--batch-size", type=int, default=8, help="training batch")
    parser.add_argument("--eval-batch-size", type=int, default=8, help="the batch n of the throughput timing")
    parser.add_argument("--workers", type=int, default=4, help="DataLoader workers")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--config", nargs="+", default=[str(REPO / "config.yaml")])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)

    if not (args.data / "split" / "test.json").is_file():
        if not args.build:
            raise SpinedetError(f"{args.data}: no split/test.json; make it (see --help) or pass --build")
        build_data(args.data)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    config = load(args.config)
    plan = settings(args)
    started = time.perf_counter()
    commit = git_commit()
    results = {}
    for name in args.models:
        try:
            results[name] = check_model(name, config, args.data, device, plan, args.workers)
        except Exception as exc:  # one model's failure is a result too; the other model still runs
            log.exception("%s failed", name)
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
        # written after every model: a check cut short by the lease keeps what it measured
        report = summary(args, argv, plan, results, device, time.perf_counter() - started, commit)
        write_json(args.out, report, indent=1)
    log.info("wrote %s in %.0f s", args.out, report["seconds"])
    for name, result in results.items():
        if "error" in result:
            print(f"{name}: FAILED {result['error']}")
            continue
        print(f"{name}: AP50 amp {result['amp']['ap50']} fp32 {result['fp32']['ap50']}; "
              f"batch 1 {result['s_per_image_batch_1']:.4f} s/image (paper {result['paper_s_per_image']}); "
              f"train {result['training']['seconds_per_iteration']:.3f} s/iteration at batch "
              f"{result['training']['batch_size']}")
    return report


if __name__ == "__main__":
    report = main()
    sys.exit(1 if any("error" in result for result in report["models"].values()) else 0)
