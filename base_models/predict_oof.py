"""The predict-oof stage: one job per (model, fold), each model's tables assembled once its K folds are in.

A fold job loads fold model k, predicts its held-out rows and the whole test set with TTA, and writes
two tables of its own (per extra target too):

    preds/<model>/oof_fold<k>.parquet    the held-out rows, views combined
    preds/<model>/test_fold<k>.parquet   the test set, views combined

Jobs run in this process (the caches placed once per device) or through an engine, as train-base's do
(`engines.py`): one local worker per GPU fed from one queue, or one Ray task per job, so the K fold
models of a large model predict on K GPUs at once; `--only MODEL:FOLD` predicts single jobs (a Slurm
array task right after its training job). Once every fold of a model is current, whichever call sees
the last one in writes the model's OOF table (the K parts, checked against the folds), its test table
(the mean of the K fold tables) and metrics.json (scores with and without TTA).

Current means: a table records exactly what this call would predict from (`table_meta`: the folds,
the fold model's weights, both caches, the TTA settings, the precision). A rerun predicts only the
fold jobs whose tables are missing or made from something else, so an interrupted call resumes at
the next job; --force predicts them all again. A fold job runs under its train-base job's lock: never
while that fold model is being trained, never twice at once.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
from filelock import Timeout

from oof import (Folds, PredictionTable, RunPaths, StackerError, __version__, accuracy, log_loss, read_table,
                 remove_temps, validate_oof, validate_test, write_json, write_table)

from .batches import ImageSource
from .cache import load_cache
from .config import DataConfig, ModelSpec, TTAConfig
from .engines import JobLog, run_jobs
from .jobs import (FoldJob, StageOptions, check_cache_rows, check_run_visible, extra_targets, job_grid,
                   job_lock, job_name, load_targets, local_workers, select_jobs)
from .models import resolve_device
from .predict import predict_with_tta, resolve_amp
from .train import Sources, Target, is_trained, load_fold_model, stale_reason, weights_digest

# Recorded but not compared: a new version of the toolkit predicts the same weights the same way, and a
# fold table's `job` holds what its job measured (seconds, the no-TTA score sums), not what it came from.
UNCOMPARED_META = ("version", "job")


@dataclass(frozen=True)
class PredictRun:
    """What every fold job of one predict-oof call shares; picklable, so it travels to an engine's workers
    (the caches do not: each worker opens them itself and checks their digests)."""

    paths: RunPaths
    folds: Folds
    targets: list[Target]
    batch_size: int  # tta.batch_size
    caches: tuple[str, str]  # the (train, test) cache digests this call predicts from
    test_ids: np.ndarray
    metas: dict  # model -> what its tables record (`table_meta`), but the weights
    weights: dict  # model -> each fold model's weights sha256 (None: not trained yet)
    log: Callable[[str], None] = print

    def fold_meta(self, model: str, fold: int) -> dict:
        return {**self.metas[model], "fold": fold, "weights_sha256": self.weights[model][fold]}

    def model_meta(self, model: str) -> dict:
        return {**self.metas[model], "weights_sha256": self.weights[model]}

    def predict(self, job: FoldJob, train: ImageSource, test: ImageSource) -> float | None:
        """Predict `job` under its lock; one another process holds, or predicted meanwhile, is skipped.

        Returns:
            Seconds predicting; None when skipped.
        """
        name, fold = job.model.name, job.fold
        try:
            held = job_lock(self.paths, job).acquire()
        except Timeout:
            self.log(f"  {name} fold {fold}: busy in another process (training or predicting), skipped")
            return None
        with held:
            if read_fold(self, job.model, fold) is not None:
                self.log(f"  {name} fold {fold}: predicted in another process meanwhile, skipped")
                return None
            remove_temps(self.paths.preds_dir(name), f"oof_fold{fold}")  # a killed job's partial writes
            remove_temps(self.paths.preds_dir(name), f"test_fold{fold}")
            t0 = time.perf_counter()
            _predict_fold(self, job, train, test)
            return time.perf_counter() - t0

    def run_job(self, job: FoldJob) -> float | None:
        """One job in an engine's worker: check the run directory is visible here, log to the job's own
        file, open and place both caches on the worker's device, predict."""
        check_run_visible(self.paths)
        run = replace(self, log=JobLog(self.paths.job_log(job.model.name, job.fold), job_name(job)))
        return run.predict(job, *_placed_caches(run, resolve_device(job.model.train.device),
                                                job.model.train.gpu_cache_gb))


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
    _check_trained(run, select_jobs(job_grid(specs, folds.k), options.only, folds.k))  # before anything is removed
    models = _models_to_predict(run, specs, options)
    jobs = select_jobs(job_grid(models, folds.k), options.only, folds.k)
    todo = [j for j in jobs if read_fold(run, j.model, j.fold) is None]
    if models:
        options.log(f"predict-oof: {len(jobs)} fold jobs, {len(jobs) - len(todo)} already predicted, "
                    f"{len(todo)} to run")
    if todo:
        _dispatch(run, todo, options)
    return {spec.name: result for spec in models if (result := _assemble(run, spec)) is not None}


def _fold_weights(paths: RunPaths, spec: ModelSpec, folds: Folds, cache: str) -> list[str | None]:
    """Each fold model's weights digest (None: not trained yet), once trained on these folds and train
    images, as configured.

    Raises:
        StackerError: stale weights (named, with the command that retrains them).
    """
    missing = [f for f in range(folds.k) if not is_trained(paths, spec.name, f)]
    sources = Sources(folds.sha256, cache)
    for fold in sorted(set(range(folds.k)) - set(missing)):
        reason = stale_reason(paths, spec, fold, sources)
        if reason:
            raise StackerError(f"{paths.weights(spec.name, fold)}: {spec.name} fold {fold} was {reason}; "
                               "run train-base --force to retrain it")
    return [None if f in missing else weights_digest(paths, spec.name, f) for f in range(folds.k)]


def _check_trained(run: PredictRun, jobs: list[FoldJob]) -> None:
    """Every job to predict has its fold model trained, else one line naming the folds per model."""
    missing: dict[str, list[int]] = {}
    for job in jobs:
        if run.weights[job.model.name][job.fold] is None:
            missing.setdefault(job.model.name, []).append(job.fold)
    if missing:
        name, ks = next(iter(missing.items()))
        raise StackerError(f"{name}: folds {ks} are not trained yet; run train-base first")


def table_meta(spec: ModelSpec, folds: Folds, tta: TTAConfig, train, test) -> dict:
    """What a model's tables are made from, recorded in their parquet metadata: the folds, the TTA and
    prediction settings (the precision `train.amp` resolves to on the model's device), both caches (pixels,
    cache size and resize mode) by digest; the weights are added per table (`PredictRun.fold_meta`)."""
    amp = resolve_amp(spec.train.amp, resolve_device(spec.train.device), spec.name)
    meta = {"model": spec.name, "arch": spec.arch, "folds_sha256": folds.sha256, "version": __version__,
            "tta": {"n": tta.n, "combine": tta.combine, "beta": tta.beta, "size": list(spec.train.prediction_size)},
            "amp": amp, "resize": train.resize, "cache_sha256": {"train": train.digest, "test": test.digest},
            "keep": spec.train.keep}  # keep: best tunes on the OOF rows (stacker.leak)
    return json.loads(json.dumps(meta))  # as a table's metadata reads back: lists, plain numbers


def _models_to_predict(run: PredictRun, specs: list[ModelSpec], options: StageOptions) -> list[ModelSpec]:
    """The models with a table to (re)write, their assembled tables deleted (with --force, the fold tables
    of the jobs this call runs too); the others logged as already predicted."""
    chosen = {m for m, _ in options.only}
    models = []
    for spec in specs:
        if chosen and spec.name not in chosen:
            continue
        stale = "forced (--force)" if options.force else tables_stale(run, spec)
        if stale is None:
            options.log(f"predict-oof: {spec.name} already predicted (--force to redo)")
            continue
        options.log(f"predict-oof: {spec.name}: {stale}; predicting")
        remove_assembled(run.paths, spec.name, run.targets)  # a stopped run must leave no stale table behind
        if options.force:
            for fold in range(run.folds.k):
                if not chosen or (spec.name, fold) in options.only:
                    remove_fold_tables(run.paths, spec.name, fold, run.targets)
        models.append(spec)
    return models


def _same(recorded: dict, expected: dict) -> list[str]:
    """The metadata keys two tables differ in, but those recorded and never compared."""
    return sorted(key for key in set(recorded) | set(expected)
                  if key not in UNCOMPARED_META and recorded.get(key) != expected.get(key))


def model_tables(paths: RunPaths, model: str, k: int, targets: list[Target]):
    """(path, kind, target, fold) of every table predict-oof writes for a model: per target the OOF and
    test tables (fold None), then each fold's OOF part and test table."""
    for t in targets:
        yield paths.oof(model, t.name), "oof", t, None
        yield paths.test(model, t.name), "test", t, None
        for fold in range(k):
            yield paths.oof_fold(model, fold, t.name), "oof", t, fold
            yield paths.test_fold(model, fold, t.name), "test", t, fold


def tables_stale(run: PredictRun, spec: ModelSpec) -> str | None:
    """Why a model's tables are not those this call would write (missing, unreadable, or made from other
    weights, caches or settings: the differing metadata keys); None when all are current."""
    name = spec.name
    if not run.paths.oof(name).is_file():
        return "not predicted yet"
    if None in run.weights[name]:
        return "not every fold is trained"
    for path, kind, target, fold in model_tables(run.paths, name, run.folds.k, run.targets):
        try:
            recorded = read_table(path, target.classes, kind).meta
        except StackerError:
            return f"{path.name} is missing or unreadable"
        differ = _same(recorded, run.model_meta(name) if fold is None else run.fold_meta(name, fold))
        if differ:
            return f"{path.name} was made from other {', '.join(differ)}"
    if not run.paths.predict_metrics(name).is_file():  # written last: the tables before it may be all there
        return f"{run.paths.predict_metrics(name).name} is missing"
    return None


def remove_assembled(paths: RunPaths, model: str, targets: list[Target]) -> None:
    """Delete a model's OOF and test tables (per target) and its metrics: they are made again from its folds."""
    paths.predict_metrics(model).unlink(missing_ok=True)
    for t in targets:
        paths.oof(model, t.name).unlink(missing_ok=True)
        paths.test(model, t.name).unlink(missing_ok=True)
    remove_temps(paths.preds_dir(model), "oof.")  # a killed assembly's partial writes
    remove_temps(paths.preds_dir(model), "test.")


def remove_fold_tables(paths: RunPaths, model: str, fold: int, targets: list[Target]) -> None:
    for t in targets:
        paths.oof_fold(model, fold, t.name).unlink(missing_ok=True)
        paths.test_fold(model, fold, t.name).unlink(missing_ok=True)


def read_fold(run: PredictRun, spec: ModelSpec, fold: int) -> list[tuple[PredictionTable, PredictionTable]] | None:
    """Fold job `fold`'s (OOF part, test table) per target when every one is current; None: a table is
    missing, damaged, made from something else, or its fold model is not trained."""
    if run.weights[spec.name][fold] is None:
        return None
    expected, rows = run.fold_meta(spec.name, fold), run.folds.valid_rows(fold)
    out = []
    for t in run.targets:
        try:
            part = read_table(run.paths.oof_fold(spec.name, fold, t.name), t.classes, "oof")
            test = validate_test(read_table(run.paths.test_fold(spec.name, fold, t.name), t.classes, "test"),
                                 run.test_ids, t.classes)
        except StackerError:
            return None
        if (_same(part.meta, expected) or _same(test.meta, expected) or len(part.ids) != len(rows)
                or (part.ids != run.folds.ids[rows]).any() or (part.fold != fold).any()):
            return None
        out.append((part, test))
    return out


def _predict_fold(run: PredictRun, job: FoldJob, train: ImageSource, test: ImageSource) -> None:
    """Fold model k on its held-out rows and the test set; its tables per target, the OOF part last."""
    spec, fold = job.model, job.fold
    meta, rows = run.fold_meta(spec.name, fold), run.folds.valid_rows(fold)
    t0 = time.perf_counter()
    net = load_fold_model(run.paths, spec, fold, run.targets, train.device)
    oof = predict_with_tta(net, train, rows, meta, run.batch_size, spec.train.compile)
    tests = predict_with_tta(net, test, np.arange(len(run.test_ids)), meta, run.batch_size, spec.train.compile)
    seconds = time.perf_counter() - t0
    for t, target in enumerate(run.targets):
        # an empty test set gives one (V, 0, 0) array, not one per target
        p = tests[t][1] if len(run.test_ids) else np.zeros((0, len(target.classes)))
        write_test(run.paths.test_fold(spec.name, fold, target.name), p, run.test_ids, target, meta)
        plain, combined = oof[t]
        y = target.y[rows]
        scores = {"seconds": seconds, "plain_correct": accuracy(y, plain) * len(rows),
                  "plain_log_loss_sum": log_loss(y, plain) * len(rows)}
        part = PredictionTable(run.folds.ids[rows], combined, target.classes, np.full(len(rows), fold),
                               {**meta, "job": scores})
        write_table(run.paths.oof_fold(spec.name, fold, target.name), part)
    run.log(f"  {spec.name} fold {fold}: {len(rows)} OOF rows, {len(run.test_ids)} test rows")


def write_test(path, proba, ids, target: Target, meta) -> None:
    """A test table (one fold model's or the mean), checked against the ids and classes, written atomically."""
    proba = proba.reshape(len(ids), len(target.classes))
    table = PredictionTable(ids, proba, target.classes, None, meta, str(path))
    write_table(path, validate_test(table, ids, target.classes))


def _dispatch(run: PredictRun, todo: list[FoldJob], options: StageOptions) -> None:
    """The pending fold jobs through the engine; one local worker predicts them in this process, each
    cache placed once per device and budget."""
    if options.engine.name != "local" or local_workers(todo, options) > 1:
        work = replace(run, log=print).run_job  # what travels to a worker: picklable, its log replaced there
        run_jobs(work, todo, options.engine, local_workers(todo, options), options.log, stage="predict-oof")
        return
    placed = {}
    for job in todo:
        place = (resolve_device(job.model.train.device), job.model.train.gpu_cache_gb)
        if place not in placed:
            placed = {place: _placed_caches(run, *place)}
        job_log = JobLog(run.paths.job_log(job.model.name, job.fold), job_name(job), echo=run.log)
        replace(run, log=job_log).predict(job, *placed[place])


def _placed_caches(run: PredictRun, device, gpu_cache_gb: float) -> tuple[ImageSource, ImageSource]:
    """The train and test caches placed on `device`: the very caches (by digest) this call checked."""
    train, test = load_cache(run.paths, "train"), load_cache(run.paths, "test")
    check_cache_rows(train, run.folds.ids, run.paths)
    if (train.digest, test.digest) != run.caches:
        raise StackerError(f"{run.paths.cache}: the image cache changed while predict-oof ran (another process "
                           "rebuilt it); run predict-oof again")
    return ImageSource(train.images, device, gpu_cache_gb), ImageSource(test.images, device, gpu_cache_gb)


def _assemble(run: PredictRun, spec: ModelSpec) -> dict | None:
    """The model's OOF and test tables and metrics from its K fold tables, when all are current; None (and
    a line naming the folds still missing) otherwise."""
    folds, name = run.folds, spec.name
    parts = [read_fold(run, spec, fold) for fold in range(folds.k)]
    waiting = [fold for fold, p in enumerate(parts) if p is None]
    if waiting:
        run.log(f"predict-oof: {name}: folds {waiting} not predicted yet; its tables are written once they are")
        return None
    meta = run.model_meta(name)
    for t, target in enumerate(run.targets):
        oof = np.zeros((len(folds.ids), len(target.classes)))
        for fold, p in enumerate(parts):
            oof[folds.valid_rows(fold)] = p[t][0].proba
        fold_view = replace(folds, classes=target.classes,
                            table=folds.table.assign(label=[target.classes[i] for i in target.y]))
        table = PredictionTable(folds.ids, oof, target.classes, folds.fold, meta)
        write_table(run.paths.oof(name, target.name), validate_oof(table, fold_view))
        test_mean = sum(p[t][1].proba for p in parts) / folds.k
        write_test(run.paths.test(name, target.name), test_mean, run.test_ids, target, meta)
        if t == 0:
            result = _report(run, name, oof, [p[0][0].meta["job"] for p in parts])
    return result


def _report(run: PredictRun, name: str, oof: np.ndarray, jobs: list[dict]) -> dict:
    """OOF scores of the main target with and without TTA, written beside the tables and logged."""
    y, n = run.folds.y, len(run.folds.ids)
    result = {"accuracy": accuracy(y, oof), "log_loss": log_loss(y, oof),
              "accuracy_no_tta": sum(j["plain_correct"] for j in jobs) / n,
              "log_loss_no_tta": sum(j["plain_log_loss_sum"] for j in jobs) / n,
              "seconds": sum(j["seconds"] for j in jobs)}
    write_json(run.paths.predict_metrics(name), result)
    run.log(f"predict-oof: {name}  OOF accuracy {result['accuracy_no_tta']:.4f} -> {result['accuracy']:.4f} "
            f"with TTA, log-loss {result['log_loss_no_tta']:.4f} -> {result['log_loss']:.4f}")
    return result
