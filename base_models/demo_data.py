"""The bundled demo dataset: scikit-learn's handwritten digits as a Kaggle competition.

scikit-learn ships the 1,797 8x8 digit images inside its package, so the demo
needs no download. They are upscaled and written as PNG files in the Kaggle
folder layout, with `train.csv` and `sample_submission.csv`; the test labels
are kept aside in `test_labels.csv`, which no stage reads.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from oof import write_text


def write_digits_dataset(out: str | Path, size: int = 32, test_fraction: float = 0.2, seed: int = 0,
                         n_images: int | None = None) -> Path:
    """Write the digits dataset under `out`; returns `out`. Skips work already done.

    Args:
        out: dataset folder.
        size: side of the upscaled square images.
        test_fraction: share of the images held out as the test set.
        seed: seed of the train/test split.
        n_images: only the first n images (tests use a few hundred).
    """
    from sklearn.datasets import load_digits  # ships with scikit-learn, no network

    out = Path(out)
    if (out / "sample_submission.csv").is_file():
        return out
    digits = load_digits()
    n = len(digits.target) if n_images is None else min(n_images, len(digits.target))
    rng = np.random.default_rng(seed)
    is_test = np.zeros(n, dtype=bool)
    is_test[rng.permutation(n)[: int(round(n * test_fraction))]] = True
    ids = [f"{i:05d}.png" for i in range(n)]
    labels = [str(t) for t in digits.target[:n]]
    for i in range(n):
        pixels = (digits.images[i] * (255.0 / 16.0)).round().astype(np.uint8)  # (8, 8), 0..16 -> 0..255
        img = Image.fromarray(pixels, "L").resize((size, size), Image.BICUBIC)
        folder = out / "test_images" if is_test[i] else out / "train_images" / labels[i]
        folder.mkdir(parents=True, exist_ok=True)
        img.save(folder / ids[i], format="PNG")  # plain writes: sample_submission.csv, last, marks completion
    train = pd.DataFrame({"image_id": ids, "label": labels})[~is_test]
    test = pd.DataFrame({"image_id": ids, "label": labels})[is_test]
    write_text(out / "train.csv", train.to_csv(index=False))
    write_text(out / "test_labels.csv", test.to_csv(index=False))
    # Written last: its presence marks a complete dataset.
    write_text(out / "sample_submission.csv", test.assign(label=labels[0]).to_csv(index=False))
    return out
