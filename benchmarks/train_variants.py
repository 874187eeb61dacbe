"""Training recipes compared at a fixed wall-clock budget: validation AP50 and
s/iteration of one model variant, trained from scratch on the demo's slices.

A variant is the study's model config (config.yaml `models.<model>`) with
overrides given as key=YAML pairs. The learning rate follows a linear
warm-up and a cosine decay over the *time* budget, so every variant gets the
same minutes whatever its speed. The result is printed and appended as one
row to benchmarks/results/train_variants.csv (the table in
benchmarks/README.md is made from it).

    .venv/bin/python benchmarks/train_variants.py --model resnet50 --budget 270 \
        --name gn_crop128 --set norm=gn crop_size=128 sampler=class_balanced batch_size=4

Needs the demo's split (results/split/{train,val}.json and results/slices/),
e.g. `snakemake --cores 2 results/split/train.json`. Run it alone on the
machine: the budget is wall-clock time.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import time
from pathlib import Path

import torch
import yaml

from spinedet.config import load
from spinedet.dataset.data import CocoSlices, collate, image_size, load_coco
from spinedet.detect.engine import predict_coco
from spinedet.study.metrics import coco_summary
from spinedet.detect.models import build_model, model_norm
from spinedet.detect.train import WARMUP_FACTOR, build_optimizer, make_loader, training_set

REPO = Path(__file__).resolve().parents[1]
RESULTS_CSV = REPO / "benchmarks" / "results" / "train_variants.csv"
COLUMNS = ["name", "model", "overrides", "budget_s", "iters", "s_per_iter", "final_loss", "val_ap50", "val_ap50_per_class",
           "val_images", "seed", "threads", "norm"]


def parse_overrides(pairs: list[str]) -> dict:
    overrides = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        overrides[key] = yaml.safe_load(value)
    return overrides


def lr_at(elapsed: float, budget: float, warmup_s: float) -> float:
    """Linear warm-up over warmup_s seconds, then cosine decay to 0 at the budget."""
    warmup = 1.0 if elapsed >= warmup_s else WARMUP_FACTOR + (1 - WARMUP_FACTOR) * elapsed / warmup_s
    return warmup * 0.5 * (1 + math.cos(math.pi * min(elapsed / budget, 1.0)))


def train_for(model, model_cfg: dict, train_set, weights, budget: float, warmup_s: float, seed: int) -> tuple[int, float]:
    """Train until the budget is spent: (iterations, mean loss of the last 20)."""
    optimizer = build_optimizer(model, model_cfg)
    base_lr = float(model_cfg["lr"])
    batch_size = int(model_cfg["batch_size"])
    clip = model_cfg.get("clip_grad_norm")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    model.train()
    started, iters, epoch, losses = time.perf_counter(), 0, 0, []
    while True:
        epoch += 1
        loader = make_loader(train_set, batch_size, True, 0, seed + epoch, weights, len(train_set))
        for images, targets in loader:
            elapsed = time.perf_counter() - started
            if elapsed >= budget:
                return iters, sum(losses[-20:]) / max(len(losses[-20:]), 1)
            for group in optimizer.param_groups:
                group["lr"] = base_lr * lr_at(elapsed, budget, warmup_s)
            loss = sum(model(images, targets).values())
            if not math.isfinite(float(loss.detach())):
                raise SystemExit(f"non-finite loss after {iters} iterations")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(params, float(clip))
            optimizer.step()
            losses.append(float(loss.detach()))
            iters += 1


def markdown_table(path: Path = RESULTS_CSV) -> str:
    """The recorded variants as the Markdown table of benchmarks/README.md."""
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    lines = ["| variant | model | overrides of config.yaml | budget s | iterations | s/iter | val AP50 | "
             "herniation | cord injury |", "|---|---|---|--:|--:|--:|--:|--:|--:|"]
    for row in rows:
        per_class = json.loads(row["val_ap50_per_class"])
        lines.append(f"| {row['name']} | {row['model']} | `{row['overrides']}` | {float(row['budget_s']):.0f} | "
                     f"{row['iters']} | {row['s_per_iter']} | {row['val_ap50']} | "
                     f"{per_class.get('disc_herniation')} | {per_class.get('cord_injury')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", action="store_true", help="print the recorded variants as Markdown and exit")
    parser.add_argument("--model", help="a key of config.yaml models:")
    parser.add_argument("--name", help="the variant's name in the table")
    parser.add_argument("--set", nargs="*", default=[], help="model config overrides, key=YAML")
    parser.add_argument("--budget", type=float, default=270.0, help="training seconds (wall clock)")
    parser.add_argument("--warmup", type=float, default=20.0, help="lr warm-up seconds")
    parser.add_argument("--seed", type=int, default=20200901)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--config", nargs="+", default=[str(REPO / "config.yaml")])
    parser.add_argument("--results", default=str(REPO / "results"))
    args = parser.parse_args()
    if args.table:
        print(markdown_table())
        return
    if not (args.model and args.name):
        parser.error("--model and --name are required to train a variant")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    config = load(args.config)
    classes = list(config["classes"])
    overrides = parse_overrides(args.set)
    model_cfg = {**config["models"][args.model], **overrides}
    results = Path(args.results)
    train_coco, val_coco = load_coco(results / "split/train.json"), load_coco(results / "split/val.json")
    size = image_size(train_coco)
    train_set, weights = training_set(train_coco, results / "slices", model_cfg, classes)
    model = build_model(model_cfg, num_classes=len(classes) + 1, image_size=size)

    iters, final_loss = train_for(model, model_cfg, train_set, weights, args.budget, args.warmup, args.seed)
    val_loader = torch.utils.data.DataLoader(CocoSlices(val_coco, results / "slices"), batch_size=4,
                                             collate_fn=collate)
    summary = coco_summary(val_coco, predict_coco(model, val_loader, torch.device("cpu"), "float32"), classes)
    row = {
        "name": args.name,
        "model": args.model,
        "overrides": json.dumps(overrides, sort_keys=True),
        "budget_s": args.budget,
        "iters": iters,
        "s_per_iter": round(args.budget / max(iters, 1), 3),
        "final_loss": round(final_loss, 4),
        "val_ap50": None if summary["ap50"] is None else round(summary["ap50"], 3),
        "val_ap50_per_class": json.dumps({k: (None if v is None else round(v, 3))
                                          for k, v in summary["ap50_per_class"].items()}),
        "val_images": len(val_coco["images"]),
        "seed": args.seed,
        "threads": args.threads,
        "norm": model_norm(model_cfg),
    }
    print(json.dumps(row))
    RESULTS_CSV.parent.mkdir(parents=True, exist_ok=True)
    new = not RESULTS_CSV.exists()
    with RESULTS_CSV.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        writer.writerow(row)


if __name__ == "__main__":
    main()
