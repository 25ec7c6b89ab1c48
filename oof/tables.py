"""Prediction tables: the contract between the base models and the meta level.

OOF table:  `id`, `fold`, one probability column per class (classes' order from
            folds.parquet); one row per train id, exactly once; `fold` equal to
            folds.parquet's; finite; each row in [0, 1] and summing to 1 within 1e-4.
            With repeats (folds.repeats R > 1): `id`, `repeat`, `fold`, classes; R x N rows,
            every train id once per repeat, `fold` equal to that repeat's fold
            (`Folds.for_repeat(r)`); the metadata's folds_sha256 is the whole Folds' digest.
            A table without a `repeat` column is a one-repeat table, and each kind is
            refused against folds of the other (a `repeat` column holding only 0 is one repeat).
Test table: `id`, one column per class, same rules, one row per test id.

Parquet metadata (key `stacker`) carries the metadata schema version, the model
name, the folds' sha256, the TTA settings with the views themselves and the
toolkit version. CSV or parquet tables written by other tools in this layout are
first-class inputs; they simply have no metadata.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .atomic import atomic_path
from .errors import StackerError, preview
from .folds import META_KEY, Folds
from .ids import align, check_unique

SUM_TOL = 1e-4


@dataclass
class PredictionTable:
    """A validated prediction table.

    Attributes:
        ids: (N,) row ids as str.
        proba: (N, C) float64 probabilities in the classes' order.
        classes: class names, the column order of `proba`.
        fold: (N,) fold of each row for OOF tables, None for test tables.
        meta: the writer's metadata (schema, model, folds_sha256, tta, version), {} for foreign files.
        source: the file it came from, for error messages.
        repeat: (N,) repeat of each row for an OOF table of R > 1 repeats (rows repeat-major), else None.
    """

    ids: np.ndarray
    proba: np.ndarray
    classes: tuple[str, ...]
    fold: np.ndarray | None = None
    meta: dict = field(default_factory=dict)
    source: str = "<memory>"
    repeat: np.ndarray | None = None

    def to_frame(self) -> pd.DataFrame:
        cols = {"id": self.ids}
        if self.repeat is not None:
            cols["repeat"] = self.repeat
        if self.fold is not None:
            cols["fold"] = self.fold
        df = pd.DataFrame(cols)
        return pd.concat([df, pd.DataFrame(self.proba, columns=list(self.classes))], axis=1)


def write_table(path: str | os.PathLike, table: PredictionTable) -> None:
    """Write a prediction table as parquet (atomically), with its metadata."""
    df = table.to_frame()
    pa_table = pa.Table.from_pandas(df, preserve_index=False)
    meta = {**(pa_table.schema.metadata or {}), META_KEY: json.dumps(table.meta).encode()}
    with atomic_path(path) as tmp:
        pq.write_table(pa_table.replace_schema_metadata(meta), tmp)


def read_table(path: str | os.PathLike, classes, kind: str) -> PredictionTable:
    """Read an OOF (`kind="oof"`) or test (`kind="test"`) table from parquet or CSV.

    Checks the columns and the per-row rules; the id and fold checks against a
    run need `validate_oof` / `validate_test`.
    """
    path = Path(path)
    if not path.is_file():
        raise StackerError(f"{path}: prediction table not found")
    meta = {}
    try:
        if path.suffix == ".csv":
            df = pd.read_csv(path, dtype={"id": str}, keep_default_na=False)
        else:
            pf = pq.read_table(path)
            raw = (pf.schema.metadata or {}).get(META_KEY)
            meta = json.loads(raw) if raw else {}
            df = pf.to_pandas()
    except StackerError:
        raise
    except Exception as e:
        raise StackerError(f"{path}: not a readable {path.suffix.lstrip('.') or 'table'} file ({e})") from None
    return table_from_frame(df, classes, kind, str(path), meta)


def table_from_frame(df: pd.DataFrame, classes, kind: str, source: str, meta=None) -> PredictionTable:
    classes = tuple(str(c) for c in classes)
    df = df.rename(columns=str)
    key = ["id", "fold"] if kind == "oof" else ["id"]
    need = key + list(classes)
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise StackerError(f"{source}: missing column(s) {missing}; a {kind} table has {key} and one column per class")
    optional = ["repeat"] if kind == "oof" else []  # repeats: one block of rows per fold assignment
    extra = [c for c in df.columns if c not in need + optional]
    if extra:
        raise StackerError(f"{source}: unexpected column(s) {extra}; classes are {list(classes)}")
    ids = df["id"].astype(str).to_numpy(dtype=object)
    values = df[list(classes)]
    if not all(pd.api.types.is_numeric_dtype(t) and not pd.api.types.is_bool_dtype(t) for t in values.dtypes):
        values = values.apply(pd.to_numeric, errors="coerce")  # text (CSV): non-numbers become NaN, refused below
    proba = values.to_numpy(dtype=np.float64)
    fold = _integer_column(df, "fold", ids, source) if kind == "oof" else None
    repeat = _integer_column(df, "repeat", ids, source) if "repeat" in df.columns and kind == "oof" else None
    table = PredictionTable(ids, proba, classes, fold, dict(meta or {}), source, repeat)
    check_rows(table)
    return table


def _integer_column(df: pd.DataFrame, column: str, ids: np.ndarray, source: str) -> np.ndarray:
    f = pd.to_numeric(df[column], errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(f) | (f != np.round(f))
    if bad.any():
        raise StackerError(f"{source}: {column} must be an integer; first bad ids {preview(ids[bad])}")
    return f.astype(np.int64)


def _any_blank(ids: np.ndarray) -> bool:
    """Whether an id is empty or whitespace; one pass in C over str ids (a third of a Python loop's time)."""
    values = ids.tolist()
    try:
        return not all(map(str.strip, values))
    except TypeError:  # ids that are not all str: str() each
        return not all(str(i).strip() for i in values)


def check_rows(table: PredictionTable) -> None:
    """Unique ids (within each repeat), finite probabilities in [0, 1], rows summing to 1 within 1e-4."""
    src, ids, p = table.source, table.ids, table.proba
    if table.repeat is None:
        check_unique(ids, src)
    elif (table.repeat < 0).any():
        raise StackerError(f"{src}: repeat must be 0..R-1; first bad ids {preview(ids[table.repeat < 0])}")
    else:
        for r in np.unique(table.repeat):
            check_unique(ids[table.repeat == r], f"{src} repeat {r}")
    if _any_blank(ids):
        blank = np.array([str(i).strip() == "" for i in ids], dtype=bool)
        raise StackerError(f"{src}: blank id in row(s) {preview(np.flatnonzero(blank))} (0-based)")
    bad = ~np.isfinite(p).all(axis=1)
    if bad.any():
        raise StackerError(f"{src}: probabilities must be finite numbers; first bad ids {preview(ids[bad])}")
    bad = ((p < 0) | (p > 1)).any(axis=1)
    if bad.any():
        raise StackerError(f"{src}: probabilities must lie in [0, 1]; first bad ids {preview(ids[bad])}")
    bad = np.abs(p.sum(axis=1) - 1) > SUM_TOL
    if bad.any():
        raise StackerError(f"{src}: each row must sum to 1 within {SUM_TOL}; first bad ids {preview(ids[bad])}")


def validate_oof(table: PredictionTable, folds: Folds) -> PredictionTable:
    """Check an OOF table against the run's folds; return it in folds row order (repeat-major with repeats).

    Raises:
        StackerError: another fold assignment, missing, extra or duplicate ids, a fold that
            differs from folds.parquet (in any repeat), classes in another order, or a table
            with repeats against folds without (or the other way round, or another count).
    """
    check_rows(table)
    src = table.source
    sha = table.meta.get("folds_sha256")
    if sha is not None and sha != folds.sha256:
        raise StackerError(f"{src}: was made on another fold assignment (folds sha256 {sha[:12]} != "
                           f"{folds.sha256[:12]}); stacking across fold assignments leaks labels")
    if tuple(table.classes) != tuple(folds.classes):
        raise StackerError(f"{src}: classes {list(table.classes)} differ from the folds' {list(folds.classes)}")
    repeats = 1 if table.repeat is None else int(table.repeat.max(initial=0)) + 1
    if repeats != folds.repeats:
        has = "no repeat column" if table.repeat is None else f"{repeats} repeat(s) in its repeat column"
        raise StackerError(f"{src}: has {has}, but the folds hold {folds.repeats} repeat(s); an OOF table needs "
                           "one block of rows per repeat (id, repeat, fold), made on the run's folds")
    if folds.repeats == 1:
        order = _repeat_order(table, np.arange(len(table.ids)), folds.ids, folds.fold, src)
        return PredictionTable(folds.ids, table.proba[order], folds.classes, folds.fold, table.meta, src)
    # each repeat against its own assignment (`Folds.for_repeat(r)`'s ids and folds), rows repeat-major
    order = np.concatenate([_repeat_order(table, np.flatnonzero(table.repeat == r), folds.ids, fold,
                                          f"{src} repeat {r}") for r, fold in enumerate(folds.fold_matrix)])
    return PredictionTable(np.tile(folds.ids, folds.repeats), table.proba[order], folds.classes,
                           folds.fold_matrix.ravel(), table.meta, src,
                           np.repeat(np.arange(folds.repeats, dtype=np.int64), folds.n_rows))


def _repeat_order(table: PredictionTable, rows: np.ndarray, ids: np.ndarray, fold: np.ndarray, src: str
                  ) -> np.ndarray:
    """Indices of `table`'s rows `rows` (one repeat) in the order of `ids`, after checking their folds."""
    order = rows[align(table.ids[rows], ids, src, "train")]
    bad = table.fold[order] != fold
    if bad.any():
        raise StackerError(f"{src}: fold differs from folds.parquet (another fold assignment leaks labels); "
                           f"first bad ids {preview(ids[bad])}")
    return order


def validate_test(table: PredictionTable, ids, classes) -> PredictionTable:
    """Check a test table against the expected test ids; return it in that order."""
    check_rows(table)
    src = table.source
    if tuple(table.classes) != tuple(classes):
        raise StackerError(f"{src}: classes {list(table.classes)} differ from {list(classes)}")
    ids = np.asarray([str(i) for i in ids], dtype=object)
    order = align(table.ids, ids, src, "test")
    return PredictionTable(ids, table.proba[order], tuple(classes), None, table.meta, src)

