"""Small seeded meta-level inputs for the stacker tests: folds, synthetic model probabilities, run dirs."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from oof import PredictionTable, RunPaths, make_folds, write_folds, write_table
from stacker import StackConfig

# Few bootstrap resamples and 3-tree boosters: the guard's logic, at test speed.
FAST = {"n_bootstrap": 200, "lgbm_max_rounds": 3, "lgbm_min_data_in_leaf": 5, "es_steps": 20}


def fast_config(**overrides) -> StackConfig:
    return StackConfig(**{**FAST, **overrides})


def make_run_folds(n_rows: int = 500, n_classes: int = 10, k: int = 5, seed: int = 0):
    """Stratified folds over ids r0000.. with classes c0..c{C-1} (uniform labels)."""
    rng = np.random.default_rng([seed, 1])  # a stream of its own: the tests' model draws use `seed`
    labels = [f"c{c}" for c in rng.integers(0, n_classes, n_rows)]
    classes = [f"c{c}" for c in range(n_classes)]
    return make_folds([f"r{i:04d}" for i in range(n_rows)], labels, k=k, seed=seed, classes=classes)


def noisy_copy(y: np.ndarray, n_classes: int, accuracy: float, rng, confidence: float = 0.7) -> np.ndarray:
    """(N, C) a model right on a share `accuracy` of rows: `confidence` on its pick, the rest spread at random."""
    right = rng.random(len(y)) < accuracy
    pick = np.where(right, y, (y + rng.integers(1, n_classes, len(y))) % n_classes)
    rest = rng.dirichlet(np.ones(n_classes), size=len(y)) * (1 - confidence)
    proba = rest
    proba[np.arange(len(y)), pick] += confidence
    return proba / proba.sum(axis=1, keepdims=True)


def specialists(y, rng, known=range(5), n_classes: int = 10):
    """(N, C) a specialist of the `known` classes: right on them with 0.45-0.7, and on the other
    rows surer still (0.75-0.95) of a wrong known class, so that a mean of two specialists
    follows the wrong one while a stacker learns that over-sureness marks a miss."""
    known = np.isin(np.arange(n_classes), list(known))
    right = known[y]
    pick = np.where(right, y, rng.choice(np.flatnonzero(known), len(y)))
    confidence = np.where(right, rng.uniform(0.45, 0.7, len(y)), rng.uniform(0.75, 0.95, len(y)))
    proba = np.repeat(((1 - confidence) / (n_classes - 1))[:, None], n_classes, axis=1)
    proba[np.arange(len(y)), pick] = confidence
    return proba


def smoothed_copy(y: np.ndarray, n_classes: int, accuracy: float, rng, low: float = 0.4,
                  smoothing: float = 0.1) -> np.ndarray:
    """(N, C) a model trained with label smoothing: its top probability is drawn in [low, ceiling], where the
    ceiling 1 - smoothing + smoothing / C is what smoothing lets it reach; right on a share `accuracy`.
    A model that memorised its rows is right on all of them just under the ceiling (`low` near it)."""
    ceiling = 1 - smoothing + smoothing / n_classes
    right = rng.random(len(y)) < accuracy
    pick = np.where(right, y, (y + rng.integers(1, n_classes, len(y))) % n_classes)
    top = rng.uniform(low, ceiling, len(y))
    proba = np.repeat(((1 - top) / (n_classes - 1))[:, None], n_classes, axis=1)
    proba[np.arange(len(y)), pick] = top
    return proba


def pure_noise(n_rows: int, n_classes: int, rng) -> np.ndarray:
    """(N, C) probabilities that know nothing of the labels."""
    return rng.dirichlet(np.ones(n_classes), size=n_rows)


def oof_tables(folds, probas: dict) -> dict[str, PredictionTable]:
    """{model: OOF table} in folds row order, recording the folds' sha256 as predict-oof does."""
    return {m: PredictionTable(folds.ids, p, folds.classes, folds.fold, {"model": m, "folds_sha256": folds.sha256})
            for m, p in probas.items()}


def make_test_tables(ids, classes, probas: dict) -> dict[str, PredictionTable]:
    ids = np.asarray(ids, dtype=object)
    return {m: PredictionTable(ids, p, tuple(classes), None, {"model": m}) for m, p in probas.items()}


def write_run(root: Path, folds, oof: dict, test: dict, test_ids, csv: bool = False) -> Path:
    """A run directory: folds + preds/<model>/{oof,test} as parquet (ours) or CSV without metadata (another tool's)."""
    paths = RunPaths(root)
    if csv:
        root.mkdir(parents=True, exist_ok=True)
        folds.table.to_csv(root / "folds.csv", index=False)
    else:
        write_folds(paths.folds, folds)
    for (m, table), t in zip(oof_tables(folds, oof).items(), make_test_tables(test_ids, folds.classes, test).values()):
        if csv:
            paths.preds_dir(m).mkdir(parents=True, exist_ok=True)
            table.to_frame().to_csv(paths.preds_dir(m) / "oof.csv", index=False)
            t.to_frame().to_csv(paths.preds_dir(m) / "test.csv", index=False)
        else:
            write_table(paths.oof(m), table)
            write_table(paths.test(m), t)
    return root


def strong_weak_run(root: Path, n_rows: int = 400, n_test: int = 60, seed: int = 0, csv: bool = False):
    """A run with three models of accuracy 0.85 / 0.75 / 0.6 and their test tables; returns (root, folds, test_ids)."""
    rng = np.random.default_rng(seed)
    folds = make_run_folds(n_rows, 10, seed=seed)
    y_test = rng.integers(0, 10, n_test)
    accuracies = {"strong": 0.85, "middle": 0.75, "weak": 0.6}
    oof = {m: noisy_copy(folds.y, 10, a, rng) for m, a in accuracies.items()}
    test = {m: noisy_copy(y_test, 10, a, rng) for m, a in accuracies.items()}
    test_ids = [f"t{i:03d}" for i in range(n_test)]
    return write_run(root, folds, oof, test, test_ids, csv=csv), folds, test_ids
