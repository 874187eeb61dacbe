"""`spinedet evaluate` on a tiny detector: detections and metrics files, COCO
conversion, and the timing helpers (spinedet.study.timing)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from spinedet import SpinedetError, cli
from spinedet.detect import engine
from spinedet.study import evaluate, timing
from tiny_detector import CLASSES, SIZE, save_best, study_config, tiny_detector

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[2]


def test_evaluate_writes_detections_and_metrics(tmp_path, tiny_arch, test_split):
    test_json, slices, coco = test_split
    weights = save_best(tmp_path / "best.pt")
    out = tmp_path / "eval" / "tiny"
    evaluate.evaluate(study_config(), "tiny", weights, test_json, slices, out, threads=1)

    detections = json.loads((out / "detections.json").read_text())
    assert detections, "an untrained detector still proposes boxes above 0.05"
    assert {d["image_id"] for d in detections} <= {1, 2, 3, 4, 5, 6}
    assert all(d["score"] >= 0.05 and d["category_id"] in (1, 2) for d in detections)
    assert all(d["bbox"][2] >= 0 and d["bbox"][3] >= 0 for d in detections)

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model"] == "tiny" and metrics["arch"] == "tiny_test"
    assert metrics["n_images"] == 6 and metrics["n_patients"] == 3
    assert metrics["n_gt"] == {"disc_herniation": 2, "cord_injury": 3}
    assert metrics["weights"]["epoch"] == 3 and metrics["weights"]["val_ap50"] == 0.25
    assert metrics["weights"]["parameters"]["total"] == sum(p.numel() for p in tiny_detector({}, 3, SIZE).parameters())
    for key in ("ap", "ap50", "ap75", "ar100", "ap_iou10", "cpm"):
        assert 0.0 <= metrics[key] <= 1.0
    assert set(metrics["ap50_per_class"]) == set(CLASSES)
    assert metrics["bootstrap"]["draws"] == 20 and metrics["bootstrap"]["seed"] == 11
    assert len(metrics["froc"]["overall"]["sensitivity"]) == 7
    assert set(metrics["voc"]) >= {"voc07_11point", "voc10_all_point"}
    patients = metrics["patient_level"]
    assert patients["operating_point"]["chosen_on"].startswith("none")  # no validation detections given
    assert patients["score_threshold"] == 0.05 and patients["patients"] == 3
    assert set(patients["overall"]) == {"sensitivity_iou10", "sensitivity_iou50", "specificity", "confusion_iou50"}
    # The metrics are those of the written detections.
    again = evaluate.metrics_lib.coco_summary(coco, detections, CLASSES)
    assert again["ap50"] == metrics["ap50"] and again["ap"] == metrics["ap"]

    assert sorted(p.name for p in out.iterdir()) == ["detections.json", "metrics.json"]  # speed is timed apart


def test_cli_evaluate_reads_the_study_config(tmp_path, tiny_arch, test_split):
    """Through `spinedet evaluate` with the repository's config.yaml and an override."""
    test_json, slices, _ = test_split
    override = tmp_path / "override.yaml"
    override.write_text(yaml.safe_dump({"train": {"device": "cpu"}, "evaluate": {
        "bootstrap": 10}}))
    out = tmp_path / "eval" / "vgg16"
    # the validation split's detections: every lesion found, at scores 0.9 ... 0.5
    val_coco = json.loads(test_json.read_text())
    val_detections = tmp_path / "val_detections.json"
    val_detections.write_text(json.dumps([
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9 - 0.1 * k}
        for k, a in enumerate(val_coco["annotations"])]))
    code = cli.main(["evaluate", "--config", str(REPO / "config.yaml"), str(override), "--model", "vgg16",
                     "--weights", str(save_best(tmp_path / "best.pt")), "--test", str(test_json),
                     "--images", str(slices), "--out", str(out), "--threads", "1",
                     "--val", str(test_json), "--val-detections", str(val_detections)])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    operating = metrics["patient_level"]["operating_point"]
    # 3 patients with lesions, best hits 0.9, 0.7, 0.5: 90 % of them needs all three
    assert operating["chosen_on"] == "validation" and operating["score_threshold"] == 0.5
    assert metrics["model"] == "vgg16" and metrics["bootstrap"]["seed"] == 20200901
    assert metrics["froc"]["fps_per_image"] == [0.125, 0.25, 0.5, 1, 2, 4, 8]
    detections = json.loads((out / "detections.json").read_text())
    assert isinstance(detections, list) and all(d["score"] >= 0.05 for d in detections)  # the config's threshold


def test_cli_evaluate_missing_weights_is_a_clear_error(tmp_path, test_split, caplog):
    test_json, slices, _ = test_split
    code = cli.main(["evaluate", "--config", str(REPO / "config.yaml"), "--model", "vgg16",
                     "--weights", str(tmp_path / "nope.pt"), "--test", str(test_json),
                     "--images", str(slices), "--out", str(tmp_path / "out"), "--threads", "1"])
    assert code == 2
    assert "nope.pt" in caplog.text


def test_evaluate_refuses_weights_of_other_classes(tmp_path, tiny_arch, test_split):
    test_json, slices, _ = test_split
    weights = save_best(tmp_path / "best.pt", classes=["disc_herniation", "fracture"])
    with pytest.raises(SpinedetError, match="trained on classes"):
        evaluate.evaluate(study_config(), "tiny", weights, test_json, slices, tmp_path / "out", threads=1)


def test_evaluate_refuses_unknown_model(tmp_path, test_split):
    test_json, slices, _ = test_split
    with pytest.raises(SpinedetError, match="--model vgg99"):
        evaluate.evaluate(study_config(), "vgg99", tmp_path / "best.pt", test_json, slices, tmp_path / "o", 1)


def test_to_coco_results_converts_xyxy_and_applies_threshold():
    output = {
        "boxes": torch.tensor([[10.0, 20.0, 30.0, 25.0], [0.0, 0.0, 5.0, 5.0]]),
        "labels": torch.tensor([2, 1]),
        "scores": torch.tensor([0.9, 0.04]),
    }
    assert engine.to_coco_results(output, 7, 0.05) == [
        {"image_id": 7, "category_id": 2, "bbox": [10.0, 20.0, 20.0, 5.0], "score": pytest.approx(0.9)}]


def test_score_threshold_reaches_the_model():
    model = tiny_detector({}, 3, SIZE)
    engine.set_score_threshold(model, 0.01)
    assert model.roi_heads.score_thresh == 0.01


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_one_inference_path_gives_float_cpu_outputs_and_coco_results(precision):
    torch.manual_seed(0)
    model = tiny_detector({}, 3, SIZE)
    engine.set_score_threshold(model, 0.0)
    model.train()  # infer switches to eval mode itself
    images = [torch.rand(1, SIZE, SIZE), torch.rand(1, SIZE, SIZE)]
    outputs = engine.infer(model, images, torch.device("cpu"), precision)
    assert not model.training and len(outputs) == 2
    for output in outputs:
        assert output["boxes"].dtype == output["scores"].dtype == torch.float32
        assert output["boxes"].device.type == "cpu"
    batches = [(images, [{"image_id": 11}, {"image_id": 12}])]
    results = engine.predict_coco(model, batches, torch.device("cpu"), precision)
    expected = engine.to_coco_results(outputs[0], 11) + engine.to_coco_results(outputs[1], 12)
    assert results == expected


def test_only_the_backbone_runs_in_the_reduced_precision():
    """The features reach the RPN and the box head as float32, whatever the backbone ran in."""
    torch.manual_seed(0)
    model = tiny_detector({}, 3, SIZE)
    seen = {}

    def record(name, tensor):
        seen.setdefault(name, tensor.dtype)  # returns None: the hooks change nothing

    model.backbone.register_forward_hook(lambda _m, _i, output: record("backbone", output))
    model.rpn.head.register_forward_pre_hook(lambda _m, inputs: record("rpn", inputs[0][0]))
    model.roi_heads.box_head.register_forward_pre_hook(lambda _m, inputs: record("box head", inputs[0]))
    engine.infer(model, [torch.rand(1, SIZE, SIZE)], torch.device("cpu"), "bfloat16")
    assert seen == {"backbone": torch.bfloat16, "rpn": torch.float32, "box head": torch.float32}


def test_bfloat16_autocast_runs_the_convolutions_in_bfloat16_and_float32_does_not():
    seen = []
    conv = torch.nn.Conv2d(1, 2, 3)
    conv.register_forward_hook(lambda _module, _inputs, output: seen.append(output.dtype))
    for precision in ("bfloat16", "float32"):
        with engine.autocast(torch.device("cpu"), precision):
            conv(torch.rand(1, 1, 8, 8))
    assert seen == [torch.bfloat16, torch.float32]


def test_inference_precision_follows_the_device_and_the_cpu(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert engine.inference_precision(cuda, "float32") == "float16"  # CUDA: autocast as in training
    assert engine.inference_precision(cpu, "float32") == "float32"
    assert engine.inference_precision(cpu, "bfloat16") == "bfloat16"
    monkeypatch.setattr(engine, "cpu_has_native_bfloat16", lambda: True)
    assert engine.inference_precision(cpu, "auto") == "bfloat16"
    monkeypatch.setattr(engine, "cpu_has_native_bfloat16", lambda: False)
    assert engine.inference_precision(cpu, "auto") == "float32"
    with pytest.raises(ValueError, match="float8"):
        engine.inference_precision(cpu, "float8")


def test_resolve_device_cuda_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert evaluate.resolve_device("auto").type == "cpu"
    with pytest.raises(SpinedetError, match="cuda"):
        evaluate.resolve_device("cuda")


def test_timed_calls_exclude_warmup():
    calls = []
    seconds = timing.timed_calls(calls.append, warmup=2, iterations=3, device=torch.device("cpu"))
    assert calls == [0, 1, 2, 3, 4]
    assert len(seconds) == 3 and all(s >= 0 for s in seconds)


def test_latency_stats():
    stats = timing.latency_stats([0.1, 0.2, 0.3, 0.4, 1.0])
    assert stats["mean"] == pytest.approx(0.4)
    assert stats["median"] == pytest.approx(0.3)
    assert stats["p95"] == pytest.approx(0.88)
    assert stats["n"] == 5


def test_shared_machine_judges_the_load_at_the_end_against_the_process_own_cpus():
    assert timing.shared_machine(2.2, own_cpus=1.9) is False  # this process alone (and a decaying tail)
    assert timing.shared_machine(3.5, own_cpus=1.4) is True  # another job held a CPU
    assert timing.shared_machine(None, own_cpus=1.0) is None  # no load average on this platform


def test_machine_load_records_cpu_and_wall_time():
    with timing.MachineLoad() as load:  # long enough (~0.2 s) for the millisecond rounding not to matter
        sum(i * i for i in range(3_000_000))
    record = load.record
    assert record["wall_s"] > 0 and 0 <= record["process_cpu_s"]
    assert record["process_cpus_busy"] == pytest.approx(record["process_cpu_s"] / record["wall_s"], rel=0.05, abs=0.01)
    assert set(record) >= {"load_average_1min_before", "load_average_1min_after", "logical_cpus", "shared"}


def test_cpu_features_name_the_instruction_sets_that_pick_the_kernels(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma avx512f avx512_bf16\n\nprocessor\t: 1\n")
    assert timing.cpu_features(cpuinfo) == "AVX2, AVX-512, AVX512-BF16"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n")
    assert timing.cpu_features(cpuinfo) == "AVX2"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2\n")
    assert timing.cpu_features(cpuinfo) == "none of AVX2, AVX-512, AVX512-BF16, AMX"
    assert timing.cpu_features(tmp_path / "missing") == "unknown"
    assert "hardware" in timing.environment(torch.device("cpu")) and timing.environment(
        torch.device("cpu"))["hardware"]["cpu_features"]


def test_cpu_model_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Gold 6248\n")
    assert timing.cpu_model(cpuinfo) == "Intel(R) Xeon(R) Gold 6248"
    assert timing.cpu_model(tmp_path / "missing")  # falls back to platform, never empty
