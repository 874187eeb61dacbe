"""`spinedet report` on fixture inputs for two models: content, self-containment,
determinism, and the page as a headless browser sees it."""

from __future__ import annotations

import base64
import html
import copy
import csv
import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from browser import CHROMIUM, chromium, layout, parse
from spinedet import SpinedetError, cli
from spinedet.study import compare, metrics, report, report_figures, report_tables
from spinedet.config import load

REPO = Path(__file__).resolve().parents[2]
CLASSES = ["disc_herniation", "cord_injury"]
MODELS = ["resnet50", "vgg16"]
EVALUATE = {"score_threshold": 0.05, "froc_iou": 0.5, "froc_fps": [0.125, 0.25, 0.5, 1, 2, 4, 8], "bootstrap": 40}
SIZE = 96
MODEL_CONFIGS = {
    "resnet50": {"arch": "fasterrcnn_resnet50_fpn", "pretrained": "none", "norm": "gn", "epochs": 5,
                 "max_iters_per_epoch": 10, "batch_size": 4, "lr": 0.02, "crop_size": 64,
                 "lesion_crop_share": 0.7, "sampler": "class_balanced"},
    "vgg16": {"arch": "fasterrcnn_vgg16", "pretrained": "imagenet", "norm": "none", "output_stride": 8,
              "epochs": 5, "batch_size": 2, "lr": 0.01},
}


def fixture_test_split(rng: np.random.Generator) -> dict:
    """Eight slices of four patients, lesions of both classes, two slices without any."""
    images, annotations = [], []
    for image_id in range(1, 9):
        patient = f"P{(image_id - 1) // 2:03d}"
        images.append({"id": image_id, "file_name": f"sub-{patient}/sub-{patient}_slice-{image_id:02d}.png",
                       "width": SIZE, "height": SIZE, "patient": patient,
                       "group": ["disc", "injured", "normal", "disc"][(image_id - 1) // 2],
                       "slice_index": image_id, "pixel_height_mm": 0.9, "pixel_width_mm": 0.8})
        if image_id in (5, 6):
            continue
        x, y = rng.uniform(10, 60, 2)
        annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": 1 + image_id % 2,
                            "bbox": [round(x, 1), round(y, 1), 18.0, 12.0], "area": 216.0, "iscrowd": 0})
    return {"images": images, "annotations": annotations,
            "categories": [{"id": k + 1, "name": c} for k, c in enumerate(CLASSES)]}


def fixture_detections(test: dict, rng: np.random.Generator, jitter: float) -> list[dict]:
    detections = []
    for ann in test["annotations"]:
        x, y, w, h = ann["bbox"]
        dx, dy = rng.normal(0, jitter, 2)
        detections.append({"image_id": ann["image_id"], "category_id": ann["category_id"],
                           "bbox": [x + dx, y + dy, w, h], "score": round(float(rng.uniform(0.5, 0.99)), 4)})
    for image in test["images"]:
        detections.append({"image_id": image["id"], "category_id": int(rng.integers(1, 3)),
                           "bbox": [float(rng.uniform(0, 70)), float(rng.uniform(0, 70)), 15.0, 15.0],
                           "score": round(float(rng.uniform(0.05, 0.8)), 4)})
    return detections


def fixture_timing(model: str, median: float, shared: bool = False) -> dict:
    stats = {"mean": median * 1.1, "median": median, "p95": median * 1.5, "min": median * 0.9,
             "max": median * 2, "n": 20}
    return {
        "model": model, "device": "cpu", "precision": "bfloat16", "warmup": 3, "iterations": 20,
        "latency_s": {"model": stats, "end_to_end": {k: (v * 1.2 if k != "n" else v) for k, v in stats.items()}},
        "throughput": [{"batch_size": 1, "images_per_s": 1 / median, "machine_load": {
                            "load_average_1min_before": 2.1, "load_average_1min_after": 3.9 if shared else 2.0,
                            "logical_cpus": 2, "process_cpu_s": 38.0, "wall_s": 20.0, "process_cpus_busy": 1.9,
                            "shared": shared}},
                       {"batch_size": 4, "images_per_s": 1.3 / median, "seconds_per_image": median / 1.3}],
        "hardware": {"cpu": "Test CPU 3000", "logical_cpus": 2, "torch_threads": 2, "device": "cpu", "gpu": None,
                     "gpu_memory_gib": None,
                     # timing files from before cpu_features existed still make a report
                     **({"cpu_features": "AVX2, AVX-512, AVX512-BF16"} if model == "resnet50" else {})},
        "software": {"python": "3.11", "platform": "Linux", "torch": "2.x", "torchvision": "0.x", "cuda": None,
                     "cudnn": None, "numpy": "2.x"},
    }


def write_results(results: Path, seed: int = 0, timing_scale: float = 1.0) -> None:
    """Everything `spinedet report` reads, for resnet50 and vgg16."""
    rng = np.random.default_rng(seed)
    test = fixture_test_split(rng)
    (results / "split").mkdir(parents=True)
    (results / "split" / "test.json").write_text(json.dumps(test))
    (results / "split" / "group_counts.csv").write_text(
        "group,train,val,test\ndisc,14,2,4\ninjured,4,1,1\nnormal,10,1,3\n")
    for image in test["images"]:
        path = results / "slices" / image["file_name"]
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = (rng.random((SIZE, SIZE)) * 90).astype(np.uint8)
        pixels[:, 40:56] = 170  # a bright "cord" so the examples look like something
        Image.fromarray(pixels).save(path)
    for n, model in enumerate(MODELS):
        detections = fixture_detections(test, rng, jitter=1.0 + 2.5 * n)
        body = metrics.evaluate_detections(test, detections, CLASSES, EVALUATE, seed=11)
        body["patient_level"] = {"operating_point": {"chosen_on": "validation", "target_sensitivity": 0.9,
                                                     "reached": True, "score_threshold": 0.5},
                                 **metrics.patient_level(test, detections, CLASSES, 0.5)}
        out = results / "eval" / model
        out.mkdir(parents=True)
        (out / "metrics.json").write_text(json.dumps(
            {"model": model, "arch": f"fasterrcnn_{model}", "score_threshold": 0.05, "inference_precision": "bfloat16",
             "weights": {"epoch": 5, "val_ap50": 0.5, "parameters": {"total": 41_000_000 - n * 9_000_000,
                                                                     "trainable": 1},
                         "model_config": MODEL_CONFIGS[model]}, **body}))
        (out / "detections.json").write_text(json.dumps(detections))
        (results / "timing").mkdir(parents=True, exist_ok=True)
        (results / "timing" / f"{model}.json").write_text(
            json.dumps(fixture_timing(model, timing_scale * (0.05 + 0.03 * n), shared=model == "vgg16")))
        log = results / "models" / model
        log.mkdir(parents=True)
        lines = ["epoch,iters,loss,loss_classifier,loss_box_reg,loss_objectness,loss_rpn_box_reg,lr,val_ap50,seconds"]
        lines += [f"{e},10,{(2.0 + n) / e:.3f},0.1,0.1,0.1,0.1,0.01,{(0.15 - 0.05 * n) * e:.2f},12.5"
                  for e in range(1, 6)]
        (log / "train_log.csv").write_text("\n".join(lines) + "\n")
    all_detections = {model: json.loads((results / "eval" / model / "detections.json").read_text()) for model in MODELS}
    (results / "report").mkdir()
    config = {"classes": CLASSES, "seed": 11, "evaluate": EVALUATE, "compare": {"permutations": 200}}
    (results / "report" / "comparison.json").write_text(json.dumps(compare.compare(config, test, all_detections)))
    (results / "inventory").mkdir()
    (results / "inventory" / "summary.json").write_text(json.dumps({
        "files_in": 130, "ok": 120, "ok_by_kind": {"image": 120}, "quarantined": 10,
        "quarantined_by_reason": {"duplicate": 4, "not_dicom": 6}, "series": 40,
        "series_by_orientation": {"axial": 10, "sagittal": 30}, "cohort_patients": 40, "patients_selected": 39,
        "patients_without_target": 1, "patients_without_files": 0, "patients_not_in_cohort": 0}))
    (results / "deid").mkdir()
    (results / "deid" / "annotation_issues.csv").write_text(
        "pseudonym,row,label,reason\nabc,3,disc_herniation,box_outside_image\nabd,9,cord_injury,unknown_instance\n"
        "abe,12,cord_injury,box_outside_image\n")


def config_file(tmp_path: Path, demo: bool = True) -> Path:
    """The repository's config.yaml with demo on or off."""
    override = tmp_path / f"override-{demo}.yaml"
    values = {"demo": {"enabled": demo}, "evaluate": EVALUATE}
    if not demo:  # a real export must exist
        export = tmp_path / "export"
        (export / "DICOM").mkdir(parents=True, exist_ok=True)
        (export / "annotations.csv").write_text("study_uid\n")
        (export / "cohort.csv").write_text("patient_id,group\n")
        values |= {"raw": str(export / "DICOM"), "annotations": str(export / "annotations.csv"),
                   "cohort": str(export / "cohort.csv")}
    override.write_text(yaml.safe_dump(values))
    return override


def inputs_under(results: Path, models: list[str] = MODELS) -> report.ReportInputs:
    """The report's inputs in the workflow's layout (workflow/rules/report.smk)."""
    return report.ReportInputs(
        [report.ModelFiles(m, results / "eval" / m / "metrics.json", results / "timing" / f"{m}.json",
                           results / "eval" / m / "detections.json", results / "models" / m / "train_log.csv")
         for m in models],
        results / "report" / "comparison.json", results / "split" / "test.json", results / "split" / "group_counts.csv",
        results / "inventory" / "summary.json", results / "deid" / "annotation_issues.csv", results / "slices")


def make_report(tmp_path: Path, results: Path, out: Path, demo: bool = True) -> int:
    inputs = inputs_under(results)
    return cli.main(["report", "--config", str(REPO / "config.yaml"), str(config_file(tmp_path, demo)),
                     "--models", *MODELS, "--metrics", *(str(m.metrics) for m in inputs.models),
                     "--timing", *(str(m.timing) for m in inputs.models),
                     "--detections", *(str(m.detections) for m in inputs.models),
                     "--train-logs", *(str(m.train_log) for m in inputs.models),
                     "--comparison", str(inputs.comparison),
                     "--test", str(inputs.test), "--group-counts", str(inputs.group_counts),
                     "--inventory", str(inputs.inventory), "--issues", str(inputs.issues),
                     "--images", str(inputs.images), "--out", str(out)])


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> Path:
    tmp_path = tmp_path_factory.mktemp("report")
    results = tmp_path / "results"
    write_results(results)
    assert make_report(tmp_path, results, results / "report") == 0
    return results / "report"


def test_report_has_both_models_paper_rows_and_banner(rendered):
    html = (rendered / "report.html").read_text()
    page = parse(html)
    rows = page.table_rows["comparison"]
    models_in_table = [r[0].strip() for r in rows if r and r[0].strip() in MODELS]
    assert models_in_table == MODELS
    summary = list(csv.DictReader((rendered / "summary.csv").open()))
    resnet = next(r for r in rows if r[0].strip() == "resnet50")
    pct = {k: f"{100 * float(v):.1f}" for k, v in summary[0].items()
           if k.startswith("ap50") and not k.endswith(("_estimable", "_patients", "_boxes"))}
    assert resnet[2] == f"{pct['ap50']} ({pct['ap50_ci_low']}–{pct['ap50_ci_high']})"
    assert resnet[3] == f"{pct['ap50_disc_herniation']} ({pct['ap50_disc_herniation_ci_low']}–" \
                        f"{pct['ap50_disc_herniation_ci_high']})"
    assert "41.0 M" in resnet
    paper = [r for r in rows if "Ma et al. 2020" in r[0]]
    assert [r[0] for r in paper] == ["ResNet-50 (Ma et al. 2020)", "VGG-16 (Ma et al. 2020)"]
    assert "88.6" in paper[0][2] and "0.22" in paper[0] and "72.3" in paper[1][2] and "0.24" in paper[1]
    assert "private data" in html and "not comparable" in html.lower()
    assert 'id="synthetic-banner"' in html and "Synthetic demo data" in html
    cohort = page.table_rows["cohort"]
    assert ["disc", "14", "2", "4", "20"] == [c.strip() for c in cohort[1]]
    assert [c.strip() for c in cohort[-1]] == ["Total", "28", "4", "8", "40"]
    inventory = {r[0].strip(): r[1].strip() for r in page.table_rows["inventory"][1:]}
    assert inventory["Files quarantined"] == "10" and inventory["Patients without a target series"] == "1"
    assert inventory["duplicate SOPInstanceUID"] == "4"
    issues = {r[0].strip(): r[1].strip() for r in page.table_rows["annotation-issues"][1:]}
    assert issues == {"box outside image": "2", "unknown instance": "1"}
    manifest = re.search(r"config sha256</dt><dd>([0-9a-f]{64}) \(config.yaml beside this report\)</dd>", html)
    assert manifest and "seed</dt><dd>20200901" in html
    assert "Test CPU 3000" in html and "torch threads), inference in bfloat16; torch" in html


def test_report_names_each_recipe_and_its_departures_from_the_paper(rendered):
    page = (rendered / "report.html").read_text()
    md = (rendered / "report.md").read_text()
    for text in (page, md):
        assert "ResNet-50 + FPN, GroupNorm" in text
        assert "GroupNorm instead of batch norm; trained from scratch (no ImageNet weights); trained on 64 px crops, " \
               "70 % holding a lesion (inference on whole slices)" in text
        assert "5 epochs of 10 iterations, batch 4, SGD, lr 0.02 (cosine), weights: none, 64 px crops, " \
               "class-balanced sampling" in text
        assert "VGG-16 conv5_3, stride 8, no normalisation" in text
        assert "stride 8 (pool4 removed; the paper's conv5_3 is at stride 16)" in html.unescape(text)


def test_vgg16_fpn_recipe_names_the_fpn_and_the_batch_norm_as_departures():
    recipe = report_tables.model_recipe("vgg16", {"arch": "fasterrcnn_vgg16_fpn", "pretrained": "none", "norm": "bn",
                                           "epochs": 3, "max_iters_per_epoch": 160, "batch_size": 2, "lr": 0.02})
    assert recipe["backbone"] == "VGG-16 + FPN (conv3_3, conv4_3, conv5_3), batch norm"
    assert recipe["departures"].startswith("an FPN over conv3_3-conv5_3, as ResNet-50-FPN's")
    assert "batch norm after each convolution (the paper's VGG-16 has none)" in recipe["departures"]
    assert "trained from scratch" in recipe["departures"]


def test_report_gives_the_test_lesion_sizes(rendered):
    md = (rendered / "report.md").read_text()
    # fixture: 18 x 12 px boxes on 0.8 x 0.9 mm pixels; classes alternate by image id
    assert "| Disc herniation | 3 | 3 | 18 (18–18) | 12 (12–12) | 14.4 (14.4–14.4) | 10.8 (10.8–10.8) |" in md
    assert "| Cord injury | 3 | 3 | 18 (18–18) | 12 (12–12) |" in md
    assert 'id="lesion-sizes"' in (rendered / "report.html").read_text()


def test_lesion_sizes_without_pixel_spacing_are_given_in_pixels_only():
    coco = {"images": [{"id": 1, "patient": "a"}], "annotations": [{"image_id": 1, "category_id": 1,
                                                                    "bbox": [0, 0, 4, 6]}]}
    rows = report_tables.lesion_sizes(coco, CLASSES)
    assert rows[0]["width_px"] == "4 (4–4)" and rows[0]["width_mm"] == "n/a"
    assert rows[1] == {"class": "Cord injury", "boxes": 0, "patients": 0, "width_px": "n/a", "height_px": "n/a",
                       "width_mm": "n/a", "height_mm": "n/a"}


def test_report_is_self_contained(rendered):
    html = (rendered / "report.html").read_text()
    page = parse(html)
    images = [attrs for tag, attrs in page.tags if tag == "img"]
    assert len(images) == 4 == len(list((rendered / "figures").glob("*.png")))
    for attrs in images:
        assert attrs["src"].startswith("data:image/png;base64,")
    for tag, attrs in page.tags:
        assert "href" not in attrs, f"<{tag}> links out"
        assert tag not in ("script", "link", "iframe")
    outside_images = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", html)
    assert "http" not in outside_images.lower(), "no links, not even in text"
    assert "@import" not in outside_images and "url(" not in outside_images


def test_figures_are_embedded_byte_for_byte_without_software_chunk(rendered):
    html = (rendered / "report.html").read_text()
    for figure in sorted((rendered / "figures").glob("*.png")):
        encoded = base64.b64encode(figure.read_bytes()).decode()
        assert encoded in html
        with Image.open(figure) as image:
            assert "Software" not in image.info
            assert image.size[0] > 400


def test_markdown_references_figures_and_lists_models(rendered):
    md = (rendered / "report.md").read_text()
    for figure in sorted((rendered / "figures").glob("*.png")):
        assert f"](figures/{figure.name})" in md
    for model in MODELS:
        assert f"| {model} |" in md
    assert "Ma et al. 2020" in md and "Synthetic demo data" in md
    assert "data:image" not in md


def test_summary_csv_one_row_per_model(rendered):
    rows = list(csv.DictReader((rendered / "summary.csv").open()))
    assert [r["model"] for r in rows] == MODELS
    columns = list(rows[0])
    timing = [c for c in columns if c.startswith("timing_")]
    assert timing and columns[-len(timing):] == timing, "timing columns come last"
    for name in CLASSES:
        assert f"ap50_{name}" in columns and f"ap50_{name}_ci_low" in columns
    assert all(0 <= float(r["ap50"]) <= 1 for r in rows)
    assert float(rows[0]["ap50_ci_low"]) <= float(rows[0]["ap50"]) <= float(rows[0]["ap50_ci_high"])


def non_timing_columns(path: Path) -> list[list[str]]:
    rows = list(csv.reader(path.open()))
    keep = [i for i, name in enumerate(rows[0]) if not name.startswith("timing_")]
    return [[row[i] for i in keep] for row in rows]


def test_same_inputs_same_tables(tmp_path, rendered):
    results = tmp_path / "results"
    write_results(results, timing_scale=3.0)
    assert make_report(tmp_path, results, tmp_path / "again") == 0
    first, second = rendered / "summary.csv", tmp_path / "again" / "summary.csv"
    assert non_timing_columns(first) == non_timing_columns(second)
    assert first.read_bytes() != second.read_bytes(), "timing differs, so the timing columns do"
    for name in ("pr_curves.png", "froc.png", "test_examples.png", "training.png"):
        assert (rendered / "figures" / name).read_bytes() == (tmp_path / "again" / "figures" / name).read_bytes()


def test_no_banner_for_a_real_export(tmp_path):
    results = tmp_path / "results"
    write_results(results)
    assert make_report(tmp_path, results, tmp_path / "out", demo=False) == 0
    html = (tmp_path / "out" / "report.html").read_text()
    assert "synthetic-banner" not in html
    assert "Synthetic demo data" not in (tmp_path / "out" / "report.md").read_text()


def test_missing_input_is_named(tmp_path):
    results = tmp_path / "results"
    write_results(results)
    (results / "timing" / "vgg16.json").unlink()
    config = load([REPO / "config.yaml"])
    with pytest.raises(SpinedetError, match="timing/vgg16.json"):
        report.build_report(config, inputs_under(results), tmp_path / "out")


def test_model_names_are_escaped(tmp_path):
    results = tmp_path / "results"
    write_results(results)
    config = load([REPO / "config.yaml"])
    shutil.copytree(results / "eval" / "vgg16", results / "eval" / "<b>x")
    shutil.copy(results / "timing" / "vgg16.json", results / "timing" / "<b>x.json")
    shutil.copytree(results / "models" / "vgg16", results / "models" / "<b>x")
    report.build_report(config, inputs_under(results, ["resnet50", "<b>x"]), tmp_path / "out")
    html = (tmp_path / "out" / "report.html").read_text()
    assert "<b>x" not in html and "&lt;b&gt;x" in html


def test_config_hash_is_that_of_the_config_file_beside_the_report(tmp_path):
    config = load([REPO / "config.yaml"])
    results = tmp_path / "results"
    write_results(results)
    report.build_report(config, inputs_under(results), tmp_path / "out")
    written = (tmp_path / "out" / "config.yaml").read_bytes()
    assert yaml.safe_load(written) == config
    assert report.config_sha256(config) == hashlib.sha256(written).hexdigest()
    assert report.config_sha256(config) in (tmp_path / "out" / "report.md").read_text()
    changed = copy.deepcopy(config)
    changed["seed"] += 1
    assert report.config_sha256(changed) != report.config_sha256(config)


def test_git_commit_outside_a_repository(tmp_path):
    assert report.git_commit(tmp_path) == "unknown"
    assert re.fullmatch(r"[0-9a-f]{40}( \+ uncommitted changes)?|unknown", report.git_commit(REPO))


def test_example_images_cover_each_class_and_a_negative():
    test = fixture_test_split(np.random.default_rng(0))
    chosen = [im["id"] for im in report_figures.example_images(test, CLASSES, count=4)]
    # class 1 on ids 2, 4, 8; class 2 on ids 1, 3, 7; 5 and 6 without lesions
    assert chosen == [2, 1, 4, 5]


def test_group_counts_with_totals(tmp_path):
    path = tmp_path / "group_counts.csv"
    path.write_text("group,train,val,test\ndisc,5,1,2\nnormal,3,0,1\n")
    table = report_tables.read_group_counts(path)
    assert table["splits"] == ["train", "val", "test"]
    assert table["rows"][0] == {"group": "disc", "counts": [5, 1, 2], "total": 8}
    assert table["totals"] == [8, 1, 3] and table["total"] == 12


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (CI installs it)")
def test_headless_browser_renders_the_comparison_rows(rendered, tmp_path):
    dom = chromium("--dump-dom", (rendered / "report.html").resolve().as_uri(), user_data=tmp_path / "profile").stdout
    page = parse(dom)
    rows = page.table_rows["comparison"]
    assert [r[0].strip() for r in rows if r and r[0].strip() in MODELS] == MODELS
    assert sum(1 for tag, attrs in page.tags if tag == "img" and attrs["src"].startswith("data:image/png")) == 4


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (CI installs it)")
def test_wide_tables_scroll_in_their_own_box_in_a_1280_px_window(rendered, tmp_path):
    """Table 1 is wider than a 1280 px window: its last columns stay reachable by
    scrolling inside the table's box, and the page itself never gets wider than the window."""
    html_file = tmp_path / "report.html"
    shutil.copy(rendered / "report.html", html_file)
    measured = layout(html_file, 1280, user_data=tmp_path / "profile")
    assert measured["viewport"] == 1280
    assert measured["page"] <= measured["viewport"], measured
    assert {"comparison", "patients", "cohort", "inventory"} <= set(measured["tables"])
    for table_id, table in measured["tables"].items():
        assert table["box_class"] == "table-box", table_id
        assert table["box_right"] <= measured["viewport"] + 0.5, (table_id, table)
        if table["table_width"] > table["box_width"] + 0.5:
            assert table["overflow_x"] == "auto", (table_id, table)
            assert table["box_scroll_width"] >= table["table_width"] - 0.5, (table_id, table)


def test_timing_shows_the_minimum_and_marks_a_timing_taken_on_a_shared_machine(tmp_path):
    results = tmp_path / "results"
    write_results(results)
    report.build_report(load([REPO / "config.yaml"]), inputs_under(results), tmp_path / "out")
    markdown = (tmp_path / "out" / "report.md").read_text()
    table_1 = markdown[markdown.index("## 1."):markdown.index("\n\n", markdown.index("|---"))]
    rows = {line.split("|")[1].strip(): line for line in table_1.splitlines() if line.startswith("| ")}
    assert "0.050 (min 0.045, p95 0.075)" in rows["resnet50"] and "‡" not in rows["resnet50"]
    assert "0.080 ‡ (min 0.072, p95 0.120)" in rows["vgg16"]
    assert "‡ Timed while other processes used the CPUs" in markdown
    assert "1-minute load average 2.1 before, 3.9 after" in markdown
    html = (tmp_path / "out" / "report.html").read_text()
    assert "shared with other work ‡" in html


def test_cli_refuses_per_model_files_that_do_not_match_the_models(tmp_path, caplog):
    results = tmp_path / "results"
    write_results(results)
    inputs = inputs_under(results)
    code = cli.main(["report", "--config", str(REPO / "config.yaml"), "--models", *MODELS,
                     "--metrics", str(inputs.models[0].metrics),
                     "--timing", *(str(m.timing) for m in inputs.models),
                     "--detections", *(str(m.detections) for m in inputs.models),
                     "--train-logs", *(str(m.train_log) for m in inputs.models),
                     "--comparison", str(inputs.comparison),
                     "--test", str(inputs.test), "--group-counts", str(inputs.group_counts),
                     "--inventory", str(inputs.inventory), "--issues", str(inputs.issues),
                     "--images", str(inputs.images), "--out", str(tmp_path / "out")])
    assert code == 2
    assert "--metrics: 1 files for 2 models (resnet50 vgg16)" in caplog.text


def test_report_gives_the_paired_comparison_and_the_papers_metric(rendered):
    text = (rendered / "report.html").read_text()
    page = parse(text)
    pair = json.loads((rendered / "comparison.json").read_text())["pairs"][0]
    low, high = pair["ci95"]
    sentence = (f"resnet50 minus vgg16: ΔAP50 = {100 * pair['delta']:+.1f} points "
                f"(95 % CI {100 * low:+.1f} to {100 * high:+.1f}), p = {pair['p_value']:.3f}, "
                f"{pair['n_patients']} test patients.")
    assert sentence in html.unescape(text)
    assert sentence in (rendered / "report.md").read_text()
    paired = page.table_rows["paired-1"]
    labels = [row[0].strip() for row in paired[1:]]
    assert labels == ["all lesions (mean over classes)", "disc herniation", "cord injury"]
    summary = {row["model"]: row for row in csv.DictReader((rendered / "summary.csv").open())}
    assert paired[1][1].strip() == f"{100 * float(summary['resnet50']['ap50']):.1f}"
    voc = {row[0].strip(): [c.strip() for c in row[1:]] for row in page.table_rows["paper-metric"][1:]}
    for model in MODELS:
        assert voc[model] == [f"{100 * float(summary[model][key]):.1f}"
                              for key in ("ap50", "voc07_11point_map", "voc10_all_point_map")]
    assert voc["ResNet-50 (Ma et al. 2020)"][1].startswith("88.6")
    assert "VOC2007 11-point" in text and "without defining it" in text
    assert 'id="cv"' not in text  # no folds, no cross-validation table


def test_a_class_from_too_few_patients_shows_no_interval():
    row = {"ap50_cord_injury": 0.505, "ap50_cord_injury_ci_low": None, "ap50_cord_injury_ci_high": None,
           "ap50_cord_injury_ci_estimable": False, "ap50_cord_injury_patients": 1, "ap50_cord_injury_boxes": 2}
    shown = report_tables.with_ci(*(row[f"ap50_cord_injury{suffix}"] for suffix in
                             ("", "_ci_low", "_ci_high", "_ci_estimable", "_patients", "_boxes")))
    assert shown["text"] == "50.5 (CI not estimable: 2 boxes in 1 patient)"


def test_report_gives_patient_level_results_with_wilson_intervals(rendered):
    page = parse((rendered / "report.html").read_text())
    rows = page.table_rows["patients"]
    metrics_json = json.loads((rendered.parent / "eval" / "resnet50" / "metrics.json").read_text())
    overall = metrics_json["patient_level"]["overall"]
    resnet = next(row for row in rows if row and row[0].strip() == "resnet50")
    low, high = overall["specificity"]["ci95"]
    spec = overall["specificity"]
    assert resnet[6].split() == [f"{100 * spec['value']:.1f}", f"({spec['k']}/{spec['n']})",
                                 f"({100 * low:.1f}–{100 * high:.1f})"]
    confusion = overall["confusion_iou50"]
    assert resnet[7].strip() == f"{confusion['tp']} / {confusion['fn']} / {confusion['tn']} / {confusion['fp']}"
    assert "chosen on the validation split" in resnet[2]


def test_methods_paragraph_reads_every_number_from_the_outputs(rendered):
    text = html.unescape((rendered / "report.html").read_text())
    methods = re.search(r'<p id="methods">(.*?)</p>', text, re.S).group(1)
    summary = {row["model"]: row for row in csv.DictReader((rendered / "summary.csv").open())}
    assert "The cohort held 40 patients (20 disc, 6 injured, 14 normal)" in methods
    assert "train 28, val 4, test 8" in methods
    for model, row in summary.items():
        assert f"{model} {100 * float(row['ap50']):.1f} % (95 % CI {100 * float(row['ap50_ci_low']):.1f}" in methods
    assert "40 bootstrap resamples of test patients" in methods
    assert "Detection (inference under bfloat16 autocast) was scored on the test slices" in methods
    assert "resnet50 minus vgg16, paired comparison: ΔAP50" in methods
    assert methods in (rendered / "report.md").read_text()


def test_cross_validation_table_when_there_are_folds(tmp_path):
    results = tmp_path / "results"
    write_results(results)
    summary = results / "report" / "cv_summary.csv"
    summary.write_text(
        "model,folds,ap50_mean,ap50_sd,ap50_disc_herniation_mean,ap50_disc_herniation_sd,ap50_cord_injury_mean,"
        "ap50_cord_injury_sd,ensemble_ap50,ensemble_ap50_disc_herniation,ensemble_ap50_cord_injury\n"
        "resnet50,2,0.75,0.1,0.7,0.2,0.8,,0.81,0.79,0.83\nvgg16,2,0.5,0.05,0.4,0.1,,,0.55,0.5,\n")
    inputs = inputs_under(results)
    out = tmp_path / "out"
    report.build_report(load([REPO / "config.yaml", config_file(tmp_path)]),
                        report.ReportInputs(**{**inputs.__dict__, "cv_summary": summary}), out)
    rows = parse((out / "report.html").read_text()).table_rows["cv"]
    assert [c.strip() for c in rows[1]] == ["resnet50", "2", "75.0 ± 10.0", "70.0 ± 20.0", "80.0", "81.0", "79.0",
                                            "83.0"]
    assert [c.strip() for c in rows[2]] == ["vgg16", "2", "50.0 ± 5.0", "40.0 ± 10.0", "n/a", "55.0", "50.0", "n/a"]
    markdown = (out / "report.md").read_text()
    assert "| resnet50 | 2 | 75.0 ± 10.0 | 70.0 ± 20.0 | 80.0 | 81.0 | 79.0 | 83.0 |\n" in markdown


def test_a_study_of_one_model_reports_it_and_says_there_is_nothing_to_pair(tmp_path):
    results = tmp_path / "results"
    write_results(results)
    comparison = json.loads((results / "report" / "comparison.json").read_text())
    (results / "report" / "comparison.json").write_text(json.dumps(
        {**comparison, "pairs": [], "note": "One model in this study (resnet50): nothing to pair."}))
    context = report.build_report(load([REPO / "config.yaml"]), inputs_under(results, ["resnet50"]),
                                  tmp_path / "out")
    assert [row["model"] for row in context["rows"]] == ["resnet50"]
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "One model in this study (resnet50): nothing to pair." in markdown
    html = (tmp_path / "out" / "report.html").read_text()
    assert 'id="no-pairs"' in html and "vgg16" not in (tmp_path / "out" / "summary.csv").read_text()


def test_report_names_the_cpus_instruction_sets(rendered):
    markdown = (rendered / "report.md").read_text()
    assert "CPU Test CPU 3000 (AVX2, AVX-512, AVX512-BF16; 2 logical" in markdown
    assert "CPU Test CPU 3000 (2 logical" in markdown  # a timing file without them
    assert "Test CPU 3000\n    (AVX2, AVX-512, AVX512-BF16; 2 logical" in (rendered / "report.html").read_text()


def test_the_methods_say_plainly_when_the_validation_split_is_one_patient():
    from spinedet.study.report_methods import validation_caveat

    one = {"splits": ["train", "val", "test"], "totals": [12, 1, 4]}
    assert "The validation split holds a single patient" in validation_caveat(one)
    assert "There is no validation split" in validation_caveat({**one, "totals": [12, 0, 4]})
    assert validation_caveat({**one, "totals": [12, 3, 4]}) == ""


def test_a_proportion_without_patients_is_not_estimable_and_says_why():
    from spinedet.study.report_tables import proportion_cell

    empty = {"value": None, "ci95": None, "k": 0, "n": 0}
    assert proportion_cell(empty, "lesion-free patients")["text"] == (
        "not estimable (no lesion-free patients in the test split)")
    assert proportion_cell({"value": 0.5, "ci95": [0.1, 0.9], "k": 1, "n": 2})["text"].startswith("50.0 (1/2)")
