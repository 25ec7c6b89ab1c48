"""The train-base and predict-oof stages, and `stacker predict`'s image half, from a raw config.

The CLI calls these with the mapping `oof.load_config` resolved; a notebook can too.
"""
from __future__ import annotations

from oof import RunPaths, StackerError, load_folds, run_paths, write_run_config

from .config import base_configs, resolved_sections


def train_base_stage(cfg: dict, force: bool = False, parallel: int = 1, log=print) -> None:
    """Make the folds and the image cache, save run.yaml, train every pending (model, fold) job.

    With `force` every job's weights, history and checkpoint are deleted before the folds
    are rewritten: a --force stopped at any point leaves no old result that looks finished.
    """
    paths = run_paths(cfg)
    data, folds_cfg, specs, tta = base_configs(cfg)  # a config error is reported before torch is imported
    for spec in specs:
        if spec.train.keep == "best":
            log(f"note: {spec.name}: keep: best picks each fold's epoch on that fold's validation rows, which are "
                "its OOF rows; fit-stack will leave it out as optimistic unless --allow-suspicious")
    from .jobs import StageOptions, cache_size, job_grid, prepare_run, remove_job_outputs, train_base
    if force:
        remove_job_outputs(paths, job_grid(specs, folds_cfg.k), log)
    _, folds = prepare_run(paths, data, folds_cfg, cache_size(specs), force, log)
    write_run_config(paths, {**resolved_sections(data, folds_cfg, specs, tta), "stack": cfg.get("stack") or {}})
    # the outputs are gone already: deleting them again could delete a job another process finished since
    train_base(paths, specs, folds, data, StageOptions(force=False, parallel=parallel, log=log))


def predict_oof_stage(cfg: dict, models: list[str] | None = None, force: bool = False, log=print) -> None:
    """Predict every model's OOF rows and the test set with TTA (only `models` when given)."""
    paths = run_paths(cfg)
    data, _, specs, tta = base_configs(cfg)
    from .jobs import StageOptions, predict_oof
    if models:
        unknown = sorted(set(models) - {s.name for s in specs})
        if unknown:
            raise StackerError(f"--models: {unknown} are not models of the run {[s.name for s in specs]}")
        specs = [s for s in specs if s.name in models]
    predict_oof(paths, specs, load_folds(paths.folds), tta, data, StageOptions(force=force, log=log))


def predict_stage(cfg: dict, images, out_dir, models: list[str], force: bool = False, log=print) -> None:
    """`stacker predict`'s image half: decode a new test set into `out_dir` and write the test tables of
    every fold model of `models` (the models the saved stack uses) there; the run is only read.

    Args:
        cfg: the run's raw config (its run.yaml, found in the run wherever it has moved).
        images: a `base_models.dataset.NewTestImages`.
        out_dir: the output folder, never the run.
        models: the stack's models, `StackGuard.models_`.
        force: predict every table again (the decoded cache is reused where its files did not change).
        log: progress lines.
    """
    paths = run_paths(cfg)
    if not paths.config.is_file():
        raise StackerError(f"{paths.config}: not found; stacker predict reads a finished run's config")
    data, _, specs, tta = base_configs(cfg)
    from .jobs import StageOptions
    from .predict_run import SavedRun, predict_new_test
    predict_new_test(SavedRun(paths, data, specs, tta), models, images, RunPaths(out_dir),
                     StageOptions(force=force, log=log))
