"""Per-view prediction tables: every TTA view of a fold model kept apart, so that the meta level can
score an ensemble that renders fewer views (`stack.predict_budget`).

A view table holds V views of the same rows: view 0 is the plain view, views 1..V-1 the augmented
views in the order the prediction tables record them (`tta.views`). On disk, one parquet file,
long format: `view`, `id`, `fold` (OOF rows only), `repeat` (OOF rows of repeated folds only) and
one probability column per class, the views' blocks in view order, each block in the same row order;
its metadata (key `stacker`) is that of the prediction tables made with it.

A view choice `v` (1..V) renders the first v views: the plain one and the first v - 1 augmented ones,
combined as the table's `tta.combine` says (`combine_views`). v = V is what the model's OOF and test
tables hold; v = 1 is the plain view alone. A unit is a model at one view choice; `unit_name` spells it
`model@v` (a model name has no `@`), and the model's own name for v = V, so an ensemble of whole models
keeps its models' names.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .atomic import atomic_path
from .errors import StackerError
from .folds import META_KEY
from .tables import PredictionTable, check_rows

UNIT_SEP = "@"


def combine_views(plain: np.ndarray, augmented: np.ndarray, combine: str, beta: float) -> np.ndarray:
    """The plain view (N, C) and augmented views (V, N, C) combined into (N, C) probabilities.

    `lerp` is fastai's `Learner.tta` default: the mean of the augmented views moved a fraction beta
    back towards the plain view; `mean` weighs all views equally. No augmented view: the plain one.
    """
    if augmented.shape[0] == 0:
        return plain
    if combine == "lerp":
        p = (1.0 - beta) * augmented.mean(axis=0) + beta * plain
    else:
        p = (plain + augmented.sum(axis=0)) / (augmented.shape[0] + 1)
    return p / p.sum(axis=1, keepdims=True)


class ViewTable(NamedTuple):
    """V views of the same rows.

    Attributes:
        ids: (N,) row ids as str.
        proba: (V, N, C) float64 probabilities; view 0 is the plain view.
        classes: class names, the column order.
        fold: (N,) fold of each row (OOF rows), or None (test rows).
        meta: the metadata of the prediction tables made with it (its `tta`: combine, beta, views).
        repeat: (N,) repeat of each row (OOF rows of repeated folds), or None.
    """

    ids: np.ndarray
    proba: np.ndarray
    classes: tuple[str, ...]
    fold: np.ndarray | None
    meta: dict
    repeat: np.ndarray | None = None

    @property
    def views(self) -> int:
        return int(self.proba.shape[0])

    def choice(self, views: int) -> np.ndarray:
        """(N, C) probabilities of the first `views` views, combined as `meta["tta"]` says."""
        if not 1 <= views <= self.views:
            raise ValueError(f"a view choice is 1..{self.views}, got {views}")
        tta = self.meta.get("tta") or {}
        return combine_views(self.proba[0], self.proba[1:views], tta.get("combine", "mean"), tta.get("beta", 0.0))

    def table(self, views: int, source: str = "<views>") -> PredictionTable:
        """The prediction table of view choice `views` (its rows, folds and metadata)."""
        return PredictionTable(self.ids, self.choice(views), self.classes, self.fold, self.meta, source, self.repeat)


def write_views(path: str | os.PathLike, table: ViewTable) -> None:
    """Write a view table as parquet, atomically, with its metadata (module docstring's layout)."""
    n = len(table.ids)
    cols = {"view": np.repeat(np.arange(table.views, dtype=np.int64), n), "id": np.tile(table.ids, table.views)}
    if table.repeat is not None:
        cols["repeat"] = np.tile(table.repeat, table.views)
    if table.fold is not None:
        cols["fold"] = np.tile(table.fold, table.views)
    frame = pd.concat([pd.DataFrame(cols), pd.DataFrame(table.proba.reshape(-1, len(table.classes)),
                                                        columns=list(table.classes))], axis=1)
    pa_table = pa.Table.from_pandas(frame, preserve_index=False)
    meta = {**(pa_table.schema.metadata or {}), META_KEY: json.dumps(table.meta).encode()}
    with atomic_path(path) as tmp:
        pq.write_table(pa_table.replace_schema_metadata(meta), tmp)


def read_views(path: str | os.PathLike, classes) -> ViewTable:
    """Read a view table written by `write_views`, checked: every view holds the same rows, each row a
    probability row (`check_rows`).

    Raises:
        StackerError: a missing or unreadable file, missing class columns, views of unequal rows, bad rows.
    """
    path, classes = Path(path), tuple(str(c) for c in classes)
    if not path.is_file():
        raise StackerError(f"{path}: view table not found")
    try:
        pf = pq.read_table(path)
        raw = (pf.schema.metadata or {}).get(META_KEY)
        frame = pf.to_pandas()
    except Exception as e:
        raise StackerError(f"{path}: not a readable parquet file ({e})") from None
    missing = [c for c in ("view", "id", *classes) if c not in frame.columns]
    if missing:
        raise StackerError(f"{path}: missing column(s) {missing}; a view table has view, id and one column per class")
    view = frame["view"].to_numpy(dtype=np.int64)
    views = int(view.max(initial=-1)) + 1
    n = len(frame) // max(views, 1)
    if views == 0 or len(frame) != views * n or not (view == np.repeat(np.arange(views), n)).all():
        raise StackerError(f"{path}: views must be blocks 0..V-1 of equal rows, in order")
    ids = frame["id"].astype(str).to_numpy(dtype=object)
    if not all((ids[v * n:(v + 1) * n] == ids[:n]).all() for v in range(views)):
        raise StackerError(f"{path}: every view must hold the same ids in the same order")
    proba = frame[list(classes)].to_numpy(dtype=np.float64).reshape(views, n, len(classes))
    first = lambda c: frame[c].to_numpy(dtype=np.int64)[:n] if c in frame.columns else None  # noqa: E731
    table = ViewTable(ids[:n], proba, classes, first("fold"), json.loads(raw) if raw else {}, first("repeat"))
    for v in range(views):
        check_rows(PredictionTable(table.ids, proba[v], classes, table.fold, source=f"{path} view {v}",
                                   repeat=table.repeat))
    return table


def unit_name(model: str, views: int, all_views: int) -> str:
    """A unit's name: the model's own at every view (`all_views`), else `model@views`."""
    return model if views == all_views else f"{model}{UNIT_SEP}{views}"


def parse_unit(name: str) -> tuple[str, int | None]:
    """(model, view choice) of a unit's name; None for the model's every view."""
    model, sep, views = name.partition(UNIT_SEP)
    if not sep:
        return model, None
    if not views.isdigit() or int(views) < 1:
        raise StackerError(f"{name!r}: a unit is model{UNIT_SEP}<views>, views a whole number >= 1")
    return model, int(views)


class Render(NamedTuple):
    """What `stacker predict` renders of one model: its first `views` views (None: every view its tables
    record) through its first `fold_models` fold models, repeat-major (None: every one), and its full fit
    (`train-base --full`) with `full`, weighted as one more fold model."""

    model: str
    views: int | None = None
    fold_models: int | None = None
    full: bool = False


def renders(decision: dict) -> list[Render]:
    """The models a stack's test side renders, and how: decision.json's `predict` units (else each used model at
    every view through every fold model) and its `test_side` (fold models, full fits or both)."""
    test_side = decision.get("test_side") or {}
    side = test_side.get("models", "folds")
    units = (decision.get("predict") or {}).get("units")
    if units is None:  # every view; the fold models `stack.predict_folds` gave (every one where none is recorded)
        n = test_side.get("fold_models")
        units = [{"model": parse_unit(name)[0], "views": None, "fold_models": n} for name in decision["used"]]
    return [Render(u["model"], u["views"], 0 if side == "full" else u["fold_models"], side != "folds")
            for u in units]
