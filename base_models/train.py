"""Training one (model, fold) job: AdamW with a one-cycle schedule on cached images.

The job reads the image cache and the folds, trains on the other K-1 folds and
writes only its own files under `<run>/models/<model>/`:

    fold<k>.safetensors       final weights (the last epoch)
    fold<k>.history.json      per-epoch train loss, valid loss, error rate, lr, seconds
    fold<k>.checkpoint.pt     end-of-epoch state for resume; removed when the job finishes
"""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_model, save_model

from oof import Folds, RunPaths, atomic_path, read_json, write_json

from .augment import PLAIN, normalize, train_batch
from .config import ModelSpec, TrainConfig
from .models import create_model, model_norm
from .predict import accuracy, autocast, log_loss, predict_views


def is_trained(paths: RunPaths, model: str, fold: int) -> bool:
    # The history is written after the weights, so its presence marks a finished job.
    return paths.history(model, fold).is_file() and paths.weights(model, fold).is_file()


def train_fold(spec: ModelSpec, fold: int, images: torch.Tensor, y: torch.Tensor, folds: Folds,
               paths: RunPaths, log=print) -> list[dict]:
    """Train `spec` on every fold but `fold`; validate on `fold`; save the last epoch.

    Args:
        spec: the model and its training config.
        fold: held-out fold.
        images: the train cache, uint8 (N, H, W, 3), on the device to train on.
        y: (N,) int64 class index per row, on the same device.
        folds: the run's folds (rows in cache order).
        paths: the run directory.

    Returns:
        The per-epoch history.
    """
    cfg = spec.train
    device = images.device
    torch.manual_seed(cfg.seed + fold)
    model = create_model(spec.arch, len(folds.classes), spec.pretrained).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    norm = model_norm(model)
    train_rows, valid_rows = folds.train_rows(fold), folds.valid_rows(fold)
    steps_per_epoch = max(len(train_rows) // cfg.batch_size, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = one_cycle(optimizer, cfg, steps_per_epoch * cfg.epochs)
    generator = torch.Generator().manual_seed(cfg.seed * 1000 + fold)
    history = _resume(paths.checkpoint(spec.name, fold), model, optimizer, scheduler, generator)
    for epoch in range(len(history), cfg.epochs):
        t0 = time.perf_counter()
        order = train_rows[torch.randperm(len(train_rows), generator=generator).numpy()]
        train_loss = _train_epoch(model, images, y, order, steps_per_epoch, cfg, norm, optimizer, scheduler,
                                  generator)
        proba = predict_views(model, images, valid_rows, cfg.size, [PLAIN], norm, cfg.batch_size)[0]
        y_valid = folds.y[valid_rows]
        history.append({"epoch": epoch + 1, "train_loss": train_loss, "valid_loss": log_loss(proba, y_valid),
                        "error_rate": 1.0 - accuracy(proba, y_valid), "lr": scheduler.get_last_lr()[0],
                        "seconds": time.perf_counter() - t0})
        if epoch + 1 < cfg.epochs:
            _save_checkpoint(paths.checkpoint(spec.name, fold), model, optimizer, scheduler, generator, history)
        log(_progress_line(spec.name, fold, cfg.epochs, history[-1]))
    _save_result(paths, spec, fold, model, history)
    return history


def one_cycle(optimizer, cfg: TrainConfig, total_steps: int):
    """fastai's fit_one_cycle: linear-cosine warm-up to lr over pct_start, cosine decay after.

    Momentum (AdamW's beta1) cycles 0.95 -> 0.85 -> 0.95, as in fastai.
    """
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=cfg.lr, total_steps=total_steps, pct_start=cfg.pct_start, anneal_strategy="cos",
        div_factor=cfg.div, final_div_factor=cfg.div_final, base_momentum=0.85, max_momentum=0.95)


def _train_epoch(model, images, y, order, steps, cfg, norm, optimizer, scheduler, generator) -> float:
    model.train()
    device = images.device
    total = torch.zeros((), device=device)
    # The last partial batch is dropped (as fastai does when shuffling): every step
    # has the same shape, and BatchNorm never sees a batch of one.
    for step in range(steps):
        idx = torch.as_tensor(order[step * cfg.batch_size:(step + 1) * cfg.batch_size], device=device)
        x = normalize(train_batch(images[idx], cfg.size, cfg.augment, generator), *norm)  # (B, 3, h, w)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device):
            loss = F.cross_entropy(model(x).float(), y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total += loss.detach()
    return float(total) / steps


def _progress_line(name: str, fold: int, epochs: int, h: dict) -> str:
    return (f"  {name} fold {fold} epoch {h['epoch']:>2}/{epochs}  train_loss {h['train_loss']:.4f}  "
            f"valid_loss {h['valid_loss']:.4f}  error_rate {h['error_rate']:.4f}  {h['seconds']:.1f}s")


def _save_checkpoint(path: Path, model, optimizer, scheduler, generator, history) -> None:
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "generator": generator.get_state(),
             "cpu_rng": torch.get_rng_state(), "history": history}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _resume(path: Path, model, optimizer, scheduler, generator) -> list[dict]:
    """Load an interrupted job's last finished epoch; an empty history when there is none."""
    if not path.is_file():
        return []
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["cpu_rng"])
    return list(state["history"])


def _save_result(paths: RunPaths, spec: ModelSpec, fold: int, model, history) -> None:
    with atomic_path(paths.weights(spec.name, fold)) as tmp:
        save_model(model, str(tmp))
    record = {"model": spec.name, "arch": spec.arch, "fold": fold, "train": asdict(spec.train),
              "epochs": history}
    write_json(paths.history(spec.name, fold), record)
    paths.checkpoint(spec.name, fold).unlink(missing_ok=True)


def load_fold_model(paths: RunPaths, spec: ModelSpec, fold: int, num_classes: int, device) -> torch.nn.Module:
    """A trained fold model, weights from safetensors (no pickle)."""
    model = create_model(spec.arch, num_classes)
    load_model(model, str(paths.weights(spec.name, fold)))
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model.eval()


def read_history(paths: RunPaths, model: str, fold: int) -> list[dict]:
    return read_json(paths.history(model, fold))["epochs"]
