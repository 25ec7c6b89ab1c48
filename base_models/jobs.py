"""The train-base stage: folds, cache, and the (model, fold) job grid (predict-oof's jobs: `predict_oof.py`).

Each (model, fold) training job reads the cache and the folds and writes only
its own files, so jobs run one after another here, or through an engine
(`engines.py`): one worker process per local GPU fed from one queue, or one Ray
task per job on a cluster. A job runs under its own file lock, so processes
sharing a run directory never train one job twice, and a job rerun after its
worker died resumes from its last epoch checkpoint.

Nothing is trusted for existing or for being newer: a rerun skips a finished job
only while its history's digests (folds, train cache, weights) and recipe match
the run now, and refuses stale ones. `--force` deletes the jobs' outputs before it
starts.

`train-base --full` (`train_full`) trains one more job per model, its full fit (a `FoldJob` of fold
None): every row of the folds, none held out, the fold jobs' recipe and epochs, its files `full.*`
beside theirs. One per model with `folds.repeats` > 1 too: it depends on no fold assignment. It is
skipped, refused when stale, resumed and locked as a fold job is, and runs on the same engines.
"""
from __future__ import annotations

import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator

import numpy as np
import pandas as pd
from filelock import FileLock, Timeout

from oof import (DataEdits, Folds, GridProgress, RunPaths, StackerError, apply_edits, atomic_path, base_folds,
                 check_edits, edits_line, in_order, info, load_folds, preview, read_edits, remove_temps, write_folds)

from .batches import CacheBudget, ImageSource, place_images
from .cache import CacheOptions, ImageCache, build_cache, load_cache
from .config import SAMPLING_BUILTIN, DataConfig, EngineConfig, FoldsConfig, ModelSpec, split_clusters
from .dataset import DatasetSpec, resolve_dataset
from .engines import JobLog, create_engine, job_label, run_jobs
from .models import check_sizes, resolve_device
from .job_state import check_full_keep
from .train import Sources, Target, TrainInputs, build_model, is_trained, job_sources, stale_reason, train_fold


@dataclass(frozen=True)
class StageOptions:
    """How a stage runs, never what it computes.

    Attributes:
        force: redo finished work: delete the stage's outputs first (every job's weights, history and
            checkpoint; every model's tables), then do it all again.
        parallel: train-base jobs at once on CPU (the local engine runs one per visible GPU on CUDA);
            the size of the local cluster the Ray engine starts when it joins none.
        log: where progress lines go.
        only: run exactly these jobs: (model, fold) items, or (model, repeat, fold) with repeats;
            empty for every job.
        engine: where the jobs run (`EngineConfig`).
        device: `stacker predict --device`: auto, cpu or cuda for every model in place of its own
            train.device (on the CPU in float32); None: each model's own.
        speed_ratio: `stacker predict`'s predicted time is divided by it (the stack's
            `stack.predict_speed_ratio`: this card against the one predict-oof measured the costs on).
    """

    force: bool = False
    parallel: int = 1
    log: Callable[[str], None] = info
    only: tuple[tuple, ...] = ()
    engine: EngineConfig = field(default_factory=EngineConfig)
    device: str | None = None
    speed_ratio: float = 1.0


@dataclass(frozen=True)
class FoldJob:
    """The unit of train-base and predict-oof: one model with one fold of one repeat held out; with fold
    None the model's full fit (repeat 0's paths and folds: every row trained on, none held out)."""

    model: ModelSpec
    fold: int | None
    repeat: int = 0

    @property
    def full(self) -> bool:
        """Whether the job is the model's full fit (`train-base --full`)."""
        return self.fold is None

    def paths(self, paths: RunPaths) -> RunPaths:
        """Where the job's files live: the run's own layout for repeat 0, `repeat<r>` folders otherwise."""
        return paths.for_repeat(self.repeat)

    def folds(self, folds: Folds) -> Folds:
        """The one assignment the job trains and predicts on: its repeat's."""
        return folds.for_repeat(self.repeat)

    @property
    def key(self) -> tuple[str, int, int | None]:
        return self.model.name, self.repeat, self.fold


def full_jobs(specs: list[ModelSpec]) -> list[FoldJob]:
    """Each model's full fit, in model order: one per model whatever `folds.repeats`."""
    return [FoldJob(s, None) for s in specs]


def job_grid(specs: list[ModelSpec], k: int, repeats: int = 1) -> list[FoldJob]:
    """Every (model, repeat, fold) job of a run, model by model, repeat by repeat."""
    return [FoldJob(s, fold, r) for s in specs for r in range(repeats) for fold in range(k)]


def select_jobs(jobs: list[FoldJob], only: tuple[tuple, ...], k: int, repeats: int = 1) -> list[FoldJob]:
    """The jobs `only` names ((model, fold), or (model, repeat, fold)), in grid order; all when it names none.

    Raises:
        StackerError: `only` names a model not in the run, a fold outside 0..k-1 or a repeat outside 0..R-1.
    """
    if not only:
        return jobs
    names = sorted({j.model.name for j in jobs})
    wanted = {_only_key(item) for item in only}
    for model, repeat, fold in sorted(wanted, key=str):
        if model not in names:
            raise StackerError(f"only: no model {model!r} in the run; its models are {names}")
        if not (isinstance(fold, int) and 0 <= fold < k):
            raise StackerError(f"only: {model} fold {fold!r} is not a fold of the run (0..{k - 1})")
        if not (isinstance(repeat, int) and 0 <= repeat < repeats):
            raise StackerError(f"only: {model} repeat {repeat!r} is not a repeat of the run (0..{repeats - 1})")
    return [j for j in jobs if j.key in wanted]


def _only_key(item: tuple) -> tuple:
    """(model, repeat, fold) of an `only` item: (model, fold) names repeat 0."""
    return (item[0], 0, item[1]) if len(item) == 2 else tuple(item)


def cache_size(specs: list[ModelSpec]) -> tuple[int, int]:
    """The one cache size every job can use: the largest height and width any phase or prediction asks for."""
    sizes = [p.size for s in specs for p in s.train.schedule] + [s.train.prediction_size for s in specs]
    return max(h for h, _ in sizes), max(w for _, w in sizes)


def prepare_run(paths: RunPaths, data: DataConfig, folds_cfg: FoldsConfig, size, force: bool = False,
                log=info) -> tuple[DatasetSpec, Folds]:
    """Resolve the dataset, make (or check) the folds, decode the train and test caches.

    `data.exclude` and `data.relabel` are read and checked against the dataset first. Folds checked
    against an existing folds.parquet, or made with `folds.duplicates: off`, come next (a config error
    shows before any decoding); folds made while looking for duplicates come after the caches, whose
    image hashes the finder compares. The caches hold every dataset row, excluded ones too.
    """
    spec = resolve_dataset(data)
    log(f"dataset: {len(spec.train)} train images in {len(spec.classes)} classes, {len(spec.test)} test images")
    edits = read_edits(data.exclude, data.relabel)
    check_edits(edits, spec.train["id"], spec.test["id"], spec.classes)
    look = folds_cfg.duplicates != "off" and (force or not paths.folds.is_file())
    folds = None if look else _run_folds(paths, spec, folds_cfg, edits, force, log)
    options = CacheOptions.from_data(data, size)
    caches = {split: build_cache(paths, split, table["id"], table["path"], options, log)
              for split, table in (("train", spec.train), ("test", spec.test))}
    if look:
        clusters = find_run_duplicates(paths, spec, caches, folds_cfg, log)
        folds = _new_folds(paths, spec, folds_cfg, edits, log, clusters)
    columns = spec.train.drop(columns=["path", "label"])
    with run_file(paths, paths.targets), atomic_path(paths.targets) as tmp:
        columns.to_parquet(tmp, index=False)
    return spec, folds


@contextmanager
def run_file(paths: RunPaths, path) -> Iterator[None]:
    """Hold the run's config lock while one of the run's own files (folds, targets, duplicates) is written,
    first deleting what a killed writer of it left: under the lock no other train-base is writing it."""
    paths.root.mkdir(parents=True, exist_ok=True)
    with FileLock(paths.config_lock):
        remove_temps(path.parent, path.name)
        yield


def find_run_duplicates(paths: RunPaths, spec: DatasetSpec, caches: dict[str, ImageCache], cfg: FoldsConfig,
                        log=info) -> np.ndarray:
    """Find the near-duplicate images of the run's caches, list them in `paths.duplicates`, log what matters.

    Returns:
        (N,) int64 duplicate cluster of each train row, -1 for none.

    Raises:
        StackerError: a cache without image hashes.
    """
    from .duplicates import DuplicateOptions, SplitImages, find_duplicates, write_duplicates

    for split, cache in caches.items():
        if cache.hashes is None:
            raise StackerError(f"{paths.cache_index(split)}: holds no image hashes, which folds.duplicates: "
                               f"{cfg.duplicates} needs; delete {paths.cache} to decode again, or set "
                               "folds.duplicates: off")
    distance = {} if cfg.duplicate_distance is None else {"max_distance": cfg.duplicate_distance}
    options = DuplicateOptions(**distance)  # the finder's defaults for the rest
    train, test = caches["train"], caches["test"]
    found = find_duplicates(SplitImages(train.ids, spec.train["label"], train.hashes, train.pixel_digests),
                            SplitImages(test.ids, None, test.hashes, test.pixel_digests), options)
    with run_file(paths, paths.duplicates):
        write_duplicates(paths.duplicates, found)
    log(f"{found.summary()} -> {paths.duplicates}")
    for line in found.warnings:
        log(f"warning: {line}")
    pairs = found.pairs
    conflicts, in_test = pairs[pairs["conflict"]], pairs[pairs["kind"] == "train-test"]
    if len(conflicts):
        first = conflicts.iloc[0]
        log(f"warning: {len(conflicts)} near-duplicate train pair(s) with different labels, first {first['id_a']} "
            f"({first['label_a']}) ~ {first['id_b']} ({first['label_b']}); listed in {paths.duplicates}")
    if len(in_test):
        log(f"warning: {in_test['id_a'].nunique()} train image(s) with a near-duplicate in test, first "
            f"{in_test['id_a'].iloc[0]} ~ {in_test['id_b'].iloc[0]}; listed in {paths.duplicates}")
    return np.asarray(found.cluster, dtype=np.int64)


def _run_folds(paths: RunPaths, spec: DatasetSpec, cfg: FoldsConfig, edits: DataEdits, force: bool,
               log) -> Folds:
    """The run's folds: an existing folds.parquet checked against the config (never regrouped) and given
    `edits`, else made and written."""
    if paths.folds.is_file() and not force:
        return _existing_folds(paths, spec, cfg, edits, log)
    return _new_folds(paths, spec, cfg, edits, log)


def _new_folds(paths: RunPaths, spec: DatasetSpec, cfg: FoldsConfig, edits: DataEdits, log,
               clusters: np.ndarray | None = None) -> Folds:
    """The base assignment of every dataset row (grouped on `clusters` with `folds.duplicates: group`),
    `edits` applied on top, written."""
    base = cfg.assign(spec.train, spec.classes, clusters)  # stratified, grouped or read from folds.file; R repeats
    made = apply_edits(base, edits)
    with run_file(paths, paths.folds):
        write_folds(paths.folds, made)
    log(f"folds: k={made.k} seed={made.seed}{_how_folds(made, cfg, clusters)} -> {paths.folds}")
    if edits:
        log(f"folds: {edits_line(made, edits.keys)} -> {paths.folds}")
    if cfg.duplicates == "warn" and clusters is not None and (clusters >= 0).any():
        split = split_clusters(base, clusters)
        log(f"warning: folds.duplicates: warn: the folds split {len(split)} of {clusters.max() + 1} near-duplicate "
            "clusters, whose OOF rows score optimistic (folds.duplicates: group keeps them whole)")
    return made


def _existing_folds(paths: RunPaths, spec: DatasetSpec, cfg: FoldsConfig, edits: DataEdits, log) -> Folds:
    """folds.parquet, its base assignment checked to be what the config makes over the groups it records
    (the excluded rows' recorded groups too), then `edits` applied to that base; the file rewritten when
    the edits change it."""
    stored = load_folds(paths.folds)
    base = base_folds(stored)
    groups = None
    if base.groups is not None:
        groups = pd.Series(base.groups, index=base.ids).reindex(spec.train["id"].astype(str)).to_numpy()
    fits = groups is None or not pd.isna(groups).any()
    if not fits or base.sha256 != cfg.remade(spec.train, spec.classes, groups).sha256:
        raise StackerError(f"{paths.folds}: made from another dataset or folds config (k, seed, repeats, "
                           "group_column, file); every model of a run must share one fold assignment. Use a "
                           "new run directory, or --force to start this one again")
    if not edits and not stored.edits:
        return stored
    folds = apply_edits(in_order(base, spec.train["id"]), edits)
    if folds.sha256 == stored.sha256 and folds.edits == stored.edits:
        return stored
    with run_file(paths, paths.folds):
        write_folds(paths.folds, folds)
    log(f"folds: {edits_line(folds, edits.keys)} -> {paths.folds}")
    return folds


def _how_folds(made: Folds, cfg: FoldsConfig, clusters: np.ndarray | None) -> str:
    """The folds line's settings besides k and seed: those not at their plain value, groups and clusters used."""
    settings = {"repeats": made.repeats, "group_column": cfg.group_column, "file": cfg.file}
    how = "".join(f" {key}={value}" for key, value in settings.items() if value not in (None, 1))
    if cfg.duplicates != "group":
        how += f" duplicates={cfg.duplicates}"
    if made.groups is not None:
        how += f" groups={len(np.unique(made.groups))}"
    if cfg.duplicates == "group" and clusters is not None and (clusters >= 0).any():
        how += f" duplicate_clusters={int(clusters.max()) + 1}"
    return how


def load_targets(paths: RunPaths, folds: Folds, extra: list[str]) -> list[Target]:
    """The main target from the folds, then each extra target column, rows in folds order; an extra target's
    classes are those of every dataset row (excluded ones too), so excluding a row never changes a head."""
    targets = [Target(None, folds.classes, folds.y)]
    if not extra:
        return targets
    every = _targets_table(paths)
    table = _train_columns(paths, folds, every)
    for name in extra:
        if name not in table.columns:
            raise StackerError(f"{paths.targets}: no column {name!r} (data.extra_targets); rerun train-base")
        classes = tuple(sorted(every[name].astype(str).unique()))
        index = {c: i for i, c in enumerate(classes)}
        targets.append(Target(name, classes, table[name].astype(str).map(index).to_numpy(np.int64, copy=True)))
    return targets


def extra_targets(data: DataConfig | None) -> list[str]:
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


def _targets_table(paths: RunPaths) -> pd.DataFrame:
    """targets.parquet: the train CSV's other columns of every dataset row, indexed by id."""
    return pd.read_parquet(paths.targets).astype({"id": str}).set_index("id", drop=False)


def _train_columns(paths: RunPaths, folds: Folds, table: pd.DataFrame | None = None) -> pd.DataFrame:
    """targets.parquet's rows of the folds' ids, in folds order."""
    table = _targets_table(paths) if table is None else table
    missing = ~pd.Index(folds.ids).isin(table.index)
    if missing.any():
        raise StackerError(f"{paths.targets}: no row for folds ids {preview(folds.ids[missing])}; rerun train-base")
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
    jobs = select_jobs(job_grid(specs, folds.k, folds.repeats), options.only, folds.k, folds.repeats)
    train_jobs(paths, jobs, folds, data, options)


def train_full(paths: RunPaths, specs: list[ModelSpec], folds: Folds, data: DataConfig | None = None,
               options: StageOptions = StageOptions()) -> None:
    """`train-base --full`: train each model's full fit (every row of `folds`, none held out) not yet finished;
    refuse when a finished one is stale.

    Args:
        paths: the run directory, prepared by `prepare_run`.
        specs: the models to fit (`--only MODEL`'s alone).
        folds: the run's folds: their ids and labels are the rows trained on (after data.exclude / relabel).
        data: the `data:` section (its extra_targets); None for the main target alone.
        options: force (delete the full fits' outputs first, then train them), parallel, log, engine
            (`only` is not read: `specs` are the models).

    Raises:
        StackerError: a model with `train.keep: best` (before anything trains); finished full fits trained
            on other rows or labels, other train images, another recipe, or whose weights changed since
            (one line naming them and `--full --force --only MODEL`); a job that failed.
    """
    check_full_keep(specs)
    train_jobs(paths, full_jobs(specs), folds, data, options)


def train_jobs(paths: RunPaths, jobs: list[FoldJob], folds: Folds, data: DataConfig | None = None,
               options: StageOptions = StageOptions()) -> None:
    """Train each of `jobs` (fold jobs, or full fits) not yet finished; refuse when a finished one is stale."""
    log = options.log
    if options.force:
        remove_job_outputs(paths, jobs, log)
    run = _TrainRun(paths, folds, [], load_cache(paths, "train").digest, log)
    todo = [j for j in jobs if not is_trained(j.paths(paths), j.model.name, j.fold)]
    run.refuse_stale([j for j in jobs if j not in todo])
    stage, noun = ("train-base --full", "full fits") if jobs and all(j.full for j in jobs) else ("train-base", "jobs")
    log(f"{stage}: {len(jobs)} {noun}, {len(jobs) - len(todo)} already done, {len(todo)} to run")
    if not todo:
        return
    targets = load_targets(paths, folds, extra_targets(data))
    specs = list({id(j.model): j.model for j in todo}.values())  # each model once, in job order
    check_models(specs, targets)
    replace(run, targets=targets).dispatch(todo, options)


def remove_job_outputs(paths: RunPaths, jobs: list[FoldJob], log=info) -> None:
    """--force's first step: delete each job's history, weights and checkpoint before anything is trained
    (or the folds rewritten), so an interrupted --force never leaves old results that look finished.
    A job whose lock another process holds is being trained there: its files are left to it."""
    for job in jobs:
        at = job.paths(paths)
        if not at.model_dir(job.model.name).is_dir():
            continue
        try:
            held = job_lock(paths, job).acquire()
        except Timeout:
            log(f"  {job_name(job)}: running in another process, its files are kept")
            continue
        with held:  # the history goes first: it is what marks a job finished
            for path in (at.history, at.weights, at.checkpoint, at.job_log, at.history_csv):
                path(job.model.name, job.fold).unlink(missing_ok=True)


def job_lock(paths: RunPaths, job: FoldJob) -> FileLock:
    """The job's lock, taken without waiting (timeout 0). An flock: the kernel releases it when
    its process dies, even by SIGKILL, so a crashed job never blocks the next run."""
    at = job.paths(paths)
    at.model_dir(job.model.name).mkdir(parents=True, exist_ok=True)
    return FileLock(at.job_lock(job.model.name, job.fold), timeout=0)


def _fold_list(jobs: list[FoldJob]) -> str:
    """"fold 1", "folds 0, 2", "repeat 1 fold 0", "full fit": the jobs of one model, for a message."""
    names = [job_name(j).removeprefix(f"{j.model.name} ") for j in jobs]
    if all(j.repeat == 0 for j in jobs) and len(jobs) > 1:
        return f"folds {', '.join(str(j.fold) for j in jobs)}"
    return ", ".join(names)


class JobRun:
    """What a stage's (model, fold) jobs share, and how they run: through an engine (`run_job` in each
    worker), or one after another in this process, the images placed once per device and budget.

    A subclass (a frozen dataclass with `paths`, `log` and the rest of its call's state) gives
    `place(device, budget)`, the images a job reads placed there under a `CacheBudget`, and `do(job, placed)`,
    the job.
    """

    stage = "train-base"

    def run_job(self, job: FoldJob) -> float | None:
        """One job in an engine's worker: check the run directory is visible here, log to the job's own
        file, place the images on the worker's device (the one GPU it sees), run it."""
        check_run_visible(self.paths)
        run = replace(self, log=JobLog(job.paths(self.paths).job_log(job.model.name, job.fold), job_name(job)))
        run.log(f"  {job_name(job)}: started on {socket.gethostname()}")
        return run.do(job, run.place(resolve_device(job.model.train.device), CacheBudget.of(job.model.train)))

    def dispatch(self, todo: list[FoldJob], options: StageOptions) -> None:
        """The pending jobs through the engine, or in this process where the engine runs them here
        (`Engine.runs_here`: the local engine with one worker)."""
        engine = create_engine(options.engine)
        workers = engine.workers(todo, options.parallel)
        if not engine.runs_here(workers):
            # what travels to a worker, its log replaced there; `info` pickles by name wherever it runs, where
            # builtins.print may not: Ray's driver swaps it for tqdm_ray's safe_print when a worker first logs
            work = replace(self, log=info).run_job
            run_jobs(work, todo, options.engine, workers, options.log, self.stage)
            return
        placed, grid = {}, GridProgress(len(todo), self.log)
        for job in todo:
            where = (resolve_device(job.model.train.device), CacheBudget.of(job.model.train))
            if where not in placed:
                placed.clear()  # the previous placement's memory is free before the next is measured
                placed[where] = self.place(*where)
            job_log = JobLog(job.paths(self.paths).job_log(job.model.name, job.fold), job_name(job), echo=self.log)
            replace(self, log=job_log).do(job, placed[where])
            grid.step(job_name(job))


@dataclass(frozen=True)
class _TrainRun(JobRun):
    """What every training job of one train-base call shares; the images are placed per device."""

    paths: RunPaths
    folds: Folds
    targets: list[Target]
    cache_sha256: str  # the train cache every job of this call trains on
    log: Callable[[str], None] = info

    def sources(self, job: FoldJob) -> Sources:
        """What the job's weights must be made from: its repeat's folds, its training rows and this call's
        train cache."""
        return job_sources(job.folds(self.folds), job.fold, job.model, self.cache_sha256)

    def refuse_stale(self, finished: list[FoldJob]) -> None:
        """A finished job is skipped only while it is current; stale ones are refused in one line naming them all."""
        stale: dict[tuple[str, str], list[FoldJob]] = {}  # (model, reason) -> jobs
        for job in finished:
            reason = stale_reason(job.paths(self.paths), job.model, job.fold, self.sources(job))
            if reason:
                stale.setdefault((job.model.name, reason), []).append(job)
        if not stale:
            return
        first = next(iter(stale.values()))[0]
        groups = "; ".join(f"{name} {_fold_list(js)} {'was' if len(js) == 1 else 'were'} {reason}"
                           for (name, reason), js in stale.items())
        jobs = [j for js in stale.values() for j in js]
        them = "it" if len(jobs) == 1 else "them"
        raise StackerError(f"{first.paths(self.paths).history(first.model.name, first.fold)}: {groups}; pass "
                           f"{self._force(jobs, finished)} to train {them} again (or give a model with new "
                           "settings a new name)")

    def _force(self, stale: list[FoldJob], finished: list[FoldJob]) -> str:
        """The flags that retrain exactly the stale jobs: --force alone when no finished job stays current;
        full fits by `--full --force --only MODEL [MODEL...]`."""
        if all(j.full for j in stale):
            return "--full --force --only " + " ".join(j.model.name for j in stale)
        if len(stale) == len(finished):
            return "--force"
        items = [f"{j.model.name}:{j.fold}" if self.folds.repeats == 1 else f"{j.model.name}:{j.repeat}:{j.fold}"
                 for j in stale]
        return "--force " + " ".join(f"--only {item}" for item in items)

    def train(self, job: FoldJob, images: ImageSource) -> float | None:
        """Train `job` under its lock; one another process holds, or finished meanwhile, is skipped.

        Returns:
            Seconds inside `train_fold`; None when skipped.
        """
        name, fold, at = job.model.name, job.fold, job.paths(self.paths)
        try:
            held = job_lock(self.paths, job).acquire()
        except Timeout:
            self.log(f"  {job_name(job)}: running in another process, skipped")
            return None
        with held:
            if is_trained(at, name, fold):  # another process finished it since this one looked
                self.refuse_stale([job])
                self.log(f"  {job_name(job)}: finished in another process meanwhile, skipped")
                return None
            remove_temps(at.model_dir(name), f"{at.job_stem(fold)}.")  # a killed run's partial writes
            inputs = TrainInputs(at, job.folds(self.folds), self.targets, images, self.cache_sha256)
            t0 = time.perf_counter()
            train_fold(job.model, fold, inputs, load_row_weights(self.paths, self.folds, job.model), self.log)
            return time.perf_counter() - t0

    def place(self, device, budget: CacheBudget) -> ImageSource:
        """The train cache on `device`, read in folds order: the very cache (by digest) the call checked its
        jobs against."""
        cache = load_cache(self.paths, "train")
        rows = check_cache_rows(cache, self.folds.ids, self.paths)
        if cache.digest != self.cache_sha256:
            raise StackerError(f"{self.paths.cache_index('train')}: the train image cache changed while train-base "
                               "ran (another process rebuilt it); run train-base again")
        (images,) = place_images([cache.images], device, budget, self.log)
        images = images.select(rows)
        self.log(f"  train images: {images.shape} uint8 in {images.placement}")
        return images

    def do(self, job: FoldJob, images: ImageSource) -> float | None:
        return self.train(job, images)


def job_name(job: FoldJob) -> str:
    return job_label(job.model.name, job.fold, job.repeat)


def check_run_visible(paths: RunPaths) -> None:
    """A worker on another node must see the run directory at the same path (shared storage)."""
    try:
        with open(paths.folds, "rb"):
            pass
    except OSError as e:
        raise StackerError(f"{socket.gethostname()}: cannot read {paths.folds} ({e.strerror}); every worker "
                           "must see the run directory at the same path (shared storage)") from None


def check_cache_rows(cache: ImageCache, ids: np.ndarray, paths: RunPaths) -> np.ndarray:
    """(N,) int64 cache row of each folds row (`ids`, folds order): every row in order when the cache holds
    exactly the folds' ids, else each id's row (the cache holds every dataset row, the folds those
    `data.exclude` left).

    Raises:
        StackerError: a folds id the cache does not hold.
    """
    cached = cache.ids.tolist()
    wanted = [str(i) for i in np.asarray(ids).tolist()]
    if cached == wanted:
        return np.arange(len(wanted), dtype=np.int64)
    position = {x: i for i, x in enumerate(cached)}
    missing = [x for x in wanted if x not in position]
    if missing:
        raise StackerError(f"{paths.cache}: the image cache does not match {paths.folds} (no image of folds ids "
                           f"{preview(missing)}); rerun train-base")
    return np.array([position[x] for x in wanted], dtype=np.int64)
