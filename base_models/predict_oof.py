"""The predict-oof stage: one job per (model, fold), each model's tables assembled once its K folds are in.

A fold job loads fold model k, predicts its held-out rows and the whole test set with TTA, and writes
two tables of its own (per extra target too):

    preds/<model>/oof_fold<k>.parquet         the held-out rows, views combined
    preds/<model>/oof_plain_fold<k>.parquet   the held-out rows, the plain view alone (what TTA changed)
    preds/<model>/test_fold<k>.parquet        the test set, views combined

With `folds.repeats` R > 1 there is one job per (model, repeat, fold); repeat r > 0 keeps its fold
tables in `preds/<model>/repeat<r>/` (`RunPaths.for_repeat`), and each fold table records its own
repeat's folds digest, so repeat 0's tables are those of a run without repeats. The model's OOF table
then holds every repeat (R x N rows, a `repeat` column: the meta level scores each repeat on its own
OOF, never their mean, which leaks through the other repeats' models) and its test table is the mean
over all R x K fold models.

Jobs run in this process (the caches placed once per device) or through an engine, as train-base's do
(`engines.py`): one local worker per GPU fed from one queue, or one Ray task per job, so the K fold
models of a large model predict on K GPUs at once; `--only MODEL:FOLD` predicts single jobs (a Slurm
array task right after its training job). Once every fold of a model is current, whichever call sees
the last one in writes the model's OOF table (the K parts, checked against the folds), its plain-view
twin `oof_plain.parquet`, its test table (the mean of the K fold tables) and metrics.json (scores with
and without TTA).

The tables hold the folds' rows: with `data.exclude` the excluded ids are in no table (the train cache,
which keeps every dataset row, is read through the folds' rows), and an edit changes the folds' digest,
so the tables made before it are predicted again, from the same weights where a job's training rows
are unchanged (`job_state.rows_digest`).

Current means: a table records exactly what this call would predict from (`table_meta`: the folds,
the fold model's weights, both caches, the TTA settings and views, the precision), as `is_current`
reads it: a schema-1 table records no views and means the frozen views of its n. A rerun predicts only the
fold jobs whose tables are missing or made from something else, so an interrupted call resumes at
the next job; --force predicts them all again. A fold job runs under its train-base job's lock: never
while that fold model is being trained, never twice at once.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from typing import Callable, NamedTuple

import numpy as np
from filelock import Timeout

from oof import (Folds, PredictionTable, RunPaths, StackerError, __version__, accuracy, info, log_loss,
                 read_table, remove_temps, validate_oof, validate_test, write_json, write_table)

from oof.views import ViewTable, read_views, write_views

from .augment import tta_views
from .batches import CacheBudget, ImageSource, place_images
from .cache import load_cache
from .config import DataConfig, ModelSpec, TTAConfig
from .jobs import (FoldJob, JobRun, StageOptions, check_cache_rows, extra_targets, job_grid, job_lock, job_name,
                   load_targets, select_jobs)
from .models import resolve_device
from .predict import predict_with_tta, resolve_amp
from .table_schema import TABLE_SCHEMA, fold_table_meta, is_current, recorded_views, stale_keys, view_records
from .train import Target, is_trained, job_sources, load_fold_model, stale_reason, weights_digest


class FoldTables(NamedTuple):
    """One fold job's tables of one target."""

    oof: PredictionTable  # its held-out rows, views combined
    plain: PredictionTable  # its held-out rows, the plain view alone
    test: PredictionTable  # the test set, views combined


class FoldPart(NamedTuple):
    """A fold job and its current tables, one `FoldTables` per target (main first)."""

    job: FoldJob
    tables: list[FoldTables]


@dataclass(frozen=True)
class PredictRun(JobRun):
    """What every fold job of one predict-oof call shares; picklable, so it travels to an engine's workers
    (the caches do not: each worker opens them itself and checks their digests)."""

    paths: RunPaths
    folds: Folds
    targets: list[Target]
    batch_size: int  # tta.batch_size
    caches: tuple[str, str]  # the (train, test) cache digests this call predicts from
    test_ids: np.ndarray
    metas: dict  # model -> what its tables record (`table_meta`), but the weights
    weights: dict  # model -> [repeat][fold] each fold model's weights sha256 (None: not trained yet)
    log: Callable[[str], None] = info
    stage = "predict-oof"

    def fold_meta(self, job: FoldJob) -> dict:
        """What a fold job's tables record: its repeat's folds and its own fold model's weights."""
        return fold_table_meta(self.metas[job.model.name], job.repeat, job.fold,
                               folds_sha256=job.folds(self.folds).sha256,
                               weights_sha256=self.weights[job.model.name][job.repeat][job.fold])

    def model_meta(self, model: str) -> dict:
        """What a model's OOF and test tables record: every fold model's weights, repeat-major."""
        weights = [w for repeat in self.weights[model] for w in repeat]
        meta = {**self.metas[model], "weights_sha256": weights}
        return {**meta, "repeats": self.folds.repeats} if self.folds.repeats > 1 else meta

    def predict(self, job: FoldJob, train: ImageSource, test: ImageSource) -> float | None:
        """Predict `job` under its lock (`predict_locked`): its partial writes removed, its tables written.

        Returns:
            Seconds predicting; None when skipped.
        """
        def work():
            at, name = job.paths(self.paths), job.model.name
            for path in (at.oof_fold(name, job.fold), at.oof_plain_fold(name, job.fold), at.test_fold(name, job.fold),
                         at.oof_views_fold(name, job.fold), at.test_views_fold(name, job.fold)):
                remove_temps(path.parent, path.stem)  # a killed job's partial writes
            _predict_fold(self, job, train, test)

        return predict_locked(self, job, lambda: read_fold(self, job) is not None, work)

    def place(self, device, budget: CacheBudget) -> tuple[ImageSource, ImageSource]:
        """The train and test caches on `device` (the train one read in folds order): the very caches (by
        digest) this call checked."""
        train, test = load_cache(self.paths, "train"), load_cache(self.paths, "test")
        rows = check_cache_rows(train, self.folds.ids, self.paths)
        if (train.digest, test.digest) != self.caches:
            raise StackerError(f"{self.paths.cache}: the image cache changed while predict-oof ran (another "
                               "process rebuilt it); run predict-oof again")
        train_images, test_images = place_images([train.images, test.images], device, budget, self.log)
        return train_images.select(rows), test_images

    def do(self, job: FoldJob, placed: tuple[ImageSource, ImageSource]) -> float | None:
        return self.predict(job, *placed)


def predict_locked(run: JobRun, job: FoldJob, done: Callable[[], bool], work: Callable[[], None]) -> float | None:
    """`work()` under `job`'s lock (train-base's and predict-oof's: never while its model is trained, never twice at
    once); skipped, with a line, while another process holds the lock or when `done()` says another process
    predicted it meanwhile.

    Returns:
        Seconds `work` took; None when skipped.
    """
    try:
        held = job_lock(run.paths, job).acquire()
    except Timeout:
        run.log(f"  {job_name(job)}: busy in another process (training or predicting), skipped")
        return None
    with held:
        if done():
            run.log(f"  {job_name(job)}: predicted in another process meanwhile, skipped")
            return None
        t0 = time.perf_counter()
        work()
        return time.perf_counter() - t0


def predict_oof(paths: RunPaths, specs: list[ModelSpec], folds: Folds, tta: TTAConfig,
                data: DataConfig | None = None, options: StageOptions = StageOptions()) -> dict[str, dict]:
    """Predict every pending (model, fold) job's held-out rows and the test set with TTA; assemble each
    model's tables once all its folds are in.

    A model is skipped only when every one of its tables records the weights, caches and TTA settings
    this call would use (`tables_stale`); otherwise its assembled tables are deleted first (a stopped
    call leaves none that look current) and its fold jobs whose tables are not current run. Weights
    that are missing or stale are refused first, for every model, before anything is predicted.

    Args:
        paths: the run directory; every fold of `specs` trained (with `options.only`: those folds).
        specs: the models.
        folds: the run's folds.
        tta: the TTA views and how they are combined.
        data: the `data:` section (its extra_targets); None for the main target alone.
        options: force (predict again even when the tables are current), parallel, log, only, engine.

    Returns:
        Per model assembled: OOF accuracy and log-loss with and without TTA (main target), seconds.
    """
    train, test = load_cache(paths, "train"), load_cache(paths, "test")
    check_cache_rows(train, folds.ids, paths)
    weights = {s.name: _fold_weights(paths, s, folds, train.digest) for s in specs}
    run = PredictRun(paths, folds, load_targets(paths, folds, extra_targets(data)), tta.batch_size,
                     (train.digest, test.digest), test.ids, {s.name: table_meta(s, folds, tta, train, test)
                                                             for s in specs}, weights, options.log)
    grid = select_jobs(job_grid(specs, folds.k, folds.repeats), options.only, folds.k, folds.repeats)
    _check_trained(run, grid)  # before anything is removed
    models = _models_to_predict(run, specs, grid, options.force)
    jobs = [j for j in grid if j.model in models]
    current = {j.key: read_fold(run, j) for j in jobs}  # read once: what is current now is assembled as read
    todo = [j for j in jobs if current[j.key] is None]
    if models:
        options.log(f"predict-oof: {len(jobs)} fold jobs, {len(jobs) - len(todo)} already predicted, "
                    f"{len(todo)} to run")
    if todo:
        run.dispatch(todo, options)
    return {spec.name: result for spec in models if (result := _assemble(run, spec, current)) is not None}


def _fold_weights(paths: RunPaths, spec: ModelSpec, folds: Folds, cache: str) -> list[list[str | None]]:
    """[repeat][fold] each fold model's weights digest (None: not trained yet), once trained on its training
    rows of its repeat's folds and these train images, as configured.

    Raises:
        StackerError: stale weights (named, with the command that retrains them).
    """
    out = []
    for job in job_grid([spec], folds.k, folds.repeats):
        if job.fold == 0:
            out.append([])
        at = job.paths(paths)
        if not is_trained(at, spec.name, job.fold):
            out[-1].append(None)
            continue
        reason = stale_reason(at, spec, job.fold, job_sources(job.folds(folds), job.fold, spec, cache))
        if reason:
            raise StackerError(f"{at.weights(spec.name, job.fold)}: {job_name(job)} was {reason}; "
                               "run train-base --force to retrain it")
        out[-1].append(weights_digest(at, spec.name, job.fold))
    return out


def _check_trained(run: PredictRun, jobs: list[FoldJob]) -> None:
    """Every job to predict has its fold model trained, else one line naming the jobs of the first model."""
    missing: dict[str, list[FoldJob]] = {}
    for job in jobs:
        if run.weights[job.model.name][job.repeat][job.fold] is None:
            missing.setdefault(job.model.name, []).append(job)
    if missing:
        name, untrained = next(iter(missing.items()))
        if all(j.repeat == 0 for j in untrained):
            which = f"folds {[j.fold for j in untrained]} are"
        else:
            which = ", ".join(job_name(j).removeprefix(f"{name} ") for j in untrained) + " are"
        raise StackerError(f"{name}: {which} not trained yet; run train-base first")


def table_meta(spec: ModelSpec, folds: Folds, tta: TTAConfig, train, test) -> dict:
    """What a model's tables are made from, recorded in their parquet metadata: the metadata schema
    (`TABLE_SCHEMA`), the folds, the TTA settings with the views themselves (`tta_views(tta.n)`, in order)
    and the prediction settings (the precision `train.amp` resolves to on the model's device), both caches
    (pixels, cache size and resize mode) by digest; the weights are added per table (`PredictRun.fold_meta`)."""
    amp = resolve_amp(spec.train.amp, resolve_device(spec.train.device), spec.name)
    views = view_records(tta_views(tta.n))
    meta = {"schema": TABLE_SCHEMA, "model": spec.name, "arch": spec.arch, "folds_sha256": folds.sha256,
            "version": __version__, "tta": {"n": tta.n, "combine": tta.combine, "beta": tta.beta,
                                            "size": list(spec.train.prediction_size), "views": views},
            "amp": amp, "resize": train.resize, "cache_sha256": {"train": train.digest, "test": test.digest},
            "keep": spec.train.keep}  # keep: best tunes on the OOF rows (stacker.leak)
    return json.loads(json.dumps(meta))  # as a table's metadata reads back: lists, plain numbers


def _models_to_predict(run: PredictRun, specs: list[ModelSpec], grid: list[FoldJob], force: bool) -> list[ModelSpec]:
    """The models with a job in `grid` and a table to (re)write, their assembled tables deleted (with
    `force`, the fold tables of their jobs in `grid` too); the others logged as already predicted."""
    models = []
    for spec in specs:
        jobs = [j for j in grid if j.model is spec]
        if not jobs:
            continue
        stale = "forced (--force)" if force else tables_stale(run, spec)
        if stale is None:
            run.log(f"predict-oof: {spec.name} already predicted (--force to redo)")
            continue
        run.log(f"predict-oof: {spec.name}: {stale}; predicting")
        remove_assembled(run.paths, spec.name, run.targets)  # a stopped run must leave no stale table behind
        for job in jobs if force else ():
            remove_fold_tables(job.paths(run.paths), spec.name, job.fold, run.targets)
        models.append(spec)
    return models


def model_tables(run: PredictRun, spec: ModelSpec):
    """(path, kind, target, job) of every table predict-oof writes for a model: per target the OOF, plain
    OOF and test tables (job None), then each fold job's OOF parts and test table."""
    for t in run.targets:
        yield run.paths.oof(spec.name, t.name), "oof", t, None
        yield run.paths.oof_plain(spec.name, t.name), "oof", t, None
        yield run.paths.test(spec.name, t.name), "test", t, None
        for job in job_grid([spec], run.folds.k, run.folds.repeats):
            at = job.paths(run.paths)
            yield at.oof_fold(spec.name, job.fold, t.name), "oof", t, job
            yield at.oof_plain_fold(spec.name, job.fold, t.name), "oof", t, job
            yield at.test_fold(spec.name, job.fold, t.name), "test", t, job


def tables_stale(run: PredictRun, spec: ModelSpec) -> str | None:
    """Why a model's tables are not those this call would write (missing, unreadable, or made from other
    weights, caches, settings or tta views: the differing metadata keys, `stale_keys`); None when all are
    current."""
    name = spec.name
    if not run.paths.oof(name).is_file():
        return "not predicted yet"
    if any(None in repeat for repeat in run.weights[name]):
        return "not every fold is trained"
    for path, kind, target, job in model_tables(run, spec):
        try:
            recorded = read_table(path, target.classes, kind).meta
        except StackerError:
            return f"{path.name} is missing or unreadable"
        differ = stale_keys(recorded, run.model_meta(name) if job is None else run.fold_meta(job))
        if differ:
            return f"{path.name} was made from other {', '.join(differ)}"
    if not run.paths.predict_metrics(name).is_file():  # written last: the tables before it may be all there
        return f"{run.paths.predict_metrics(name).name} is missing"
    return None


def remove_assembled(paths: RunPaths, model: str, targets: list[Target]) -> None:
    """Delete a model's OOF and test tables (per target) and its metrics: they are made again from its folds."""
    paths.predict_metrics(model).unlink(missing_ok=True)
    paths.oof_views(model).unlink(missing_ok=True)
    for t in targets:
        for path in (paths.oof, paths.oof_plain, paths.test):
            path(model, t.name).unlink(missing_ok=True)
    for prefix in ("oof.", "oof_plain.", "test.", f"{paths.oof_views(model).stem}."):
        remove_temps(paths.preds_dir(model), prefix)  # a killed assembly's partial writes


def remove_fold_tables(paths: RunPaths, model: str, fold: int, targets: list[Target]) -> None:
    paths.oof_views_fold(model, fold).unlink(missing_ok=True)
    paths.test_views_fold(model, fold).unlink(missing_ok=True)
    for t in targets:
        for path in (paths.oof_fold, paths.oof_plain_fold, paths.test_fold):
            path(model, fold, t.name).unlink(missing_ok=True)


def read_fold(run: PredictRun, job: FoldJob) -> list[FoldTables] | None:
    """Fold job `job`'s tables (OOF part, plain-view OOF part, test table) per target when every one is
    current; None: a table is missing, damaged, made from something else, or its fold model is not trained."""
    name, at = job.model.name, job.paths(run.paths)
    if run.weights[name][job.repeat][job.fold] is None:
        return None
    expected, rows = run.fold_meta(job), job.folds(run.folds).valid_rows(job.fold)
    out = []
    for t in run.targets:
        try:
            tables = FoldTables(read_table(at.oof_fold(name, job.fold, t.name), t.classes, "oof"),
                                read_table(at.oof_plain_fold(name, job.fold, t.name), t.classes, "oof"),
                                validate_test(read_table(at.test_fold(name, job.fold, t.name), t.classes, "test"),
                                              run.test_ids, t.classes))
        except StackerError:
            return None
        if not (is_current(tables.test.meta, expected)
                and all(_is_part(p, expected, run.folds.ids[rows], job.fold) for p in (tables.oof, tables.plain))):
            return None
        out.append(tables)
    return out


def _is_part(part: PredictionTable, expected: dict, ids: np.ndarray, fold: int) -> bool:
    """Whether an OOF part records `expected` and holds exactly the fold's held-out rows."""
    return (is_current(part.meta, expected) and len(part.ids) == len(ids) and (part.ids == ids).all()
            and (part.fold == fold).all())


def _predict_fold(run: PredictRun, job: FoldJob, train: ImageSource, test: ImageSource) -> None:
    """Fold model k on its held-out rows and the test set; its tables per target, the OOF part last."""
    spec, fold, at = job.model, job.fold, job.paths(run.paths)
    meta, rows = run.fold_meta(job), job.folds(run.folds).valid_rows(fold)
    t0 = time.perf_counter()
    net = load_fold_model(at, spec, fold, run.targets, train.device)
    loaded = time.perf_counter()
    oof = predict_with_tta(net, train, rows, meta, run.batch_size, spec.train.compile)
    warm = time.perf_counter()  # the OOF rows warmed the model up: the test pass is the steady cost
    tests = predict_with_tta(net, test, np.arange(len(run.test_ids)), meta, run.batch_size, spec.train.compile)
    done = time.perf_counter()
    seconds = done - t0
    timed = (len(run.test_ids), done - warm) if len(run.test_ids) else (len(rows), warm - loaded)
    cost = prediction_cost(loaded - t0, *timed, 1 + len(recorded_views(meta)), train.device, run.batch_size)
    main = run.targets[0]
    if len(run.test_ids):  # every view apart, main target: what a view choice under a budget is made of
        write_views(at.test_views_fold(spec.name, fold), ViewTable(run.test_ids, tests[0].views, main.classes, None,
                                                                   meta))
    write_views(at.oof_views_fold(spec.name, fold), ViewTable(run.folds.ids[rows], oof[0].views, main.classes,
                                                              np.full(len(rows), fold), meta))
    for t, target in enumerate(run.targets):
        # an empty test set gives one (V, 0, 0) array, not one per target
        p = tests[t].combined if len(run.test_ids) else np.zeros((0, len(target.classes)))
        write_test(at.test_fold(spec.name, fold, target.name), p, run.test_ids, target, meta)
        plain, combined = oof[t].plain, oof[t].combined
        for path, proba in ((at.oof_plain_fold, plain), (at.oof_fold, combined)):  # the OOF part last
            write_table(path(spec.name, fold, target.name),
                        PredictionTable(run.folds.ids[rows], proba, target.classes, np.full(len(rows), fold),
                                        {**meta, "job": {"seconds": seconds, "cost": cost}}))
    run.log(f"  {job_name(job)}: {len(rows)} OOF rows, {len(run.test_ids)} test rows")


def prediction_cost(load_seconds: float, images: int, seconds: float, views: int, device, batch_size: int) -> dict:
    """What one fold model costs to predict on its device: a fixed overhead (weights read, model built and
    placed) and seconds per image per view, from `images` images rendered in `views` views in `seconds`
    (the test pass, after the OOF rows warmed the model up; the OOF pass when there is no test set).
    Recorded once with the fold's tables (under "job": never compared for staleness, never re-measured)."""
    per_view = seconds / max(images * views, 1)
    return {"device": str(device), "batch_size": int(batch_size), "views": int(views), "images": int(images),
            "load_seconds": float(load_seconds), "image_view_seconds": float(per_view)}


def model_cost(costs: list[dict]) -> dict:
    """A model's prediction cost from its fold models' (`prediction_cost`): per fold model the mean overhead and
    per-image-view seconds, and what the test set costs with every fold model and view: `fixed_seconds` once
    plus `image_seconds` per image."""
    n, views = len(costs), costs[0]["views"]
    load = float(np.mean([c["load_seconds"] for c in costs]))
    per_view = float(np.mean([c["image_view_seconds"] for c in costs]))
    return {"device": costs[0]["device"], "batch_size": costs[0]["batch_size"], "fold_models": n, "views": views,
            "load_seconds": load, "image_view_seconds": per_view, "fixed_seconds": n * load,
            "image_seconds": n * views * per_view}


def write_test(path, proba, ids, target: Target, meta) -> None:
    """A test table (one fold model's or the mean), checked against the ids and classes, written atomically."""
    proba = proba.reshape(len(ids), len(target.classes))
    table = PredictionTable(ids, proba, target.classes, None, meta, str(path))
    write_table(path, validate_test(table, ids, target.classes))


def _assemble(run: PredictRun, spec: ModelSpec, current: dict) -> dict | None:
    """The model's OOF, plain OOF and test tables and metrics from its fold tables, when all are current;
    None (and a line naming the jobs still missing) otherwise. `current`: {job key: `read_fold`} of the
    jobs found current before this call predicted; the others are read now."""
    name = spec.name
    parts = [FoldPart(job, current.get(job.key) or read_fold(run, job))
             for job in job_grid([spec], run.folds.k, run.folds.repeats)]
    waiting = [job_name(part.job).removeprefix(f"{name} ") for part in parts if part.tables is None]
    if waiting:
        run.log(f"predict-oof: {name}: {', '.join(waiting)} not predicted yet; its tables are written once they are")
        return None
    meta = run.model_meta(name)
    _assemble_views(run, spec, parts, meta)
    for t, target in enumerate(run.targets):
        plain = _oof_probs(run, [(part.job, part.tables[t].plain) for part in parts], target)
        oof = _oof_probs(run, [(part.job, part.tables[t].oof) for part in parts], target)
        write_table(run.paths.oof_plain(name, target.name), _oof_table(run, plain, target, meta))
        write_table(run.paths.oof(name, target.name), _oof_table(run, oof, target, meta))  # oof.parquet last
        test_mean = sum(part.tables[t].test.proba for part in parts) / len(parts)  # every repeat's fold models
        write_test(run.paths.test(name, target.name), test_mean, run.test_ids, target, meta)
        if t == 0:
            jobs = [part.tables[0].oof.meta["job"] for part in parts]
            costs = [j["cost"] for j in jobs if "cost" in j]  # a table from another tool's record: none
            extra = {"cost": model_cost(costs)} if len(costs) == len(jobs) else {}
            result = _report(run, name, oof, plain, {"seconds": sum(j["seconds"] for j in jobs), **extra})
    return result


def _assemble_views(run: PredictRun, spec: ModelSpec, parts: list[FoldPart], meta: dict) -> None:
    """The model's OOF view table (`oof.views`) from its fold jobs' parts, when every one is there and records
    what the fold's tables record; none otherwise (a fold table without its view table), and a budget
    then scores the model at its every view only."""
    views = []
    for part in parts:
        path = part.job.paths(run.paths).oof_views_fold(spec.name, part.job.fold)
        try:
            table = read_views(path, run.targets[0].classes)
        except StackerError:
            return
        if not _is_part(table.table(1), run.fold_meta(part.job), part.tables[0].oof.ids, part.job.fold):
            return
        views.append((part.job, table))
    rows = len(run.folds.ids)
    proba = np.zeros((views[0][1].views, rows * run.folds.repeats, len(run.targets[0].classes)))
    for job, table in views:
        proba[:, job.repeat * rows + job.folds(run.folds).valid_rows(job.fold)] = table.proba
    repeat = np.repeat(np.arange(run.folds.repeats), rows) if run.folds.repeats > 1 else None
    write_views(run.paths.oof_views(spec.name), ViewTable(np.tile(run.folds.ids, run.folds.repeats), proba,
                                                          run.targets[0].classes, run.folds.fold_matrix.ravel(),
                                                          meta, repeat))


def _oof_probs(run: PredictRun, parts: list[tuple[FoldJob, PredictionTable]], target: Target) -> list[np.ndarray]:
    """Per repeat the (N, C) OOF probabilities of one target, each row from its repeat's fold model's part."""
    oofs = [np.zeros((len(run.folds.ids), len(target.classes))) for _ in range(run.folds.repeats)]
    for job, part in parts:
        oofs[job.repeat][job.folds(run.folds).valid_rows(job.fold)] = part.proba
    return oofs


def _oof_table(run: PredictRun, oofs: list[np.ndarray], target: Target, meta: dict) -> PredictionTable:
    """The OOF table of one target, checked against the folds: N rows, or with repeats R x N rows,
    repeat-major, with a `repeat` column."""
    folds = run.folds
    labels = np.tile([target.classes[i] for i in target.y], folds.repeats)
    fold_view = replace(folds, classes=target.classes, table=folds.table.assign(label=labels))
    if folds.repeats == 1:
        table = PredictionTable(folds.ids, oofs[0], target.classes, folds.fold, meta)
    else:
        repeat = np.repeat(np.arange(folds.repeats), len(folds.ids))
        table = PredictionTable(np.tile(folds.ids, folds.repeats), np.concatenate(oofs), target.classes,
                                folds.fold_matrix.ravel(), meta, repeat=repeat)
    return validate_oof(table, fold_view)


def _report(run: PredictRun, name: str, oofs: list[np.ndarray], plain_oofs: list[np.ndarray], times: dict) -> dict:
    """OOF scores of the main target with (`oofs`, per repeat) and without TTA (`plain_oofs`, the plain view);
    with repeats the mean over repeats, each repeat's own and their spread; `times`: the fold jobs' seconds and
    the model's prediction cost (`model_cost`); written beside the tables and logged."""
    y = run.folds.y
    each = [{"accuracy": accuracy(y, oof), "log_loss": log_loss(y, oof)} for oof in oofs]
    plain = [(accuracy(y, oof), log_loss(y, oof)) for oof in plain_oofs]
    result = {"accuracy": float(np.mean([r["accuracy"] for r in each])),
              "log_loss": float(np.mean([r["log_loss"] for r in each])),
              "accuracy_no_tta": float(np.mean([a for a, _ in plain])),
              "log_loss_no_tta": float(np.mean([ll for _, ll in plain])), **times}
    if len(oofs) > 1:  # the split-to-split noise: how far one split's score is from another's
        result.update(repeats=each, accuracy_std=float(np.std([r["accuracy"] for r in each], ddof=1)))
    write_json(run.paths.predict_metrics(name), result)
    run.log(f"predict-oof: {name}  OOF accuracy {result['accuracy_no_tta']:.4f} -> {result['accuracy']:.4f} "
            f"with TTA, log-loss {result['log_loss_no_tta']:.4f} -> {result['log_loss']:.4f}")
    if len(each) > 1:
        scores = ", ".join(f"{r['accuracy']:.4f}" for r in each)
        run.log(f"predict-oof: {name}  OOF accuracy per repeat {scores} (std {result['accuracy_std']:.4f})")
    return result
