"""The report's methods-and-results paragraph: every number read from the study's
outputs and config, ready for a paper."""

from __future__ import annotations

from spinedet.study.report_tables import model_recipe, percent


# metrics.json's inference_precision in the methods paragraph
INFERENCE_PRECISION = {"float32": "in float32", "bfloat16": "under bfloat16 autocast",
                       "float16": "under float16 autocast"}


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
    text += validation_caveat(cohort)
    for pair in paired:
        text += " " + pair["sentence"].replace(":", ", paired comparison:", 1)
    if paired:
        text += (f" Paired CIs come from patient bootstrap draws that score both models on the same resample; "
                 f"p-values from a paired permutation test ({paired[0]['permutations']} permutations"
                 f"{', exact' if paired[0]['exact'] else ''}).")
    return text


def validation_caveat(cohort: dict) -> str:
    """A sentence when the validation split is too small to lean on (a small real cohort)."""
    patients = dict(zip(cohort["splits"], cohort["totals"])).get("val")
    if patients == 1:
        return (" The validation split holds a single patient: the best epoch and the patient-level operating "
                "point were chosen on that one patient.")
    if patients == 0:
        return (" There is no validation split: the last epoch was kept, and no operating point could be chosen "
                "on validation patients.")
    return ""
