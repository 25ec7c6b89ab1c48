"""Bench: `fit_stack` with the full guard (every candidate, nested estimate on) on synthetic
OOF and test tables of 10,000 rows x 35 models x 10 classes, 5 folds.

    python bench/stack_bench.py [--rows 10000] [--models 35] [--classes 10] [--metric accuracy]
                                [--repeats 1] [--n-jobs -1] [--candidates NAME ...] [-v]
                                [--keep DIR] [--profile FILE] [--scores FILE]

--profile writes cProfile stats of fit_stack to FILE and prints the top functions;
-v prints fit-stack's log with timestamps (each candidate's fit seconds);
--scores writes every candidate's meta-OOF score, the choice and the nested choices as JSON
(compare two versions with bench/compare_scores.py). The peak RSS of the process, alone and
with its fit workers, is printed, and the job's peak memory: the summed PSS of the process and
its workers, sampled every 0.2 s (their shared memory map counted once).

The speed targets, on the 2-core development machine: 100,000 rows under 120 s, 10,000 rows
under 20 s, --repeats 3 at 10,000 rows under 60 s, peak memory under 4 GB; the measured figures,
dated, with their machines: docs/speed.md. A change of the meta level keeps its scores:
bench/compare_scores.py's gate.

The models are noisy, correlated, roughly calibrated predictors of the truth,
like CNNs trained on the same images: every model sees the same evidence (a
true-class signal scaled by a row difficulty, plus confusions all models share),
blurred by a noise shared within an architecture family of five models and by
its own noise, and sharpened by its own factor; single models score 0.81-0.88
accuracy, their mean 0.91. Test tables average five fold models, as
predict-oof writes them.
"""
from __future__ import annotations

import argparse
import cProfile
import json
import logging
import os
import pstats
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from oof import PredictionTable, RunPaths, make_folds, write_folds, write_table  # noqa: E402
from stacker import StackConfig, fit_stack  # noqa: E402


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def model_logits(evidence, family, rng, sharpness, noise) -> np.ndarray:
    """(N, C) logits of one model: the evidence every model sees, blurred by its family's and its own noise.

    Shared errors scale with the model's sharpness like the signal does, so no
    linear mix of models cancels them (as with real models trained on the same images).
    """
    return sharpness * (evidence + 0.5 * family + noise * rng.normal(size=evidence.shape))


def make_run(root: Path, rows: int, models: int, classes: int, k: int = 5, test_rows: int = 3500,
             seed: int = 0, repeats: int = 1) -> None:
    """Write folds.parquet and preds/<model>/{oof,test}.parquet of a synthetic run under `root`; with
    `repeats` R > 1, R fold assignments and each model's OOF of every repeat (its R sets of fold models
    differ by their own noise), R x N rows with a repeat column."""
    rng = np.random.default_rng(seed)
    prior = rng.dirichlet(np.full(classes, 8.0))  # mild class imbalance
    y = rng.choice(classes, size=rows, p=prior)
    y_test = rng.choice(classes, size=test_rows, p=prior)
    names = [f"c{i}" for i in range(classes)]
    folds = make_folds([f"tr{i:05d}" for i in range(rows)], [names[c] for c in y], k=k, seed=seed, repeats=repeats)
    y = folds.y
    paths = RunPaths(root)
    write_folds(paths.folds, folds)
    # evidence (N, C): a true-class signal scaled by a row difficulty, plus confusions all models share
    evidence = [5.0 * rng.beta(4, 1.5, size=(len(t), 1)) * np.eye(classes)[t] + rng.normal(size=(len(t), classes))
                for t in (y, y_test)]
    families = [[rng.normal(size=(len(t), classes)) for t in (y, y_test)] for _ in range((models + 4) // 5)]
    test_ids = np.array([f"te{i:05d}" for i in range(test_rows)], dtype=object)
    for m in range(models):
        name, sharpness, noise = f"model{m:02d}", rng.uniform(1.0, 2.0), rng.uniform(0.1, 0.6)
        meta = {"model": name, "folds_sha256": folds.sha256}
        z = [model_logits(evidence[0], families[m // 5][0], rng, sharpness, noise + 0.2)  # + its fold model's
             for _ in range(repeats)]
        if repeats == 1:
            oof = PredictionTable(folds.ids, softmax(z[0]), folds.classes, folds.fold, meta)
        else:
            oof = PredictionTable(np.tile(folds.ids, repeats), softmax(np.concatenate(z)), folds.classes,
                                  folds.fold_matrix.ravel(), meta, repeat=np.repeat(np.arange(repeats), rows))
        fold_models = [softmax(model_logits(evidence[1], families[m // 5][1], rng, sharpness, noise + 0.2))
                       for _ in range(k)]
        test = PredictionTable(test_ids, np.mean(fold_models, axis=0), folds.classes, None, meta)
        write_table(paths.oof(name), oof)
        write_table(paths.test(name), test)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--models", type=int, default=35)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=1, help="folds.repeats: R fold assignments")
    parser.add_argument("--n-jobs", type=int, default=StackConfig.n_jobs, help="stack.n_jobs")
    parser.add_argument("--metric", default=StackConfig.metric, help="stack.metric")
    parser.add_argument("--keep", type=Path, help="write the run here instead of a temporary directory")
    parser.add_argument("--profile", type=Path, help="write cProfile stats of fit_stack here and print the top")
    parser.add_argument("--scores", type=Path, help="write each candidate's meta-OOF score and the choice as JSON")
    parser.add_argument("--candidates", nargs="+", help="stack.candidates (default: every one)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="print fit-stack's log, each line with the milliseconds since the start")
    return parser.parse_args(argv)


def timed_fit(root: Path, config: StackConfig, profile: Path | None) -> tuple[dict, float]:
    """fit_stack's decision and wall seconds, under cProfile when `profile` names a stats file."""
    profiler = cProfile.Profile() if profile else None
    start = time.perf_counter()
    if profiler:
        profiler.enable()
    decision = fit_stack(root, config, force=True)
    if profiler:
        profiler.disable()
    seconds = time.perf_counter() - start
    if profiler:
        profiler.dump_stats(profile)
        pstats.Stats(str(profile)).sort_stats("tottime").print_stats(25)
    return decision, seconds


def descendants(pid: int) -> list[int]:
    """Process ids below `pid` (Linux /proc), e.g. the fit workers a process pool keeps alive."""
    children = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            children += [int(c) for c in task.read_text().split()]
        except OSError:  # the thread or process ended meanwhile
            continue
    return children + [d for c in children for d in descendants(c)]


def pss_kb(pid: int) -> int:
    """Proportional set size of one process (kB): its private pages plus its share of shared ones."""
    try:
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:  # ended meanwhile, or no smaps_rollup (not Linux)
        return 0
    return next((int(line.split()[1]) for line in rollup.splitlines() if line.startswith("Pss:")), 0)


class MemorySampler(threading.Thread):
    """Samples the summed PSS of this process and its workers every `interval` s; `peak_gb` is the largest.

    PSS counts a page shared by n processes as 1/n in each, so the sum is the memory the whole job
    holds at that moment, the fit workers' shared memory map counted once.
    """

    def __init__(self, interval: float = 0.2):
        super().__init__(daemon=True)
        self.interval, self.peak_kb, self.stopped = interval, 0, threading.Event()

    def run(self):
        while not self.stopped.wait(self.interval):
            me = os.getpid()
            self.peak_kb = max(self.peak_kb, sum(pss_kb(p) for p in [me, *descendants(me)]))

    @property
    def peak_gb(self) -> float:
        return self.peak_kb / 2**20


def peak_rss_gb() -> tuple[float, float]:
    """Peak resident memory (GB) of this process, and of it plus its live worker processes.

    The sum of each process's peak (VmHWM) bounds their peak together from above.
    """
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    workers = 0
    for pid in descendants(os.getpid()):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:  # ended meanwhile
            continue
        workers += next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM")), 0)
    return own / 2**20, (own + workers) / 2**20


def score_summary(decision: dict) -> dict:
    """What two versions of the meta level must agree on: per-candidate scores and the choices."""
    nested = decision.get("nested") or {}
    return {"chosen": decision["chosen"], "best": decision["best"],
            "scores": {n: r["score"] for n, r in decision["candidates"].items()},
            "log_loss": {n: r["log_loss"] for n, r in decision["candidates"].items()},
            "nested_score": nested.get("score"), "nested_chosen": [f["chosen"] for f in nested.get("folds", [])]}


def main(argv=None) -> float:
    args = parse_args(argv)
    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="%(relativeCreated)9.0f ms  %(message)s")
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp) / "run"
        start = time.perf_counter()
        make_run(root, args.rows, args.models, args.classes, repeats=args.repeats)
        made = time.perf_counter() - start
        config = StackConfig(metric=args.metric, n_jobs=args.n_jobs,
                             **({"candidates": tuple(args.candidates)} if args.candidates else {}))
        sampler = MemorySampler()
        sampler.start()
        decision, seconds = timed_fit(root, config, args.profile)
        sampler.stopped.set()
    if args.scores:
        args.scores.write_text(json.dumps(score_summary(decision), indent=1))
    print(f"bench: {args.rows} rows x {args.models} models x {args.classes} classes x {args.repeats} repeat(s), "
          f"metric {args.metric}; "
          f"tables written in "
          f"{made:.1f} s; fit_stack (full guard, nested) {seconds:.1f} s; chosen {decision['chosen']}; "
          "peak RSS {:.2f} GB, with its fit workers {:.2f} GB; ".format(*peak_rss_gb())
          + f"peak memory of the job (PSS, sampled every 0.2 s) {sampler.peak_gb:.2f} GB")
    return seconds


if __name__ == "__main__":
    main()
