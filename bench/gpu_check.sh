#!/usr/bin/env bash
# The GPU checks of issues 5 and 11 in one device call:
#   1. the gpu-marked tests;
#   2. bench/throughput.py at the issue's setting (224 px, amp auto = bf16 on an H100, channels_last,
#      batch 128) for resnet26d, convnext_tiny and convnext_small, and convnext_tiny compiled;
#   3. the real CLI on the digits dataset upscaled to 224 px (a few hundred images, no download):
#      `stacker train-base` of resnet26d (random init) three ways in one run, amp bf16, amp fp16
#      (GradScaler) and bf16 compiled, then `predict-oof`, `fit-stack` and `submit`. Prints per model
#      the precision and card its histories record, images/s, final valid loss and error, fp16's loss
#      scale and skipped batches, OOF accuracy; details in $OUT/stacker_cli.json.
# Prints a short table per step; details under $OUT.
#
# Without a CUDA device (or with SMOKE=1) it runs the same steps in a smoke mode: test_resnet at
# 32 px, a few steps: it checks the script and the paths, it measures nothing.
#
# The device machine has torch, timm, torchvision, numpy, pandas and scikit-learn; pyarrow and
# safetensors may be missing there: carry their wheels (pip download pyarrow safetensors -d wheels/)
# and this script installs them offline first. Nothing is downloaded: HF_HUB_OFFLINE=1, no pretrained.
set -euo pipefail
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
if [ -d wheels ]; then pip install -q --no-index --find-links wheels pyarrow safetensors pyyaml; fi
if python -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then SMOKE=${SMOKE:-0}; else SMOKE=${SMOKE:-1}; fi

if [ "$SMOKE" = 1 ]; then
  echo "smoke mode (no CUDA device, or SMOKE=1): tiny model, 32 px, a few steps; nothing here is a measurement"
  common=(--size 32 --batch 16 --images 96 --source-size 48 64 --workers 1 --steps 2 --epochs 1 --tta 1)
  bench_models=(test_resnet)
  arch=test_resnet size=32 images=${IMAGES:-160} batch=16 epochs=2
else
  common=(--size 224 --batch 128 --images 4096 --source-size 640 480 --workers 15 --steps 30 --epochs 2 --tta 4)
  bench_models=(resnet26d convnext_tiny convnext_small)
  arch=resnet26d size=224 images=${IMAGES:-1000} batch=64 epochs=4
fi

echo "== 1. gpu-marked tests"
python -m pytest -q -m gpu tests/test_batches.py 2>&1 | tail -3

echo "== 2. throughput"
for model in "${bench_models[@]}"; do
  python bench/throughput.py --model "$model" "${common[@]}" --out "$OUT/$model" | tail -9
done
if [ "$SMOKE" != 1 ]; then
  python bench/throughput.py --model convnext_tiny "${common[@]}" --compile --out "$OUT/convnext_tiny_compiled" | tail -10
fi

echo "== 3. stacker CLI: $arch at $size px on $images digits, amp bf16 / fp16 / bf16 compiled"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python - "$work/data" "$size" "$images" <<'PY'
import sys
from base_models.demo_data import write_digits_dataset
write_digits_dataset(sys.argv[1], size=int(sys.argv[2]), n_images=int(sys.argv[3]))
PY
cat > "$work/run.yaml" <<YAML
run_dir: $work/run
data: {root: $work/data}
folds: {k: 2, seed: 42}
train: {size: $size, epochs: $epochs, batch_size: $batch, lr: 0.002, freeze_epochs: 0}
models:   # random init (no pretrained file): nothing is downloaded
  - {name: ${arch}_bf16, arch: $arch, amp: bf16}
  - {name: ${arch}_fp16, arch: $arch, amp: fp16}
  - {name: ${arch}_bf16_compiled, arch: $arch, amp: bf16, compile: true}
tta: {n: 2}
YAML
stacker=(python cli.py)
t0=$SECONDS
"${stacker[@]}" train-base --config "$work/run.yaml" | grep -vE "epoch +[0-9]+/"  # each job's last epoch only
"${stacker[@]}" predict-oof --run "$work/run"
echo "train-base + predict-oof: $((SECONDS - t0)) s"
# fit-stack and submit need the stack's packages; a machine without them still reports the rest
if "${stacker[@]}" fit-stack --run "$work/run" && "${stacker[@]}" submit --run "$work/run"; then
  stacked=1
else
  stacked=0; echo "fit-stack/submit failed (see above); the base-model checks stand"
fi
python - "$work/run" "$OUT/stacker_cli.json" "$stacked" <<'PY'
import json, sys
from oof import RunPaths, read_json
paths, out, stacked = RunPaths(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"
rows = {}
for model in paths.predicted_models():
    runs = [read_json(paths.history(model, k)) for k in range(2)]
    last = [r["epochs"][-1] for r in runs]
    rows[model] = {"amp": runs[0]["amp"], "device": runs[0]["device_name"],
                   "images_per_second": sum(e["images_per_second"] for e in last) / len(last),
                   "valid_loss": sum(e["valid_loss"] for e in last) / len(last),
                   "error_rate": sum(e["error_rate"] for e in last) / len(last),
                   "loss_scale": [e["loss_scale"] for e in last],
                   "nonfinite_batches": sum(e["nonfinite_batches"] for r in runs for e in r["epochs"]),
                   "oof_accuracy": read_json(paths.predict_metrics(model))["accuracy"]}
result = {"models": rows, "submission": paths.submission.is_file() if stacked else None}
with open(out, "w") as f:
    json.dump(result, f, indent=2)
print(f"{'model':<28}{'amp':>6}{'images/s':>10}{'valid_loss':>12}{'error':>8}{'OOF acc':>9}{'skipped':>9}  device")
for name, r in rows.items():
    print(f"{name:<28}{r['amp']:>6}{r['images_per_second']:>10.1f}{r['valid_loss']:>12.4f}{r['error_rate']:>8.3f}"
          f"{r['oof_accuracy']:>9.3f}{r['nonfinite_batches']:>9d}  {r['device']}")
print(f"fp16 loss scale at the end: {rows[next(n for n in rows if rows[n]['amp'] == 'fp16')]['loss_scale']}; "
      f"submission written: {result['submission']}")
PY
