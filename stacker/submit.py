"""submit: test probabilities -> a submission in `sample_submission.csv`'s columns and id order.

The sample's first column is the id. If its other columns are exactly the class
names, the submission holds one probability per class; if there is exactly one
other column, it holds the label of the argmax, written as the class string
(class names come from folder names, so "07" stays "07" even where the sample's
placeholder labels look numeric). Everything is checked before anything is written.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from oof import (PredictionTable, RunPaths, StackerError, align, atomic_path, check_unique, preview, read_csv_strings,
                 read_table, table_file)

from .inputs import load_run_folds


def write_submission(run_dir: str | os.PathLike, sample_submission_path: str | os.PathLike,
                     out_path: str | os.PathLike | None = None, source: str | None = None,
                     force: bool = False, log=print) -> Path:
    """Write the submission of a run.

    Args:
        run_dir: the run directory.
        sample_submission_path: the competition's sample_submission.csv.
        out_path: where to write; default `<run>/submission.csv`.
        source: None for the stack (`stack/test.parquet`), or a model name for that
            model's `preds/<model>/test.parquet` (or test.csv).
        force: replace an existing submission.
        log: callable for the summary line (None is silent).

    Returns:
        The path written.

    Raises:
        StackerError: an existing file without force, a missing table, or ids,
            columns or labels that do not match the sample.
    """
    log = log or (lambda *a: None)
    paths = RunPaths(run_dir)
    out = Path(out_path) if out_path is not None else paths.submission
    if out.exists() and not force:
        raise StackerError(f"{out}: already exists; pass --force to write it again")
    folds = load_run_folds(paths)
    path = paths.stack_test if source is None else table_file(paths.test(source))
    if not path.is_file():
        hint = "run fit-stack first, or pass --source <model>" if source is None else "run predict-oof first"
        raise StackerError(f"{path}: not found; {hint}")
    table = read_table(path, folds.classes, "test")
    sample_path = Path(sample_submission_path)
    frame = submission_frame(read_sample(sample_path), table, sample_path.name, log)
    with atomic_path(out) as tmp:
        frame.to_csv(tmp, index=False)
    mode = "labels" if frame.shape[1] == 2 else "probabilities"
    log(f"submission: {out} ({len(frame)} rows, {mode}, from {path})")
    return out


def read_sample(path: Path) -> pd.DataFrame:
    """The sample submission as strings, blanks kept as ''."""
    if not path.is_file():
        raise StackerError(f"{path}: sample submission not found")
    sample = read_csv_strings(path)
    if sample.shape[1] < 2:
        raise StackerError(f"{path}: needs an id column and at least one prediction column")
    return sample


def submission_frame(sample: pd.DataFrame, table: PredictionTable, sample_name: str, log=print) -> pd.DataFrame:
    """The submission: `sample`'s columns and id order, filled from `table`; checked first."""
    id_col, columns = sample.columns[0], [str(c) for c in sample.columns[1:]]
    ids = sample[id_col].to_numpy(dtype=object)
    check_unique(ids, sample_name)
    order = align(table.ids, ids, table.source, sample_name)
    proba = table.proba[order]  # (N, C) in the sample's id order
    classes = list(table.classes)
    if sorted(columns) == sorted(classes):
        return pd.DataFrame({id_col: ids, **{c: proba[:, classes.index(c)] for c in columns}})
    if len(columns) == 1 and _fractional(sample[sample.columns[1]]):
        # Kaggle's binary layout `id,target` with placeholder 0.5 asks for P(positive class).
        if len(classes) != 2:
            raise StackerError(f"{sample_name}: column {columns[0]!r} holds fractional placeholders (a "
                               f"probability), but there are {len(classes)} classes, not 2")
        log(f"submission: {sample_name} asks for a probability: writing P({classes[1]!r}) in {columns[0]!r}")
        return pd.DataFrame({id_col: ids, columns[0]: proba[:, 1]})
    if len(columns) == 1:
        _check_placeholders(sample[sample.columns[1]], ids, classes, sample_name, log)
        return pd.DataFrame({id_col: ids, columns[0]: np.asarray(classes, dtype=object)[proba.argmax(axis=1)]})
    raise StackerError(f"{sample_name}: columns {columns} are neither one label column nor the class "
                       f"names {classes}")


def _fractional(values: pd.Series) -> bool:
    """Placeholders such as 0.5: numbers, at least one of them not whole."""
    numbers = pd.to_numeric(values, errors="coerce")
    return bool(len(values)) and numbers.notna().all() and (numbers != numbers.round()).any()


def _check_placeholders(labels: pd.Series, ids, classes: list[str], sample_name: str, log) -> None:
    """The sample's placeholder labels must be classes (blank and numeric ones are not compared)."""
    values = labels.astype(str).to_numpy(dtype=object)
    numeric = pd.to_numeric(labels, errors="coerce").notna().to_numpy()
    unknown = (values != "") & ~numeric & ~np.isin(values, classes)
    if unknown.any():
        raise StackerError(f"{sample_name}: label {values[unknown][0]!r} is not a class (first ids "
                           f"{preview(ids[unknown])}); classes are {classes}")
    if numeric.any() and not pd.to_numeric(pd.Series(classes), errors="coerce").notna().all():
        log(f"warning: {sample_name} has numeric placeholder labels but the classes are names; "
            "writing the class names")
