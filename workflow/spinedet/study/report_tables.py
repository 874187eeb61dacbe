"""The report's tables: each model's numbers as a comparison row (summary.csv),
formatted cells for HTML and Markdown, the paired comparisons, the
cross-validation, patient-level, inventory, cohort and lesion-size tables."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from spinedet import SpinedetError
from spinedet.io import read_csv


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
    from spinedet.ingest.quarantine import REASONS

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
        # Other processes held the CPUs while it timed (spinedet.study.timing.MachineLoad).
        "timing_shared_machine": any(entry.get("machine_load", {}).get("shared") for entry in t["throughput"]),
    }
    return row


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


def proportion_cell(entry: dict, patients: str = "patients with a lesion") -> dict:
    """A patient proportion: "83.3 (5/6)" with its 95 % score interval as detail; without a
    patient to count (a study where every patient has lesions has no specificity) it is
    not estimable, and says why."""
    if entry["value"] is None:
        return cell(f"not estimable (no {patients} in the test split)")
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
                "specificity": proportion_cell(entry["specificity"], "lesion-free patients"),
                "confusion": f"{confusion['tp']} / {confusion['fn']} / {confusion['tn']} / {confusion['fp']}",
            })
    return rows


def pretty(name: str) -> str:
    return name.replace("_", " ")
