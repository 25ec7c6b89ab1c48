"""Bench: `fit_stack` with the full guard (every candidate, nested estimate on) on synthetic
OOF and test tables of 10,000 rows x 35 models x 10 classes, 5 folds.

    python bench/stack_bench.py [--rows 10000] [--models 35] [--classes 10] [--metric accuracy]
                                [--n-jobs 1] [--keep DIR]

Target: under 120 s on the 2-core CPU of the development machine (Intel Xeon,
2 vCPUs). Measured there, idle: 44 s (accuracy; of it LightGBM wide 19 s,
class-shared 10 s, logistic regression 4 s), 47 s with --metric f1_macro, 31 s
with --n-jobs 2.

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
import sys
import tempfile
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
             seed: int = 0) -> None:
    """Write folds.parquet and preds/<model>/{oof,test}.parquet of a synthetic run under `root`."""
    rng = np.random.default_rng(seed)
    prior = rng.dirichlet(np.full(classes, 8.0))  # mild class imbalance
    y = rng.choice(classes, size=rows, p=prior)
    y_test = rng.choice(classes, size=test_rows, p=prior)
    names = [f"c{i}" for i in range(classes)]
    folds = make_folds([f"tr{i:05d}" for i in range(rows)], [names[c] for c in y], k=k, seed=seed)
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
        z = model_logits(evidence[0], families[m // 5][0], rng, sharpness, noise + 0.2)  # + its fold model's
        oof = PredictionTable(folds.ids, softmax(z), folds.classes, folds.fold, meta)
        fold_models = [softmax(model_logits(evidence[1], families[m // 5][1], rng, sharpness, noise + 0.2))
                       for _ in range(k)]
        test = PredictionTable(test_ids, np.mean(fold_models, axis=0), folds.classes, None, meta)
        write_table(paths.oof(name), oof)
        write_table(paths.test(name), test)


def main(argv=None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--models", type=int, default=35)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--n-jobs", type=int, default=StackConfig.n_jobs, help="stack.n_jobs")
    parser.add_argument("--metric", default=StackConfig.metric, help="stack.metric")
    parser.add_argument("--keep", type=Path, help="write the run here instead of a temporary directory")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp) / "run"
        start = time.perf_counter()
        make_run(root, args.rows, args.models, args.classes)
        made = time.perf_counter() - start
        start = time.perf_counter()
        decision = fit_stack(root, StackConfig(metric=args.metric, n_jobs=args.n_jobs), force=True)
        seconds = time.perf_counter() - start
    print(f"bench: {args.rows} rows x {args.models} models x {args.classes} classes, metric {args.metric}; "
          f"tables written in "
          f"{made:.1f} s; fit_stack (full guard, nested) {seconds:.1f} s; chosen {decision['chosen']}")
    return seconds


if __name__ == "__main__":
    main()
