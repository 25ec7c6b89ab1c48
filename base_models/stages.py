"""The train-base and predict-oof stages, and `stacker predict`'s image half, from a raw config.

The CLI calls these with the mapping `oof.load_config` resolved; a notebook can too.
"""
from __future__ import annotations

import re

from oof import RunPaths, StackerError, info, load_config, load_folds, run_paths, write_run_config

from .config import ModelSpec, base_configs, engine_config, resolved_sections
from .job_state import check_full_keep


def train_base_stage(cfg: dict, force: bool = False, parallel: int = 1, log=info, only=None,
                     full: bool = False) -> None:
    """Make the folds and the image cache, save run.yaml, train every pending (model, fold) job; with `full`
    each model's full fit alone (`jobs.train_full`) in place of its fold jobs.

    With `force` every job's weights, history and checkpoint are deleted before the folds
    are rewritten: a --force stopped at any point leaves no old result that looks finished.
    With `only` ("MODEL:FOLD" items, `parse_only`; model names with `full`, `parse_full_only`) just
    those jobs are trained (and with `force` deleted first); the folds, cache and run.yaml are still
    made, under their locks, so each task of a cluster array can start on a fresh run, but never
    rewritten by force under the other jobs (nor ever by a --full call, which retrains full fits alone).
    A model with `train.keep: best` is refused with `full` before anything is made.
    """
    paths = run_paths(cfg)
    cfg = with_saved_duplicates(cfg, paths)
    data, folds_cfg, specs, tta = base_configs(cfg)  # a config error is reported before torch is imported
    chosen, engine = _chosen(only, specs, folds_cfg, full), engine_config(cfg)
    fitted = [s for s in specs if s.name in chosen] if full and chosen else specs
    if full:
        check_full_keep(fitted)  # before anything is made or trained
    else:
        _keep_best_notes(specs, log)
    from .jobs import (StageOptions, cache_size, full_jobs, job_grid, prepare_run, remove_job_outputs, select_jobs,
                       train_base, train_full)
    if force:
        grid = job_grid(specs, folds_cfg.k, folds_cfg.repeats)
        jobs = full_jobs(fitted) if full else select_jobs(grid, chosen, folds_cfg.k, folds_cfg.repeats)
        remove_job_outputs(paths, jobs, log)
    _, folds = prepare_run(paths, data, folds_cfg, cache_size(specs), force and not chosen and not full, log)
    # stack and submit are kept as given (their own stages check them); engine is how this call runs, not the run
    how = {key: cfg[key] for key in ("stack", "submit") if cfg.get(key)}
    write_run_config(paths, {**resolved_sections(data, folds_cfg, specs, tta), "stack": {}, **how})
    # the outputs are gone already: deleting them again could delete a job another process finished since
    options = StageOptions(force=False, parallel=parallel, log=log, only=() if full else chosen, engine=engine)
    if full:
        train_full(paths, fitted, folds, data, options)
    else:
        train_base(paths, specs, folds, data, options)


def _chosen(only, specs: list[ModelSpec], folds_cfg, full: bool) -> tuple:
    """--only's items checked: model names with --full (`parse_full_only`), else (model, repeat, fold) triples."""
    return parse_full_only(only, specs) if full else parse_only(only, specs, folds_cfg.k, folds_cfg.repeats)


def _keep_best_notes(specs: list[ModelSpec], log) -> None:
    for spec in specs:
        if spec.train.keep == "best":
            log(f"note: {spec.name}: keep: best picks each fold's epoch on that fold's validation rows, which are "
                "its OOF rows; fit-stack will leave it out as optimistic unless --allow-suspicious")


def parse_full_only(items, specs: list[ModelSpec]) -> tuple[str, ...]:
    """`--full --only`'s items as model names, each a model of the run, in the order given; () (every model)
    for none.

    Raises:
        StackerError: one line naming the first item that is not a model of the run.
    """
    names = [s.name for s in specs]
    chosen = []
    for item in map(str, items or ()):
        if ":" in item:
            raise StackerError(f"--only {item!r}: with --full, expected MODEL (its full fit), e.g. {names[0]}")
        if item not in names:
            raise StackerError(f"--only {item!r}: {item!r} is not a model of the run {names}")
        if item not in chosen:
            chosen.append(item)
    return tuple(chosen)


def with_saved_duplicates(cfg: dict, paths: RunPaths) -> dict:
    """`cfg` with the run's saved `folds.duplicates` where the run has folds and `cfg` does not set the key.

    The folds were made under the saved value (`off` for a run.yaml that predates the key), and the
    run.yaml written next records it: the default `group` there would make a later --force regroup.
    """
    folds = cfg.get("folds") or {}
    if not isinstance(folds, dict) or "duplicates" in folds or not paths.folds.is_file() or not paths.config.is_file():
        return cfg
    saved = load_config(run=str(paths.root)).get("folds")
    if not isinstance(saved, dict) or "duplicates" not in saved:
        return cfg
    return {**cfg, "folds": {**folds, "duplicates": saved["duplicates"]}}


def parse_only(items, specs: list[ModelSpec], k: int, repeats: int = 1) -> tuple[tuple[str, int, int], ...]:
    """--only's "MODEL:FOLD" items (or "MODEL:REPEAT:FOLD" with folds.repeats > 1) as (model, repeat,
    fold) triples, each checked; () (every job) for none.

    Raises:
        StackerError: one line naming the first item that is not MODEL:FOLD (MODEL:REPEAT:FOLD) with a
            model of the run, a repeat in 0..R-1 and a fold in 0..k-1.
    """
    names = [s.name for s in specs]
    form = "MODEL:FOLD" if repeats == 1 else "MODEL:REPEAT:FOLD"
    example = f"{names[0]}:0" if repeats == 1 else f"{names[0]}:1:0"
    triples = []
    for item in items or ():
        model, *numbers = str(item).split(":")
        if len(numbers) != (1 if repeats == 1 else 2) or not all(re.fullmatch(r"\d+", n.strip()) for n in numbers):
            why = "" if repeats == 1 else f" (the run has {repeats} repeats: name the repeat)"
            raise StackerError(f"--only {item!r}: expected {form}{why}, e.g. {example}")
        repeat, fold = (0, int(numbers[0])) if repeats == 1 else (int(numbers[0]), int(numbers[1]))
        if model not in names:
            raise StackerError(f"--only {item!r}: {model!r} is not a model of the run {names}")
        if fold >= k:
            raise StackerError(f"--only {item!r}: fold {fold} is out of range: the run's folds are 0..{k - 1}")
        if repeat >= repeats:
            raise StackerError(f"--only {item!r}: repeat {repeat} is out of range: the run's repeats are "
                               f"0..{repeats - 1}")
        if (model, repeat, fold) not in triples:
            triples.append((model, repeat, fold))
    return tuple(triples)


def predict_oof_stage(cfg: dict, models: list[str] | None = None, force: bool = False, log=info,
                      parallel: int = 1, only=None) -> None:
    """Predict every pending (model, fold) job's OOF rows and the test set with TTA (only `models` when
    given; with `only`, "MODEL:FOLD" items, just those jobs), and each model's tables once all its folds are in;
    then, without `only`, the test set with each model's full fit where it has one (`predict_full`)."""
    paths = run_paths(cfg)
    data, _, specs, tta = base_configs(cfg)
    engine = engine_config(cfg)
    from .jobs import StageOptions
    from .predict_oof import predict_oof
    if models:
        unknown = sorted(set(models) - {s.name for s in specs})
        if unknown:
            raise StackerError(f"--models: {unknown} are not models of the run {[s.name for s in specs]}")
        specs = [s for s in specs if s.name in models]
    folds = load_folds(paths.folds)
    options = StageOptions(force=force, parallel=parallel, log=log,
                           only=parse_only(only, specs, folds.k, folds.repeats),
                           engine=engine)
    predict_oof(paths, specs, folds, tta, data, options)
    from .predict_full import predict_full
    predict_full(paths, specs, folds, tta, data, options)


def predict_stage(cfg: dict, images, out_dir, models: list, options=None, budget: float | None = None) -> None:
    """`stacker predict`'s image half: decode a new test set into `out_dir` and write the test tables of
    `models` there (what the saved stack renders: each model's views, fold models and full fit); the run is
    only read.

    Args:
        cfg: the run's raw config (its run.yaml, found in the run wherever it has moved).
        images: a `base_models.dataset.NewTestImages`.
        out_dir: the output folder, never the run.
        models: `oof.views.renders` of the stack's decision (or model names: every view and fold model).
        options: a `base_models.jobs.StageOptions`: force (predict every table again; the decoded cache
            is reused where its files did not change), log, device (--device for every model), speed_ratio
            (the predicted time's card conversion).
        budget: --budget: the seconds the call may take (refused in one line when its predicted time is more).
    """
    paths = run_paths(cfg)
    if not paths.config.is_file():
        raise StackerError(f"{paths.config}: not found; stacker predict reads a finished run's config")
    data, _, specs, tta = base_configs(cfg)
    from .jobs import StageOptions
    from .predict_run import SavedRun, predict_new_test
    predict_new_test(SavedRun(paths, data, specs, tta), models, images, RunPaths(out_dir),
                     options or StageOptions(), budget)
