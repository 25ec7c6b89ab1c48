"""Prediction with test-time augmentation: each fold model on its held-out rows and the test set."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch

from .augment import View, normalize, view_batch
from .batches import ImageSource
from .models import logits_list


def autocast(device: torch.device):
    """bf16 autocast on CUDA; plain float32 elsewhere (CPU bf16 is slow and changes results)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass(frozen=True)
class ViewPlan:
    """What `predict_views` shows a model: one plan per model and image size.

    Attributes:
        size: (h, w) the model sees.
        views: fixed views to render, PLAIN first by convention.
        norm: (mean, std) of the model.
        batch_size: images per forward pass.
        fixed_shape: pad the last batch to `batch_size` (a compiled model never recompiles).
    """

    size: tuple[int, int]
    views: list[View]
    norm: tuple
    batch_size: int
    fixed_shape: bool = False


@torch.no_grad()
def predict_views(model: torch.nn.Module, images: ImageSource, rows: np.ndarray, plan: ViewPlan) -> list[np.ndarray]:
    """Class probabilities of each view, for every target the model has.

    Args:
        model: a trained model (put in eval mode here).
        images: the cache, placed on the model's device.
        rows: indices into `images` to predict.
        plan: the size, views, normalisation and batching.

    Returns:
        One array per target (main first): (V, len(rows), C_t) float64 softmax probabilities.
    """
    model.eval()
    device = images.device
    out = []  # per batch: per target (V, B, C_t)
    for batch, n in images.batches(rows, plan.batch_size, pad=plan.fixed_shape):  # (B, H, W, 3) uint8
        per_view = []
        for view in plan.views:
            x = normalize(view_batch(batch, plan.size, view), *plan.norm)  # (B, 3, h, w)
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(device):
                # padded rows (beyond n) are dropped before they reach the output
                per_view.append([torch.softmax(z[:n].float(), dim=1) for z in logits_list(model, x)])
        out.append([torch.stack(t).cpu() for t in zip(*per_view)])
    if not out:
        return [np.zeros((len(plan.views), 0, 0))]
    return [torch.cat(t, dim=1).double().numpy() for t in zip(*out)]


def combine_tta(plain: np.ndarray, augmented: np.ndarray, combine: str, beta: float) -> np.ndarray:
    """Combine the plain view (N, C) with augmented views (V, N, C).

    `lerp` is fastai's `Learner.tta` default: the mean of the augmented views moved
    a fraction beta back towards the plain view; `mean` weighs all views equally.
    """
    if augmented.shape[0] == 0:
        return plain
    if combine == "lerp":
        p = (1.0 - beta) * augmented.mean(axis=0) + beta * plain
    else:
        p = (plain + augmented.sum(axis=0)) / (augmented.shape[0] + 1)
    return p / p.sum(axis=1, keepdims=True)
