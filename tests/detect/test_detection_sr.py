"""predict's DICOM SR (detections_sr.dcm): a TID 1500 Measurement Report that
highdicom reads back as detections.json, that the annotation import reads back
as boxes of the right class, and that dciodvfy passes."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
import spinedet
import yaml
from spinedet import SpinedetError
from spinedet.detect import detection_sr
from spinedet.detect.detection_sr import BOX_KEYS, class_codes, read_detection_sr
from spinedet.detect.predict import predict
from spinedet.ingest.annotations.findings import DEFAULT_FINDING_MAP
from spinedet.ingest.annotations.sr import read_measurement_report
from spinedet.ingest.dicom import list_files, read_file
from test_predict import CLASSES, CONFIG, META, ReplayModel, annotated_studies, replay_truth

DCIODVFY = shutil.which("dciodvfy") or ("/usr/bin/dciodvfy" if Path("/usr/bin/dciodvfy").is_file() else None)
CODES = class_codes({})


@pytest.fixture(scope="module")
def sr_studies(smoke_export, tmp_path_factory):
    """The smoke export's annotated studies, and one Enhanced MR study, each predicted by a model
    that replays its annotations: (study, detections.json, SR path) triples."""
    from spinedet.demo.synthesize import synthesize

    enhanced = tmp_path_factory.mktemp("sr_enhanced_export")
    synthesize(enhanced, patients=4, matrix=64, seed=5, enhanced_fraction=1.0)
    studies = annotated_studies(smoke_export, tmp_path_factory)[:2] + annotated_studies(enhanced, tmp_path_factory)[:1]
    predicted = []
    for number, study in enumerate(studies):
        out = tmp_path_factory.mktemp(f"sr_prediction_{number}")
        result = predict(CONFIG, None, study.folder, out, score_threshold=0.5, model=replay_truth(study.canonical),
                         meta=META)
        predicted.append((study, result, out / "detections_sr.dcm"))
    return predicted


def dicom_boxes(result: dict) -> list[dict]:
    return sorted(({"sop_instance_uid": det["dicom"]["sop_instance_uid"], "frame_number": det["dicom"]["frame_number"],
                    **{k: det["dicom"][k] for k in BOX_KEYS}, "label": det["label"], "score": det["score"]}
                   for det in result["detections"] if det.get("dicom")),
                  key=lambda box: (box["sop_instance_uid"], box["frame_number"] or 0, box["x_min"], box["y_min"]))


def test_highdicom_reads_back_the_detections(sr_studies):
    for study, result, sr_path in sr_studies:
        assert sr_path.is_file() and result["dicom_sr"]["file"] == "detections_sr.dcm"
        saved = json.loads((sr_path.parent / "detections.json").read_text())
        assert saved["dicom_sr"] == result["dicom_sr"] and result["dicom_sr"]["detections"] == len(study.rows)
        expected = dicom_boxes(saved)
        back = sorted(read_detection_sr(sr_path, CODES),
                      key=lambda box: (box["sop_instance_uid"], box["frame_number"] or 0, box["x_min"], box["y_min"]))
        assert len(back) == len(expected) == len(study.rows)
        for got, want in zip(back, expected):
            assert got["sop_instance_uid"] == want["sop_instance_uid"]
            assert got["frame_number"] == want["frame_number"]
            assert got["label"] == want["label"] and got["score"] == pytest.approx(want["score"])
            assert [got[k] for k in BOX_KEYS] == pytest.approx([want[k] for k in BOX_KEYS], abs=1e-4)


def test_the_sr_is_a_tid1500_report_with_the_studys_context_and_the_algorithm(sr_studies):
    study, result, sr_path = sr_studies[-1]  # Enhanced MR: one multi-frame source, frames referenced
    sr = hd.sr.srread(sr_path)
    source = pydicom.dcmread(next(p for p in list_files(study.folder)
                                  if read_file(p).get("sop_instance_uid") == result["detections"][0]["dicom"]
                                  ["sop_instance_uid"]), stop_before_pixels=True)
    assert sr.SOPClassUID == pydicom.uid.Comprehensive3DSRStorage and sr.Modality == "SR"
    for keyword in ("PatientID", "PatientName", "StudyInstanceUID", "AccessionNumber"):
        assert sr.get(keyword) == source.get(keyword), keyword
    assert sr.SeriesInstanceUID != source.SeriesInstanceUID
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    evidence = {item.ReferencedSOPInstanceUID
                for study_item in sr.CurrentRequestedProcedureEvidenceSequence
                for series in study_item.ReferencedSeriesSequence for item in series.ReferencedSOPSequence}
    assert source.SOPInstanceUID in evidence
    groups = sr.content.get_planar_roi_measurement_groups()
    assert len(groups) == len(result["detections"])
    for group in groups:
        assert group.roi.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
        points = group.roi.value
        assert len(points) == 5 and list(points[0]) == list(points[-1])  # closed
        assert group.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedFrameNumber  # Enhanced MR
        assert (group.finding_type.scheme_designator, group.finding_type.value) in {c[:2] for c in CODES.values()}
        score = group.get_measurements(name=detection_sr.SCORE)[0]
        assert score.unit.value == "1" and score.unit.scheme_designator == "UCUM"
    algorithm = hd.sr.utils.find_content_items(sr.ContentSequence[-1], name=hd.sr.CodedConcept(
        "111001", "DCM", "Algorithm Name"), recursive=True)
    assert algorithm and algorithm[0].TextValue == "spinedet"
    version = hd.sr.utils.find_content_items(sr.ContentSequence[-1], name=hd.sr.CodedConcept(
        "111003", "DCM", "Algorithm Version"), recursive=True)
    assert version[0].TextValue == spinedet.__version__
    parameters = {item.TextValue for item in hd.sr.utils.find_content_items(
        sr.ContentSequence[-1], name=hd.sr.CodedConcept("111002", "DCM", "Algorithm Parameters"), recursive=True)}
    assert {"model=replay", "score_threshold=0.5"} <= parameters


def test_the_annotation_import_reads_the_sr_back_as_boxes_of_the_right_class(sr_studies):
    for study, result, sr_path in sr_studies:
        instances = {}
        for path in list_files(study.folder):
            row = {**read_file(path), "path": path.as_posix()}
            if row["status"] == "ok" and row.get("kind") == "image":
                instances[row["sop_instance_uid"]] = row
        boxes, issues = read_measurement_report(sr_path, instances, DEFAULT_FINDING_MAP, CLASSES,
                                                {"default": 8.0})
        assert issues == []
        imported = sorted(({"sop_instance_uid": b.sop_instance_uid, "frame_number": b.frame_number,
                            **{k: getattr(b, k) for k in BOX_KEYS}, "label": b.label} for b in boxes),
                          key=lambda box: (box["sop_instance_uid"], box["frame_number"] or 0, box["x_min"],
                                           box["y_min"]))
        expected = [{k: v for k, v in box.items() if k != "score"} for box in dicom_boxes(result)]
        assert len(imported) == len(expected)
        for got, want in zip(imported, expected):
            assert got == {**want, **{k: pytest.approx(want[k], abs=1e-4) for k in BOX_KEYS}}


@pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy (Debian dicom3tools) is not installed")
def test_dciodvfy_reports_no_errors(sr_studies):
    for _, _, sr_path in sr_studies:
        check = subprocess.run([DCIODVFY, str(sr_path)], capture_output=True, text=True, timeout=60, check=False)
        lines = (check.stdout + check.stderr).splitlines()
        errors = [line for line in lines if line.startswith("Error") or " Error " in line]
        assert errors == [], "\n".join(lines)


def test_no_detection_gives_no_sr_and_a_nifti_input_none(lesion_study, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "detections_sr.dcm").write_bytes(b"stale")
    result = predict(CONFIG, None, lesion_study.folder, out, score_threshold=0.5, model=ReplayModel({}), meta=META)
    assert result["detections"] == [] and result["dicom_sr"] is None
    assert not (out / "detections_sr.dcm").exists()  # a stale SR would contradict detections.json

    (out / "detections_sr.dcm").write_bytes(b"stale")
    result = predict(CONFIG, None, lesion_study.nifti, out, score_threshold=0.5,
                     model=replay_truth(lesion_study.canonical), meta=META)
    assert result["detections"] and result["dicom_sr"] is None
    assert not (out / "detections_sr.dcm").exists()


def test_sr_only_skips_the_overlays(lesion_study, tmp_path):
    out = tmp_path / "out"
    result = predict(CONFIG, None, lesion_study.folder, out, score_threshold=0.5,
                     model=replay_truth(lesion_study.canonical), meta=META, sr_only=True)
    assert (out / "detections_sr.dcm").is_file() and result["dicom_sr"]["detections"] == len(lesion_study.rows)
    assert not list(out.glob("overlays/*.png"))
    with pytest.raises(SpinedetError, match="--sr-only needs DICOM input"):
        predict(CONFIG, None, lesion_study.nifti, out, model=ReplayModel({}), meta=META, sr_only=True)


def test_a_class_without_a_code_is_refused_saying_what_to_add(lesion_study, tmp_path):
    config = {**CONFIG, "annotation_import": {"finding_map": [
        {"code": {"scheme": "SCT", "value": "73589001"}, "class": "disc_herniation"},
        {"text": "(?i)cord", "class": "cord_injury"}]}}
    assert class_codes(config) == {"disc_herniation": ("SCT", "73589001", "disc herniation")}
    model = replay_truth(lesion_study.canonical)
    if not any(box.label == "cord_injury" for box in lesion_study.canonical):
        pytest.skip("the study has no cord_injury box")
    with pytest.raises(SpinedetError, match="class 'cord_injury' has no code in annotation_import.finding_map"):
        predict(config, None, lesion_study.folder, tmp_path / "out", model=model, meta=META)


@pytest.fixture(scope="module")
def lesion_study(smoke_export, tmp_path_factory):
    studies = annotated_studies(smoke_export, tmp_path_factory)
    # one with both classes when there is one, for the missing-code test
    return next((s for s in studies if {b.label for b in s.canonical} == set(CLASSES)), studies[0])


def sparse_tiny_detector(model_cfg: dict, num_classes: int, image_size: int, load_weights: bool = True):
    """The tiny test detector, keeping its best box per slice (an untrained detector scores
    every proposal about alike)."""
    from tiny_detector import tiny_detector

    model = tiny_detector(model_cfg, num_classes, image_size, load_weights)
    model.roi_heads.detections_per_img = 1
    return model


def test_the_cli_writes_the_sr_with_the_weights_sha256(lesion_study, tmp_path, monkeypatch):
    from spinedet.cli import main
    from spinedet.detect import models
    from tiny_detector import save_best

    monkeypatch.setitem(models.ARCHITECTURES, "tiny_test", sparse_tiny_detector)
    weights = save_best(tmp_path / "best.pt")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"results": str(tmp_path / "results"), "train": {"threads": 1}}))
    out = tmp_path / "prediction"
    argv = ["predict", "--config", str(config), "--weights", str(weights), "--input", str(lesion_study.folder),
            "--out", str(out), "--score-threshold", "0.1", "--sr-only"]
    assert main(argv) == 0
    result = json.loads((out / "detections.json").read_text())
    assert len(result["detections"]) == lesion_study.n_slices  # one box per slice
    assert not (out / "overlays").exists()
    sr = hd.sr.srread(out / "detections_sr.dcm")
    parameters = {item.TextValue for item in hd.sr.utils.find_content_items(
        sr.ContentSequence[-1], name=hd.sr.CodedConcept("111002", "DCM", "Algorithm Parameters"), recursive=True)}
    sha256 = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert {"model=tiny", f"weights_sha256={sha256}", "score_threshold=0.1"} <= parameters
    assert sr.ManufacturerModelName == "tiny" and sr.SoftwareVersions == f"spinedet {spinedet.__version__}"
    assert len(read_detection_sr(out / "detections_sr.dcm", CODES)) == len(result["detections"])
