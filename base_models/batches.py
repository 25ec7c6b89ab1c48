"""Getting cached images to the model: gathered by index on the device, the next batch already on its way.

Training dozens of (model, fold) jobs on ~10k photos is limited by JPEG decoding
and per-image CPU transforms long before the GPU. Here nothing is decoded after
the cache is built, and a batch is one index gather:

- on the GPU, a split's whole uint8 cache lives in device memory when it fits the
  card's budget (`place_images`: free memory less `train.gpu_reserve_gb`, train and
  test together; 10k images at 256x192 are 1.5 GB) and a batch is `images[idx]`;
- otherwise it stays in the cache file's memory map; each batch is gathered from it
  into a pinned buffer and copied on a side stream while the previous batch computes,
  so only one batch at a time is pinned and the workers of a machine share the file's
  page cache instead of each holding a copy;
- on the CPU a batch is gathered from the memory map, likewise without a copy of the split.

Within a training step nothing waits on the host: the rows of a call are copied to
the device once (from pinned memory, without blocking) and sliced there per batch.

The train cache holds every dataset row; folds that `data.exclude` left short read it through
their rows (`ImageSource.select`: row i of the folds is cache row rows[i]), with no copy of the split.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from oof import StackerError

# Rows copied to the GPU at a time when a split is placed there: the host holds one chunk, not the split.
UPLOAD_CHUNK_BYTES = 256 * 2**20
# Set by an engine in a job's worker when the job has a fraction of a GPU (Ray's fractional num_gpus):
# the job's cache budget is that share of the card.
GPU_SHARE_ENV = "STACKER_GPU_SHARE"


def to_device(tensor: torch.Tensor, device) -> torch.Tensor:
    """A CPU tensor on `device` without making the host wait: on CUDA it goes through pinned memory,
    non-blocking (a copy from pageable memory is a copy and a stream synchronisation). The caching host
    allocator keeps the pinned block until the copy is done, so the source may be dropped at once."""
    device = torch.device(device)
    if device.type != "cuda":
        return tensor if tensor.device == device else tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


@dataclass(frozen=True)
class CacheBudget:
    """How much of a card the image caches may take: `train.gpu_cache_gb` (auto or GB) and
    `train.gpu_reserve_gb` (what auto leaves for the model, its optimizer state and activations)."""

    cache_gb: float | str = "auto"
    reserve_gb: float = 6.0

    @classmethod
    def of(cls, train) -> "CacheBudget":
        """The budget a `TrainConfig` asks for."""
        return cls(train.gpu_cache_gb, train.gpu_reserve_gb)


def cache_budget_gb(setting: float | str, free_gb: float, reserve_gb: float, share: float = 1.0) -> float:
    """GB of image cache one job may place on its card.

    Args:
        setting: `train.gpu_cache_gb`: auto (the free memory less the reserve) or a number of GB.
        free_gb: the card's free memory now (`torch.cuda.mem_get_info`).
        reserve_gb: `train.gpu_reserve_gb`, left free by auto.
        share: the job's fraction of the card (fractional GPUs); the free memory is shared out.

    Raises:
        StackerError: an explicit budget above the job's share of the free memory.
    """
    free = free_gb * share
    if setting == "auto":
        return max(0.0, free - reserve_gb * share)
    if setting > free:
        of = f" (its {share:g} share of the card)" if share < 1 else ""
        raise StackerError(f"train.gpu_cache_gb: {setting:g} GB, but the card has {free:.1f} GB free for this "
                           f"job{of}; lower it, or set auto (the free memory less train.gpu_reserve_gb)")
    return float(setting)


def on_device_plan(sizes_gb: list[float], budget_gb: float) -> list[bool]:
    """Which splits live whole on the card: in order (train first), each one while what is left holds it."""
    plan, left = [], budget_gb
    for size in sizes_gb:
        fits = size <= left
        plan.append(fits)
        left -= size if fits else 0.0
    return plan


def gpu_share() -> float:
    """This worker's fraction of its GPU: `STACKER_GPU_SHARE` when an engine set it, else the whole card."""
    share = float(os.environ.get(GPU_SHARE_ENV) or 1.0)
    return share if 0 < share <= 1 else 1.0


def free_gpu_gb(device: torch.device) -> float:
    """Free memory of the card, in GB, once this process's cached but unused blocks are returned to it."""
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(device)
    return free / 2**30


def cache_plan(sizes_gb: list[float], budget: CacheBudget, free_gb: float, share: float = 1.0) -> tuple[float, list[bool]]:
    """The job's budget in GB and which splits (train first) live whole on the card, from what it reports free."""
    budget_gb = cache_budget_gb(budget.cache_gb, free_gb, budget.reserve_gb, share)
    return budget_gb, on_device_plan(sizes_gb, budget_gb)


def place_images(splits: list[np.ndarray], device, budget: CacheBudget = CacheBudget(),
                 log=None) -> list["ImageSource"]:
    """The splits a job reads (train first, then test), placed for `device` under one budget.

    On CUDA the budget is resolved once for all of them from the card's free memory, so train and
    test together never take more than it; a split that does not fit is read through the pinned,
    prefetched host path.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return [ImageSource(images, device) for images in splits]
    budget_gb, plan = cache_plan([images.nbytes / 2**30 for images in splits], budget, free_gpu_gb(device), gpu_share())
    if log is not None:
        log(f"  gpu cache budget {budget_gb:.1f} GB (train.gpu_cache_gb {budget.cache_gb}, reserve "
            f"{budget.reserve_gb:g} GB)")
    return [ImageSource(images, device, on_device=keep) for images, keep in zip(splits, plan)]


class ImageSource:
    """A split's uint8 images (N, H, W, 3) placed for one device.

    Args:
        images: the cache array, (N, H, W, 3) uint8 (usually its memory map; never copied whole to the host).
        device: where batches are needed.
        on_device: on CUDA, copy the split into device memory (else: the pinned, prefetched host path).
            `place_images` decides it from the card's budget.
    """

    def __init__(self, images: np.ndarray, device, on_device: bool = True):
        self.device = torch.device(device)
        self.shape = tuple(images.shape)
        self.on_device = self.device.type == "cuda" and on_device
        self._host = images
        self._rows = None  # (n,) int64 split row of each row read (`select`); None: every row, in order
        self.images = _upload(images, self.device) if self.on_device else None
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" and not on_device else None

    def select(self, rows: np.ndarray) -> "ImageSource":
        """The same placed images read through `rows`: row i of what it yields is split row rows[i].

        Shares the placement (the device copy or the memory map) with this source; nothing is copied.
        Itself when `rows` is every row in order.
        """
        rows = np.asarray(rows, dtype=np.int64)
        if self._rows is None and len(rows) == self.shape[0] and (rows == np.arange(len(rows))).all():
            return self
        out = copy.copy(self)
        out._rows = rows if self._rows is None else self._rows[rows]
        out.shape = (len(rows), *self.shape[1:])
        return out

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def placement(self) -> str:
        if self.device.type != "cuda":
            return "cpu memory (gathered from the cache file)"
        return "gpu memory" if self.on_device else "pinned host memory, prefetched"

    def batches(self, order: np.ndarray, batch_size: int, count: int | None = None,
                pad: bool = False) -> Iterator[tuple[torch.Tensor, int]]:
        """Yield (uint8 (B, H, W, 3) on the device, rows it holds) for consecutive slices of `order`.

        Args:
            order: row indices, in the order to visit them.
            batch_size: rows per batch.
            count: number of batches (default: every row, the last batch partial).
            pad: repeat the last row to fill a partial batch, so every batch has one
                shape (a compiled model then never recompiles); the caller drops the
                padded outputs using the yielded row count.
        """
        if self._rows is not None:
            order = self._rows[np.asarray(order, dtype=np.int64)]
        count = -(-len(order) // batch_size) if count is None else count
        slices = [np.asarray(order[i * batch_size:(i + 1) * batch_size], dtype=np.int64) for i in range(count)]
        if pad:
            slices = [np.pad(s, (0, batch_size - len(s)), mode="edge") if len(s) < batch_size else s
                      for s in slices]
        rows = [min(batch_size, len(order) - i * batch_size) for i in range(count)]
        if self.on_device:
            yield from self._gathered_on_device(slices, rows)
        elif self.device.type == "cuda":
            yield from self._prefetched(slices, rows)
        else:
            for s, n in zip(slices, rows):
                yield torch.from_numpy(np.take(self._host, s, axis=0)), n

    def _gathered_on_device(self, slices, rows):
        """Every row index copied to the device once, then one gather per batch: no copy per step."""
        if not slices:
            return
        index = to_device(torch.from_numpy(np.concatenate(slices)), self.device)
        start = 0
        for s, n in zip(slices, rows):
            yield self.images[index[start:start + len(s)]], n
            start += len(s)

    def _prefetched(self, slices, rows):
        """Gather from the memory map into a pinned buffer, copy on a side stream, one batch ahead of the compute."""
        stream = self._stream

        def start(s):
            buffer = torch.empty((len(s), *self.shape[1:]), dtype=torch.uint8, pin_memory=True)
            np.take(self._host, s, axis=0, out=buffer.numpy())
            with torch.cuda.stream(stream):
                return buffer.to(self.device, non_blocking=True)

        pending = start(slices[0]) if slices else None
        for i, n in enumerate(rows):
            torch.cuda.current_stream(self.device).wait_stream(stream)
            batch = pending
            batch.record_stream(torch.cuda.current_stream(self.device))
            pending = start(slices[i + 1]) if i + 1 < len(slices) else None
            yield batch, n


def _upload(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """The split in device memory, copied in chunks so the host never holds more than one."""
    out = torch.empty(images.shape, dtype=torch.uint8, device=device)
    row_bytes = max(1, int(np.prod(images.shape[1:])))
    step = max(1, UPLOAD_CHUNK_BYTES // row_bytes)
    for first in range(0, len(images), step):
        out[first:first + step].copy_(torch.from_numpy(np.array(images[first:first + step])))
    return out
