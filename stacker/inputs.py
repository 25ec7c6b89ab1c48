"""The meta level's inputs: prediction tables of a run (or of any tool), checked.

`oof.read_table` / `validate_oof` / `validate_test` already refuse another fold
assignment and duplicate, missing or extra ids. Here: the run-directory layout
with CSV fallbacks (tables and folds brought from other tools), test tables that
must share their ids, the meta-level data the guard fits on, and the leak check.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import pandas as pd

from oof import (Folds, PredictionTable, RunPaths, StackerError, check_model_name, load_folds, read_table,
                 table_file, table_from_frame, validate_oof, validate_test)

# Leak check. A row counts as "sure" when the model's argmax is the true class and its
# probability is within LEAK_MARGIN of the way from chance (1/C) up to the model's own
# ceiling (the 99th percentile of its top probabilities: one odd row does not set it).
# Relative, because label smoothing caps a model's top: with smoothing 0.1 and 10
# classes a model that memorised its rows says 0.91, never 0.99. Unsmoothed models
# reach ~1, where the threshold is 0.95 (10 classes).
# A model is suspicious when >= 95% of its OOF rows are sure while a reference share
# is at least 30 points lower: the median of the other models (a model that saw its
# OOF rows in training memorises them; honest models that strong come in groups, so
# the median of the others is near it), or, for a lone model, the share of its own
# test rows at the same threshold (a memoriser is honest on rows it never saw; an
# honest model is as sure on test rows as on OOF rows). Without test rows a lone
# model is not checked: nothing to compare it with.
LEAK_MARGIN = 0.05
LEAK_CEILING_QUANTILE = 0.99
LEAK_SHARE = 0.95
LEAK_GAP = 0.30


@dataclass(frozen=True)
class MetaData:
    """What the meta level fits on: every OOF row of the models it uses.

    Attributes:
        X: (N, M, C) each model's OOF probabilities, models in `models` order.
        y: (N,) labels, 0..C-1.
        fold: (N,) the base models' fold of each row; the meta level holds out the same folds.
        models: the M model names, used to label LightGBM features.
        classes: the C class names.
        groups: (N,) int group of each row (`Folds.group_index`: a duplicate cluster, a plant), or
            None: rows are independent. The bootstrap draws groups, and inner splits keep them whole.
    """

    X: np.ndarray
    y: np.ndarray
    fold: np.ndarray
    models: tuple[str, ...]
    classes: tuple[str, ...]
    groups: np.ndarray | None = None

    @property
    def k(self) -> int:
        return int(self.fold.max()) + 1


def load_run_folds(paths: RunPaths) -> Folds:
    """`<run>/folds.parquet`, or `<run>/folds.csv` (id, label, fold) brought from another tool."""
    csv = paths.folds_csv
    return load_folds(paths.folds if paths.folds.is_file() or not csv.is_file() else csv)


def has_fold_tables(paths: RunPaths, models: list[str], folds: Folds) -> bool:
    """Every model has each fold model's test table, of every repeat (stacker's own runs do; other tools' may not)."""
    return all(table_file(paths.for_repeat(r).test_fold(m, f)).is_file()
               for m in models for r in range(folds.repeats) for f in range(folds.k))


def read_run_tables(paths: RunPaths, models: list[str], folds: Folds, per_fold: bool):
    """Read and validate each model's OOF and test tables (and per-fold test tables).

    Returns:
        (oof, test, fold_tests): {model: table} as read (each checked row by row; `StackGuard.fit`
        checks them against the folds, once), {model: table} aligned on the first model's test ids,
        and a list of R x K such dicts, repeat-major (repeat r's fold k at r * K + k; R = 1: the K
        folds), empty unless per_fold.
    """
    oof = {m: _read(paths.oof(m), folds, "oof") for m in models}
    test = align_test_tables({m: _read(paths.test(m), folds, "test") for m in models})
    fold_tests = []
    ids = next(iter(test.values())).ids
    for r in range(folds.repeats if per_fold else 0):
        one, repeat_paths = folds.for_repeat(r), paths.for_repeat(r)
        for k in range(folds.k):
            tables = {m: _read(repeat_paths.test_fold(m, k), one, "test", folds.sha256) for m in models}
            fold_tests.append({m: validate_test(t, ids, folds.classes) for m, t in tables.items()})
    return oof, test, fold_tests


def _read(path, folds: Folds, kind: str, run_sha256: str | None = None) -> PredictionTable:
    """One table of the run (parquet, else its CSV sibling), with rows, made on these folds.

    A fold model's test table of repeat r is made on `folds` = that repeat's view; it may record
    that repeat's digest or the whole run's (`run_sha256`).
    """
    table = read_table(table_file(path), folds.classes, kind)
    if kind == "oof":
        _require_rows(table)
    sha = table.meta.get("folds_sha256")
    if kind == "test" and sha is not None and sha not in (folds.sha256, run_sha256):  # validate_oof: OOF tables
        raise StackerError(f"{table.source}: was made on another fold assignment (folds sha256 {sha[:12]} != "
                           f"{folds.sha256[:12]}); run predict-oof again")
    return table


def _require_rows(table: PredictionTable) -> PredictionTable:
    # A header-only test table would become the id reference and every other model's table be blamed.
    if not len(table.ids):
        raise StackerError(f"{table.source}: no rows (a header only)")
    return table


def as_oof_tables(tables: Mapping, folds: Folds) -> dict[str, PredictionTable]:
    """Tables or DataFrames (`id`, `fold`, one column per class) -> validated, in folds row order."""
    if not tables:
        raise StackerError("fit-stack: no models to stack (no OOF tables given)")
    return {check_model_name(m): validate_oof(_require_rows(_as_table(t, m, folds.classes, "oof")), folds)
            for m, t in tables.items()}


def align_test_tables(tables: Mapping, classes=None) -> dict[str, PredictionTable]:
    """Test tables of every model, in the first model's id order; any id difference is an error."""
    if not tables:
        raise StackerError("fit-stack: no test tables given")
    out = {m: _as_table(t, m, classes, "test") for m, t in tables.items()}
    empty = [t for t in out.values() if not len(t.ids)]
    if empty and len(empty) < len(out):  # a run without a test set has only empty test tables
        _require_rows(empty[0])  # else a header-only table would become the reference and another be blamed
    first = next(iter(out.values()))
    classes = first.classes if classes is None else tuple(classes)
    return {m: validate_test(t, first.ids, classes) for m, t in out.items()}


def _as_table(table, model: str, classes, kind: str) -> PredictionTable:
    if isinstance(table, PredictionTable):
        return table
    if isinstance(table, pd.DataFrame):
        if classes is None:
            classes = [c for c in table.columns if c not in ("id", "repeat", "fold")]
        return table_from_frame(table, classes, kind, f"<{model} {kind} table>")
    raise StackerError(f"{model}: expected a PredictionTable or a DataFrame, got {type(table).__name__}")


def meta_features(tables: Mapping[str, PredictionTable]) -> np.ndarray:
    """(N, M, C) probabilities of M models, from tables already in one row order."""
    return np.stack([t.proba for t in tables.values()], axis=1)


def repeat_features(tables: Mapping[str, PredictionTable], repeats: int) -> list[np.ndarray]:
    """R arrays (N, M, C): each repeat's OOF probabilities, from validated tables (repeat-major rows).

    Kept apart, never averaged or pooled: the meta level scores each repeat on its own folds
    (`stacker.repeats`).
    """
    X = meta_features(tables)  # (R * N, M, C)
    return list(X.reshape(repeats, len(X) // repeats, *X.shape[1:]))


def sure_thresholds(X: np.ndarray) -> np.ndarray:
    """(M,) each model's "sure" probability: LEAK_MARGIN below its own ceiling; X is (N, M, C)."""
    ceiling = np.quantile(X.max(axis=2), LEAK_CEILING_QUANTILE, axis=0)  # (M,)
    chance = 1 / X.shape[2]
    return ceiling - LEAK_MARGIN * np.maximum(ceiling - chance, 0)


def sure_share(y: np.ndarray, X: np.ndarray) -> np.ndarray:
    """(M,) share of rows where each model's argmax is the true class at its sure threshold; X is (N, M, C)."""
    truth = X[np.arange(len(y)), :, y]  # (N, M)
    return ((X.argmax(axis=2) == y[:, None]) & (truth >= sure_thresholds(X))).mean(axis=0)


# A memoriser is right wherever it leaves the other models' consensus: a model that saw its OOF rows
# knows their labels. Honest models measured right on 4-45% of their disagreements (the strongest of
# six scikit-learn families, bench/leak_bench.py); flagged: right on all but MEMO_WRONG of at least
# MEMO_DISAGREEMENTS of them.
MEMO_DISAGREEMENTS = 20
MEMO_WRONG = 0.02


def disagreements(y: np.ndarray, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """((M,) rows where each model's top class differs from the other models' consensus, (M,) of those it gets
    wrong); X is (N, M, C) with M >= 2."""
    total = X.sum(axis=1)  # (N, C)
    top = X.argmax(axis=2)  # (N, M)
    counts, wrong = np.zeros(X.shape[1], dtype=np.int64), np.zeros(X.shape[1], dtype=np.int64)
    for m in range(X.shape[1]):
        differ = top[:, m] != (total - X[:, m]).argmax(axis=1)
        counts[m], wrong[m] = int(differ.sum()), int((top[differ, m] != y[differ]).sum())
    return counts, wrong


def memorisers(y: np.ndarray, X: np.ndarray, models: list[str]) -> dict[str, str]:
    """{model: reason} for models right on nearly every row where they leave the others' consensus."""
    if X.shape[1] < 2:
        return {}
    counts, wrong = disagreements(y, X)
    return {name: (f"it is right on {counts[m] - wrong[m]} of the {counts[m]} OOF rows where it disagrees with "
                   "the other models' consensus: a model that never saw those rows misses some of them; "
                   "trained on its own OOF rows?")
            for m, name in enumerate(models)
            if counts[m] >= MEMO_DISAGREEMENTS and wrong[m] <= MEMO_WRONG * counts[m]}


def suspicious_models(y: np.ndarray, X: np.ndarray, models: list[str], X_test: np.ndarray | None = None
                      ) -> dict[str, str]:
    """{model: reason} for models whose OOF looks leaked (see LEAK_* above).

    Args:
        y: (N,) labels.
        X: (N, M, C) OOF probabilities.
        models: the M names.
        X_test: (N_test, M, C) test probabilities, the reference of a lone model; None leaves it unchecked.
    """
    share = sure_share(y, X)
    out = {}
    for m, name in enumerate(models):
        others = np.delete(share, m)
        if len(others):
            reference, what = float(np.median(others)), "the other models' median is"
        elif X_test is not None and len(X_test):
            reference, what = _test_sure_share(X[:, m], X_test[:, m]), "its own test rows give"
        else:
            continue
        if share[m] >= LEAK_SHARE and reference <= share[m] - LEAK_GAP:
            out[name] = (f"{share[m]:.1%} of OOF rows are sure of the true class while {what} "
                         f"{reference:.1%}: trained on its own OOF rows?")
    for name, why in memorisers(y, X, models).items():
        out.setdefault(name, why)
    return out


def _test_sure_share(oof: np.ndarray, test: np.ndarray) -> float:
    """Share of test rows (N_test, C) whose top probability reaches the OOF rows' (N, C) sure threshold."""
    threshold = sure_thresholds(oof[:, None])[0]
    return float((test.max(axis=1) >= threshold).mean())
