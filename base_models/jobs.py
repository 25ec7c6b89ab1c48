"""The train-base and predict-oof stages: folds, cache, and the (model, fold) job grid.

Each (model, fold) training job reads the cache and the folds and writes only
its own files, so jobs run one after another here, one per local GPU with
`parallel > 1`, or on a cluster through any joblib backend (e.g. Dask:
`with joblib.parallel_config(backend="dask"): ...`). A rerun skips finished jobs.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from joblib import Parallel, delayed

from oof import (Folds, PredictionTable, RunPaths, StackerError, load_folds, make_folds, validate_oof,
                 read_json, validate_test, write_folds, write_json, write_table, __version__)

from .augment import PLAIN, tta_views
from .cache import ImageCache, build_cache, load_cache
from .config import FoldsConfig, ModelSpec, TTAConfig
from .dataset import DataConfig, DatasetSpec, resolve_dataset
from .models import model_norm, resolve_device
from .predict import accuracy, combine_tta, log_loss, predict_views
from .train import is_trained, load_fold_model, train_fold


@dataclass
class Job:
    model: ModelSpec
    fold: int


def cache_size(specs: list[ModelSpec], tta: TTAConfig) -> tuple[int, int]:
    """The one cache size every job can use: the largest height and width asked for."""
    sizes = [s.train.size for s in specs] + ([tta.size] if tta.size else [])
    return max(h for h, _ in sizes), max(w for _, w in sizes)


def prepare_run(paths: RunPaths, data: DataConfig, folds_cfg: FoldsConfig, size, force: bool = False,
                log=print) -> tuple[DatasetSpec, Folds]:
    """Resolve the dataset, make (or check) the folds, decode the train and test caches."""
    spec = resolve_dataset(data)
    log(f"dataset: {len(spec.train)} train images in {len(spec.classes)} classes, {len(spec.test)} test images")
    folds = _folds_for(paths, spec, folds_cfg, force, log)
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


def train_base(paths: RunPaths, specs: list[ModelSpec], folds: Folds, force: bool = False, parallel: int = 1,
               log=print) -> None:
    """Train every (model, fold) job not yet finished (all of them with `force`)."""
    jobs = [Job(s, k) for s in specs for k in range(folds.k)]
    todo = [j for j in jobs if force or not is_trained(paths, j.model.name, j.fold)]
    for j in jobs:
        if j not in todo:
            _check_same_recipe(paths, j)
    log(f"train-base: {len(jobs)} jobs, {len(jobs) - len(todo)} already done, {len(todo)} to run")
    if force:
        for j in todo:
            paths.checkpoint(j.model.name, j.fold).unlink(missing_ok=True)
    if parallel > 1:
        Parallel(n_jobs=parallel)(delayed(_run_job)(paths, j, folds, i % parallel, log) for i, j in enumerate(todo))
        return
    loaded = {}
    for job in todo:
        device = resolve_device(job.model.train.device)
        if device not in loaded:  # the cache is loaded once per device, shared by the jobs
            loaded = {device: _train_tensors(paths, folds, device)}
        train_fold(job.model, job.fold, *loaded[device], folds, paths, log)


def _check_same_recipe(paths: RunPaths, job: Job) -> None:
    """A finished job is only skipped when it was trained the way the config says now."""
    done = read_json(paths.history(job.model.name, job.fold))
    now = json.loads(json.dumps(asdict(job.model.train)))
    if done["arch"] != job.model.arch or done["train"] != now:
        changed = sorted(k for k in now if done["train"].get(k) != now[k]) or ["arch"]
        raise StackerError(f"{paths.history(job.model.name, job.fold)}: {job.model.name} fold {job.fold} was "
                           f"trained with other settings ({', '.join(changed)}); give the model a new name, "
                           "or pass --force to train it again")


def _run_job(paths: RunPaths, job: Job, folds: Folds, slot: int, log) -> None:
    device = resolve_device(job.model.train.device)
    if device.type == "cuda":
        device = torch.device("cuda", slot % torch.cuda.device_count())
    train_fold(job.model, job.fold, *_train_tensors(paths, folds, device), folds, paths, log)


def _train_tensors(paths: RunPaths, folds: Folds, device) -> tuple[torch.Tensor, torch.Tensor]:
    cache = load_cache(paths.cache, "train")
    _check_cache_rows(cache, folds.ids, paths)
    images = cache.to_tensor(device)  # (N, H, W, 3) uint8
    return images, torch.as_tensor(folds.y, device=device)


def _check_cache_rows(cache: ImageCache, ids: np.ndarray, paths: RunPaths) -> None:
    if len(cache.ids) != len(ids) or (cache.ids != ids).any():
        raise StackerError(f"{paths.cache}: the image cache does not match {paths.folds}; rerun train-base")


def predict_oof(paths: RunPaths, specs: list[ModelSpec], folds: Folds, tta: TTAConfig, force: bool = False,
                log=print) -> dict[str, dict]:
    """Predict each model's OOF rows and the test set with TTA; write the tables.

    Returns:
        Per model: OOF accuracy and log-loss with and without TTA.
    """
    train, test = load_cache(paths.cache, "train"), load_cache(paths.cache, "test")
    _check_cache_rows(train, folds.ids, paths)
    metrics = {}
    for spec in specs:
        if paths.oof(spec.name).is_file() and paths.test(spec.name).is_file() and not force:
            log(f"predict-oof: {spec.name} already predicted (--force to redo)")
            continue
        missing = [k for k in range(folds.k) if not is_trained(paths, spec.name, k)]
        if missing:
            raise StackerError(f"{spec.name}: folds {missing} are not trained yet; run train-base first")
        metrics[spec.name] = _predict_model(paths, spec, folds, tta, train, test, log)
    return metrics


def _predict_model(paths, spec, folds, tta, train: ImageCache, test: ImageCache, log) -> dict:
    t0 = time.perf_counter()
    device = resolve_device(spec.train.device)
    size = tta.size or spec.train.size
    views = [PLAIN, *tta_views(tta.n)]
    train_images, test_images = train.to_tensor(device), test.to_tensor(device)
    n, c = len(folds.ids), len(folds.classes)
    oof_plain, oof_tta = np.zeros((n, c)), np.zeros((n, c))
    test_folds = []
    meta = {"model": spec.name, "arch": spec.arch, "folds_sha256": folds.sha256, "version": __version__,
            "tta": {"n": tta.n, "combine": tta.combine, "beta": tta.beta, "size": list(size)}}
    for k in range(folds.k):
        model = load_fold_model(paths, spec, k, c, device)
        norm = model_norm(model)
        rows = folds.valid_rows(k)
        p = predict_views(model, train_images, rows, size, views, norm, tta.batch_size)  # (V, n_k, C)
        oof_plain[rows], oof_tta[rows] = p[0], combine_tta(p[0], p[1:], tta.combine, tta.beta)
        p = predict_views(model, test_images, np.arange(len(test.ids)), size, views, norm, tta.batch_size)
        test_folds.append(combine_tta(p[0], p[1:], tta.combine, tta.beta) if len(test.ids) else np.zeros((0, c)))
        write_table(paths.test_fold(spec.name, k),
                    _checked_test(PredictionTable(test.ids, test_folds[-1], folds.classes, None, {**meta, "fold": k}),
                                  test.ids))
        log(f"  {spec.name} fold {k}: {len(rows)} OOF rows, {len(test.ids)} test rows")
    oof = validate_oof(PredictionTable(folds.ids, oof_tta, folds.classes, folds.fold, meta), folds)
    write_table(paths.oof(spec.name), oof)
    mean = np.mean(test_folds, axis=0) if len(test.ids) else np.zeros((0, c))
    write_table(paths.test(spec.name), _checked_test(PredictionTable(test.ids, mean, folds.classes, None, meta),
                                                     test.ids))
    y = folds.y
    result = {"accuracy": accuracy(oof_tta, y), "log_loss": log_loss(oof_tta, y),
              "accuracy_no_tta": accuracy(oof_plain, y), "log_loss_no_tta": log_loss(oof_plain, y),
              "seconds": time.perf_counter() - t0}
    write_json(paths.preds_dir(spec.name) / "metrics.json", result)
    log(f"predict-oof: {spec.name}  OOF accuracy {result['accuracy_no_tta']:.4f} -> {result['accuracy']:.4f} "
        f"with TTA, log-loss {result['log_loss_no_tta']:.4f} -> {result['log_loss']:.4f}")
    return result


def _checked_test(table: PredictionTable, ids) -> PredictionTable:
    table.proba = table.proba.reshape(len(ids), len(table.classes))
    return validate_test(table, ids, table.classes)
