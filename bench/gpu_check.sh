#!/usr/bin/env bash
# The feed-rate GPU check in one device call (see bench/gpu_check.py). Build the wheels first, here:
#   python3 ../shared/device/bundle.py        # writes .whl/
# then run it with the device tool, carrying .whl:
#   bash bench/gpu_check.sh                   # writes $OUT/gpu_check.json
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || true
timeout 450 python3 bench/gpu_check.py --out "${OUT:-/tmp/gpu-check-out}" "$@"
