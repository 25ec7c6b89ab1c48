"""Photo-like images for the benches: random fields with a photo's spectrum, and a Paddy-shaped dataset of them.

`photo` draws one image: its own 1/f^beta field (beta 1.6-2.6; a luma and two weaker chroma channels),
part of a shared scene field (0-50% of the variance, so that images of one "field" look alike, as in
Paddy), a brighter top and a fine sensor noise. The spectrum is scale-free, so an image drawn small and
enlarged has the statistics of one drawn large. bench/dup_bench.py hashes these; bench/paddy_scale.py
trains on `write_paddy_dataset`'s.
"""
from __future__ import annotations

import multiprocessing
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

# Paddy Doctor's train set: 10,407 images in 10 classes, 3,469 test images, 480x640 JPEGs.
PADDY_CLASSES = {"normal": 1764, "blast": 1738, "hispa": 1594, "dead_heart": 1442, "tungro": 1088,
                 "brown_spot": 965, "downy_mildew": 620, "bacterial_leaf_blight": 479,
                 "bacterial_leaf_streak": 380, "bacterial_panicle_blight": 337}
PADDY_TEST = 3469
PADDY_VARIETIES = ("ADT45", "KarnatakaPonni", "Ponni", "AtchayaPonni", "Zonal", "AndraPonni", "Onthanel",
                   "IR20", "RR", "Surya")
PADDY_SHAPE = (480, 640)  # (h, w) of the files
DRAW_SHAPE = (120, 160)   # (h, w) the fields are drawn at before enlarging: 16x fewer pixels to synthesise


def scene_layouts(rng, h: int, w: int, n_scenes: int = 50) -> np.ndarray:
    """(n_scenes, h, w, 3) float32 fields the photos share part of (a rice field seen from similar places)."""
    return np.stack([_field(rng, h, w, 2.0) for _ in range(n_scenes)])


def _field(rng, h: int, w: int, beta: float) -> np.ndarray:
    """(h, w, 3) float32, unit variance: a random field of spectrum 1/f^beta; luma strong, chroma weaker."""
    fy, fx = np.fft.fftfreq(h)[:, None], np.fft.rfftfreq(w)[None, :]
    f = np.hypot(fx * w / 640, fy * h / 480)  # frequencies in cycles per 480x640 pixel: scale-free sizes agree
    f[0, 0] = 1.0
    amp = (f ** (-beta / 2)).astype(np.float32)
    amp[0, 0] = 0.0
    z = (rng.standard_normal((3, h, w // 2 + 1), dtype=np.float32)
         + 1j * rng.standard_normal((3, h, w // 2 + 1), dtype=np.float32)) * amp
    out = np.fft.irfft2(z, s=(h, w)).astype(np.float32)
    out /= out.reshape(3, -1).std(axis=1)[:, None, None]
    luma, cb, cr = out[0], 0.35 * out[1], 0.35 * out[2]
    return np.stack([luma + 1.4 * cr, luma - 0.34 * cb - 0.71 * cr, luma + 1.77 * cb], axis=-1)


def photo(rng, h: int, w: int, scenes: np.ndarray) -> np.ndarray:
    """One photo-like (h, w, 3) uint8 image: its own field, part of a shared scene, a light-from-above layout,
    a fine sensor noise."""
    own = _field(rng, h, w, float(rng.uniform(1.6, 2.6)))
    s = float(rng.uniform(0.0, 0.5))
    scene = scenes[rng.integers(len(scenes))]  # (h, w, 3)
    layout = np.linspace(0.6, -0.6, h, dtype=np.float32)[:, None, None]  # brighter top, as daylight
    img = np.sqrt(1 - s) * own + np.sqrt(s) * scene + layout
    img = img * rng.uniform(25, 50) + rng.uniform(90, 150) + rng.normal(0, 3, (h, w, 3)).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def class_cue(label: int, h: int, w: int, rng) -> np.ndarray:
    """(h, w, 3) float32 additive cue of class `label`: a colour cast and a few spots of the class's own
    colour and size at random places (disease lesions), weak against the scene so a CNN must learn it."""
    cue_rng = np.random.default_rng(1000 + label)  # the class's colours and spot size are fixed per class
    cast = cue_rng.normal(0, 6, 3).astype(np.float32)
    spot_colour = cue_rng.normal(0, 40, 3).astype(np.float32)
    radius = float(cue_rng.uniform(0.02, 0.06)) * w
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    out = np.broadcast_to(cast, (h, w, 3)).copy()
    for _ in range(int(rng.integers(2, 6))):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        out += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * radius ** 2))[..., None] * spot_colour
    return out


def _write_chunk(args) -> None:
    """Write the (path, label, seed) rows of one worker's chunk as 480x640 JPEGs of quality 90."""
    rows, scene_seed = args
    scenes = scene_layouts(np.random.default_rng(scene_seed), *DRAW_SHAPE)
    for path, label, seed in rows:
        rng = np.random.default_rng(seed)
        small = photo(rng, *DRAW_SHAPE, scenes).astype(np.float32) + class_cue(label, *DRAW_SHAPE, rng)
        img = Image.fromarray(np.clip(small, 0, 255).astype(np.uint8)).resize(PADDY_SHAPE[::-1], Image.BICUBIC)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        img.save(path, format="JPEG", quality=90)


def write_paddy_dataset(out: str | Path, n_test: int = PADDY_TEST, scale: float = 1.0, seed: int = 0,
                        workers: int | None = None) -> Path:
    """Paddy Doctor's layout under `out`: train_images/<label>/<id>.jpg, test_images/<id>.jpg, train.csv
    (image_id, label, variety), sample_submission.csv (image_id, label) and test_labels.csv (kept aside).

    `scale` shrinks every class count (0.01 for a tiny set). Written once: a folder holding
    sample_submission.csv (written last) is kept as it is.
    """
    out = Path(out)
    if (out / "sample_submission.csv").is_file():
        return out
    rng = np.random.default_rng(seed)
    labels = [c for c, n in PADDY_CLASSES.items() for _ in range(max(2, round(n * scale)))]
    classes = list(PADDY_CLASSES)
    variety_p = np.array([0.66, 0.08, 0.06, 0.04, 0.04, 0.03, 0.03, 0.02, 0.02, 0.02])
    train = pd.DataFrame({"image_id": [f"{100000 + i}.jpg" for i in range(len(labels))], "label": labels,
                          "variety": rng.choice(PADDY_VARIETIES, len(labels), p=variety_p)})
    train = train.sample(frac=1.0, random_state=seed).reset_index(drop=True)
    n_test = max(2, round(n_test * scale)) if scale != 1.0 else n_test
    weights = np.array(list(PADDY_CLASSES.values()), dtype=float)
    test = pd.DataFrame({"image_id": [f"{200000 + i}.jpg" for i in range(n_test)],
                         "label": rng.choice(classes, n_test, p=weights / weights.sum())})
    rows = [(str(out / "train_images" / r.label / r.image_id), classes.index(r.label), seed * 10**7 + i)
            for i, r in enumerate(train.itertuples())]
    rows += [(str(out / "test_images" / r.image_id), classes.index(r.label), seed * 10**7 + len(train) + i)
             for i, r in enumerate(test.itertuples())]
    workers = workers or multiprocessing.cpu_count()
    chunks = [(rows[i::workers * 8], seed) for i in range(workers * 8)]
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        pool.map(_write_chunk, chunks)
    train.to_csv(out / "train.csv", index=False)
    test.to_csv(out / "test_labels.csv", index=False)
    test.assign(label=classes[0]).to_csv(out / "sample_submission.csv", index=False)  # last: marks completion
    return out
