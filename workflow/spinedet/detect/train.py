"""`spinedet train`: train one detector on the train split, validate each epoch
(COCO AP50 on the val split), keep the best weights. Resumable.

Layout of --out (e.g. results/models/resnet50):
- state/checkpoint.pt  last finished epoch: model, optimizer, lr_scheduler,
                       scaler, epoch, RNG states, config, the log rows so far
- state/best.pt        best weights so far (see `best_weights`)
- state/train_log.csv  one row per finished epoch
- state/val_detections.json  the best epoch's detections on the val split (COCO results)
- best.pt, train_log.csv, val_detections.json  copies of the state/ files, written at the end
- anchors.json         training-set lesion sizes against the anchor sizes

state/ is not a declared Snakemake output, so a rerun of a killed or
preempted job keeps it and resumes at the epoch after the last checkpoint
(a checkpoint made with another model config or training set is ignored).
Checkpoints are written to a temporary file and renamed, and SIGTERM only
asks the loop to stop before its next training iteration (exit status 143),
so a kill never leaves a half-written checkpoint. A resumed CPU run is
bit-identical to an uninterrupted one: RNG states are checkpointed and each
epoch's shuffling is seeded by seed + epoch.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from spinedet import SpinedetError
from spinedet.detect import engine
from spinedet.dataset.data import (
    CocoSlices,
    LesionCrop,
    TrainingSlices,
    check_categories,
    coco_to_xyxy,
    collate,
    image_size,
    load_coco,
    pixel_spacing_mm,
    sampling_weights,
    train_transforms,
)
from spinedet.io import copy_file, write_atomically, write_csv, write_json
from spinedet.detect.validation import validation_ap50

log = logging.getLogger(__name__)

LOSS_TERMS = ["loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"]
LOG_COLUMNS = ["epoch", "iters", "loss", *LOSS_TERMS, "lr", "val_ap50", "seconds"]
WARMUP_FACTOR = 0.001
PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM


def add_arguments(parser) -> None:
    from spinedet.config import add_config_argument

    add_config_argument(parser)
    parser.add_argument("--model", required=True, help="model name: a key of the config's models:")
    parser.add_argument("--train", required=True, help="training split, COCO JSON")
    parser.add_argument("--val", required=True, help="validation split, COCO JSON")
    parser.add_argument("--images", required=True, help="folder the COCO file_names are relative to")
    parser.add_argument("--out", required=True, help="output folder (state/ inside it makes reruns resume)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: config train.threads)")


def run(args) -> int:
    from spinedet.config import load

    config = load(args.config)
    return train_model(
        config,
        model_name=args.model,
        train_json=args.train,
        val_json=args.val,
        images=args.images,
        out=args.out,
        threads=args.threads,
    )


# ---------------------------------------------------------------- set-up


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic  # slice sizes are fixed: tuned kernels pay off
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # warn_only: RoIAlign's CUDA backward has no deterministic version.
        torch.use_deterministic_algorithms(True, warn_only=True)


def seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def lr_factor(
    iteration: int,
    total_iters: int,
    warmup_iters: int,
    scheduler: str = "cosine",
    milestones: list[int] | None = None,
    gamma: float = 0.1,
) -> float:
    """Learning-rate multiplier at `iteration` (0-based): linear warm-up times the main schedule."""
    if iteration < warmup_iters:
        alpha = iteration / warmup_iters
        warmup = WARMUP_FACTOR * (1 - alpha) + alpha
    else:
        warmup = 1.0
    if scheduler == "cosine":
        main = 0.5 * (1 + math.cos(math.pi * min(iteration, total_iters) / max(total_iters, 1)))
    elif scheduler == "multistep":
        main = gamma ** sum(iteration >= m for m in (milestones or []))
    else:
        raise SpinedetError(f"models.*.scheduler: {scheduler!r} is not one of cosine, multistep")
    return warmup * main


def build_optimizer(model: torch.nn.Module, model_cfg: dict) -> torch.optim.Optimizer:
    """SGD with momentum (torchvision's detection reference) or AdamW (`optimizer:`)."""
    params = [p for p in model.parameters() if p.requires_grad]
    lr, weight_decay = float(model_cfg["lr"]), float(model_cfg.get("weight_decay", 1e-4))
    name = model_cfg.get("optimizer", "sgd")
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name != "sgd":
        raise SpinedetError(f"models.*.optimizer: {name!r} is not one of sgd, adamw")
    return torch.optim.SGD(params, lr=lr, momentum=float(model_cfg.get("momentum", 0.9)), weight_decay=weight_decay)


def build_lr_scheduler(optimizer, model_cfg: dict, iters_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per iteration."""
    epochs = int(model_cfg["epochs"])
    total_iters = epochs * iters_per_epoch
    warmup_iters = min(int(model_cfg.get("warmup_iters", 0)), total_iters)
    scheduler = model_cfg.get("scheduler", "cosine")
    lr_steps = model_cfg.get("lr_steps") or [int(0.7 * epochs), int(0.9 * epochs)]
    milestones = [int(step) * iters_per_epoch for step in lr_steps]
    gamma = float(model_cfg.get("lr_gamma", 0.1))
    lr_factor(0, total_iters, warmup_iters, scheduler)  # fail early on an unknown scheduler name
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: lr_factor(it, total_iters, warmup_iters, scheduler, milestones, gamma)
    )


# ---------------------------------------------------------------- anchors


def grid_anchors(model, size: int) -> torch.Tensor:
    """Every anchor (x0, y0, x1, y1) the RPN places on a `size` px slice: torchvision's
    AnchorGenerator on the model's real feature grid, not anchors centred on the boxes."""
    from torchvision.models.detection.image_list import ImageList

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    # the transform pads each side to a multiple of size_divisible
    divisible = int(getattr(model.transform, "size_divisible", 1))
    padded = int(math.ceil(size / divisible) * divisible)
    with torch.no_grad():
        image = torch.zeros(1, 3, padded, padded, device=device)
        features = model.backbone(image)
        if isinstance(features, torch.Tensor):
            features = {"0": features}
        anchors = model.rpn.anchor_generator(ImageList(image, [(size, size)]), list(features.values()))[0]
    model.train(was_training)
    return anchors.cpu()


def size_stats(boxes: torch.Tensor, anchors: torch.Tensor) -> dict:
    """Box sizes and how the grid anchors cover them."""
    from torchvision.ops import box_iou

    if len(boxes) == 0:
        return {"boxes": 0}
    percentiles = [5, 25, 50, 75, 95]
    widths, heights = (boxes[:, 2] - boxes[:, 0]).numpy(), (boxes[:, 3] - boxes[:, 1]).numpy()
    best, at = [], {0.5: [], 0.7: []}
    for chunk in boxes.split(256):  # boxes x anchors IoUs, a chunk at a time
        ious = box_iou(chunk, anchors)
        best.append(ious.max(dim=1).values)
        for threshold in at:
            at[threshold].append((ious >= threshold).sum(dim=1))
    best = torch.cat(best).numpy()
    at = {threshold: torch.cat(counts).numpy() for threshold, counts in at.items()}
    return {
        "boxes": int(len(boxes)),
        "width_px": dict(zip([f"p{p}" for p in percentiles], np.percentile(widths, percentiles).round(1).tolist())),
        "height_px": dict(zip([f"p{p}" for p in percentiles], np.percentile(heights, percentiles).round(1).tolist())),
        "best_anchor_iou_median": round(float(np.median(best)), 3),
        "fraction_matched": round(float(np.mean(at[0.5] > 0)), 3),
        "fraction_matched_iou07": round(float(np.mean(at[0.7] > 0)), 3),
        "anchors_iou05_per_box": round(float(at[0.5].mean()), 2),
        "anchors_iou07_per_box": round(float(at[0.7].mean()), 2),
    }


def anchor_report(coco: dict, classes: list[str], model_cfg: dict, model, size: int) -> dict:
    """Training-set box sizes per class against the anchors on the model's real stride grid."""
    from spinedet.detect.models import aspect_ratios

    anchors = grid_anchors(model, size)
    boxes = torch.tensor([coco_to_xyxy(a["bbox"]) for a in coco["annotations"]], dtype=torch.float32).reshape(-1, 4)
    labels = torch.tensor([a["category_id"] for a in coco["annotations"]], dtype=torch.int64)
    return {
        "anchor_sizes": model_cfg["anchor_sizes"],
        "aspect_ratios": aspect_ratios(model_cfg),
        "anchors": int(len(anchors)),
        "rpn_fg_iou_thresh": float(model.rpn.proposal_matcher.high_threshold),
        "all": size_stats(boxes, anchors),
        "classes": {name: size_stats(boxes[labels == i + 1], anchors) for i, name in enumerate(classes)},
        "note": (
            f"Anchors as the RPN places them on a {size} px slice (every feature-map cell, at the "
            "backbone's strides). fraction_matched: share of training boxes with at least one anchor "
            "of IoU >= 0.5 (fraction_matched_iou07: >= 0.7); anchors_iou05_per_box: mean count of such "
            "anchors per box. Sizes are in slice pixels, which the detector does not resample."
        ),
    }


# ---------------------------------------------------------------- loops


class Preempted(Exception):
    """SIGTERM arrived; the last saved checkpoint stands."""


class StopOnSigterm:
    """Turns SIGTERM into a flag the training loop checks between iterations.

    Once an epoch's iterations are done, its validation and checkpoint are
    finished before stopping (seconds on a GPU), so the epoch is not lost.
    """

    def __init__(self):
        self.requested = False
        self.previous = None

    def _handler(self, signum, frame):
        self.requested = True
        log.warning("SIGTERM received: stopping at the next training iteration")

    def check(self) -> None:
        if self.requested:
            raise Preempted

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._handler)
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
        return False


def progress(iterable, total: int, desc: str):
    # Without a terminal (a log file) print a line now and then, not a redraw per step.
    interactive = sys.stderr.isatty()
    return tqdm(iterable, total=total, desc=desc, file=sys.stderr, mininterval=0.5 if interactive else 30)


def train_one_epoch(
    model,
    optimizer,
    lr_scheduler,
    scaler,
    loader,
    device: torch.device,
    epoch: int,
    max_iters: int | None = None,
    clip_grad_norm: float | None = None,
    stop: StopOnSigterm | None = None,
    desc: str = "train",
) -> dict:
    """One pass over `loader` (at most `max_iters` batches); mean loss terms and iteration count."""
    model.train()
    use_amp = device.type == "cuda"
    total = len(loader) if max_iters is None else min(len(loader), max_iters)
    sums = dict.fromkeys(["loss", *LOSS_TERMS], 0.0)
    iters = 0
    for images, targets in progress(itertools.islice(loader, total), total, desc):
        if stop is not None:
            stop.check()
        images = [img.to(device, non_blocking=True) for img in images]
        targets = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
        with torch.autocast(device_type="cuda", enabled=use_amp):
            loss_dict = model(images, targets)
            loss = sum(loss_dict.values())
        values = {k: float(v.detach()) for k, v in loss_dict.items()}
        if not math.isfinite(float(loss.detach())):
            terms = ", ".join(f"{k}={v:.4g}" for k, v in values.items())
            raise SpinedetError(
                f"non-finite loss at epoch {epoch}, iteration {iters + 1}: {terms}. "
                "Try a lower lr, more warmup_iters or a smaller clip_grad_norm."
            )
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if clip_grad_norm:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(
                [p for group in optimizer.param_groups for p in group["params"]], float(clip_grad_norm)
            )
        scaler.step(optimizer)
        scaler.update()
        lr_scheduler.step()
        sums["loss"] += float(loss.detach())
        for k in LOSS_TERMS:
            sums[k] += values.get(k, 0.0)
        iters += 1
    means = {k: (v / iters if iters else float("nan")) for k, v in sums.items()}
    return {"iters": iters, **means}


# ---------------------------------------------------------------- files


def save_checkpoint(obj: dict, path: Path) -> None:
    write_atomically(path, lambda tmp: torch.save(obj, tmp))


def write_log(rows: list[dict], path: Path) -> None:
    write_csv(path, rows, LOG_COLUMNS, none_as="")


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def images_sha256(images: str | Path, *cocos: dict) -> str:
    """One sha256 over the bytes of every image the COCO datasets name, in name order."""
    digest = hashlib.sha256()
    for name in sorted({image["file_name"] for coco in cocos for image in coco["images"]}):
        digest.update(name.encode())
        digest.update(hashlib.sha256((Path(images) / name).read_bytes()).digest())
    return digest.hexdigest()


def best_weights(model, model_name: str, model_cfg: dict, classes: list[str], size: int, epoch: int, ap50,
                 spacing_mm: list[float] | None = None) -> dict:
    """The content of best.pt, read back by `spinedet.detect.models.load_trained`."""
    return {
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "model_name": model_name,
        "model_config": model_cfg,
        "classes": list(classes),
        "image_size": int(size),
        "pixel_spacing_mm": spacing_mm,  # median (row, column) of the training slices; predict compares
        "epoch": int(epoch),
        "val_ap50": ap50,
    }


def load_checkpoint(path: Path, fingerprint: dict) -> dict | None:
    """The checkpoint to resume from, or None when there is none or it belongs to another run."""
    if not path.is_file():
        return None
    try:
        # Our own file (RNG states include numpy arrays, which weights_only refuses).
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable file: keep it aside and start over
        kept = path.with_name(path.name + ".unreadable")
        path.replace(kept)
        log.warning("unreadable checkpoint %s (%s), kept as %s: starting from epoch 1", path, exc, kept)
        return None
    if checkpoint.get("fingerprint") != fingerprint:
        log.warning(
            "checkpoint %s was made with another model config or training set: starting from epoch 1", path
        )
        return None
    return checkpoint


# ---------------------------------------------------------------- the verb


def make_loader(
    dataset, batch_size: int, shuffle: bool, workers: int, seed: int, weights: list[float] | None = None,
    samples: int | None = None,
) -> torch.utils.data.DataLoader:
    """Batches of `dataset`; with `weights`, `samples` images drawn with replacement by weight."""
    # Seeded per epoch: a resumed run sees the same batches as an uninterrupted one.
    generator = torch.Generator().manual_seed(seed)
    sampler = None
    if weights is not None:
        sampler = torch.utils.data.WeightedRandomSampler(weights, samples or len(dataset), generator=generator)
        shuffle = False
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate,
        worker_init_fn=seed_worker,
        generator=generator,
    )


def epoch_length(images: int, batch_size: int, max_iters: int | None, with_replacement: bool) -> int:
    """Iterations per epoch. A sampler that draws with replacement (class_balanced) has no
    natural epoch: it is `max_iters` batches, whatever the cohort's size (a 17-patient study
    trains as long as a 180-patient one). A uniform pass over the slices is one epoch,
    capped at `max_iters`."""
    if with_replacement and max_iters:
        return int(max_iters)
    full_pass = math.ceil(images / batch_size)
    return min(full_pass, int(max_iters)) if max_iters else full_pass


def training_set(train_coco: dict, images, model_cfg: dict, classes: list[str]):
    """The training dataset (jitter, box-aware crops) and its sampling weights (None: uniform)."""
    slices = CocoSlices(train_coco, images, transforms=train_transforms(hflip=bool(model_cfg.get("hflip", False))))
    crop_size = model_cfg.get("crop_size")
    crop = LesionCrop(int(crop_size), float(model_cfg.get("lesion_crop_share", 0.7))) if crop_size else None
    weights = None
    if model_cfg.get("sampler", "uniform") == "class_balanced":
        weights = sampling_weights(train_coco, float(model_cfg.get("negative_share", 0.2)))
    return TrainingSlices(slices, crop), weights


@dataclass
class Training:
    """Everything one training run works with, built by `set_up_training`."""
    config: dict
    model_name: str
    model_cfg: dict  # with the resolved norm, which travels with the weights
    classes: list[str]
    seed: int
    epochs: int
    device: torch.device
    precision: str  # of validation (engine.inference_precision)
    val_coco: dict
    train_set: torch.utils.data.Dataset
    sampling_weights: list[float] | None
    val_set: torch.utils.data.Dataset
    batch_size: int
    workers: int
    iters_per_epoch: int
    size: int
    spacing_mm: list[float] | None
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    fingerprint: dict  # a checkpoint made with another fingerprint is not resumed

    def resumable(self) -> dict:
        """What a checkpoint restores, besides the epoch, RNG states and log rows."""
        return {"model": self.model, "optimizer": self.optimizer, "lr_scheduler": self.lr_scheduler,
                "scaler": self.scaler}


@dataclass
class TrainingProgress:
    """The log rows so far, the best validation AP50 and the next epoch."""
    rows: list[dict] = field(default_factory=list)
    best_ap: float | None = None
    start_epoch: int = 1


@dataclass(frozen=True)
class StateFiles:
    """state/: what a rerun resumes from."""
    checkpoint: Path
    best: Path
    log: Path
    val_detections: Path

    @classmethod
    def under(cls, state_dir: Path) -> StateFiles:
        return cls(*(state_dir / name for name in ("checkpoint.pt", "best.pt", "train_log.csv",
                                                   "val_detections.json")))


def set_up_training(config: dict, model_name: str, train_json: str | Path, val_json: str | Path,
                    images: str | Path, out: Path, threads: int | None) -> Training:
    """Device, seeds, data, model, anchors.json, optimizer and schedule, in that order (the seeds
    come first, so the same config gives the same initial weights)."""
    from spinedet.config import model_norm
    from spinedet.detect.models import build_model, count_parameters, resolve_device

    if model_name not in config["models"]:
        raise SpinedetError(f"--model {model_name}: no such entry under models: in the config")
    # The resolved norm travels with the weights: best.pt loads the same network
    # whatever the default is when it is read.
    model_cfg = {**config["models"][model_name], "norm": model_norm(config["models"][model_name])}
    train_cfg = config["train"]
    classes = list(config["classes"])
    seed = int(config["seed"])

    device = resolve_device(train_cfg["device"])
    precision = engine.inference_precision(device, train_cfg["cpu_inference_precision"])
    threads = int(threads or train_cfg["threads"])
    if device.type == "cpu":
        torch.set_num_threads(threads)
    seed_everything(seed, bool(train_cfg["deterministic"]))

    train_coco, val_coco = load_coco(train_json), load_coco(val_json)
    check_categories(train_coco, classes, str(train_json))
    check_categories(val_coco, classes, str(val_json))
    if not train_coco["images"]:
        raise SpinedetError(f"{train_json}: the training split has no images")
    size = image_size({"images": train_coco["images"] + val_coco["images"]})

    train_set, weights = training_set(train_coco, images, model_cfg, classes)
    val_set = CocoSlices(val_coco, images)
    batch_size = int(model_cfg["batch_size"])
    iters_per_epoch = epoch_length(len(train_set), batch_size, model_cfg.get("max_iters_per_epoch"),
                                   with_replacement=weights is not None)

    model = build_model(model_cfg, num_classes=len(classes) + 1, image_size=size).to(device)
    anchors = anchor_report(train_coco, classes, model_cfg, model, size)
    write_json(out / "anchors.json", anchors, indent=2)
    matched = anchors["all"].get("fraction_matched")
    log.info(
        "anchors: %d training boxes, %s have a grid anchor with IoU >= 0.5 (anchors.json)",
        anchors["all"]["boxes"],
        "n/a" if matched is None else f"{matched:.0%}",
    )
    if matched is not None and matched < 0.8:
        log.warning("anchor sizes %s fit only %.0f%% of the training boxes", model_cfg["anchor_sizes"], 100 * matched)
    optimizer = build_optimizer(model, model_cfg)
    params = count_parameters(model)
    log.info(
        "%s (%s): %.1fM parameters (%.1fM trainable), %d px slices, %d train / %d val images, "
        "%d iterations per epoch, device %s, validation in %s",
        model_name, model_cfg["arch"], params["total"] / 1e6, params["trainable"] / 1e6, size,
        len(train_set), len(val_set), iters_per_epoch, device, precision,
    )
    fingerprint = {
        "model_name": model_name,
        "model_config": model_cfg,
        "classes": classes,
        "seed": seed,
        "validation_precision": precision,  # it picks the best epoch
        "train_sha256": file_sha256(train_json),
        "val_sha256": file_sha256(val_json),
        # regenerated slices under unchanged COCO files must not resume stale training
        "slices_sha256": images_sha256(images, train_coco, val_coco),
    }
    return Training(
        config=config, model_name=model_name, model_cfg=model_cfg, classes=classes, seed=seed,
        epochs=int(model_cfg["epochs"]), device=device, precision=precision, val_coco=val_coco,
        train_set=train_set, sampling_weights=weights, val_set=val_set, batch_size=batch_size,
        workers=int(train_cfg["workers"]), iters_per_epoch=iters_per_epoch, size=size,
        spacing_mm=pixel_spacing_mm(train_coco), model=model, optimizer=optimizer,
        lr_scheduler=build_lr_scheduler(optimizer, model_cfg, iters_per_epoch),
        scaler=torch.amp.GradScaler("cuda", enabled=device.type == "cuda"), fingerprint=fingerprint,
    )


def resume(training: Training, checkpoint_path: Path) -> TrainingProgress:
    """Restore the last checkpoint of this run into `training`, or start at epoch 1."""
    checkpoint = load_checkpoint(checkpoint_path, training.fingerprint)
    if checkpoint is None:
        return TrainingProgress()
    for part, state in training.resumable().items():
        state.load_state_dict(checkpoint[part])
    set_rng_state(checkpoint["rng"])
    progress = TrainingProgress(checkpoint["log_rows"], checkpoint["best_val_ap50"], checkpoint["epoch"] + 1)
    log.info("resuming from %s: epoch %d of %d", checkpoint_path, progress.start_epoch, training.epochs)
    return progress


def train_and_validate(training: Training, epoch: int, stop: StopOnSigterm) -> tuple[dict, float | None, list[dict]]:
    """One epoch of training, then the validation split: the log row, val AP50 and val detections."""
    started = time.perf_counter()
    loader = make_loader(training.train_set, training.batch_size, True, training.workers, training.seed + epoch,
                         training.sampling_weights, training.iters_per_epoch * training.batch_size)
    stats = train_one_epoch(
        training.model, training.optimizer, training.lr_scheduler, training.scaler, loader, training.device, epoch,
        max_iters=training.iters_per_epoch,
        clip_grad_norm=training.model_cfg.get("clip_grad_norm"),
        stop=stop,
        desc=f"{training.model_name} epoch {epoch}/{training.epochs}",
    )
    ap50, val_detections = None, []
    if len(training.val_set):
        val_loader = make_loader(training.val_set, training.batch_size, False, training.workers, training.seed)
        val_detections = engine.predict_coco(training.model, val_loader, training.device, training.precision)
        ap50 = validation_ap50(training.val_coco, val_detections)
    row = {
        "epoch": epoch,
        **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in stats.items()},
        "lr": training.optimizer.param_groups[0]["lr"],
        "val_ap50": None if ap50 is None else round(ap50, 6),
        "seconds": round(time.perf_counter() - started, 2),
    }
    return row, ap50, val_detections


def save_epoch(training: Training, progress: TrainingProgress, files: StateFiles, epoch: int, row: dict,
               ap50: float | None, val_detections: list[dict]) -> bool:
    """Record a finished epoch in state/: best.pt and its validation detections when it
    improved (or has no val AP50), then the checkpoint and the log. True if it improved."""
    progress.rows.append(row)
    improved = ap50 is None or progress.best_ap is None or ap50 > progress.best_ap
    if improved:
        progress.best_ap = ap50 if ap50 is not None else progress.best_ap
        save_checkpoint(best_weights(training.model, training.model_name, training.model_cfg, training.classes,
                                     training.size, epoch, ap50, training.spacing_mm), files.best)
        # evaluate picks its patient-level operating point on these
        write_json(files.val_detections, val_detections)
    save_checkpoint(
        {
            **{part: state.state_dict() for part, state in training.resumable().items()},
            "epoch": epoch,
            "rng": rng_state(),
            "config": training.config,
            "fingerprint": training.fingerprint,
            "log_rows": progress.rows,
            "best_val_ap50": progress.best_ap,
        },
        files.checkpoint,
    )
    write_log(progress.rows, files.log)
    return improved


def publish(files: StateFiles, state_dir: Path, out: Path) -> None:
    """Copy the finished run's best.pt, train_log.csv and val_detections.json from state/ to `out`."""
    if not files.best.is_file():
        raise SpinedetError(f"{files.best} is missing: delete {state_dir} and train again")
    copy_file(files.best, out / "best.pt")
    copy_file(files.log, out / "train_log.csv")
    if files.val_detections.is_file():
        copy_file(files.val_detections, out / "val_detections.json")
    else:  # state of a run from before val_detections.json existed
        log.warning("%s is missing: no validation detections for the operating point", files.val_detections)
        write_json(out / "val_detections.json", [])


def train_model(
    config: dict,
    model_name: str,
    train_json: str | Path,
    val_json: str | Path,
    images: str | Path,
    out: str | Path,
    threads: int | None = None,
) -> int:
    """Train (or resume training) `model_name`; returns the exit code (143 when stopped by SIGTERM)."""
    out = Path(out)
    state_dir = out / "state"
    state_dir.mkdir(parents=True, exist_ok=True)
    files = StateFiles.under(state_dir)
    training = set_up_training(config, model_name, train_json, val_json, images, out, threads)
    progress = resume(training, files.checkpoint)
    if len(training.val_set) and not training.val_coco["annotations"]:
        log.warning("%s has no boxes: val_ap50 is left empty and the last epoch is kept as best", val_json)

    with StopOnSigterm() as stop:
        try:
            for epoch in range(progress.start_epoch, training.epochs + 1):
                row, ap50, val_detections = train_and_validate(training, epoch, stop)
                improved = save_epoch(training, progress, files, epoch, row, ap50, val_detections)
                log.info(
                    "%s epoch %d/%d: loss %.4f, val AP50 %s, lr %.3g, %.1f s%s",
                    model_name, epoch, training.epochs, row["loss"],
                    "n/a" if ap50 is None else f"{ap50:.3f}", row["lr"], row["seconds"],
                    " (best)" if improved else "",
                )
        except Preempted:
            done = progress.rows[-1]["epoch"] if progress.rows else 0
            log.warning("stopped by SIGTERM; %d epoch(s) saved in %s, rerun to resume", done, files.checkpoint)
            return PREEMPTED_EXIT_CODE

    publish(files, state_dir, out)
    log.info("%s: best epoch weights in %s, log in %s", model_name, out / "best.pt", out / "train_log.csv")
    return 0
