"""Inference speed-ups of a trained detector on the CPU, each against the current
path in the same run, with the test AP50 each one gives.

Every variant detects every test slice at batch 1 (the evaluate verb's pass:
spinedet.study.evaluate.detect, each slice timed), so one pass gives both its
seconds per slice and its AP50 (pycocotools). A step is worth keeping when its
AP50 stays within --ap-tolerance of the current path's. Then a torch profiler
table of the current path shows where the time goes (transform, backbone
body, FPN, RPN, ROI heads, NMS).

    .venv/bin/python benchmarks/inference_steps.py --weights results/models/resnet50/best.pt \\
        --test results/split/test.json --images results/slices --out benchmarks/results/inference_steps.json

Run it alone on the machine (see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch

from spinedet.detect import engine
from spinedet.detect.validation import validation_ap50
from spinedet.study import evaluate, timing
from spinedet.dataset.data import CocoSlices, load_coco
from spinedet.io import write_json
from spinedet.detect.models import load_trained

PROFILED = {
    "transform": lambda m: m.transform,
    "backbone body": lambda m: m.backbone.body,
    "FPN": lambda m: m.backbone.fpn,
    "RPN (with its NMS)": lambda m: m.rpn,
    "ROI heads (with their NMS)": lambda m: m.roi_heads,
}


def set_proposals(model, pre_nms: int, post_nms: int) -> None:
    """RPN proposals kept per level before NMS and in all after it, at test time."""
    model.rpn._pre_nms_top_n["testing"] = pre_nms  # noqa: SLF001 - torchvision keeps them here
    model.rpn._post_nms_top_n["testing"] = post_nms  # noqa: SLF001


def compile_backbone(model):
    """torch.compile (inductor) on the backbone body alone: the part with static
    shapes; the detector's data-dependent heads would break the graph."""
    model.backbone.body = torch.compile(model.backbone.body, dynamic=False)
    return model


def quantize_box_head(model):
    """Dynamic int8 quantization of the box head's fully connected layers (run per
    proposal: 12.8 M weights in fc6 alone), on top of the kept steps."""
    kept_steps(model)
    model.roi_heads.box_head = torch.ao.quantization.quantize_dynamic(
        model.roi_heads.box_head, {torch.nn.Linear}, dtype=torch.qint8)
    return model


def kept_steps(model):
    """channels-last and RPN 300/100: the steps adopted so far."""
    set_proposals(model.to(memory_format=torch.channels_last), 300, 100)
    return model


def variants(base, only: list[str] | None = None) -> dict:
    """name -> (a function that changes a copy of the model, the precision it runs in);
    the current path changes nothing and runs in float32."""
    pre, post = base.rpn._pre_nms_top_n["testing"], base.rpn._post_nms_top_n["testing"]  # noqa: SLF001
    steps = {
        f"baseline: contiguous weights, RPN {pre}/{post} as trained": lambda m: m,
        "channels-last": lambda m: m.to(memory_format=torch.channels_last),
        "RPN 500/150 proposals": lambda m: set_proposals(m, 500, 150) or m,
        "RPN 300/100 proposals (as the original Faster R-CNN's 300)": lambda m: set_proposals(m, 300, 100) or m,
        "RPN 150/50 proposals": lambda m: set_proposals(m, 150, 50) or m,
        "channels-last + RPN 300/100 (the kept steps together)": kept_steps,
        "torch.compile of the backbone body": compile_backbone,
        "kept steps + int8 box head (dynamic quantization)": quantize_box_head,
    }
    # bfloat16 autocast over the whole detector (commit 9f05fc0; inference_steps_bfloat16_whole_detector_*.json)
    # cost 3.6 and 7.0 points of AP50: spinedet.detect.engine.forward keeps the heads in float32
    precisions = {"kept steps + bfloat16 backbone and FPN, heads in float32": (kept_steps, "bfloat16")}
    steps = {name: (change, "float32") for name, change in steps.items()} | precisions
    names = list(steps)
    chosen = names if not only else [names[0], *(n for n in names[1:] if any(o in n for o in only))]
    return {name: steps[name] for name in chosen}


def run_variant(model, dataset, test_coco: dict, precision: str, score_threshold: float, warmup: int) -> dict:
    engine.set_score_threshold(model, score_threshold)
    detections, latency = evaluate.detect(model, dataset, torch.device("cpu"), precision, score_threshold, warmup)
    return {"ap50": validation_ap50(test_coco, detections), "detections": len(detections),
            "precision": precision,
            "s_per_slice": latency["model"], "machine_load": latency["machine_load"]}


def batch_per_patient(model, dataset, slices_per_batch: int) -> dict:
    """Seconds per slice when one patient's slices go through the network together."""
    by_patient: dict[str, list[int]] = {}
    for index, image in enumerate(dataset.images):
        by_patient.setdefault(str(image.get("patient")), []).append(index)
    batches = [indices[:slices_per_batch] for indices in by_patient.values()][:12]
    loaded = [[dataset.read_image(i) for i in batch] for batch in batches]
    engine.infer(model, loaded[0], torch.device("cpu"), "float32")  # warm-up
    per_slice = []
    for batch in loaded[1:]:
        start = time.perf_counter()
        engine.infer(model, batch, torch.device("cpu"), "float32")
        per_slice.append((time.perf_counter() - start) / len(batch))
    return {"slices_per_batch": slices_per_batch, "batches": len(per_slice),
            "s_per_slice_median": statistics.median(per_slice), "s_per_slice_min": min(per_slice)}


def profile(model, dataset, slices: int) -> list[dict]:
    """Self-contained CPU time per stage of the network (torch profiler, record_function per module)."""
    handles = []
    for name, module_of in PROFILED.items():
        module = module_of(model)
        scope: dict = {}

        def enter(_module, _inputs, name=name, scope=scope):
            scope["context"] = torch.profiler.record_function(name)
            scope["context"].__enter__()

        def leave(_module, _inputs, _outputs, scope=scope):
            scope["context"].__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    images = [dataset.read_image(i) for i in range(min(slices, len(dataset)))]
    engine.infer(model, images[:1], torch.device("cpu"), "float32")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for image in images:
            engine.infer(model, [image], torch.device("cpu"), "float32")
    for handle in handles:
        handle.remove()
    events = {e.key: e for e in prof.key_averages()}
    total = sum(events[name].cpu_time_total for name in PROFILED if name in events)
    rows = [{"stage": name, "ms_per_slice": events[name].cpu_time_total / 1000 / len(images),
             "share": events[name].cpu_time_total / total} for name in PROFILED if name in events]
    nms = events.get("torchvision::nms")
    if nms is not None:
        rows.append({"stage": "of which NMS (torchvision::nms)", "ms_per_slice": nms.cpu_time_total / 1000 / len(images),
                     "share": nms.cpu_time_total / total})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, required=True, help="best.pt of spinedet train")
    parser.add_argument("--test", type=Path, required=True, help="test split COCO JSON")
    parser.add_argument("--images", type=Path, required=True, help="slice PNG root")
    parser.add_argument("--out", type=Path, help="JSON to write")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--score-threshold", type=float, default=0.05)
    parser.add_argument("--ap-tolerance", type=float, default=0.005)
    parser.add_argument("--profile-slices", type=int, default=20)
    parser.add_argument("--only", nargs="+", help="run the current path and the variants whose names hold these")
    parser.add_argument("--no-extras", action="store_true", help="skip the per-patient batching and the profile")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base, meta = load_trained(args.weights, "cpu")
    # The baseline is the weights in their trained memory format: load_trained
    # now returns them channels-last, one of the steps measured here.
    base = base.to(memory_format=torch.contiguous_format)
    test_coco = load_coco(args.test)
    dataset = CocoSlices(test_coco, args.images)

    results = {}
    for name, (change, precision) in variants(base, args.only).items():
        model = change(copy.deepcopy(base)).eval()
        results[name] = run_variant(model, dataset, test_coco, precision, args.score_threshold, args.warmup)
        print(f"{name}: AP50 {results[name]['ap50']:.4f}, median {results[name]['s_per_slice']['median']:.3f} s/slice",
              flush=True)
    current = next(iter(results.values()))
    keep = [name for name, r in list(results.items())[1:]
            if abs(r["ap50"] - current["ap50"]) <= args.ap_tolerance
            and r["s_per_slice"]["median"] < current["s_per_slice"]["median"]]
    batched = {} if args.no_extras else {size: batch_per_patient(copy.deepcopy(base).eval(), dataset, size)
                                         for size in (1, 5)}
    table = [] if args.no_extras else profile(copy.deepcopy(base).eval(), dataset, args.profile_slices)

    print(f"\n{'variant':<58} {'AP50':>7} {'dAP50':>7} {'median s':>9} {'min s':>7} {'ratio':>6}")
    for name, r in results.items():
        ratio = r["s_per_slice"]["median"] / current["s_per_slice"]["median"]
        print(f"{name:<58} {r['ap50']:>7.4f} {r['ap50'] - current['ap50']:>+7.4f} "
              f"{r['s_per_slice']['median']:>9.3f} {r['s_per_slice']['min']:>7.3f} {ratio:>6.2f}")
    print("\nkept (AP50 within tolerance and faster):", ", ".join(keep) or "none")
    if batched:
        print(f"one patient's slices per batch: batch 1 {batched[1]['s_per_slice_median']:.3f}, "
              f"batch 5 {batched[5]['s_per_slice_median']:.3f} s/slice "
              f"(ratio {batched[5]['s_per_slice_median'] / batched[1]['s_per_slice_median']:.2f})")
        print("\nwhere the time goes (current path, torch profiler, CPU time):")
    for row in table:
        print(f"  {row['stage']:<34} {row['ms_per_slice']:>8.1f} ms/slice {100 * row['share']:>5.1f} %")
    report = {"weights": str(args.weights), "model_config": meta.get("model_config"), "threads": args.threads,
              "test_slices": len(dataset), "ap_tolerance": args.ap_tolerance, "variants": results, "kept": keep,
              "batch_per_patient": batched, "profile": table, **timing.environment(torch.device("cpu"))}
    if args.out:
        write_json(args.out, report, indent=1)


if __name__ == "__main__":
    main()
