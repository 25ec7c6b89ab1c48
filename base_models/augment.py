"""Batch augmentation and TTA views as tensor ops on the model's device.

Images arrive as a uint8 batch gathered from the cache, (B, H, W, 3). Every
geometric change (random resized crop, flip, rotation) is folded into one
affine matrix per sample and applied with a single `grid_sample`, so each
image is interpolated once per step, whatever the output size (fastai's batch
transforms and airbench's `batch_crop`/`batch_flip_lr` are the models).

TTA is a short list of fixed views, each a pure description (flip, zoom,
offset) rendered by the same warp: the plain view is the whole image.

Every number made on the host (a view's matrix, a batch's random draws) reaches the
device through `batches.to_device`, so on CUDA a step never waits for a copy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .batches import to_device
from .config import MAX_TTA_VIEWS, TTA_CROPS, AugmentConfig


@dataclass(frozen=True)
class View:
    """One deterministic TTA view: mirror, zoom (crop side fraction) and crop centre in [-1, 1]."""

    flip: bool = False
    zoom: float = 1.0
    cx: float = 0.0
    cy: float = 0.0


PLAIN = View()


def tta_views(n: int) -> list[View]:
    """The n augmented TTA views: alternately mirrored, walking through the crops.

    View 0 is the mirrored whole image; views 1, 2 the centre crop plain and
    mirrored; then the corner crops.
    """
    if n > MAX_TTA_VIEWS:
        raise ValueError(f"at most {MAX_TTA_VIEWS} distinct TTA views, asked for {n}")
    views = []
    for k in range(n):
        zoom, cx, cy = TTA_CROPS[((k + 1) // 2) % len(TTA_CROPS)]
        views.append(View(flip=k % 2 == 0, zoom=zoom, cx=cx, cy=cy))
    return views


def view_theta(view: View, batch: int, device) -> torch.Tensor:
    """(B, 2, 3) affine matrices of a fixed view."""
    margin = 1.0 - view.zoom
    theta = torch.tensor([[view.zoom * (-1.0 if view.flip else 1.0), 0.0, view.cx * margin],
                          [0.0, view.zoom, view.cy * margin]])
    return to_device(theta, device).expand(batch, 2, 3)


def random_theta(batch: int, cfg: AugmentConfig, generator: torch.Generator, device) -> torch.Tensor:
    """(B, 2, 3) random resized crop + zoom + flip + rotation, one draw per sample.

    Sampled on the CPU generator so a seed gives the same augmentation on any device.
    """
    u = torch.rand(batch, 7, generator=generator, dtype=torch.float64)
    area = cfg.min_scale + (1.0 - cfg.min_scale) * u[:, 0]
    log_lo, log_hi = math.log(cfg.ratio[0]), math.log(cfg.ratio[1])
    ratio = torch.exp(log_lo + (log_hi - log_lo) * u[:, 1])
    # Crop side fractions (of the output grid's [-1, 1] span); clipped to stay inside the image.
    zoom = 1.0 + (max(cfg.max_zoom, 1.0) - 1.0) * u[:, 6]
    sw = torch.sqrt(area * ratio).clamp(max=1.0) / zoom
    sh = torch.sqrt(area / ratio).clamp(max=1.0) / zoom
    cx = (1.0 - sw) * (2 * u[:, 2] - 1)
    cy = (1.0 - sh) * (2 * u[:, 3] - 1)
    sign = torch.where((u[:, 4] < 0.5) & cfg.flip, -1.0, 1.0)
    angle = math.radians(cfg.max_rotate) * (2 * u[:, 5] - 1)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([
        torch.stack([sw * sign * cos, -sh * sin, cx], 1),
        torch.stack([sw * sign * sin, sh * cos, cy], 1),
    ], 1)  # (B, 2, 3)
    return to_device(theta.float(), device)


def warp(images: torch.Tensor, theta: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Render uint8 (B, H, W, 3) through affine `theta` to float (B, 3, h, w) in [0, 1].

    Points outside the image are filled by reflection, as fastai's default pad mode.
    """
    x = images.permute(0, 3, 1, 2).float().div_(255.0)  # (B, 3, H, W)
    grid = F.affine_grid(theta, [x.shape[0], 3, *size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def random_lighting(x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Per-sample brightness shift and contrast factor on (B, 3, h, w) in [0, 1]."""
    if cfg.max_lighting <= 0:
        return x
    u = to_device(torch.rand(x.shape[0], 2, generator=generator), x.device)
    brightness = cfg.max_lighting * (2 * u[:, 0] - 1) / 2
    contrast = torch.exp(math.log1p(cfg.max_lighting) * (2 * u[:, 1] - 1))
    b, c = brightness.view(-1, 1, 1, 1), contrast.view(-1, 1, 1, 1)
    return ((x - 0.5) * c + 0.5 + b).clamp_(0.0, 1.0)


def norm_tensors(norm: tuple, device) -> tuple[torch.Tensor, torch.Tensor]:
    """A model's (mean, std) as (1, 3, 1, 1) float32 tensors on `device`, made once per job or call."""
    device = torch.device(device)

    def placed(v):
        if isinstance(v, torch.Tensor) and v.device.type == device.type and device.index in (None, v.device.index):
            return v.float().reshape(1, -1, 1, 1)
        return to_device(torch.tensor(v, dtype=torch.float32).reshape(1, -1, 1, 1), device)

    return tuple(placed(v) for v in norm)


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """Standardise with the model's own mean and std (from its timm config; `norm_tensors` of them
    avoid a copy to the device per batch)."""
    m, s = (v if isinstance(v, torch.Tensor) else torch.as_tensor(v, device=x.device, dtype=x.dtype)
            for v in (mean, std))
    return (x - m.view(1, -1, 1, 1)) / s.view(1, -1, 1, 1)


def train_batch(images: torch.Tensor, size, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """A training batch: uint8 (B, H, W, 3) -> augmented float (B, 3, h, w) in [0, 1]."""
    theta = random_theta(images.shape[0], cfg, generator, images.device)
    return random_lighting(warp(images, theta, size), cfg, generator)


def view_batch(images: torch.Tensor, size, view: View = PLAIN, thetas: dict | None = None) -> torch.Tensor:
    """A prediction batch of one fixed view: uint8 (B, H, W, 3) -> float (B, 3, h, w).

    Args:
        thetas: a dict kept across a call's batches: each view's matrix is then made (and copied to the
            device) once, not once per batch.
    """
    if view == PLAIN and tuple(images.shape[1:3]) == tuple(size):
        return images.permute(0, 3, 1, 2).float().div_(255.0)  # no resampling needed
    batch = images.shape[0]
    if thetas is None:
        return warp(images, view_theta(view, batch, images.device), size)
    if view not in thetas:
        thetas[view] = view_theta(view, 1, images.device)
    return warp(images, thetas[view].expand(batch, 2, 3), size)
