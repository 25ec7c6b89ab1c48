"""The decode-once image cache: every image decoded and resized once, shared by all jobs.

    <run>/cache/<split>.u8      raw uint8 array (N, H, W, 3), read as a numpy memmap
    <run>/cache/<split>.json    index: ids, source files, size, resize mode

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

from oof import StackerError, atomic_path, read_json, write_json

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


def cache_files(cache_dir: Path, split: str) -> tuple[Path, Path]:
    return cache_dir / f"{split}.u8", cache_dir / f"{split}.json"


def build_cache(cache_dir, split: str, ids, paths, size, resize: str, workers: int = 0,
                check_all: bool = False, log=print) -> ImageCache:
    """Decode `paths` into the cache, unless an identical cache already exists.

    Args:
        cache_dir: the run's cache folder.
        split: "train" or "test".
        ids, paths: one per image, in row order.
        size: (H, W) of the cached images.
        resize: squish, crop or pad.
        workers: decoding processes; 0 uses every core.
        check_all: decode everything before failing and list every bad file.

    Raises:
        StackerError: a file that cannot be decoded, named.
    """
    cache_dir = Path(cache_dir)
    data_file, index_file = cache_files(cache_dir, split)
    index = {"ids": [str(i) for i in ids], "paths": [str(p) for p in paths],
             "size": [int(s) for s in size], "resize": resize}
    if index_file.is_file() and data_file.is_file() and read_json(index_file) == index:
        return load_cache(cache_dir, split)
    # The old index goes first: a rebuild that stops halfway must not leave an index
    # that vouches for data it did not describe.
    index_file.unlink(missing_ok=True)
    n, (h, w) = len(index["ids"]), index["size"]
    workers = workers or os.cpu_count() or 1
    t0 = time.perf_counter()
    with atomic_path(data_file) as tmp:
        np.memmap(tmp, np.uint8, "w+", shape=(max(n, 1), h, w, 3)).flush()
        chunks = [range(s, min(s + CHUNK, n)) for s in range(0, n, CHUNK)]
        tasks = (delayed(_decode_chunk)(tmp, n, (h, w), resize, rows, index["paths"], check_all)
                 for rows in chunks)
        bad, done = [], 0
        for chunk_bad, count in Parallel(n_jobs=min(workers, max(len(chunks), 1)),
                                         return_as="generator")(tasks):
            bad += chunk_bad
            done += count
            if len(chunks) > 1 and (done == n or done % (CHUNK * 16) == 0):
                log(f"  cache {split}: {done}/{n} images")
        if bad:
            raise StackerError(_bad_images_message(bad))
    seconds = time.perf_counter() - t0
    log(f"  cache {split}: {n} images at {h}x{w} ({resize}) in {seconds:.1f}s, "
        f"{n / max(seconds, 1e-9):.0f} images/s with {workers} workers")
    write_json(index_file, index)  # written last: its presence marks a complete cache
    return load_cache(cache_dir, split)


def _decode_chunk(data_file, n, size, resize, rows, paths, check_all):
    out = np.memmap(data_file, np.uint8, "r+", shape=(max(n, 1), *size, 3))
    bad = []
    for i in rows:
        try:
            out[i] = decode(paths[i], size, resize)
        except StackerError as e:
            if not check_all:
                raise
            bad.append(str(e))
    out.flush()
    return bad, len(rows)


def _bad_images_message(bad: list[str]) -> str:
    lines = "\n  ".join(bad)
    return f"{len(bad)} image(s) cannot be decoded:\n  {lines}"


def load_cache(cache_dir, split: str) -> ImageCache:
    data_file, index_file = cache_files(Path(cache_dir), split)
    if not index_file.is_file():
        raise StackerError(f"{index_file}: image cache not found; run train-base first")
    index = read_json(index_file)
    n, (h, w) = len(index["ids"]), index["size"]
    images = np.memmap(data_file, np.uint8, "r", shape=(max(n, 1), h, w, 3))[:n]
    return ImageCache(images, np.asarray(index["ids"], dtype=object))
