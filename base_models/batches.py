"""Getting cached images to the model: gathered by index on the device, the next batch already on its way.

Training dozens of (model, fold) jobs on ~10k photos is limited by JPEG decoding
and per-image CPU transforms long before the GPU. Here nothing is decoded after
the cache is built, and a batch is one index gather:

- on the GPU, the whole uint8 cache lives in device memory when it fits
  `gpu_cache_gb` (10k images at 256x192 are 1.5 GB) and a batch is `images[idx]`;
- otherwise it stays in pinned host memory; each batch is gathered into a pinned
  buffer and copied on a side stream while the previous batch computes;
- on the CPU the cache is an in-memory tensor and a batch is `images[idx]`.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch


class ImageSource:
    """A split's uint8 images (N, H, W, 3) placed for one device.

    Args:
        images: the cache array, (N, H, W, 3) uint8 (a memmap is read once).
        device: where batches are needed.
        gpu_cache_gb: largest cache kept whole in GPU memory.
    """

    def __init__(self, images: np.ndarray, device: torch.device, gpu_cache_gb: float = 8.0):
        self.device = torch.device(device)
        host = torch.from_numpy(np.array(images))  # (N, H, W, 3) uint8, one read of the memmap
        size_gb = host.numel() / 2**30
        self.on_device = self.device.type != "cuda" or size_gb <= gpu_cache_gb
        if self.device.type == "cuda":
            self.images = host.to(self.device) if self.on_device else host.pin_memory()
            self._stream = None if self.on_device else torch.cuda.Stream(self.device)
        else:
            self.images = host
        self.shape = tuple(host.shape)

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def placement(self) -> str:
        if self.device.type != "cuda":
            return "cpu memory"
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
        count = -(-len(order) // batch_size) if count is None else count
        slices = [np.asarray(order[i * batch_size:(i + 1) * batch_size]) for i in range(count)]
        if pad:
            slices = [np.pad(s, (0, batch_size - len(s)), mode="edge") if len(s) < batch_size else s
                      for s in slices]
        rows = [min(batch_size, len(order) - i * batch_size) for i in range(count)]
        if self.on_device:
            index_device = self.images.device
            for s, n in zip(slices, rows):
                yield self.images[torch.as_tensor(s, device=index_device)], n
        else:
            yield from self._prefetched(slices, rows)

    def _prefetched(self, slices, rows):
        """Pinned gather on the CPU, copy on a side stream, one batch ahead of the compute."""
        stream = self._stream

        def start(s):
            buffer = torch.empty((len(s), *self.shape[1:]), dtype=torch.uint8, pin_memory=True)
            torch.index_select(self.images, 0, torch.as_tensor(s), out=buffer)
            with torch.cuda.stream(stream):
                return buffer.to(self.device, non_blocking=True)

        pending = start(slices[0]) if slices else None
        for i, n in enumerate(rows):
            torch.cuda.current_stream(self.device).wait_stream(stream)
            batch = pending
            batch.record_stream(torch.cuda.current_stream(self.device))
            pending = start(slices[i + 1]) if i + 1 < len(slices) else None
            yield batch, n
