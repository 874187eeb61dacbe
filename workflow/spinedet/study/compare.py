"""`spinedet compare`: is one model better than the other on the same test patients?

For every pair of models (in --models order, a minus b), on the test split:
ΔAP50 with a paired patient-bootstrap 95 % CI and a paired permutation
p-value, overall (mean over classes) and per class (spinedet.study.metrics.
paired_comparison). Writes comparison.json:

    {"pairs": [{"a", "b", "metric": "ap50", "delta", "ci95": [lo, hi], "p_value",
                "n_patients", "per_class": {class: {...}}, ...}],
     "class_counts": {class: {"boxes", "patients"}}, "method": "..."}
"""

from __future__ import annotations

import argparse
import itertools
import logging
from pathlib import Path

from spinedet import SpinedetError
from spinedet.study import metrics as metrics_lib
from spinedet.io import read_json, write_json

log = logging.getLogger(__name__)

METHOD = (
    "Paired comparison on the same test patients. CI: 95 % percentile interval of "
    "AP50(a) - AP50(b) over patient bootstrap draws, each draw resampling patients once and "
    "scoring both models on that resample. p: two-sided paired permutation test, each "
    "permutation swapping the two models' detections within a random half of the patients.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from spinedet.config import add_config_argument

    add_config_argument(parser)
    parser.add_argument("--models", nargs="+", required=True, help="model names, in the order of --detections")
    parser.add_argument("--detections", nargs="+", required=True, type=Path,
                        help="each model's detections.json (spinedet evaluate)")
    parser.add_argument("--test", required=True, type=Path, help="test split COCO JSON")
    parser.add_argument("--out", required=True, type=Path, help="comparison.json to write")


def compare(config: dict, test_coco: dict, detections: dict[str, list[dict]]) -> dict:
    """comparison.json's body for the models of `detections` (name -> COCO results)."""
    classes = list(config["classes"])
    evaluate_config = config["evaluate"]
    matches = {name: metrics_lib.match_detections(test_coco, dets, classes, 0.5) for name, dets in detections.items()}
    first = next(iter(matches.values()))
    images_by_patient = metrics_lib.patient_image_indices(test_coco, first.image_ids)
    pairs = []
    for a, b in itertools.combinations(detections, 2):
        log.info("%s minus %s: %d bootstrap draws, %d permutations over %d patients", a, b,
                 int(evaluate_config["bootstrap"]), int(config["compare"]["permutations"]), len(images_by_patient))
        result = metrics_lib.paired_comparison(matches[a], matches[b], images_by_patient,
                                               int(evaluate_config["bootstrap"]),
                                               int(config["compare"]["permutations"]), int(config["seed"]))
        pairs.append({"a": a, "b": b, **result})
        log.info("%s minus %s: delta AP50 %s, 95 %% CI %s, p %s", a, b, result["delta"], result["ci95"],
                 result["p_value"])
    body = {"pairs": pairs, "class_counts": metrics_lib.class_counts(first, images_by_patient), "method": METHOD}
    if not pairs:
        body["note"] = f"One model in this study ({', '.join(detections)}): nothing to pair."
        log.info("%s", body["note"])
    return body


def run(args: argparse.Namespace) -> int:
    from spinedet.config import load

    config = load(args.config)
    if len(args.models) != len(args.detections):
        raise SpinedetError(f"{len(args.models)} --models but {len(args.detections)} --detections")
    if len(set(args.models)) != len(args.models):
        raise SpinedetError(f"--models names a model twice: {' '.join(args.models)}")
    test_coco = read_json(args.test)
    detections = {name: read_json(path) for name, path in zip(args.models, args.detections)}
    write_json(args.out, compare(config, test_coco, detections), indent=1)
    return 0
