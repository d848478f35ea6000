#!/usr/bin/env bash
# The GPU checks no CPU machine can make (issue 12), as one command for a machine with a GPU:
#   bash scripts/gpu_check.sh [OUT_DIR]        (default: $OUT, else gpu_check/)
# Through the device tool: bash scripts/gpu_wheels.sh here once, then run it with carry [".whl"].
# 1. the tests that need a GPU (nvjpeg decoding against the CPU pipeline); a bf16 run over nccl;
# 2. the train-step benchmark on ViT-B/16 in bf16 at batch 64 (README: "GPU");
# 3. the training data pipeline with decode=device on the GPU (README: "Training data pipeline").
# Each step's output goes to OUT_DIR; a failing step does not stop the others, and each has a time
# limit, the whole under 10 minutes (the device tool's limit for one command): a step cut short
# leaves what it printed.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-gpu_check}}"
mkdir -p "$out"
python="${PYTHON:-.venv/bin/python}"
if [ ! -x "$python" ]; then
    # a machine without this repo's venv (the device tool's): a venv over its own Python's packages
    # (torch, timm, ...), with the wheels of scripts/gpu_wheels.sh (carried in .whl/) and utdsl
    # installed editable into it, as scripts/setup.sh does, no dependency fetched
    python3 -m venv --system-site-packages /tmp/utdsl-venv || exit 2
    python=/tmp/utdsl-venv/bin/python
    "$python" -m pip install -q --no-index --no-deps .whl/*.whl || exit 2
    "$python" -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1
status=0
export PYTHONUNBUFFERED=1     # what a step cut short had printed reaches its file
timeout 90 "$python" -m pytest -q -p no:cacheprovider -rs tests/runtime/test_device_decode.py > "$out/tests.txt" 2>&1 || status=1
# bf16 autocast and the nccl path end to end (one process group of one GPU), then eval of the run
timeout 120 "$python" -m torch.distributed.run --nproc-per-node 1 -m utdsl train lora --model vit_t16 --data digits \
    --epochs 1 --input-size 64 --precision bf16 --device cuda --no-progress --out "$out/run" \
    > "$out/train.txt" 2>&1 || status=1
timeout 45 "$python" -m utdsl eval "$out/run" --device cuda >> "$out/train.txt" 2>&1 || status=1
timeout 200 "$python" benchmarks/train_step.py --model vit_b16 --device cuda --precision bf16 --batch-size 64 \
    --json "$out/train_step.json" > "$out/train_step.txt" 2>&1 || status=1
timeout 90 "$python" benchmarks/data_loading.py --device cuda --rounds 5 --json "$out/data_loading.json" \
    > "$out/data_loading.txt" 2>&1 || status=1
tail -n 3 "$out"/*.txt
exit $status
