"""Fault bench: kill the pipeline with SIGKILL at random moments, rerun, and compare with an unkilled run.

    python bench/faults.py [--kills 20] [--seed 0] [--out DIR] [--keep]

A reference run of a tiny grid (test_resnet and test_efficientnet, 3 folds, 3
epochs at 16 px on 300 digits, TTA, the full stack guard, a submission) runs
the four stages as real `stacker` processes. Then each trial starts from the
reference's state just before one stage (the stages are dealt to the trials in
turn), starts that stage, kills it with SIGKILL after a random share of the
time it took in the reference (from the cache build at the very start of
train-base to the last atomic rename), reruns the same command until it exits 0,
runs the stages after it, and compares every artifact with the reference:

- weights: the tensors, bit for bit;
- prediction tables (OOF, test, per-fold test, the stack's): ids equal,
  probabilities equal to 1e-6;
- decision.json (every field) and submission.csv (bytes);
- nothing stale or lost: no temporary file, no checkpoint of a finished job, no
  file the reference lacks, no file missing.

It prints a table of kills per stage, reruns needed and mismatches, and exits 1
on any mismatch or on a rerun that fails (a stage that cannot resume).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from base_models.demo_data import write_digits_dataset  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
STAGES = ("train-base", "predict-oof", "fit-stack", "submit")
MAX_RERUNS = 5
TOLERANCE = 1e-6  # float tables: bit-stable on CPU, but a sum order may differ in the last place


def grid_config(data: Path, run: Path) -> dict:
    return {"run_dir": str(run), "data": {"root": str(data)}, "folds": {"k": 3, "seed": 1},
            "train": {"size": 16, "epochs": 3, "batch_size": 32, "lr": 0.01, "device": "cpu"},
            "models": [{"arch": "test_resnet"}, {"arch": "test_efficientnet"}],
            "tta": {"n": 2}, "stack": {"n_bootstrap": 200}}


def stage_command(stage: str, config: Path, run: Path) -> list[str]:
    where = ["--config", str(config)] if stage == "train-base" else ["--run", str(run)]
    return [sys.executable, "-m", "stacker_cli", stage, *where]


def run_stage(stage: str, config: Path, run: Path, kill_after: float | None = None) -> tuple[int, float]:
    """(exit code, seconds) of one stage; SIGKILL after `kill_after` seconds when given."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    # Its own process group: the kill takes the stage's decode workers too, as a dying machine or
    # notebook kernel would (an orphaned worker would also hold the pipe open).
    proc = subprocess.Popen(stage_command(stage, config, run), cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=kill_after)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return -9, time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(f"  {stage} exited {proc.returncode}: {err.strip().splitlines()[-1:]}\n")
    return proc.returncode, time.perf_counter() - t0



def reference_run(work: Path, data: Path) -> tuple[Path, dict[str, Path], dict[str, float]]:
    """The unkilled run, with a snapshot of the run directory before each stage and each stage's seconds."""
    run, snapshots, seconds = work / "reference", {}, {}
    config = write_config(work / "reference.yaml", data, run)
    for stage in STAGES:
        snapshots[stage] = work / f"before-{stage}"
        copy_run(run, snapshots[stage])
        code, seconds[stage] = run_stage(stage, config, run)
        if code != 0:
            raise SystemExit(f"reference run: {stage} failed ({code})")
    return run, snapshots, seconds


def write_config(path: Path, data: Path, run: Path) -> Path:
    path.write_text(yaml.safe_dump(grid_config(data, run), sort_keys=False))
    return path


def copy_run(src: Path, dst: Path) -> None:
    shutil.rmtree(dst, ignore_errors=True)
    if src.exists():
        shutil.copytree(src, dst)
    else:
        dst.mkdir(parents=True)


def trial(work: Path, data: Path, stage: str, snapshot: Path, delay: float) -> dict:
    """Kill `stage` after `delay` s, rerun it until it succeeds, run the rest; return the outcome."""
    run = work / "trial"
    copy_run(snapshot, run)
    config = write_config(work / "trial.yaml", data, run)
    code, _ = run_stage(stage, config, run, kill_after=delay)
    killed, reruns = code == -9, 0
    while code != 0 and reruns < MAX_RERUNS:
        reruns += 1
        code, _ = run_stage(stage, config, run)
    failed = code != 0
    for later in STAGES[STAGES.index(stage) + 1:]:
        if failed:
            break
        failed = run_stage(later, config, run)[0] != 0
    return {"stage": stage, "killed": killed, "reruns": reruns, "failed": failed, "run": run}


def artifacts(run: Path) -> dict[str, Path]:
    """Every file of a run by its path relative to the run, less what legitimately differs between runs."""
    skip = {"run.yaml", "report.txt"}  # run.yaml names its own folder; report.txt holds fit seconds
    return {str(p.relative_to(run)): p for p in sorted(run.rglob("*"))
            if p.is_file() and p.name not in skip and "logs" not in p.relative_to(run).parts}


def compare(reference: Path, run: Path) -> list[str]:
    """Mismatches between a trial's run directory and the reference's, one line each."""
    want, have = artifacts(reference), artifacts(run)
    problems = [f"missing {name}" for name in sorted(set(want) - set(have))]
    problems += [f"extra {name}" for name in sorted(set(have) - set(want))]
    for name in sorted(set(want) & set(have)):
        if not same_file(want[name], have[name]):
            problems.append(f"differs {name}")
    return problems


def same_file(a: Path, b: Path) -> bool:
    if a.read_bytes() == b.read_bytes():
        return True
    if a.suffix == ".parquet":
        return same_table(a, b)
    if a.name == "decision.json" or a.name == "metrics.json" or a.name.endswith(".history.json"):
        return same_json(json.loads(a.read_text()), json.loads(b.read_text()))
    return False


def same_table(a: Path, b: Path) -> bool:
    x, y = pd.read_parquet(a), pd.read_parquet(b)
    if list(x.columns) != list(y.columns) or len(x) != len(y) or not x["id"].equals(y["id"]):
        return False
    numbers = [c for c in x.columns if c != "id"]
    return np.allclose(x[numbers].to_numpy(float), y[numbers].to_numpy(float), rtol=0, atol=TOLERANCE)


# Fields that measure time, not results: they differ between any two runs.
TIMING_KEYS = {"seconds", "train_seconds", "images_per_second", "setup", "train", "evaluate", "checkpoint", "save"}


def same_json(a, b, key: str = "") -> bool:
    if key in TIMING_KEYS:
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_json(a[k], b[k], k) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_json(x, y, key) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= TOLERANCE
    return a == b


def print_table(results: list[dict]) -> None:
    print(f"\n{'stage':<13}{'kills':>6}{'killed':>8}{'reruns':>8}{'max':>5}{'failed':>8}{'mismatch':>10}")
    for stage in STAGES:
        rows = [r for r in results if r["stage"] == stage]
        reruns = [r["reruns"] for r in rows] or [0]
        print(f"{stage:<13}{len(rows):>6}{sum(r['killed'] for r in rows):>8}{sum(reruns):>8}{max(reruns):>5}"
              f"{sum(r['failed'] for r in rows):>8}{sum(bool(r['problems']) for r in rows):>10}")
    for r in results:
        for line in r["problems"][:5]:
            print(f"  {r['stage']} after {r['delay']:.1f}s: {line}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="work folder (default: a temporary one, removed unless --keep)")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args(argv)
    work = Path(args.out or tempfile.mkdtemp(prefix="stacker-faults-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    data = write_digits_dataset(work / "data", size=16, n_images=300)
    t0 = time.perf_counter()
    reference, snapshots, seconds = reference_run(work, data)
    print("reference run: " + ", ".join(f"{s} {seconds[s]:.1f}s" for s in STAGES))
    rng, results = random.Random(args.seed), []
    for i in range(args.kills):
        stage = STAGES[i % len(STAGES)]
        delay = rng.uniform(0.05, 1.0) * seconds[stage]
        outcome = trial(work, data, stage, snapshots[stage], delay)
        outcome.update(delay=delay, problems=["a rerun failed"] if outcome["failed"] else
                       compare(reference, outcome.pop("run")))
        outcome.pop("run", None)
        results.append(outcome)
        status = "ok" if not outcome["problems"] else "; ".join(outcome["problems"][:2])
        print(f"kill {i + 1:>2}/{args.kills}: {stage} after {delay:.1f}s, {outcome['reruns']} rerun(s): {status}")
    print_table(results)
    print(f"\n{len(results)} kills in {time.perf_counter() - t0:.0f}s")
    if not args.keep and not args.out:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if any(r["problems"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
