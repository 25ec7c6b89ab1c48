"""predict-oof's full-fit part: each model's full fit (`train-base --full`) predicts the test set with TTA.

A model's full fit is trained on every train row, so it has no OOF rows; it predicts the test set
once, with the model's TTA exactly as its fold models do (`predict.predict_with_tta`), and writes

    preds/<model>/test_full.parquet           the test set, views combined (test_full.<target>.parquet
                                              per extra target)
    preds/<model>/test_views_full.parquet     the main target's views apart (`oof.views`)

The tables record what the model's fold tables record (`predict_oof.table_meta`: folds, TTA settings and
views, precision, both caches) with the full fit's own weights digest (`weights_sha256`, a list of one)
and `fit: full`; the test tables add `job` (seconds, and the prediction cost as `predict_oof` measures
it: loading, then the test pass), which is never compared. A model's tables are current while they
record exactly that (`table_schema.is_current`): current ones are skipped, --force predicts them again.
Stale full weights (other rows or labels, images, recipe, or a changed weights file) are refused in
one line; a model without a full fit gets nothing. A job runs under the full fit's lock (`full.lock`):
never while it is being trained, never twice at once; its jobs go through the call's engine.

predict-oof calls this after its fold jobs (`stages.predict_oof_stage`), never under `--only`, whose
items name fold jobs.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from oof import Folds, RunPaths, StackerError, info, read_table, remove_temps, validate_test
from oof.views import ViewTable, read_views, write_views

from .batches import CacheBudget, ImageSource, place_images
from .cache import load_cache
from .config import DataConfig, ModelSpec, TTAConfig
from .jobs import FoldJob, JobRun, StageOptions, extra_targets, full_jobs, load_targets
from .predict import predict_with_tta
from .predict_oof import predict_locked, prediction_cost, table_meta, write_test
from .table_schema import is_current, recorded_views
from .train import Target, is_trained, job_sources, load_fold_model, stale_reason, weights_digest


@dataclass(frozen=True)
class FullPredictRun(JobRun):
    """What every full-fit prediction of one predict-oof call shares; picklable, so it travels to an engine's
    workers (the test cache does not: each worker opens it and checks its digest)."""

    paths: RunPaths
    targets: list[Target]
    batch_size: int  # tta.batch_size
    test_sha256: str  # the test cache's digest this call predicts from
    test_ids: np.ndarray
    metas: dict  # model -> what its full-fit tables record (`full_meta`)
    log: Callable[[str], None] = info
    stage = "predict-oof"

    def predict(self, job: FoldJob, test: ImageSource) -> float | None:
        """Predict `job`'s test tables under its lock (`predict_locked`); skipped where another process holds it
        or predicted it meanwhile.

        Returns:
            Seconds predicting; None when skipped.
        """
        name = job.model.name

        def work():
            for path in (self.paths.test_full(name), self.paths.test_views_full(name)):
                remove_temps(path.parent, path.stem)  # a killed job's partial writes
            _predict_full(self, job, test)

        return predict_locked(self, job, lambda: full_tables_current(self, job.model), work)

    def place(self, device, budget: CacheBudget) -> ImageSource:
        """The test cache on `device`: the very cache (by digest) this call checked."""
        test = load_cache(self.paths, "test")
        if test.digest != self.test_sha256:
            raise StackerError(f"{self.paths.cache_index('test')}: the test image cache changed while predict-oof "
                               "ran (another process rebuilt it); run predict-oof again")
        (images,) = place_images([test.images], device, budget, self.log)
        return images

    def do(self, job: FoldJob, test: ImageSource) -> float | None:
        return self.predict(job, test)


def predict_full(paths: RunPaths, specs: list[ModelSpec], folds: Folds, tta: TTAConfig,
                 data: DataConfig | None = None, options: StageOptions = StageOptions()) -> list[str]:
    """Predict the test set with every full fit of `specs` whose tables are not current.

    Args:
        paths: the run directory.
        specs: the call's models; those without a full fit are left out.
        folds: the run's folds (the full fit's rows, and what the tables record).
        tta: the TTA views and how they are combined, as for the fold models.
        data: the `data:` section (its extra_targets); None for the main target alone.
        options: force (predict again even when current), parallel, log, engine; with `only` nothing is
            predicted (its items name fold jobs).

    Returns:
        The models whose full fit this call predicted.

    Raises:
        StackerError: a full fit whose weights are stale (one line naming it and the command that retrains it).
    """
    fitted = [s for s in specs if is_trained(paths, s.name, None)]
    if not fitted:
        return []
    if options.only:
        options.log(f"predict-oof: --only names fold jobs; the full fits of {[s.name for s in fitted]} are "
                    "predicted by a call without it")
        return []
    train, test = load_cache(paths, "train"), load_cache(paths, "test")
    metas = {s.name: _current_meta(paths, s, folds, tta, (train, test)) for s in fitted}  # stale ones refused first
    run = FullPredictRun(paths, load_targets(paths, folds, extra_targets(data)), tta.batch_size, test.digest,
                         test.ids, metas, options.log)
    if not len(test.ids):
        options.log("predict-oof: the test set is empty; no full fit predicts it")
        return []
    todo = [job for job in full_jobs(fitted) if options.force or not full_tables_current(run, job.model)]
    for job in todo:
        remove_full_tables(paths, job.model.name, run.targets)  # a stopped call leaves none that look current
    options.log(f"predict-oof: {len(fitted)} full fits, {len(fitted) - len(todo)} already predicted, "
                f"{len(todo)} to run")
    if todo:
        run.dispatch(todo, options)
    return [job.model.name for job in todo]


def full_meta(paths: RunPaths, spec: ModelSpec, folds: Folds, tta: TTAConfig, caches: tuple) -> dict:
    """What a model's full-fit tables record: `table_meta` of the model with the full fit's weights digest
    and `fit: full`; `caches` the (train, test) caches this call predicts from.

    Raises:
        StackerError: the full fit's weights are not what train-base --full would train from this run (`stale_reason`).
    """
    train, test = caches
    reason = stale_reason(paths, spec, None, job_sources(folds.for_repeat(0), None, spec, train.digest))
    if reason:
        raise StackerError(f"{paths.weights(spec.name, None)}: {spec.name} full fit was {reason}; run "
                           f"train-base --full --force --only {spec.name} to retrain it")
    return {**table_meta(spec, folds, tta, train, test), "weights_sha256": [weights_digest(paths, spec.name, None)],
            "fit": "full"}


def _current_meta(paths: RunPaths, spec: ModelSpec, folds: Folds, tta: TTAConfig, caches: tuple) -> dict:
    """`full_meta`; a stale full fit's tables deleted before it is refused, so that none is left to be stacked."""
    try:
        return full_meta(paths, spec, folds, tta, caches)
    except StackerError:
        remove_full_tables(paths, spec.name, load_targets(paths, folds, []))
        raise


def full_tables_current(run: FullPredictRun, spec: ModelSpec) -> bool:
    """Whether every full-fit table of `spec` (per target the test table, the main target's views) is there,
    readable, holds the test ids and records `run.metas[spec.name]`."""
    name, expected = spec.name, run.metas[spec.name]
    try:
        views = read_views(run.paths.test_views_full(name), run.targets[0].classes)
        tables = [validate_test(read_table(run.paths.test_full(name, t.name), t.classes, "test"), run.test_ids,
                                t.classes) for t in run.targets]
    except StackerError:
        return False
    same_ids = len(views.ids) == len(run.test_ids) and (views.ids == run.test_ids.astype(str)).all()
    return same_ids and is_current(views.meta, expected) and all(is_current(t.meta, expected) for t in tables)


def remove_full_tables(paths: RunPaths, model: str, targets: list[Target]) -> None:
    """Delete a model's full-fit tables (per target, and the views): they are predicted again."""
    for target in targets:
        paths.test_full(model, target.name).unlink(missing_ok=True)
    paths.test_views_full(model).unlink(missing_ok=True)


def _predict_full(run: FullPredictRun, job: FoldJob, test: ImageSource) -> None:
    """The full fit on the test set: its views table, then per target its test table, the main target's last."""
    spec, name, n = job.model, job.model.name, len(run.test_ids)
    meta = run.metas[name]
    t0 = time.perf_counter()
    net = load_fold_model(run.paths, spec, None, run.targets, test.device)
    loaded = time.perf_counter()
    tests = predict_with_tta(net, test, np.arange(n), meta, run.batch_size, spec.train.compile)
    done = time.perf_counter()
    cost = prediction_cost(loaded - t0, n, done - loaded, 1 + len(recorded_views(meta)), test.device, run.batch_size)
    main = run.targets[0]
    write_views(run.paths.test_views_full(name), ViewTable(run.test_ids, tests[0].views, main.classes, None, meta))
    measured = {**meta, "job": {"seconds": done - t0, "cost": cost}}
    for t in reversed(range(len(run.targets))):  # the main target's table last
        target = run.targets[t]
        write_test(run.paths.test_full(name, target.name), tests[t].combined, run.test_ids, target, measured)
    run.log(f"predict-oof: {name} full fit: {n} test rows -> {run.paths.test_full(name)}")
