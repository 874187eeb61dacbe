"""The report's figures: PR and FROC curves, training curves and example test
slices with their boxes, as deterministic PNGs (same inputs, same bytes)."""

from __future__ import annotations

import base64
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator, NullLocator  # noqa: E402
from PIL import Image  # noqa: E402

from spinedet import SpinedetError  # noqa: E402
from spinedet.study.report_tables import percent, pretty  # noqa: E402


FIGURE_DPI = 150


# Detections drawn on the example slices: the threshold is for legibility only;
# every metric uses all detections above evaluate.score_threshold.
DISPLAY_SCORE = 0.5


EXAMPLE_IMAGES = 4


CLASS_COLOURS = ["#ff8c00", "#00bfff", "#ff4dd2", "#ffd700", "#b0ff57"]  # visible on dark MRI


MODEL_COLOURS = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#a6761d"]


GROUND_TRUTH_COLOUR = "#00e000"


def save_figure(fig, path: Path) -> Path:
    # No Software text chunk; fixed dpi: identical inputs give identical files.
    fig.savefig(path, dpi=FIGURE_DPI, format="png", metadata={"Software": None})
    plt.close(fig)
    return path


def plot_pr_curves(models: list[dict], classes: list[str], path: Path) -> Path:
    fig, axes = plt.subplots(1, len(classes), figsize=(3.7 * len(classes), 3.3), squeeze=False)
    for ax, name in zip(axes[0], classes):
        for colour, model in zip(MODEL_COLOURS, models):
            curves = model["metrics"]["pr_curves"]
            precision = curves["precision"].get(name)
            if precision is None:
                continue
            ap = model["metrics"]["ap50_per_class"].get(name)
            ax.plot(curves["recall"], precision, color=colour, lw=1.8,
                    label=f"{model['name']} (AP50 {percent(ap)} %)")
        ax.set(title=pretty(name), xlabel="Recall", ylabel="Precision (IoU 0.5)", xlim=(0, 1), ylim=(0, 1.02))
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_froc(models: list[dict], classes: list[str], path: Path) -> Path:
    panels = [*classes, "overall"]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.7 * len(panels), 3.3), squeeze=False)
    for ax, name in zip(axes[0], panels):
        for colour, model in zip(MODEL_COLOURS, models):
            froc = model["metrics"]["froc"]
            entry = froc["overall"] if name == "overall" else froc["per_class"].get(name)
            if not entry or entry["curve"] is None:
                continue
            ax.step(entry["curve"]["fps_per_image"], entry["curve"]["sensitivity"], where="post",
                    color=colour, lw=1.6, label=f"{model['name']} (CPM {percent(entry['cpm'])} %)")
            ax.plot(froc["fps_per_image"], entry["sensitivity"], "o", color=colour, ms=4)
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_locator(FixedLocator(FROC_TICKS))
        ax.xaxis.set_major_formatter(FuncFormatter(rate_label))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set(title="all lesions" if name == "overall" else pretty(name), xlabel="False positives per slice",
               ylabel="Sensitivity", ylim=(0, 1.02))
        ax.grid(alpha=0.3, which="both")
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


FROC_TICKS = [1 / 16, 1 / 8, 1 / 4, 1 / 2, 1, 2, 4, 8, 16]


def rate_label(rate: float, _position=None) -> str:
    """1/8 rather than 0.125 or 2^-3 on the FROC axis."""
    return f"{rate:g}" if rate >= 1 else f"1/{round(1 / rate)}"


def as_float(text: str | None) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return float("nan")


def plot_training(models: list[dict], path: Path) -> Path:
    fig, (loss_ax, ap_ax) = plt.subplots(1, 2, figsize=(8, 3.1))
    for colour, model in zip(MODEL_COLOURS, models):
        epochs = [as_float(r.get("epoch")) for r in model["train_log"]]
        loss_ax.plot(epochs, [as_float(r.get("loss")) for r in model["train_log"]], "o-", color=colour,
                     ms=3, label=model["name"])
        ap_ax.plot(epochs, [as_float(r.get("val_ap50")) for r in model["train_log"]], "o-", color=colour,
                   ms=3, label=model["name"])
    loss_ax.set(title="Training loss", xlabel="Epoch", ylabel="Loss (sum of the four terms)")
    ap_ax.set(title="Validation AP50", xlabel="Epoch", ylabel="AP50", ylim=(0, 1.02))
    for ax in (loss_ax, ap_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def example_images(test_coco: dict, classes: list[str], count: int = EXAMPLE_IMAGES) -> list[dict]:
    """Test slices to show: for each class in turn the next slice (by id) holding
    it, then one without lesions; deterministic."""
    images = sorted(test_coco["images"], key=lambda im: im["id"])
    classes_on = {im["id"]: set() for im in images}
    for ann in test_coco["annotations"]:
        classes_on[ann["image_id"]].add(ann["category_id"])
    chosen: list[dict] = []
    queues = [[im for im in images if k + 1 in classes_on[im["id"]]] for k in range(len(classes))]
    while len(chosen) < count - 1 and any(queues):
        for queue in queues:
            while queue and queue[0] in chosen:
                queue.pop(0)
            if queue and len(chosen) < count - 1:
                chosen.append(queue.pop(0))
    negatives = [im for im in images if not classes_on[im["id"]]]
    chosen += negatives[:1]
    rest = [im for im in images if im not in chosen]
    return chosen + rest[: count - len(chosen)]


def draw_boxes(ax, boxes: list[dict], classes: list[str], ground_truth: bool) -> None:
    """Ground truth dashed green, class name under the box; detections solid in
    their class colour, score above the box."""
    for box in boxes:
        x, y, w, h = box["bbox"]
        if ground_truth:
            colour, text, text_y, va = GROUND_TRUTH_COLOUR, pretty(classes[box["category_id"] - 1]), y + h + 1, "top"
        else:
            colour = CLASS_COLOURS[(box["category_id"] - 1) % len(CLASS_COLOURS)]
            text, text_y, va = f"{box['score']:.2f}", y - 1, "bottom"
        ax.add_patch(Rectangle((x, y), w, h, fill=False, lw=1.3, ec=colour, ls="--" if ground_truth else "-"))
        ax.text(x, text_y, text, color=colour, fontsize=6, va=va, ha="left",
                bbox={"facecolor": "black", "alpha": 0.55, "pad": 0.8, "lw": 0})


def plot_examples(models: list[dict], test_coco: dict, images_root: Path, classes: list[str], path: Path) -> Path:
    """One column per example slice, one row per model."""
    shown = example_images(test_coco, classes)
    if not shown:
        raise SpinedetError("the test split has no images to show")
    fig, axes = plt.subplots(len(models), len(shown), figsize=(2.3 * len(shown), 2.45 * len(models) + 0.5),
                             squeeze=False)
    gt_by_image: dict[int, list] = {}
    for ann in test_coco["annotations"]:
        gt_by_image.setdefault(ann["image_id"], []).append(ann)
    for c, info in enumerate(shown):
        image_path = images_root / info["file_name"]
        if not image_path.is_file():
            raise SpinedetError(f"test slice not found: {image_path}")
        pixels = np.asarray(Image.open(image_path).convert("L"))
        for r, model in enumerate(models):
            ax = axes[r][c]
            ax.imshow(pixels, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            draw_boxes(ax, gt_by_image.get(info["id"], []), classes, ground_truth=True)
            detections = [d for d in model["detections"]
                          if d["image_id"] == info["id"] and d["score"] >= DISPLAY_SCORE]
            draw_boxes(ax, detections, classes, ground_truth=False)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"test slice {c + 1} ({info.get('group', '')})", fontsize=8.5)
            if c == 0:
                ax.set_ylabel(model["name"], fontsize=10)
    handles = [Line2D([], [], color=GROUND_TRUTH_COLOUR, ls="--", label="ground truth")]
    handles += [Line2D([], [], color=CLASS_COLOURS[k % len(CLASS_COLOURS)], label=f"detected {pretty(name)}")
                for k, name in enumerate(classes)]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return save_figure(fig, path)


def embed_png(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
