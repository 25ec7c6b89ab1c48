#!/usr/bin/env bash
# The GPU checks of issue 5 in one device call: the gpu-marked tests, then bench/throughput.py at
# the setting (224 px, bf16, channels_last, batch 128) for resnet26d, convnext_tiny and
# convnext_small, and convnext_tiny compiled. Prints a short table per model; details under $OUT.
#
# The device machine has torch, timm, torchvision, numpy, pandas and scikit-learn; pyarrow and
# safetensors may be missing there: carry their wheels (pip download pyarrow safetensors -d wheels/)
# and this script installs them offline first.
set -euo pipefail
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
OUT=${OUT:-bench/out}
if [ -d wheels ]; then pip install -q --no-index --find-links wheels pyarrow safetensors pyyaml; fi
python -m pytest -q -m gpu tests/test_batches.py 2>&1 | tail -3
common=(--size 224 --batch 128 --images 4096 --source-size 640 480 --workers 15 --steps 30 --epochs 2 --tta 4)
for model in resnet26d convnext_tiny convnext_small; do
  python bench/throughput.py --model "$model" "${common[@]}" --out "$OUT/$model" | tail -9
done
python bench/throughput.py --model convnext_tiny "${common[@]}" --compile --out "$OUT/convnext_tiny_compiled" | tail -10
