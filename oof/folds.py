"""Fold assignment: made once per run, checked by every stage.

`folds.parquet` holds one row per train image (`id`, `label`, `fold`) and, in
its parquet metadata, K, the seed, the classes in order and a sha256 over the
ids, labels and folds. Every base model and the meta level use these folds, so
no OOF prediction ever comes from a model that saw its row.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .atomic import atomic_path, read_csv_strings
from .errors import StackerError, preview
from .ids import check_unique

META_KEY = b"stacker"


@dataclass(frozen=True)
class Folds:
    """The fold assignment of a run.

    Attributes:
        table: one row per train image: `id` (str), `label` (str), `fold` (int in [0, k)).
        k: number of folds.
        seed: seed the assignment was drawn with (None for folds brought from elsewhere).
        classes: class names in the order every prediction table uses.
        sha256: digest of ids, labels and folds; prediction tables record it.
    """

    table: pd.DataFrame
    k: int
    seed: int | None
    classes: tuple[str, ...]
    sha256: str

    @property
    def ids(self) -> np.ndarray:
        return self.table["id"].to_numpy()

    @property
    def fold(self) -> np.ndarray:
        return self.table["fold"].to_numpy()

    @property
    def y(self) -> np.ndarray:
        """(N,) integer class index of each row, in `classes` order."""
        index = {c: i for i, c in enumerate(self.classes)}
        return self.table["label"].map(index).to_numpy(dtype=np.int64, copy=True)

    def train_rows(self, fold: int) -> np.ndarray:
        return np.flatnonzero(self.fold != fold)

    def valid_rows(self, fold: int) -> np.ndarray:
        return np.flatnonzero(self.fold == fold)


def folds_digest(ids, labels, folds) -> str:
    """sha256 over (id, label, fold) rows sorted by id: the same assignment in any row order has one digest."""
    h = hashlib.sha256()
    for i, y, f in sorted(zip(map(str, ids), map(str, labels), map(int, folds))):
        h.update(f"{i}\t{y}\t{f}\n".encode())
    return h.hexdigest()


def make_folds(ids, labels, k: int = 5, seed: int = 42, classes=None) -> Folds:
    """Stratified K-fold assignment, reproducible from the seed.

    Each class's rows are shuffled and dealt to the folds in turn, starting each
    class where the previous one stopped, so fold sizes differ by at most one.

    Args:
        ids: unique row ids.
        labels: class label of each row (compared as strings).
        k: number of folds, at least 2.
        seed: seed of the shuffle.
        classes: class order; default sorted labels.

    Raises:
        StackerError: duplicate ids, k < 2, or a class with fewer than k rows.
    """
    ids = np.asarray([str(i) for i in ids], dtype=object)
    labels = np.asarray([str(y) for y in labels], dtype=object)
    if not isinstance(k, (int, np.integer)) or k < 2:
        raise StackerError(f"folds: k must be an integer of at least 2, got {k!r}")
    classes = tuple(sorted(set(labels))) if classes is None else tuple(str(c) for c in classes)
    check_labelled_rows(ids, labels, classes, "train ids")
    unknown = sorted(set(labels) - set(classes))
    if unknown:
        raise StackerError(f"folds: labels {unknown} are not among the classes {list(classes)}")
    counts = pd.Series(labels).value_counts()
    small = counts[counts < k]
    if len(small):
        worst, fewest = small.idxmin(), int(small.min())
        fix = (f"k <= {fewest} would work" if fewest >= 2 else
               "a class needs at least 2 images for any K-fold: add images or drop the class")
        raise StackerError(f"folds: class {worst!r} has {fewest} images, fewer than k={k}; "
                           f"every class needs at least one image per fold ({fix})")
    rng = np.random.default_rng(seed)
    fold = np.empty(len(ids), dtype=np.int64)
    start = 0
    for c in classes:
        rows = np.flatnonzero(labels == c)
        rows = rows[rng.permutation(len(rows))]
        fold[rows] = (start + np.arange(len(rows))) % k
        start = (start + len(rows)) % k
    table = pd.DataFrame({"id": ids, "label": labels, "fold": fold})
    return Folds(table, int(k), seed, classes, folds_digest(ids, labels, fold))


def folds_from_table(table: pd.DataFrame, source: str, classes=None) -> Folds:
    """Folds brought from another tool: a table with `id`, `label`, `fold`."""
    missing = [c for c in ("id", "label", "fold") if c not in table.columns]
    if missing:
        raise StackerError(f"{source}: missing column(s) {missing}; a folds table has id, label, fold")
    ids = table["id"].astype(str).to_numpy(dtype=object)
    labels = table["label"].astype(str).to_numpy(dtype=object)
    classes = tuple(sorted(set(labels))) if classes is None else tuple(classes)
    check_labelled_rows(ids, labels, classes, source)
    fold = pd.to_numeric(table["fold"], errors="coerce")
    bad = fold.isna() | (fold != fold.round())
    if bad.any():
        raise StackerError(f"{source}: fold must be an integer; first bad ids {preview(ids[bad.to_numpy()])}")
    fold = fold.to_numpy(dtype=np.int64)
    used = sorted(int(f) for f in np.unique(fold))
    k = used[-1] + 1 if used else 0
    if used != list(range(k)):
        raise StackerError(f"{source}: folds must be 0..K-1 with every fold used, got {used}")
    if k < 2:
        raise StackerError(f"{source}: needs at least 2 folds, got {k}")
    out = pd.DataFrame({"id": ids, "label": labels, "fold": fold})
    return Folds(out, k, None, classes, folds_digest(ids, labels, fold))


# Column names of the prediction tables: a class of that name would be a second column of the same name.
RESERVED_CLASS_NAMES = ("id", "fold", "repeat")


def check_labelled_rows(ids: np.ndarray, labels: np.ndarray, classes, source: str) -> None:
    """Ids unique and not blank, labels not blank, at least two classes, none named like a table column."""
    check_unique(ids, source)
    for what, values in (("id", ids), ("label", labels)):
        blank = np.array([str(v).strip() == "" for v in values], dtype=bool)
        if blank.any():
            raise StackerError(f"{source}: blank {what} in row(s) {preview(np.flatnonzero(blank))} (0-based)")
    reserved = sorted(set(classes) & set(RESERVED_CLASS_NAMES))
    if reserved:
        raise StackerError(f"{source}: class {reserved[0]!r} is also a column name of the prediction tables "
                           f"({list(RESERVED_CLASS_NAMES)}); rename the class")
    if len(classes) < 2:
        raise StackerError(f"{source}: {len(classes)} class(es) {list(classes)}; classification needs at least 2")


def write_folds(path: str | os.PathLike, folds: Folds) -> None:
    meta = {"k": folds.k, "seed": folds.seed, "classes": list(folds.classes), "sha256": folds.sha256}
    table = pa.Table.from_pandas(folds.table, preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), META_KEY: json.dumps(meta).encode()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def load_folds(path: str | os.PathLike) -> Folds:
    """Read a folds file (ours: parquet with metadata; anyone's: CSV or parquet with id, label, fold).

    Our own files are verified against their recorded sha256, so a hand-edited
    file cannot silently change which model saw which row.
    """
    path = Path(path)
    if not path.is_file():
        raise StackerError(f"{path}: folds file not found (run train-base first, or pass --folds)")
    if path.suffix == ".csv":
        return folds_from_table(read_csv_strings(path), str(path))
    try:
        pf = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise StackerError(f"{path}: not a readable parquet file ({e})") from None
    raw = (pf.schema.metadata or {}).get(META_KEY)
    meta = json.loads(raw) if raw else {}
    folds = folds_from_table(pf.to_pandas(), str(path), classes=meta.get("classes"))
    if meta:
        if folds.sha256 != meta["sha256"] and _row_order_digest(folds) != meta["sha256"]:
            raise StackerError(f"{path}: ids, labels or folds were changed after the file was made "
                               "(sha256 differs from the one recorded); make folds again with --force")
        if folds.k != meta["k"]:
            raise StackerError(f"{path}: has {folds.k} folds but records k={meta['k']}")
        unknown = set(folds.table["label"]) - set(folds.classes)
        if unknown:
            raise StackerError(f"{path}: labels {sorted(unknown)} are not among the recorded classes")
        # A file of stacker 0.1.0 keeps the digest it recorded, which its tables carry too.
        folds = Folds(folds.table, folds.k, meta.get("seed"), folds.classes, meta["sha256"])
    return folds


def _row_order_digest(folds: Folds) -> str:
    """The digest stacker 0.1.0 recorded: the same rows hashed in file order, not sorted."""
    h = hashlib.sha256()
    for i, y, f in zip(folds.ids, folds.table["label"], folds.fold):
        h.update(f"{i}\t{y}\t{int(f)}\n".encode())
    return h.hexdigest()

