"""fit-stack on a run directory: read the tables, run the guard, write `<run>/stack/`.

    <run>/stack/decision.json      scores, intervals, choice, reason, config, models, folds sha256,
                                   and the sha256 of every table read (`provenance`)
    <run>/stack/combiner.json      the chosen candidate's learned state (weights, coefficients)
    <run>/stack/combiner.lgbm.txt  its LightGBM booster in text format, when it has one
    <run>/stack/repeat<r>/combiner.lgbm.txt   with repeats (folds.repeats R > 1), repeat r's booster
                                   (r > 0; repeat 0's is the file above): the choice is fitted once
                                   per repeat, and combiner.json then holds {"candidate", "models",
                                   "classes", "repeats": [each repeat's state, naming its booster]}
    <run>/stack/leaderboard.csv    the leaderboard as a table
    <run>/stack/report.txt         the leaderboard as printed
    <run>/stack/test.parquet       the stack's test probabilities (a contract test table);
                                   its metadata records the digest of the decision it belongs to

Every file is written atomically and decision.json last (after the old stack's
files are removed, decision.json first), so a crash never leaves a decision that
the other files do not back. A rerun with nothing changed skips; a changed input
refits. `load_stack` rebuilds the fitted guard from these files (`StackGuard.from_state`).
"""
from __future__ import annotations

import os
from dataclasses import replace

import numpy as np

from oof import (PredictionTable, RunPaths, StackerError, atomic_path, check_model_name, info, read_json, write_json,
                 write_table, write_text)

from .budget import read_predict_inputs
from .config import StackConfig
from .estimator import StackGuard
from .inputs import has_fold_tables, load_run_folds, read_run_tables
from .provenance import clear_stack, decision_digest, describe, stack_changes, stack_inputs
from .repeats import RepeatAverage
from .report import format_report, leaderboard_frame
from .applied import applied_side, check_test_side, stack_test_tables
from .workers import start_workers


def fit_stack(run_dir: str | os.PathLike, config: StackConfig | None = None, models: list[str] | None = None,
              force: bool = False, log=info) -> dict:
    """Fit the guarded stack of a run and write `<run>/stack/`; skip it when it is current.

    The stack is current when decision.json records the folds, the models, every table
    they read (by sha256) and the config of this call, and stack/'s files belong to it.
    Anything else is redone (fit-stack owns stack/), with the change named.

    Args:
        run_dir: the run directory (folds.parquet or folds.csv, preds/<model>/oof and test tables).
        config: meta-level options; default `StackConfig()`.
        models: models to stack; default every folder under preds/ with an OOF table.
        force: remove stack/'s files (decision.json first) and fit again, current or not.
        log: callable for progress and the leaderboard (None is silent).

    Returns:
        The decision, as written to decision.json (or read from it when current).

    Raises:
        StackerError: no models, or a table breaking the contract.
    """
    config = config or StackConfig()
    log = log or (lambda *a: None)
    paths = RunPaths(run_dir)
    folds = load_run_folds(paths)
    names = _model_names(paths, models, folds, config)
    # Per-fold test tables feed "per_fold" test features, and the leak check whenever they exist.
    per_fold = config.test_features == "per_fold" or has_fold_tables(paths, names, folds)
    inputs = stack_inputs(paths, names, folds.k if per_fold else 0, given=bool(models),  # digests before reading
                          repeats=folds.repeats)
    if force:
        clear_stack(paths)  # an interrupted --force leaves no decision, so nothing looks finished
    elif paths.decision.exists():
        changes, decision = stack_changes(paths, folds, config.to_dict(), inputs)
        if not changes:
            log(f"fit-stack: {paths.decision} is current (same folds, models, tables and config; chosen "
                f"{decision['chosen']}); nothing to do, --force fits it again")
            return decision
        log(f"fit-stack: {paths.decision} is stale ({describe(changes)}); fitting the stack again")
    workers = start_workers(config, folds.n_rows * len(names) * len(folds.classes))  # ready when the fits begin
    oof_tables, test_tables, fold_tables = read_run_tables(paths, names, folds, per_fold)
    predict = read_predict_inputs(paths, names, folds, len(next(iter(test_tables.values())).ids),
                                  views=config.predict_budget is not None)
    guard = StackGuard(config, log).fit(oof_tables, folds, test_tables, fold_tables, workers, predict)
    record_test_side(guard.decision_, config, folds, log)
    decision = {**guard.decision_, "inputs": inputs}
    test_in = stack_test_tables(paths, guard.decision_, folds, test_tables, fold_tables)
    write_stack(paths, guard, guard.predict_table(*test_in), decision, folds)
    log(format_report(guard.decision_, guard.timings_))
    return decision


def _model_names(paths: RunPaths, models: list[str] | None, folds, config: StackConfig) -> list[str]:
    """The models to stack: those given, else every one under preds/ with an OOF table; refused with a test
    side the run cannot give them (`check_test_side`)."""
    names = [check_model_name(m) for m in models] if models else paths.predicted_models()
    if not names:
        raise StackerError(f"{paths.preds}: no model has an oof.parquet or oof.csv to stack")
    check_test_side(paths, names, folds, config)
    return names


def record_test_side(decision: dict, config: StackConfig, folds, log) -> None:
    """The decision's `test_side` (`stacker.applied.applied_side`), its warning logged and kept."""
    decision["test_side"] = side = applied_side(decision, config, folds)
    if "warning" in side:
        log(f"warning: {side['warning']}")
        decision.setdefault("warnings", []).append(side["warning"])


def write_stack(paths: RunPaths, guard: StackGuard, test: PredictionTable, decision: dict, folds=None) -> None:
    """Write every stack/ file of a fitted guard; decision.json last.

    Args:
        paths: the run.
        guard: the fitted guard.
        test: its test table; its metadata gains the digest of `decision`.
        decision: what decision.json gets: the guard's decision and its inputs.
    """
    clear_stack(paths)  # until the new decision is written, none vouches for stack/
    state = guard.state()
    booster = guard.candidate_.booster_text()
    if booster is not None:
        write_text(paths.stack_booster, booster)
        state["booster"] = paths.stack_booster.name  # the state names its booster file, beside it in stack/
    texts = guard.candidate_.booster_texts() if isinstance(guard.candidate_, RepeatAverage) else []
    for r, text in enumerate(texts):
        if text is not None:  # each repeat's state names its booster, relative to stack/
            path = repeat_booster(paths, r)
            write_text(path, text)
            state["repeats"][r]["booster"] = path.relative_to(paths.stack).as_posix()
    write_json(paths.stack_state, state)
    write_table(paths.stack_test, replace(test, meta={**test.meta, "decision_sha256": decision_digest(decision)}))
    if folds is not None:
        write_table(paths.stack_oof, chosen_oof(guard, folds))
    with atomic_path(paths.leaderboard) as tmp:
        leaderboard_frame(guard.decision_).to_csv(tmp, index=False)
    write_text(paths.stack_report, format_report(guard.decision_, guard.timings_))
    write_json(paths.decision, decision)


def chosen_oof(guard: StackGuard, folds) -> PredictionTable:
    """The chosen candidate's meta-level OOF probabilities as an OOF table (R x N rows with repeats)."""
    proba = guard.oof_[guard.decision_["chosen"]]
    meta = {"model": f"stack:{guard.decision_['chosen']}", "folds_sha256": folds.sha256}
    if folds.repeats == 1:
        return PredictionTable(folds.ids, proba, folds.classes, folds.fold, meta)
    repeat = np.repeat(np.arange(folds.repeats), folds.n_rows)
    return PredictionTable(np.tile(folds.ids, folds.repeats), proba.reshape(-1, proba.shape[-1]), folds.classes,
                           folds.fold_matrix.ravel(), meta, repeat=repeat)


def repeat_booster(paths: RunPaths, repeat: int):
    """Repeat `repeat`'s booster file: the run's booster file, in stack/'s folder of that repeat
    (RunPaths' `repeat<r>` folders: repeat 0 is the run's own `stack_booster`)."""
    return paths.for_repeat(repeat).stack_booster


def load_stack(run_dir: str | os.PathLike) -> StackGuard:
    """The fitted guard of a run, rebuilt from `<run>/stack/` (JSON and LightGBM text, no pickle).

    Its `predict_proba` / `predict_table` apply the chosen candidate to new test tables
    in a process that never saw the OOF rows, e.g. a Kaggle notebook.
    """
    paths = RunPaths(run_dir)
    if not paths.decision.is_file():
        raise StackerError(f"{paths.decision}: no fitted stack; run fit-stack first")
    try:
        decision = read_json(paths.decision)
        state = read_json(paths.stack_state)
        booster = (paths.stack / state["booster"]).read_text(encoding="utf-8") if "booster" in state else None
        if "repeats" in state:  # one fit per repeat, each naming its own booster
            booster = [(paths.stack / s["booster"]).read_text(encoding="utf-8") if "booster" in s else None
                       for s in state["repeats"]]
        return StackGuard.from_state(decision, state, booster, source=str(paths.decision))
    except StackerError as e:  # a damaged JSON file names itself; a saved config that fails the checks does not
        raise StackerError(str(e) if str(paths.stack) in str(e) else f"{paths.decision}: {e}; run fit-stack --force") \
            from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise StackerError(f"{paths.stack}: damaged or incomplete stack files ({type(e).__name__}: {e}); "
                           "run fit-stack --force") from None
