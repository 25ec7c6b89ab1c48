"""Fault bench: kill the pipeline with SIGKILL at random moments, rerun, and compare with an unkilled run.

    python bench/faults.py [--kills 20 | --short] [--seed 0] [--out DIR] [--keep]

A reference run of a tiny grid (test_resnet and test_efficientnet, 3 folds, 3
epochs at 16 px on 300 digits, TTA, the full stack guard, a submission) runs
the four stages as real `stacker` processes. Then each trial starts from the
reference's state just before one stage (the stages are dealt to the trials in
turn), starts that stage, kills it with SIGKILL after a random share of the time
it took in the reference (the whole process: its imports, the cache build at the
very start of train-base, ..., the last atomic rename), reruns the same command
until it exits 0, runs the stages after it, and compares every artifact with the
reference on what must match:

- weights: the tensors, bit for bit (the files' bytes);
- prediction tables (OOF, test, per-fold test, the stack's): ids and columns
  equal, probabilities equal to 1e-6, metadata field by field as JSON below;
- JSON (decision.json, metrics.json, histories, the submission's record): every
  field, floats to 1e-6, except times (a key `seconds` or ending in `_seconds`
  or `_per_second`) and digests (`sha256`, `*_sha256`), which may differ only
  where both name the same artifact of their run (a table rewritten with new
  timings in its metadata), that artifact being compared on its own;
- history.csv: every column but the times equal, the epoch column exactly the
  reference's (no epoch lost or doubled);
- logs (a job's `fold<k>.log`, `logs/<stage>.log`): the reference's lines (a
  stage log's records) all appear, in order, in the trial's log, which also
  holds the killed attempt's lines; lines are compared with their timestamps,
  dates, durations ("0.3s", "1m12s", "0.0 s"), rates ("62 images/s"), the run's
  folder and the numbers under a seconds column ("fit s") masked; the job
  grid's progress lines ("job 4/6, 2.0s so far") count the invocation's own
  jobs and are not required, nor are a job's epoch lines, which follow the
  epoch's checkpoint (a kill between the two keeps the epoch without its line)
  and whose figures history.csv holds;
- stack/report.txt: equal line for line after the same masking;
- report.html: byte for byte the page `stacker.html_report` renders from the
  trial's own files now (the run's folder masked), so it was made from the files
  compared above and not from a killed attempt's;
- everything else (submission.csv, run.yaml, folds, the cache, leaderboard):
  bytes;
- nothing stale or lost: no temporary file, no checkpoint of a finished job, no
  file the reference lacks, no file missing.

It prints a table of kills per stage, reruns needed and mismatches, with each
mismatch's first difference, and exits 1 on any mismatch or on a rerun that
fails (a stage that cannot resume). `--short` (for CI) kills each stage once,
in its work: between its first and last log records in the reference (see
`kill_delay`). `--keep` keeps the work folder with every trial's run directory
(trial-<n>-<stage>).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from base_models.demo_data import write_digits_dataset  # noqa: E402
from oof import RunPaths, file_digest, read_json  # noqa: E402
from stacker.html_report import build_report  # noqa: E402
from stacker.provenance import decision_digest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
STAGES = ("train-base", "predict-oof", "fit-stack", "submit")
MODELS = ("test_resnet", "test_efficientnet")
K = 3
MAX_RERUNS = 5
TOLERANCE = 1e-6  # float tables: bit-stable on CPU, but a sum order may differ in the last place


def grid_config(data: Path, run: Path) -> dict:
    return {"run_dir": str(run), "data": {"root": str(data)}, "folds": {"k": K, "seed": 1},
            "train": {"size": 16, "epochs": 3, "batch_size": 32, "lr": 0.01, "device": "cpu"},
            "models": [{"arch": m} for m in MODELS], "tta": {"n": 2}, "stack": {"n_bootstrap": 200}}


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


class StageTime(NamedTuple):
    """A reference stage's timing, in seconds from its process's start."""

    seconds: float  # to its exit
    first: float  # its first log record
    last: float  # its last log record: its work is done (the rest is the interpreter's exit)


def reference_run(work: Path, data: Path) -> tuple[Path, dict[str, Path], dict[str, StageTime]]:
    """The unkilled run, with a snapshot of the run directory before each stage and each stage's timing."""
    run, snapshots, times = work / "reference", {}, {}
    config = write_config(work / "reference.yaml", data, run)
    for stage in STAGES:
        snapshots[stage] = work / f"before-{stage}"
        copy_run(run, snapshots[stage])
        started = time.time()
        code, seconds = run_stage(stage, config, run)
        if code != 0:
            raise SystemExit(f"reference run: {stage} failed ({code})")
        stamps = log_stamps(RunPaths(run).stage_log(stage), started)
        times[stage] = StageTime(seconds, stamps[0], stamps[-1])
    return run, snapshots, times


def log_stamps(log: Path, since: float) -> list[float]:
    """The stage log's record times, in seconds after the time.time() `since`."""
    lines = log.read_text(encoding="utf-8").splitlines()
    return [datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp() - since for line in lines
            if STAMP.match(line)]


def kill_delay(rng: random.Random, stage: StageTime, short: bool) -> float:
    """When a trial kills the stage: after a random share of its seconds; with `short`, between its first and
    last log records, the last quarter of its seconds before its last record at least, so the kill lands in its
    work rather than in its imports or its exit (a quarter: submit's one record comes after its writes)."""
    if not short:
        return rng.uniform(0.05, 1.0) * stage.seconds
    return rng.uniform(max(0.0, min(stage.first, stage.last - 0.25 * stage.seconds)), stage.last)


def write_config(path: Path, data: Path, run: Path) -> Path:
    path.write_text(yaml.safe_dump(grid_config(data, run), sort_keys=False))
    return path


def copy_run(src: Path, dst: Path) -> None:
    shutil.rmtree(dst, ignore_errors=True)
    if src.exists():
        shutil.copytree(src, dst)
    else:
        dst.mkdir(parents=True)


def trial(work: Path, data: Path, stage: str, snapshot: Path, delay: float, name: str) -> dict:
    """Kill `stage` after `delay` s, rerun it until it succeeds, run the rest; return the outcome."""
    run = work / name
    copy_run(snapshot, run)
    config = write_config(work / f"{name}.yaml", data, run)
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


# ---------------------------------------------------------------- comparing two run directories

@dataclass(frozen=True)
class Runs:
    """The reference's and a trial's run directories, and each one's artifacts by digest (sha256 of a file's
    bytes; decision.json also by `decision_digest`, the digest the stack's records use)."""

    reference: Path
    trial: Path
    named: tuple[dict[str, str], dict[str, str]]

    @classmethod
    def of(cls, reference: Path, trial: Path) -> Runs:
        return cls(reference, trial, (digest_names(reference), digest_names(trial)))

    def texts(self, name: str) -> tuple[str, str]:
        return (self.reference / name).read_text(encoding="utf-8"), (self.trial / name).read_text(encoding="utf-8")

    def same_artifact(self, a: str, b: str) -> bool:
        """Digests `a` (the reference's) and `b` (the trial's) name the same artifact of their runs."""
        return a == b or (self.named[0].get(a) is not None and self.named[0].get(a) == self.named[1].get(b))

    def mask_folders(self, text: str) -> str:
        """The run's folder, as a path and as the report's title names it ("work/trial-3-submit"), as <run>."""
        for root in (self.reference, self.trial):
            text = text.replace(str(root), "<run>").replace(f"{root.parent.name}/{root.name}", "<run>")
        return text


def digest_names(run: Path) -> dict[str, str]:
    names = {file_digest(p): str(p.relative_to(run)) for p in sorted(run.rglob("*")) if p.is_file()}
    decision = RunPaths(run).decision
    if decision.is_file():
        names[decision_digest(read_json(decision))] = str(decision.relative_to(run))
    return names


def artifacts(run: Path) -> dict[str, Path]:
    """Every file of a run by its path relative to the run."""
    return {str(p.relative_to(run)): p for p in sorted(run.rglob("*")) if p.is_file()}


def compare(reference: Path, run: Path) -> list[str]:
    """Mismatches between a trial's run directory and the reference's, one line each."""
    want, have = artifacts(reference), artifacts(run)
    problems = [f"missing {name}" for name in sorted(set(want) - set(have))]
    problems += [f"extra {name}" for name in sorted(set(have) - set(want))]
    runs, rules = Runs.of(reference, run), artifact_rules(reference)
    for name in sorted(set(want) & set(have)):
        rule = rules.get(name, table_difference if name.endswith(".parquet") else None)
        # The report is checked against the trial's own files: the reference's bytes there prove nothing.
        if rule is not report_difference and want[name].read_bytes() == have[name].read_bytes():
            continue
        difference = rule(runs, name) if rule else "bytes differ"
        if difference:
            problems.append(f"differs {name}: {difference}")
    return problems


def artifact_rules(run: Path) -> dict[str, Callable[[Runs, str], str | None]]:
    """The rule of each artifact compared on more than its bytes, by its path relative to the run (tables,
    found by suffix, aside)."""
    paths = RunPaths(run)
    rules = {paths.stage_log(s): log_difference for s in STAGES}
    for model in MODELS:
        rules[paths.predict_metrics(model)] = json_file_difference
        for fold in range(K):
            rules[paths.history(model, fold)] = json_file_difference
            rules[paths.history_csv(model, fold)] = history_difference
            rules[paths.job_log(model, fold)] = log_difference
    rules.update({paths.decision: json_file_difference, paths.submission_record: json_file_difference,
                  paths.stack_report: text_difference, paths.report: report_difference})
    return {str(p.relative_to(run)): rule for p, rule in rules.items()}


# Keys and columns that measure time, not results: they differ between any two runs.
TIMING = re.compile(r"(^|_)seconds$|_per_second$")


def is_digest(key: str) -> bool:
    return key == "sha256" or key.endswith("_sha256")


def json_difference(a, b, runs: Runs, where: str = "", key: str = "") -> str | None:
    """Where two JSON values first differ ("candidates.mean.score: 0.5 vs 0.6"), times aside and digests
    compared by what they name; None when they match."""
    if TIMING.search(key):
        return None
    if is_digest(key) and isinstance(a, str) and isinstance(b, str):
        return None if runs.same_artifact(a, b) else f"{where}: {a[:12]}... vs {b[:12]}..., not one artifact's"
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return f"{where or 'keys'}: keys {sorted(a.keys() ^ b.keys())} in one only"
        parts = [(a[k], b[k], f"{where}.{k}".lstrip("."), k) for k in a]
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return f"{where}: {len(a)} vs {len(b)} items"
        parts = [(x, y, f"{where}[{i}]", key) for i, (x, y) in enumerate(zip(a, b))]
    elif isinstance(a, float) and isinstance(b, float):
        return None if abs(a - b) <= TOLERANCE else f"{where}: {a!r} vs {b!r}"
    else:
        return None if a == b else f"{where}: {a!r} vs {b!r}"
    return next((d for x, y, at, k in parts if (d := json_difference(x, y, runs, at, k))), None)


def json_file_difference(runs: Runs, name: str) -> str | None:
    return json_difference(*(json.loads(t) for t in runs.texts(name)), runs)


def table_difference(runs: Runs, name: str) -> str | None:
    """Ids and columns equal, numbers to TOLERANCE, the stacker metadata as JSON."""
    x, y = (pd.read_parquet(root / name) for root in (runs.reference, runs.trial))
    if list(x.columns) != list(y.columns) or len(x) != len(y) or not x["id"].equals(y["id"]):
        return f"columns {list(x.columns)} vs {list(y.columns)}, {len(x)} vs {len(y)} rows, or other ids"
    numbers = [c for c in x.columns if c != "id"]
    gap = np.abs(x[numbers].to_numpy(float) - y[numbers].to_numpy(float))
    apart = np.argwhere(~(gap <= TOLERANCE))  # NaN included
    if len(apart):
        row, col = apart[0]
        return f"id {x['id'].iloc[row]} column {numbers[col]}: {gap[row, col]:.3g} apart ({len(apart)} cells)"
    meta = [json.loads((pq.read_schema(root / name).metadata or {}).get(b"stacker", b"{}"))
            for root in (runs.reference, runs.trial)]
    return json_difference(*meta, runs, "metadata")


def history_difference(runs: Runs, name: str) -> str | None:
    """Every column but the times equal; the epoch column exactly the reference's."""
    want, have = (pd.read_csv(root / name) for root in (runs.reference, runs.trial))
    if list(want.columns) != list(have.columns):
        return f"columns {list(want.columns)} vs {list(have.columns)}"
    if want["epoch"].tolist() != have["epoch"].tolist():
        return f"epochs {want['epoch'].tolist()} vs {have['epoch'].tolist()}"
    for column in (c for c in want.columns if not TIMING.search(c)):
        if not want[column].equals(have[column]):
            row = int(np.flatnonzero(want[column].astype(str) != have[column].astype(str))[0])
            return f"epoch {want['epoch'].iloc[row]} {column}: {want[column].iloc[row]} vs {have[column].iloc[row]}"
    return None


def report_difference(runs: Runs, name: str) -> str | None:
    """The trial's page is the one its own files render now (the run's folder masked)."""
    page, _ = build_report(runs.trial)
    stored = runs.texts(name)[1]
    if runs.mask_folders(page) == runs.mask_folders(stored):
        return None
    at = next(i for i, (x, y) in enumerate(zip(runs.mask_folders(page), runs.mask_folders(stored))) if x != y)
    return f"not the page the trial's files render (from character {at}: {stored[at:at + 60]!r})"


# ---------------------------------------------------------------- logs and texts, masked

STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (\w+) ")  # a stage log's asctime and level
DURATION = re.compile(r"(?<![\w.])(\d+h)?(\d+m)?\d+(\.\d+)?( ?m?s)\b")  # 0.3s, 1m12s, 0.0 s, 12ms
DATE = re.compile(r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d(:\d\d([.,]\d+)?)?")  # 2026-11-27 16:38:20,287
RATE = re.compile(r"(?<![\w.])\d+(\.\d+)? ?[\w]*/s\b")  # 62 images/s, 3.1 it/s
SECONDS_TITLE = re.compile(r"(?:(?<=\s\s)|^)[A-Za-z]\w* s(?=\s\s|$)")  # a table's seconds column: "fit s"
PROGRESS = re.compile(r"^\w+ \d+/\d+, <t> so far")  # GridProgress: "job 4/6, 2.0s so far, ETA 1.1s (...)"
# A job's epoch line ("  test_resnet fold 2 epoch  2/3  16x16  train_loss ..."): written after the epoch's
# checkpoint, so a kill between the two keeps the epoch and loses its line; history.csv holds every epoch
# (history_difference compares each one, none lost or doubled).
EPOCH_LINE = re.compile(r"^\s*\S+ (repeat \d+ )?fold \d+ epoch +\d+/\d+ ")


class Record(NamedTuple):
    line: int  # where it starts in its file, 1-based
    level: str  # a stage log's level name ("INFO"); "" in a job log
    text: str  # its lines, masked


def masked_lines(lines: list[str], runs: Runs) -> list[str]:
    """Lines with their times masked: under a seconds column's title the number ending where it ends, until
    a blank line; then dates, durations, rates and the run's folder anywhere."""
    out, ends = [], []
    for line in lines:
        titles = [m.end() for m in SECONDS_TITLE.finditer(line)]
        if titles:
            ends = titles
        elif not line.strip():
            ends = []
        for end in ends if not titles else ():
            if len(line) >= end and line[end:end + 1] in ("", " ") and line[end - 1:end] != " ":
                line = re.sub(r"\S+$", "<t>", line[:end]) + line[end:]
        line = RATE.sub("<rate>", DURATION.sub("<t>", DATE.sub("<date>", runs.mask_folders(line))))
        out.append(line)
    return out


def log_records(text: str, runs: Runs) -> list[Record]:
    """A log's records, masked: in a stage log each starts at a timestamp (dropped, the level kept) and the
    lines after it continue it; in a job log each line is one."""
    lines = text.splitlines()
    stamped = any(STAMP.match(line) for line in lines)
    starts = [i for i, line in enumerate(lines) if STAMP.match(line) or not stamped]
    records = []
    for start, end in zip(starts, starts[1:] + [len(lines)]):
        stamp = STAMP.match(lines[start])
        first = lines[start][stamp.end():] if stamp else lines[start]
        body = masked_lines([first, *lines[start + 1:end]], runs)
        records.append(Record(start + 1, stamp.group(1) if stamp else "", "\n".join(body)))
    return records


def log_difference(runs: Runs, name: str) -> str | None:
    """The reference's records (less the grid's progress lines and the epoch lines, which history.csv
    checks) appear in order among the trial's."""
    want, have = (log_records(text, runs) for text in runs.texts(name))
    said, at = [(r.level, r.text) for r in have], 0
    for record in want:
        if PROGRESS.match(record.text) or EPOCH_LINE.match(record.text):
            continue
        try:
            at = said.index((record.level, record.text), at) + 1
        except ValueError:
            return f"the reference's line {record.line} ({record.text[:80]!r}) is missing or out of order"
    return None


def text_difference(runs: Runs, name: str) -> str | None:
    """Equal line for line, times masked."""
    want, have = (masked_lines(text.splitlines(), runs) for text in runs.texts(name))
    for i, (x, y) in enumerate(zip(want, have)):
        if x != y:
            return f"line {i + 1}: {x[:60]!r} vs {y[:60]!r}"
    return None if len(want) == len(have) else f"{len(want)} vs {len(have)} lines"


# ---------------------------------------------------------------- the bench

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


def run_trials(work: Path, data: Path, kills: int, seed: int, short: bool, keep: bool) -> list[dict]:
    """`kills` trials after one reference run, the stages dealt in turn, each killed at a `kill_delay`; each trial's
    run removed unless `keep`."""
    reference, snapshots, times = reference_run(work, data)
    print("reference run: " + ", ".join(f"{s} {times[s].seconds:.1f}s (log {times[s].first:.1f}-{times[s].last:.1f}s)"
                                        for s in STAGES), flush=True)
    rng, results = random.Random(seed), []
    for i in range(kills):
        stage = STAGES[i % len(STAGES)]
        delay = kill_delay(rng, times[stage], short)
        outcome = trial(work, data, stage, snapshots[stage], delay, f"trial-{i + 1}-{stage}")
        run = outcome.pop("run")
        outcome.update(delay=delay, problems=["a rerun failed"] if outcome["failed"] else compare(reference, run))
        if not keep:
            shutil.rmtree(run, ignore_errors=True)
        results.append(outcome)
        status = "ok" if not outcome["problems"] else "; ".join(outcome["problems"][:2])
        print(f"kill {i + 1:>2}/{kills}: {stage} after {delay:.1f}s, {outcome['reruns']} rerun(s): {status}",
              flush=True)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--short", action="store_true",
                        help=f"{len(STAGES)} kills, one per stage, each in the stage's work (for CI)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="work folder (default: a temporary one, removed unless --keep)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder and every trial's run")
    args = parser.parse_args(argv)
    work = Path(args.out or tempfile.mkdtemp(prefix="stacker-faults-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    data = write_digits_dataset(work / "data", size=16, n_images=300)
    t0 = time.perf_counter()
    results = run_trials(work, data, len(STAGES) if args.short else args.kills, args.seed, args.short, args.keep)
    print_table(results)
    print(f"\n{len(results)} kills in {time.perf_counter() - t0:.0f}s")
    if not args.keep and not args.out:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if any(r["problems"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
