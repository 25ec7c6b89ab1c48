"""The train-base and predict-oof stages: folds, cache, and the (model, fold) job grid.

Each (model, fold) training job reads the cache and the folds and writes only
its own files, so jobs run one after another here, one per local GPU with
`parallel > 1`, or on a cluster through any joblib backend (e.g. Dask:
`with joblib.parallel_config(backend="dask"): ...`). A rerun skips finished jobs.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import torch
from joblib import Parallel, delayed

from oof import (Folds, PredictionTable, RunPaths, StackerError, __version__, atomic_path, load_folds,
                 make_folds, read_json, validate_oof, validate_test, write_folds, write_json, write_table)

from .augment import PLAIN, tta_views
from .batches import ImageSource
from .cache import ImageCache, build_cache, load_cache
from .config import FoldsConfig, ModelSpec, TTAConfig
from .dataset import DataConfig, DatasetSpec, resolve_dataset
from .models import check_sizes, model_norm, resolve_device
from .predict import accuracy, combine_tta, log_loss, predict_views
from .train import Target, build_model, changed_keys, is_trained, load_fold_model, recipe, train_fold


@dataclass
class Job:
    model: ModelSpec
    fold: int


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
    workers = data.decode_workers
    build_cache(paths.cache, "train", spec.train["id"], spec.train["path"], size, data.resize, workers,
                data.check_all_images, log)
    build_cache(paths.cache, "test", spec.test["id"], spec.test["path"], size, data.resize, workers,
                data.check_all_images, log)
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


def load_row_weights(paths: RunPaths, folds: Folds, spec: ModelSpec) -> np.ndarray | None:
    """The sampling weight column a model names, checked: numbers, finite, >= 0, some > 0."""
    column = spec.train.sampling.weights
    if column in ("uniform", "class_balanced"):
        return None
    table = _train_columns(paths, folds)
    if column not in table.columns:
        raise StackerError(f"{spec.name}: train.sampling.weights {column!r} is neither uniform, class_balanced "
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


def check_models(specs: list[ModelSpec], targets: list[Target], log=print) -> None:
    """Build each model once on the CPU (loading its pretrained file) and try every size it will see.

    Runs before any training, so a bad weights file or a size a ViT cannot take
    fails in seconds instead of after the first fold.
    """
    for spec in specs:
        model = build_model(spec, targets)
        sizes = [p.size for p in spec.train.schedule] + [spec.train.prediction_size]
        check_sizes(model, sizes, spec.name)


def train_base(paths: RunPaths, specs: list[ModelSpec], folds: Folds, extra_targets=(), force: bool = False,
               parallel: int = 1, log=print) -> None:
    """Train every (model, fold) job not yet finished (all of them with `force`)."""
    jobs = [Job(s, k) for s in specs for k in range(folds.k)]
    todo = [j for j in jobs if force or not is_trained(paths, j.model.name, j.fold)]
    for j in jobs:
        if j not in todo:
            _check_same_recipe(paths, j)
    log(f"train-base: {len(jobs)} jobs, {len(jobs) - len(todo)} already done, {len(todo)} to run")
    if not todo:
        return
    targets = load_targets(paths, folds, list(extra_targets))
    check_models([s for s in specs if any(j.model is s for j in todo)], targets, log)
    if force:
        for j in todo:
            paths.checkpoint(j.model.name, j.fold).unlink(missing_ok=True)
    if parallel > 1:  # one worker loop per slot (GPU), so two jobs never share a device
        Parallel(n_jobs=parallel)(delayed(_run_jobs)(paths, todo[slot::parallel], folds, targets, slot, log)
                                  for slot in range(parallel))
        return
    loaded = {}
    for job in todo:
        place = (resolve_device(job.model.train.device), job.model.train.gpu_cache_gb)
        if place not in loaded:  # the cache is placed once per device and budget, shared by the jobs
            loaded = {place: _train_images(paths, folds, *place)}
            log(f"  train images: {loaded[place].shape} uint8 in {loaded[place].placement}")
        train_fold(job.model, job.fold, loaded[place], targets, folds, paths,
                   load_row_weights(paths, folds, job.model), log)


def _check_same_recipe(paths: RunPaths, job: Job) -> None:
    """A finished job is only skipped when it was trained the way the config says now."""
    changed = changed_keys(read_json(paths.history(job.model.name, job.fold)), recipe(job.model))
    if changed:
        raise StackerError(f"{paths.history(job.model.name, job.fold)}: {job.model.name} fold {job.fold} was "
                           f"trained with other settings ({', '.join(changed)}); give the model a new name, "
                           "or pass --force to train it again")


def _run_jobs(paths: RunPaths, jobs: list[Job], folds: Folds, targets, slot: int, log) -> None:
    for job in jobs:
        device = resolve_device(job.model.train.device)
        if device.type == "cuda":
            device = torch.device("cuda", slot % torch.cuda.device_count())
        train_fold(job.model, job.fold, _train_images(paths, folds, device, job.model.train.gpu_cache_gb),
                   targets, folds, paths, load_row_weights(paths, folds, job.model), log)


def _train_images(paths: RunPaths, folds: Folds, device, gpu_cache_gb: float) -> ImageSource:
    cache = load_cache(paths.cache, "train")
    _check_cache_rows(cache, folds.ids, paths)
    return ImageSource(cache.images, device, gpu_cache_gb)


def _check_cache_rows(cache: ImageCache, ids: np.ndarray, paths: RunPaths) -> None:
    if len(cache.ids) != len(ids) or (cache.ids != ids).any():
        raise StackerError(f"{paths.cache}: the image cache does not match {paths.folds}; rerun train-base")


def predict_oof(paths: RunPaths, specs: list[ModelSpec], folds: Folds, tta: TTAConfig, extra_targets=(),
                force: bool = False, log=print) -> dict[str, dict]:
    """Predict each model's OOF rows and the test set with TTA; write the tables.

    Returns:
        Per model: OOF accuracy and log-loss with and without TTA (main target).
    """
    train, test = load_cache(paths.cache, "train"), load_cache(paths.cache, "test")
    _check_cache_rows(train, folds.ids, paths)
    targets = load_targets(paths, folds, list(extra_targets))
    metrics = {}
    for spec in specs:
        missing = [k for k in range(folds.k) if not is_trained(paths, spec.name, k)]
        if missing:
            raise StackerError(f"{spec.name}: folds {missing} are not trained yet; run train-base first")
        if not force and _predictions_current(paths, spec.name, folds.k):
            log(f"predict-oof: {spec.name} already predicted (--force to redo)")
            continue
        metrics[spec.name] = _predict_model(paths, spec, folds, targets, tta, train, test, log)
    return metrics


def _predictions_current(paths: RunPaths, model: str, k: int) -> bool:
    """Tables exist and are newer than every fold's weights (a retrained fold makes them stale)."""
    tables = [paths.oof(model), paths.test(model)]
    if not all(p.is_file() for p in tables):
        return False
    newest_weights = max(paths.weights(model, f).stat().st_mtime_ns for f in range(k))
    return min(p.stat().st_mtime_ns for p in tables) > newest_weights


def _predict_model(paths, spec, folds: Folds, targets, tta, train: ImageCache, test: ImageCache, log) -> dict:
    t0 = time.perf_counter()
    device = resolve_device(spec.train.device)
    size, views = spec.train.prediction_size, [PLAIN, *tta_views(tta.n)]
    budget = spec.train.gpu_cache_gb
    train_images, test_images = ImageSource(train.images, device, budget), ImageSource(test.images, device, budget)
    n, n_test = len(folds.ids), len(test.ids)
    plain = [np.zeros((n, len(t.classes))) for t in targets]  # per target (N, C_t): the main one for metrics
    oof = [np.zeros((n, len(t.classes))) for t in targets]
    test_sum = [np.zeros((n_test, len(t.classes))) for t in targets]
    meta = {"model": spec.name, "arch": spec.arch, "folds_sha256": folds.sha256, "version": __version__,
            "tta": {"n": tta.n, "combine": tta.combine, "beta": tta.beta, "size": list(size)}}
    compiled = spec.train.compile and device.type == "cuda"
    for k in range(folds.k):
        model = load_fold_model(paths, spec, k, targets, device)
        norm, rows = model_norm(model), folds.valid_rows(k)
        forward = torch.compile(model) if compiled else model
        for t, p in enumerate(predict_views(forward, train_images, rows, size, views, norm, tta.batch_size,
                                            fixed_shape=compiled)):
            plain[t][rows], oof[t][rows] = p[0], combine_tta(p[0], p[1:], tta.combine, tta.beta)
        test_preds = predict_views(forward, test_images, np.arange(n_test), size, views, norm, tta.batch_size,
                                   fixed_shape=compiled)
        for t, target in enumerate(targets):
            p = combine_tta(test_preds[t][0], test_preds[t][1:], tta.combine, tta.beta) if n_test else test_sum[t]
            test_sum[t] += p
            _write_test(paths.test_fold(spec.name, k, target.name), p, test.ids, target, {**meta, "fold": k})
        log(f"  {spec.name} fold {k}: {len(rows)} OOF rows, {n_test} test rows")
    for t, target in enumerate(targets):
        fold_view = replace(folds, classes=target.classes,
                            table=folds.table.assign(label=[target.classes[i] for i in target.y]))
        write_table(paths.oof(spec.name, target.name),
                    validate_oof(PredictionTable(folds.ids, oof[t], target.classes, folds.fold, meta), fold_view))
        _write_test(paths.test(spec.name, target.name), test_sum[t] / folds.k, test.ids, target, meta)
    return _report(paths, spec, folds.y, plain[0], oof[0], t0, log)


def _write_test(path, proba, ids, target: Target, meta) -> None:
    proba = proba.reshape(len(ids), len(target.classes))
    table = PredictionTable(ids, proba, target.classes, None, meta, str(path))
    write_table(path, validate_test(table, ids, target.classes))


def _report(paths, spec, y, plain, oof, t0, log) -> dict:
    result = {"accuracy": accuracy(oof, y), "log_loss": log_loss(oof, y),
              "accuracy_no_tta": accuracy(plain, y), "log_loss_no_tta": log_loss(plain, y),
              "seconds": time.perf_counter() - t0}
    write_json(paths.preds_dir(spec.name) / "metrics.json", result)
    log(f"predict-oof: {spec.name}  OOF accuracy {result['accuracy_no_tta']:.4f} -> {result['accuracy']:.4f} "
        f"with TTA, log-loss {result['log_loss_no_tta']:.4f} -> {result['log_loss']:.4f}")
    return result
