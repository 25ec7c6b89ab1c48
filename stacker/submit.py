"""submit: test probabilities -> a submission in `sample_submission.csv`'s columns and id order.

The sample's first column is the id. If its other columns are exactly the class
names, the submission holds one probability per class; if there is exactly one
other column, it holds the label of the argmax, written as the class string
(class names come from folder names, so "07" stays "07" even where the sample's
placeholder labels look numeric). Everything is checked before anything is written.

Beside the submission, `<name>.provenance.json` (`oof.record_of`) records what made it:

    run (the run's folder, relative to the submission's), source ("stack" or the model),
    table (its path in the run) and table_sha256, decision_sha256 (the stack's decision;
    null for a model's table), folds_sha256, sample (relative likewise) and sample_sha256,
    format ("labels", "probabilities", "positive-class probability"), rows, and
    submission_sha256 (the CSV's own bytes).

A submission whose record matches what this call would write is current and kept.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from oof import (PredictionTable, RunPaths, StackerError, align, atomic_path, check_unique, file_digest, preview,
                 read_csv_strings, read_json, read_table, record_of, remove_temps, table_file, write_json)

from .inputs import load_run_folds
from .provenance import check_stack


def write_submission(run_dir: str | os.PathLike, sample_submission_path: str | os.PathLike,
                     out_path: str | os.PathLike | None = None, source: str | None = None,
                     force: bool = False, log=print) -> Path:
    """Write the submission of a run, with its provenance record beside it; skip it when it is current.

    The source is checked first: the stack needs a decision that matches the run's folds
    and tables now, and a stack/test.parquet predicted for that decision; a model's
    table must be of the run's folds. A submission whose record matches this call
    (table, decision and sample by sha256, and its own bytes) is current and kept; one
    with a stale record is rewritten; a file without a record is not ours: only
    `force` replaces it.

    Args:
        run_dir: the run directory.
        sample_submission_path: the competition's sample_submission.csv.
        out_path: where to write; default `<run>/submission.csv`.
        source: None for the stack (`stack/test.parquet`), or a model name for that
            model's `preds/<model>/test.parquet` (or test.csv).
        force: write it again, current or not, ours or not.
        log: callable for the summary line (None is silent).

    Returns:
        The path written (or found current).

    Raises:
        StackerError: a stale or missing stack, a missing table, a file of another tool
            without force, or ids, columns or labels that do not match the sample.
    """
    log = log or (lambda *a: None)
    paths = RunPaths(run_dir)
    out = Path(out_path) if out_path is not None else paths.submission
    folds = load_run_folds(paths)
    path, decision_sha = _source(paths, folds, source)
    sample_path = Path(sample_submission_path)
    record = {"run": _relative(paths.root, out), "source": source or "stack",
              "table": path.relative_to(paths.root).as_posix(), "table_sha256": file_digest(path),
              "decision_sha256": decision_sha, "folds_sha256": folds.sha256, "sample": _relative(sample_path, out),
              "sample_sha256": file_digest(sample_path) if sample_path.is_file() else None}
    table = _read_source(path, folds, source)  # after the digest: a table replaced meanwhile reads as stale
    if out.exists() and not force:
        changes = submission_changes(out, record)
        if not changes:
            log(f"submission: {out} is current (from {record['table']}); nothing to do")
            return out
        log(f"submission: {out} is stale ({'; '.join(changes)}); writing it again")
    frame = submission_frame(read_sample(sample_path), table, sample_path.name, log)
    write_with_record(out, frame, {**record, "format": submission_format(frame), "rows": len(frame)})
    log(f"submission: {out} ({len(frame)} rows, {submission_format(frame)}, from {path})")
    return out


def _relative(path: Path, out: Path) -> str:
    """`path` as seen from the submission's folder ("." for its own run): the pair moves together."""
    try:
        return Path(os.path.relpath(path.resolve(), out.resolve().parent)).as_posix()
    except ValueError:  # Windows: another drive has no relative path
        return str(path.resolve())


def _source(paths: RunPaths, folds, source: str | None) -> tuple[Path, str | None]:
    """(table path, decision digest or None) of the submission's source, checked against the run."""
    if source is None:
        return paths.stack_test, check_stack(paths, folds)
    path = table_file(paths.test(source))
    if not path.is_file():
        raise StackerError(f"{path}: not found; run predict-oof first")
    return path, None


def _read_source(path: Path, folds, source: str | None) -> PredictionTable:
    """The source table; a model's must record this run's folds and its own name, where it records them."""
    table = read_table(path, folds.classes, "test")
    sha, model = table.meta.get("folds_sha256"), table.meta.get("model")
    if source is not None and sha is not None and sha != folds.sha256:
        raise StackerError(f"{path}: was made on another fold assignment (folds sha256 {sha[:12]} != "
                           f"{folds.sha256[:12]}); run predict-oof again")
    if source is not None and model is not None and model != source:
        raise StackerError(f"{path}: records model {model!r}, not {source!r}")
    return table


# What a record field that differs means, in the stale message.
_CHANGED = {"source": "another source", "table": "another table", "table_sha256": "its table changed",
            "decision_sha256": "the stack was fitted again", "folds_sha256": "the folds changed",
            "sample_sha256": "the sample submission changed"}


def submission_changes(out: Path, record: dict) -> list[str]:
    """How the submission at `out` differs from what `record` would write; [] when it is current.

    Raises:
        StackerError: `out` has no provenance record: stacker did not write it, so only --force replaces it.
    """
    saved_path = record_of(out)
    if not saved_path.is_file():
        raise StackerError(f"{out}: already exists and has no {saved_path.name} (stacker did not write it); "
                           "pass --force to replace it")
    try:
        saved = read_json(saved_path)
        changes = [why for key, why in _CHANGED.items() if saved.get(key) != record[key]]
        if saved.get("submission_sha256") != file_digest(out):
            changes.append(f"{out.name} is not the file recorded")
    except (OSError, ValueError, AttributeError):
        changes = [f"{saved_path.name} is unreadable"]
    return changes


def write_with_record(out: Path, frame: pd.DataFrame, record: dict) -> None:
    """Write the submission CSV and its provenance record, both atomically.

    The record (with the CSV's sha256) is written once the CSV's bytes are complete and
    before the CSV takes its name: a crash between the two leaves a record that does
    not match the file at `out`, which the next submit rewrites, rather than a CSV
    without a record, which would look like another tool's file and need --force.
    """
    remove_temps(out.parent, f"{out.name}.")  # a killed submit's partial files (CSV and record)
    with atomic_path(out) as tmp:
        frame.to_csv(tmp, index=False)
        write_json(record_of(out), {**record, "submission_sha256": file_digest(tmp)})


def submission_format(frame: pd.DataFrame) -> str:
    """What a submission frame holds: a probability per class, a label, or P(positive class)."""
    if frame.shape[1] > 2:
        return "probabilities"
    return "positive-class probability" if pd.api.types.is_float_dtype(frame[frame.columns[1]]) else "labels"


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
