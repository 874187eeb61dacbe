"""`spinedet speed`: every model timed in one job, taking turns on the same test slices."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from spinedet import SpinedetError, cli
from spinedet.study import speed
from spinedet.dataset.data import CocoSlices, load_coco
from tiny_detector import save_best, study_config, tiny_detector

REPO = Path(__file__).resolve().parents[2]

torch.set_num_threads(1)


def recorder(name: str, calls: list[str]) -> torch.nn.Module:
    """A tiny detector whose backbone logs each call (one per batch) by name."""
    model = tiny_detector({}, 3, 64)
    model.backbone.register_forward_pre_hook(lambda _module, _inputs: calls.append(name))
    return model


def test_the_slices_timed_are_spread_over_the_test_set():
    assert speed.spread(10, 4) == [0, 3, 6, 9]
    assert speed.spread(3, 10) == [0, 1, 2]
    assert speed.spread(101, 3) == [0, 50, 100]


def test_the_models_take_turns_in_an_order_that_alternates(test_split):
    test_json, slices, _ = test_split
    dataset = CocoSlices(load_coco(test_json), slices)
    calls: list[str] = []
    models = {name: recorder(name, calls) for name in ("a", "b", "c")}
    latency = speed.time_batch_1(models, dataset, torch.device("cpu"), "float32", warmup=1, slices=2,
                                 score_threshold=0.05)
    assert calls == ["a", "b", "c", "c", "b", "a", "a", "b", "c"]  # 3 slices: one warm-up, two timed
    assert all(latency[name]["model"]["n"] == 2 for name in models)
    calls.clear()
    batched = speed.batch_throughput(models, dataset, torch.device("cpu"), "float32",
                                     {"warmup": 0, "iterations": 2, "batch_size": 3})
    assert calls == ["a", "b", "c", "c", "b", "a"]
    assert all(batched[name]["batch_seconds"]["n"] == 2 and batched[name]["batch_size"] == 3 for name in models)


def test_speed_writes_one_timing_file_per_model_from_one_job(tmp_path, tiny_arch, test_split):
    test_json, slices, _ = test_split
    weights = [save_best(tmp_path / "a.pt"), save_best(tmp_path / "b.pt")]
    out = tmp_path / "timing"
    config = study_config() | {"models": {"a": {"arch": "tiny_test"}, "b": {"arch": "tiny_test"}},
                               "speed": {"warmup": 1, "slices": 100, "iterations": 3, "batch_size": 2}}
    speed.speed(config,
                ["a", "b"], weights, test_json, slices, out, threads=1)
    assert sorted(p.name for p in out.iterdir()) == ["a.json", "b.json"]
    for name, other in (("a", "b"), ("b", "a")):
        result = json.loads((out / f"{name}.json").read_text())
        assert result["model"] == name and result["interleaved_with"] == [other]
        for kind in ("model", "end_to_end"):
            stats = result["latency_s"][kind]
            # all 6 test slices (fewer than speed.slices) after the one warm-up slice
            assert stats["n"] == 5 and 0 < stats["min"] <= stats["median"] <= stats["p95"] <= stats["max"]
        assert result["latency_s"]["model"]["median"] <= result["latency_s"]["end_to_end"]["median"]
        assert [t["batch_size"] for t in result["throughput"]] == [1, 2]
        assert all(t["images_per_s"] > 0 for t in result["throughput"])
        assert result["throughput"][1]["batch_seconds"]["n"] == 3
        for entry in result["throughput"]:
            load = entry["machine_load"]
            assert load["wall_s"] > 0 and load["process_cpu_s"] >= 0 and load["logical_cpus"] >= 1
            assert load["shared"] in (True, False)  # Linux has a load average
        assert result["hardware"]["device"] == "cpu" and result["hardware"]["torch_threads"] == 1
        assert result["software"]["torch"] == torch.__version__


def test_cli_speed_reads_the_study_config(tmp_path, tiny_arch, test_split):
    test_json, slices, _ = test_split
    override = tmp_path / "override.yaml"
    override.write_text(yaml.safe_dump({"train": {"device": "cpu"},
                                        "speed": {"warmup": 0, "slices": 3, "iterations": 2, "batch_size": 3}}))
    out = tmp_path / "timing"
    code = cli.main(["speed", "--config", str(REPO / "config.yaml"), str(override), "--models", "resnet50", "vgg16",
                     "--weights", str(save_best(tmp_path / "r.pt")), str(save_best(tmp_path / "v.pt")),
                     "--test", str(test_json), "--images", str(slices), "--out", str(out), "--threads", "1"])
    assert code == 0
    result = json.loads((out / "vgg16.json").read_text())
    assert result["warmup"] == 0 and result["latency_s"]["model"]["n"] == 3
    assert result["throughput"][1]["batch_size"] == 3 and result["interleaved_with"] == ["resnet50"]


def test_speed_refuses_unmatched_weights_and_unknown_models(tmp_path, test_split):
    test_json, slices, _ = test_split
    config = study_config()
    with pytest.raises(SpinedetError, match="1 file\\(s\\) for 2 model\\(s\\)"):
        speed.speed(config, ["tiny", "other"], [tmp_path / "a.pt"], test_json, slices, tmp_path / "o", 1)
    with pytest.raises(SpinedetError, match="--models vgg99"):
        speed.speed(config, ["vgg99"], [tmp_path / "a.pt"], test_json, slices, tmp_path / "o", 1)
