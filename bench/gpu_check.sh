#!/usr/bin/env bash
# The GPU checks in one device call (docs/gpu.md). Every step runs and is recorded pass, fail or skip
# with a one-line reason; the summary table (step, status, seconds, note) always ends the output and is
# also written to $OUT/summary.txt; the exit status is 1 when a step failed.
#
#   deps         which of the project's runtime packages import; the missing ones are installed offline
#                from wheels/ when that folder exists. A step whose packages are missing is skipped.
#   1 tests      python -m pytest -q -m gpu tests/
#   2 throughput bench/throughput.py, 224 px, batch 128: resnet26d, convnext_tiny, convnext_small, and
#                convnext_tiny compiled; stacker's train and TTA rates against the synthetic ceiling
#   3 sync       one bf16 epoch of `stacker train-base` (resnet26d, k 2) with STACKER_SYNC_DEBUG=error, so
#                a host synchronisation inside a training step raises: twice, the image cache on the
#                device (gpu_cache_gb auto) and through pinned host memory (gpu_cache_gb 0); pass = both
#                exit 0 (on CUDA also: each run's train images sat where its setting puts them)
#   4 cli        train-base of resnet26d three ways in one run (bf16, fp16 with GradScaler, bf16
#                compiled), predict-oof, fit-stack, submit; per model images/s, valid loss, error, OOF
#                accuracy, fp16's skipped steps and the non-finite batches ($OUT/stacker_cli.json)
#   5 predict    `stacker predict --device cpu` of step 4's run on its test images: submission.csv
#   6 paddy      bench/paddy_scale.py --gpu (skipped when that script is absent)
#
#   bash bench/gpu_check.sh                             # on the device: real sizes, sized for ~8 minutes
#   SMOKE=1 OUT=/tmp/gpucheck bash bench/gpu_check.sh   # anywhere: tiny sizes, a few minutes on 2 CPUs
#   STEPS="3 4 5" bash bench/gpu_check.sh               # some steps only (deps always runs)
#
# Without CUDA (or with SMOKE=1) the steps run in smoke mode: test_resnet at 32 px, a few steps. It
# checks the script and the paths; nothing here is a measurement. BUDGET_S (real 510, smoke 1800) bounds
# the call: every command is stopped at that deadline and a step starting with under 20 s left is
# skipped, so the summary prints inside a 600 s device call.
#
# $OUT (default bench/out) ends with five files at most, as a device call returns at most 8: summary.txt,
# stacker_cli.json, throughput.json, paddy_gpu.json and logs.tar.gz (every step's log, the machine's
# details); runs, data and weights stay in a temporary folder removed at exit.
#
# The device has torch, timm, torchvision, numpy, pandas and scikit-learn; the rest may be missing. Their
# wheels are prepared on a Linux x86-64 machine with internet, for the device's Python (3.12 there, 3.11
# here), dependencies included, and carried to the device in wheels/:
#   pip download --python-version 3.12 --only-binary=:all: -d wheels \
#       pyarrow safetensors pyyaml lightgbm filelock tqdm scipy matplotlib joblib threadpoolctl pytest cleanlab
# pip installs only a wheel whose tag matches the running interpreter (cp312 for 3.12; py3-none-any fits
# any), so wheels for several Pythons may share the folder. Nothing is downloaded: HF_HUB_OFFLINE=1,
# random init, `pip install --no-index`.
set -uo pipefail
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.." || exit 1
mkdir -p "${OUT:=bench/out}/logs" && OUT=$(cd "$OUT" && pwd)
LOGS=$OUT/logs  # packed into $OUT/logs.tar.gz at exit
work=$(mktemp -d)

# pip name:import name of every runtime package (pyproject.toml, the train extra, pytest for step 1)
PACKAGES="numpy:numpy pandas:pandas pyarrow:pyarrow pyyaml:yaml filelock:filelock tqdm:tqdm torch:torch
  torchvision:torchvision timm:timm safetensors:safetensors pillow:PIL scikit-learn:sklearn scipy:scipy
  joblib:joblib threadpoolctl:threadpoolctl lightgbm:lightgbm matplotlib:matplotlib cleanlab:cleanlab pytest:pytest"
CORE="numpy pandas pyarrow pyyaml filelock"               # import oof
TRAIN="$CORE torch torchvision timm safetensors pillow tqdm" # base_models
STACK="$TRAIN scikit-learn scipy joblib threadpoolctl lightgbm cleanlab"  # stacker (the audit: cleanlab): train-base checks its config too
MISSING=""

# ---------------------------------------------------------------- recording

CURRENT=""
finish() {
  local rc=$?
  [ -n "$CURRENT" ] && record "$CURRENT" fail "$(( SECONDS - T0 ))" "interrupted (signal or deadline)"
  echo
  { echo "== summary (${MODE:-unknown} mode$([ "${SMOKE:-}" = 1 ] && echo ': nothing here is a measurement'))"
    cat "$LOGS/machine.txt" 2>/dev/null
    printf '%-11s %-6s %7s  %s\n' step status seconds note
    while IFS=$'\t' read -r name status seconds note; do
      printf '%-11s %-6s %7s  %s\n' "$name" "$status" "$seconds" "$note"
    done < "$work/steps.tsv"
    echo "details: $OUT (summary.txt, the JSON files, logs.tar.gz)"
  } | tee "$OUT/summary.txt"
  tar czf "$OUT/logs.tar.gz" -C "$OUT" logs 2>/dev/null && rm -rf "$LOGS"
  (( rc == 0 )) && grep -q $'\tfail\t' "$work/steps.tsv" && rc=1
  rm -rf "$work"
  exit "$rc"
}
descendants() { local child; for child in $(ps -o pid= --ppid "$1"); do echo "$child"; descendants "$child"; done; }
on_signal() {  # stop this script's own processes, then exit through finish: the summary still prints
  trap - TERM INT HUP
  local pid; for pid in $(descendants $$); do kill -TERM "$pid" 2>/dev/null; done
  exit 143
}
trap finish EXIT
trap on_signal TERM INT HUP
touch "$work/steps.tsv"

record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$work/steps.tsv"; }
note() { echo "$*" > "$work/note"; }        # a step's one-line note (files: steps run in a pipeline)
skip() { note "$*"; echo skip > "$work/status"; }
last_line() { grep -v '^[[:space:]]*$' "$1" | tail -1 | cut -c1-160; }
why() {  # why RC LOG: one line on a failed command, its last error line
  if (( $1 == 124 || $1 == 137 )); then echo "stopped at the BUDGET_S=$BUDGET_S deadline"; return; fi
  echo "exit $1: $( { grep -E 'Error|error:|Exception' "$2" || grep -v '^[[:space:]]*$' "$2"; } | tail -1 | cut -c1-160)"
}
missing_of() { local p out=""; for p in $*; do [[ " $MISSING " == *" $p "* ]] && out+="$p "; done; echo "${out% }"; }

py() {  # python, stopped at the call's deadline
  local left=$(( DEADLINE - SECONDS ))
  timeout -k 15 "$(( left > 1 ? left : 1 ))" python "$@"
}

step() {  # step NUMBER NAME "PACKAGES" FUNCTION: run it unless filtered, out of packages or out of time
  local number=$1 name=$2 deps=$3 fn=$4 missing rc=0 status
  echo; echo "== $number. $name"
  : > "$work/note"; : > "$work/status"
  missing=$(missing_of $deps)
  T0=$SECONDS
  if [[ " 0 ${STEPS:-1 2 3 4 5 6} " != *" $number "* ]]; then skip "not in STEPS"
  elif [ -n "$missing" ]; then skip "needs $missing (not importable; carry their wheels in wheels/)"
  elif (( DEADLINE - SECONDS < 20 )); then skip "under 20 s left of BUDGET_S=$BUDGET_S"
  else
    CURRENT=$name
    echo 143 > "$work/rc"
    { "$fn"; echo $? > "$work/rc"; } 2>&1 | tee "$LOGS/$name.log" &
    wait $!  # in the background: a signal's trap runs at once, not when the step ends
    rc=$(cat "$work/rc")
    CURRENT=""
  fi
  if [ "$(cat "$work/status")" = skip ]; then status=skip
  elif [ "$rc" = 0 ]; then status=pass
  else
    status=fail
    (( rc == 124 || rc == 137 )) && note "stopped at the BUDGET_S=$BUDGET_S deadline; $(cat "$work/note")"
    [ -s "$work/note" ] || note "exit $rc: $(last_line "$LOGS/$name.log")"
  fi
  echo "-- $name: $status  $(cat "$work/note")"
  record "$name" "$status" "$(( SECONDS - T0 ))" "$(cat "$work/note")"
}

# ---------------------------------------------------------------- machine, mode, packages

python - > "$LOGS/machine.txt" 2>&1 <<'PY'
import os, platform, sys
print(f"python {platform.python_version()} (tag cp{sys.version_info[0]}{sys.version_info[1]}, {sys.executable}); "
      f"{os.cpu_count()} CPUs")
try:
    import torch
except Exception as e:  # noqa: BLE001 - a report, not a failure
    sys.exit(print(f"torch: not importable ({type(e).__name__}: {e})"))
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), cuda available: {torch.cuda.is_available()}")
for i in range(torch.cuda.device_count()):
    free, total = torch.cuda.mem_get_info(i)
    major, minor = torch.cuda.get_device_capability(i)
    print(f"cuda:{i} {torch.cuda.get_device_name(i)}, capability {major}.{minor}, "
          f"{free / 2**30:.1f} of {total / 2**30:.1f} GiB free")
PY
if python -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  CUDA=1 SMOKE=${SMOKE:-0}
else
  CUDA=0 SMOKE=${SMOKE:-1}
fi
TAG=$(python -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
workers=$(( $(nproc) > 1 ? $(nproc) - 1 : 1 ))
if [ "$SMOKE" = 1 ]; then
  MODE=smoke BUDGET_S=${BUDGET_S:-1800}
  common=(--size 32 --batch 16 --images 96 --source-size 48 64 --workers 1 --steps 2 --epochs 1 --tta 1)
  bench_models=(test_resnet) compiled_model=""
  arch=test_resnet size=32 images=${IMAGES:-160} batch=16 epochs=2
else
  MODE=real BUDGET_S=${BUDGET_S:-510}
  common=(--size 224 --batch 128 --images 4096 --source-size 640 480 --workers "$workers" --steps 30 --epochs 2
          --tta 4)
  bench_models=(resnet26d convnext_tiny convnext_small) compiled_model=convnext_tiny
  arch=resnet26d size=224 images=${IMAGES:-1000} batch=64 epochs=3
fi
DEADLINE=$(( SECONDS + BUDGET_S ))
echo "== machine ($MODE mode, BUDGET_S=$BUDGET_S)"
cat "$LOGS/machine.txt"
[ "$SMOKE" = 1 ] && echo "smoke mode: $arch at $size px, a few steps; it checks the script and the paths," \
                         "nothing here is a measurement"

step_deps() {
  local spec pip_names=() modules=() pkg
  for spec in $PACKAGES; do pip_names+=("${spec%%:*}") modules+=("${spec#*:}"); done
  find_missing() {
    python - "${pip_names[@]}" -- "${modules[@]}" <<'PY'
import importlib, sys
args = sys.argv[1:]
half, missing = args.index("--"), []
for pip_name, module in zip(args[:half], args[half + 1:]):
    try:
        importlib.import_module(module)
    except Exception:  # noqa: BLE001 - any failure to import is a missing package here
        missing.append(pip_name)
print(" ".join(missing))
PY
  }
  local missing; missing=$(find_missing)
  echo "not importable: ${missing:-none}"
  if [ -n "$missing" ] && [ -d wheels ]; then
    for pkg in $missing; do
      if python -m pip install -q --no-index --find-links wheels "$pkg" > "$work/pip.log" 2>&1 \
         || { grep -q externally-managed "$work/pip.log" && python -m pip install -q --no-index \
              --find-links wheels --break-system-packages "$pkg" > "$work/pip.log" 2>&1; }; then
        echo "pip install $pkg from wheels/: done"
      else
        echo "could not install $pkg from wheels/ (this Python takes $TAG or py3 wheels): $(last_line "$work/pip.log")"
      fi
    done
    missing=$(find_missing)
    echo "after installing: ${missing:-none} missing"
  elif [ -n "$missing" ]; then
    echo "no wheels/ folder: nothing installed"
  fi
  echo "$missing" > "$work/missing"
  if [ -n "$missing" ]; then
    note "missing: $missing ($([ -d wheels ] && echo "no usable wheel in wheels/ for $TAG" || echo "no wheels/ folder");" \
         "the steps needing them are skipped)"
    return 1
  fi
  note "all $(echo $PACKAGES | wc -w) runtime packages import"
}
step 0 deps "" step_deps
MISSING=$(cat "$work/missing" 2>/dev/null)

# ---------------------------------------------------------------- the steps

step_tests() {
  py -m pytest -q -p no:cacheprovider -m gpu tests/ > "$work/pytest.log" 2>&1
  local rc=$?
  tail -15 "$work/pytest.log"
  note "$(last_line "$work/pytest.log" | tr -d '=' | sed 's/^ *//; s/ *$//')"
  return $rc
}
step 1 tests "$STACK pytest" step_tests

step_throughput() {
  local model failed=0 runs=()
  for model in "${bench_models[@]}"; do
    echo "-- $model"
    py bench/throughput.py --model "$model" "${common[@]}" --out "$work/throughput/$model" | tail -9 \
      && runs+=("$work/throughput/$model") || failed=1
  done
  if [ -n "$compiled_model" ]; then
    echo "-- $compiled_model, compiled"
    py bench/throughput.py --model "$compiled_model" "${common[@]}" --compile \
      --out "$work/throughput/${compiled_model}_compiled" | tail -10 \
      && runs+=("$work/throughput/${compiled_model}_compiled") || failed=1
  fi
  python - "$work/note" "$OUT/throughput.json" "${runs[@]}" <<'PY'
import json, sys
from pathlib import Path
results = {folder.name: json.loads((folder / "throughput.json").read_text()) for folder in map(Path, sys.argv[3:])}
Path(sys.argv[2]).write_text(json.dumps(results, indent=2))
parts = [f"{name} {r['train_stacker']['images_per_second']:.0f} img/s "
         f"({r['train_stacker']['images_per_second'] / r['train_ceiling']:.2f} of ceiling)" for name, r in results.items()]
Path(sys.argv[1]).write_text("; ".join(parts) + "\n")
PY
  (( failed == 0 )) || note "a run failed (log above); $(cat "$work/note")"
  return $failed
}
step 2 throughput "$TRAIN" step_throughput

digits() {  # the digits dataset at $size px, written once into $work/data for steps 3 to 5
  py - "$work/data" "$size" "$images" <<'PY'
import sys
from base_models.demo_data import write_digits_dataset
write_digits_dataset(sys.argv[1], size=int(sys.argv[2]), n_images=int(sys.argv[3]))
PY
}

run_yaml() {  # run_yaml FILE RUN_DIR EPOCHS "EXTRA TRAIN KEYS" MODEL...: a run.yaml on the digits
  local file=$1 run=$2 n_epochs=$3 extra=$4; shift 4
  { echo "run_dir: $run"
    echo "data: {root: $work/data}"
    echo "folds: {k: 2, seed: 42}"
    echo "train: {size: $size, epochs: $n_epochs, batch_size: $batch, lr: 0.002, freeze_epochs: 0$extra}"
    echo "models:   # random init (no pretrained file): nothing is downloaded"
    printf '  - %s\n' "$@"
    echo "tta: {n: 2}"
  } > "$file"
}

images_per_second() {  # RUN MODEL: its images/s, the mean of its folds' last epochs
  py - "$1" "$2" <<'PY'
import sys
from oof import RunPaths, read_json
paths, model = RunPaths(sys.argv[1]), sys.argv[2]
last = [read_json(paths.history(model, k))["epochs"][-1] for k in range(2)]
print(f"{sum(e.get('images_per_second', 0) for e in last) / len(last):.0f}")
PY
}

step_sync() {
  digits || { note "writing the digits dataset failed"; return 1; }
  local cache expect log rc failed=0 parts=()
  for cache in auto 0; do
    log="$LOGS/sync_gpu_cache_gb_$cache.log"
    run_yaml "$work/sync_$cache.yaml" "$work/sync_$cache" 1 ", gpu_cache_gb: $cache" \
      "{name: ${arch}_sync, arch: $arch, amp: bf16}"
    echo "-- gpu_cache_gb: $cache, STACKER_SYNC_DEBUG=error"
    ( export STACKER_SYNC_DEBUG=error; py cli.py train-base --config "$work/sync_$cache.yaml" ) > "$log" 2>&1
    rc=$?
    grep -E "gpu cache budget|train images:" "$log" | sort -u
    if (( rc != 0 )); then
      tail -20 "$log"; failed=1; parts+=("gpu_cache_gb $cache: $(why $rc "$log")"); continue
    fi
    expect=$([ "$cache" = auto ] && echo "gpu memory" || echo "pinned host memory")
    if (( CUDA )) && ! grep "train images:" "$log" | grep -q "$expect"; then
      failed=1; parts+=("gpu_cache_gb $cache: train images not in $expect"); continue
    fi
    parts+=("gpu_cache_gb $cache: exit 0, $(images_per_second "$work/sync_$cache" "${arch}_sync") img/s")
  done
  (( CUDA )) || parts+=("CPU: the sync mode applies on CUDA only, paths checked")
  note "$(IFS=';'; echo "${parts[*]}" | sed 's/;/; /g')"
  return $failed
}
step 3 sync "$STACK" step_sync

step_cli() {
  digits || { note "writing the digits dataset failed"; return 1; }
  run_yaml "$work/run.yaml" "$work/run" "$epochs" "" "{name: ${arch}_bf16, arch: $arch, amp: bf16}" \
    "{name: ${arch}_fp16, arch: $arch, amp: fp16}" "{name: ${arch}_bf16_compiled, arch: $arch, amp: bf16, compile: true}"
  echo "-- $arch at $size px on $images digits, $epochs epochs, k 2: amp bf16 / fp16 / bf16 compiled"
  local stage log rc
  for stage in train-base predict-oof fit-stack submit; do
    log="$LOGS/cli_$stage.log"
    if [ "$stage" = train-base ]; then
      py cli.py train-base --config "$work/run.yaml"
    else
      py cli.py "$stage" --run "$work/run"
    fi > "$log" 2>&1
    rc=$?
    (( rc == 0 )) || { tail -20 "$log"; note "$stage: $(why $rc "$log")"; return 1; }
    grep -vE "epoch +[0-9]+/" "$log" | tail -6  # each job's last epoch only
  done
  py - "$work/run" "$OUT/stacker_cli.json" "$work/note" "$arch" <<'PY'
import json, sys
from pathlib import Path
from oof import RunPaths, read_json
paths, out, note, arch = RunPaths(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), sys.argv[4]
rows = {}
for model in paths.predicted_models():
    runs = [read_json(paths.history(model, k)) for k in range(2)]
    every = [e for r in runs for e in r["epochs"]]
    last = [r["epochs"][-1] for r in runs]
    mean = lambda key: sum(e.get(key, 0) for e in last) / len(last)  # noqa: E731
    rows[model] = {"amp": runs[0].get("amp"), "device": runs[0].get("device_name"),
                   "images_per_second": mean("images_per_second"), "valid_loss": mean("valid_loss"),
                   "error_rate": mean("error_rate"), "loss_scale": [e.get("loss_scale") for e in last],
                   "skipped_steps": sum(e.get("skipped_steps", 0) for e in every),
                   "nonfinite_batches": sum(e.get("nonfinite_batches", 0) for e in every),
                   "oof_accuracy": read_json(paths.predict_metrics(model)).get("accuracy", float("nan"))}
result = {"models": rows, "submission": paths.submission.is_file()}
Path(out).write_text(json.dumps(result, indent=2))
print(f"{'model':<28}{'amp':>6}{'images/s':>10}{'valid_loss':>12}{'error':>8}{'OOF acc':>9}{'skipped':>9}"
      f"{'nonfinite':>10}  device")
for name, r in rows.items():
    print(f"{name:<28}{r['amp']:>6}{r['images_per_second']:>10.1f}{r['valid_loss']:>12.4f}{r['error_rate']:>8.3f}"
          f"{r['oof_accuracy']:>9.3f}{r['skipped_steps']:>9d}{r['nonfinite_batches']:>10d}  {r['device']}")
fp16 = [r for r in rows.values() if r["amp"] == "fp16"]
print(f"fp16 loss scale at the end of each fold: {fp16[0]['loss_scale'] if fp16 else None}; "
      f"submission written: {result['submission']}")
note.write_text("; ".join(f"{n.removeprefix(arch + '_')} {r['images_per_second']:.0f} img/s, acc {r['oof_accuracy']:.2f}, "
                          f"skipped {r['skipped_steps']}, nonfinite {r['nonfinite_batches']}" for n, r in rows.items())
                + f"; submission {'written' if result['submission'] else 'MISSING'}\n")
sys.exit(0 if result["submission"] and rows else 1)
PY
}
step 4 cli "$STACK matplotlib" step_cli

step_predict() {
  grep -q $'^cli\tpass\t' "$work/steps.tsv" || { skip "needs step 4's finished run"; return 0; }
  local log="$LOGS/predict_cpu.log"
  py cli.py predict --run "$work/run" --images "$work/data/test_images" \
    --sample-submission "$work/data/sample_submission.csv" --out "$work/pred" --device cpu > "$log" 2>&1
  local rc=$?
  (( rc == 0 )) || { tail -20 "$log"; note "$(why $rc "$log")"; return 1; }
  tail -4 "$log"
  [ -f "$work/pred/submission.csv" ] || { note "exit 0 but no $work/pred/submission.csv"; return 1; }
  py - "$work/run" "$work/pred/submission.csv" "$work/note" <<'PY'
import sys
from pathlib import Path
import pandas as pd
from oof import RunPaths
cuda = pd.read_csv(RunPaths(sys.argv[1]).submission, dtype=str)
cpu = pd.read_csv(sys.argv[2], dtype=str)
same = (cuda.iloc[:, 1] == cpu.iloc[:, 1]).mean() if cuda.iloc[:, 0].equals(cpu.iloc[:, 0]) else float("nan")
line = f"submission.csv of {len(cpu)} rows; same label as step 4's submit on {same:.1%} of them"
print(line)
Path(sys.argv[3]).write_text(line + "\n")
PY
}
step 5 predict "$STACK" step_predict

step_paddy() {
  [ -f bench/paddy_scale.py ] || { skip "bench/paddy_scale.py does not exist"; return 0; }
  local flags=(--gpu)
  [ "$SMOKE" = 1 ] && flags+=(--smoke)
  (( CUDA )) || flags+=(--device cpu)
  py bench/paddy_scale.py "${flags[@]}" --out "$work/paddy" --data "$work/paddy_data" > "$LOGS/paddy_run.log" 2>&1
  local rc=$?
  cp "$work"/paddy/*.json "$OUT/" 2>/dev/null  # its runs hold weights: only the results come back
  cp -r "$work/paddy/logs" "$LOGS/paddy" 2>/dev/null
  tail -25 "$LOGS/paddy_run.log"
  if (( rc == 0 )); then note "paddy_scale.py ${flags[*]}: $(last_line "$LOGS/paddy_run.log")"
  else note "paddy_scale.py ${flags[*]}: $(why $rc "$LOGS/paddy_run.log")"; fi
  return $rc
}
step 6 paddy "$STACK" step_paddy
