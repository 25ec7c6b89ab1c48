"""Building timm models and reading their preprocessing from their own config."""
from __future__ import annotations

from pathlib import Path

import timm
import torch
from timm.data import resolve_data_config

from oof import StackerError


def create_model(arch: str, num_classes: int, pretrained: str | None = None) -> torch.nn.Module:
    """A timm model with a fresh `num_classes` head.

    Args:
        arch: timm architecture name (optionally with a pretrained tag).
        num_classes: classes of the main target.
        pretrained: a local weights file; loaded through timm's file path, never the network.

    Raises:
        StackerError: unknown architecture or missing weights file.
    """
    kwargs = {}
    if pretrained is not None:
        if not Path(pretrained).is_file():
            raise StackerError(f"{pretrained}: pretrained weights file not found (for {arch})")
        kwargs = {"pretrained": True, "pretrained_cfg_overlay": {"file": str(pretrained)}}
    try:
        return timm.create_model(arch, num_classes=num_classes, **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise StackerError(f"model arch {arch!r}: not a timm model (timm.list_models() lists them)") from None
        raise


def model_norm(model: torch.nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The (mean, std) the model was trained with, from its timm pretrained config."""
    cfg = resolve_data_config({}, model=model)
    return tuple(cfg["mean"]), tuple(cfg["std"])


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise StackerError("train.device: cuda was asked for but no CUDA device is visible")
    return torch.device(name)
