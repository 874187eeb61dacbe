"""`spinedet report`: the model-comparison report, written as HTML and Markdown.

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
import hashlib
import importlib.metadata
import logging
import math
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

from spinedet import SpinedetError, __version__
from spinedet.io import read_csv, read_json, write_csv, write_text
from spinedet.study.report_figures import (
    DISPLAY_SCORE,
    embed_png,
    plot_examples,
    plot_froc,
    plot_pr_curves,
    plot_training,
)
from spinedet.study.report_methods import methods_paragraph
from spinedet.study.report_tables import (
    annotation_issue_counts,
    comparison_row,
    cv_rows,
    display_row,
    inventory_rows,
    model_recipe,
    paired_results,
    patient_rows,
    pretty,
    read_group_counts,
    test_set_facts,
)

log = logging.getLogger(__name__)


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


def csv_value(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6f}"
    return str(value)


def write_summary_csv(path: Path, rows: list[dict]) -> None:
    write_csv(path, [{key: csv_value(value) for key, value in row.items()} for row in rows], list(rows[0]))


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


def template_environment() -> Environment:
    return Environment(
        loader=PackageLoader("spinedet.study", "templates"),
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
        "comparison_note": comparison.get("note", ""),
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
