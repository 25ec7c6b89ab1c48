"""Prediction with test-time augmentation: each fold model on its held-out rows and the test set.

Also the precision both training and prediction run at (`train.amp`): `choose_amp` picks it
from the setting and the card's compute capability, `autocast` enters it.
"""
from __future__ import annotations

import contextlib
import functools
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from oof import StackerError, bar
from oof.views import combine_views

from .augment import PLAIN, View, norm_tensors, normalize, view_batch
from .batches import ImageSource
from .models import logits_list, model_norm
from .table_schema import recorded_views

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def choose_amp(setting: str, device_type: str, capability: tuple[int, int] | None) -> str:
    """The precision `train.amp` asks for on a device: "bf16", "fp16" or "off".

    auto: bf16 on CUDA cards of compute capability >= 8.0 (A100, L4, H100: bf16 tensor
    cores, float32's range, no loss scaling); fp16 below (T4 sm75, V100 sm70, P100 sm60
    have no bf16 tensor cores, so bf16 would be emulated and slower than fp16); off on
    CPU, where autocast is slower than float32 on most CPUs and changes results. An
    explicit bf16, fp16 or off is kept as it is.

    Args:
        setting: auto, bf16, fp16 or off.
        device_type: "cuda", "cpu", ...
        capability: (major, minor) CUDA compute capability; None off CUDA.
    """
    if setting != "auto":
        return setting
    if device_type != "cuda" or capability is None:
        return "off"
    return "bf16" if tuple(capability) >= (8, 0) else "fp16"


@functools.lru_cache(maxsize=None)
def autocast_supported(device_type: str, amp: str) -> bool:
    """Whether this torch autocasts to `amp` on `device_type` (an unsupported dtype is
    turned off with a warning, so the context is entered and looked at)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with torch.autocast(device_type, dtype=AMP_DTYPES[amp]):
                dtype = torch.get_autocast_dtype(device_type)
                return torch.is_autocast_enabled(device_type) and dtype == AMP_DTYPES[amp]
        except RuntimeError:
            return False


def resolve_amp(setting: str, device: torch.device, name: str = "train") -> str:
    """`choose_amp` for a real device, refusing a precision torch cannot autocast to there.

    Raises:
        StackerError: e.g. fp16 on a CPU whose torch has no fp16 autocast (named by `name`).
    """
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    amp = choose_amp(setting, device.type, capability)
    if amp != "off" and not autocast_supported(device.type, amp):
        raise StackerError(f"{name}: train.amp {setting}: torch {torch.__version__} cannot autocast to {amp} on "
                           f"{device.type}; use amp: auto or off")
    return amp


# torch.compile's Triton backend refuses older cards (GPUTooOldForTriton): a P100 is 6.0.
MIN_COMPILE_CAPABILITY = (7, 0)


def compile_refusal(device_type: str, capability: tuple[int, int] | None, card: str = "this card") -> str | None:
    """Why `train.compile` is ignored on a device, or None where torch.compile runs.

    Args:
        device_type: "cuda", "cpu", ...
        capability: (major, minor) CUDA compute capability; None off CUDA.
        card: the card's name, for the note.
    """
    if device_type != "cuda":
        return "train.compile is ignored on CPU (torch.compile pays off on CUDA)"
    if capability is not None and tuple(capability) < MIN_COMPILE_CAPABILITY:
        major, minor = capability
        return (f"train.compile is ignored on {card} (compute capability {major}.{minor}; torch.compile's "
                f"Triton backend needs {MIN_COMPILE_CAPABILITY[0]}.{MIN_COMPILE_CAPABILITY[1]} or newer)")
    return None


def compile_note(device: torch.device) -> str | None:
    """`compile_refusal` for a real device."""
    if device.type != "cuda":
        return compile_refusal(device.type, None)
    return compile_refusal("cuda", torch.cuda.get_device_capability(device), torch.cuda.get_device_name(device))


def device_name(device: torch.device) -> str:
    """The card's name (recorded with a job's precision), or "cpu"."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def autocast(device: torch.device, amp: str = "auto"):
    """Autocast to `amp` (a `train.amp` setting or a precision `resolve_amp` chose) on `device`;
    plain float32 for off."""
    amp = resolve_amp(amp, device)
    if amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AMP_DTYPES[amp])


@dataclass(frozen=True)
class ViewPlan:
    """What `predict_views` shows a model: one plan per model and image size.

    Attributes:
        size: (h, w) the model sees.
        views: fixed views to render, PLAIN first by convention.
        norm: (mean, std) of the model.
        batch_size: images per forward pass.
        fixed_shape: pad the last batch to `batch_size` (a compiled model never recompiles).
        amp: the precision (`resolve_amp`); auto picks it for the device.
    """

    size: tuple[int, int]
    views: list[View]
    norm: tuple
    batch_size: int
    fixed_shape: bool = False
    amp: str = "auto"


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
    amp = resolve_amp(plan.amp, device)
    norm = norm_tensors(plan.norm, device)
    thetas = {}  # the views' matrices, made once per call (a full batch's; a partial one slices them)
    out = []  # per batch: per target (V, B, C_t), kept on the device and copied to the host once at the end
    batches = bar(images.batches(rows, plan.batch_size, pad=plan.fixed_shape), total=-(-len(rows) // plan.batch_size),
                  desc=f"predict {len(plan.views)} view(s)", unit="batch")
    for batch, n in batches:  # (B, H, W, 3) uint8
        per_view = []
        for view in plan.views:
            x = normalize(view_batch(batch, plan.size, view, thetas), *norm)  # (B, 3, h, w)
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(device, amp):
                # padded rows (beyond n) are dropped before they reach the output
                per_view.append([torch.softmax(z[:n].float(), dim=1) for z in logits_list(model, x)])
        out.append([torch.stack(t) for t in zip(*per_view)])
    if not out:
        return [np.zeros((len(plan.views), 0, 0))]
    return [torch.cat(t, dim=1).cpu().double().numpy() for t in zip(*out)]


def combine_tta(plain: np.ndarray, augmented: np.ndarray, combine: str, beta: float) -> np.ndarray:
    """Combine the plain view (N, C) with augmented views (V, N, C): `oof.views.combine_views`, the one formula
    predict-oof, `stacker predict` and the meta level's view choices share."""
    return combine_views(plain, augmented, combine, beta)


class Rendered(NamedTuple):
    """One target's predictions of a set of rows: every view apart and the views combined."""

    views: np.ndarray  # (V, n, C_t), view 0 the plain one
    combined: np.ndarray  # (n, C_t), as the table's TTA settings combine them

    @property
    def plain(self) -> np.ndarray:
        return self.views[0]


def predict_with_tta(net: torch.nn.Module, images: ImageSource, rows: np.ndarray, meta: dict, batch_size: int,
                     compile_model: bool = False) -> list[tuple[np.ndarray, np.ndarray]]:
    """One fold model's predictions of `rows` as a prediction table's metadata records them.

    predict-oof and `stacker predict` both call this, so a new test set is predicted exactly as the
    run's own was: `recorded_views(meta)` gives the views (a schema-1 table's n names the frozen
    `SCHEMA1_VIEWS`), `meta["tta"]` how they combine (combine, beta) and the size, `meta["amp"]` the
    precision. `compile_model` compiles with a fixed batch shape (CUDA only).

    Raises:
        StackerError: views the metadata does not record readably (`recorded_views`).

    Returns:
        Per target (main first): every view apart (V, len(rows), C_t) and the views combined (len(rows), C_t).
    """
    tta = meta["tta"]
    compiled = compile_model and compile_note(images.device) is None
    forward = torch.compile(net) if compiled else net
    plan = ViewPlan(tuple(tta["size"]), [PLAIN, *recorded_views(meta)], model_norm(net), batch_size,
                    fixed_shape=compiled, amp=meta["amp"])
    views = predict_views(forward, images, rows, plan)  # per target (V, n, C_t)
    return [Rendered(v, combine_tta(v[0], v[1:], tta["combine"], tta["beta"])) for v in views]
