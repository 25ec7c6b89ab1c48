"""The decode-once image cache: every image decoded and resized once, shared by all jobs.

    RunPaths.cache_data(split)      raw uint8 array (N, H, W, 3), read as a numpy memmap
    RunPaths.cache_index(split)     index: ids, source files, size, resize mode

It is the only way images reach training and prediction: JPEG decoding costs
more than a small CNN's step, so doing it once per run instead of once per
epoch, model and fold is the biggest speed-up the data path has.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from joblib import Parallel, delayed

from oof import RunPaths, StackerError, atomic_path, read_json, write_json

from .config import DataConfig
from .images import decode

CHUNK = 64  # images per decode task: large enough to amortise task overhead


@dataclass
class ImageCache:
    """A decoded split.

    Attributes:
        images: (N, H, W, 3) uint8, memory-mapped from disk.
        ids: (N,) ids in row order.
    """

    images: np.ndarray
    ids: np.ndarray

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.images.shape[1:3])


@dataclass(frozen=True)
class CacheOptions:
    """How images become the cache: the `data:` keys that matter here, and the size every job can use.

    Attributes:
        size: (H, W) of the cached images.
        resize: squish, crop or pad.
        workers: decoding processes; 0 uses every core.
        check_all: decode everything before failing and list every bad file.
    """

    size: tuple[int, int]
    resize: str = "squish"
    workers: int = 0
    check_all: bool = False

    def __post_init__(self):
        object.__setattr__(self, "size", tuple(int(s) for s in self.size))  # plain ints, as the index stores

    @classmethod
    def from_data(cls, data: DataConfig, size) -> CacheOptions:
        """The options the `data:` section asks for (resize, decode_workers, check_all_images), at `size`."""
        return cls(size, data.resize, data.decode_workers, data.check_all_images)


def build_cache(paths: RunPaths, split: str, ids, files, options: CacheOptions, log=print) -> ImageCache:
    """Decode `files` into the run's cache, unless an identical cache already exists.

    Args:
        paths: the run directory; the split's files are `paths.cache_data(split)` and `paths.cache_index(split)`.
        split: "train" or "test".
        ids, files: one per image, in row order.
        options: size, resize mode, workers, check_all.

    Raises:
        StackerError: a file that cannot be decoded, named.
    """
    index_file = paths.cache_index(split)
    index = {"ids": [str(i) for i in ids], "paths": [str(p) for p in files],
             "size": [int(s) for s in options.size], "resize": options.resize}
    if index_file.is_file() and paths.cache_data(split).is_file() and read_json(index_file) == index:
        return load_cache(paths, split)
    # The old index goes first: a rebuild that stops halfway must not leave an index
    # that vouches for data it did not describe.
    index_file.unlink(missing_ok=True)
    n, (h, w) = len(index["ids"]), index["size"]
    workers = options.workers or os.cpu_count() or 1

    def progress(done: int) -> None:
        log(f"  cache {split}: {done}/{n} images")

    t0 = time.perf_counter()
    _decode_all(paths.cache_data(split), index["paths"], options, workers, progress)
    seconds = time.perf_counter() - t0
    log(f"  cache {split}: {n} images at {h}x{w} ({options.resize}) in {seconds:.1f}s, "
        f"{n / max(seconds, 1e-9):.0f} images/s with {workers} workers")
    write_json(index_file, index)  # written last: its presence marks a complete cache
    return load_cache(paths, split)


def _decode_all(data_file: Path, files: list[str], options: CacheOptions, workers: int, progress) -> None:
    """Decode every file into `data_file` in chunks of CHUNK rows, in parallel; all or nothing."""
    n = len(files)
    shape = (max(n, 1), *options.size, 3)  # a memmap cannot be empty: one blank row for an empty split
    with atomic_path(data_file) as tmp:
        np.memmap(tmp, np.uint8, "w+", shape=shape).flush()
        chunks = [range(s, min(s + CHUNK, n)) for s in range(0, n, CHUNK)]
        tasks = (delayed(_decode_chunk)(tmp, shape, rows, files, options) for rows in chunks)
        bad, done = [], 0
        for chunk_bad, count in Parallel(n_jobs=min(workers, max(len(chunks), 1)),
                                         return_as="generator")(tasks):
            bad += chunk_bad
            done += count
            if len(chunks) > 1 and (done == n or done % (CHUNK * 16) == 0):
                progress(done)
        if bad:
            raise StackerError(_bad_images_message(bad))


def _decode_chunk(data_file: Path, shape: tuple, rows: range, files: list[str], options: CacheOptions):
    """Decode `rows` of `files` into the memmap of `shape` (N, H, W, 3); returns (bad file messages, count)."""
    out = np.memmap(data_file, np.uint8, "r+", shape=shape)
    bad = []
    for i in rows:
        try:
            out[i] = decode(files[i], options.size, options.resize)
        except StackerError as e:
            if not options.check_all:
                raise
            bad.append(str(e))
    out.flush()
    return bad, len(rows)


def _bad_images_message(bad: list[str]) -> str:
    lines = "\n  ".join(bad)
    return f"{len(bad)} image(s) cannot be decoded:\n  {lines}"


def load_cache(paths: RunPaths, split: str) -> ImageCache:
    """A split's decoded images, memory-mapped, as the last complete build left them."""
    index_file = paths.cache_index(split)
    if not index_file.is_file():
        raise StackerError(f"{index_file}: image cache not found; run train-base first")
    index = read_json(index_file)
    n, (h, w) = len(index["ids"]), index["size"]
    images = np.memmap(paths.cache_data(split), np.uint8, "r", shape=(max(n, 1), h, w, 3))[:n]
    return ImageCache(images, np.asarray(index["ids"], dtype=object))
