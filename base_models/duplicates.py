"""Near-duplicate images: a perceptual hash per decoded image, near pairs by Hamming distance, capped clusters.

The hash (`dct256`, pHash-style) is the sign pattern of an image's low spatial frequencies: grayscale, box
downsample to 32x32, 2-D DCT, the 16x16 lowest-frequency block thresholded at its median, 256 bits packed
into four uint64 words. Resizing, recompression and brightness changes move it by under 16 bits; a crop
of 2% or more moves it by about as much as the demo's nearest distinct digits are apart, so at the default
threshold crops are mostly not found. docs/duplicates.md has the measurements behind the hash and defaults.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from PIL import Image
from scipy.fft import dctn

from oof import StackerError, write_text

HASH_SPEC = {"kind": "dct256", "version": 1}  # recorded in the cache index: another spec is re-hashed
HASH_SIDE = 32  # the grayscale downsample the DCT sees (a fixed size: the hash ignores the cache size)
HASH_BLOCK = 16  # the lowest HASH_BLOCK x HASH_BLOCK frequencies make the bits
HASH_BITS = HASH_BLOCK * HASH_BLOCK
HASH_WORDS = HASH_BITS // 64
PAIR_KINDS = ("train", "train-test", "test")
PAIR_COLUMNS = ["kind", "id_a", "id_b", "distance", "label_a", "label_b", "conflict"]
_BLOCK_ROWS = 128  # rows compared at once: (128, 14k) uint64 per word is 14 MB
_POPCOUNT8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


@dataclass(frozen=True)
class DuplicateOptions:
    """When two images are near-duplicates, and how far clusters may grow.

    Attributes:
        max_distance: Hamming distance (of the hash's 256 bits) at or below which two images are
            near-duplicates. 20: every resized (0.5-0.9x), recompressed (JPEG 60-95) and brightened or
            darkened (10-20%) copy is within 16 bits of its source, the demo's nearest distinct digits are
            24 bits apart (and distinct photo-like images 50 or more): docs/duplicates.md. Crops of 2% or
            more move the hash by about as much as a different digit, so most are not found.
        max_cluster: a cluster is not merged past this many train images (a warning names it): near
            pairs chain, and one giant group would unbalance the folds. Copies come in twos and threes;
            16 rows is under 1% of a Paddy fold.
    """

    max_distance: int = 20
    max_cluster: int = 16

    def __post_init__(self):
        if not 0 <= int(self.max_distance) < HASH_BITS:
            raise StackerError(f"duplicates: max_distance {self.max_distance} is not in [0, {HASH_BITS})")
        if int(self.max_cluster) < 2:
            raise StackerError(f"duplicates: max_cluster {self.max_cluster} is under 2 (a cluster is a pair or more)")


@dataclass(frozen=True)
class Duplicates:
    """The near-duplicates of a dataset.

    Attributes:
        cluster: (N_train,) int64, each train row's cluster number (0, 1, ... in order of the cluster's first
            row), -1 for a row with no duplicate in train.
        pairs: every near-duplicate pair found, columns PAIR_COLUMNS: kind ("train", "train-test", "test"),
            id_a, id_b (a train id first in a train-test pair), distance (bits; 0 also for equal pixels),
            label_a, label_b ("" for a test image), conflict (a train pair with different labels). Ordered
            by kind, distance, then row.
        warnings: one line per capped cluster.
    """

    cluster: np.ndarray
    pairs: pd.DataFrame
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line: train images in clusters, the largest, label conflicts, train images also in test."""
        clustered = self.cluster[self.cluster >= 0]
        sizes = np.bincount(clustered) if clustered.size else np.zeros(0, dtype=np.int64)
        kind = self.pairs["kind"]
        in_test = self.pairs.loc[kind == "train-test", "id_a"].nunique()
        line = (f"duplicates: {clustered.size} train images in {sizes.size} clusters "
                f"(largest {int(sizes.max()) if sizes.size else 0}), {int(self.pairs['conflict'].sum())} label "
                f"conflicts, {in_test} train images also in test, {int((kind == 'test').sum())} test pairs")
        return line + (f", {len(self.warnings)} clusters capped" if self.warnings else "")


def image_hash(img: Image.Image) -> np.ndarray:
    """The dct256 hash of one image (any size or mode); returns (HASH_WORDS,) uint64."""
    gray = np.asarray(img.convert("L").resize((HASH_SIDE, HASH_SIDE), Image.BOX), dtype=np.float64)
    block = dctn(gray, type=2, norm="ortho")[:HASH_BLOCK, :HASH_BLOCK].ravel()  # (256,), DC first
    return _pack(block > np.median(block))


def _pack(bits: np.ndarray) -> np.ndarray:
    """(..., HASH_BITS) bool to (..., HASH_WORDS) uint64, first bit the high bit of the first word."""
    return np.packbits(bits, axis=-1).view(">u8").astype(np.uint64)


def hash_hex(words) -> str:
    """A hash's words as the hex string the cache index stores (16 digits a word)."""
    return "".join(f"{int(w):016x}" for w in np.asarray(words, dtype=np.uint64))


def hash_words(text: str) -> np.ndarray:
    """The inverse of hash_hex: (W,) uint64.

    Raises:
        StackerError: not a string of 16 hex digits per word.
    """
    if not isinstance(text, str) or not text or len(text) % 16:
        raise StackerError(f"image hash {text!r} is not a string of 16 hex digits per word")
    try:
        return np.array([int(text[s:s + 16], 16) for s in range(0, len(text), 16)], dtype=np.uint64)
    except ValueError:
        raise StackerError(f"image hash {text!r} is not hexadecimal") from None


def hash_table(texts) -> np.ndarray:
    """Many hash_hex strings of one width as (N, W) uint64 (the cache index's "hashes").

    Raises:
        StackerError: a string that is not hex, or hashes of different widths.
    """
    texts = list(texts)
    if not texts:
        return np.zeros((0, HASH_WORDS), dtype=np.uint64)
    width = len(texts[0])
    if width == 0 or width % 16 or any(not isinstance(t, str) or len(t) != width for t in texts):
        raise StackerError(f"image hashes are not all strings of {width} hex digits (16 a word)")
    try:
        raw = bytes.fromhex("".join(texts))
    except ValueError:
        raise StackerError("image hashes are not all hexadecimal") from None
    return np.frombuffer(raw, dtype=">u8").astype(np.uint64).reshape(len(texts), width // 16)


def popcount(words: np.ndarray) -> np.ndarray:
    """Set bits per uint64 element, as uint8 (np.bitwise_count on numpy >= 2, a byte table before)."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(words)
    as_bytes = _POPCOUNT8[np.ascontiguousarray(words).view(np.uint8)]
    return as_bytes.reshape(*words.shape, 8).sum(axis=-1, dtype=np.uint8)


def near_pairs(hashes: np.ndarray, max_distance: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair of rows i < j whose hashes are at most `max_distance` bits apart.

    Args:
        hashes: (M, W) uint64.

    Returns:
        (a, b, distance), each (P,) int64, ordered by a then b. About 1.5 s for 14k rows (1e8 pairs) on
        one core of the 2-core box.
    """
    hashes = np.ascontiguousarray(hashes, dtype=np.uint64)
    found_a, found_b, found_d = [], [], []
    for s in range(0, len(hashes), _BLOCK_ROWS):
        e = min(s + _BLOCK_ROWS, len(hashes))
        rows, cols = hashes[s:e], hashes[s:]
        dist = np.zeros((e - s, len(cols)), dtype=np.uint16)  # (B, M - s)
        for w in range(hashes.shape[1]):
            dist += popcount(rows[:, None, w] ^ cols[None, :, w])
        dist[np.tril_indices(e - s, 0, len(cols))] = np.iinfo(np.uint16).max  # j <= i: self and seen pairs
        a, b = np.nonzero(dist <= max_distance)
        found_a.append(a + s)
        found_b.append(b + s)
        found_d.append(dist[a, b])
    if not found_a:
        return (np.zeros(0, dtype=np.int64),) * 3
    return tuple(np.concatenate(x).astype(np.int64) for x in (found_a, found_b, found_d))


def _equal_pixel_pairs(pixels: list) -> tuple[np.ndarray, np.ndarray]:
    """Row pairs i < j with the same (non-empty) pixel digest; each (P,) int64."""
    rows: dict[str, list[int]] = {}
    for i, digest in enumerate(pixels):
        if digest:
            rows.setdefault(digest, []).append(i)
    pairs = [(r[x], r[y]) for r in rows.values() for x in range(len(r)) for y in range(x + 1, len(r))]
    out = np.array(pairs, dtype=np.int64).reshape(-1, 2)
    return out[:, 0], out[:, 1]


@dataclass(frozen=True)
class SplitImages:
    """One split's images as the finder reads them.

    Attributes:
        ids: (N,) image ids.
        labels: (N,) class labels; None for test (its pairs show "" as the label).
        hashes: (N, W) uint64, as ImageCache.hashes; None only for an empty split.
        pixels: (N,) pixel sha256 per row, as ImageCache.pixel_digests; None: no exact-pixel check.
    """

    ids: object
    labels: object
    hashes: object
    pixels: object = None


def find_duplicates(train: SplitImages, test: SplitImages, options: DuplicateOptions = DuplicateOptions()
                    ) -> Duplicates:
    """The near-duplicate pairs within train, between train and test and within test; clusters of train rows.

    Two images pair when their hashes are within `options.max_distance` bits, or when their pixel digests
    are equal (distance 0). Train pairs merge into clusters in order of increasing distance; a merge that
    would pass `options.max_cluster` images is refused and the cluster named in a warning. Train-test and
    test pairs are listed, never clustered; test labels are ignored.

    Raises:
        StackerError: inputs of mismatched lengths or hash widths.
    """
    train_ids, test_ids = [str(i) for i in train.ids], [str(i) for i in test.ids]
    n, t = len(train_ids), len(test_ids)
    train_hashes, test_hashes = _check_hashes("train", train.hashes, n), _check_hashes("test", test.hashes, t)
    if train_hashes.shape[1] != test_hashes.shape[1]:
        raise StackerError(f"duplicates: train hashes of {train_hashes.shape[1]} words, test hashes of "
                           f"{test_hashes.shape[1]}: hashes of different kinds")
    labels = [str(x) for x in (train.labels if train.labels is not None else [])] + [""] * t
    if len(labels) != n + t:
        raise StackerError(f"duplicates: {len(labels) - t} train labels for {n} train ids")
    pixels = _check_pixels("train", train.pixels, n) + _check_pixels("test", test.pixels, t)
    # Rows 0..n-1 are train, n..n+t-1 test.
    a, b, d = _all_pairs(np.concatenate([train_hashes, test_hashes]), pixels, options.max_distance)
    kind = (a >= n).astype(np.int64) + (b >= n)  # 0 train, 1 train-test (a < b, so a is train), 2 test
    order = np.lexsort((b, a, d, kind))
    a, b, d, kind = a[order], b[order], d[order], kind[order]
    ids, lab = np.asarray(train_ids + test_ids, dtype=object), np.asarray(labels, dtype=object)
    pairs = pd.DataFrame({"kind": np.asarray(PAIR_KINDS, dtype=object)[kind], "id_a": ids[a], "id_b": ids[b],
                          "distance": d, "label_a": lab[a], "label_b": lab[b],
                          "conflict": (kind == 0) & (lab[a] != lab[b])}, columns=PAIR_COLUMNS)
    within = kind == 0
    cluster, capped = _clusters((a[within], b[within], d[within]), n, options.max_cluster, train_ids)
    return Duplicates(cluster, pairs, capped)


def _all_pairs(hashes: np.ndarray, pixels: list, max_distance: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs a < b within `max_distance` bits or of equal pixel digests, once each at their smallest distance."""
    a, b, d = near_pairs(hashes, max_distance)
    ea, eb = _equal_pixel_pairs(pixels)
    a, b, d = np.concatenate([ea, a]), np.concatenate([eb, b]), np.concatenate([np.zeros_like(ea), d])
    order = np.lexsort((d, b, a))
    a, b, d = a[order], b[order], d[order]
    first = np.ones(len(a), dtype=bool)
    first[1:] = (a[1:] != a[:-1]) | (b[1:] != b[:-1])
    return a[first], b[first], d[first]


def _check_hashes(split: str, hashes, n: int) -> np.ndarray:
    """(n, W) uint64, or a StackerError naming the split; None only for an empty split."""
    hashes = np.asarray(hashes if hashes is not None else np.zeros((0, HASH_WORDS)), dtype=np.uint64)
    if hashes.ndim != 2 or len(hashes) != n:
        raise StackerError(f"duplicates: {split} hashes of shape {hashes.shape} for {n} {split} ids; "
                           f"expected ({n}, W)")
    return hashes


def _check_pixels(split: str, pixels, n: int) -> list:
    if pixels is None:
        return [None] * n
    pixels = list(pixels)
    if len(pixels) != n:
        raise StackerError(f"duplicates: {len(pixels)} {split} pixel digests for {n} {split} ids")
    return pixels


def _clusters(pairs: tuple, n: int, max_cluster: int, ids: list[str]) -> tuple[np.ndarray, list[str]]:
    """Union-find over train pairs (a, b, distance), taken in order of increasing distance, no set past
    `max_cluster`.

    Returns:
        ((n,) int64 cluster per row, -1 alone; one warning per capped cluster).
    """
    a, b, d = pairs
    parent, size = np.arange(n), np.ones(n, dtype=np.int64)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    refused = []
    for i in np.lexsort((b, a, d)):  # increasing distance, then row: the same pairs merge the same way
        ra, rb = root(a[i]), root(b[i])
        if ra == rb:
            continue
        if size[ra] + size[rb] > max_cluster:
            refused.append(i)
            continue
        ra, rb = (ra, rb) if size[ra] >= size[rb] else (rb, ra)
        parent[rb], size[ra] = ra, size[ra] + size[rb]
    roots = np.array([root(i) for i in range(n)], dtype=np.int64)
    grouped = np.bincount(roots, minlength=n)[roots] > 1
    _, first_rows = np.unique(roots[grouped], return_index=True)  # each cluster's first row
    number = {roots[grouped][r]: k for k, r in enumerate(np.sort(first_rows))}
    cluster = np.full(n, -1, dtype=np.int64)
    cluster[grouped] = [number[r] for r in roots[grouped]]
    return cluster, _capped_warnings([(a[i], b[i], d[i]) for i in refused], cluster, max_cluster, ids)


def _capped_warnings(refused: list[tuple], cluster: np.ndarray, max_cluster: int, ids: list[str]) -> list[str]:
    """One line per cluster that refused a merge (a, b, distance): the larger side of each refused pair."""
    sizes = np.bincount(cluster[cluster >= 0], minlength=1)
    by_cluster: dict[int, list[tuple]] = {}
    for a, b, d in refused:
        ca, cb = int(cluster[a]), int(cluster[b])  # a refused merge: at least one side is a cluster
        size_a, size_b = (sizes[c] if c >= 0 else 1 for c in (ca, cb))
        big = ca if (size_a, -ca) >= (size_b, -cb) else cb
        by_cluster.setdefault(big, []).append((a, b, d))
    lines = []
    for number, pairs in sorted(by_cluster.items()):
        members = np.flatnonzero(cluster == number)
        shown = ", ".join(ids[m] for m in members[:5]) + (", ..." if len(members) > 5 else "")
        a, b, d = pairs[0]
        lines.append(f"duplicates: cluster {number} ({len(members)} train images: {shown}) reached max_cluster="
                     f"{max_cluster}; {len(pairs)} near pair(s) to other images not merged, e.g. "
                     f"{ids[a]} ~ {ids[b]} at distance {int(d)}")
    return lines


def write_duplicates(path, found: Duplicates) -> None:
    """Write `found.pairs` as a CSV listing, atomically."""
    write_text(path, found.pairs.to_csv(index=False))
