"""Bench: the near-duplicate hash's recall on planted copies, false pairs among distinct images, and its cost.

    python bench/dup_bench.py [--distinct 13876] [--sources 200] [--imagehash] [--skip-digits]

Distinct images: photo-like random fields (a 1/f^beta spectrum per image, beta 1.6-2.6, a luma and two
chroma channels, a shared scene layout and 50 shared scene fields mixed in at 0-50% of the variance, so
that images of one "field" look alike as in Paddy), Paddy's count by default (10,407 train + 3,469 test).
They are drawn at 120x160: the spectrum is scale-free, so their 32x32 downsample, all the hash sees, is
distributed as a 480x640's would be, and 13,876 of them take about a minute instead of twenty.

Planted copies: `--sources` images drawn at 480x640, saved as JPEG quality 90 (the dataset's file), and
each transformation of TRANSFORMS saved as a second JPEG; both files are hashed as the cache hashes them
(decoded at HASH_DRAFT). Recall at a threshold is the share of copies within it of their source.

The demo's digits: scikit-learn's 1,797 digits written by `write_digits_dataset` at 32 px (the demo)
and 16 px (the tests), hashed from the PNG files: exact pixel duplicates, the nearest distinct pairs'
distances, and the pairs under each threshold (none allowed: the demo's folds must not change).

`--imagehash` (pip install imagehash; not a dependency of the package) repeats recall, false pairs and
speed for imagehash's phash (64 bits) and the a/p/d/w-hash combination (four 64-bit hashes, distances
summed).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from base_models.cache import HASH_DRAFT  # noqa: E402
from base_models.duplicates import _pack, image_hash, near_pairs, popcount  # noqa: E402
from base_models.images import load_rgb  # noqa: E402
from bench.photos import photo, scene_layouts  # noqa: E402

THRESHOLDS = (8, 12, 16, 20, 24, 28, 32, 40)  # bits of 256
THRESHOLDS_64 = (2, 4, 6, 8, 10, 12)  # bits of imagehash's 64-bit phash
PADDY = 10_407 + 3_469


def _resize(f):
    return lambda img, rng: img.resize((round(img.width * f), round(img.height * f)), Image.BICUBIC)


def _crop(p):
    def crop(img, rng):
        cw, ch = round(img.width * p), round(img.height * p)  # p of each side's length removed in all
        x, y = int(rng.integers(0, cw + 1)), int(rng.integers(0, ch + 1))
        return img.crop((x, y, img.width - (cw - x), img.height - (ch - y)))
    return crop


def _bright(f):
    return lambda img, rng: ImageEnhance.Brightness(img).enhance(f)


def _chain(*steps):
    def chain(img, rng):
        for step in steps:
            img = step(img, rng)
        return img
    return chain


# name: (transformation of the PIL image, JPEG quality of the copy's file)
TRANSFORMS = {
    "jpeg q90 again": (_chain(), 90),
    "resize 0.5": (_resize(0.5), 90),
    "resize 0.7": (_resize(0.7), 90),
    "resize 0.9": (_resize(0.9), 90),
    "jpeg q60": (_chain(), 60),
    "jpeg q75": (_chain(), 75),
    "jpeg q95": (_chain(), 95),
    "crop 2%": (_crop(0.02), 90),
    "crop 4%": (_crop(0.04), 90),
    "crop 6%": (_crop(0.06), 90),
    "brightness -20%": (_bright(0.8), 90),
    "brightness -10%": (_bright(0.9), 90),
    "brightness +10%": (_bright(1.1), 90),
    "brightness +20%": (_bright(1.2), 90),
    "resize 0.7 + q75": (_resize(0.7), 75),
    "crop 4% + bright +15%": (_chain(_crop(0.04), _bright(1.15)), 90),
    "resize 0.6 + crop 3% + bright -15% + q70": (_chain(_resize(0.6), _crop(0.03), _bright(0.85)), 70),
    "resize 0.5 + crop 6% + bright +20% + q60": (_chain(_resize(0.5), _crop(0.06), _bright(1.2)), 60),
}


def distinct_hashes(n: int, seed: int, methods: dict) -> tuple[dict, float]:
    """Hashes of n distinct photo-like images at 120x160, per method; and the seconds generating them took."""
    rng = np.random.default_rng(seed)
    scenes = scene_layouts(rng, 120, 160)
    out = {name: [] for name in methods}
    gen = 0.0
    for _ in range(n):
        t0 = time.perf_counter()
        img = Image.fromarray(photo(rng, 120, 160, scenes))
        gen += time.perf_counter() - t0
        for name, fn in methods.items():
            out[name].append(fn(img))
    return {name: np.stack(v) for name, v in out.items()}, gen


def _jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def copy_distances(n_sources: int, seed: int, methods: dict, folder: Path) -> dict:
    """{method: {transform: (n_sources,) distances between a source's file and its copy's file}}."""
    rng = np.random.default_rng(seed)
    scenes = scene_layouts(rng, 480, 640, 5)
    dist = {m: {t: [] for t in TRANSFORMS} for m in methods}
    for k in range(n_sources):
        src = Image.fromarray(photo(rng, 480, 640, scenes))
        files = {"source": (src, 90), **{t: (fn(src, rng), q) for t, (fn, q) in TRANSFORMS.items()}}
        hashes = {}
        for name, (img, quality) in files.items():
            path = folder / f"{k}_{len(hashes)}.jpg"
            path.write_bytes(_jpeg(img, quality))
            decoded = load_rgb(path, draft_size=HASH_DRAFT)  # as the cache decodes the hash's source
            hashes[name] = {m: fn(decoded) for m, fn in methods.items()}
            path.unlink()
        for m in methods:
            for t in TRANSFORMS:
                dist[m][t].append(int(popcount(hashes["source"][m] ^ hashes[t][m]).sum()))
    return {m: {t: np.array(v) for t, v in d.items()} for m, d in dist.items()}


def pair_counts(hashes: np.ndarray, thresholds) -> tuple[list[int], np.ndarray]:
    """Pairs within each threshold, and each image's distance to its nearest other image."""
    a, b, d = near_pairs(hashes, max(thresholds))
    counts = [int((d <= t).sum()) for t in thresholds]
    return counts, d


def nearest_distances(hashes: np.ndarray, block: int = 256) -> np.ndarray:
    """(N,) each row's Hamming distance to its nearest other row."""
    out = np.empty(len(hashes), dtype=np.int64)
    for s in range(0, len(hashes), block):
        rows = hashes[s:s + block]
        dist = np.zeros((len(rows), len(hashes)), dtype=np.uint16)
        for w in range(hashes.shape[1]):
            dist += popcount(rows[:, None, w] ^ hashes[None, :, w])
        dist[np.arange(len(rows)), np.arange(s, s + len(rows))] = np.iinfo(np.uint16).max
        out[s:s + len(rows)] = dist.min(axis=1)
    return out


def digits_report(size: int, methods: dict, thresholds: dict) -> None:
    """The demo's digits at `size` px: exact duplicates, nearest distinct distances, pairs per threshold."""
    from base_models.demo_data import write_digits_dataset

    with tempfile.TemporaryDirectory() as tmp:
        root = write_digits_dataset(Path(tmp) / "digits", size=size)
        files = sorted(root.glob("*_images/**/*.png"))
        decoded = [load_rgb(f) for f in files]
    digests = [hashlib.sha256(np.asarray(img).tobytes()).hexdigest() for img in decoded]
    print(f"\ndigits at {size} px: {len(files)} images, {len(files) - len(set(digests))} exact pixel duplicates")
    for m, fn in methods.items():
        hashes = np.stack([fn(img) for img in decoded])
        nearest = nearest_distances(hashes)
        counts, _ = pair_counts(hashes, thresholds[m])
        q = np.percentile(nearest, [0, 1, 5, 50])
        print(f"  {m:>10}: nearest distinct min {q[0]:.0f}, 1% {q[1]:.0f}, 5% {q[2]:.0f}, median {q[3]:.0f}; "
              "pairs at <= " + ", ".join(f"{t}: {c}" for t, c in zip(thresholds[m], counts)))


def speed(methods: dict, seed: int, repeats: int = 200) -> None:
    """ms per image for each method on a 480x640 source decoded at HASH_DRAFT (320x240), and at full size."""
    rng = np.random.default_rng(seed)
    src = Image.fromarray(photo(rng, 480, 640, scene_layouts(rng, 480, 640, 1)))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.jpg"
        path.write_bytes(_jpeg(src, 90))
        draft, full = load_rgb(path, draft_size=HASH_DRAFT), load_rgb(path)
        print(f"\nhash cost per image (ms, one core), decoding the 480x640 JPEG: "
              f"draft {draft.width}x{draft.height} {_ms(lambda: load_rgb(path, HASH_DRAFT), repeats):.2f}, "
              f"full {_ms(lambda: load_rgb(path), repeats):.2f}")
    for m, fn in methods.items():
        a, b = _ms(lambda: fn(draft), repeats), _ms(lambda: fn(full), repeats)
        print(f"  {m:>10}: from {draft.width}x{draft.height} {a:.3f} ms ({1e3 / a:.0f} images/s, "
              f"{PADDY * a / 1e3:.1f} s at Paddy size), from 640x480 {b:.3f} ms")


def _ms(fn, repeats: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats * 1e3


def _recall_table(dist: dict, thresholds) -> None:
    print(f"{'transformation':>42} " + " ".join(f"<={t:<4}" for t in thresholds) + "  median  max")
    for t, d in dist.items():
        print(f"{t:>42} " + " ".join(f"{(d <= th).mean():6.3f}" for th in thresholds)
              + f"  {np.median(d):6.0f} {d.max():4d}")
    every = np.concatenate(list(dist.values()))
    print(f"{'all copies':>42} " + " ".join(f"{(every <= th).mean():6.3f}" for th in thresholds))


def imagehash_methods() -> dict:
    import imagehash

    def words(h):
        return _pack(h.hash.ravel())

    def combined(img):
        return np.concatenate([words(f(img)) for f in (imagehash.average_hash, imagehash.phash,
                                                       imagehash.dhash, imagehash.whash)])
    return {"phash": lambda img: words(imagehash.phash(img)), "a/p/d/w": combined}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--distinct", type=int, default=PADDY, help="distinct photo-like images")
    parser.add_argument("--sources", type=int, default=200, help="source images, each copied by every transform")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--imagehash", action="store_true", help="compare imagehash's phash and a/p/d/w")
    parser.add_argument("--skip-digits", action="store_true")
    args = parser.parse_args(argv)
    methods = {"dct256": image_hash, **(imagehash_methods() if args.imagehash else {})}
    thresholds = {m: THRESHOLDS_64 if m == "phash" else THRESHOLDS for m in methods}

    speed(methods, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        dist = copy_distances(args.sources, args.seed + 1, methods, Path(tmp))
        print(f"\nplanted copies: {args.sources} sources x {len(TRANSFORMS)} transformations "
              f"({time.perf_counter() - t0:.0f} s)")
    for m in methods:
        print(f"\nrecall, {m} (share of copies within the threshold of their source)")
        _recall_table(dist[m], thresholds[m])

    t0 = time.perf_counter()
    hashes, gen = distinct_hashes(args.distinct, args.seed + 2, methods)
    print(f"\ndistinct photo-like images: {args.distinct} ({gen:.0f} s to draw, "
          f"{time.perf_counter() - t0 - gen:.0f} s to hash)")
    for m in methods:
        t1 = time.perf_counter()
        counts, _ = pair_counts(hashes[m], thresholds[m])
        seconds = time.perf_counter() - t1
        nearest = nearest_distances(hashes[m])
        q = np.percentile(nearest, [0, 0.1, 1, 50])
        print(f"  {m:>10}: false pairs at <= " + ", ".join(f"{t}: {c}" for t, c in zip(thresholds[m], counts))
              + f"; nearest distinct min {q[0]:.0f}, 0.1% {q[1]:.0f}, 1% {q[2]:.0f}, median {q[3]:.0f}; "
              f"all pairs compared in {seconds:.1f} s")

    if not args.skip_digits:
        for size in (32, 16):
            digits_report(size, methods, thresholds)


if __name__ == "__main__":
    main()
