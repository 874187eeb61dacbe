"""Training: dataset and augmentation, schedule, anchors, AP50, overfitting a
tiny set, non-finite losses, checkpoints and resuming after SIGTERM."""

import csv
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from spinedet import SpinedetError
from spinedet.detect import train as train_module
from spinedet.dataset.data import CocoSlices, collate, train_transforms
from spinedet.detect.validation import validation_ap50
from spinedet.detect.models import build_model, load_trained
from spinedet.detect.train import (
    LOG_COLUMNS,
    anchor_report,
    build_lr_scheduler,
    build_optimizer,
    load_checkpoint,
    lr_factor,
    train_model,
    train_one_epoch,
)

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[2]
CLASSES = ["disc_herniation", "cord_injury"]
RESNET = {
    "arch": "fasterrcnn_resnet50_fpn",
    "pretrained": "none",
    "epochs": 3,
    "batch_size": 2,
    "lr": 0.01,
    "momentum": 0.9,
    "weight_decay": 0.0001,
    "warmup_iters": 1,
    "scheduler": "cosine",
    "clip_grad_norm": 10.0,
    "anchor_sizes": [[16], [32], [64], [128], [256]],
    "max_iters_per_epoch": 1,
}
VGG = {**RESNET, "arch": "fasterrcnn_vgg16", "anchor_sizes": [[16, 32, 64, 128]], "aspect_ratios": [[0.5, 1.0, 2.0]]}


def write_blob_slices(root: Path, n_images: int, size: int = 128, seed: int = 0, negatives: int = 1) -> dict:
    """Noisy dark 8-bit slices with bright (class 1) and grey (class 2) discs, and their COCO.

    The first `negatives` images have no blob; the others alternate between one
    blob (class 1) and two (class 1 and class 2, on opposite halves).
    """
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows, cols = np.mgrid[0:size, 0:size]
    images, annotations = [], []
    for index in range(n_images):
        pixels = rng.normal(40, 8, (size, size))
        n_blobs = 0 if index < negatives else 1 + index % 2
        for blob in range(n_blobs):
            label = 1 + blob
            radius = int(rng.integers(8, 16))
            centre_y = int(rng.integers(radius + 2, size - radius - 2))
            half = size // 2
            low, high = (radius + 2, half - radius) if blob == 0 else (half + radius, size - radius - 2)
            centre_x = int(rng.integers(low, high))
            pixels[(rows - centre_y) ** 2 + (cols - centre_x) ** 2 <= radius**2] = 230 if label == 1 else 140
            side = 2 * radius + 1
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": index + 1,
                    "category_id": label,
                    "bbox": [centre_x - radius, centre_y - radius, side, side],
                    "area": side * side,
                    "iscrowd": 0,
                }
            )
        name = f"sub-{seed}/slice-{index:02d}.png"
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(root / name)
        images.append({"id": index + 1, "file_name": name, "width": size, "height": size})
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(CLASSES)]
    return {"images": images, "annotations": annotations, "categories": categories}


@pytest.fixture(scope="module")
def blobs(tmp_path_factory) -> dict:
    """Train (6 slices, one negative) and val (2 slices, one negative) COCO files over one image folder."""
    root = tmp_path_factory.mktemp("blobs")
    images = root / "slices"
    paths = {}
    for split, n_images, seed in (("train", 6, 1), ("val", 2, 2)):
        coco = write_blob_slices(images, n_images, seed=seed)
        paths[split] = root / f"{split}.json"
        paths[split].write_text(json.dumps(coco))
    return {"images": images, **paths}


def config_for(model_cfg: dict, name: str = "resnet50") -> dict:
    return {
        "seed": 5,
        "classes": CLASSES,
        "train": {"device": "cpu", "cpu_inference_precision": "auto", "threads": 1, "deterministic": False,
                  "workers": 0},
        "models": {name: model_cfg},
    }


def read_log(path: Path) -> list[dict]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


# ---------------------------------------------------------------- data


def test_dataset_items_and_negatives(blobs):
    dataset = CocoSlices(blobs["train"], blobs["images"])
    assert len(dataset) == 6
    image, target = dataset[0]
    assert image.shape == (1, 128, 128) and image.dtype == torch.float32
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)  # the negative slice
    image, target = dataset[1]
    assert target["boxes"].shape == (2, 4)
    assert target["labels"].tolist() == [1, 2]
    x0, y0, x1, y1 = target["boxes"][0].round().int().tolist()
    assert float(image[0, (y0 + y1) // 2, (x0 + x1) // 2]) == pytest.approx(230 / 255)
    images, targets = collate([dataset[0], dataset[1]])
    assert len(images) == len(targets) == 2 and targets[1]["image_id"] == 2


def test_augmented_boxes_follow_the_blobs(blobs):
    torch.manual_seed(0)
    dataset = CocoSlices(blobs["train"], blobs["images"], transforms=train_transforms())
    for _ in range(5):
        image, target = dataset[1]
        assert target["boxes"].shape == (2, 4)
        for box in target["boxes"]:
            x0, y0, x1, y1 = box.tolist()
            centre = image[0, int((y0 + y1) / 2), int((x0 + x1) / 2)]
            inside = image[0, int(y0) : int(y1), int(x0) : int(x1)].mean()
            assert centre > 0.4 and inside > image.mean()  # the box still sits on its blob
        assert image.shape == (1, 128, 128)


def test_train_transforms_flip_only_when_asked():
    names = [type(t).__name__ for t in train_transforms().transforms]
    assert "RandomHorizontalFlip" not in names
    assert "RandomHorizontalFlip" in [type(t).__name__ for t in train_transforms(hflip=True).transforms]


# ---------------------------------------------------------------- schedule, anchors, AP


def test_lr_factor_warmup_cosine_and_multistep():
    assert lr_factor(0, 100, 10) == pytest.approx(0.001)
    assert lr_factor(5, 100, 10) < lr_factor(9, 100, 10) < lr_factor(10, 100, 10) <= 1.0
    assert lr_factor(50, 100, 10) == pytest.approx(0.5)
    assert lr_factor(100, 100, 10) == pytest.approx(0.0, abs=1e-12)
    steps = [lr_factor(i, 100, 0, "multistep", [60, 90], 0.1) for i in (59, 60, 89, 90)]
    assert steps == pytest.approx([1.0, 0.1, 0.1, 0.01])
    with pytest.raises(SpinedetError, match="scheduler"):
        lr_factor(0, 100, 10, "linear")


def test_scheduler_steps_per_iteration():
    parameter = torch.nn.Parameter(torch.zeros(1))
    cfg = {"lr": 0.1, "epochs": 2, "warmup_iters": 0, "scheduler": "multistep", "lr_steps": [1], "lr_gamma": 0.5}
    optimizer = torch.optim.SGD([parameter], lr=0.1)
    scheduler = build_lr_scheduler(optimizer, cfg, iters_per_epoch=4)
    lrs = []
    for _ in range(8):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0.1] * 4 + [0.05] * 4)


def test_anchor_report_uses_the_real_stride_grid():
    """VGG-16 at stride 16 puts 16 px anchors at multiples of 16: a box on that
    grid is matched, the same box shifted by half a stride is not (a centred
    anchor would match both)."""
    model_cfg = {**VGG, "anchor_sizes": [[16]], "aspect_ratios": [[1.0]], "norm": "none"}
    model = build_model(model_cfg, num_classes=3, image_size=128)
    coco = {
        "annotations": [
            {"bbox": [24, 24, 16, 16], "category_id": 1},  # centre (32, 32): on the grid
            {"bbox": [32, 32, 16, 16], "category_id": 1},  # centre (40, 40): between anchors
            {"bbox": [0, 0, 100, 3], "category_id": 2},  # no anchor comes close
        ]
    }
    report = anchor_report(coco, CLASSES, model_cfg, model, 128)
    herniation = report["classes"]["disc_herniation"]
    assert herniation["boxes"] == 2
    assert herniation["fraction_matched"] == 0.5 and herniation["fraction_matched_iou07"] == 0.5
    assert herniation["anchors_iou05_per_box"] == 0.5
    assert report["classes"]["cord_injury"]["fraction_matched"] == 0.0
    assert report["all"]["fraction_matched"] == pytest.approx(1 / 3, abs=1e-3)
    assert herniation["width_px"]["p50"] == pytest.approx(16.0)
    assert report["anchors"] == (128 // 16) ** 2 and report["rpn_fg_iou_thresh"] == 0.7
    assert model.training  # left as it was
    json.dumps(report)  # written as anchors.json


def test_training_set_crops_and_samples_as_configured(blobs):
    coco = json.loads(blobs["train"].read_text())
    cfg = {**RESNET, "crop_size": 64, "lesion_crop_share": 1.0, "sampler": "class_balanced", "negative_share": 0.1}
    dataset, weights = train_module.training_set(coco, blobs["images"], cfg, CLASSES)
    torch.manual_seed(0)
    for index in range(len(dataset)):
        image, target = dataset[index]
        assert image.shape == (1, 64, 64)
        assert len(target["boxes"]) >= (1 if coco["images"][index]["id"] > 1 else 0)
    assert sum(weights) == pytest.approx(1.0)
    uniform, none = train_module.training_set(coco, blobs["images"], RESNET, CLASSES)
    assert none is None and uniform[0][0].shape == (1, 128, 128)


def test_weighted_loader_draws_the_asked_number_of_images(blobs):
    dataset = CocoSlices(blobs["train"], blobs["images"])
    weights = [0.0] * 5 + [1.0]  # only the last image can be drawn
    loader = train_module.make_loader(dataset, 2, True, 0, seed=3, weights=weights, samples=6)
    ids = [t["image_id"] for _, targets in loader for t in targets]
    assert ids == [6] * 6


def test_validation_ap50_perfect_missing_and_empty():
    coco = {
        "images": [{"id": 1, "width": 64, "height": 64}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20]}],
        "categories": [{"id": 1, "name": "disc_herniation"}, {"id": 2, "name": "cord_injury"}],
    }
    perfect = [{"image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "score": 0.9}]
    assert validation_ap50(coco, perfect) == pytest.approx(1.0)
    assert validation_ap50(coco, []) == 0.0
    assert validation_ap50({**coco, "annotations": []}, perfect) is None


# ---------------------------------------------------------------- optimisation


@pytest.mark.slow
@pytest.mark.parametrize("model_cfg", [RESNET, VGG], ids=["resnet50", "vgg16"])
def test_overfits_one_slice(blobs, model_cfg):
    """On one fixed slice with two lesions the training loss falls by more than half."""
    torch.manual_seed(0)
    coco = json.loads(blobs["train"].read_text())
    coco["images"] = [img for img in coco["images"] if img["id"] == 2]
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] == 2]
    loader = torch.utils.data.DataLoader(CocoSlices(coco, blobs["images"]), batch_size=1, collate_fn=collate)
    iterations = 10
    cfg = {**model_cfg, "epochs": iterations, "warmup_iters": 2}
    model = build_model(cfg, num_classes=3, image_size=128)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_lr_scheduler(optimizer, cfg, iters_per_epoch=1)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    cpu = torch.device("cpu")
    losses = [
        train_one_epoch(model, optimizer, scheduler, scaler, loader, cpu, epoch, clip_grad_norm=10.0)["loss"]
        for epoch in range(1, iterations + 1)
    ]
    assert all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-3:]) < 0.5 * losses[0], losses


class NanLossModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1))

    def forward(self, images, targets):
        return {"loss_classifier": self.weight * float("nan"), "loss_box_reg": self.weight * 0.5}


def test_non_finite_loss_stops_with_a_clear_message(blobs):
    model = NanLossModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: 1.0)
    loader = torch.utils.data.DataLoader(CocoSlices(blobs["train"], blobs["images"]), batch_size=2, collate_fn=collate)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    message = r"non-finite loss at epoch 4, iteration 1: loss_classifier=nan, loss_box_reg=0.5"
    with pytest.raises(SpinedetError, match=message):
        train_one_epoch(model, optimizer, scheduler, scaler, loader, torch.device("cpu"), 4)
    assert float(model.weight.detach()) == 1.0  # no step taken on the bad loss


# ---------------------------------------------------------------- the verb


def test_resume_after_sigterm(blobs, tmp_path, monkeypatch, caplog):
    """SIGTERM after epoch 1 stops cleanly; the rerun resumes at epoch 2 and ends at 3."""
    out = tmp_path / "resnet50"
    real_write_log = train_module.write_log

    def write_log_then_sigterm(rows, path):
        real_write_log(rows, path)
        if len(rows) == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # as SLURM preemption would

    monkeypatch.setattr(train_module, "write_log", write_log_then_sigterm)
    args = dict(model_name="resnet50", train_json=blobs["train"], val_json=blobs["val"], images=blobs["images"])
    args["out"] = out
    assert train_model(config_for(RESNET), **args) == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler restored
    checkpoint = torch.load(out / "state" / "checkpoint.pt", weights_only=False)
    assert checkpoint["epoch"] == 1
    assert [row["epoch"] for row in read_log(out / "state" / "train_log.csv")] == ["1"]
    assert not (out / "best.pt").exists()  # declared outputs only at the end

    monkeypatch.setattr(train_module, "write_log", real_write_log)
    with caplog.at_level(logging.INFO, logger="spinedet.detect.train"):
        assert train_model(config_for(RESNET), **args) == 0
    assert "epoch 2 of 3" in caplog.text and "resuming" in caplog.text

    rows = read_log(out / "train_log.csv")
    assert list(rows[0]) == LOG_COLUMNS
    assert [row["epoch"] for row in rows] == ["1", "2", "3"]
    assert all(row["iters"] == "1" and math.isfinite(float(row["loss"])) for row in rows)
    assert all(0.0 <= float(row["val_ap50"]) <= 1.0 for row in rows)
    assert torch.load(out / "state" / "checkpoint.pt", weights_only=False)["epoch"] == 3
    best = torch.load(out / "best.pt", weights_only=True)
    assert set(best) == {"model", "model_name", "model_config", "classes", "image_size", "pixel_spacing_mm", "epoch",
                         "val_ap50"}
    assert best["pixel_spacing_mm"] is None or len(best["pixel_spacing_mm"]) == 2  # median (row, column) mm
    assert best["image_size"] == 128 and best["classes"] == CLASSES and best["model_name"] == "resnet50"
    assert best["model_config"]["norm"] == "gn"  # the resolved default travels with the weights
    assert best["val_ap50"] == max(float(row["val_ap50"]) for row in rows)
    model, meta = load_trained(out / "best.pt")
    assert meta["epoch"] in (1, 2, 3) and not model.training
    anchors = json.loads((out / "anchors.json").read_text())
    assert anchors["all"]["boxes"] == 8 and anchors["all"]["fraction_matched"] > 0.9
    # the best epoch's validation detections, for evaluate's operating point
    val_detections = json.loads((out / "val_detections.json").read_text())
    assert val_detections == json.loads((out / "state" / "val_detections.json").read_text())
    assert all({"image_id", "category_id", "bbox", "score"} == set(d) for d in val_detections)


def test_regenerated_slices_under_the_same_coco_files_start_training_over(blobs, tmp_path, monkeypatch, caplog):
    images = tmp_path / "slices"
    shutil.copytree(blobs["images"], images)
    out = tmp_path / "resnet50"
    real_write_log = train_module.write_log

    def write_log_then_sigterm(rows, path):
        real_write_log(rows, path)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(train_module, "write_log", write_log_then_sigterm)
    args = dict(model_name="resnet50", train_json=blobs["train"], val_json=blobs["val"], images=images, out=out)
    assert train_model(config_for(RESNET), **args) == 128 + signal.SIGTERM
    first = sorted(images.rglob("*.png"))[0]
    pixels = np.asarray(Image.open(first)).copy()
    pixels[0, 0] ^= 1  # one pixel changed, the COCO files not
    Image.fromarray(pixels).save(first)
    monkeypatch.setattr(train_module, "write_log", real_write_log)
    with caplog.at_level(logging.INFO, logger="spinedet.detect.train"):
        assert train_model(config_for(RESNET), **args) == 0
    assert "another model config or training set: starting from epoch 1" in caplog.text


def test_checkpoint_of_another_config_is_not_resumed(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save({"epoch": 2, "fingerprint": {"model_config": {"lr": 0.01}}}, path)
    assert load_checkpoint(path, {"model_config": {"lr": 0.01}})["epoch"] == 2
    assert load_checkpoint(path, {"model_config": {"lr": 0.02}}) is None
    path.write_bytes(b"half a checkpoint")
    assert load_checkpoint(path, {"model_config": {"lr": 0.01}}) is None


def test_unknown_model_name_is_a_clear_error(blobs, tmp_path):
    with pytest.raises(SpinedetError, match="--model densenet"):
        train_model(config_for(RESNET), "densenet", blobs["train"], blobs["val"], blobs["images"], tmp_path)


def test_cli_train_with_the_project_config_and_a_val_split_without_boxes(blobs, tmp_path):
    """The train verb as the Snakefile calls it, config merged and validated; val AP50 left empty."""
    val = json.loads(blobs["val"].read_text())
    val["annotations"] = []
    val_path = tmp_path / "val_negatives.json"
    val_path.write_text(json.dumps(val))
    override = tmp_path / "override.yaml"
    override.write_text(yaml.safe_dump({"models": {"vgg16": {**VGG, "epochs": 1}}, "train": {"threads": 1}}))
    out = tmp_path / "models" / "vgg16"
    command = [
        sys.executable, "-m", "spinedet.cli", "train",
        "--config", str(REPO / "config.yaml"), str(override),
        "--model", "vgg16", "--train", str(blobs["train"]), "--val", str(val_path),
        "--images", str(blobs["images"]), "--out", str(out), "--threads", "1",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "vgg16 epoch 1/1" in result.stderr
    assert "has no boxes: val_ap50 is left empty" in result.stderr
    assert (out / "anchors.json").is_file()
    assert [row["val_ap50"] for row in read_log(out / "train_log.csv")] == [""]
    best = torch.load(out / "best.pt", weights_only=True)
    assert best["val_ap50"] is None and best["epoch"] == 1 and best["model_config"]["arch"] == "fasterrcnn_vgg16"


@pytest.mark.slow
def test_resumed_training_equals_uninterrupted_training(blobs, tmp_path, monkeypatch):
    """Checkpointed RNG states and per-epoch seeded sampling make a resumed CPU run
    bit-identical, with box-aware crops and class-balanced sampling too."""
    args = dict(model_name="resnet50", train_json=blobs["train"], val_json=blobs["val"], images=blobs["images"])
    cfg = {**RESNET, "max_iters_per_epoch": 2, "crop_size": 64, "sampler": "class_balanced"}
    assert train_model(config_for(cfg), out=tmp_path / "straight", **args) == 0

    real_write_log = train_module.write_log

    def write_log_then_sigterm(rows, path):
        real_write_log(rows, path)
        if len(rows) == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(train_module, "write_log", write_log_then_sigterm)
    assert train_model(config_for(cfg), out=tmp_path / "resumed", **args) == 128 + signal.SIGTERM
    monkeypatch.setattr(train_module, "write_log", real_write_log)
    assert train_model(config_for(cfg), out=tmp_path / "resumed", **args) == 0

    straight = torch.load(tmp_path / "straight" / "state" / "checkpoint.pt", weights_only=False)
    resumed = torch.load(tmp_path / "resumed" / "state" / "checkpoint.pt", weights_only=False)
    for key, value in straight["model"].items():
        assert torch.equal(resumed["model"][key], value), key
    loss_columns = ["loss", "loss_classifier", "loss_objectness", "val_ap50"]
    assert [{k: r[k] for k in loss_columns} for r in read_log(tmp_path / "straight" / "train_log.csv")] == [
        {k: r[k] for k in loss_columns} for r in read_log(tmp_path / "resumed" / "train_log.csv")
    ]


def test_unreadable_checkpoint_is_kept_aside_and_training_starts_over(tmp_path):
    checkpoint = tmp_path / "checkpoint.pt"
    checkpoint.write_bytes(b"not a torch archive")
    assert load_checkpoint(checkpoint, {"run": "x"}) is None
    assert not checkpoint.exists()
    assert (tmp_path / "checkpoint.pt.unreadable").read_bytes() == b"not a torch archive"


def test_an_epoch_of_a_sampler_with_replacement_is_max_iters_per_epoch():
    from spinedet.detect.train import epoch_length

    # 15 annotated patients x 3 slices at batch 4 would be 12 iterations: class-balanced draws keep 100
    assert epoch_length(45, 4, 100, with_replacement=True) == 100
    assert epoch_length(45, 4, 100, with_replacement=False) == 12
    assert epoch_length(605, 4, 130, with_replacement=False) == 130  # the demo's uniform cap
    assert epoch_length(45, 4, None, with_replacement=True) == 12


def test_a_small_cohort_trains_for_epochs_times_max_iters_per_epoch(blobs, tmp_path):
    """Six training slices at batch 2 are 3 iterations a pass; with class-balanced sampling
    and max_iters_per_epoch 4, two epochs are 2 x 4 iterations."""
    cfg = {**RESNET, "epochs": 2, "max_iters_per_epoch": 4, "sampler": "class_balanced", "crop_size": 64}
    out = tmp_path / "model"
    assert train_model(config_for(cfg), model_name="resnet50", train_json=blobs["train"], val_json=blobs["val"],
                       images=blobs["images"], out=out) == 0
    assert [int(row["iters"]) for row in read_log(out / "train_log.csv")] == [4, 4]
