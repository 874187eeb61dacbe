#!/usr/bin/env bash
# The GPU check in one command, for the few minutes a GPU is lent:
#   1. benchmarks/gpu_check.py: both detectors trained with AMP, timed with
#      synchronised clocks at batch 1 and batch 8, AMP against fp32 AP50;
#   2. the verbs themselves on the device: `spinedet train` (two epochs,
#      validation under autocast, checkpoints with the GradScaler state),
#      `spinedet evaluate` and `spinedet speed` (timing JSON with the GPU's name).
#
#   bash benchmarks/gpu_check.sh OUT_DIR [DATA_DIR]
#
# DATA_DIR (default benchmarks/out/gpu_check/results) must hold slices/ and
# split/; see benchmarks/gpu_check.py for how to make it. Wheels in $WHEELS
# (default .whl/) are installed first, for a machine that lacks some of the
# project's packages. $PYTHON (default python3) runs it all. QUICK=1 runs the
# same steps in seconds on a CPU (--device cpu --quick): the test does.
set -euo pipefail
out=${1:?usage: gpu_check.sh OUT_DIR [DATA_DIR]}
data=${2:-benchmarks/out/gpu_check/results}
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
mkdir -p "$out"
work=$(mktemp -d)
export PYTHONPATH="$repo/workflow${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

python=${PYTHON:-python3}
wheels=${WHEELS:-.whl}
if compgen -G "$wheels/*.whl" >/dev/null; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$work/site" "$wheels"/*.whl
    export PYTHONPATH="$PYTHONPATH:$work/site"
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv

if [[ "${QUICK:-0}" == 1 ]]; then
    check_args=(--device cpu --quick --workers 0)
    train_config='{"train": {"device": "cpu", "workers": 0}, "models": {"resnet50": {"epochs": 2, "max_iters_per_epoch": 1, "batch_size": 2}}, "evaluate": {"bootstrap": 10}, "speed": {"warmup": 1, "iterations": 1, "batch_size": 2}}'
else
    check_args=(--device auto --threads 8 --workers 6)
    train_config='{"train": {"device": "auto", "workers": 6}, "models": {"resnet50": {"epochs": 2, "max_iters_per_epoch": 150, "batch_size": 8}}, "speed": {"warmup": 5, "iterations": 20, "batch_size": 8}}'
fi

# Each step runs whatever the one before it did; the exit status says whether all passed.
status=0
"$python" benchmarks/gpu_check.py --data "$data" --out "$out/gpu_check.json" "${check_args[@]}" 2>&1 \
    | tee "$out/gpu_check.log" || status=1

{
    "$python" -m spinedet.cli train --config config.yaml "$train_config" --model resnet50 \
        --train "$data/split/train.json" --val "$data/split/val.json" --images "$data/slices" \
        --out "$work/models/resnet50"
    "$python" -m spinedet.cli evaluate --config config.yaml "$train_config" --model resnet50 \
        --weights "$work/models/resnet50/best.pt" --test "$data/split/test.json" --images "$data/slices" \
        --out "$work/eval/resnet50" --threads 8
    "$python" -m spinedet.cli speed --config config.yaml "$train_config" --models resnet50 \
        --weights "$work/models/resnet50/best.pt" --test "$data/split/test.json" --images "$data/slices" \
        --out "$work/timing" --threads 8
} 2>&1 | tee "$out/verbs.log" || status=1
cp "$work/models/resnet50/train_log.csv" "$out/verb_train_log.csv" || status=1
cp "$work/timing/resnet50.json" "$out/verb_timing.json" || status=1
cp "$work/eval/resnet50/metrics.json" "$out/verb_metrics.json" || status=1
rm -rf "$work"
exit $status
