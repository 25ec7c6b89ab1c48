"""Small images of train and test rows for the audit, read from the run's uint8 cache.

The cache is `RunPaths.cache_data(split)`, raw (N, H, W, 3) uint8 bytes, and its index
`RunPaths.cache_index(split)` (ids, size): read here as a numpy memmap, so a page of
thumbnails touches only the rows it shows and this side of the toolkit needs neither torch
nor `base_models`. Each thumbnail is box-downsampled to at most `MAX_SIDE` pixels and embedded
as a data URI (PNG, or JPEG when the PNG is large), within a count and a byte budget.
"""
from __future__ import annotations

import base64
import io
import math
from dataclasses import dataclass, field

import numpy as np

from oof import RunPaths, read_json
from oof.paths import CACHE_SPLITS

MAX_SIDE = 64
MAX_THUMBNAILS = 200
MAX_BYTES = 1_900_000  # the images' data URIs on a page: with their markup, under 2 MB added to it
PNG_LIMIT = 6_000  # a PNG above this many bytes (a photo) is sent as JPEG instead


def downsample(image: np.ndarray, side: int = MAX_SIDE) -> np.ndarray:
    """(h, w, 3) uint8 reduced by the smallest integer factor that brings both sides to <= `side`, each output
    pixel the mean of its block (no upscaling)."""
    h, w = image.shape[:2]
    f = math.ceil(max(h, w) / side)
    if f <= 1:
        return image
    h2, w2 = h // f, w // f
    blocks = image[:h2 * f, :w2 * f].reshape(h2, f, w2, f, 3).astype(np.float32)
    return np.round(blocks.mean(axis=(1, 3))).astype(np.uint8)


def encode(image: np.ndarray) -> str:
    """A data URI of the uint8 image: PNG, or JPEG (quality 85) when the PNG would pass `PNG_LIMIT` bytes."""
    from PIL import Image  # matplotlib's own dependency

    picture = Image.fromarray(np.ascontiguousarray(image), "RGB")
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    kind = "png"
    if buffer.tell() > PNG_LIMIT:
        buffer = io.BytesIO()
        picture.save(buffer, format="JPEG", quality=85)
        kind = "jpeg"
    return f"data:image/{kind};base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"


class CachedSplit:
    """One split of the run's image cache, read lazily: None when the run has no cache (tables from other
    tools) or it does not hold the id."""

    def __init__(self, paths: RunPaths, split: str):
        self.index, self.images = {}, None
        index_file, data = paths.cache_index(split), paths.cache_data(split)
        if not (index_file.is_file() and data.is_file()):
            return
        meta = read_json(index_file)
        h, w = meta["size"]
        n = len(meta["ids"])
        if n == 0 or data.stat().st_size != n * h * w * 3:
            return  # a cache being rebuilt: show no image rather than a wrong one
        self.images = np.memmap(data, dtype=np.uint8, mode="r", shape=(n, h, w, 3))
        self.index = {str(i): k for k, i in enumerate(meta["ids"])}

    def image(self, image_id) -> np.ndarray | None:
        row = self.index.get(str(image_id))
        return None if row is None else np.asarray(self.images[row])


@dataclass
class Thumbnails:
    """The thumbnails of one page, within `MAX_THUMBNAILS` images and `MAX_BYTES` bytes in all."""

    paths: RunPaths
    max_count: int = MAX_THUMBNAILS
    max_bytes: int = MAX_BYTES
    count: int = 0
    bytes: int = 0
    left_out: int = 0
    shown: set = field(default_factory=set)  # (train) ids drawn so far
    _splits: dict = field(default_factory=dict)

    @property
    def available(self) -> bool:
        """Whether the run has a cache to draw from (a run of other tools' tables has none)."""
        return any(self._split(s).images is not None for s in CACHE_SPLITS)

    def _split(self, split: str) -> CachedSplit:
        if split not in self._splits:
            self._splits[split] = CachedSplit(self.paths, split)
        return self._splits[split]

    def uri(self, split: str, image_id) -> str | None:
        """The image's data URI; None when the cache lacks it or the page's budget is spent (counted in
        `left_out`)."""
        image = self._split(split).image(image_id)
        if image is None:
            return None
        if self.count >= self.max_count:
            self.left_out += 1
            return None
        uri = encode(downsample(image))
        if self.bytes + len(uri) > self.max_bytes:
            self.left_out += 1
            return None
        self.count += 1
        self.bytes += len(uri)
        if split == "train":
            self.shown.add(str(image_id))
        return uri
