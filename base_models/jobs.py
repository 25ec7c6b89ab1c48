"""The train-base and predict-oof stages: folds, cache, and the (model, fold) job grid.

Each (model, fold) training job reads the cache and the folds and writes only
its own files, so jobs run one after another here, or through an engine
(`engines.py`): one worker process per local GPU fed from one queue, or one Ray
task per job on a cluster. A job runs under its own file lock, so processes
sharing a run directory never train one job twice, and a job rerun after its
worker died resumes from its last epoch checkpoint.

Nothing is trusted for existing or for being newer: a rerun skips a finished job
only while its history's digests (folds, train cache, weights) and recipe match
the run now, and refuses stale ones; predict-oof skips a model only while every
table records the weights, caches and TTA settings it would use now, and refuses
weights that are stale. `--force` deletes a stage's own outputs before it starts.
"""
from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import pandas as pd
import torch
from filelock import FileLock, Timeout

from oof import (Folds, PredictionTable, RunPaths, StackerError, __version__, accuracy, atomic_path, load_folds,
                 log_loss, make_folds, read_table, remove_temps, validate_oof, validate_test, write_folds, write_json,
                 write_table)

from .augment import PLAIN, tta_views
from .batches import ImageSource
from .cache import CacheOptions, ImageCache, build_cache, load_cache
from .config import SAMPLING_BUILTIN, DataConfig, EngineConfig, FoldsConfig, ModelSpec, TTAConfig
from .dataset import DatasetSpec, resolve_dataset
from .engines import JobLog, run_jobs
from .models import check_sizes, model_norm, resolve_device
from .predict import ViewPlan, combine_tta, predict_views, resolve_amp
from .train import (Sources, Target, TrainInputs, build_model, is_trained, load_fold_model, stale_reason,
                    train_fold, weights_digest)


@dataclass(frozen=True)
class StageOptions:
    """How a stage runs, never what it computes.

    Attributes:
        force: redo finished work: delete the stage's outputs first (every job's weights, history and
            checkpoint; every model's tables), then do it all again.
        parallel: train-base jobs at once on CPU (the local engine runs one per visible GPU on CUDA);
            the size of the local cluster the Ray engine starts when it joins none.
        log: where progress lines go.
        only: run exactly these (model, fold) jobs of train-base; empty for every job.
        engine: where train-base's jobs run (`EngineConfig`).
    """

    force: bool = False
    parallel: int = 1
    log: Callable[[str], None] = print
    only: tuple[tuple[str, int], ...] = ()
    engine: EngineConfig = field(default_factory=EngineConfig)


@dataclass(frozen=True)
class FoldJob:
    """The unit of train-base: one model trained with one fold held out."""

    model: ModelSpec
    fold: int


def job_grid(specs: list[ModelSpec], k: int) -> list[FoldJob]:
    """Every (model, fold) job of a run, model by model."""
    return [FoldJob(s, fold) for s in specs for fold in range(k)]


def select_jobs(jobs: list[FoldJob], only: tuple[tuple[str, int], ...], k: int) -> list[FoldJob]:
    """The jobs `only` names, in grid order; all of them when it names none.

    Raises:
        StackerError: `only` names a model not in the run or a fold outside 0..k-1.
    """
    if not only:
        return jobs
    names = sorted({j.model.name for j in jobs})
    for model, fold in only:
        if model not in names:
            raise StackerError(f"only: no model {model!r} in the run; its models are {names}")
        if not (isinstance(fold, int) and 0 <= fold < k):
            raise StackerError(f"only: {model} fold {fold!r} is not a fold of the run (0..{k - 1})")
    wanted = {(m, f) for m, f in only}
    return [j for j in jobs if (j.model.name, j.fold) in wanted]


def cache_size(specs: list[ModelSpec]) -> tuple[int, int]:
    """The one cache size every job can use: the largest height and width any phase or prediction asks for."""
    sizes = [p.size for s in specs for p in s.train.schedule] + [s.train.prediction_size for s in specs]
    return max(h for h, _ in sizes), max(w for _, w in sizes)


def prepare_run(paths: RunPaths, data: DataConfig, folds_cfg: FoldsConfig, size, force: bool = False,
                log=print) -> tuple[DatasetSpec, Folds]:
    """Resolve the dataset, make (or check) the folds, decode the train and test caches."""
    spec = resolve_dataset(data)
    log(f"dataset: {len(spec.train)} train images in {len(spec.classes)} classes, {len(spec.test)} test images")
    folds = _folds_for(paths, spec, folds_cfg, force, log)
    columns = spec.train.drop(columns=["path", "label"])
    with atomic_path(paths.targets) as tmp:
        columns.to_parquet(tmp, index=False)
    options = CacheOptions.from_data(data, size)
    for split, table in (("train", spec.train), ("test", spec.test)):
        build_cache(paths, split, table["id"], table["path"], options, log)
    return spec, folds


def _folds_for(paths: RunPaths, spec: DatasetSpec, cfg: FoldsConfig, force: bool, log) -> Folds:
    made = make_folds(spec.train["id"], spec.train["label"], cfg.k, cfg.seed, spec.classes)
    if paths.folds.is_file() and not force:
        folds = load_folds(paths.folds)
        if folds.sha256 != made.sha256:
            raise StackerError(f"{paths.folds}: made from another dataset or folds config (k, seed); every "
                               "model of a run must share one fold assignment. Use a new run directory, "
                               "or --force to start this one again")
        return folds
    write_folds(paths.folds, made)
    log(f"folds: k={made.k} seed={made.seed} -> {paths.folds}")
    return made


def load_targets(paths: RunPaths, folds: Folds, extra: list[str]) -> list[Target]:
    """The main target from the folds, then each extra target column, rows in folds order."""
    targets = [Target(None, folds.classes, folds.y)]
    if not extra:
        return targets
    table = _train_columns(paths, folds)
    for name in extra:
        if name not in table.columns:
            raise StackerError(f"{paths.targets}: no column {name!r} (data.extra_targets); rerun train-base")
        values = table[name].astype(str)
        classes = tuple(sorted(values.unique()))
        index = {c: i for i, c in enumerate(classes)}
        targets.append(Target(name, classes, values.map(index).to_numpy(np.int64, copy=True)))
    return targets


def _extra_targets(data: DataConfig | None) -> list[str]:
    return list(data.extra_targets) if data is not None else []


def load_row_weights(paths: RunPaths, folds: Folds, spec: ModelSpec) -> np.ndarray | None:
    """The sampling weight column a model names, checked: numbers, finite, >= 0, some > 0."""
    column = spec.train.sampling.weights
    if column in SAMPLING_BUILTIN:
        return None
    table = _train_columns(paths, folds)
    if column not in table.columns:
        raise StackerError(f"{spec.name}: train.sampling.weights {column!r} is neither {', '.join(SAMPLING_BUILTIN)} "
                           f"nor a train CSV column ({sorted(table.columns.drop('id'))})")
    w = pd.to_numeric(table[column], errors="coerce").to_numpy(np.float64)
    bad = ~np.isfinite(w) | (w < 0)
    if bad.any() or not (w > 0).any():
        first = table["id"].to_numpy()[bad][:5].tolist() if bad.any() else "all zero"
        raise StackerError(f"{paths.targets}: weight column {column!r} must hold finite numbers >= 0, "
                           f"not all zero; first bad ids {first}")
    return w


def _train_columns(paths: RunPaths, folds: Folds) -> pd.DataFrame:
    table = pd.read_parquet(paths.targets).astype({"id": str}).set_index("id", drop=False)
    return table.loc[folds.ids].reset_index(drop=True)


def check_models(specs: list[ModelSpec], targets: list[Target]) -> None:
    """Build each model once on the CPU (loading its pretrained file) and try every size it will see.

    Runs before any training, so a bad weights file or a size a ViT cannot take
    fails in seconds instead of after the first fold.
    """
    for spec in specs:
        model = build_model(spec, targets)
        sizes = [p.size for p in spec.train.schedule] + [spec.train.prediction_size]
        check_sizes(model, sizes, spec.name)


# ---------------------------------------------------------------- train-base


def train_base(paths: RunPaths, specs: list[ModelSpec], folds: Folds, data: DataConfig | None = None,
               options: StageOptions = StageOptions()) -> None:
    """Train every (model, fold) job not yet finished; refuse when a finished one is stale.

    Args:
        paths: the run directory, prepared by `prepare_run`.
        specs: the models.
        folds: the run's folds.
        data: the `data:` section (its extra_targets); None for the main target alone.
        options: force (delete every job's outputs first, then train them all), parallel, log, only
            (these jobs alone), engine (where the jobs run).

    Raises:
        StackerError: finished jobs trained on other folds, other train images, another recipe, or
            whose weights changed since (one line naming them; --force retrains them); a job that
            failed (one line naming it: with several workers once the others finished, in-process at
            once, the jobs after it left pending for the next call).
    """
    log = options.log
    jobs = select_jobs(job_grid(specs, folds.k), options.only, folds.k)
    if options.force:
        remove_job_outputs(paths, jobs, log)
    sources = Sources(folds.sha256, load_cache(paths, "train").digest)
    todo = [j for j in jobs if not is_trained(paths, j.model.name, j.fold)]
    _refuse_stale(paths, [j for j in jobs if j not in todo], sources)
    log(f"train-base: {len(jobs)} jobs, {len(jobs) - len(todo)} already done, {len(todo)} to run")
    if not todo:
        return
    targets = load_targets(paths, folds, _extra_targets(data))
    check_models([s for s in specs if any(j.model is s for j in todo)], targets)
    _dispatch(_TrainRun(paths, folds, targets, sources, log), todo, options)


def _dispatch(run: _TrainRun, todo: list[FoldJob], options: StageOptions) -> None:
    """The pending jobs through the engine; one local worker trains them in this process (one placed cache)."""
    workers = options.parallel
    if options.engine.name == "local":
        cuda = any(resolve_device(j.model.train.device).type == "cuda" for j in todo)
        workers = min(torch.cuda.device_count() if cuda else options.parallel, len(todo))
        if workers <= 1:
            _run_in_process(run, todo)
            return
    work = replace(run, log=print).run_job  # what travels to a worker: picklable, its log replaced there
    run_jobs(work, todo, options.engine, workers, options.log)


def remove_job_outputs(paths: RunPaths, jobs: list[FoldJob], log=print) -> None:
    """--force's first step: delete each job's history, weights and checkpoint before anything is trained
    (or the folds rewritten), so an interrupted --force never leaves old results that look finished.
    A job whose lock another process holds is being trained there: its files are left to it."""
    for job in jobs:
        if not paths.model_dir(job.model.name).is_dir():
            continue
        try:
            held = _job_lock(paths, job).acquire()
        except Timeout:
            log(f"  {job.model.name} fold {job.fold}: running in another process, its files are kept")
            continue
        with held:  # the history goes first: it is what marks a job finished
            for path in (paths.history, paths.weights, paths.checkpoint, paths.job_log):
                path(job.model.name, job.fold).unlink(missing_ok=True)


def _job_lock(paths: RunPaths, job: FoldJob) -> FileLock:
    """The job's lock, taken without waiting (timeout 0). An flock: the kernel releases it when
    its process dies, even by SIGKILL, so a crashed job never blocks the next run."""
    paths.model_dir(job.model.name).mkdir(parents=True, exist_ok=True)
    return FileLock(paths.job_lock(job.model.name, job.fold), timeout=0)


def _refuse_stale(paths: RunPaths, finished: list[FoldJob], sources: Sources) -> None:
    """A finished job is skipped only while it is current; stale ones are refused in one line naming them all."""
    stale: dict[tuple[str, str], list[int]] = {}  # (model, reason) -> folds
    for job in finished:
        reason = stale_reason(paths, job.model, job.fold, sources)
        if reason:
            stale.setdefault((job.model.name, reason), []).append(job.fold)
    if not stale:
        return
    (model, _), folds = next(iter(stale.items()))
    groups = "; ".join(f"{name} {_fold_list(ks)} {'was' if len(ks) == 1 else 'were'} {reason}"
                       for (name, reason), ks in stale.items())
    them = "it" if sum(map(len, stale.values())) == 1 else "them"
    raise StackerError(f"{paths.history(model, folds[0])}: {groups}; pass --force to train {them} again "
                       "(or give a model with new settings a new name)")


def _fold_list(folds: list[int]) -> str:
    return f"fold {folds[0]}" if len(folds) == 1 else f"folds {', '.join(map(str, folds))}"


@dataclass(frozen=True)
class _TrainRun:
    """What every training job of one train-base call shares; the images are placed per device."""

    paths: RunPaths
    folds: Folds
    targets: list[Target]
    sources: Sources  # the folds and train cache every job of this call trains on
    log: Callable[[str], None] = print

    def train(self, job: FoldJob, images: ImageSource) -> float | None:
        """Train `job` under its lock; one another process holds, or finished meanwhile, is skipped.

        Returns:
            Seconds inside `train_fold`; None when skipped.
        """
        name, fold = job.model.name, job.fold
        try:
            held = _job_lock(self.paths, job).acquire()
        except Timeout:
            self.log(f"  {name} fold {fold}: running in another process, skipped")
            return None
        with held:
            if is_trained(self.paths, name, fold):  # another process finished it since this one looked
                _refuse_stale(self.paths, [job], self.sources)
                self.log(f"  {name} fold {fold}: finished in another process meanwhile, skipped")
                return None
            remove_temps(self.paths.model_dir(name), f"fold{fold}.")  # a killed run's partial writes
            inputs = TrainInputs(self.paths, self.folds, self.targets, images, self.sources.cache_sha256)
            t0 = time.perf_counter()
            train_fold(job.model, fold, inputs, load_row_weights(self.paths, self.folds, job.model), self.log)
            return time.perf_counter() - t0

    def run_job(self, job: FoldJob) -> float | None:
        """One job in an engine's worker: check the run directory is visible here, log to the job's own
        file, place the cache on the worker's device (the one GPU it sees), train."""
        _check_run_visible(self.paths)
        run = replace(self, log=JobLog(self.paths.job_log(job.model.name, job.fold), _job_name(job)))
        run.log(f"  {_job_name(job)}: started on {socket.gethostname()}")
        device = resolve_device(job.model.train.device)
        return run.train(job, _train_images(run, device, job.model.train.gpu_cache_gb))


def _job_name(job: FoldJob) -> str:
    return f"{job.model.name} fold {job.fold}"


def _check_run_visible(paths: RunPaths) -> None:
    """A worker on another node must see the run directory at the same path (shared storage)."""
    try:
        with open(paths.folds, "rb"):
            pass
    except OSError as e:
        raise StackerError(f"{socket.gethostname()}: cannot read {paths.folds} ({e.strerror}); every worker "
                           "must see the run directory at the same path (shared storage)") from None


def _run_in_process(run: _TrainRun, jobs: list[FoldJob]) -> None:
    """The jobs one after another; the cache is placed once per device and budget, shared by the jobs."""
    loaded = {}
    for job in jobs:
        place = (resolve_device(job.model.train.device), job.model.train.gpu_cache_gb)
        if place not in loaded:
            loaded = {place: _train_images(run, *place)}
            run.log(f"  train images: {loaded[place].shape} uint8 in {loaded[place].placement}")
        job_log = JobLog(run.paths.job_log(job.model.name, job.fold), _job_name(job), echo=run.log)
        replace(run, log=job_log).train(job, loaded[place])


def _train_images(run: _TrainRun, device, gpu_cache_gb: float) -> ImageSource:
    """The train cache placed on `device`: the very cache (by digest) the call checked its jobs against."""
    cache = load_cache(run.paths, "train")
    _check_cache_rows(cache, run.folds.ids, run.paths)
    if cache.digest != run.sources.cache_sha256:
        raise StackerError(f"{run.paths.cache_index('train')}: the train image cache changed while train-base "
                           "ran (another process rebuilt it); run train-base again")
    return ImageSource(cache.images, device, gpu_cache_gb)


def _check_cache_rows(cache: ImageCache, ids: np.ndarray, paths: RunPaths) -> None:
    if len(cache.ids) != len(ids) or (cache.ids != ids).any():
        raise StackerError(f"{paths.cache}: the image cache does not match {paths.folds}; rerun train-base")


# ---------------------------------------------------------------- predict-oof


@dataclass(frozen=True)
class _PredictRun:
    """What every model's predictions share in one predict-oof call."""

    paths: RunPaths
    folds: Folds
    targets: list[Target]
    tta: TTAConfig
    train: ImageCache
    test: ImageCache
    log: Callable[[str], None] = print


@dataclass
class _ModelPredictions:
    """One model's predictions as its fold models fill them in: per target t, (N, C_t) or (N_test, C_t)."""

    spec: ModelSpec
    train_images: ImageSource  # the caches placed on the model's device
    test_images: ImageSource
    meta: dict  # the tables' metadata (`_table_meta`): what they were made from
    plain: list[np.ndarray]  # OOF, plain view alone: for the with/without-TTA report
    oof: list[np.ndarray]  # OOF, views combined
    test_sum: list[np.ndarray]  # test, views combined, summed over the fold models


def predict_oof(paths: RunPaths, specs: list[ModelSpec], folds: Folds, tta: TTAConfig,
                data: DataConfig | None = None, options: StageOptions = StageOptions()) -> dict[str, dict]:
    """Predict each model's OOF rows and the test set with TTA; write the tables.

    A model is skipped only when every one of its tables records the weights, caches
    and TTA settings this call would use (`_tables_stale`); otherwise its tables are
    deleted and made again. Weights that are missing or stale are refused first, for
    every model, before anything is predicted.

    Args:
        paths: the run directory, with every fold of `specs` trained.
        specs: the models.
        folds: the run's folds.
        tta: the TTA views and how they are combined.
        data: the `data:` section (its extra_targets); None for the main target alone.
        options: force (predict again even when the tables are current) and log; parallel is unused.

    Returns:
        Per model predicted: OOF accuracy and log-loss with and without TTA (main target).
    """
    train, test = load_cache(paths, "train"), load_cache(paths, "test")
    _check_cache_rows(train, folds.ids, paths)
    run = _PredictRun(paths, folds, load_targets(paths, folds, _extra_targets(data)), tta, train, test, options.log)
    metas = {spec.name: _table_meta(run, spec, _current_weights(run, spec)) for spec in specs}
    metrics = {}
    for spec in specs:
        stale = "forced (--force)" if options.force else _tables_stale(run, spec, metas[spec.name])
        if stale is None:
            options.log(f"predict-oof: {spec.name} already predicted (--force to redo)")
            continue
        options.log(f"predict-oof: {spec.name}: {stale}; predicting")
        remove_tables(paths, spec.name, folds.k, run.targets)  # a stopped run must leave no stale table behind
        metrics[spec.name] = _predict_model(run, spec, metas[spec.name])
    return metrics


def _current_weights(run: _PredictRun, spec: ModelSpec) -> list[str]:
    """Each fold's weights digest, once every fold is trained on these folds and train images, as configured.

    Raises:
        StackerError: a fold not trained, or stale weights (named, with the command that retrains them).
    """
    paths, k = run.paths, run.folds.k
    missing = [f for f in range(k) if not is_trained(paths, spec.name, f)]
    if missing:
        raise StackerError(f"{spec.name}: folds {missing} are not trained yet; run train-base first")
    sources = Sources(run.folds.sha256, run.train.digest)
    for fold in range(k):
        reason = stale_reason(paths, spec, fold, sources)
        if reason:
            raise StackerError(f"{paths.weights(spec.name, fold)}: {spec.name} fold {fold} was {reason}; "
                               "run train-base --force to retrain it")
    return [weights_digest(paths, spec.name, fold) for fold in range(k)]


def _table_meta(run: _PredictRun, spec: ModelSpec, weights: list[str]) -> dict:
    """What a model's tables are made from, recorded in their parquet metadata: the folds, each fold model's
    weights, the TTA and prediction settings (the precision `train.amp` resolves to on the model's device),
    both caches (pixels, cache size and resize mode) by digest."""
    tta = run.tta
    amp = resolve_amp(spec.train.amp, resolve_device(spec.train.device), spec.name)
    meta = {"model": spec.name, "arch": spec.arch, "folds_sha256": run.folds.sha256, "version": __version__,
            "tta": {"n": tta.n, "combine": tta.combine, "beta": tta.beta, "size": list(spec.train.prediction_size)},
            "amp": amp,
            "resize": run.train.resize, "cache_sha256": {"train": run.train.digest, "test": run.test.digest},
            "weights_sha256": weights, "keep": spec.train.keep}  # keep: best tunes on the OOF rows (stacker.leak)
    return json.loads(json.dumps(meta))  # as a table's metadata reads back: lists, plain numbers


# Recorded but not compared: a new version of the toolkit predicts the same weights the same way.
UNCOMPARED_META = ("version",)


def _model_tables(paths: RunPaths, model: str, k: int, targets: list[Target]):
    """(path, kind, target, fold) of every table predict-oof writes for a model; fold None but for test_fold."""
    for t in targets:
        yield paths.oof(model, t.name), "oof", t, None
        yield paths.test(model, t.name), "test", t, None
        for fold in range(k):
            yield paths.test_fold(model, fold, t.name), "test", t, fold


def _tables_stale(run: _PredictRun, spec: ModelSpec, meta: dict) -> str | None:
    """Why a model's tables are not those this call would write (missing, unreadable, or made from other
    weights, caches or settings: the differing metadata keys); None when all are current."""
    if not run.paths.oof(spec.name).is_file():
        return "not predicted yet"
    for path, kind, target, fold in _model_tables(run.paths, spec.name, run.folds.k, run.targets):
        try:
            recorded = read_table(path, target.classes, kind).meta
        except StackerError:
            return f"{path.name} is missing or unreadable"
        expected = meta if fold is None else {**meta, "fold": fold}
        differ = sorted(key for key in set(recorded) | set(expected)
                        if key not in UNCOMPARED_META and recorded.get(key) != expected.get(key))
        if differ:
            return f"{path.name} was made from other {', '.join(differ)}"
    if not run.paths.predict_metrics(spec.name).is_file():  # written last: the tables before it may be all there
        return f"{run.paths.predict_metrics(spec.name).name} is missing"
    return None


def remove_tables(paths: RunPaths, model: str, k: int, targets: list[Target]) -> None:
    """Delete a model's tables (OOF, test, per-fold test, per target) and its metrics before predicting again."""
    for path, *_ in _model_tables(paths, model, k, targets):
        path.unlink(missing_ok=True)
    paths.predict_metrics(model).unlink(missing_ok=True)
    remove_temps(paths.preds_dir(model))  # a killed run's partial writes


def _predict_model(run: _PredictRun, spec: ModelSpec, meta: dict) -> dict:
    """Every fold model of `spec` on its held-out rows and the test set; the model's tables and report."""
    t0 = time.perf_counter()
    preds = _start_model(run, spec, meta)
    for k in range(run.folds.k):
        _predict_fold(run, preds, k)
    _write_model_tables(run, preds)
    return _report(run, preds, time.perf_counter() - t0)


def _start_model(run: _PredictRun, spec: ModelSpec, meta: dict) -> _ModelPredictions:
    """Empty prediction arrays for `spec`, the caches placed on its device, its tables' metadata."""
    device, budget = resolve_device(spec.train.device), spec.train.gpu_cache_gb

    def zeros(rows: int) -> list[np.ndarray]:  # per target (rows, C_t)
        return [np.zeros((rows, len(t.classes))) for t in run.targets]

    n, n_test = len(run.folds.ids), len(run.test.ids)
    return _ModelPredictions(spec, ImageSource(run.train.images, device, budget),
                             ImageSource(run.test.images, device, budget), meta,
                             plain=zeros(n), oof=zeros(n), test_sum=zeros(n_test))


def _predict_fold(run: _PredictRun, preds: _ModelPredictions, k: int) -> None:
    """Fold model k: its held-out rows into the OOF arrays, its test predictions summed and written."""
    spec, tta, test_ids = preds.spec, run.tta, run.test.ids
    device = preds.train_images.device
    compiled = spec.train.compile and device.type == "cuda"
    model = load_fold_model(run.paths, spec, k, run.targets, device)
    forward = torch.compile(model) if compiled else model
    plan = ViewPlan(spec.train.prediction_size, [PLAIN, *tta_views(tta.n)], model_norm(model), tta.batch_size,
                    fixed_shape=compiled, amp=preds.meta["amp"])
    rows = run.folds.valid_rows(k)
    for t, p in enumerate(predict_views(forward, preds.train_images, rows, plan)):  # p: (V, n_rows, C_t)
        preds.plain[t][rows], preds.oof[t][rows] = p[0], combine_tta(p[0], p[1:], tta.combine, tta.beta)
    test_preds = predict_views(forward, preds.test_images, np.arange(len(test_ids)), plan)
    for t, target in enumerate(run.targets):
        if len(test_ids):
            p = combine_tta(test_preds[t][0], test_preds[t][1:], tta.combine, tta.beta)  # (N_test, C_t)
        else:  # an empty test set gives one (V, 0, 0) array, not one per target: add nothing
            p = preds.test_sum[t]
        preds.test_sum[t] += p
        write_test(run.paths.test_fold(spec.name, k, target.name), p, test_ids, target, {**preds.meta, "fold": k})
    run.log(f"  {spec.name} fold {k}: {len(rows)} OOF rows, {len(test_ids)} test rows")


def _write_model_tables(run: _PredictRun, preds: _ModelPredictions) -> None:
    """Per target: the OOF table (checked against the folds) and the test table, the mean over fold models."""
    folds, name = run.folds, preds.spec.name
    for t, target in enumerate(run.targets):
        fold_view = replace(folds, classes=target.classes,
                            table=folds.table.assign(label=[target.classes[i] for i in target.y]))
        table = PredictionTable(folds.ids, preds.oof[t], target.classes, folds.fold, preds.meta)
        write_table(run.paths.oof(name, target.name), validate_oof(table, fold_view))
        write_test(run.paths.test(name, target.name), preds.test_sum[t] / folds.k, run.test.ids, target, preds.meta)


def write_test(path, proba, ids, target: Target, meta) -> None:
    """A test table (one fold model's or the mean), checked against the ids and classes, written atomically."""
    proba = proba.reshape(len(ids), len(target.classes))
    table = PredictionTable(ids, proba, target.classes, None, meta, str(path))
    write_table(path, validate_test(table, ids, target.classes))


def _report(run: _PredictRun, preds: _ModelPredictions, seconds: float) -> dict:
    """OOF scores of the main target with and without TTA, written beside the tables and logged."""
    y, plain, oof = run.folds.y, preds.plain[0], preds.oof[0]
    result = {"accuracy": accuracy(y, oof), "log_loss": log_loss(y, oof),
              "accuracy_no_tta": accuracy(y, plain), "log_loss_no_tta": log_loss(y, plain), "seconds": seconds}
    write_json(run.paths.predict_metrics(preds.spec.name), result)
    run.log(f"predict-oof: {preds.spec.name}  OOF accuracy {result['accuracy_no_tta']:.4f} -> {result['accuracy']:.4f} "
            f"with TTA, log-loss {result['log_loss_no_tta']:.4f} -> {result['log_loss']:.4f}")
    return result
