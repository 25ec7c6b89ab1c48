"""Training one (model, fold) job on cached images: fastai's recipe with timm's pieces.

The job trains on every fold but its own and writes only its own files under
`<run>/models/<model>/`:

    fold<k>.safetensors       final weights (the last epoch unless keep: best)
    fold<k>.history.csv       the epochs as a table (epoch, phase, size, lr, losses, error rate, seconds),
                              rewritten after every epoch: `tail -f`-able progress, timm's summary.csv
    fold<k>.history.json      per-epoch phase, size, train/valid loss, error rate, lr, seconds, non-finite
                              batches, fp16's skipped steps and loss scale; the recipe, the folds', the
                              training rows' (`job_state.rows_digest`) and the train cache's sha256 it was
                              trained on, the weights' sha256, the precision and the device
    fold<k>.checkpoint.pt     end-of-epoch state for resume; removed when the job finishes

The full fit (fold None, `train-base --full`) is the same job on every row of the folds with none held
out: the same recipe, schedule, sampling, mixup, row weights, extra targets and precision, its seed
that of a fold k (no fold has that index), no validation (its epochs record the train loss alone,
and it keeps the last one), its files `full.*` (`RunPaths.job_stem`).

A finished job is current only while all of these still hold (`job_state.stale_reason`, torch-free):
weights trained on another fold assignment would predict rows they saw, so
neither train-base nor predict-oof ever trusts a file's existence or its time.

The schedule is a list of segments, each one AdamW + one-cycle: a frozen
segment training the new heads alone when fine-tuning pretrained weights, then
one segment per progressive-resizing phase. The model carries over between
segments; nothing is reinitialised.

`train_fold` is three steps over one `TrainState` (model, EMA copy, the current
segment's optimizer and one-cycle, generator, history, best epoch, clock):
`_setup` builds it, `_restore` puts an interrupted job back at its last finished
epoch, and `_train_segment` runs each remaining segment's epochs
(`_train_epoch`, `_evaluate`, `_save_checkpoint`).

Precision follows `train.amp` (`predict.choose_amp`): bf16 autocast, or fp16 with a
GradScaler that skips overflowing steps (counted per epoch as `skipped_steps`). An epoch whose weights or losses are not
finite fails the job (`_check_finite`) before it reaches a checkpoint or the weights
file: NaN weights are never saved, and a later epoch is never silently replaced by
an earlier one.

On CUDA a step never waits on the host: the epoch's row order is copied to the device once,
augmentation draws go through pinned memory without blocking, the labels are gathered there
by the same index, and the fused AdamW takes fp16's skip decision on the device. Setting
`STACKER_SYNC_DEBUG=error` (a value of `torch.cuda.set_sync_debug_mode`) runs every epoch's steps
under that mode, so a synchronisation raises (`bench/gpu_check.sh` uses it). cuDNN autotunes its
kernels per shape (`cudnn.benchmark`: training has one shape per phase), so a resumed CUDA job
continues from the same state but is not promised bit for bit; on CPU it is.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from safetensors.torch import load_model, save_model
from timm.data import Mixup
from timm.utils import ModelEmaV3

from oof import Folds, RunPaths, StackerError, accuracy, atomic_path, bar, file_digest, info, log_loss, write_json

from .augment import PLAIN, norm_tensors, normalize, train_batch
from .batches import ImageSource, to_device
from .config import ModelSpec, SamplingConfig, TrainConfig
from .engines import job_label
# A job's record, read without torch (`stacker jobs`); the names stay importable from here.
from .job_state import (Sources, changed_keys, full_keep_refusal, is_trained, job_rows, job_sources,  # noqa: F401
                        read_history, recipe, stale_reason, weights_digest)
from .models import backbone_parameters, create_model, head_parameters, logits_list, model_norm
from .predict import ViewPlan, autocast, compile_note, device_name, predict_views, resolve_amp


@dataclass(frozen=True)
class Target:
    """A label the model learns: the main target first, then the extra ones.

    Attributes:
        name: None for the main target, else the CSV column.
        classes: class names in output order.
        y: (N,) class index of each train row, in folds order.
    """

    name: str | None
    classes: tuple[str, ...]
    y: np.ndarray


@dataclass(frozen=True)
class Segment:
    """One one-cycle of the schedule."""

    size: tuple[int, int]
    epochs: int
    lr: float
    frozen: bool
    pct_start: float
    phase: int  # progressive-resizing phase (the frozen segment counts as phase 0's)


def segments(cfg: TrainConfig, fine_tune: bool) -> list[Segment]:
    """The schedule: [frozen heads-only segment] + one segment per phase."""
    phases = cfg.schedule
    out = []
    if fine_tune and cfg.freeze_epochs:
        # fastai's fine_tune: the frozen epochs warm up over almost all their steps
        out.append(Segment(phases[0].size, cfg.freeze_epochs, cfg.lr, True, 0.99, 0))
    out += [Segment(p.size, p.epochs, cfg.lr * p.lr_factor, False, cfg.pct_start, i) for i, p in enumerate(phases)]
    return out


def build_model(spec: ModelSpec, targets: list[Target], pretrained: bool = True) -> torch.nn.Module:
    return create_model(spec.arch, len(targets[0].classes), spec.pretrained if pretrained else None,
                        [len(t.classes) for t in targets[1:]], spec.model_kwargs)


@dataclass(frozen=True)
class TrainInputs:
    """What every (model, fold) job of a run trains from.

    Attributes:
        paths: the run directory (the job writes only its own files under `models/<model>/`).
        folds: the job's repeat's folds.
        targets: main target first, then extra targets; rows in folds order.
        images: the train cache, placed for the device to train on, read in folds order
            (`ImageSource.select`: the cache holds every dataset row, the folds those `data.exclude` left).
        cache_sha256: the train cache's digest, recorded with the weights ("" outside a run's
            job grid, e.g. a benchmark: such weights are never current in a run).
    """

    paths: RunPaths
    folds: Folds
    targets: list[Target]
    images: ImageSource
    cache_sha256: str = ""

    @property
    def sources(self) -> Sources:
        """The folds and the train cache, without a job's training rows (`job_sources` adds them)."""
        return Sources(self.folds.sha256, self.cache_sha256)

    def job_sources(self, spec: ModelSpec, fold: int | None) -> Sources:
        """What job (`spec`, `fold`; None: the full fit) is made from: the folds, its own training rows and the
        train cache."""
        return job_sources(self.folds, fold, spec, self.cache_sha256)


@dataclass(eq=False)
class TrainState:
    """One (model, fold) job while it trains: what its epochs read and what they move on.

    `_setup` builds it, `_restore` puts it back at an interrupted job's last finished
    epoch, `_start_segment` gives it each segment's optimizer, and every epoch advances
    it (timm's `train_one_epoch(epoch, model, loader, optimizer, ...)`, as one object).
    """

    spec: ModelSpec
    fold: int | None  # None: the full fit, every row trained on, none validated
    inputs: TrainInputs
    model: torch.nn.Module
    forward: torch.nn.Module  # what the steps call: the model, or its torch.compile wrapper
    amp: str  # the precision `resolve_amp` chose: bf16, fp16 or off
    scaler: torch.amp.GradScaler | None  # fp16's loss scaler; None for bf16 and off
    ema: ModelEmaV3 | None
    mixup: Mixup | None
    norm: tuple  # (mean, std) of the model, (1, 3, 1, 1) tensors on the device
    ys: list[torch.Tensor]  # per target: (N,) class index of every train row, on the device
    loss_weights: list[float]  # per target: 1 for the main one, train.target_weights for the extra ones
    train_rows: np.ndarray  # (n,) rows of the folds this job trains on
    sources: Sources  # what its weights are made from: folds, its training rows, the train cache
    sample_w: np.ndarray | None  # (n,) sampling weight per training row; None: uniform epochs
    generator: torch.Generator  # epoch orders and augmentation draws
    schedule: list[Segment]
    steps: int = 0  # optimizer steps per epoch
    segment: int = 0  # index into `schedule` of the segment being trained
    optimizer: torch.optim.Optimizer | None = None
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    history: list[dict] = field(default_factory=list)
    best: dict | None = None  # keep: best -> {"epoch", "value", "state"} of the best epoch so far
    # Seconds of this process's share of the job: the steps themselves are "train";
    # the rest (setup, evaluation, checkpoints, saving) is the job's overhead.
    clock: dict = field(default_factory=lambda: {"setup": 0.0, "train": 0.0, "evaluate": 0.0, "checkpoint": 0.0})

    @property
    def cfg(self) -> TrainConfig:
        return self.spec.train

    @property
    def device(self) -> torch.device:
        return self.inputs.images.device

    @property
    def kept(self) -> torch.nn.Module:
        """The weights evaluated and saved: the EMA copy when there is one."""
        return self.ema.module if self.ema else self.model

    @property
    def total_epochs(self) -> int:
        return sum(seg.epochs for seg in self.schedule)

    @property
    def checkpoint_path(self) -> Path:
        return self.inputs.paths.checkpoint(self.spec.name, self.fold)


def train_fold(spec: ModelSpec, fold: int | None, inputs: TrainInputs, row_weights: np.ndarray | None = None,
               log=info) -> list[dict]:
    """Train `spec` on every fold but `fold`, validate on `fold`, save the kept weights; with fold None (the
    full fit) train on every row, validate on none, save the last epoch's weights.

    Args:
        spec: the model and its training config.
        fold: held-out fold; None for the full fit.
        inputs: the run's folds, targets and placed train images.
        row_weights: (N,) sampling weight column, when `sampling.weights` names one.

    Returns:
        The per-epoch history.

    Raises:
        StackerError: a full fit of a model with `train.keep: best` (`full_keep_refusal`).
    """
    if fold is None and spec.train.keep == "best":
        raise StackerError(full_keep_refusal(spec.name))
    start = time.perf_counter()
    state = _setup(spec, fold, inputs, row_weights, log)
    checkpoint = _load_checkpoint(state.checkpoint_path, spec, state.sources)
    _restore(state, checkpoint)
    state.steps = _steps_per_epoch(state)
    state.clock["setup"] = time.perf_counter() - start
    first = 0  # epochs before the segment, over the whole schedule
    for s, seg in enumerate(state.schedule):
        last = first + seg.epochs
        if len(state.history) < last:  # a resumed job skips the segments it finished
            _start_segment(state, s, seg, checkpoint)
            _train_segment(state, seg, last, log)
        first = last
    _save_result(state)
    return state.history


def _setup(spec: ModelSpec, fold: int | None, inputs: TrainInputs, row_weights: np.ndarray | None,
           log) -> TrainState:
    """Seed the job, build its model (compiled forward, EMA copy), its targets on the device and its sampling."""
    cfg, device, targets = spec.train, inputs.images.device, inputs.targets
    index = inputs.folds.k if fold is None else fold  # the full fit seeds as a fold k would: no fold has index k
    torch.manual_seed(cfg.seed + index)
    np.random.seed(cfg.seed + index)  # timm's Mixup draws from numpy's global generator
    model = build_model(spec, targets).to(device)  # the fresh heads' init draws from the seed above
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True  # one input shape per phase: autotuned once, then reused
    forward = _compiled(model, cfg, device, log)
    amp = resolve_amp(cfg.amp, device, job_label(spec.name, fold, inputs.paths.repeat))
    ema = ModelEmaV3(model, decay=cfg.ema_decay) if cfg.ema_decay else None
    train_rows = job_rows(inputs.folds, fold)
    column = None if row_weights is None else row_weights[train_rows]
    return TrainState(
        spec=spec, fold=fold, inputs=inputs, model=model, forward=forward, amp=amp,
        scaler=torch.amp.GradScaler(device.type) if amp == "fp16" else None, ema=ema, mixup=_mixup(cfg, targets),
        norm=norm_tensors(model_norm(model), device), ys=[torch.as_tensor(t.y, device=device) for t in targets],
        loss_weights=[1.0] + [cfg.target_weights.get(t.name, 1.0) for t in targets[1:]],
        train_rows=train_rows, sources=inputs.job_sources(spec, fold),
        sample_w=sampling_weights(cfg.sampling, targets[0].y[train_rows], column),
        generator=torch.Generator().manual_seed(cfg.seed * 1000 + index),
        schedule=segments(cfg, spec.pretrained is not None))


def _steps_per_epoch(state: TrainState) -> int:
    """Optimizer steps in one epoch: whole batches of batch_size * accum_steps rows."""
    cfg, n = state.cfg, len(state.train_rows)
    steps = n // (cfg.batch_size * cfg.accum_steps)
    if steps < 1:
        raise StackerError(f"{_job(state)}: {n} training rows are fewer than "
                           f"batch_size*accum_steps={cfg.batch_size * cfg.accum_steps}; lower the batch size")
    return steps


def _start_segment(state: TrainState, index: int, seg: Segment, checkpoint: dict | None) -> None:
    """Give the state segment `index`'s optimizer and one-cycle; at the checkpoint's step if it stopped there."""
    fine_tune = state.spec.pretrained is not None
    state.segment = index
    # Fused on CUDA (one kernel per step), and wherever fp16's GradScaler runs: a fused AdamW takes the
    # scaler's skip decision on the device, a non-fused one reads found_inf on the host every step.
    fused = state.device.type == "cuda" or state.scaler is not None
    state.optimizer, state.scheduler = _segment_optimizer(state.model, state.cfg, seg, fine_tune, state.steps, fused)
    if checkpoint is not None and checkpoint["segment"] == index:
        state.optimizer.load_state_dict(checkpoint["optimizer"])
        state.scheduler.load_state_dict(checkpoint["scheduler"])


def _train_segment(state: TrainState, seg: Segment, last: int, log) -> None:
    """Train, evaluate and checkpoint each remaining epoch of `seg`, up to epoch `last` of the schedule."""
    for epoch in range(len(state.history), last):
        t0 = time.perf_counter()
        order = state.train_rows[epoch_order(len(state.train_rows), state.sample_w, state.generator)]
        loss, seen, nonfinite, skipped = _train_epoch(state, order, seg.size)
        t1 = time.perf_counter()
        record = _evaluate(state, seg, epoch, loss, seen, t0)
        t2 = time.perf_counter()
        record.update(train_seconds=t1 - t0, images_per_second=len(order) / max(t1 - t0, 1e-9),
                      nonfinite_batches=nonfinite, skipped_steps=skipped,
                      loss_scale=state.scaler.get_scale() if state.scaler else None)
        _check_finite(state, record)  # before the epoch reaches the history, a checkpoint or the weights
        state.history.append(record)
        _track_best(state, record)
        if len(state.history) < state.total_epochs:  # the last epoch's state is the result, saved next
            _save_checkpoint(state)
        state.clock["train"] += t1 - t0
        state.clock["evaluate"] += t2 - t1
        state.clock["checkpoint"] += time.perf_counter() - t2
        log(_progress_line(_job(state), state.total_epochs, record))


def _compiled(model, cfg: TrainConfig, device, log):
    if not cfg.compile:
        return model
    note = compile_note(device)
    if note:
        log(f"  note: {note}")
        return model
    return torch.compile(model)


def _mixup(cfg: TrainConfig, targets: list[Target]) -> Mixup | None:
    if not (cfg.mixup_alpha or cfg.cutmix_alpha):
        return None
    if len(targets) > 1:
        raise StackerError("train.mixup_alpha/cutmix_alpha: not supported with extra targets "
                           "(the extra labels would need the same mixing)")
    return Mixup(mixup_alpha=cfg.mixup_alpha, cutmix_alpha=cfg.cutmix_alpha,
                 label_smoothing=cfg.label_smoothing, num_classes=len(targets[0].classes))


def sampling_weights(cfg: SamplingConfig, y_train: np.ndarray, column: np.ndarray | None) -> np.ndarray | None:
    """Per training row sampling weight; None for uniform epochs (each row once).

    class_balanced: a row weighs (its class count in the training rows) ** -power.
    """
    if cfg.weights == "uniform":
        return None
    if cfg.weights == "class_balanced":
        counts = np.bincount(y_train)
        return counts[y_train].astype(np.float64) ** -cfg.power
    return np.asarray(column, dtype=np.float64)


def epoch_order(n: int, weights: np.ndarray | None, generator: torch.Generator) -> np.ndarray:
    """Indices into the training rows for one epoch of n draws.

    Uniform: a permutation. Weighted: n draws with replacement, as fastai's WeightedDL.
    """
    if weights is None:
        return torch.randperm(n, generator=generator).numpy()
    w = torch.as_tensor(weights, dtype=torch.float64)
    return torch.multinomial(w, n, replacement=True, generator=generator).numpy()


def one_cycle(optimizer, max_lr, total_steps: int, pct_start: float, div: float, div_final: float):
    """fastai's fit_one_cycle: cosine warm-up to max_lr over pct_start, cosine decay after.

    Momentum (AdamW's beta1) cycles 0.95 -> 0.85 -> 0.95, as in fastai. Each phase
    needs at least one step (torch divides by its length), so on a tiny schedule the
    warm-up is clamped to [2, total - 1] steps.
    """
    if total_steps < 3:
        raise StackerError(f"a one-cycle schedule of {total_steps} steps is too short: train more epochs "
                           "or lower the batch size")
    pct_start = min(max(pct_start, 2 / total_steps), (total_steps - 1) / total_steps)
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=max_lr, total_steps=total_steps, pct_start=pct_start, anneal_strategy="cos",
        div_factor=div, final_div_factor=div_final, base_momentum=0.85, max_momentum=0.95)


def _segment_optimizer(model, cfg: TrainConfig, seg: Segment, fine_tune: bool, steps: int, fused: bool = False):
    """AdamW over what the segment trains, with its one-cycle; frozen weights get no gradient."""
    head, body = head_parameters(model), backbone_parameters(model)
    for p in body:
        p.requires_grad_(not seg.frozen)
    if seg.frozen:
        groups, peaks = [{"params": head}], [seg.lr]
    else:
        body_lr = seg.lr / cfg.lr_mult if fine_tune else seg.lr
        groups, peaks = [{"params": body}, {"params": head}], [body_lr, seg.lr]
    optimizer = torch.optim.AdamW(groups, lr=seg.lr, weight_decay=cfg.weight_decay, fused=fused or None)
    return optimizer, one_cycle(optimizer, peaks, steps * seg.epochs, seg.pct_start, cfg.div, cfg.div_final)


def _train_epoch(state: TrainState, order: np.ndarray, size: tuple[int, int]) -> tuple[float, tuple, int, int]:
    """One epoch over `order` (rows of the folds) at `size`.

    Returns:
        The mean train loss of the batches whose loss was finite (NaN when none was), the (h, w) fed,
        how many batches had a non-finite loss, and how many optimizer steps fp16's GradScaler skipped
        for overflowing gradients (its scale dropped; 0 without fp16).
    """
    cfg, device = state.cfg, state.device
    state.forward.train()
    micro = state.steps * cfg.accum_steps
    # Counted on the device: read once, after the epoch's last step.
    tally = {"loss": torch.zeros((), device=device), "nonfinite": torch.zeros((), dtype=torch.int64, device=device),
             "skipped": torch.zeros((), dtype=torch.int64, device=device)}
    rows = to_device(torch.from_numpy(np.ascontiguousarray(order, dtype=np.int64)), device)  # (n,) once per epoch
    seen = None
    # The last partial batch is dropped (as fastai does when shuffling): every step
    # has the same shape (a compiled model never recompiles), and BatchNorm never
    # sees a batch of one.
    batches = bar(state.inputs.images.batches(order, cfg.batch_size, micro), total=micro, unit="batch",
                  desc=f"{_job(state)} epoch {len(state.history) + 1}/{state.total_epochs}")
    with sync_debug(device):
        for i, (batch, _) in enumerate(batches):
            idx = rows[i * cfg.batch_size:(i + 1) * cfg.batch_size]  # (B,) the batch's rows, on the device
            x = normalize(train_batch(batch, size, cfg.augment, state.generator), *state.norm)  # (B, 3, h, w)
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            seen = tuple(x.shape[-2:])
            with autocast(device, state.amp):
                loss = _loss(state, x, [y[idx] for y in state.ys])
            scaled = loss / cfg.accum_steps
            (state.scaler.scale(scaled) if state.scaler else scaled).backward()
            if (i + 1) % cfg.accum_steps == 0:
                tally["skipped"] += _optimizer_step(state)
            finite = torch.isfinite(loss.detach())
            tally["loss"] += torch.where(finite, loss.detach(), 0.0)
            tally["nonfinite"] += (~finite).long()
    bad, skipped = int(tally["nonfinite"]), int(tally["skipped"])
    return (float(tally["loss"]) / (micro - bad) if bad < micro else float("nan")), seen, bad, skipped


SYNC_DEBUG_ENV = "STACKER_SYNC_DEBUG"


@contextlib.contextmanager
def sync_debug(device: torch.device):
    """Run the enclosed steps under `torch.cuda.set_sync_debug_mode($STACKER_SYNC_DEBUG)` on CUDA
    ("warn" or "error" flag every synchronisation with the host); nothing when unset or off CUDA."""
    mode = os.environ.get(SYNC_DEBUG_ENV)
    if not mode or device.type != "cuda":
        yield
        return
    before = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(before)


def _optimizer_step(state: TrainState) -> torch.Tensor | int:
    """One step of the accumulated gradients: clip, AdamW, one-cycle, EMA.

    With fp16 the gradients are unscaled before clipping (the norm is of the true gradients), and
    the scaler skips the step when they overflowed, then halves its scale (timm's NativeScaler);
    the one-cycle and the EMA move on either way, so the schedule keeps its length.

    Returns:
        1 on the device when fp16's scaler skipped this step (its scale dropped in `update`), else 0.
    """
    scaler = state.scaler
    if scaler is not None:
        scaler.unscale_(state.optimizer)
    if state.cfg.clip_grad:
        torch.nn.utils.clip_grad_norm_(state.forward.parameters(), state.cfg.clip_grad)
    skipped = 0
    if scaler is not None:
        scale = scaler._get_scale_async().clone()  # the scale this step ran at, read without a sync
        scaler.step(state.optimizer)
        scaler.update()
        skipped = (scaler._get_scale_async() < scale).long()  # update() lowers it only after a skipped step
    else:
        state.optimizer.step()
    state.optimizer.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        if scaler is not None:  # torch warns when a skipped step comes first; the schedule moving on is meant
            warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)`", UserWarning)
        state.scheduler.step()
    if state.ema is not None:
        state.ema.update(state.forward)
    return skipped


def _loss(state: TrainState, x: torch.Tensor, ys: list[torch.Tensor]) -> torch.Tensor:
    """Loss of one batch x (B, 3, h, w) with labels ys (per target (B,)): soft targets under mixup,
    else the weighted sum of each target's cross-entropy."""
    if state.mixup is not None:
        x, soft = state.mixup(x, ys[0])  # soft targets (B, C), label smoothing included
        logits = logits_list(state.forward, x)[0].float()
        return -(soft * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    logits = logits_list(state.forward, x)
    return sum(w * F.cross_entropy(z.float(), y, label_smoothing=state.cfg.label_smoothing)
               for w, z, y in zip(state.loss_weights, logits, ys))


def _evaluate(state: TrainState, seg: Segment, epoch: int, train_loss: float, seen: tuple, t0: float) -> dict:
    """The epoch's history record: the kept weights on the held-out fold, plain view at the segment's size;
    the full fit holds no fold out, and its record has no validation keys."""
    record = {"epoch": epoch + 1, "phase": seg.phase, "frozen": seg.frozen, "size": list(seen),
              "train_loss": train_loss}
    if state.fold is not None:
        valid_rows = state.inputs.folds.valid_rows(state.fold)
        plan = ViewPlan(seg.size, [PLAIN], state.norm, state.cfg.batch_size, amp=state.amp)
        proba = predict_views(state.kept, state.inputs.images, valid_rows, plan)[0][0]  # (n_valid, C)
        y_valid = state.inputs.folds.y[valid_rows]
        record.update(valid_loss=log_loss(y_valid, proba), error_rate=1.0 - accuracy(y_valid, proba))
    return {**record, "lr": state.scheduler.get_last_lr()[-1], "seconds": time.perf_counter() - t0}


def _track_best(state: TrainState, record: dict) -> None:
    """With keep: best, hold a CPU copy of the kept weights whenever the epoch beats the best so far."""
    if state.cfg.keep != "best":
        return
    value = record[state.cfg.keep_metric]
    value = float("inf") if np.isnan(value) else value  # a diverged epoch is never the best
    if state.best is None or value < state.best["value"]:
        weights = {k: v.detach().cpu().clone() for k, v in state.kept.state_dict().items()}
        state.best = {"epoch": record["epoch"], "value": value, "state": weights}


def _check_finite(state: TrainState, record: dict) -> None:
    """Never keep a diverged epoch: fail the job before the epoch's weights reach a checkpoint or the result.

    Diverged: no batch had a finite loss, the validation loss is not finite, or a weight (or a
    BatchNorm statistic) of the model or its EMA copy is not. fp16 steps the scaler skipped do not
    count: their weights were left as they were. The previous epoch's checkpoint stays.
    """
    bad = [key for key in ("train_loss", "valid_loss") if key in record and not math.isfinite(record[key])]
    modules = [state.model] + ([state.ema.module] if state.ema is not None else [])
    if not all(_finite_state(m) for m in modules):
        bad.append("weights")
    if bad:
        raise StackerError(f"{_job(state)} epoch {record['epoch']}: training diverged "
                           f"(non-finite {', '.join(bad)}, amp {state.amp}); nothing of this epoch is kept. Lower "
                           "train.lr, set train.clip_grad or change train.amp, then run train-base --force")


def _finite_state(module: torch.nn.Module) -> bool:
    """Whether every floating tensor of the module's state is finite (one device sync)."""
    tensors = [t for t in module.state_dict().values() if t.is_floating_point()]
    return bool(torch.stack([t.isfinite().all() for t in tensors]).all()) if tensors else True


def _job(state: TrainState) -> str:
    """"resnet26d fold 3" (or "resnet26d repeat 1 fold 3", "resnet26d full fit"), as the engines name the job."""
    return job_label(state.spec.name, state.fold, state.inputs.paths.repeat)


def _progress_line(job: str, total: int, h: dict) -> str:
    tag = " frozen" if h["frozen"] else ""
    valid = f"valid_loss {h['valid_loss']:.4f}  error_rate {h['error_rate']:.4f}  " if "valid_loss" in h else ""
    return (f"  {job} epoch {h['epoch']:>2}/{total}  {h['size'][0]}x{h['size'][1]}{tag}  "
            f"train_loss {h['train_loss']:.4f}  {valid}{h['seconds']:.1f}s")


def _save_checkpoint(state: TrainState) -> None:
    """End-of-epoch state, enough to resume where it stopped (bit for bit on CPU): weights, optimizer,
    schedule, fp16's loss scale, every RNG."""
    sources = state.sources
    checkpoint = {"recipe": recipe(state.spec), "folds_sha256": sources.folds_sha256,
                  "rows_sha256": sources.rows_sha256, "cache_sha256": sources.cache_sha256,
                  "segment": state.segment, "model": state.model.state_dict(),
                  "optimizer": state.optimizer.state_dict(), "scheduler": state.scheduler.state_dict(),
                  **_rng_states(state.generator, state.device), "history": state.history,
                  "ema": state.ema.module.state_dict() if state.ema else None, "best": state.best,
                  "scaler": state.scaler.state_dict() if state.scaler else None}
    with atomic_path(state.checkpoint_path) as tmp:
        torch.save(checkpoint, tmp)
    write_history_csv(state.inputs.paths.history_csv(state.spec.name, state.fold), state.history)


def write_history_csv(path: Path, epochs: list[dict]) -> None:
    """The epochs as a CSV table, one row per epoch, the size as HxW."""
    table = pd.DataFrame([{**e, "size": "x".join(map(str, e["size"]))} for e in epochs])
    first = [c for c in ("epoch", "phase", "frozen", "size", "lr", "train_loss", "valid_loss", "error_rate",
                         "seconds") if c in table.columns]
    with atomic_path(path) as tmp:
        table[first + [c for c in table.columns if c not in first]].to_csv(tmp, index=False)


def _load_checkpoint(path: Path, spec: ModelSpec, sources: Sources) -> dict | None:
    """An interrupted job's state, when it was started from the same recipe, training rows (or, for a
    checkpoint without their digest, the same folds) and train images."""
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    changed = changed_keys(state.get("recipe", {}), recipe(spec))
    if changed:
        raise StackerError(f"{path}: an interrupted job of other settings ({', '.join(changed)}); restore the "
                           "config to resume it, or pass --force to start it again")
    reason = sources.reason(state)
    if reason:
        raise StackerError(f"{path}: an interrupted job was {reason}; pass --force to start it again")
    return state


def _restore(state: TrainState, checkpoint: dict | None) -> None:
    """Put an interrupted job back at its last finished epoch; a fresh job (no checkpoint) is left as it is."""
    if checkpoint is None:
        return
    state.model.load_state_dict(checkpoint["model"])
    if state.ema is not None and checkpoint["ema"] is not None:
        state.ema.module.load_state_dict(checkpoint["ema"])
    if state.scaler is not None and checkpoint.get("scaler"):  # fp16: the loss scale it had reached
        state.scaler.load_state_dict(checkpoint["scaler"])
    _set_rng_states(checkpoint, state.generator, state.device)
    state.history, state.best = list(checkpoint["history"]), checkpoint["best"]


def _rng_states(generator: torch.Generator, device: torch.device) -> dict:
    """Every generator a job draws from, as tensors and numbers `torch.load(weights_only=True)` accepts.

    Of the CUDA generators only the job's own device's: a job resumed where fewer GPUs are visible (an
    engine worker pinned to one) finds the state it needs and no others.
    """
    _, keys, pos, has_gauss, cached = np.random.get_state()  # timm's Mixup draws from it
    own = device_index(device)
    return {"generator": generator.get_state(), "cpu_rng": torch.get_rng_state(),
            "cuda_rng": [] if own is None else [torch.cuda.get_rng_state(own)], "cuda_rng_device": own,
            "numpy_rng": [torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]}


def device_index(device: torch.device) -> int | None:
    """The CUDA device a job runs on (a bare "cuda" is the current one); None off CUDA."""
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


def own_cuda_state(saved: dict, own: int | None) -> torch.Tensor | None:
    """The saved CUDA generator state of device `own`, from a checkpoint's `cuda_rng`.

    A checkpoint holds its job's device's state alone (`cuda_rng_device` set); one that holds every
    visible device's (`cuda_rng_device` absent) gives entry `own`. None: nothing to restore (off CUDA,
    saved off CUDA, or saved where device `own` did not exist).
    """
    states = saved.get("cuda_rng") or []
    if own is None or not states:
        return None
    if "cuda_rng_device" in saved:
        return states[0]
    return states[own] if own < len(states) else None


def _set_rng_states(saved: dict, generator: torch.Generator, device: torch.device) -> None:
    """Undo `_rng_states`: the job's generator, torch's CPU generator and its device's CUDA one, numpy's global one."""
    generator.set_state(saved["generator"])
    torch.set_rng_state(saved["cpu_rng"])
    own = device_index(device)
    state = own_cuda_state(saved, own)
    if state is not None:
        torch.cuda.set_rng_state(state, own)
    keys, pos, has_gauss, cached = saved["numpy_rng"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, cached))


def _save_result(state: TrainState) -> None:
    """Write the kept weights, then the history (its presence marks the job finished); drop the checkpoint.

    The history records what the weights were made from (recipe, folds, training rows, train cache)
    and the weights' own sha256, so every later stage can tell them current or stale.
    """
    t0 = time.perf_counter()
    paths, spec, fold, model = state.inputs.paths, state.spec, state.fold, state.kept
    kept = state.history[-1]["epoch"]
    if state.best is not None:
        model.load_state_dict(state.best["state"])
        kept = state.best["epoch"]
    with atomic_path(paths.weights(spec.name, fold)) as tmp:
        save_model(model, str(tmp))
        weights_sha256 = file_digest(tmp)
    state.clock["save"] = time.perf_counter() - t0
    sources = state.sources
    record = {"model": spec.name, "arch": spec.arch, "fold": fold, "pretrained": spec.pretrained,
              "model_kwargs": spec.model_kwargs, "train": asdict(spec.train), "folds_sha256": sources.folds_sha256,
              "rows_sha256": sources.rows_sha256, "cache_sha256": sources.cache_sha256,
              "weights_sha256": weights_sha256, "kept_epoch": kept, "train_rows": len(state.train_rows),
              "amp": state.amp, "device_name": device_name(state.device), "seconds": state.clock,
              "epochs": state.history}
    write_history_csv(paths.history_csv(spec.name, fold), state.history)
    write_json(paths.history(spec.name, fold), record)  # last: it marks the job finished
    state.checkpoint_path.unlink(missing_ok=True)


def load_fold_model(paths: RunPaths, spec: ModelSpec, fold: int, targets: list[Target], device) -> torch.nn.Module:
    """A trained fold model, weights from safetensors (no pickle, no pretrained file needed)."""
    model = build_model(spec, targets, pretrained=False)
    path = paths.weights(spec.name, fold)
    try:
        load_model(model, str(path))
    except (RuntimeError, OSError, ValueError) as e:  # another arch or timm version, a damaged file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StackerError(f"{path}: does not load into {spec.arch} ({first}); was the model's arch or "
                           "model_kwargs changed, or the weights replaced?") from None
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model.eval()
