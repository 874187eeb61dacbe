"""`spinedet predict`: DICOM or NIfTI in, detections with boxes mapped back to
the DICOM pixels of the source instance, overlays out."""

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.models.detection.image_list import ImageList

import spinedet
from spinedet import SpinedetError
from spinedet.geometry import pixel_box_to_voxel_box
from spinedet.ingest.dicom import image_planes, list_files, read_file
from spinedet.detect.predict import choose_score_threshold, convert_series, predict, read_series
from spinedet.dataset.canonical import to_canonical
from spinedet.dataset.slices import map_box
from spinedet.demo.synthesize import synthesize

REPO = Path(__file__).resolve().parents[2]

torch.set_num_threads(1)

CLASSES = ["disc_herniation", "cord_injury"]
CONFIG = {
    "classes": CLASSES,
    "train": {"device": "cpu", "cpu_inference_precision": "auto", "threads": 1},
    "slices": {"window_percentiles": [1.0, 99.0]},
    "inventory": {
        "orientation": "sagittal",
        "description_pattern": "(?i)(t2|stir)",
        "exclude_pattern": "(?i)(loc|scout|survey|stir)",
    },
}
META = {"classes": CLASSES, "image_size": 128, "model_name": "replay", "model_config": {"arch": "none"}, "epoch": 1}


class ReplayTransform:
    """Batches the slices as they are, recording their shapes."""

    def __init__(self):
        self.shapes = []

    def __call__(self, images):
        self.shapes.append(tuple(images[0].shape))
        return ImageList(torch.stack(images), [tuple(image.shape[-2:]) for image in images]), None

    def postprocess(self, detections, _sizes, _original_sizes):
        return detections


class ReplayHeads:
    """Returns the given boxes of each slice in turn."""

    score_thresh = 0.05

    def __init__(self, boxes_by_slice: dict[int, list[tuple[list[float], int]]]):
        self.boxes_by_slice = boxes_by_slice
        self.calls = 0

    def __call__(self, _features, _proposals, _image_sizes):
        found = self.boxes_by_slice.get(self.calls, [])
        self.calls += 1
        return [
            {
                "boxes": torch.tensor([box for box, _ in found], dtype=torch.float32).reshape(-1, 4),
                "labels": torch.tensor([label for _, label in found], dtype=torch.int64),
                "scores": torch.full((len(found),), 0.9),
            }
        ], {}


class ReplayModel(torch.nn.Module):
    """Stands in for a detector: returns given boxes on given slices (called once per slice, in
    order), through the stages spinedet.detect.engine.forward runs (transform, backbone, RPN, ROI heads)."""

    def __init__(self, boxes_by_slice: dict[int, list[tuple[list[float], int]]]):
        super().__init__()
        self.transform = ReplayTransform()
        self.backbone = lambda tensors: tensors
        self.rpn = lambda _images, _features: (None, {})
        self.roi_heads = ReplayHeads(boxes_by_slice)

    @property
    def calls(self) -> int:
        return self.roi_heads.calls

    @property
    def shapes(self) -> list[tuple]:
        return self.transform.shapes


def study_truth(export: Path, series_uid: str, rows: list[dict], headers: list[dict], work: Path) -> SimpleNamespace:
    """One annotated study: its folder, annotation rows and the canonical boxes the
    slices stage would make of them (deidentify's and slices' own mappings)."""
    files = {h["sop_instance_uid"]: h for h in headers if h.get("series_uid") == series_uid}
    # The patient's top folder holds the whole study (T1, axials, localizer too).
    first = Path(next(iter(files.values()))["path"]).relative_to(export / "DICOM")
    study_folder = export / "DICOM" / first.parts[0]
    series, series_files = read_series(study_folder, CONFIG["inventory"])
    assert series["series_uid"] == series_uid
    nifti = convert_series(series, series_files, work)
    image = nib.load(nifti)
    volume = to_canonical(image)
    canonical = []
    for row in rows:
        planes = image_planes(files[row["sop_instance_uid"]])
        plane = planes[int(row["frame_number"]) - 1 if row.get("frame_number") else 0]
        voxel_box = pixel_box_to_voxel_box(
            [float(row[k]) for k in ("x_min", "y_min", "x_max", "y_max")],
            plane["ipp"],
            plane["iop"],
            plane["pixel_spacing"],
            image.affine,
            shape=image.shape,
        )
        box = {"label": row["label"], **voxel_box.as_dict()}
        canonical.append(map_box(box, voxel_box.slice_axis, volume.old_to_new))
    saved_nifti = work / "study.nii.gz"
    saved_nifti.write_bytes(Path(nifti).read_bytes())
    return SimpleNamespace(
        folder=study_folder, rows=rows, canonical=canonical, nifti=saved_nifti, n_slices=volume.data.shape[0]
    )


def annotated_studies(export: Path, tmp_path_factory) -> list[SimpleNamespace]:
    with (export / "annotations.csv").open() as fh:
        annotations = list(csv.DictReader(fh))
    headers = [{**read_file(path), "path": path.as_posix()} for path in list_files(export / "DICOM")]
    studies = []
    for series_uid in dict.fromkeys(row["series_uid"] for row in annotations):
        rows = [row for row in annotations if row["series_uid"] == series_uid]
        studies.append(study_truth(export, series_uid, rows, headers, tmp_path_factory.mktemp("predict_truth")))
    assert len(studies) >= 2
    return studies


@pytest.fixture(scope="module")
def lesion_studies(smoke_export, tmp_path_factory) -> list[SimpleNamespace]:
    """Every annotated study of the smoke export (their geometries differ: flips, obliques, slice order)."""
    return annotated_studies(smoke_export, tmp_path_factory)


@pytest.fixture(scope="module")
def enhanced_lesion_studies(tmp_path_factory) -> list[SimpleNamespace]:
    """Annotated studies exported as Enhanced MR: one multi-frame file per series."""
    export = tmp_path_factory.mktemp("enhanced_export")
    synthesize(export, patients=4, matrix=64, seed=5, enhanced_fraction=1.0)
    return annotated_studies(export, tmp_path_factory)


@pytest.fixture(scope="module")
def lesion_study(lesion_studies) -> SimpleNamespace:
    return lesion_studies[0]


def replay_truth(canonical) -> ReplayModel:
    boxes = {}
    for box in canonical:
        label = CLASSES.index(box.label) + 1
        boxes.setdefault(box.slice_index, []).append(([box.x_min, box.y_min, box.x_max, box.y_max], label))
    return ReplayModel(boxes)


@pytest.mark.parametrize("studies", ["lesion_studies", "enhanced_lesion_studies"])
def test_dicom_boxes_map_back_to_the_annotated_instances(studies, request, tmp_path):
    """Canonical boxes of the annotations, fed through predict, come back as the annotation
    rows: on the instance, or on the frame of a multi-frame (Enhanced MR) instance."""
    lesion_studies = request.getfixturevalue(studies)
    for number, study in enumerate(lesion_studies):
        model = replay_truth(study.canonical)
        out = tmp_path / f"prediction-{number}"
        result = predict(CONFIG, None, study.folder, out, score_threshold=0.5, model=model, meta=META)
        assert model.calls == study.n_slices  # every slice searched
        assert all(shape[0] == 1 for shape in model.shapes)  # grayscale slices, as in training
        assert result["input"]["kind"] == "dicom" and result["input"]["slices"] == study.n_slices

        assert len(result["detections"]) == len(study.rows)
        truth = sorted(zip(study.rows, study.canonical), key=lambda pair: (pair[1].slice_index, pair[1].x_min))
        detections = sorted(result["detections"], key=lambda det: (det["slice_index"], det["box"][0]))
        for det, (row, box) in zip(detections, truth):
            assert det["label"] == row["label"] and det["slice_index"] == box.slice_index
            assert det["box"] == pytest.approx([box.x_min, box.y_min, box.x_max, box.y_max], abs=0.01)
            dicom = det["dicom"]
            assert dicom["sop_instance_uid"] == row["sop_instance_uid"]
            assert dicom["instance_number"] == int(row["instance_number"])
            assert dicom["frame_number"] == (int(row["frame_number"]) if row["frame_number"] else None)
            for key in ("x_min", "y_min", "x_max", "y_max"):
                assert dicom[key] == pytest.approx(float(row[key]), abs=0.02), key

        written = json.loads((out / "detections.json").read_text())
        assert written["detections"] == result["detections"]
        overlays = sorted((out / "overlays").glob("slice-*.png"))
        assert len(overlays) == study.n_slices
    with Image.open(overlays[study.canonical[0].slice_index]) as overlay:
        assert overlay.mode == "RGB" and min(overlay.size) >= 128
        assert not {k for k in overlay.info if k not in ("dpi", "gamma")}  # no text chunks


def test_nifti_input_gives_canonical_boxes_only(lesion_study, tmp_path):
    model = replay_truth(lesion_study.canonical)
    result = predict(CONFIG, None, lesion_study.nifti, tmp_path, score_threshold=0.5, model=model, meta=META)
    assert result["input"]["kind"] == "nifti"
    assert len(result["detections"]) == len(lesion_study.rows)
    assert all("dicom" not in det for det in result["detections"])


def test_score_threshold_filters(lesion_study, tmp_path):
    model = replay_truth(lesion_study.canonical)
    result = predict(CONFIG, None, lesion_study.nifti, tmp_path, score_threshold=0.95, model=model, meta=META)
    assert result["detections"] == []
    assert len(list((tmp_path / "overlays").glob("*.png"))) == lesion_study.n_slices


def test_the_threshold_defaults_to_the_studys_operating_point(lesion_study, tmp_path):
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"model": "replay", "patient_level": {"score_threshold": 0.962}}))
    assert choose_score_threshold(None, None) == (0.5, "default")
    assert choose_score_threshold(None, metrics) == (0.962, "operating point of metrics.json")
    assert choose_score_threshold(0.3, metrics) == (0.3, "--score-threshold")
    (tmp_path / "old.json").write_text(json.dumps({"model": "replay"}))
    with pytest.raises(SpinedetError, match="holds no patient_level.score_threshold"):
        choose_score_threshold(None, tmp_path / "old.json")

    model = replay_truth(lesion_study.canonical)
    result = predict(CONFIG, None, lesion_study.nifti, tmp_path / "out", 0.962, model=model, meta=META,
                     threshold_source="operating point of metrics.json", expected_model="replay")
    assert result["score_threshold"] == 0.962 and result["score_threshold_source"].startswith("operating point")
    saved = json.loads((tmp_path / "out" / "detections.json").read_text())
    assert saved["spinedet_version"] == spinedet.__version__
    with pytest.raises(SpinedetError, match="--metrics evaluates model vgg16, but --weights"):
        predict(CONFIG, None, lesion_study.nifti, tmp_path / "out2", 0.9, model=model, meta=META,
                expected_model="vgg16")


def test_input_that_is_neither_dicom_nor_nifti(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    with pytest.raises(SpinedetError, match="no readable MR image"):
        predict(CONFIG, None, tmp_path / "empty", tmp_path / "out", model=ReplayModel({}), meta=META)
    with pytest.raises(SpinedetError, match="not a DICOM folder nor"):
        predict(CONFIG, None, tmp_path / "missing.nii.gz", tmp_path / "out", model=ReplayModel({}), meta=META)


def write_volume(path: Path, voxel_sizes, slice_world_axis: int, shape=(20, 24, 6)) -> Path:
    """A NIfTI whose third voxel axis (the slices) runs along world axis `slice_world_axis` (RAS)."""
    import nibabel as nib

    in_plane = [axis for axis in range(3) if axis != slice_world_axis]
    affine = np.zeros((4, 4))
    affine[3, 3] = 1
    for voxel_axis, world_axis in enumerate([*in_plane, slice_world_axis]):
        affine[world_axis, voxel_axis] = voxel_sizes[voxel_axis]
    data = np.random.default_rng(0).random(shape).astype(np.float32)
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def test_acquisition_plane_from_the_thickest_voxel_axis(tmp_path):
    from spinedet.detect.predict import acquisition_plane

    axial = np.diag([0.7, 0.7, 7.5, 1.0])
    assert acquisition_plane(axial) == ("axial", [0.7, 0.7, 7.5])
    sagittal = np.zeros((4, 4))
    sagittal[[1, 2, 0, 3], [0, 1, 2, 3]] = [0.6, 0.6, 3.5, 1]  # slices along L-R
    assert acquisition_plane(sagittal)[0] == "sagittal"
    assert acquisition_plane(np.diag([1.0, 1.0, 1.2, 1.0]))[0] == "isotropic"


def test_an_axial_nifti_is_refused_naming_plane_and_voxels_unless_allowed(tmp_path, caplog):
    axial = write_volume(tmp_path / "axial.nii.gz", (0.7, 0.7, 7.5), slice_world_axis=2)
    with pytest.raises(SpinedetError, match=r"acquired axial \(voxels 0.70 x 0.70 x 7.50 mm\).*--allow-non-sagittal"):
        predict(CONFIG, None, axial, tmp_path / "out", model=ReplayModel({}), meta=META)
    result = predict(CONFIG, None, axial, tmp_path / "out", model=ReplayModel({}), meta=META,
                     allow_non_sagittal=True)
    assert result["input"]["kind"] == "nifti"
    assert "--allow-non-sagittal: running anyway" in caplog.text


def test_far_pixel_spacing_is_warned(tmp_path, caplog):
    sagittal = write_volume(tmp_path / "sag.nii.gz", (0.5, 0.5, 3.0), slice_world_axis=0)
    predict(CONFIG, None, sagittal, tmp_path / "out", model=ReplayModel({}),
            meta={**META, "pixel_spacing_mm": [1.0, 1.0]})
    assert "pixels are 0.50 x 0.50 mm, the model was trained on 1.00 x 1.00 mm" in caplog.text


def test_a_folder_of_several_patients_is_refused(smoke_export, tmp_path):
    with pytest.raises(SpinedetError, match=r"holds images of \d+ patients: point --input at one"):
        predict(CONFIG, None, smoke_export / "DICOM", tmp_path / "out", model=ReplayModel({}), meta=META)


def test_output_inside_results_is_refused(lesion_study, tmp_path):
    config = {**CONFIG, "results": str(tmp_path / "results")}
    with pytest.raises(SpinedetError, match="must never enter results/"):
        predict(config, None, lesion_study.nifti, tmp_path / "results" / "predict", model=ReplayModel({}), meta=META)
    assert not (tmp_path / "results").exists()


# --------------------------------------------------------------------------
# Convergence: a detector trained here finds the lesions of a study (slow)

E2E_PATIENTS = 4
E2E_MATRIX = 256
E2E_EPOCHS = 25  # x 3 iterations of 4 crops (max_iters_per_epoch below): about 1.5 min at 2 threads


def box_iou(a: list[float], b: list[float]) -> float:
    inter_w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    inter_h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = inter_w * inter_h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


@pytest.mark.slow
def test_trained_model_finds_the_lesions_of_its_study(tmp_path):
    """Synthetic export -> ingest -> slices -> train -> predict on the raw DICOM of a
    training patient: one of its 5 best boxes lies on an annotated instance with IoU >= 0.5.

    This checks that predict prepares slices exactly as training saw them and maps
    boxes back to DICOM pixels; it is not a generalisation test (evaluate does that).
    """
    import yaml

    from spinedet.cli import main
    from spinedet.config import load
    from spinedet.dataset.split import merge_cocos
    from spinedet.demo.synthesize import synthesize
    from spinedet.detect.train import train_model

    demo_recipe = yaml.safe_load((REPO / "config.yaml").read_text())["models"]["resnet50"]
    export, results, restricted = tmp_path / "export", tmp_path / "results", tmp_path / "restricted"
    synthesize(export, patients=E2E_PATIENTS, matrix=E2E_MATRIX, seed=5)
    # A fixed pseudonym key: the pseudonyms order the patients, hence the training batches, so a
    # random key made every run a different training run (and this test pass or fail by chance).
    key_file = tmp_path / "pseudonym.key"
    key_file.write_text("5" * 64)
    key_file.chmod(0o600)
    config_path = tmp_path / "config.yaml"
    config_path.write_text(
        yaml.safe_dump(
            {
                "raw": str(export / "DICOM"),
                "annotations": str(export / "annotations.csv"),
                "cohort": str(export / "cohort.csv"),
                "results": str(results),
                "restricted": str(restricted),
                "demo": {"enabled": False},
                "deidentify": {"key_file": str(key_file)},
                "slices": {"mode": "mid", "half_width": 1},
                "train": {"threads": 2},
                # The demo's recipe (GroupNorm, box-aware crops, class-balanced
                # sampling), on a shorter schedule.
                "models": {"resnet50": {**demo_recipe, "epochs": E2E_EPOCHS, "max_iters_per_epoch": 3}},
            }
        )
    )
    config = ["--config", str(config_path)]
    inventory = restricted / "inventory"
    for argv in (
        ["inventory", *config, "--raw", str(export / "DICOM"), "--cohort", str(export / "cohort.csv"),
         "--out", str(inventory), "--summary", str(results / "inventory" / "summary.json")],
        ["convert", *config, "--series", str(inventory / "series.csv"), "--selection",
         str(inventory / "selection.csv"), "--out", str(restricted / "convert")],
        ["deidentify", *config, "--conversions", str(restricted / "convert" / "conversions.csv"),
         "--files", str(inventory / "files.csv"), "--selection", str(inventory / "selection.csv"),
         "--annotations", str(export / "annotations.csv"), "--restricted", str(restricted),
         "--out", str(results / "deid")],
    ):  # fmt: skip
        assert main(argv) == 0, argv[0]
    argv = ["slices", *config, "--participants", str(results / "deid" / "participants.csv"),
            "--out", str(results / "slices")]
    assert main(argv) == 0

    cocos = {p.parent.name: json.loads(p.read_text()) for p in sorted((results / "slices").glob("sub-*/coco.json"))}
    categories = next(iter(cocos.values()))["categories"]
    train_json, val_json = tmp_path / "train.json", tmp_path / "val.json"
    train_json.write_text(json.dumps(merge_cocos(list(cocos.values()), categories, "train")))
    subject = max(cocos, key=lambda s: len(cocos[s]["annotations"]))  # the study to predict on
    val_json.write_text(json.dumps(merge_cocos([cocos[subject]], categories, "val")))
    settings = load([config_path])
    model_dir = tmp_path / "model"
    assert train_model(settings, "resnet50", train_json, val_json, results / "slices", model_dir) == 0

    # Back to the raw export: the patient's study folder and annotation rows.
    with (restricted / "pseudonyms.csv").open() as fh:
        patient_id = next(row["patient_id"] for row in csv.DictReader(fh) if f"sub-{row['pseudonym']}" == subject)
    with (inventory / "files.csv").open() as fh:
        paths = [Path(row["path"]) for row in csv.DictReader(fh) if row["patient_id"] == patient_id]
    study_folder = export / "DICOM" / paths[0].relative_to(export / "DICOM").parts[0]
    with (export / "annotations.csv").open() as fh:
        annotated = {}
        for row in csv.DictReader(fh):
            annotated.setdefault(row["sop_instance_uid"], []).append(
                [float(row[k]) for k in ("x_min", "y_min", "x_max", "y_max")]
            )

    # A short CPU training gives low but well-ranked scores: look at the study's top 5.
    result = predict(settings, model_dir / "best.pt", study_folder, tmp_path / "prediction", score_threshold=0.05)
    top = sorted(result["detections"], key=lambda det: -det["score"])[:5]
    ious = [
        box_iou([det["dicom"][k] for k in ("x_min", "y_min", "x_max", "y_max")], truth)
        for det in top
        if det.get("dicom") and det["dicom"]["sop_instance_uid"] in annotated
        for truth in annotated[det["dicom"]["sop_instance_uid"]]
    ]
    assert ious and max(ious) >= 0.5, (ious, top)
