"""Leaving train rows out and giving rows new labels: `data.exclude` and `data.relabel`, applied to the folds.

An audit of the data (label issues, near-duplicates) ends in two lists: ids to leave out of training
and ids whose label is wrong. The config names them:

    data:
      exclude: lists/exclude.csv           # a CSV with an `id` column (a copy of audit/label_issues.csv),
                                           # a text file of ids, or a YAML list
      relabel: lists/fixes.csv             # a CSV with `id` and `label` (the new one), or a YAML mapping

A list inside a run's own audit/ folder is refused: every audit rewrites it.

The base fold assignment is made from the whole dataset with its own labels, exactly as without
edits (`base_models.config.FoldsConfig.assign`); the edits are applied on top of it (`apply_edits`):
the excluded rows are dropped and the relabelled rows take their new label, and every other row keeps
its base fold. So one config gives one set of folds whether its edits were there from the start or
added later, and a model whose training rows an edit does not touch stays current.

The folds record the edits (`oof.folds.FoldEdits`: each excluded row's id, label, base folds and
group; each relabel's old and new label), from which `base_folds` rebuilds the base assignment, so a
later run checks it against the config and applies other edits to it.

Imports numpy and pandas only.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType

import numpy as np
import pandas as pd

from .atomic import read_csv_strings
from .errors import StackerError, preview
from .folds import ExcludedRow, FoldEdits, Folds, assemble_folds, check_training_parts
from .ids import align, check_unique
from .paths import RunPaths

EXCLUDE = "data.exclude"
RELABEL = "data.relabel"


@dataclass(frozen=True)
class DataEdits:
    """The edits a config asks for, read from their files.

    Attributes:
        exclude: ids to leave out of training, in the order given.
        relabel: {id: new label}.
        exclude_source: where the ids came from, the start of their errors (`data.exclude` or its file).
        relabel_source: likewise for the new labels.
    """

    exclude: tuple[str, ...] = ()
    relabel: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))
    exclude_source: str = EXCLUDE
    relabel_source: str = RELABEL

    def __bool__(self) -> bool:
        return bool(self.exclude or self.relabel)

    @property
    def keys(self) -> tuple[str, ...]:
        """The config keys that ask for an edit (`data.exclude`, `data.relabel`)."""
        return tuple(key for key, asked in ((EXCLUDE, self.exclude), (RELABEL, self.relabel)) if asked)

    @property
    def source(self) -> str:
        """The keys in use, the start of an error about the edits together."""
        return ", ".join(self.keys) or EXCLUDE


def read_edits(exclude, relabel) -> DataEdits:
    """`data.exclude` and `data.relabel` as `DataEdits`: their files read, each list checked on its own.

    Args:
        exclude: None, a list of ids, or the path of a CSV with an `id` column (other columns ignored)
            or of a text file of one id per line (blank lines ignored).
        relabel: None, a mapping {id: label}, or the path of a CSV with `id` and `label` columns.

    Raises:
        StackerError: a missing file, a CSV without the needed column, a blank id or label, an id twice in
            one list; each naming the key and the file.
    """
    ids, exclude_source = _exclude_ids(exclude)
    pairs, relabel_source = _relabel_pairs(relabel)
    check_unique(ids, exclude_source)
    check_unique([i for i, _ in pairs], relabel_source)
    return DataEdits(tuple(ids), MappingProxyType(dict(pairs)), exclude_source, relabel_source)


def _exclude_ids(value) -> tuple[list[str], str]:
    """The ids `data.exclude` names and where they came from."""
    if value is None:
        return [], EXCLUDE
    if not isinstance(value, (str, Path)):
        ids = [str(v) for v in value]
        _no_blank(ids, "id", EXCLUDE)
        return ids, EXCLUDE
    path = Path(value)
    source = f"{EXCLUDE}: {path}"
    _require_file(path, source, "a CSV with an id column, or a text file of one id per line")
    if path.suffix.lower() == ".csv":
        ids = _csv_columns(path, ("id",), source, "an id column (other columns are ignored)")[0]
        _no_blank(ids, "id", source)
        return ids, source
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise StackerError(f"{source}: not a readable text file of ids ({e})") from None
    return [line.strip() for line in lines if line.strip()], source


def _relabel_pairs(value) -> tuple[list[tuple[str, str]], str]:
    """(id, new label) of each row `data.relabel` names and where they came from."""
    if value is None:
        return [], RELABEL
    if isinstance(value, dict):
        pairs = [(str(i), str(y)) for i, y in value.items()]
        _no_blank([i for i, _ in pairs], "id", RELABEL)
        _no_blank([y for _, y in pairs], "label", RELABEL)
        return pairs, RELABEL
    path = Path(value)
    source = f"{RELABEL}: {path}"
    _require_file(path, source, "a CSV with id and label (the new label) columns")
    ids, labels = _csv_columns(path, ("id", "label"), source, "id and label (the new label) columns; "
                               "other columns are ignored")
    _no_blank(ids, "id", source)
    _no_blank(labels, "label", source)
    return list(zip(ids, labels)), source


def _require_file(path: Path, source: str, layout: str) -> None:
    if not path.is_file():
        raise StackerError(f"{source}: file not found (expected {layout}; a relative path is relative to the "
                           "current directory)")
    run = RunPaths(path.resolve().parent.parent)
    if path.resolve().parent == run.audit and (run.folds.is_file() or run.config.is_file()):
        # every fit-stack, report and audit of that run rewrites it: the next train-base would read other ids
        raise StackerError(f"{source}: is a run's audit output, which every audit of that run rewrites; copy "
                           f"it out first (e.g. cp {path} {run.root / ('kept_' + path.name)}) and name the copy")


def _csv_columns(path: Path, columns: tuple[str, ...], source: str, layout: str) -> list[list[str]]:
    table = read_csv_strings(path)
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise StackerError(f"{source}: missing column(s) {missing}; it needs {layout}, its columns are "
                           f"{[str(c) for c in table.columns]}")
    return [table[c].str.strip().tolist() for c in columns]


def _no_blank(values: list[str], what: str, source: str) -> None:
    blank = [n for n, v in enumerate(values) if not str(v).strip()]
    if blank:
        raise StackerError(f"{source}: blank {what} at position(s) {preview(blank)} (0-based, in the order given)")


def check_edits(edits: DataEdits, train_ids, test_ids, classes) -> None:
    """The edits fit the dataset: every id a train id, every new label a class of the run, no id both
    excluded and relabelled.

    Args:
        edits: the edits read (`read_edits`).
        train_ids: (N,) the dataset's train ids.
        test_ids: its test ids (named as such when an edit names one).
        classes: the run's classes (the dataset's own labels).

    Raises:
        StackerError: one line naming the key (or file), the first ids and the rule.
    """
    train, test = set(map(str, train_ids)), set(map(str, test_ids))
    for source, ids in ((edits.exclude_source, list(edits.exclude)), (edits.relabel_source, list(edits.relabel))):
        unknown = [i for i in ids if i not in train]
        if unknown:
            among = [i for i in unknown if i in test]
            tests = f" ({preview(among)} {'is a test id' if len(among) == 1 else 'are test ids'})" if among else ""
            raise StackerError(f"{source}: {len(unknown)} id(s) not a train id of the dataset, first "
                               f"{preview(unknown)}{tests}; only train rows can be excluded or relabelled")
    allowed = set(map(str, classes))
    other = [(i, y) for i, y in edits.relabel.items() if y not in allowed]
    if other:
        first = ", ".join(f"{i!r} -> {y!r}" for i, y in other[:5])
        raise StackerError(f"{edits.relabel_source}: {len(other)} relabel(s) to a class the run does not have, "
                           f"first {first}; the classes are {sorted(allowed)}")
    both = [i for i in edits.exclude if i in edits.relabel]
    if both:
        raise StackerError(f"{EXCLUDE}, {RELABEL}: {len(both)} id(s) both excluded and relabelled, first "
                           f"{preview(both)}; an id is either left out or given a new label")


def apply_edits(base: Folds, edits: DataEdits) -> Folds:
    """The base assignment with the edits applied: excluded rows dropped (from every repeat), relabelled rows
    with their new label, every other row in its base fold and group; the edits recorded (`Folds.edits`).

    Args:
        base: the assignment of the whole dataset with its own labels (no edits of its own).
        edits: edits checked against the dataset (`check_edits`).

    Raises:
        StackerError: a class left without rows, or a fold whose training part lost a class.
    """
    if not edits:
        return base
    n = base.n_rows
    ids, labels = base.ids, base.table["label"].to_numpy()[:n]
    dropped = set(edits.exclude)
    keep = np.array([i not in dropped for i in ids.tolist()], dtype=bool)
    new = labels.copy()
    for row in np.flatnonzero(pd.Index(ids).isin(list(edits.relabel))):
        new[row] = edits.relabel[ids[row]]
    matrix, groups = base.fold_matrix, base.groups
    excluded = tuple(ExcludedRow(str(ids[r]), str(labels[r]), tuple(int(f) for f in matrix[:, r]),
                                 None if groups is None else str(groups[r]))
                     for r in sorted(np.flatnonzero(~keep), key=lambda r: ids[r]))
    moved = tuple(sorted((str(ids[r]), str(labels[r]), str(new[r])) for r in np.flatnonzero(new != labels)))
    empty = sorted(set(base.classes) - set(new[keep].tolist()))
    if empty:
        raise StackerError(f"{edits.source}: leaves class {empty[0]!r} without a train row; every class of the "
                           "dataset needs rows (exclude or relabel fewer of its ids)")
    folds = assemble_folds(ids[keep], new[keep], matrix[:, keep], base.k, base.seed, base.classes)
    if groups is not None:
        folds = folds.with_groups(groups[keep], edits.source)
    check_training_parts(folds, edits.source)
    return replace(folds, edits=FoldEdits(excluded, moved))


def base_folds(folds: Folds) -> Folds:
    """The base assignment folds with edits were made from: the excluded rows back (their recorded label, base
    folds and group, after the other rows), relabelled rows with their dataset label; no edits of its own.
    Folds without edits are returned as they are."""
    edits = folds.edits
    if not edits:
        return folds
    n, rows = folds.n_rows, edits.excluded_rows
    labels = folds.table["label"].to_numpy()[:n].copy()
    back = dict((i, old) for i, old, _ in edits.relabels)
    for r in np.flatnonzero(pd.Index(folds.ids).isin(list(back))):
        labels[r] = back[folds.ids[r]]
    ids = np.concatenate([folds.ids, np.array([r.id for r in rows], dtype=object)])
    labels = np.concatenate([labels, np.array([r.label for r in rows], dtype=object)])
    extra = np.array([r.folds for r in rows], dtype=np.int64).reshape(len(rows), folds.repeats).T  # (R, E)
    base = assemble_folds(ids, labels, np.hstack([folds.fold_matrix, extra]), folds.k, folds.seed, folds.classes)
    if folds.groups is not None:
        groups = np.concatenate([folds.groups, np.array([r.group for r in rows], dtype=object)])
        base = base.with_groups(groups, "folds")
    return base


def in_order(folds: Folds, ids) -> Folds:
    """The same assignment (digest, groups, edits) with its rows in the order of `ids`, which must be exactly
    its ids; itself when they already are."""
    ids = np.asarray([str(i) for i in ids], dtype=object)
    order = align(folds.ids, ids, "folds", "train")
    if (order == np.arange(len(order))).all():
        return folds
    labels = folds.table["label"].to_numpy()[: folds.n_rows][order]
    out = assemble_folds(ids, labels, folds.fold_matrix[:, order], folds.k, folds.seed, folds.classes)
    if folds.groups is not None:
        out = out.with_groups(folds.groups[order], "folds")
    return replace(out, sha256=folds.sha256, edits=folds.edits)


def edits_line(folds: Folds, keys: tuple[str, ...] = ()) -> str:
    """'12 excluded, 3 relabelled (data.exclude, data.relabel)': what the folds' edits did, for a log line."""
    edits = folds.edits
    named = f" ({', '.join(keys)})" if keys else ""
    return f"{len(edits.excluded_rows)} excluded, {len(edits.relabels)} relabelled{named}"
