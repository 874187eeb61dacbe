"""`spinedet report`: the model-comparison report.

Reads every model's eval/{model}/metrics.json and detections.json,
timing/{model}.json (spinedet speed: all models timed in one job) and
models/{model}/train_log.csv, plus report/comparison.json, split/group_counts.csv,
split/test.json, inventory/summary.json and deid/annotation_issues.csv under
--results, and writes under --out:
- report.html: one self-contained file (figures embedded as base64 PNG, CSS
  inline, nothing fetched over a network);
- report.md: the same tables, figures referenced from figures/;
- summary.csv: one row per model; timing columns (prefix `timing_`) last, so
  the rest is byte-identical for the same inputs;
- figures/*.png: PR curves, FROC curves, training curves, test examples;
- config.yaml: the study config the report describes (all but `resources`).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import importlib.metadata
import logging
import math
import platform
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import yaml  # noqa: E402
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator, NullLocator  # noqa: E402
from PIL import Image  # noqa: E402

from spinedet import SpinedetError, __version__  # noqa: E402
from spinedet.io import read_csv, read_json, write_csv, write_text  # noqa: E402

log = logging.getLogger(__name__)

FIGURE_DPI = 150
# metrics.json's inference_precision in the methods paragraph
INFERENCE_PRECISION = {"float32": "in float32", "bfloat16": "under bfloat16 autocast",
                       "float16": "under float16 autocast"}

# Detections drawn on the example slices: the threshold is for legibility only;
# every metric uses all detections above evaluate.score_threshold.
DISPLAY_SCORE = 0.5
EXAMPLE_IMAGES = 4
CLASS_COLOURS = ["#ff8c00", "#00bfff", "#ff4dd2", "#ffd700", "#b0ff57"]  # visible on dark MRI
MODEL_COLOURS = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#a6761d"]
GROUND_TRUTH_COLOUR = "#00e000"

# Ma et al., J Appl Clin Med Phys 2020;21(9):235-243, as published.
PAPER_ROWS = [
    {"model": "ResNet-50 (Ma et al. 2020)", "map_percent": 88.6, "seconds_per_image": 0.22},
    {"model": "VGG-16 (Ma et al. 2020)", "map_percent": 72.3, "seconds_per_image": 0.24},
]
PAPER_NOTE = ("Published values of Ma et al., J Appl Clin Med Phys 2020;21(9):235-243: their private "
              "data set (1,500 patients) and their hardware. Not comparable with the rows above.")
# The paper says "mAP" without its definition. Faster R-CNN code of its time scored
# VOC-format data sets with the PASCAL VOC2007 11-point AP at IoU 0.5 (py-faster-rcnn's
# voc_eval with use_07_metric for VOC2007, kept by its PyTorch ports), so that is
# the form the paper's row is set beside.
PAPER_METRIC_NOTE = ("Ma et al. report \"mAP\" without defining it. We assume the PASCAL VOC2007 11-point AP "
                     "at IoU 0.5, averaged over classes: the metric with which the Faster R-CNN code bases of "
                     "2018-2020 (py-faster-rcnn and its PyTorch ports) scored VOC-format data sets. The "
                     "all-point VOC2010+ form and COCO's 101-point AP50 are given beside it; on the same "
                     "detections the three differ by a few points.")

MANIFEST_PACKAGES = ["torch", "torchvision", "numpy", "pandas", "pycocotools", "scikit-learn", "pydicom",
                     "nibabel", "matplotlib", "jinja2", "snakemake"]

INVENTORY_LABELS = {
    "files_in": "Files in the export",
    "ok": "Files used",
    "ok_by_kind": "used, by kind",
    "quarantined": "Files quarantined",
    "quarantined_by_reason": "quarantined, by reason",
    "series": "Series found",
    "series_by_orientation": "series, by orientation",
    "cohort_patients": "Patients in cohort.csv",
    "patients_selected": "Patients with a target series",
    "patients_without_target": "Patients without a target series",
    "patients_without_files": "Cohort patients without any file",
    "patients_not_in_cohort": "Patients in the export but not in cohort.csv",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from spinedet.config import add_config_argument

    add_config_argument(parser)
    parser.add_argument("--models", nargs="+", required=True, help="model names to compare, in table order")
    per_model = "one per --models entry, in the same order"
    parser.add_argument("--metrics", nargs="+", required=True, type=Path, help=f"eval metrics.json, {per_model}")
    parser.add_argument("--timing", nargs="+", required=True, type=Path, help=f"timing/MODEL.json of spinedet speed, {per_model}")
    parser.add_argument("--detections", nargs="+", required=True, type=Path,
                        help=f"eval detections.json, {per_model}")
    parser.add_argument("--train-logs", nargs="+", required=True, type=Path, help=f"train_log.csv, {per_model}")
    parser.add_argument("--comparison", required=True, type=Path,
                        help="report/comparison.json (spinedet compare): the paired model differences")
    parser.add_argument("--cv-summary", type=Path,
                        help="report/cv_summary.csv (spinedet cv), when split.folds >= 2")
    parser.add_argument("--test", required=True, type=Path, help="test split COCO (split/test.json)")
    parser.add_argument("--group-counts", required=True, type=Path, help="split/group_counts.csv")
    parser.add_argument("--inventory", required=True, type=Path, help="inventory/summary.json")
    parser.add_argument("--issues", required=True, type=Path, help="deid/annotation_issues.csv")
    parser.add_argument("--images", required=True, type=Path, help="slice PNG root (results/slices)")
    parser.add_argument("--out", required=True, type=Path, help="report folder (results/report)")


# ---------------------------------------------------------------- inputs


@dataclass(frozen=True)
class ModelFiles:
    name: str
    metrics: Path
    timing: Path
    detections: Path
    train_log: Path


@dataclass(frozen=True)
class ReportInputs:
    """Every file the report reads: the report rule's inputs, no path re-derived."""
    models: list[ModelFiles]
    comparison: Path
    test: Path
    group_counts: Path
    inventory: Path
    issues: Path
    images: Path
    cv_summary: Path | None = None


def read_model_results(files: ModelFiles) -> dict:
    """One model's evaluation and training outputs."""
    return {
        "name": files.name,
        "metrics": read_json(files.metrics),
        "timing": read_json(files.timing),
        "detections": read_json(files.detections),
        "train_log": read_csv(files.train_log),
    }


def read_group_counts(path: Path) -> dict:
    """split/group_counts.csv (rows = group, columns = split) as a table with totals."""
    rows = read_csv(path)
    if not rows:
        raise SpinedetError(f"{path} has no rows")
    first = list(rows[0])[0]
    splits = [c for c in rows[0] if c != first and c.lower() != "total"]
    body = []
    for row in rows:
        if row[first].lower() == "total":
            continue
        counts = [int(float(row[s] or 0)) for s in splits]
        body.append({"group": row[first], "counts": counts, "total": sum(counts)})
    totals = [sum(r["counts"][i] for r in body) for i in range(len(splits))]
    return {"splits": splits, "rows": body, "totals": totals, "total": sum(totals)}


def inventory_rows(summary: dict) -> list[dict]:
    """inventory/summary.json as labelled rows; nested counts become indented rows."""
    from spinedet.quarantine import REASONS

    rows = []
    for key, value in summary.items():
        label = INVENTORY_LABELS.get(key, key.replace("_", " ").capitalize())
        if isinstance(value, dict):
            rows.append({"label": label, "value": sum(value.values()) if value else 0, "level": 0})
            for sub_key, sub_value in value.items():
                sub_label = REASONS.get(sub_key, sub_key.replace("_", " ")) if key == "quarantined_by_reason" \
                    else sub_key.replace("_", " ")
                rows.append({"label": sub_label, "value": sub_value, "level": 1})
        else:
            rows.append({"label": label, "value": value, "level": 0})
    return rows


def annotation_issue_counts(path: Path) -> list[dict]:
    """deid/annotation_issues.csv counted by reason (most frequent first)."""
    counts = Counter(row["reason"] for row in read_csv(path))
    return [{"reason": reason, "count": n} for reason, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]


def test_set_facts(test_coco: dict, classes: list[str]) -> dict:
    patients = {img.get("patient") for img in test_coco["images"]}
    lesions = Counter(ann["category_id"] for ann in test_coco["annotations"])
    with_lesion = {ann["image_id"] for ann in test_coco["annotations"]}
    return {
        "patients": len(patients),
        "images": len(test_coco["images"]),
        "images_with_lesion": len(with_lesion),
        "lesions": {name: lesions.get(k + 1, 0) for k, name in enumerate(classes)},
        "lesion_sizes": lesion_sizes(test_coco, classes),
    }


def size_range(values: list[float], digits: int) -> str:
    """'median (5th-95th percentile)' of `values`."""
    if not values:
        return "n/a"
    p5, p50, p95 = np.percentile(values, [5, 50, 95])
    return f"{p50:.{digits}f} ({p5:.{digits}f}–{p95:.{digits}f})"


def lesion_sizes(test_coco: dict, classes: list[str]) -> list[dict]:
    """Per class: boxes, patients, and box width and height in pixels and, where the
    slices carry their pixel spacing, in mm (median and 5th-95th percentile)."""
    images = {img["id"]: img for img in test_coco["images"]}
    rows = []
    for k, name in enumerate(classes, start=1):
        anns = [a for a in test_coco["annotations"] if a["category_id"] == k]
        mm = bool(anns) and all("pixel_width_mm" in images[a["image_id"]] for a in anns)
        rows.append({
            "class": pretty(name).capitalize(),
            "boxes": len(anns),
            "patients": len({images[a["image_id"]].get("patient") for a in anns}),
            "width_px": size_range([a["bbox"][2] for a in anns], 0),
            "height_px": size_range([a["bbox"][3] for a in anns], 0),
            "width_mm": size_range([a["bbox"][2] * images[a["image_id"]]["pixel_width_mm"] for a in anns], 1)
            if mm else "n/a",
            "height_mm": size_range([a["bbox"][3] * images[a["image_id"]]["pixel_height_mm"] for a in anns], 1)
            if mm else "n/a",
        })
    return rows


NORM_NAMES = {"frozen_bn": "frozen batch norm", "bn": "batch norm", "gn": "GroupNorm", "none": "no normalisation"}


def model_recipe(name: str, model_cfg: dict | None) -> dict:
    """How a model was built and trained, and where it departs from Ma et al.'s
    Faster R-CNN (ImageNet-initialised ResNet-50 / VGG-16, whole images)."""
    from spinedet.config import model_norm

    if not model_cfg:
        return {"model": name, "backbone": "n/a", "training": "n/a", "departures": "n/a"}
    arch = model_cfg.get("arch", "")
    norm = model_norm(model_cfg)
    pretrained = str(model_cfg.get("pretrained", "none"))
    departures = []
    if arch.startswith("fasterrcnn_vgg16"):
        if arch == "fasterrcnn_vgg16_fpn":
            backbone = f"VGG-16 + FPN (conv3_3, conv4_3, conv5_3), {NORM_NAMES[norm]}"
            departures.append("an FPN over conv3_3-conv5_3, as ResNet-50-FPN's (the paper's VGG-16 detector "
                              "reads conv5_3 alone, at stride 16)")
        else:
            stride = int(model_cfg.get("output_stride", 16))
            backbone = f"VGG-16 conv5_3, stride {stride}, {NORM_NAMES[norm]}"
            if stride != 16:
                departures.append(f"stride {stride} (pool4 removed; the paper's conv5_3 is at stride 16)")
        if norm != "none":
            departures.append(f"{NORM_NAMES[norm]} after each convolution (the paper's VGG-16 has none)")
    else:
        backbone = f"ResNet-50 + FPN, {NORM_NAMES[norm]}"
        if norm not in ("frozen_bn", "bn"):
            departures.append(f"{NORM_NAMES[norm]} instead of batch norm")
    if pretrained.lower() == "none":
        departures.append("trained from scratch (no ImageNet weights)")
    iters = model_cfg.get("max_iters_per_epoch")
    schedule = f"{model_cfg.get('epochs')} epochs" + (f" of {iters} iterations" if iters else "")
    crop = model_cfg.get("crop_size")
    if crop:
        departures.append(f"trained on {crop} px crops, {100 * float(model_cfg.get('lesion_crop_share', 0.7)):.0f} % "
                          "holding a lesion (inference on whole slices)")
    sampler = model_cfg.get("sampler", "uniform")
    optimizer = model_cfg.get("optimizer", "sgd")
    if optimizer != "sgd":
        departures.append(f"{optimizer} instead of SGD with momentum")
    training = (f"{schedule}, batch {model_cfg.get('batch_size')}, {'AdamW' if optimizer == 'adamw' else 'SGD'}, "
                f"lr {model_cfg.get('lr')} "
                f"({model_cfg.get('scheduler', 'cosine')}), weights: {pretrained}"
                + (f", {crop} px crops" if crop else ", whole slices")
                + (", class-balanced sampling" if sampler == "class_balanced" else ""))
    return {"model": name, "backbone": backbone, "training": training,
            "departures": "; ".join(departures) if departures else "none"}


# ---------------------------------------------------------------- tables


def comparison_row(model: dict, classes: list[str]) -> dict:
    """The numbers of one model's comparison row (fractions, seconds, counts)."""
    m, t = model["metrics"], model["timing"]
    boot = m.get("bootstrap", {})
    row = {
        "model": model["name"],
        "arch": m.get("arch"),
        "parameters": m.get("weights", {}).get("parameters", {}).get("total"),
        "epoch": m.get("weights", {}).get("epoch"),
        "test_images": m.get("n_images"),
        "test_patients": m.get("n_patients"),
        "ap50": m["ap50"],
        "ap50_ci_low": boot.get("ap50", {}).get("low"),
        "ap50_ci_high": boot.get("ap50", {}).get("high"),
        "ap": m["ap"],
        "ap75": m["ap75"],
        "ar100": m["ar100"],
        "ap_iou10": m["ap_iou10"],
    }
    for name in classes:
        interval = boot.get("ap50_per_class", {}).get(name, {})
        row[f"ap50_{name}"] = m["ap50_per_class"].get(name)
        row[f"ap50_{name}_ci_low"] = interval.get("low")
        row[f"ap50_{name}_ci_high"] = interval.get("high")
        row[f"ap50_{name}_ci_estimable"] = interval.get("estimable")
        row[f"ap50_{name}_patients"] = m.get("class_counts", {}).get(name, {}).get("patients")
        row[f"ap50_{name}_boxes"] = m.get("class_counts", {}).get(name, {}).get("boxes")
    patients = m.get("patient_level", {})
    row["patient_score_threshold"] = patients.get("score_threshold")
    for key in ("sensitivity_iou10", "sensitivity_iou50", "specificity"):
        row[f"patient_{key}"] = patients.get("overall", {}).get(key, {}).get("value")
    voc = m.get("voc", {})
    row["voc07_11point_map"] = voc.get("voc07_11point", {}).get("map")
    row["voc10_all_point_map"] = voc.get("voc10_all_point", {}).get("map")
    row["cpm"] = m["cpm"]
    row["froc_iou"] = m["froc"]["iou_threshold"]
    row["bootstrap_draws"] = boot.get("draws")
    throughput = {entry["batch_size"]: entry for entry in t["throughput"]}
    batched = max(throughput)
    row |= {
        "timing_device": t["hardware"]["gpu"] or t["hardware"]["cpu"],
        "timing_precision": t.get("precision"),
        "timing_model_median_s": t["latency_s"]["model"]["median"],
        "timing_model_min_s": t["latency_s"]["model"]["min"],
        "timing_model_p95_s": t["latency_s"]["model"]["p95"],
        "timing_end_to_end_median_s": t["latency_s"]["end_to_end"]["median"],
        "timing_end_to_end_min_s": t["latency_s"]["end_to_end"]["min"],
        "timing_end_to_end_p95_s": t["latency_s"]["end_to_end"]["p95"],
        "timing_images_per_s_batch_1": throughput[1]["images_per_s"] if 1 in throughput else None,
        "timing_batch_size": batched,
        "timing_images_per_s_batch": throughput[batched]["images_per_s"],
        # Other processes held the CPUs while it timed (spinedet.timing.MachineLoad).
        "timing_shared_machine": any(entry.get("machine_load", {}).get("shared") for entry in t["throughput"]),
    }
    return row


def csv_value(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6f}"
    return str(value)


def write_summary_csv(path: Path, rows: list[dict]) -> None:
    write_csv(path, [{key: csv_value(value) for key, value in row.items()} for row in rows], list(rows[0]))


def percent(value, digits: int = 1) -> str:
    return "n/a" if value is None else f"{100 * value:.{digits}f}"


def seconds(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def latency_cell(row: dict, kind: str) -> dict:
    """Median seconds, with the minimum and p95 as detail; ‡ marks a timing
    taken while other processes used the CPUs (its minimum is the better guide)."""
    mark = " ‡" if row.get("timing_shared_machine") else ""
    return cell(seconds(row[f"timing_{kind}_median_s"]) + mark,
                f"min {seconds(row.get(f'timing_{kind}_min_s'))}, p95 {seconds(row[f'timing_{kind}_p95_s'])}")


def cell(value: str, detail: str | None = None) -> dict:
    """A table cell: the number, an optional bracketed detail (CI, p95) that HTML
    sets on a second line, and both as one text for Markdown."""
    return {"value": value, "detail": detail or "", "text": f"{value} ({detail})" if detail else value}


def with_ci(value, low, high, estimable=None, patients=None, boxes=None) -> dict:
    if value is not None and estimable is False and patients is not None:
        # one or two patients: every bootstrap draw holds the same lesions or none
        return cell(percent(value), f"CI not estimable: {boxes} boxes in {patients} "
                                    f"patient{'' if patients == 1 else 's'}")
    if value is None or low is None or high is None:
        return cell(percent(value))
    return cell(percent(value), f"{percent(low)}–{percent(high)}")


def display_row(row: dict, classes: list[str]) -> dict:
    """Formatted cells of the comparison table (HTML and Markdown)."""
    params = row["parameters"]
    batch_1 = row["timing_images_per_s_batch_1"]
    return {
        "model": row["model"],
        "arch": row["arch"] or "",
        "ap50": with_ci(row["ap50"], row["ap50_ci_low"], row["ap50_ci_high"]),
        "per_class": [with_ci(row[f"ap50_{c}"], row[f"ap50_{c}_ci_low"], row[f"ap50_{c}_ci_high"],
                              row[f"ap50_{c}_ci_estimable"], row[f"ap50_{c}_patients"], row[f"ap50_{c}_boxes"])
                      for c in classes],
        "voc07": cell(percent(row["voc07_11point_map"])),
        "voc10": cell(percent(row["voc10_all_point_map"])),
        "ap": cell(percent(row["ap"])),
        "ap_iou10": cell(percent(row["ap_iou10"])),
        "cpm": cell(percent(row["cpm"])),
        "model_s": latency_cell(row, "model"),
        "e2e_s": latency_cell(row, "end_to_end"),
        "images_per_s_1": cell("n/a" if batch_1 is None else f"{batch_1:.1f}"),
        "images_per_s_batch": cell(f"{row['timing_images_per_s_batch']:.1f}"),
        "parameters": cell("n/a" if params is None else f"{params / 1e6:.1f} M"),
    }


def signed_points(value) -> str:
    return "n/a" if value is None else f"{100 * value:+.1f}"


def p_text(p_value, permutations: int, exact: bool) -> str:
    if p_value is None:
        return "n/a"
    floor = 1 / permutations if exact else 1 / (1 + permutations)
    return f"< {floor:.2g}" if p_value <= floor and floor < 0.001 else f"{p_value:.3f}"


def paired_results(comparison: dict, classes: list[str]) -> list[dict]:
    """Each model pair of comparison.json as one sentence and one table (points of AP50)."""
    counts = comparison.get("class_counts", {})
    results = []
    for pair in comparison["pairs"]:
        permutations, exact = pair["permutations"], pair["exact_permutation"]

        def row(label: str, entry: dict, count: dict | None) -> dict:
            ci = entry["ci95"]
            return {"label": label, "a": percent(entry["ap50_a"]), "b": percent(entry["ap50_b"]),
                    "delta": cell(signed_points(entry["delta"]),
                                  f"{signed_points(ci[0])} to {signed_points(ci[1])}" if ci else None),
                    "p": p_text(entry["p_value"], permutations, exact),
                    "patients": "" if count is None else count["patients"],
                    "boxes": "" if count is None else count["boxes"]}

        if pair["delta"] is None:
            sentence = f"{pair['a']} minus {pair['b']}: no test lesions, nothing to compare."
        else:
            ci = pair["ci95"]
            interval = f"95 % CI {signed_points(ci[0])} to {signed_points(ci[1])}" if ci else "no CI (0 bootstrap draws)"
            p = p_text(pair["p_value"], permutations, exact)
            sentence = (f"{pair['a']} minus {pair['b']}: ΔAP50 = {signed_points(pair['delta'])} points ({interval}), "
                        f"p {p if p.startswith('<') else '= ' + p}, {pair['n_patients']} test patients.")
        results.append({
            "a": pair["a"], "b": pair["b"], "sentence": sentence,
            "permutations": permutations, "exact": exact, "draws": pair["draws"],
            "rows": [row("all lesions (mean over classes)", pair, None)]
                    + [row(pretty(c), pair["per_class"][c], counts.get(c)) for c in classes],
        })
    return results


def cv_rows(path: Path | None, classes: list[str]) -> list[dict]:
    """cv_summary.csv as display rows: AP50 mean ± sd over the folds, and the fold ensemble."""
    if path is None:
        return []

    def mean_sd(row: dict, key: str) -> str:
        mean, sd = row[f"{key}_mean"], row[f"{key}_sd"]
        if mean == "":
            return "n/a"
        return percent(float(mean)) + ("" if sd == "" else f" ± {percent(float(sd))}")

    def value(text: str) -> str:
        return "n/a" if text == "" else percent(float(text))

    return [{"model": row["model"], "folds": row["folds"], "ap50": mean_sd(row, "ap50"),
             "per_class": [mean_sd(row, f"ap50_{c}") for c in classes],
             "ensemble": value(row["ensemble_ap50"]),
             "ensemble_per_class": [value(row[f"ensemble_ap50_{c}"]) for c in classes]}
            for row in read_csv(path)]


def proportion_cell(entry: dict) -> dict:
    """A patient proportion: "83.3 (5/6)" with its 95 % score interval as detail."""
    if entry["value"] is None:
        return cell("n/a (0 patients)")
    low, high = entry["ci95"]
    return cell(f"{percent(entry['value'])} ({entry['k']}/{entry['n']})", f"{percent(low)}–{percent(high)}")


def operating_point_text(operating: dict) -> str:
    if operating["chosen_on"] == "validation":
        text = f"chosen on the validation split for patient sensitivity ≥ {percent(operating['target_sensitivity'], 0)} %"
        return text if operating["reached"] else text + " (not reached there: the lowest threshold kept)"
    if operating["chosen_on"] == "config":
        return "fixed in the config"
    return operating["chosen_on"]


def patient_rows(models: list[dict], classes: list[str]) -> list[dict]:
    """Per model, the per-patient results at its operating point: all lesions, then each class."""
    rows = []
    for model in models:
        patients = model["metrics"].get("patient_level")
        if not patients:
            continue
        entries = [("all lesions", patients["overall"])] + [(pretty(c), patients["per_class"][c]) for c in classes]
        for n, (label, entry) in enumerate(entries):
            confusion = entry["confusion_iou50"]
            rows.append({
                "model": model["name"] if n == 0 else "",
                "threshold": f"{patients['score_threshold']:.3f}" if n == 0 else "",
                "how": operating_point_text(patients["operating_point"]) if n == 0 else "",
                "lesions": label,
                "sensitivity_iou10": proportion_cell(entry["sensitivity_iou10"]),
                "sensitivity_iou50": proportion_cell(entry["sensitivity_iou50"]),
                "specificity": proportion_cell(entry["specificity"]),
                "confusion": f"{confusion['tp']} / {confusion['fn']} / {confusion['tn']} / {confusion['fp']}",
            })
    return rows


SLICE_MODES = {"mid": "the mid-sagittal slice and {half_width} on each side ({count} per patient)",
               "annotated": "the annotated slices"}


def methods_paragraph(config: dict, cohort: dict, test: dict, models: list[dict], rows: list[dict],
                      paired: list[dict]) -> str:
    """A methods-and-results paragraph for a paper, every number read from the study's outputs and config."""
    groups = ", ".join(f"{r['total']} {r['group']}" for r in cohort["rows"])
    splits = ", ".join(f"{name} {total}" for name, total in zip(cohort["splits"], cohort["totals"]))
    slices_cfg = config.get("slices", {})
    half_width = int(slices_cfg.get("half_width", 0))
    selection = SLICE_MODES.get(slices_cfg.get("mode"), "the configured slices").format(
        half_width=half_width, count=2 * half_width + 1)
    trained = []
    for model in models:
        cfg = model["metrics"].get("weights", {}).get("model_config") or {}
        recipe = model_recipe(model["name"], cfg)
        iters = cfg.get("max_iters_per_epoch")
        weights = "from random initialisation" if str(cfg.get("pretrained", "none")).lower() == "none" \
            else "from ImageNet weights"
        trained.append(f"{model['name']} ({recipe['backbone']}; {cfg.get('epochs')} epochs"
                       + (f" of {iters} iterations" if iters else "")
                       + f", batch {cfg.get('batch_size')}, SGD lr {cfg.get('lr')} with {cfg.get('scheduler', 'cosine')} "
                       f"decay, {weights}; tested with the weights of epoch "
                       f"{model['metrics'].get('weights', {}).get('epoch')}, the best by validation AP50)")
    first = models[0]["metrics"]
    precisions = {model["metrics"].get("inference_precision") for model in models}
    precision = precisions.pop() if len(precisions) == 1 else None  # None: older metrics.json, or mixed
    inference = f" (inference {INFERENCE_PRECISION[precision]})" if precision else ""
    results = "; ".join(
        f"{row['model']} {percent(row['ap50'])} %"
        + (f" (95 % CI {percent(row['ap50_ci_low'])}–{percent(row['ap50_ci_high'])})"
           if row["ap50_ci_low"] is not None else "")
        for row in rows)
    text = (
        f"The cohort held {cohort['total']} patients ({groups}), split at the patient level and stratified by "
        f"group into {splits}. From each patient's sagittal T2-weighted series, {selection} were used; "
        f"the test split holds {first.get('n_images')} slices of {first.get('n_patients')} patients. Faster "
        f"R-CNN detectors were trained: {'; '.join(trained)}. Detection{inference} was scored on the test "
        f"slices with COCO AP at IoU 0.5 (pycocotools, 101-point interpolation); 95 % confidence intervals are "
        f"percentile intervals of {first.get('bootstrap', {}).get('draws')} bootstrap resamples of test patients. "
        f"Test AP50: {results}.")
    for pair in paired:
        text += " " + pair["sentence"].replace(":", ", paired comparison:", 1)
    if paired:
        text += (f" Paired CIs come from patient bootstrap draws that score both models on the same resample; "
                 f"p-values from a paired permutation test ({paired[0]['permutations']} permutations"
                 f"{', exact' if paired[0]['exact'] else ''}).")
    return text


# ---------------------------------------------------------------- figures


def save_figure(fig, path: Path) -> Path:
    # No Software text chunk; fixed dpi: identical inputs give identical files.
    fig.savefig(path, dpi=FIGURE_DPI, format="png", metadata={"Software": None})
    plt.close(fig)
    return path


def pretty(name: str) -> str:
    return name.replace("_", " ")


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


# ---------------------------------------------------------------- manifest


def config_text(config: dict) -> str:
    """The study config as run (every section but `resources`, defaults filled), as
    the report's config.yaml: with the commit, what reproduces the report."""
    return yaml.safe_dump(config, sort_keys=True)


def config_sha256(config: dict) -> str:
    """sha256 of config.yaml beside the report."""
    return hashlib.sha256(config_text(config).encode("utf-8")).hexdigest()


def git_commit(cwd: Path | None = None) -> str:
    """HEAD of the git repository the report is made in, '+ uncommitted changes'
    when the tree is dirty, else 'unknown'."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                              timeout=20, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=20, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head} + uncommitted changes" if dirty else head


def package_versions() -> dict:
    versions = {"spinedet": __version__}
    for name in MANIFEST_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def run_manifest(config: dict, models: list[dict]) -> dict:
    return {
        "config_sha256": config_sha256(config),
        "seed": config.get("seed"),
        "git_commit": git_commit(Path(__file__).resolve().parent),
        "packages": package_versions(),
        "report_platform": f"{platform.platform()}, Python {platform.python_version()}",
        "evaluation_hardware": [
            {"model": m["name"], **m["timing"]["hardware"], "precision": m["timing"].get("precision"),
             "torch": m["timing"]["software"].get("torch"), "cuda": m["timing"]["software"].get("cuda"),
             "load": m["timing"]["throughput"][0].get("machine_load")}
            for m in models
        ],
    }


# ---------------------------------------------------------------- the report


def template_environment() -> Environment:
    return Environment(
        loader=PackageLoader("spinedet", "templates"),
        autoescape=select_autoescape(enabled_extensions=("html",), default_for_string=True),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


FIGURES = [
    ("pr_curves", "Precision–recall curves at IoU 0.5 on the test slices, per class (COCO 101-point "
                  "interpolation; legend: AP50)."),
    ("froc", "FROC curves: lesion sensitivity against false positives per test slice (all test slices "
             "counted, with or without lesions); dots at the operating points averaged into the CPM."),
    ("examples", f"Example test slices (columns) with ground truth (dashed green) and each model's "
                 f"detections (rows) with score ≥ {DISPLAY_SCORE}, coloured by class, score above the box."),
    ("training", "Training loss and validation AP50 per epoch."),
]


def build_report(config: dict, inputs: ReportInputs, out: Path) -> dict:
    """Read the inputs, draw the figures and write report.html, report.md and summary.csv."""
    classes = list(config["classes"])
    models = [read_model_results(files) for files in inputs.models]
    for model, files in zip(models, inputs.models):
        if model["metrics"].get("classes", classes) != classes:
            raise SpinedetError(f"{files.metrics} has classes {model['metrics']['classes']}, "
                                f"the config says {classes}")
    test_coco = read_json(inputs.test)
    comparison = read_json(inputs.comparison)
    cohort = read_group_counts(inputs.group_counts)
    inventory = inventory_rows(read_json(inputs.inventory))
    issues = annotation_issue_counts(inputs.issues)
    images_root = inputs.images

    rows = [comparison_row(model, classes) for model in models]
    paired = paired_results(comparison, classes)
    test_facts = test_set_facts(test_coco, classes)
    figures_dir = out / "figures"
    figures_dir.mkdir(parents=True, exist_ok=True)
    log.info("drawing figures")
    paths = {
        "pr_curves": plot_pr_curves(models, classes, figures_dir / "pr_curves.png"),
        "froc": plot_froc(models, classes, figures_dir / "froc.png"),
        "examples": plot_examples(models, test_coco, images_root, classes, figures_dir / "test_examples.png"),
        "training": plot_training(models, figures_dir / "training.png"),
    }
    figures = [{"key": key, "number": n + 1, "caption": caption, "file": f"figures/{paths[key].name}",
                "data_uri": embed_png(paths[key])} for n, (key, caption) in enumerate(FIGURES)]

    first = models[0]["metrics"]
    context = {
        "title": "Faster R-CNN detection of cervical disc herniation and spinal cord injury: model comparison",
        "synthetic": bool(config.get("demo", {}).get("enabled", False)),
        "classes": [pretty(c) for c in classes],
        "cohort": cohort,
        "test": test_facts,
        "inventory": inventory,
        "issues": issues,
        "rows": [display_row(row, classes) for row in rows],
        "recipes": [model_recipe(m["name"], m["metrics"].get("weights", {}).get("model_config")) for m in models],
        "paper_rows": PAPER_ROWS,
        "paper_note": PAPER_NOTE,
        "paper_metric_note": PAPER_METRIC_NOTE,
        "paired": paired,
        "patients": patient_rows(models, classes),
        "cv": cv_rows(inputs.cv_summary, classes),
        "methods": methods_paragraph(config, cohort, test_facts, models, rows, paired),
        "comparison_method": comparison.get("method", ""),
        "figures": figures,
        "evaluation": {
            "froc_iou": first["froc"]["iou_threshold"],
            "froc_fps": ", ".join(f"{f:g}" for f in first["froc"]["fps_per_image"]),
            "bootstrap_draws": first.get("bootstrap", {}).get("draws"),
            "score_threshold": first.get("score_threshold"),
            "timing_iterations": models[0]["timing"]["iterations"],
            "timing_warmup": models[0]["timing"]["warmup"],
            "timing_slices": models[0]["timing"]["latency_s"]["model"]["n"],
            "timing_shared": any(row["timing_shared_machine"] for row in rows),
            "batch_size": rows[0]["timing_batch_size"],
        },
        "manifest": run_manifest(config, models),
    }
    environment = template_environment()
    write_text(out / "report.html", environment.get_template("report.html").render(context))
    write_text(out / "report.md", environment.get_template("report.md").render(context))
    write_summary_csv(out / "summary.csv", rows)
    write_text(out / "config.yaml", config_text(config))
    log.info("report written to %s", out)
    return context


def run(args: argparse.Namespace) -> int:
    from spinedet.config import load

    config = load(args.config)
    per_model = {"--metrics": args.metrics, "--timing": args.timing, "--detections": args.detections,
                 "--train-logs": args.train_logs}
    for option, paths in per_model.items():
        if len(paths) != len(args.models):
            raise SpinedetError(f"{option}: {len(paths)} files for {len(args.models)} models ({' '.join(args.models)})")
    models = [ModelFiles(*files) for files in zip(args.models, args.metrics, args.timing, args.detections,
                                                  args.train_logs)]
    inputs = ReportInputs(models, args.comparison, args.test, args.group_counts, args.inventory, args.issues,
                          args.images, args.cv_summary)
    build_report(config, inputs, args.out)
    return 0
