"""The decode-once image cache: every image decoded and resized once, shared by all jobs.

    RunPaths.cache_data(split)      raw uint8 array (N, H, W, 3), read as a numpy memmap
    RunPaths.cache_index(split)     index: ids, source files with their size and mtime_ns, size, resize mode,
                                    each row's pixel digest, each row's perceptual hash (and the hash's
                                    kind and version) and the split's digest

It is the only way images reach training and prediction: JPEG decoding costs
more than a small CNN's step, so doing it once per run instead of once per
epoch, model and fold is the biggest speed-up the data path has.

The split's digest (sha256 over the ids, every row's decoded pixels, the size and
the resize mode) is what jobs and prediction tables record as the data they saw.
A rebuild re-decodes only the files whose size or mtime changed (as make and
rsync decide, a cheap stat per file); a file touched but not changed decodes to
the same pixels, so the digest, and every job trained on it, stays current.

Each row's perceptual hash (`duplicates.image_hash`) is taken from the decoded
file before it is resized, at a JPEG draft of its own (HASH_DRAFT): the same
image gives the same hash at every cache size and resize mode. It is not part
of the split's digest: duplicates change folds, not the pixels a job sees.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from filelock import FileLock
from joblib import Parallel, delayed

from oof import RunPaths, StackerError, atomic_path, bar, info, json_digest, read_json, remove_temps, write_json
from oof.progress import bars_enabled

from .config import DataConfig
from .duplicates import HASH_SPEC, hash_hex, hash_table, image_hash
from .images import decoded_size, load_rgb, resize_image

CHUNK = 64  # images per decode task: large enough to amortise task overhead
# The JPEG draft the hash's source is decoded at: a 224 px cache's own, so the usual cache hashes the image
# it decoded; another cache size costs a second, reduced decode (about 3 ms for a 640x480 JPEG).
HASH_DRAFT = (224, 224)


@dataclass
class ImageCache:
    """A decoded split.

    Attributes:
        images: (N, H, W, 3) uint8, memory-mapped from disk.
        ids: (N,) ids in row order.
        digest: sha256 of the split's ids, pixels, size and resize mode (what a job records it saw).
        resize: how the files were resized to the cache size.
        pixel_digests: (N,) sha256 hex of each row's pixels (equal for exact duplicates).
        hashes: (N, W) uint64 perceptual hash of each row (`duplicates.image_hash`); None for an index without
            hashes of the current kind.
    """

    images: np.ndarray
    ids: np.ndarray
    digest: str = ""
    resize: str = "squish"
    pixel_digests: np.ndarray | None = None
    hashes: np.ndarray | None = None

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


def build_cache(paths: RunPaths, split: str, ids, files, options: CacheOptions, log=info) -> ImageCache:
    """Decode `files` into the run's cache: nothing when the cache is current, only the changed files when the
    ids, size and resize mode are the same, everything otherwise.

    Args:
        paths: the run directory; the split's files are `paths.cache_data(split)` and `paths.cache_index(split)`.
        split: "train" or "test".
        ids, files: one per image, in row order.
        options: size, resize mode, workers, check_all.

    Raises:
        StackerError: a file that cannot be decoded, named.
    """
    paths.cache.mkdir(parents=True, exist_ok=True)
    with FileLock(paths.cache_lock(split)):  # a second train-base waits here, then finds the cache built
        return _build_locked(paths, split, ids, files, options, log)


def _build_locked(paths: RunPaths, split: str, ids, files, options: CacheOptions, log) -> ImageCache:
    index_file = paths.cache_index(split)
    index = {"ids": [str(i) for i in ids], "paths": [str(p) for p in files],
             "files": [_file_stat(p) for p in files],  # taken before decoding: a later change is seen next time
             "size": [int(s) for s in options.size], "resize": options.resize}
    old = _reusable_index(paths, split, index)
    rows = list(range(len(index["ids"]))) if old is None else _changed_rows(old, index)
    if old is not None and not rows:
        return load_cache(paths, split)
    # The old index goes first: a rebuild that stops halfway must not leave an index
    # that vouches for data it did not describe.
    index_file.unlink(missing_ok=True)
    remove_temps(paths.cache, f"{paths.cache_data(split).name}.")  # a killed build's partial copy
    t0 = time.perf_counter()
    pixels = list(old["pixels"]) if old else [None] * len(rows)
    hashes = list(old["hashes"]) if old else [None] * len(rows)

    def progress(done: int) -> None:
        log(f"  cache {split}: {done}/{len(rows)} images")

    decoded = _decode_rows(paths.cache_data(split), rows, index["paths"], options, old is not None, progress)
    for i, (digest, row_hash) in decoded.items():
        pixels[i], hashes[i] = digest, row_hash
    index.update(pixels=pixels, hash=HASH_SPEC, hashes=hashes,
                 digest=split_digest(index["ids"], pixels, index["size"], index["resize"]))
    _log_build(log, split, index, len(rows) if old else None, time.perf_counter() - t0, options)
    write_json(index_file, index)  # written last: its presence marks a complete cache
    return load_cache(paths, split)


def split_digest(ids: list[str], pixels: list[str], size: list[int], resize: str) -> str:
    """The digest a split's cache is known by: its ids in order, each row's pixel digest, size and resize mode."""
    return json_digest({"ids": ids, "pixels": pixels, "size": size, "resize": resize})


def _file_stat(path) -> list[int] | None:
    """[size, mtime_ns] of an image file; None when it cannot be read (decoding then names the problem)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def _reusable_index(paths: RunPaths, split: str, index: dict) -> dict | None:
    """The cache's index when its data can be updated row by row: same ids in the same order, same size and
    resize mode, a data file of the right length, an index of this version with hashes of the current kind.
    None: decode everything."""
    index_file, data_file = paths.cache_index(split), paths.cache_data(split)
    if not (index_file.is_file() and data_file.is_file()):
        return None
    old = read_json(index_file)
    n = len(index["ids"])
    same = all(old.get(k) == index[k] for k in ("ids", "size", "resize"))
    if not same or any(len(old.get(k) or []) != n for k in ("paths", "files", "pixels", "hashes")):
        return None
    if old.get("hash") != HASH_SPEC:
        return None
    h, w = index["size"]
    return old if data_file.stat().st_size == max(n, 1) * h * w * 3 else None


def _changed_rows(old: dict, index: dict) -> list[int]:
    """Rows whose file, size or mtime differs from the index's (or that cannot be read: decoding names why)."""
    now, before = zip(index["paths"], index["files"]), zip(old["paths"], old["files"])
    return [i for i, (a, b) in enumerate(zip(now, before)) if a != b or a[1] is None]


def _log_build(log, split: str, index: dict, changed: int | None, seconds: float, options: CacheOptions) -> None:
    n, (h, w) = len(index["ids"]), index["size"]
    workers = options.workers or os.cpu_count() or 1
    if changed is None:
        log(f"  cache {split}: {n} images at {h}x{w} ({options.resize}) in {seconds:.1f}s, "
            f"{n / max(seconds, 1e-9):.0f} images/s with {workers} workers")
    else:
        log(f"  cache {split}: {changed} of {n} images changed on disk, re-decoded in {seconds:.1f}s")


def _decode_rows(data_file: Path, rows: list[int], files: list[str], options: CacheOptions, partial: bool,
                 progress) -> dict[int, tuple[str, str]]:
    """Decode `rows` of `files` into a new `data_file`, in parallel chunks of CHUNK rows; all or nothing.

    The new file starts blank, or (`partial`) as a copy of the current one: a copy costs
    about a second per GB, far less than decoding, and a process still reading the old
    file through its memmap keeps the pixels it started with.

    Returns:
        {row: (sha256 of its decoded pixels, hash_hex of its perceptual hash)} for every row decoded.
    """
    n = len(files)
    shape = (max(n, 1), *options.size, 3)  # a memmap cannot be empty: one blank row for an empty split
    workers = options.workers or os.cpu_count() or 1
    with atomic_path(data_file) as tmp:
        if partial:
            shutil.copyfile(data_file, tmp)
        else:
            np.memmap(tmp, np.uint8, "w+", shape=shape).flush()
        chunks = [rows[s:s + CHUNK] for s in range(0, len(rows), CHUNK)]
        tasks = (delayed(_decode_chunk)(tmp, shape, chunk, [files[i] for i in chunk], options) for chunk in chunks)
        bad, digests, done = [], {}, 0  # digests: {row: (pixel digest, hash)}
        shown = bar(total=len(rows), desc=f"decode {data_file.stem}", unit="img")  # a terminal's bar, else none
        for chunk_bad, chunk_digests, count in Parallel(n_jobs=min(workers, max(len(chunks), 1)),
                                                        return_as="generator")(tasks):
            bad += chunk_bad
            digests.update(chunk_digests)
            done += count
            shown.update(count)
            if len(chunks) > 1 and (done == len(rows) or done % (CHUNK * 16) == 0) and not bars_enabled():
                progress(done)  # the plain line, where there is no bar
        shown.close()
        if bad:
            raise StackerError(_bad_images_message(bad))
    return digests


def _decode_chunk(data_file: Path, shape: tuple, rows: list[int], files: list[str], options: CacheOptions):
    """Decode `files` into `rows` of the memmap of `shape` (N, H, W, 3), as `images.decode` does.

    Returns:
        (bad file messages, {row: (pixel digest, hash hex)}, rows done). The sha256 of a 224x224 row
        costs 0.13 ms and the perceptual hash 0.3 ms, against 7 ms to decode a 640x480 JPEG (one core
        of the 2-core CI box); at a cache size other than 224 px the hash's own draft decode adds about
        3 ms (docs/duplicates.md).
    """
    out = np.memmap(data_file, np.uint8, "r+", shape=shape)
    h, w = options.size
    bad, digests = [], {}
    for i, file in zip(rows, files):
        try:
            img = load_rgb(file, draft_size=(w, h))
            pixels = resize_image(img, options.size, options.resize)  # (H, W, 3) uint8
            row_hash = hash_hex(image_hash(_hash_source(file, img)))
        except StackerError as e:
            if not options.check_all:
                raise
            bad.append(str(e))
            continue
        out[i] = pixels
        digests[i] = (hashlib.sha256(np.ascontiguousarray(pixels)).hexdigest(), row_hash)
    out.flush()
    return bad, digests, len(rows)


def _hash_source(file, img):
    """The image a row's hash is taken from: `file` decoded at HASH_DRAFT, which is `img` (decoded for the
    cache) when the decoder reduced both by the same scale: two scales never give equal or swapped sizes."""
    size = decoded_size(file, HASH_DRAFT)
    return img if size and img.size in (size, size[::-1]) else load_rgb(file, draft_size=HASH_DRAFT)


def _bad_images_message(bad: list[str]) -> str:
    lines = "\n  ".join(bad)
    return f"{len(bad)} image(s) cannot be decoded:\n  {lines}"


def load_cache(paths: RunPaths, split: str) -> ImageCache:
    """A split's decoded images, memory-mapped, as the last complete build left them.

    Raises:
        StackerError: no complete cache, or one made before caches recorded their digest.
    """
    index_file = paths.cache_index(split)
    if not index_file.is_file():
        raise StackerError(f"{index_file}: image cache not found; run train-base first")
    index = read_json(index_file)
    if "digest" not in index:
        raise StackerError(f"{index_file}: an image cache of an older version (no digest); run train-base")
    n, (h, w) = len(index["ids"]), index["size"]
    images = np.memmap(paths.cache_data(split), np.uint8, "r", shape=(max(n, 1), h, w, 3))[:n]
    hashes = hash_table(index["hashes"]) if index.get("hash") == HASH_SPEC and "hashes" in index else None
    return ImageCache(images, np.asarray(index["ids"], dtype=object), index["digest"], index["resize"],
                      np.asarray(index.get("pixels") or [], dtype=object), hashes)
