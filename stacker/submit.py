"""submit: test probabilities -> a submission in `sample_submission.csv`'s columns and id order.

The sample's first column is the id (kept as text: "007" stays "007"). What the
other columns hold is the format (`submit.format`, `SubmitConfig`):

    columns exactly the class names     a probability per class       "probabilities"
    one column, "labels"                the argmax class's name       "labels"
    one column, two classes, "proba"    P(second class)               "positive-class probability"

Labels are written as the class strings (class names come from folder names, so
"07" stays "07" even where the sample's placeholders look numeric); the positive
class of two is the second in the run's class order (sorted names: "1" of "0"/"1").
Format "auto" lets the sample decide: per-class columns or fractional placeholders
(Kaggle's `id,target` of 0.5) ask for probabilities, class names for labels. One
column of integer or blank placeholders and two classes (Histopathologic Cancer
Detection's `id,label` of 0s) says neither; there the metric decides (an AUC or a
log-loss scores probabilities, and a 0/1 label throws the ranking away) and the
log says which was written and why. Everything is checked before anything is written.

Beside the submission, `<name>.provenance.json` (`oof.record_of`) records what made it:

    run (the run's folder, relative to the submission's), source ("stack" or the model),
    table (its path in the run) and table_sha256, decision_sha256 (the stack's decision;
    null for a model's table), folds_sha256, sample (relative likewise) and sample_sha256,
    format (one of the three above), rows, and submission_sha256 (the CSV's own bytes).

A submission whose record matches what this call would write is current and kept.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from oof import (PredictionTable, RunPaths, StackerError, align, atomic_path, check_unique, file_digest, info, preview,
                 read_csv_strings, read_json, read_table, record_of, remove_temps, table_file, write_json)

from .config import SubmitConfig
from .inputs import load_run_folds
from .provenance import check_stack

# What a submission holds: the `format` of its provenance record.
LABELS, PROBABILITIES, POSITIVE = "labels", "probabilities", "positive-class probability"

# scikit-learn scorers of probabilities or a ranking (roc_auc also stands for roc_auc_ovr, ...): under
# format auto they make a one-column binary sample of integer placeholders a probability submission.
PROBABILITY_METRICS = ("roc_auc", "average_precision", "neg_log_loss", "neg_brier_score", "d2_log_loss_score",
                       "d2_brier_score")


@dataclass(frozen=True)
class SubmitOptions:
    """The keyword options of `write_submission`.

    Attributes:
        source: None for the stack (`stack/test.parquet`), or a model name for that
            model's `preds/<model>/test.parquet` (or test.csv).
        force: write it again, current or not, ours or not.
        fmt: "auto", "labels" or "proba" (`SubmitConfig.format`).
        metric: the scorer the competition is judged by (the CLI passes `stack.metric`);
            decides format auto where the sample does not.
    """

    source: str | None = None
    force: bool = False
    fmt: str = "auto"
    metric: str | None = None

    def __post_init__(self):
        SubmitConfig(format=self.fmt)  # one vocabulary, one check: "submit.format: expected one of ..."


def write_submission(run_dir: str | os.PathLike, sample_submission_path: str | os.PathLike,
                     out_path: str | os.PathLike | None = None, log=info, **options) -> Path:
    """Write the submission of a run, with its provenance record beside it; skip it when it is current.

    The source is checked first: the stack needs a decision that matches the run's folds
    and tables now; a model's table must be of the run's folds. A submission whose record
    matches this call (table, decision, sample, format, and its own bytes) is current and
    kept; one with a stale record is rewritten; a file without a record is not ours: only
    `force` replaces it.

    Args:
        run_dir: the run directory.
        sample_submission_path: the competition's sample_submission.csv.
        out_path: where to write; default `<run>/submission.csv`.
        log: callable for the summary lines (None is silent).
        **options: `SubmitOptions` fields: source, force, fmt ("auto", "labels", "proba"), metric.

    Returns:
        The path written (or found current).

    Raises:
        StackerError: a stale or missing stack, a missing table, a file of another tool without
            force, ids, columns or labels that do not match the sample, or a format it cannot hold.
    """
    log = log or (lambda *a: None)
    options = SubmitOptions(**options)
    paths = RunPaths(run_dir)
    out = Path(out_path) if out_path is not None else paths.submission
    folds = load_run_folds(paths)
    path, decision_sha = _source(paths, folds, options.source)
    sample_path = Path(sample_submission_path)
    record = {"run": _relative(paths.root, out), "source": options.source or "stack",
              "table": path.relative_to(paths.root).as_posix(), "table_sha256": file_digest(path),
              "decision_sha256": decision_sha, "folds_sha256": folds.sha256, "sample": _relative(sample_path, out),
              "sample_sha256": file_digest(sample_path) if sample_path.is_file() else None}
    sample = read_sample(sample_path)  # after the digests: a file replaced meanwhile reads as stale
    record["format"], why = submission_layout(sample, folds.classes, options, sample_path.name)
    table = _read_source(path, folds, options.source)
    if out.exists() and not options.force and _is_current(out, record, log):
        return out
    if why:
        log(f"submission: {why}")
    frame = submission_frame(sample, table, sample_path.name, record["format"], log)
    write_with_record(out, frame, {**record, "rows": len(frame)})
    log(f"submission: {out} ({len(frame)} rows, {record['format']}, from {path})")
    return out


def _is_current(out: Path, record: dict, log) -> bool:
    """Whether the submission at `out` is what `record` would write; says so, or why it is stale."""
    changes = submission_changes(out, record)
    if changes:
        log(f"submission: {out} is stale ({'; '.join(changes)}); writing it again")
    else:
        log(f"submission: {out} is current (from {record['table']}); nothing to do")
    return not changes


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
            "sample_sha256": "the sample submission changed", "format": "the format changed"}


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


def read_sample(path: Path) -> pd.DataFrame:
    """The sample submission as strings, blanks kept as ''."""
    if not path.is_file():
        raise StackerError(f"{path}: sample submission not found")
    sample = read_csv_strings(path)
    if sample.shape[1] < 2:
        raise StackerError(f"{path}: needs an id column and at least one prediction column")
    return sample


def submission_layout(sample: pd.DataFrame, classes, options: SubmitOptions, sample_name: str) -> tuple[str, str]:
    """(format, why) of the submission `sample` asks for under `options.fmt`; why is "" unless worth a log line.

    Raises:
        StackerError: columns that are neither the class names nor one column, or a format they cannot hold.
    """
    columns, classes = [str(c) for c in sample.columns[1:]], list(classes)
    if sorted(columns) == sorted(classes):
        if options.fmt == "labels":
            raise StackerError(f"{sample_name}: submit.format=labels needs one label column, but the sample has "
                               f"one probability column per class {columns}")
        return PROBABILITIES, ""
    if len(columns) != 1:
        raise StackerError(f"{sample_name}: columns {columns} are neither one label column nor the class "
                           f"names {classes}")
    return _one_column(sample[sample.columns[1]], classes, options, sample_name)


def _one_column(values: pd.Series, classes: list[str], options: SubmitOptions, sample_name: str) -> tuple[str, str]:
    """(format, why) of a sample `id,<column>`: labels, or P(positive class) of two classes."""
    column, fmt = values.name, options.fmt
    probability = f"P({classes[-1]!r})"
    if fmt == "auto" and _fractional(values):  # Kaggle's `id,target` of 0.5
        _need_two_classes(classes, f"column {column!r} holds fractional placeholders (a probability)", sample_name)
        return POSITIVE, f"{sample_name} asks for a probability: writing {probability} in {column!r}"
    if fmt == "proba":
        _need_two_classes(classes, f"submit.format=proba writes P(positive class) in its one column {column!r} "
                          "(a probability per class needs a column per class)", sample_name)
    if len(classes) != 2 or _fractional(values) or not _numbers_or_blank(values):
        return (POSITIVE if fmt == "proba" else LABELS), ""  # the format or the sample says which
    # Integer or blank placeholders of two classes: labels or P(positive class); the format, else the metric, says.
    proba = fmt == "proba" or (fmt == "auto" and scores_probabilities(options.metric))
    why = f"submit.format={fmt}" if fmt != "auto" else _metric_says(options.metric, proba)
    return (POSITIVE if proba else LABELS), (
        f"{sample_name}: column {column!r} (placeholders {preview(sorted(set(values)), 3)}) may hold labels or "
        f"{probability}; writing {probability if proba else 'labels'}, as {why}")


def _need_two_classes(classes: list[str], rule: str, sample_name: str) -> None:
    if len(classes) != 2:
        raise StackerError(f"{sample_name}: {rule}, but there are {len(classes)} classes, not 2")


def scores_probabilities(metric: str | None) -> bool:
    """Whether scikit-learn scorer `metric` scores probabilities or a ranking, not labels."""
    return metric is not None and (metric in PROBABILITY_METRICS or metric.startswith("roc_auc_"))


def _metric_says(metric: str | None, proba: bool) -> str:
    """Why format auto wrote what it wrote in the ambiguous binary case, and how to change it."""
    if proba:
        return f"stack.metric {metric!r} scores probabilities (submit.format=labels writes labels)"
    scorer = "no metric was given" if metric is None else f"stack.metric {metric!r} scores labels"
    return f"{scorer} (submit.format=proba writes the probability, for AUC or log-loss)"


def submission_frame(sample: pd.DataFrame, table: PredictionTable, sample_name: str, layout: str,
                     log=info) -> pd.DataFrame:
    """The submission: `sample`'s columns and id order, filled from `table` in format `layout`; checked first."""
    id_col, columns = sample.columns[0], [str(c) for c in sample.columns[1:]]
    ids = sample[id_col].to_numpy(dtype=object)
    check_unique(ids, sample_name)
    order = align(table.ids, ids, table.source, sample_name)
    proba = table.proba[order]  # (N, C) in the sample's id order
    classes = list(table.classes)
    if layout == PROBABILITIES:
        return pd.DataFrame({id_col: ids, **{c: proba[:, classes.index(c)] for c in columns}})
    if layout == POSITIVE:
        return pd.DataFrame({id_col: ids, columns[0]: proba[:, -1]})  # (N,) P(second class of two)
    _check_placeholders(sample[sample.columns[1]], ids, classes, sample_name, log)
    return pd.DataFrame({id_col: ids, columns[0]: np.asarray(classes, dtype=object)[proba.argmax(axis=1)]})


def _fractional(values: pd.Series) -> bool:
    """Placeholders such as 0.5: numbers, at least one of them not whole."""
    numbers = pd.to_numeric(values, errors="coerce")
    return bool(len(values)) and numbers.notna().all() and (numbers != numbers.round()).any()


def _numbers_or_blank(values: pd.Series) -> bool:
    """Placeholders such as 0 or '': they name no class, so they do not say labels."""
    return bool((values.eq("") | pd.to_numeric(values, errors="coerce").notna()).all())


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
