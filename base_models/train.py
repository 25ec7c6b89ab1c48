"""Training one (model, fold) job on cached images: fastai's recipe with timm's pieces.

The job trains on every fold but its own and writes only its own files under
`<run>/models/<model>/`:

    fold<k>.safetensors       final weights (the last epoch unless keep: best)
    fold<k>.history.json      per-epoch phase, size, train/valid loss, error rate, lr, seconds
    fold<k>.checkpoint.pt     end-of-epoch state for resume; removed when the job finishes

The schedule is a list of segments, each one AdamW + one-cycle: a frozen
segment training the new heads alone when fine-tuning pretrained weights, then
one segment per progressive-resizing phase. The model carries over between
segments; nothing is reinitialised.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_model, save_model
from timm.data import Mixup
from timm.utils import ModelEmaV3

from oof import Folds, RunPaths, StackerError, atomic_path, read_json, write_json

from .augment import PLAIN, normalize, train_batch
from .batches import ImageSource
from .config import ModelSpec, SamplingConfig, TrainConfig
from .models import backbone_parameters, create_model, head_parameters, logits_list, model_norm
from .predict import accuracy, autocast, log_loss, predict_views


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


# Where and how fast a job runs does not change what it learns.
PLACEMENT_KEYS = ("device", "compile", "gpu_cache_gb")


def recipe(spec: ModelSpec) -> dict:
    """What decides a job's weights, as plain JSON values: a finished job or a checkpoint
    is only reused when the config still asks for the same recipe."""
    train = {k: v for k, v in asdict(spec.train).items() if k not in PLACEMENT_KEYS}
    return json.loads(json.dumps({"arch": spec.arch, "pretrained": spec.pretrained,
                                  "model_kwargs": spec.model_kwargs, "train": train}))


def changed_keys(done: dict, now: dict) -> list[str]:
    """Keys of `recipe` (train keys by name) that differ between two recipes."""
    keys = [k for k in ("arch", "pretrained", "model_kwargs") if done.get(k) != now[k]]
    return keys + sorted(k for k in now["train"] if done.get("train", {}).get(k) != now["train"][k])


def is_trained(paths: RunPaths, model: str, fold: int) -> bool:
    # The history is written after the weights, so its presence marks a finished job.
    return paths.history(model, fold).is_file() and paths.weights(model, fold).is_file()


def build_model(spec: ModelSpec, targets: list[Target], pretrained: bool = True) -> torch.nn.Module:
    return create_model(spec.arch, len(targets[0].classes), spec.pretrained if pretrained else None,
                        [len(t.classes) for t in targets[1:]], spec.model_kwargs)


def train_fold(spec: ModelSpec, fold: int, images: ImageSource, targets: list[Target], folds: Folds,
               paths: RunPaths, row_weights: np.ndarray | None = None, log=print) -> list[dict]:
    """Train `spec` on every fold but `fold`, validate on `fold`, save the kept weights.

    Args:
        spec: the model and its training config.
        fold: held-out fold.
        images: the train cache, placed for the device to train on.
        targets: main target first, then extra targets; rows in folds order.
        folds: the run's folds.
        paths: the run directory.
        row_weights: (N,) sampling weight column, when `sampling.weights` names one.

    Returns:
        The per-epoch history.
    """
    cfg, device = spec.train, images.device
    clock = {"setup": time.perf_counter(), "train": 0.0, "evaluate": 0.0, "checkpoint": 0.0}
    torch.manual_seed(cfg.seed + fold)
    np.random.seed(cfg.seed + fold)  # timm's Mixup draws from numpy's global generator
    model = build_model(spec, targets).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    forward = _compiled(model, cfg, device, log)
    ema = ModelEmaV3(model, decay=cfg.ema_decay) if cfg.ema_decay else None
    loss_weights = [1.0] + [cfg.target_weights.get(t.name, 1.0) for t in targets[1:]]
    job = _Job(spec, fold, images, [torch.as_tensor(t.y, device=device) for t in targets], loss_weights, folds,
               model_norm(model), _mixup(cfg, targets))
    train_rows = folds.train_rows(fold)
    sample_w = sampling_weights(cfg.sampling, targets[0].y[train_rows],
                                None if row_weights is None else row_weights[train_rows])
    generator = torch.Generator().manual_seed(cfg.seed * 1000 + fold)
    state = _load_checkpoint(paths.checkpoint(spec.name, fold), spec)
    history, best = _restore(state, model, ema, generator)
    steps = len(train_rows) // (cfg.batch_size * cfg.accum_steps)
    if steps < 1:
        raise StackerError(f"{spec.name} fold {fold}: {len(train_rows)} training rows are fewer than "
                           f"batch_size*accum_steps={cfg.batch_size * cfg.accum_steps}; lower the batch size")
    schedule = segments(cfg, spec.pretrained is not None)
    total, first = sum(seg.epochs for seg in schedule), 0
    clock["setup"] = time.perf_counter() - clock["setup"]
    for s, seg in enumerate(schedule):
        last = first + seg.epochs
        if len(history) < last:
            optimizer, scheduler = _segment_optimizer(model, cfg, seg, spec.pretrained is not None, steps)
            if state is not None and state["segment"] == s:
                optimizer.load_state_dict(state["optimizer"])
                scheduler.load_state_dict(state["scheduler"])
            for epoch in range(len(history), last):
                t0 = time.perf_counter()
                order = train_rows[epoch_order(len(train_rows), sample_w, generator)]
                loss, seen = _train_epoch(job, forward, ema, order, steps, seg.size, optimizer, scheduler, generator)
                t1 = time.perf_counter()
                record = _evaluate(job, ema.module if ema else model, seg, epoch, loss, seen, scheduler, t0)
                t2 = time.perf_counter()
                record.update(train_seconds=t1 - t0, images_per_second=len(order) / max(t1 - t0, 1e-9))
                history.append(record)
                best = _track_best(best, record, ema.module if ema else model, cfg)
                if len(history) < total:
                    _save_checkpoint(paths.checkpoint(spec.name, fold), spec, s, model, ema, optimizer,
                                     scheduler, generator, history, best)
                clock["train"] += t1 - t0
                clock["evaluate"] += t2 - t1
                clock["checkpoint"] += time.perf_counter() - t2
                log(_progress_line(spec.name, fold, total, record))
        first = last
    _save_result(paths, spec, fold, ema.module if ema else model, history, best, clock)
    return history


@dataclass
class _Job:
    spec: ModelSpec
    fold: int
    images: ImageSource
    ys: list[torch.Tensor]  # (N,) class index per target, on the device
    loss_weights: list[float]
    folds: Folds
    norm: tuple
    mixup: Mixup | None


def _compiled(model, cfg: TrainConfig, device, log):
    if not cfg.compile:
        return model
    if device.type != "cuda":
        log("  note: train.compile is ignored on CPU (torch.compile pays off on CUDA)")
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


def _segment_optimizer(model, cfg: TrainConfig, seg: Segment, fine_tune: bool, steps: int):
    """AdamW over what the segment trains, with its one-cycle; frozen weights get no gradient."""
    head, body = head_parameters(model), backbone_parameters(model)
    for p in body:
        p.requires_grad_(not seg.frozen)
    if seg.frozen:
        groups, peaks = [{"params": head}], [seg.lr]
    else:
        body_lr = seg.lr / cfg.lr_mult if fine_tune else seg.lr
        groups, peaks = [{"params": body}, {"params": head}], [body_lr, seg.lr]
    optimizer = torch.optim.AdamW(groups, lr=seg.lr, weight_decay=cfg.weight_decay)
    return optimizer, one_cycle(optimizer, peaks, steps * seg.epochs, seg.pct_start, cfg.div, cfg.div_final)


def _train_epoch(job: _Job, forward, ema, order, steps, size, optimizer, scheduler, generator):
    """One epoch; returns the mean train loss and the (h, w) the model was fed."""
    cfg, device = job.spec.train, job.images.device
    forward.train()
    total, micro = torch.zeros((), device=device), steps * cfg.accum_steps
    seen = None
    # The last partial batch is dropped (as fastai does when shuffling): every step
    # has the same shape (a compiled model never recompiles), and BatchNorm never
    # sees a batch of one.
    for i, (batch, _) in enumerate(job.images.batches(order, cfg.batch_size, micro)):
        idx = torch.as_tensor(order[i * cfg.batch_size:(i + 1) * cfg.batch_size], device=device)
        x = normalize(train_batch(batch, size, cfg.augment, generator), *job.norm)  # (B, 3, h, w)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        seen = tuple(x.shape[-2:])
        with autocast(device):
            loss = _loss(forward, x, [y[idx] for y in job.ys], job.loss_weights, cfg, job.mixup)
        (loss / cfg.accum_steps).backward()
        if (i + 1) % cfg.accum_steps == 0:
            if cfg.clip_grad:
                torch.nn.utils.clip_grad_norm_(forward.parameters(), cfg.clip_grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            if ema is not None:
                ema.update(forward)
        total += loss.detach()
    return float(total) / micro, seen


def _loss(model, x, ys, weights, cfg: TrainConfig, mixup) -> torch.Tensor:
    if mixup is not None:
        x, soft = mixup(x, ys[0])  # soft targets (B, C), label smoothing included
        logits = logits_list(model, x)[0].float()
        return -(soft * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    logits = logits_list(model, x)
    return sum(w * F.cross_entropy(z.float(), y, label_smoothing=cfg.label_smoothing)
               for w, z, y in zip(weights, logits, ys))


def _evaluate(job: _Job, model, seg: Segment, epoch, train_loss, seen, scheduler, t0) -> dict:
    valid_rows = job.folds.valid_rows(job.fold)
    proba = predict_views(model, job.images, valid_rows, seg.size, [PLAIN], job.norm, job.spec.train.batch_size)[0][0]
    y_valid = job.folds.y[valid_rows]
    return {"epoch": epoch + 1, "phase": seg.phase, "frozen": seg.frozen, "size": list(seen),
            "train_loss": train_loss, "valid_loss": log_loss(proba, y_valid),
            "error_rate": 1.0 - accuracy(proba, y_valid), "lr": scheduler.get_last_lr()[-1],
            "seconds": time.perf_counter() - t0}


def _track_best(best: dict | None, record: dict, model, cfg: TrainConfig) -> dict | None:
    if cfg.keep != "best":
        return None
    value = record[cfg.keep_metric]
    value = float("inf") if np.isnan(value) else value  # a diverged epoch is never the best
    if best is None or value < best["value"]:
        state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        return {"epoch": record["epoch"], "value": value, "state": state}
    return best


def _progress_line(name: str, fold: int, total: int, h: dict) -> str:
    tag = " frozen" if h["frozen"] else ""
    return (f"  {name} fold {fold} epoch {h['epoch']:>2}/{total}  {h['size'][0]}x{h['size'][1]}{tag}  "
            f"train_loss {h['train_loss']:.4f}  valid_loss {h['valid_loss']:.4f}  "
            f"error_rate {h['error_rate']:.4f}  {h['seconds']:.1f}s")


def _save_checkpoint(path: Path, spec: ModelSpec, segment: int, model, ema, optimizer, scheduler, generator, history,
                     best) -> None:
    name, keys, pos, has_gauss, cached = np.random.get_state()  # timm's Mixup draws from it
    state = {"recipe": recipe(spec), "segment": segment, "model": model.state_dict(),
             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "generator": generator.get_state(), "cpu_rng": torch.get_rng_state(),
             "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
             "numpy_rng": [torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
             "history": history, "ema": ema.module.state_dict() if ema else None, "best": best}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _load_checkpoint(path: Path, spec: ModelSpec) -> dict | None:
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    changed = changed_keys(state.get("recipe", {}), recipe(spec))
    if changed:
        raise StackerError(f"{path}: an interrupted job of other settings ({', '.join(changed)}); restore the "
                           "config to resume it, or pass --force to start it again")
    return state


def _restore(state, model, ema, generator) -> tuple[list[dict], dict | None]:
    """Put an interrupted job back at its last finished epoch; ([], None) when there is none."""
    if state is None:
        return [], None
    model.load_state_dict(state["model"])
    if ema is not None and state["ema"] is not None:
        ema.module.load_state_dict(state["ema"])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["cpu_rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    keys, pos, has_gauss, cached = state["numpy_rng"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    return list(state["history"]), state["best"]


def _save_result(paths: RunPaths, spec: ModelSpec, fold: int, model, history, best, clock: dict) -> None:
    t0 = time.perf_counter()
    kept = history[-1]["epoch"]
    if best is not None:
        model.load_state_dict(best["state"])
        kept = best["epoch"]
    with atomic_path(paths.weights(spec.name, fold)) as tmp:
        save_model(model, str(tmp))
    clock["save"] = time.perf_counter() - t0
    # Seconds of this process's share of the job: the steps themselves are "train";
    # the rest (setup, evaluation, checkpoints, saving) is the job's overhead.
    record = {"model": spec.name, "arch": spec.arch, "fold": fold, "pretrained": spec.pretrained,
              "model_kwargs": spec.model_kwargs, "train": asdict(spec.train), "kept_epoch": kept,
              "seconds": clock, "epochs": history}
    write_json(paths.history(spec.name, fold), record)
    paths.checkpoint(spec.name, fold).unlink(missing_ok=True)


def load_fold_model(paths: RunPaths, spec: ModelSpec, fold: int, targets: list[Target], device) -> torch.nn.Module:
    """A trained fold model, weights from safetensors (no pickle, no pretrained file needed)."""
    model = build_model(spec, targets, pretrained=False)
    load_model(model, str(paths.weights(spec.name, fold)))
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model.eval()


def read_history(paths: RunPaths, model: str, fold: int) -> list[dict]:
    return read_json(paths.history(model, fold))["epochs"]
