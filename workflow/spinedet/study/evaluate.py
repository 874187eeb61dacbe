"""`spinedet evaluate`: one trained detector on the test split.

Writes, under --out:
- detections.json: COCO results list (score >= evaluate.score_threshold);
- metrics.json: COCO AP/AR, AP at IoU 0.1, per-class AP50, PR curves, FROC
  and CPM, patient-level bootstrap CIs, PASCAL VOC AP, per-patient
  sensitivity and specificity at an operating point chosen on the validation
  split (see spinedet.study.metrics), plus the weights' epoch, validation AP50 and
  parameter count.

Accuracy is per model; the models' speed is compared in one job, by
`spinedet speed`.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from tqdm import tqdm

from spinedet import SpinedetError
from spinedet.detect import engine
from spinedet.study import metrics as metrics_lib
from spinedet.study import timing as timing_lib
from spinedet.io import read_json, write_json
from spinedet.detect.models import resolve_device

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from spinedet.config import add_config_argument

    add_config_argument(parser)
    parser.add_argument("--model", required=True, help="model name (a key of config models:)")
    parser.add_argument("--weights", required=True, type=Path, help="best.pt written by spinedet train")
    parser.add_argument("--test", required=True, type=Path, help="test split COCO JSON")
    parser.add_argument("--images", required=True, type=Path, help="slice PNG root (results/slices)")
    parser.add_argument("--val", type=Path, help="validation split COCO JSON (for the patient-level operating point)")
    parser.add_argument("--val-detections", type=Path,
                        help="the trained model's val_detections.json (spinedet train)")
    parser.add_argument("--out", required=True, type=Path, help="output folder (results/eval/MODEL)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")


def detect(model: torch.nn.Module, dataset, device: torch.device, precision: str, score_threshold: float,
           warmup: int = 0) -> tuple[list[dict], dict]:
    """Detections on every image of a spinedet.dataset.data.CocoSlices dataset in
    `precision` (spinedet.detect.engine.inference_precision), and the latency of each
    step after the first `warmup` images: `model` (the network, with its copies
    to and from the device) and `end_to_end` (read the PNG to COCO results).
    The verb logs it; the benchmarks use it (one pass gives AP and time); the
    study's timing comparison is `spinedet speed`'s."""
    detections, model_seconds, e2e_seconds = [], [], []
    with timing_lib.MachineLoad() as load:
        for index in tqdm(range(len(dataset)), desc="detect", unit="image"):
            results, model_s, e2e_s = engine.timed_detection(model, dataset, index, device, precision, score_threshold)
            detections += results
            if index >= warmup:
                model_seconds.append(model_s)
                e2e_seconds.append(e2e_s)
    if not model_seconds:
        raise SpinedetError(f"warmup {warmup} leaves none of the {len(dataset)} test images timed")
    latency = {
        "model": timing_lib.latency_stats(model_seconds),
        "end_to_end": timing_lib.latency_stats(e2e_seconds),
        "images_per_s": len(model_seconds) / sum(model_seconds),
        "machine_load": load.record,
    }
    log.info("batch 1 over %d test images: model median %.4f s (min %.4f), end to end median %.4f s",
             len(model_seconds), latency["model"]["median"], latency["model"]["min"], latency["end_to_end"]["median"])
    return detections, latency


def operating_point(evaluate_config: dict, classes: list[str], validation: tuple[dict, list[dict]] | None) -> dict:
    """The score threshold of the patient-level results: the configured one, else
    the one that reaches the target sensitivity on the validation split."""
    configured = evaluate_config["operating_point"]
    floor = float(evaluate_config["score_threshold"])
    if configured["score_threshold"] is not None:
        return {"score_threshold": float(configured["score_threshold"]), "chosen_on": "config"}
    if validation is None:
        log.warning("no --val/--val-detections: patient-level results at evaluate.score_threshold %g", floor)
        return {"score_threshold": floor, "chosen_on": "none: no validation detections were given"}
    return metrics_lib.operating_threshold(*validation, classes, float(configured["sensitivity"]), floor)


def evaluate_model(model: torch.nn.Module, meta: dict, model_name: str, test_coco: dict,
                   image_root: Path, config: dict, device: torch.device,
                   validation: tuple[dict, list[dict]] | None = None) -> tuple[list, dict]:
    """Detections and metrics of one loaded model on the test split;
    `validation` (val COCO, the model's val detections) sets the patient-level operating point."""
    from spinedet.dataset.data import CocoSlices, check_categories
    from spinedet.detect.models import count_parameters

    classes = list(config["classes"])
    if list(meta["classes"]) != classes:
        raise SpinedetError(
            f"model {model_name} was trained on classes {meta['classes']}, the config says {classes}")
    check_categories(test_coco, classes, "test split")
    if not test_coco["images"]:
        raise SpinedetError("the test split has no images: nothing to evaluate")

    evaluate_config = config["evaluate"]
    score_threshold = float(evaluate_config["score_threshold"])
    model.to(device).eval()
    engine.set_score_threshold(model, score_threshold)
    dataset = CocoSlices(test_coco, image_root)
    precision = engine.inference_precision(device, config["train"]["cpu_inference_precision"])

    detections, _ = detect(model, dataset, device, precision, score_threshold)
    log.info("%d detections on %d test images", len(detections), len(dataset))
    metrics = {
        "model": model_name,
        "arch": meta.get("model_config", {}).get("arch"),
        "weights": {
            "epoch": meta.get("epoch"),
            "val_ap50": meta.get("val_ap50"),
            "parameters": count_parameters(model),
            "model_config": meta.get("model_config"),
        },
        "score_threshold": score_threshold,
        "inference_precision": precision,
        **metrics_lib.evaluate_detections(test_coco, detections, classes, evaluate_config, int(config["seed"])),
    }
    operating = operating_point(evaluate_config, classes, validation)
    metrics["patient_level"] = {"operating_point": operating,
                                **metrics_lib.patient_level(test_coco, detections, classes,
                                                            operating["score_threshold"])}
    return detections, metrics


def evaluate(config: dict, model_name: str, weights: Path, test: Path, images: Path, out: Path,
             threads: int, val: Path | None = None, val_detections: Path | None = None) -> dict:
    """The verb on a loaded config: load weights and test set, evaluate, write the two files."""
    from spinedet.dataset.data import load_coco
    from spinedet.detect.models import load_trained

    if model_name not in config["models"]:
        raise SpinedetError(f"--model {model_name}: not in config models ({', '.join(config['models'])})")
    torch.set_num_threads(threads)
    device = resolve_device(config["train"]["device"])
    model, meta = load_trained(weights, device)
    test_coco = load_coco(test)
    if (val is None) != (val_detections is None):
        raise SpinedetError("--val and --val-detections go together")
    validation = None if val is None else (load_coco(val), read_json(val_detections))
    detections, metrics = evaluate_model(model, meta, model_name, test_coco, images, config, device,
                                                 validation)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "detections.json", detections)
    write_json(out / "metrics.json", metrics)
    ap50 = metrics["ap50"]
    log.info("%s: AP50 %s, CPM %s on %s", model_name, "n/a" if ap50 is None else f"{ap50:.3f}",
             "n/a" if metrics["cpm"] is None else f"{metrics['cpm']:.3f}", device)
    return metrics


def run(args: argparse.Namespace) -> int:
    from spinedet.config import load

    config = load(args.config)
    evaluate(config, args.model, args.weights, args.test, args.images, args.out, args.threads, args.val,
             args.val_detections)
    return 0
