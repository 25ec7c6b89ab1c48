"""`stacker predict`, its stack half: a run's saved stack applied to test tables predicted in another folder.

    guard = saved_stack("/kaggle/input/my-run")                 # checked; guard.models_ are the models it uses
    ... base_models' predict_run writes OUT/preds/<model>/test*.parquet for guard.models_ ...
    apply_stack("/kaggle/input/my-run", "/kaggle/working/pred", "sample_submission.csv")

The run is only read (it may be read-only and moved): its decision must still match its own
tables (`check_stack`, as submit requires), and `load_stack` rebuilds the fitted guard from
stack/. OUT's tables (`RunPaths(OUT)` layout, written by `base_models.predict_run` or by any
tool in the contract's layout) must record the run's folds and, where both record them, the
same fold models' weights as the run's table of that model. Written under OUT:

    OUT/stack/test.parquet      the stack's probabilities (`StackGuard.predict_table`, which follows
                                stack.test_features: mean, or per_fold from OUT's test_fold<k> tables);
                                its metadata records the digest of the run's decision
    OUT/submission.csv          in the sample submission's layout; without one, `id,label` with the
                                ids sorted (the images' file names) and the argmax class's name
    OUT/submission.csv.provenance.json   what made it, as submit records (the run's folder absolute)

stack/test.parquet is recomputed on every call (milliseconds; the same inputs give the same
file). The submission is kept when its record matches, rewritten when stale, and one without a
record is not ours: only `force` replaces it. Never imports torch.
"""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from oof import PredictionTable, RunPaths, StackerError, file_digest, info, read_table, write_table
from oof.views import renders

from .estimator import StackGuard
from .fit import load_stack
from .inputs import load_run_folds
from .provenance import check_stack
from .submit import SubmitOptions, read_sample, submission_changes, submission_frame, submission_layout, \
    write_with_record

# The layout of a submission written without a sample submission: the id, then the predicted class.
NO_SAMPLE_COLUMNS = ("id", "label")


def saved_stack(run_dir: str | os.PathLike) -> StackGuard:
    """The run's fitted stack, once its decision is checked against the run's folds and tables (read only).

    Raises:
        StackerError: no stack, a stale one (the run's tables changed since fit-stack), damaged files.
    """
    paths = RunPaths(run_dir)
    check_stack(paths, load_run_folds(paths))
    return load_stack(paths.root)


def apply_stack(run_dir: str | os.PathLike, out_dir: str | os.PathLike, sample_submission=None,
                force: bool = False, log=info, fmt: str = "auto") -> Path:
    """Apply the run's stack to OUT's test tables; write OUT's stack test table and submission.

    Args:
        run_dir: the finished run (only read).
        out_dir: the folder holding the new test tables (`RunPaths(out_dir).test(model)`, per fold too).
        sample_submission: the competition's sample; None writes `id,label`, ids sorted.
        force: replace a submission.csv that stacker did not write.
        log: progress lines (None is silent).
        fmt: submit.format: "auto", "labels" or "proba" (stacker.submit).

    Returns:
        The submission's path.

    Raises:
        StackerError: a stale or missing stack; a missing table, or one of another run's fold models;
            ids, columns or labels that do not match the sample.
    """
    log = log or (lambda *a: None)
    run, out = RunPaths(run_dir), RunPaths(out_dir)
    folds = load_run_folds(run)
    decision_sha = check_stack(run, folds)
    guard = load_stack(run.root)
    tables, fold_tables = _new_tables(run, out, guard, folds)
    table = guard.predict_table(tables, fold_tables)
    write_table(out.stack_test, replace(table, meta={**table.meta, "decision_sha256": decision_sha}))
    log(f"predict: stack {guard.decision_['chosen']} of {', '.join(guard.models_)} -> {out.stack_test}")
    record = {"run": str(run.root.resolve()), "source": "stack", "table": out.stack_test.relative_to(out.root)
              .as_posix(), "table_sha256": file_digest(out.stack_test), "decision_sha256": decision_sha,
              "folds_sha256": folds.sha256}
    options = SubmitOptions(force=force, fmt=fmt, metric=guard.config.metric)  # metric: where the sample cannot say
    return _write_submission(out, table, sample_submission, record, options, log)


def _new_tables(run: RunPaths, out: RunPaths, guard: StackGuard, folds) -> tuple[dict, list[dict]]:
    """OUT's test tables of the stack's models, and per repeat and fold theirs (only for test_features
    per_fold; repeat-major, repeat r's in `OUT.for_repeat(r)`'s folders)."""
    per_fold = guard.config.test_features == "per_fold"
    plan = dict(zip(guard.models_, renders(guard.decision_), strict=True))
    weights = {}
    for unit, render in plan.items():  # the run's fold models, the first ones the stack renders, then its full fit
        recorded = read_table(run.test(render.model), folds.classes, "test").meta.get("weights_sha256")
        n = len(recorded or []) if render.fold_models is None else render.fold_models
        full = read_table(run.test_full(render.model), folds.classes, "test").meta["weights_sha256"] \
            if render.full else []
        weights[unit] = None if recorded is None else recorded[:n] + full
    tables = {unit: _new_table(out.test(r.model), weights[unit], folds, views=r.views) for unit, r in plan.items()}
    slots = [(r, f) for r in range(folds.repeats) for f in range(folds.k)]
    first = next(iter(plan.values()))
    slots = slots[:len(slots) if first.fold_models is None else first.fold_models] + ([(0, None)] if first.full else [])
    fold_tables = [{unit: _new_table(out.test_full(p.model) if f is None else out.for_repeat(r).test_fold(p.model, f),
                                     weights[unit], folds.for_repeat(r), folds.sha256, p.views)
                    for unit, p in plan.items()} for r, f in (slots if per_fold else [])]
    return tables, fold_tables


def _new_table(path: Path, weights: list | None, folds, run_sha256: str | None = None,
               views: int | None = None) -> PredictionTable:
    """A new test table, made by the run's fold models where it records which (a fold table of one
    repeat records that repeat's folds, `folds`, or the whole run's, `run_sha256`), at `views` views where
    the stack renders fewer than every one (None: as recorded)."""
    table = read_table(path, folds.classes, "test")
    tta = table.meta.get("tta") or {}
    if views is not None and "views" in tta and len(tta["views"]) + 1 != views:
        raise StackerError(f"{path}: rendered at {len(tta['views']) + 1} views, but the stack applies this model "
                           f"at {views}; run stacker predict again")
    sha, own = table.meta.get("folds_sha256"), table.meta.get("weights_sha256")
    if sha is not None and sha not in (folds.sha256, run_sha256):
        raise StackerError(f"{path}: predicted by another run's fold models (folds sha256 {sha[:12]} != "
                           f"{folds.sha256[:12]}); run stacker predict again")
    if own is not None and weights is not None and own != weights:
        raise StackerError(f"{path}: predicted by other weights than the run's table of that model records; "
                           "run stacker predict again")
    return table


def _write_submission(out: RunPaths, table: PredictionTable, sample_path, record: dict, options: SubmitOptions,
                      log) -> Path:
    """OUT's submission from the stack's table, with its record (`record` and the sample's); kept when current."""
    sample, name = _sample(sample_path, table)
    record = {**record, "sample": None if sample_path is None else str(Path(sample_path).resolve()),
              "sample_sha256": None if sample_path is None else file_digest(sample_path)}
    record["format"], why = submission_layout(sample, table.classes, options, name)
    path = out.submission
    if path.exists() and not options.force:
        changes = submission_changes(path, record)
        if not changes:
            log(f"submission: {path} is current (from {record['table']}); nothing to do")
            return path
        log(f"submission: {path} is stale ({'; '.join(changes)}); writing it again")
    if why:
        log(f"submission: {why}")
    frame = submission_frame(sample, table, name, record["format"], log)
    write_with_record(path, frame, {**record, "rows": len(frame)})
    log(f"submission: {path} ({len(frame)} rows, {record['format']}, from {out.stack_test})")
    return path


def _sample(sample_path, table: PredictionTable) -> tuple[pd.DataFrame, str]:
    """(sample, its name in messages): the file's, or `id,label` over the table's ids sorted, labels blank."""
    if sample_path is not None:
        return read_sample(Path(sample_path)), Path(sample_path).name
    ids = np.sort(table.ids.astype(str))
    return pd.DataFrame({NO_SAMPLE_COLUMNS[0]: ids, NO_SAMPLE_COLUMNS[1]: ""}), "the images' ids"
