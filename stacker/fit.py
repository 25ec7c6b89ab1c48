"""fit-stack on a run directory: read the tables, run the guard, write `<run>/stack/`.

    <run>/stack/decision.json      scores, intervals, choice, reason, config, models, folds sha256
    <run>/stack/combiner.json      the chosen candidate's learned state (weights, coefficients)
    <run>/stack/combiner.lgbm.txt  its LightGBM booster in text format, when it has one

`load_stack` rebuilds the fitted guard from these files (`StackGuard.from_state`).
    <run>/stack/leaderboard.csv    the leaderboard as a table
    <run>/stack/report.txt         the leaderboard as printed
    <run>/stack/test.parquet       the stack's test probabilities (a contract test table)

Every file is written atomically and decision.json last, so a crash never leaves
a decision that the other files do not back.
"""
from __future__ import annotations

import os

from oof import RunPaths, StackerError, atomic_path, check_model_name, read_json, write_json, write_table, write_text

from .config import StackConfig
from .estimator import StackGuard
from .inputs import load_run_folds, read_run_tables
from .report import format_report, leaderboard_frame


def fit_stack(run_dir: str | os.PathLike, config: StackConfig | None = None, models: list[str] | None = None,
              force: bool = False, log=print) -> dict:
    """Fit the guarded stack of a run and write `<run>/stack/`.

    Args:
        run_dir: the run directory (folds.parquet or folds.csv, preds/<model>/oof and test tables).
        config: meta-level options; default `StackConfig()`.
        models: models to stack; default every folder under preds/ with an OOF table.
        force: replace an existing stack/decision.json.
        log: callable for progress and the leaderboard (None is silent).

    Returns:
        The decision, as written to decision.json.

    Raises:
        StackerError: an existing decision without force, no models, or a table breaking the contract.
    """
    config = config or StackConfig()
    log = log or (lambda *a: None)
    paths = RunPaths(run_dir)
    if paths.decision.exists() and not force:
        raise StackerError(f"{paths.decision}: already exists; pass --force to fit the stack again")
    folds = load_run_folds(paths)
    models = [check_model_name(m) for m in models] if models else paths.predicted_models()
    if not models:
        raise StackerError(f"{paths.preds}: no model has an oof.parquet or oof.csv to stack")
    oof_tables, test_tables, fold_tables = read_run_tables(paths, models, folds,
                                                           per_fold=config.test_features == "per_fold")
    guard = StackGuard(config, log).fit(oof_tables, folds)
    test = guard.predict_table(test_tables, fold_tables)
    write_stack(paths, guard, test)
    log(format_report(guard.decision_, guard.timings_))
    return guard.decision_


def write_stack(paths: RunPaths, guard: StackGuard, test) -> None:
    """Write every stack/ file of a fitted guard; decision.json last."""
    paths.decision.unlink(missing_ok=True)  # until the new one is written, no decision vouches for stack/
    state = guard.state()
    booster = guard.candidate_.booster_text()
    if booster is not None:
        write_text(paths.stack_booster, booster)
        state["booster"] = paths.stack_booster.name  # the state names its booster file, beside it in stack/
    else:
        paths.stack_booster.unlink(missing_ok=True)  # a previous decision's booster would mislead
    write_json(paths.stack_state, state)
    write_table(paths.stack_test, test)
    with atomic_path(paths.leaderboard) as tmp:
        leaderboard_frame(guard.decision_).to_csv(tmp, index=False)
    write_text(paths.stack_report, format_report(guard.decision_, guard.timings_))
    write_json(paths.decision, guard.decision_)


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
        return StackGuard.from_state(decision, state, booster, source=str(paths.decision))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise StackerError(f"{paths.stack}: damaged or incomplete stack files ({type(e).__name__}: {e}); "
                           "run fit-stack --force") from None
