"""benchmarks/gpu_check.py on the CPU (`--device cpu --quick`): the script a
developer runs the moment a GPU is lent must work there the first time."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spinedet.detect import engine
from tiny_detector import write_slices

REPO = Path(__file__).resolve().parents[1]
SIZE = 96


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_split(root: Path) -> None:
    """slices/ and split/{train,val,test}.json: eight 96 px slices of four patients, a bright box on most."""
    coco = write_slices(root, size=SIZE, count=8, box=(20, 30, 20, 14), lesion_free=(4, 8))
    (root / "split").mkdir()
    for split in ("train", "val", "test"):
        (root / "split" / f"{split}.json").write_text(json.dumps(coco))


@pytest.mark.slow  # trains both detectors and runs three verbs
def test_gpu_check_runs_on_the_cpu_and_writes_every_number(tmp_path):
    """The whole device command (gpu_check.sh with QUICK=1): the check's JSON, then the verbs."""
    write_split(tmp_path / "data")
    out = tmp_path / "out"
    env = {**os.environ, "QUICK": "1", "PYTHON": sys.executable, "WHEELS": str(tmp_path / "no_wheels")}
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), str(out), str(tmp_path / "data")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert sorted(path.name for path in out.iterdir()) == [
        "gpu_check.json", "gpu_check.log", "verb_metrics.json", "verb_timing.json", "verb_train_log.csv", "verbs.log"]

    report = json.loads((out / "gpu_check.json").read_text())
    assert report["hardware"]["device"] == "cpu" and report["quick"] is True
    assert set(report["models"]) == {"resnet50", "vgg16"}
    for name, result in report["models"].items():
        assert "error" not in result, result
        assert result["image_px"] == SIZE
        assert result["training"]["iterations"] == 2 and result["training"]["amp"] is False
        assert result["training"]["grad_scale"] is None  # GradScaler is off on the CPU
        assert result["train_step_whole_slices"]["iterations"] == 1
        assert result["test_images"] == 4
        for precision in ("amp", "fp32"):
            assert result[precision]["batch_1"]["latency_s"]["n"] == 3  # 4 test images, 1 warm-up
            assert result[precision]["batch_2"]["batch_seconds"]["n"] == 2
            assert 0.0 <= result[precision]["ap50"] <= 1.0  # the test slices hold boxes: AP50 is defined
        # the "amp" pass is the pipeline's precision: on this CPU the one train.cpu_inference_precision: auto gives
        assert result["amp"]["precision"] == engine.inference_precision(torch.device("cpu"), "auto")
        assert result["fp32"]["precision"] == "float32"
        assert result["ap50_amp_minus_fp32"] == pytest.approx(result["amp"]["ap50"] - result["fp32"]["ap50"])
        if result["amp"]["precision"] == "float32":
            assert result["amp"]["detections"] == result["fp32"]["detections"]
        assert result["paper_s_per_image"] == {"resnet50": 0.22, "vgg16": 0.24}[name]
        assert result["times_faster_than_paper"] > 0
    assert report["goal"]["met"] is False  # 0.011 s/image at batch 1 is a GPU's goal, not a CPU's

    train_log = (out / "verb_train_log.csv").read_text().splitlines()
    assert train_log[0].startswith("epoch,") and len(train_log) == 3  # two epochs
    verb_timing = json.loads((out / "verb_timing.json").read_text())
    assert verb_timing["device"] == "cpu" and verb_timing["latency_s"]["model"]["n"] == 7  # 8 test images
    assert json.loads((out / "verb_metrics.json").read_text())["model"] == "resnet50"


def test_gpu_check_without_data_says_how_to_make_it(tmp_path):
    from spinedet import SpinedetError

    with pytest.raises(SpinedetError, match="--build"):
        load_gpu_check().main(["--device", "cpu", "--quick", "--data", str(tmp_path), "--out", str(tmp_path / "x")])
