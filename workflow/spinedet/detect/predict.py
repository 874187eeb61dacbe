"""`spinedet predict`: detect lesions in a new study with a trained model.

The input is one DICOM series folder (or a folder holding a study: the
target series is then chosen by the config's `inventory:` rules, as for
training) or a NIfTI volume. Slices are prepared exactly as for training:
DICOM goes through dcm2niix like `spinedet convert`, the volume is turned to
the canonical sagittal orientation and windowed like `spinedet slices`.
Every slice of the volume is searched.

Output in --out:
- detections.json: per detection the slice index, the box [x_min, y_min,
  x_max, y_max] on the canonical slice (pixel edges; anterior left,
  superior up), label and score; for DICOM input also the box in DICOM
  pixel coordinates (column, row) of the source instance, with its
  SOPInstanceUID and InstanceNumber (and the frame number, for a frame of
  an Enhanced MR instance; null otherwise).
- detections_sr.dcm (DICOM input with at least one detection): the same
  detections as a DICOM SR (TID 1500 Measurement Report, Comprehensive 3D
  SR) that PACS viewers draw; see spinedet.detect.detection_sr.
- overlays/slice-KK.png: every slice with its boxes and scores (not with
  --sr-only).

With --dicomweb, the studies come from a DICOMweb server and each gets its
own folder under --out (spinedet.detect.dicomweb).

This is clinical output for the patient's record, not a study result: it
carries DICOM UIDs (the SR also the patient's name and ID), so keep it out of
results/.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from spinedet import SpinedetError, __version__
from spinedet.detect import engine
from spinedet.detect.dicomweb import add_credential_arguments
from spinedet.geometry import acquisition_plane
from spinedet.ingest.dicom import InstanceLocator
from spinedet.io import read_json, write_json

log = logging.getLogger(__name__)

CANONICAL_ORIENTATION = (
    "sagittal slices, index 0 = the patient's leftmost; image rows run superior to inferior, "
    "columns anterior to posterior; boxes are pixel edges [x_min, y_min, x_max, y_max]"
)
CLASS_COLOURS = [(255, 64, 64), (64, 192, 255), (255, 208, 64), (128, 255, 128)]
OVERLAY_MIN_SIDE = 512
DEFAULT_SCORE_THRESHOLD = 0.5


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from spinedet.config import add_config_argument

    parser.description = (
        "Detect lesions in a new DICOM series (or study folder) or NIfTI volume. The output is "
        "clinical: detections.json may contain DICOM UIDs of the input, so keep it with the "
        "patient's record and out of results/."
    )
    add_config_argument(parser)
    parser.add_argument("--weights", required=True, type=Path, help="best.pt written by spinedet train")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", type=Path, help="DICOM series (or study) folder, or a .nii/.nii.gz volume")
    source.add_argument("--dicomweb", metavar="URL",
                        help="DICOMweb server root (e.g. http://pacs:8042/dicom-web): predict on its studies "
                             "given by --study-uid or --studies")
    parser.add_argument(
        "--out", required=True, type=Path,
        help="output folder (detections.json, detections_sr.dcm, overlays/); holds UIDs and patient identity")
    parser.add_argument(
        "--metrics", type=Path, default=None,
        help="the study's eval/MODEL/metrics.json: keep detections at the patient-level operating point "
             "chosen on the validation split (its patient_level.score_threshold)")
    parser.add_argument(
        "--score-threshold", type=float, default=None,
        help=f"keep detections scoring at least this (default: the operating point of --metrics, "
             f"else {DEFAULT_SCORE_THRESHOLD})")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: config train.threads)")
    parser.add_argument("--allow-non-sagittal", action="store_true",
                        help="run on a volume acquired axially or coronally (refused by default: the detectors "
                             "were trained on sagittal slices, and its sagittal reformats are as coarse as its "
                             "slice thickness)")
    parser.add_argument("--sr-only", action="store_true",
                        help="write detections.json and the DICOM SR, no overlay PNGs (batch use)")
    web = parser.add_argument_group("DICOMweb (with --dicomweb)")
    web.add_argument("--study-uid", action="append", default=[], metavar="UID",
                     help="StudyInstanceUID of a study to predict on (repeat for several)")
    web.add_argument("--studies", type=Path, default=None, metavar="FILE",
                     help="a text file of StudyInstanceUIDs, one per line (# comments allowed)")
    web.add_argument("--store", action="store_true",
                     help="store each study's SR back into the study on the server (STOW-RS)")
    add_credential_arguments(web)


def run(args: argparse.Namespace) -> int:
    from spinedet.config import load

    config = load(args.config)
    threshold, source = choose_score_threshold(args.score_threshold, args.metrics)
    log.info("score threshold %.3f (%s)", threshold, source)
    expected_model = None if args.metrics is None else read_json(args.metrics).get("model")
    if args.dicomweb:
        from spinedet.detect import dicomweb

        return dicomweb.run(args, config, threshold, source, expected_model)
    web_only = [flag for flag, value in (("--study-uid", args.study_uid), ("--studies", args.studies),
                                         ("--store", args.store)) if value]
    if web_only:
        raise SpinedetError(f"{', '.join(web_only)} need --dicomweb URL")
    result = predict(config, args.weights, args.input, args.out, threshold, args.threads,
                     allow_non_sagittal=args.allow_non_sagittal, threshold_source=source,
                     expected_model=expected_model, sr_only=args.sr_only)
    log.info("%d detections on %d slices; see %s", len(result["detections"]), result["input"]["slices"], args.out)
    return 0


def refuse_results_out(config: dict, out: Path) -> None:
    """predict's output identifies the study: never inside the study's results folder."""
    if config.get("results") and Path(out).resolve().is_relative_to(Path(config["results"]).resolve()):
        raise SpinedetError(
            f"--out {out} lies inside the study's results folder {config['results']}: predictions may "
            "carry DICOM UIDs, which must never enter results/; choose another folder"
        )


def choose_score_threshold(given: float | None, metrics_path: Path | None) -> tuple[float, str]:
    """The score threshold and where it came from: --score-threshold, else the patient-level
    operating point in the study's metrics.json, else the default."""
    if given is not None:
        return float(given), "--score-threshold"
    if metrics_path is None:
        return DEFAULT_SCORE_THRESHOLD, "default"
    threshold = read_json(metrics_path).get("patient_level", {}).get("score_threshold")
    if threshold is None:
        raise SpinedetError(f"--metrics {metrics_path} holds no patient_level.score_threshold (an evaluation "
                            "without a validation operating point): pass --score-threshold")
    return float(threshold), f"operating point of {Path(metrics_path).name}"


# ---------------------------------------------------------------- input


def is_nifti(path: Path) -> bool:
    return path.is_file() and (path.name.endswith(".nii") or path.name.endswith(".nii.gz"))


def read_series(folder: Path, rules: dict) -> tuple[dict, list[dict]]:
    """(series row, its image file rows) of the target series under `folder`.

    One series: that one. Several: the one the inventory rules would select.
    """
    from spinedet.ingest.dicom import build_series, is_target, list_files, read_file, series_rank

    rows, seen = [], set()
    for path in tqdm(list_files(folder), desc="read headers", unit="file"):
        row = {**read_file(path), "path": path.as_posix()}
        if row["status"] == "ok" and row.get("kind") == "image" and row["sop_instance_uid"] not in seen:
            seen.add(row["sop_instance_uid"])
            rows.append(row)
    patients = {row["patient_id"] for row in rows}
    if len(patients) > 1:
        raise SpinedetError(
            f"{folder} holds images of {len(patients)} patients: point --input at one patient's series or "
            "study (predict runs on one patient at a time)")
    series = build_series(rows)
    if not series:
        raise SpinedetError(f"{folder}: no readable MR image (see `spinedet inventory` for the reasons)")
    if len(series) > 1:
        targets = [s for s in series if is_target(s, rules)]
        if not targets:
            found = "; ".join(f"{s['orientation']} {s['description']!r} ({s['n_slices']} images)" for s in series)
            raise SpinedetError(
                f"{folder} holds {len(series)} series and none meets the inventory rules: {found}. "
                "Point --input at the one series folder to use."
            )
        series = sorted(targets, key=series_rank(rules))
    chosen = series[0]
    log.info("series %r: %s, %d images", chosen["description"], chosen["orientation"], chosen["n_slices"])
    return chosen, [r for r in rows if r["series_uid"] == chosen["series_uid"]]


def convert_series(series: dict, files: list[dict], work_dir: Path) -> Path:
    """dcm2niix, exactly as `spinedet convert` runs it; the NIfTI path."""
    from spinedet.ingest.dicom_to_nifti import run_dcm2niix

    result = run_dcm2niix(
        [Path(f["path"]) for f in files],
        work_dir / "nifti",
        work_dir=work_dir,
        pixels_per_image=int(series["rows"]) * int(series["columns"]),
        images=int(series["n_slices"]),
    )
    if result["status"] != "converted":
        raise SpinedetError(f"dcm2niix could not convert the series: {result['message']}")
    return Path(result["nifti"])


def prepare_volume(nifti: Path, window_percentiles: list[float]):
    """(original NIfTI affine, CanonicalVolume, uint8 canonical slices) as `spinedet slices` makes them."""
    from spinedet.dataset.canonical import load_canonical, window_to_uint8

    affine, volume = load_canonical(nifti)
    return affine, volume, window_to_uint8(volume.data, list(window_percentiles))


def check_input_plane(affine: np.ndarray, input_path: Path, allow_non_sagittal: bool) -> None:
    plane, sizes = acquisition_plane(affine)
    if plane in ("sagittal", "isotropic"):
        return
    voxels = " x ".join(f"{v:.2f}" for v in sizes)
    message = (f"{input_path}: the volume was acquired {plane} (voxels {voxels} mm), but the detectors were "
               f"trained on sagittal slices; its sagittal reformats would be {max(sizes):.1f} mm coarse")
    if not allow_non_sagittal:
        raise SpinedetError(f"{message}. Use the patient's sagittal series, or pass --allow-non-sagittal "
                            "to run anyway")
    log.warning("%s (--allow-non-sagittal: running anyway)", message)


def check_spacing_and_matrix(volume, slices: np.ndarray, meta: dict) -> None:
    """Warn when the slices are far (> 25 %) from the training slices' pixel spacing or size."""
    spacing = np.linalg.norm(np.asarray(volume.affine, dtype=float)[:3, 1:3], axis=0)
    trained = meta.get("pixel_spacing_mm")
    if trained:
        ratio = spacing / np.asarray(trained, dtype=float)
        if np.any(np.abs(ratio - 1) > 0.25):
            log.warning("pixels are %.2f x %.2f mm, the model was trained on %.2f x %.2f mm: lesions look %.1fx "
                        "their trained size", *spacing, *trained, float(1 / ratio.mean()))
    if max(slices.shape[1:]) != int(meta["image_size"]):
        log.warning(
            "slices are %dx%d px, the model was trained on %d px: it resizes them to that size",
            slices.shape[2], slices.shape[1], meta["image_size"],
        )


# ---------------------------------------------------------------- detection


def detect_slices(
    model, slices: np.ndarray, classes: list[str], device: torch.device, precision: str, score_threshold: float
) -> list[dict]:
    """Detections on every uint8 canonical slice (n, H, W), in canonical pixel edges."""
    engine.set_score_threshold(model, min(float(model.roi_heads.score_thresh), score_threshold))
    detections = []
    for slice_index in tqdm(range(len(slices)), desc="predict", unit="slice"):
        image = torch.from_numpy(slices[slice_index].astype(np.float32) / 255.0)[None]
        output = engine.infer(model, [image], device, precision)[0]
        for box, score, label in zip(output["boxes"].tolist(), output["scores"].tolist(), output["labels"].tolist()):
            if score >= score_threshold:
                detections.append(
                    {
                        "slice_index": slice_index,
                        "label": classes[label - 1],
                        "score": round(score, 4),
                        "box": [round(v, 2) for v in box],
                    }
                )
    return detections


def write_overlay(path: Path, pixels: np.ndarray, detections: list[dict], classes: list[str]) -> None:
    """The slice, enlarged to be readable, with each box and its label and score."""
    scale = max(1, int(np.ceil(OVERLAY_MIN_SIDE / max(pixels.shape))))
    image = Image.fromarray(pixels).convert("RGB").resize(
        (pixels.shape[1] * scale, pixels.shape[0] * scale), Image.Resampling.NEAREST
    )
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=max(10, 4 * scale))
    for det in detections:
        colour = CLASS_COLOURS[classes.index(det["label"]) % len(CLASS_COLOURS)]
        x0, y0, x1, y1 = (v * scale for v in det["box"])
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=colour, width=max(1, scale // 2))
        draw.text((x0, max(0, y0 - 5 * scale)), f"{det['label']} {det['score']:.2f}", fill=colour, font=font)
    image.save(path, format="PNG")


def predict(
    config: dict,
    weights: Path,
    input_path: Path,
    out: Path,
    score_threshold: float = 0.5,
    threads: int | None = None,
    model=None,
    meta: dict | None = None,
    allow_non_sagittal: bool = False,
    threshold_source: str = "given",
    expected_model: str | None = None,
    sr_only: bool = False,
) -> dict:
    """Run the verb; returns what detections.json holds. `model`/`meta` skip loading `weights`.
    `expected_model`: the model the threshold's metrics.json evaluated, which the weights must be.
    `sr_only`: no overlays (DICOM input only)."""
    from spinedet.detect.models import load_trained
    from spinedet.detect.models import resolve_device

    input_path, out = Path(input_path), Path(out)
    refuse_results_out(config, out)
    device = resolve_device(config["train"]["device"])
    if device.type == "cpu":
        torch.set_num_threads(int(threads or config["train"]["threads"]))
    if model is None:
        model, meta = load_trained(weights, device)
    classes = list(meta["classes"])
    if expected_model is not None and meta.get("model_name") != expected_model:
        raise SpinedetError(f"--metrics evaluates model {expected_model}, but --weights {weights} are "
                            f"{meta.get('model_name')}: pass the metrics.json of the same model")
    window = config["slices"]["window_percentiles"]

    with tempfile.TemporaryDirectory(prefix="spinedet-predict-") as tmp:
        files = []
        if is_nifti(input_path):
            if sr_only:
                raise SpinedetError(f"--input {input_path}: --sr-only needs DICOM input (a NIfTI volume gets no "
                                    "DICOM SR)")
            kind, locator = "nifti", None
            affine, volume, slices = prepare_volume(input_path, window)
            check_input_plane(affine, input_path, allow_non_sagittal)
        elif input_path.is_dir():
            kind = "dicom"
            series, files = read_series(input_path, config["inventory"])
            if series["orientation"] != "sagittal":
                message = (f"{input_path}: the series is {series['orientation']}, but the detectors were trained "
                           "on sagittal slices")
                if not allow_non_sagittal:
                    raise SpinedetError(f"{message}. Use the patient's sagittal series, or pass "
                                        "--allow-non-sagittal to run anyway")
                log.warning("%s (--allow-non-sagittal: running anyway)", message)
            # dcm2niix's sidecar carries identity: it lives and dies in the temporary folder.
            affine, volume, slices = prepare_volume(convert_series(series, files, Path(tmp)), window)
            locator = InstanceLocator(files, affine, np.linalg.inv(volume.old_to_new))
        else:
            raise SpinedetError(f"--input {input_path}: not a DICOM folder nor a .nii/.nii.gz file")

    check_spacing_and_matrix(volume, slices, meta)
    precision = engine.inference_precision(device, config["train"]["cpu_inference_precision"])
    detections = detect_slices(model, slices, classes, device, precision, score_threshold)
    if locator is not None:
        for det in detections:
            det["dicom"] = locator.to_dicom(det["slice_index"], det["box"])
            if det["dicom"] is None:
                log.warning("slice %d: no DICOM instance lies on this slice; box kept without it", det["slice_index"])

    out.mkdir(parents=True, exist_ok=True)
    # detections.json is written last: an earlier run's goes first, so a failure below (the SR,
    # an overlay) never leaves it beside outputs it does not describe
    (out / "detections.json").unlink(missing_ok=True)
    overlays = out / "overlays"
    if overlays.is_dir():
        for stale in overlays.glob("slice-*.png"):
            stale.unlink()
    if not sr_only:
        overlays.mkdir(parents=True, exist_ok=True)
        by_slice = defaultdict(list)
        for det in detections:
            by_slice[det["slice_index"]].append(det)
        digits = max(2, len(str(len(slices) - 1)))
        for index, pixels in enumerate(slices):
            write_overlay(overlays / f"slice-{index:0{digits}d}.png", pixels, by_slice[index], classes)
    dicom_sr = write_sr(config, out, kind, files, detections, meta, weights, score_threshold)

    result = {
        "note": "clinical output: may contain DICOM UIDs of the input; keep it out of results/",
        "spinedet_version": __version__,
        "model": {
            "name": meta.get("model_name"),
            "arch": meta.get("model_config", {}).get("arch"),
            "epoch": meta.get("epoch"),
            "classes": classes,
        },
        "score_threshold": score_threshold,
        "score_threshold_source": threshold_source,
        "inference_precision": precision,
        "input": {
            "kind": kind,
            "slices": int(len(slices)),
            "height": int(slices.shape[1]),
            "width": int(slices.shape[2]),
            "orientation": CANONICAL_ORIENTATION,
        },
        "dicom_sr": dicom_sr,
        "detections": detections,
    }
    write_json(out / "detections.json", result)
    return result


def write_sr(config: dict, out: Path, kind: str, files: list[dict], detections: list[dict], meta: dict,
             weights: Path | None, score_threshold: float) -> dict | None:
    """out/detections_sr.dcm for DICOM input with at least one detection placed on an instance
    (a stale one is removed otherwise); what detections.json records of it, or None."""
    from spinedet.detect import detection_sr

    path = out / detection_sr.SR_FILE
    path.unlink(missing_ok=True)
    if kind != "dicom":
        return None
    if not any(det.get("dicom") for det in detections):
        log.info("no detection on a DICOM instance at or above the threshold: no DICOM SR written")
        return None
    info = detection_sr.write_detection_sr(
        path, [Path(f["path"]) for f in files], detections, detection_sr.class_codes(config),
        meta.get("model_name"), detection_sr.weights_sha256(weights), score_threshold,
    )
    log.info("DICOM SR with %d detections: %s", info["detections"], path.name)
    return info
