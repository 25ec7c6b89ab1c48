"""Small seeded meta-level inputs for the stacker tests: folds, synthetic model probabilities, run dirs."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from oof import (PredictionTable, RunPaths, accuracy, log_loss, make_folds, read_json, write_bytes, write_folds,
                 write_json, write_table)
from stacker import StackConfig, fit_stack

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


# ---------------------------------------------------------------- runs with every file a run holds (leaderboard, report)

MODELS = ("strong", "middle", "weak")


def add_training_files(paths: RunPaths, folds, name: str, index: int, rng) -> None:
    """What train-base and predict-oof leave beside a model's tables: histories, weights, metrics, the
    plain view's OOF (not for the last model, as in runs made before oof_plain existed)."""
    for r in range(folds.repeats):
        for k in range(folds.k):
            epochs = [{"epoch": e, "train_loss": 2.0 / e, "valid_loss": 2.2 / e, "error_rate": 0.5 / e,
                       "seconds": 0.25 * (index + 1), "lr": 1e-3} for e in (1, 2, 3)]
            write_json(paths.for_repeat(r).history(name, k), {"model": name, "fold": k, "epochs": epochs})
            write_bytes(paths.for_repeat(r).weights(name, k), bytes(1000 * (index + 1)))
    from stacker.leaderboard import read_run

    oof = read_run(paths.root).models[name].oof
    y = np.tile(folds.y, folds.repeats)
    metrics = {"accuracy": accuracy(y, oof.proba), "log_loss": log_loss(y, oof.proba), "seconds": 1.5 + index}
    if index < 2:  # over-confident plain view, a little less accurate: what TTA is for
        plain = noisy_copy(y, len(folds.classes), 0.8 - 0.1 * index, rng, confidence=0.95)
        write_table(paths.oof_plain(name), PredictionTable(oof.ids, plain, oof.classes, oof.fold, oof.meta,
                                                           repeat=oof.repeat))
        metrics.update(accuracy_no_tta=accuracy(y, plain), log_loss_no_tta=log_loss(y, plain))
    write_json(paths.predict_metrics(name), metrics)


def report_run(root, stack: bool = True):
    """strong / middle / weak models on 300 rows with every file a run holds, and (stack=True) their stack."""
    run, folds, _ = strong_weak_run(root, n_rows=300, n_test=40)
    paths, rng = RunPaths(run), np.random.default_rng(5)
    for index, name in enumerate(MODELS):
        add_training_files(paths, folds, name, index, rng)
    paths.config.write_text("folds:\n  k: 5  # <script>alert('not run')</script> & more\n", encoding="utf-8")
    if stack:
        fit_stack(run, fast_config(n_bootstrap=100), log=None)
    return run


def repeat_run(root):
    """Two models on folds with 2 repeats (R x N-row OOF tables, per-repeat metrics), stacked on the means."""
    rng = np.random.default_rng(3)
    labels = [f"c{c}" for c in rng.integers(0, 4, 200)]
    folds = make_folds([f"r{i:03d}" for i in range(200)], labels, k=4, seed=0, classes=[f"c{c}" for c in range(4)],
                       repeats=2)
    paths = RunPaths(root)
    write_folds(paths.folds, folds)
    for index, (name, acc) in enumerate((("alpha", 0.8), ("beta", 0.7))):
        each = [noisy_copy(folds.y, 4, acc, rng) for _ in range(2)]
        write_table(paths.oof(name), PredictionTable(
            np.tile(folds.ids, 2), np.concatenate(each), folds.classes, folds.fold_matrix.ravel(),
            {"model": name, "folds_sha256": folds.sha256}, repeat=np.repeat([0, 1], folds.n_rows)))
        write_table(paths.test(name), PredictionTable(np.array(["t0", "t1"], dtype=object),
                                                      np.full((2, 4), 0.25), folds.classes))
        add_training_files(paths, folds, name, index + 2, rng)  # no plain view
        scores = [{"accuracy": accuracy(folds.y, p), "log_loss": log_loss(folds.y, p)} for p in each]
        metrics = read_json(paths.predict_metrics(name))
        write_json(paths.predict_metrics(name), {**metrics, "repeats": scores, "accuracy_std": float(
            np.std([s["accuracy"] for s in scores], ddof=1))})
    fit_stack(root, fast_config(candidates=["mean", "logit_mean"], nested=False), log=None)
    return root
