"""`stacker predict`, its image half: a new test set through every fold model that a saved stack uses.

The run is only read, and may be read-only and moved (a Kaggle dataset): run.yaml (models,
tta batch size, decode workers), folds.parquet (classes, K), targets.parquet (extra targets'
classes, when there are any), and for each model the stack uses its fold weights and its
run test table, whose metadata says how the stack's inputs were predicted: TTA views (those
the table records; a schema-1 table's n names the frozen `SCHEMA1_VIEWS`, never what `tta_views`
gives now), combine, beta, prediction size, resize mode, and each fold model's weights sha256
(checked against the files before anything is decoded). Neither the training images, nor the run's
cache, nor a model's pretrained file is needed: each fold model is built without pretrained
weights and loads its own safetensors. Nothing is written to the run: no lock, no temporary
file, no cache.

Everything goes to OUT, in a run directory's layout (`RunPaths(OUT)`):

    OUT/cache/test.u8, test.json              the new images, decoded once at the run's cache size
    OUT/preds/<model>/test_fold<k>.parquet    fold model k's TTA probabilities (and per extra target)
    OUT/preds/<model>/test.parquet            their mean over the K fold models, as predict-oof writes it
    OUT/.predict.lock                         held while a call writes OUT

Each table records the run table's metadata in the current schema (`upgraded`: the views it rendered)
with the new cache's digest in place of the run's, and the precision (`train.amp`) resolved on this
device, as predict-oof records it.

Each model predicts on its own `train.device` of run.yaml, at its `train.amp`, as predict-oof did;
`device` (`stacker predict --device`) puts every model on one device instead: a run trained with
`device: cuda` (every model of run.yaml carries its own key) predicts on a CPU-only machine with
--device cpu. A model moved to the CPU that way predicts in float32 (amp off: CPU autocast is slower
and changes the numbers), a model whose amp was an explicit bf16 or fp16 with a note saying so.
A rerun keeps every fold table that records what it would predict now (an interrupted call
resumes at the next fold, from the same decoded cache) and predicts again those made from other
images, weights or settings; --force predicts them all again (the cache is kept: it is rebuilt
only where a file changed). The run's own test images give the run's cache digest and, on the
same device, the very numbers predict-oof wrote.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from filelock import FileLock, Timeout

from oof import (RunPaths, StackerError, file_digest, load_folds, read_json, read_table,
                 remove_temps, validate_test)
from oof.views import Render

from .batches import CacheBudget, ImageSource, place_images
from .cache import CacheOptions, ImageCache, build_cache
from .config import DataConfig, ModelSpec, TTAConfig
from .dataset import NewTestImages, resolve_new_test
from .engines import job_label
from .jobs import StageOptions, cache_size, load_targets
from .models import resolve_device
from .predict import AMP_DTYPES, predict_with_tta, resolve_amp
from .predict_oof import write_test
from .table_schema import fold_table_meta, is_current, recorded_views, upgraded
from .train import Target, load_fold_model

# What a run's test table must record for its model to be predicted again the same way.
RECORDED = ("tta", "resize", "weights_sha256")


@dataclass(frozen=True)
class SavedRun:
    """A finished run as `stacker predict` reads it (never writes it).

    Attributes:
        paths: the run directory, wherever it is now.
        data: its `data:` section (decode workers, extra targets); the data root is never read.
        specs: every model of its run.yaml (together they set the cache size train-base decoded at).
        tta: its `tta:` section (batch size; the views themselves come from the run's tables).
    """

    paths: RunPaths
    data: DataConfig
    specs: list[ModelSpec]
    tta: TTAConfig


@dataclass(frozen=True)
class _UsedModel:
    """A model the stack uses, with its run test table's metadata (how the stack's inputs were predicted)
    and the device and precision it predicts at in this call."""

    spec: ModelSpec
    meta: dict
    device: torch.device
    amp: str
    full: bool = False  # its full fit is rendered too, after its fold models


@dataclass(frozen=True)
class _NewTest:
    """What every model's predictions share in one call."""

    run: SavedRun
    out: RunPaths
    targets: list[Target]
    cache: ImageCache  # the new images, decoded into OUT
    k: int
    options: StageOptions
    repeats: int = 1

    @property
    def slots(self) -> list[tuple[int, int]]:
        """(repeat, fold) of every fold model, in the order the run's tables record their weights."""
        return [(r, f) for r in range(self.repeats) for f in range(self.k)]


def predicted_seconds(paths: RunPaths, models: list[Render], images: int, speed_ratio: float = 1.0
                      ) -> tuple[float | None, str]:
    """What `images` new test images cost through `models`' fold models at their views, from the costs predict-oof
    measured (metrics.json's `cost`: per fold model an overhead and seconds per image per view): (seconds, how it
    was predicted, in words); (None, which models have no recorded cost) when one lacks it (tables from another
    tool, or tables whose metrics.json records no cost)."""
    costs = {r.model: (read_json(paths.predict_metrics(r.model)) if paths.predict_metrics(r.model).is_file() else {})
             .get("cost") for r in models}
    missing = [name for name, cost in costs.items() if not cost]
    if missing:
        return None, f"no recorded prediction cost for {', '.join(missing)} (tables from another tool, or a " \
                     "metrics.json without predict-oof's measured cost)"
    fixed = per_image = 0.0
    for r in models:
        c = costs[r.model]
        n = (c["fold_models"] if r.fold_models is None else r.fold_models) + r.full  # a full fit costs a fold model's
        fixed += n * c["load_seconds"]
        per_image += n * (r.views or c["views"]) * c["image_view_seconds"]
    devices = sorted({c["device"] for c in costs.values()})
    faster = f", / {speed_ratio:g} (stack.predict_speed_ratio)" if speed_ratio != 1 else ""
    return (fixed + images * per_image) / speed_ratio, (f"{fixed:.1f} s fixed + {1000 * per_image:.2f} ms per "
                                                       f"image, as predict-oof measured them on "
                                                       f"{', '.join(devices)}{faster}")


def check_budget(paths: RunPaths, models: list[Render], images: int, budget: float | None, log,
                 speed_ratio: float = 1.0) -> None:
    """Log the predicted time of a call; refuse it in one line when it cannot fit `budget` seconds (or when the
    run records no cost to predict it from and a budget was given). `speed_ratio`: the stack's
    `stack.predict_speed_ratio`, the card this runs on against the one the costs were measured on."""
    seconds, how = predicted_seconds(paths, models, images, speed_ratio)
    if seconds is None:
        if budget is not None:
            raise StackerError(f"--budget {budget:g}: {how}; a budget needs predict-oof's measured costs")
        log(f"predict: predicted time unknown: {how}")
        return
    log(f"predict: predicted {seconds:.1f} s for {images} images through {len(models)} models ({how})")
    if budget is not None and seconds > budget:
        raise StackerError(f"--budget {budget:g}: the stack's {len(models)} models need a predicted {seconds:.1f} s "
                           f"for {images} images ({how}); give a larger budget or a stack of fewer models")


def predict_new_test(run: SavedRun, models: list[str | Render], images: NewTestImages, out: RunPaths,
                     options: StageOptions = StageOptions(), budget: float | None = None) -> None:
    """Decode `images` into `out` and write the test tables of `models` there.

    Args:
        run: the finished run, only read.
        models: what the saved stack renders (`oof.views.renders` of its decision: each model's views and fold
            models, a budget's choice), or model names (every view, every fold model).
        images: the new test set.
        out: the output folder (never the run, nor inside it).
        options: force (predict every table again), log, and device: auto, cpu or cuda for every model
            (--device) in place of each model's train.device; None: each model's own.
        budget: --budget: seconds the call may take, checked against the predicted time (`check_budget`)
            before anything is decoded; None: the predicted time is only logged.

    Raises:
        StackerError: `out` inside the run or holding a run; a device not visible here (a model's
            train.device cuda, or --device cuda, without CUDA); a model run.yaml does not list, whose
            run table records no TTA settings or views this stacker can render (`recorded_views`), or
            whose weights are missing or not those its run tables were predicted with; images that
            cannot be found, matched to the sample submission's ids, or decoded (each named); a call whose
            predicted time exceeds `budget`, or a budget without recorded costs.
    """
    _check_out(run.paths, out)
    device = options.device
    if device is not None:
        _resolve(device, None)  # --device cuda without CUDA: refused before anything is read
    folds = load_folds(run.paths.folds)
    targets = load_targets(run.paths, folds, list(run.data.extra_targets))
    table = resolve_new_test(images)
    models = [m if isinstance(m, Render) else Render(m) for m in models]
    used = [_used_model(run, m, targets[0].classes, folds, device, options.log) for m in models]
    check_budget(run.paths, models, len(table), budget, options.log, options.speed_ratio)
    out.root.mkdir(parents=True, exist_ok=True)
    try:
        held = FileLock(out.predict_lock, timeout=0).acquire()
    except Timeout:
        raise StackerError(f"{out.root}: another stacker predict is writing there; wait for it, or give "
                           "another --out") from None
    with held:
        options.log(f"predict: {len(table)} images of {images.images}, {len(used)} models x "
                    f"{folds.k * folds.repeats} fold models of the run {run.paths.root}")
        cache = build_cache(out, "test", table["id"], table["path"], _cache_options(run, used), options.log)
        job = _NewTest(run, out, targets, cache, folds.k, options, folds.repeats)
        for model in used:
            _predict_model(job, model)


def _check_out(run: RunPaths, out: RunPaths) -> None:
    run_root, out_root = run.root.resolve(), out.root.resolve()
    if out_root == run_root or run_root in out_root.parents:
        raise StackerError(f"--out {out.root}: inside the run {run.root}; stacker predict never writes into "
                           "the run (it may be read-only): give a folder of its own")
    if out.config.is_file() or out.folds.is_file():
        raise StackerError(f"--out {out.root}: holds a training run ({out.config.name}); give stacker predict "
                           "a folder of its own")


def _used_model(run: SavedRun, render: Render, classes, folds, device: str | None = None, log=None) -> _UsedModel:
    """A model of the stack, checked: listed in run.yaml, its run table records how it predicted (views this
    stacker renders), weights present, its device visible here (`device` in place of its own train.device
    when given). Its record is read in the current schema (`upgraded`), cut to the views and fold models
    `render` asks for (`rendered_meta`)."""
    name = render.model
    spec = next((s for s in run.specs if s.name == name), None)
    if spec is None:
        raise StackerError(f"{run.paths.config}: the stack uses model {name!r}, which it does not list (tables "
                           "from another tool?); stacker predict needs fold models trained in the run")
    path = run.paths.test(name)
    meta = read_table(path, classes, "test").meta
    missing = [key for key in RECORDED if key not in meta]
    if missing:
        raise StackerError(f"{path}: records no {', '.join(missing)} (not written by predict-oof); stacker "
                           "predict repeats how the run predicted its test set, so run predict-oof first")
    recorded_views(meta, str(path))
    _check_weights(run.paths, name, meta["weights_sha256"], folds, render.fold_models)
    full = _full_weights(run.paths, name, classes) if render.full else None
    where = _resolve(device or spec.train.device, None if device else spec)
    return _UsedModel(spec, rendered_meta(upgraded(meta), render, str(path), full), where,
                      predict_amp(spec.train.amp, where, device, name, log), render.full)


def _full_weights(paths: RunPaths, name: str, classes) -> str:
    """The sha256 of the model's full fit, checked: its run table records it and the weights file is it."""
    table, weights = paths.test_full(name), paths.weights(name, None)
    if not table.is_file():
        raise StackerError(f"{table}: the stack applies {name}'s full fit (stack.test_models), which the run has no "
                           "test table of; run train-base --full and predict-oof, then fit-stack")
    digest = read_table(table, classes, "test").meta["weights_sha256"][0]
    if not weights.is_file() or file_digest(weights) != digest:
        raise StackerError(f"{weights}: missing, or not the full fit the run's {table.name} was predicted with; "
                           "restore the file, or run predict-oof and fit-stack again")
    return digest


def rendered_meta(meta: dict, render: Render, source: str, full: str | None = None) -> dict:
    """A run table's record cut to what `render` asks for: its first `views` views (tta.n and tta.views: what
    the new tables record and `predict_with_tta` renders) and its first `fold_models` fold models' weights, then
    the full fit's (`full`, its sha256) where it renders that too."""
    views, weights = recorded_views(meta, source), list(meta["weights_sha256"])
    n_views = len(views) + 1 if render.views is None else render.views
    n_folds = len(weights) if render.fold_models is None else render.fold_models
    if not 1 <= n_views <= len(views) + 1 or not (1 if full is None else 0) <= n_folds <= len(weights):
        raise StackerError(f"{source}: the stack renders {render.model} at {n_views} views through {n_folds} fold "
                           f"models, but its run table records {len(views) + 1} views and {len(weights)} fold "
                           "models; run fit-stack again")
    tta = {**meta["tta"], "n": n_views - 1, "views": meta["tta"]["views"][:n_views - 1]}
    return {**meta, "tta": tta, "weights_sha256": weights[:n_folds] + ([] if full is None else [full])}


def _resolve(device: str, spec: ModelSpec | None) -> torch.device:
    """`resolve_device`, its refusal naming where the device came from: --device, or the model's run.yaml."""
    try:
        return resolve_device(device)
    except StackerError:
        if spec is None:
            raise StackerError(f"--device {device}: no CUDA device is visible here; use --device cpu (or "
                               "auto)") from None
        raise StackerError(f"{spec.name}: train.device {device} (the run's run.yaml), but no CUDA device is "
                           "visible here; stacker predict --device cpu predicts on the CPU") from None


def predict_amp(setting: str, device: torch.device, override: str | None, name: str, log=None) -> str:
    """The precision a model predicts at: its `train.amp` resolved on `device` (as predict-oof did), but
    float32 ("off") for a model that --device (`override`) put on the CPU, with a note where its amp was
    an explicit bf16 or fp16."""
    if override is None or device.type != "cpu":
        return resolve_amp(setting, device, name)
    if setting in AMP_DTYPES and log is not None:
        log(f"note: {name}: train.amp {setting} is not used on the CPU (--device {override}): it predicts in "
            "float32")
    return "off"


def _check_weights(paths: RunPaths, name: str, digests: list[str], folds, rendered: int | None = None) -> None:
    """The weights of every fold model the stack renders (the first `rendered`, repeat-major; None: every one)
    are in the run and are those the run's tables (and so the stack) came from; the others need not travel
    with the run."""
    slots = [(r, f) for r in range(folds.repeats) for f in range(folds.k)]
    if len(digests) != len(slots):
        raise StackerError(f"{paths.test(name)}: records {len(digests)} fold models' weights for {len(slots)} "
                           "fold models; run predict-oof and fit-stack again")
    n = len(slots) if rendered is None else rendered
    for (repeat, fold), digest in zip(slots[:n], digests[:n]):
        path = paths.for_repeat(repeat).weights(name, fold)
        if not path.is_file():
            raise StackerError(f"{path}: weights missing from the run; the stack renders {name} through this fold "
                               "model, so its weights must travel with the run")
        if file_digest(path) != digest:
            raise StackerError(f"{path}: not the weights {name}'s run tables were predicted with (the stack "
                               "was fitted on those); restore the file, or run predict-oof and fit-stack again")


def _cache_options(run: SavedRun, used: list[_UsedModel]) -> CacheOptions:
    """Decode as the run decoded its own test set: same size and resize mode, so the same files give the same
    pixels. The run's test cache index gives the size when the run kept it and its tables were predicted
    from it; otherwise the size train-base decodes at for the run's models."""
    meta = used[0].meta  # one cache per run: every model's tables record the same one
    size = cache_size(run.specs)
    index = run.paths.cache_index("test")
    if index.is_file():
        recorded = read_json(index)
        if recorded.get("digest") == (meta.get("cache_sha256") or {}).get("test"):
            size = tuple(recorded["size"])
    return CacheOptions(size, meta["resize"], run.data.decode_workers, run.data.check_all_images)


def _predict_model(job: _NewTest, model: _UsedModel) -> None:
    """Fold tables kept where current, the others predicted, then the mean table over the K fold models."""
    name, log, device = model.spec.name, job.options.log, model.device
    # the run's record, but for the new cache and the precision this device runs at (`predict_amp`)
    meta = {**model.meta, "cache_sha256": {**(model.meta.get("cache_sha256") or {}), "test": job.cache.digest},
            "amp": model.amp}
    slots = _rendered_slots(job, model)
    kept = {} if job.options.force else {s: p for s in slots if (p := _current_fold(job, name, s, meta))}
    if len(kept) == len(slots) and all(_current(job, job.out.test(name, t.name), t, meta) is not None
                                       for t in job.targets):
        log(f"predict: {name} already predicted (--force to redo)")
        return
    log(f"predict: {name}: {len(slots) - len(kept)} of {len(slots)} fold models to run")
    remove_temps(job.out.preds_dir(name))  # a killed call's partial writes (under OUT's lock)
    sums = [np.zeros((len(job.cache.ids), len(t.classes))) for t in job.targets]  # per target (N, C_t)
    images = None
    for slot in slots:
        if slot not in kept:
            if images is None:  # placed under the model's own cache budget, as predict-oof places test
                images = place_images([job.cache.images], device, CacheBudget.of(model.spec.train), log)[0]
            kept[slot] = _predict_fold(job, model, slot, images, fold_table_meta(meta, *slot))
        for t, p in enumerate(kept[slot]):
            sums[t] += p
    for t, target in enumerate(job.targets):
        write_test(job.out.test(name, target.name), sums[t] / len(slots), job.cache.ids, target, meta)


def _rendered_slots(job: _NewTest, model: _UsedModel) -> list[tuple[int, int | None]]:
    """(repeat, fold) of the fold models the stack renders (`rendered_meta`'s weights: the first ones, repeat-major),
    then (0, None) for the full fit where it renders that (its weights last)."""
    folds = len(model.meta["weights_sha256"]) - model.full
    return job.slots[:folds] + ([(0, None)] if model.full else [])


def slot_table(out: RunPaths, name: str, slot: tuple[int, int | None], target: str | None = None):
    """OUT's test table of one rendered slot: fold model (repeat, fold)'s, or the full fit's (fold None)."""
    repeat, fold = slot
    return out.test_full(name, target) if fold is None else out.for_repeat(repeat).test_fold(name, fold, target)


def _current_fold(job: _NewTest, name: str, slot: tuple[int, int | None], meta: dict) -> list[np.ndarray] | None:
    """Fold model (repeat, fold)'s (or the full fit's) probabilities per target from OUT's tables, when every
    one is current; else None."""
    out = [_current(job, slot_table(job.out, name, slot, t.name), t, fold_table_meta(meta, *slot))
           for t in job.targets]
    return None if any(p is None for p in out) else out


def _current(job: _NewTest, path, target: Target, expected: dict) -> np.ndarray | None:
    """A table's (N, C) probabilities when it records `expected` (`is_current`); None: missing, damaged, other."""
    try:
        table = validate_test(read_table(path, target.classes, "test"), job.cache.ids, target.classes)
    except StackerError:
        return None
    return table.proba if is_current(table.meta, expected) else None


def _predict_fold(job: _NewTest, model: _UsedModel, slot: tuple[int, int | None], images: ImageSource, meta: dict):
    """Fold model (repeat, fold) (fold None: the full fit) on every new image with the run's TTA, as predict-oof predicts the run's
    test set.

    Returns:
        Per target (N, C_t) probabilities, also written as that fold model's tables.
    """
    (repeat, fold), spec, ids = slot, model.spec, job.cache.ids
    net = load_fold_model(job.run.paths.for_repeat(repeat), spec, fold, job.targets, images.device)
    probs = [r.combined for r in predict_with_tta(net, images, np.arange(len(ids)), meta, job.run.tta.batch_size,
                                                spec.train.compile)]
    for p, target in zip(probs, job.targets):
        write_test(slot_table(job.out, spec.name, slot, target.name), p, ids, target, meta)
    job.options.log(f"  {job_label(spec.name, fold, repeat)}: {len(ids)} test rows")
    return probs


