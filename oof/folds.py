"""Fold assignment: made once per run, checked by every stage.

`folds.parquet` holds one row per train image (`id`, `label`, `fold`) and, in
its parquet metadata, K, the seed, the classes in order and a sha256 over the
ids, labels and folds. Every base model and the meta level use these folds, so
no OOF prediction ever comes from a model that saw its row.

Grouped folds also hold each row's `group` (a patient, a plant, a near-duplicate
cluster: rows that are not independent), whole in one fold in every repeat, and
`groups_sha256` over (id, group) in the metadata. Groups are not part of `sha256`:
that digest names which model saw which row, and a run without groups keeps its
file bytes. The meta level resamples groups (`Folds.group_index`) instead of rows.

Three ways to make the assignment, one per `folds:` key:

- stratified (`make_folds`): each class dealt to the folds in turn.
- grouped (`make_group_folds`, `folds.group_column`): the rows of one group (a patient,
  plant or field) stay in one fold, classes balanced by scikit-learn's StratifiedGroupKFold
  greedy. It is written here in numpy, not imported: `oof` imports numpy, pandas and pyarrow
  only (fit-stack and other tools read folds without scikit-learn), and a run's folds must be
  remade bit for bit from this file, whatever scikit-learn version is installed.
  `group_folds` is the same maker over group values (`merge_groups`: a group column joined
  with duplicate clusters).
- made elsewhere (`read_fold_file`, `folds.file`): a table of id, fold[, repeat][, group],
  checked against the dataset.

Repeats (`folds.repeats` = R): R assignments, repeat r drawn with `repeat_seed(seed, r)`.
Repeat 0 uses the seed itself, so R = 1 is the one-assignment run (same file bytes, same
digest) and repeat 0 of any R equals it. With R > 1 the file holds R x N rows, repeat-major,
every repeat's rows in the same id order, with a `repeat` column, and `repeats` in its metadata.

A `Folds` with R > 1, in memory:

- `ids`, `y`, `classes`, `k` are shared by every repeat (N rows, one per train image).
- `for_repeat(r)` is repeat r as a one-repeat `Folds`: its own seed and its own digest, the
  digest an R = 1 run drawn with that seed has (so repeat r's models, tables and checks use it
  exactly as a one-repeat run uses its folds); `each_repeat()` is all of them in order, and
  `fold_matrix` the (R, N) fold numbers.
- `sha256` digests every repeat (their digests in repeat order); `table` is every repeat's
  rows, as in the file.
- `fold`, `train_rows` and `valid_rows` raise: they name one assignment, so a caller written
  for one must pick a repeat. Reading repeat 0 quietly would train or score on a fraction of
  the run, and reading all rows would mix repeats, which is how meta-level OOF leaks.

So the base level runs a job per (model, repeat, fold) on `folds.for_repeat(r)`, and the meta
level scores each repeat on that repeat's OOF with `for_repeat(r).fold`. A table made from one
repeat's fold models checks against (and records the digest of) that repeat's view; a table
holding every repeat records `sha256`.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .atomic import atomic_path, read_csv_strings
from .errors import StackerError, preview
from .ids import align, check_unique

META_KEY = b"stacker"


@dataclass(frozen=True)
class ExcludedRow:
    """A train row `data.exclude` leaves out of the folds, as the base assignment holds it.

    Attributes:
        id: the row's id.
        label: its label in the dataset.
        folds: its base fold in each repeat, in repeat order.
        group: its group in grouped folds; None without groups.
    """

    id: str
    label: str
    folds: tuple[int, ...]
    group: str | None = None


@dataclass(frozen=True)
class FoldEdits:
    """What `data.exclude` and `data.relabel` changed in a run's base fold assignment (`oof.edits`), read only.

    folds.parquet records it in its metadata (`record`), so the base assignment (every dataset row with its
    dataset label) is rebuilt from the file alone (`oof.edits.base_folds`). Empty (false) for folds without
    edits: every file without an `edits` record, and folds.csv from other tools.

    Attributes:
        excluded_rows: the rows left out, sorted by id.
        relabels: (id, label in the dataset, new label) of each relabelled row, sorted by id.
    """

    excluded_rows: tuple[ExcludedRow, ...] = ()
    relabels: tuple[tuple[str, str, str], ...] = ()

    def __bool__(self) -> bool:
        return bool(self.excluded_rows or self.relabels)

    @property
    def excluded(self) -> tuple[str, ...]:
        """Ids of the rows left out."""
        return tuple(row.id for row in self.excluded_rows)

    @property
    def relabelled(self) -> MappingProxyType:
        """{id: (label in the dataset, new label)} of the relabelled rows."""
        return MappingProxyType({i: (old, new) for i, old, new in self.relabels})

    def _rows(self) -> dict:
        excluded = [{"id": r.id, "label": r.label, "folds": list(r.folds), **({} if r.group is None else
                                                                             {"group": r.group})}
                    for r in self.excluded_rows]
        return {"excluded": excluded, "relabelled": [{"id": i, "from": a, "to": b} for i, a, b in self.relabels]}

    @property
    def sha256(self) -> str:
        """Digest of the edits: every excluded row (id, label, base folds, group) and every relabel."""
        return hashlib.sha256(json.dumps(self._rows(), sort_keys=True).encode()).hexdigest()

    @property
    def record(self) -> dict:
        """The edits as folds.parquet's metadata holds them (`from_record` reads them back)."""
        return {**self._rows(), "sha256": self.sha256}

    @classmethod
    def from_record(cls, record, source: str) -> FoldEdits:
        """The edits a folds file records, checked against their recorded digest.

        Raises:
            StackerError: a record of another shape, or one changed after the file was made.
        """
        try:
            rows = tuple(ExcludedRow(str(r["id"]), str(r["label"]), tuple(int(f) for f in r["folds"]),
                                     None if r.get("group") is None else str(r["group"]))
                         for r in record["excluded"])
            edits = cls(rows, tuple((str(r["id"]), str(r["from"]), str(r["to"])) for r in record["relabelled"]))
            recorded = record["sha256"]
        except (KeyError, TypeError, ValueError, AttributeError):
            raise StackerError(f"{source}: its edits record is not readable; make folds again with --force") from None
        if edits.sha256 != recorded:
            raise StackerError(f"{source}: the edits it records (excluded, relabelled rows) were changed after the "
                               "file was made (sha256 differs from the one recorded); make folds again with --force")
        return edits


NO_EDITS = FoldEdits()


@dataclass(frozen=True)
class Folds:
    """The fold assignment of a run: one, or `repeats` drawn with seeds derived from one.

    Attributes:
        table: one row per train image (`id` str, `label` str, `fold` int in [0, k)); with repeats
            one such block per repeat, in repeat order, and a `repeat` column; with groups a `group`
            column (str, the same in every repeat, each group in one fold of each repeat).
        k: number of folds (the same in every repeat).
        seed: seed the assignment was drawn with (None for folds brought from elsewhere).
        classes: class names in the order every prediction table uses.
        sha256: digest of ids, labels and folds (of every repeat); prediction tables record it.
        repeats: number of assignments.
        edits: the rows `data.exclude` left out and `data.relabel` relabelled (`FoldEdits`); the table
            holds the rows after the edits, each in its base fold. Empty for folds without edits.
    """

    table: pd.DataFrame
    k: int
    seed: int | None
    classes: tuple[str, ...]
    sha256: str
    repeats: int = 1
    edits: FoldEdits = NO_EDITS

    @property
    def n_rows(self) -> int:
        """N: train images, each once per repeat."""
        return len(self.table) // self.repeats

    @property
    def ids(self) -> np.ndarray:
        return self.table["id"].to_numpy()[: self.n_rows]

    @property
    def fold(self) -> np.ndarray:
        self._one_assignment("fold")
        return self.table["fold"].to_numpy()

    @property
    def y(self) -> np.ndarray:
        """(N,) integer class index of each row, in `classes` order."""
        index = {c: i for i, c in enumerate(self.classes)}
        return self.table["label"].iloc[: self.n_rows].map(index).to_numpy(dtype=np.int64, copy=True)

    @property
    def fold_matrix(self) -> np.ndarray:
        """(R, N) fold of each row in each repeat, rows in `ids` order."""
        return self.table["fold"].to_numpy().reshape(self.repeats, self.n_rows)

    @property
    def groups(self) -> np.ndarray | None:
        """(N,) group of each row, rows in `ids` order; None for folds without groups."""
        if "group" not in self.table.columns:
            return None
        return self.table["group"].to_numpy()[: self.n_rows]

    @property
    def group_index(self) -> np.ndarray | None:
        """(N,) int64 group number of each row, 0..G-1 in sorted group order (the meta level's bootstrap
        units); None for folds without groups."""
        groups = self.groups
        return None if groups is None else np.unique(groups, return_inverse=True)[1].astype(np.int64)

    @property
    def groups_sha256(self) -> str | None:
        """Digest of (id, group) rows sorted by id; None for folds without groups."""
        groups = self.groups
        return None if groups is None else groups_digest(self.ids, groups)

    def with_groups(self, groups, source: str) -> Folds:
        """These folds with each row's group (N values, `ids` order, stored as strings).

        Raises:
            StackerError: a count other than N, a blank group, or a group whose rows sit in more
                than one fold of a repeat; each starting with `source`.
        """
        groups = np.asarray(groups, dtype=object)
        if len(groups) != self.n_rows:
            raise StackerError(f"{source}: {len(groups)} groups for {self.n_rows} rows")
        groups = group_strings(pd.Series(groups), self.ids, source)
        check_groups_whole(self, groups, source)
        table = self.table.drop(columns="group", errors="ignore")
        return replace(self, table=table.assign(group=np.tile(groups, self.repeats)))

    def train_rows(self, fold: int) -> np.ndarray:
        return np.flatnonzero(self.fold != fold)

    def valid_rows(self, fold: int) -> np.ndarray:
        return np.flatnonzero(self.fold == fold)

    def for_repeat(self, repeat: int) -> Folds:
        """Repeat `repeat` alone: a one-repeat `Folds` with that repeat's seed and digest (itself when R = 1)."""
        if not (isinstance(repeat, (int, np.integer)) and 0 <= repeat < self.repeats):
            raise StackerError(f"folds: repeat {repeat!r} is not a repeat of the run (0..{self.repeats - 1})")
        if self.repeats == 1:
            return self
        n = self.n_rows
        columns = [c for c in ("id", "label", "fold", "group") if c in self.table.columns]
        table = self.table.iloc[repeat * n:(repeat + 1) * n][columns].reset_index(drop=True)
        seed = None if self.seed is None else repeat_seed(self.seed, int(repeat))
        return Folds(table, self.k, seed, self.classes, folds_digest(table["id"], table["label"], table["fold"]),
                     edits=self.edits)

    def each_repeat(self) -> list[Folds]:
        """Every repeat's one-repeat view, in repeat order."""
        return [self.for_repeat(r) for r in range(self.repeats)]

    def _one_assignment(self, what: str) -> None:
        if self.repeats > 1:
            raise StackerError(f"folds: `{what}` reads one fold assignment, but these folds hold {self.repeats} "
                               "repeats; take one with Folds.for_repeat(r) (or every repeat's .fold_matrix)")


def repeat_seed(seed: int | None, repeat: int) -> int | None:
    """The seed of repeat `repeat`: `seed` itself for repeat 0 (so R = 1 is the single assignment),
    else a 32-bit seed numpy's SeedSequence derives from (seed, repeat): reproducible and unrelated."""
    if seed is None or repeat == 0:
        return seed
    return int(np.random.SeedSequence([int(seed), int(repeat)]).generate_state(1)[0])


def folds_digest(ids, labels, folds) -> str:
    """sha256 over (id, label, fold) rows sorted by id: the same assignment in any row order has one digest."""
    h = hashlib.sha256()
    for i, y, f in sorted(zip(map(str, ids), map(str, labels), map(int, folds))):
        h.update(f"{i}\t{y}\t{f}\n".encode())
    return h.hexdigest()


def groups_digest(ids, groups) -> str:
    """sha256 over (id, group) rows sorted by id."""
    h = hashlib.sha256()
    for i, g in sorted(zip(map(str, ids), map(str, groups))):
        h.update(f"{i}\t{g}\n".encode())
    return h.hexdigest()


def repeats_digest(digests) -> str:
    """sha256 of several repeats: their own digests in repeat order (one repeat's digest is its own)."""
    digests = list(digests)
    if len(digests) == 1:
        return digests[0]
    return hashlib.sha256("".join(f"{r}\t{d}\n" for r, d in enumerate(digests)).encode()).hexdigest()


def assemble_folds(ids: np.ndarray, labels: np.ndarray, fold, k: int, seed, classes) -> Folds:
    """A `Folds` from (R, N) fold numbers; one repeat is exactly the table and digest of one assignment."""
    fold = np.asarray(fold, dtype=np.int64).reshape(-1, len(ids))
    if len(fold) == 1:
        table = pd.DataFrame({"id": ids, "label": labels, "fold": fold[0]})
        return Folds(table, int(k), seed, classes, folds_digest(ids, labels, fold[0]))
    r, n = fold.shape
    table = pd.DataFrame({"id": np.tile(ids, r), "label": np.tile(labels, r), "fold": fold.ravel(),
                          "repeat": np.repeat(np.arange(r, dtype=np.int64), n)})
    digest = repeats_digest(folds_digest(ids, labels, f) for f in fold)
    return Folds(table, int(k), seed, classes, digest, int(r))


# ---------------------------------------------------------------- making folds


def make_folds(ids, labels, k: int = 5, seed: int = 42, classes=None, repeats: int = 1) -> Folds:
    """Stratified K-fold assignment, reproducible from the seed; `repeats` of them.

    Each class's rows are shuffled and dealt to the folds in turn, starting each
    class where the previous one stopped, so fold sizes differ by at most one.

    Args:
        ids: unique row ids.
        labels: class label of each row (compared as strings).
        k: number of folds, at least 2.
        seed: seed of the shuffle (repeat r > 0 uses `repeat_seed(seed, r)`).
        classes: class order; default sorted labels.
        repeats: number of assignments.

    Raises:
        StackerError: duplicate ids, k < 2, repeats < 1, or a class with fewer than k rows.
    """
    _check_count(k, "k", 2)
    _check_count(repeats, "repeats", 1)
    ids, labels, classes = _labelled(ids, labels, classes, "train ids")
    counts = pd.Series(labels).value_counts()
    small = counts[counts < k]
    if len(small):
        worst, fewest = small.idxmin(), int(small.min())
        fix = (f"k <= {fewest} would work" if fewest >= 2 else
               "a class needs at least 2 images for any K-fold: add images or drop the class")
        raise StackerError(f"folds: class {worst!r} has {fewest} images, fewer than k={k}; "
                           f"every class needs at least one image per fold ({fix})")
    fold = [_stratified(labels, classes, k, repeat_seed(seed, r)) for r in range(repeats)]
    return assemble_folds(ids, labels, fold, k, seed, classes)


def _stratified(labels: np.ndarray, classes, k: int, seed) -> np.ndarray:
    """(N,) folds: each class shuffled, then dealt to the folds in turn from where the last class stopped."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(labels), dtype=np.int64)
    start = 0
    for c in classes:
        rows = np.flatnonzero(labels == c)
        rows = rows[rng.permutation(len(rows))]
        fold[rows] = (start + np.arange(len(rows))) % k
        start = (start + len(rows)) % k
    return fold


def _check_count(value, name: str, low: int) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
        raise StackerError(f"folds: {name} must be an integer of at least {low}, got {value!r}")


def _labelled(ids, labels, classes, source: str) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Ids and labels as string arrays and the class order, checked (`check_labelled_rows`, no unknown label)."""
    ids = np.asarray([str(i) for i in ids], dtype=object)
    labels = np.asarray([str(y) for y in labels], dtype=object)
    classes = tuple(sorted(set(labels))) if classes is None else tuple(str(c) for c in classes)
    check_labelled_rows(ids, labels, classes, source)
    unknown = sorted(set(labels) - set(classes))
    if unknown:
        raise StackerError(f"folds: labels {unknown} are not among the classes {list(classes)}")
    return ids, labels, classes


def make_group_folds(train: pd.DataFrame, column: str, k: int = 5, seed: int = 42, classes=None,
                     repeats: int = 1) -> Folds:
    """Stratified group K-fold over a column of the train table (`group_folds` on its values).

    Args:
        train: the train table: `id`, `label` and the group column (the train CSV's other columns).
        column: the column naming each row's group (a patient, plant or field id).
        k: number of folds, at least 2.
        seed: seed of the group shuffle (repeat r > 0 uses `repeat_seed(seed, r)`).
        classes: class order; default sorted labels.
        repeats: number of assignments.

    Raises:
        StackerError: the column missing or with empty values, or `group_folds`' refusals.
    """
    rows = pd.DataFrame({"id": train["id"], "label": train["label"], "group": group_values(train, column)})
    return group_folds(rows, k, seed, classes, repeats, f"folds.group_column {column!r}")


def group_folds(rows: pd.DataFrame, k: int = 5, seed: int = 42, classes=None, repeats: int = 1,
                where: str = "folds") -> Folds:
    """Stratified group K-fold: every group's rows in one fold, each class spread as evenly as groups allow.

    The returned folds carry the groups. Groups are numbered in sorted name order, so the same
    groups under other row order or other names of the same order give the same folds.

    Args:
        rows: `id`, `label` and `group` (str, not blank) of each train row.
        k: number of folds, at least 2.
        seed: seed of the group shuffle (repeat r > 0 uses `repeat_seed(seed, r)`).
        classes: class order; default sorted labels.
        repeats: number of assignments.
        where: what the groups are, the start of every error (`folds.group_column 'plant'`).

    Raises:
        StackerError: fewer groups than folds, a group larger than a fold's share of the rows
            (N / k), or a class left out of a fold's training part.
    """
    _check_count(k, "k", 2)
    _check_count(repeats, "repeats", 1)
    ids, labels, classes = _labelled(rows["id"], rows["label"], classes, "train ids")
    groups = group_strings(rows["group"], ids, where)
    names, group_of = np.unique(groups, return_inverse=True)
    if len(names) < k:
        raise StackerError(f"{where}: {len(names)} groups, fewer than k={k}; every fold needs a group of its own")
    sizes = np.bincount(group_of)
    share = len(ids) / k
    if sizes.max() > share:
        big = int(np.argmax(sizes))
        raise StackerError(f"{where}: group {names[big]!r} has {sizes[big]} rows, more than a fold's share "
                           f"({len(ids)} rows / k={k} = {share:.1f}); lower k, or use a finer group column")
    y = pd.Index(classes).get_indexer(labels)
    fold = [_grouped(y, group_of, len(classes), k, repeat_seed(seed, r)) for r in range(repeats)]
    folds = assemble_folds(ids, labels, fold, k, seed, classes).with_groups(groups, where)
    check_training_parts(folds, where)
    return folds


def _grouped(y: np.ndarray, group_of: np.ndarray, n_classes: int, k: int, seed) -> np.ndarray:
    """(N,) folds of one grouped assignment: scikit-learn's StratifiedGroupKFold greedy, in numpy.

    The groups are shuffled by the seed, then taken most class-skewed first (the std of their
    class counts, as scikit-learn orders them), and each goes to the fold that leaves every
    class's per-fold share most even (mean over classes of the std over folds of the fold's
    fraction of that class); near-ties go to the smaller fold, so folds also even out in size.
    """
    n_groups = int(group_of.max()) + 1
    counts = np.zeros((n_groups, n_classes))
    np.add.at(counts, (group_of, y), 1)
    order = np.random.default_rng(seed).permutation(n_groups)
    order = order[np.argsort(-counts[order].std(axis=1), kind="stable")]
    total = np.maximum(counts.sum(axis=0), 1)
    per_fold = np.zeros((k, n_classes))
    tries = np.eye(k)[:, :, None]  # (k, k, 1): tries[i] adds the group to fold i
    group_fold = np.empty(n_groups, dtype=np.int64)
    for g in order:
        spread = ((per_fold + tries * counts[g]) / total).std(axis=1).mean(axis=1)  # (k,): one per fold tried
        near = np.flatnonzero(np.isclose(spread, spread.min()))
        best = near[np.argmin(per_fold[near].sum(axis=1))]
        per_fold[best] += counts[g]
        group_fold[g] = best
    return group_fold[group_of]


def group_values(train: pd.DataFrame, column: str) -> np.ndarray:
    """(N,) group of each train row, as strings, from a column of the train table.

    Raises:
        StackerError: the column is missing, or a row's group is empty.
    """
    if column not in train.columns:
        others = [str(c) for c in train.columns if c not in ("id", "label", "path")]
        raise StackerError(f"folds.group_column {column!r}: not a column of the train table (its other columns: "
                           f"{others}); groups come from a column of data.train_csv")
    return group_strings(train[column], train["id"].astype(str).to_numpy(), f"folds.group_column {column!r}")


def group_strings(raw: pd.Series, ids: np.ndarray, source: str) -> np.ndarray:
    """(N,) groups as strings; `ids` (the same rows) name the rows of an error.

    Raises:
        StackerError: a row's group is missing or blank.
    """
    raw = pd.Series(np.asarray(raw, dtype=object))
    blank = (raw.isna() | (raw.astype(str).str.strip() == "")).to_numpy()
    if blank.any():
        raise StackerError(f"{source}: empty group for {int(blank.sum())} row(s), first ids "
                           f"{preview(np.asarray(ids)[blank])}; every row needs a group")
    return raw.astype(str).to_numpy(dtype=object)


def merge_groups(ids, *relations) -> np.ndarray | None:
    """(N,) groups joining every relation: two rows share a group when they share a value of any
    relation, transitively (connected components).

    Args:
        ids: (N,) row ids.
        *relations: (N,) arrays, each None (ignored) or either group values (str, every row in one:
            a group column, a fold file's groups) or int cluster numbers with -1 for a row in none
            (duplicate clusters).

    Returns:
        A component's name is the smallest value in it of the first relation of group values, else the
        smallest id in it, so components equal to one relation's groups keep that relation's names (and
        `group_folds` its folds); None when no relation joins any two rows and none names groups.
    """
    ids = np.asarray([str(i) for i in ids], dtype=object)
    relations = [np.asarray(r) for r in relations if r is not None]
    keys = [_relation_key(r) for r in relations]
    if not any(r.dtype.kind not in "iu" for r in relations) and not any((np.bincount(k[k >= 0]) > 1).any()
                                                                         for k in keys):
        return None
    component = _components(keys, len(ids))
    named = next((r.astype(str) for r in relations if r.dtype.kind not in "iu"), ids.astype(str))
    names = pd.Series(named).groupby(component).transform("min")
    return names.to_numpy(dtype=object)


def _relation_key(relation: np.ndarray) -> np.ndarray:
    """(N,) int64 key of a relation: cluster numbers as they are (-1: none), group values numbered."""
    if relation.dtype.kind in "iu":
        return relation.astype(np.int64)
    return np.unique(relation.astype(str), return_inverse=True)[1].astype(np.int64)


def _components(keys: list[np.ndarray], n: int) -> np.ndarray:
    """(N,) smallest row index of each row's connected component: every row takes the smallest label among
    the rows sharing a key with it, until nothing changes (as many passes as the longest chain of joins)."""
    label = np.arange(n)
    changed = True
    while changed:
        changed = False
        for key in keys:
            member = np.flatnonzero(key >= 0)
            if not len(member):
                continue
            low = np.full(int(key.max()) + 1, n)
            np.minimum.at(low, key[member], label[member])
            new = low[key[member]]
            changed |= bool((new < label[member]).any())
            label[member] = new
    return label


def check_groups_whole(folds: Folds, groups, source: str) -> None:
    """Raise naming the first group whose rows sit in more than one fold (of any repeat)."""
    groups = pd.Series(np.asarray(groups, dtype=object))
    for r, fold in enumerate(folds.fold_matrix):
        spread = pd.Series(fold).groupby(groups.to_numpy()).nunique()
        split = spread[spread > 1]
        if len(split):
            where = f" repeat {r}" if folds.repeats > 1 else ""
            raise StackerError(f"{source}{where}: group {split.index[0]!r} straddles {int(split.iloc[0])} folds; "
                               "a group's rows must share one fold")


def check_training_parts(folds: Folds, source: str) -> None:
    """Every fold holds rows, and every class is in every fold's training part (else that fold's model
    never sees the class), in every repeat."""
    y = folds.y
    for r, fold in enumerate(folds.fold_matrix):
        where = f" repeat {r}" if folds.repeats > 1 else ""
        counts = np.zeros((folds.k, len(folds.classes)), dtype=np.int64)
        np.add.at(counts, (fold, y), 1)
        empty = np.flatnonzero(counts.sum(axis=1) == 0)
        if len(empty):
            raise StackerError(f"{source}{where}: fold {empty[0]} holds no rows")
        total = counts.sum(axis=0)
        f, c = np.nonzero((total - counts == 0) & (total > 0))
        if len(f):
            raise StackerError(f"{source}{where}: fold {f[0]}'s training part has no {folds.classes[c[0]]!r} image "
                               f"(all {total[c[0]]} are in fold {f[0]}); every fold model must see every class")


# ---------------------------------------------------------------- folds from elsewhere


def folds_from_table(table: pd.DataFrame, source: str, classes=None) -> Folds:
    """Folds brought from another tool: a table with `id`, `label`, `fold`, for repeats `repeat`, and for
    groups `group` (each group whole in one fold of every repeat)."""
    _require_columns(table, ("id", "label", "fold"), source, "a folds table has id, label, fold[, repeat][, group]")
    ids = table["id"].astype(str).to_numpy(dtype=object)
    labels = table["label"].astype(str).to_numpy(dtype=object)
    repeat = _repeat_column(table, ids, source)
    first = repeat == 0
    classes = tuple(sorted(set(labels))) if classes is None else tuple(classes)
    check_labelled_rows(ids[first], labels[first], classes, source)
    fold = _integers(table, "fold", ids, source)
    rows = _rows_by_repeat(ids, repeat, ids[first], source)
    moved = (labels[rows] != labels[first]).any(axis=0)
    if moved.any():
        raise StackerError(f"{source}: ids with another label in another repeat, first {preview(ids[first][moved])}")
    matrix = fold[rows]
    folds = assemble_folds(ids[first], labels[first], matrix, _fold_count(matrix, source), None, classes)
    groups = _table_groups(table, rows, ids[first], source)
    return folds if groups is None else folds.with_groups(groups, source)


def read_fold_file(path: str | os.PathLike, ids, labels, classes=None) -> Folds:
    """A fold assignment made elsewhere (a Kaggle notebook's folds): id, fold[, repeat][, label][, group], checked.

    The rows come back in the dataset's order (`ids`), with the dataset's labels, and the file's
    groups when it has a `group` column.

    Raises:
        StackerError: naming the file, the rule and the first offending ids: an id not in the
            dataset, an id twice (in one repeat), a train id missing, folds not 0..K-1 or K < 2,
            a label that differs from the dataset's, a blank group, a group in more than one fold
            (named), or a class absent from a fold's training part.
    """
    path = Path(path)
    table = read_csv_strings(path) if path.suffix == ".csv" else _read_parquet(path)[0]
    _require_columns(table, ("id", "fold"), str(path), "a folds file has id, fold[, repeat][, group]")
    ids, labels, classes = _labelled(ids, labels, classes, "train ids")
    file_ids = table["id"].astype(str).to_numpy(dtype=object)
    unknown = ~pd.Index(file_ids).isin(ids)
    if unknown.any():
        raise StackerError(f"{path}: {int(unknown.sum())} id(s) that are not train ids, first "
                           f"{preview(file_ids[unknown])}; the file must be made for this dataset")
    repeat = _repeat_column(table, file_ids, str(path))
    rows = _rows_by_repeat(file_ids, repeat, ids, str(path))
    if "label" in table.columns:
        differ = (table["label"].astype(str).to_numpy(dtype=object)[rows] != labels).any(axis=0)
        if differ.any():
            raise StackerError(f"{path}: label differs from the train data's for ids {preview(ids[differ])}")
    matrix = _integers(table, "fold", file_ids, str(path))[rows]
    folds = assemble_folds(ids, labels, matrix, _fold_count(matrix, str(path)), None, classes)
    groups = _table_groups(table, rows, ids, str(path))
    folds = folds if groups is None else folds.with_groups(groups, str(path))
    check_training_parts(folds, str(path))
    return folds


def _require_columns(table: pd.DataFrame, needed, source: str, layout: str) -> None:
    missing = [c for c in needed if c not in table.columns]
    if missing:
        raise StackerError(f"{source}: missing column(s) {missing}; {layout}")


def _table_groups(table: pd.DataFrame, rows: np.ndarray, ids: np.ndarray, source: str) -> np.ndarray | None:
    """(N,) group of each row from a table's `group` column (None without one), the same in every repeat.

    Args:
        table: the folds table as read.
        rows: (R, N) row indices into `table` of each repeat's rows in `ids` order.
        ids: (N,) the rows' ids.
        source: the file, the start of an error.
    """
    if "group" not in table.columns:
        return None
    values = table["group"].to_numpy(dtype=object)
    groups = np.stack([group_strings(values[mine], ids, source) for mine in rows])  # (R, N)
    moved = (groups != groups[0]).any(axis=0)
    if moved.any():
        raise StackerError(f"{source}: ids with another group in another repeat, first {preview(ids[moved])}")
    return groups[0]


def _integers(table: pd.DataFrame, column: str, ids: np.ndarray, source: str) -> np.ndarray:
    values = pd.to_numeric(table[column], errors="coerce")
    bad = (values.isna() | (values != values.round())).to_numpy()
    if bad.any():
        raise StackerError(f"{source}: {column} must be an integer; first bad ids {preview(ids[bad])}")
    return values.to_numpy(dtype=np.int64)


def _repeat_column(table: pd.DataFrame, ids: np.ndarray, source: str) -> np.ndarray:
    """(rows,) repeat of each row (0 without a `repeat` column), numbered 0..R-1 with every repeat used."""
    if "repeat" not in table.columns:
        return np.zeros(len(ids), dtype=np.int64)
    repeat = _integers(table, "repeat", ids, source)
    _numbered(repeat, "repeats", "R", source)
    return repeat


def _numbered(values: np.ndarray, what: str, letter: str, source: str) -> int:
    """The count of a 0-based numbering (folds, repeats) in which every number is used."""
    used = sorted(int(v) for v in np.unique(values))
    n = used[-1] + 1 if used else 0
    if used != list(range(n)):
        raise StackerError(f"{source}: {what} must be 0..{letter}-1 with every {what[:-1]} used, got {used}")
    return n


def _rows_by_repeat(have: np.ndarray, repeat: np.ndarray, want: np.ndarray, source: str) -> np.ndarray:
    """(R, N) row indices into `have` putting each repeat's rows in `want`'s order; each id once per repeat."""
    n_repeats = int(repeat.max()) + 1 if len(repeat) else 1
    rows = np.empty((n_repeats, len(want)), dtype=np.int64)
    for r in range(n_repeats):
        mine = np.flatnonzero(repeat == r)
        where = f"{source} repeat {r}" if n_repeats > 1 else source
        rows[r] = mine[align(have[mine], want, where, "train")]
    return rows


def _fold_count(matrix: np.ndarray, source: str) -> int:
    """K of an (R, N) fold matrix: folds 0..K-1 all used in every repeat, the same K in each, K >= 2."""
    ks = []
    for r, fold in enumerate(matrix):
        ks.append(_numbered(fold, "folds", "K", source if len(matrix) == 1 else f"{source} repeat {r}"))
        if ks[-1] < 2:
            raise StackerError(f"{source}: needs at least 2 folds, got {ks[-1]}")
        if ks[-1] != ks[0]:
            raise StackerError(f"{source}: repeat {r} has {ks[-1]} folds, repeat 0 has {ks[0]}; "
                               "every repeat needs the same K")
    return ks[0]


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


# ---------------------------------------------------------------- folds.parquet


def write_folds(path: str | os.PathLike, folds: Folds) -> None:
    """folds.parquet: the table and, in the metadata, k, seed, classes, sha256 (and repeats when > 1,
    groups_sha256 with groups, the edits' record with edits: `FoldEdits.record`)."""
    meta = {"k": folds.k, "seed": folds.seed, "classes": list(folds.classes), "sha256": folds.sha256}
    if folds.repeats > 1:  # one assignment keeps the metadata (and so the bytes) it always had
        meta["repeats"] = folds.repeats
    if folds.groups is not None:  # likewise folds without groups
        meta["groups_sha256"] = folds.groups_sha256
    if folds.edits:  # and folds without edits
        meta["edits"] = folds.edits.record
    table = pa.Table.from_pandas(folds.table, preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), META_KEY: json.dumps(meta).encode()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def load_folds(path: str | os.PathLike) -> Folds:
    """Read a folds file (ours: parquet with metadata; anyone's: CSV or parquet with id, label, fold[, repeat]).

    Our own files are verified against their recorded sha256 (and groups_sha256), so a hand-edited
    file cannot silently change which model saw which row, or which rows the meta level resamples together.
    """
    path = Path(path)
    if not path.is_file():
        raise StackerError(f"{path}: folds file not found (run train-base first, or pass --folds)")
    if path.suffix == ".csv":
        return folds_from_table(read_csv_strings(path), str(path))
    table, meta = _read_parquet(path)
    folds = folds_from_table(table, str(path), classes=meta.get("classes"))
    if not meta:
        return folds
    if folds.sha256 != meta["sha256"] and not (folds.repeats == 1 and _row_order_digest(folds) == meta["sha256"]):
        raise StackerError(f"{path}: ids, labels or folds were changed after the file was made "
                           "(sha256 differs from the one recorded); make folds again with --force")
    if folds.groups_sha256 != meta.get("groups_sha256"):
        raise StackerError(f"{path}: groups were changed after the file was made (groups_sha256 differs from the "
                           "one recorded); make folds again with --force")
    if folds.k != meta["k"]:
        raise StackerError(f"{path}: has {folds.k} folds but records k={meta['k']}")
    if folds.repeats != meta.get("repeats", 1):
        raise StackerError(f"{path}: has {folds.repeats} repeat(s) but records repeats={meta.get('repeats', 1)}")
    unknown = set(folds.table["label"]) - set(folds.classes)
    if unknown:
        raise StackerError(f"{path}: labels {sorted(unknown)} are not among the recorded classes")
    edits = recorded_edits(folds, meta, str(path))
    # A file of stacker 0.1.0 keeps the digest it recorded, which its tables carry too.
    return replace(folds, seed=meta.get("seed"), sha256=meta["sha256"], edits=edits)


def recorded_edits(folds: Folds, meta: dict, source: str) -> FoldEdits:
    """The edits a folds file's metadata records (`NO_EDITS` without a record), checked against its rows.

    Raises:
        StackerError: a record changed after the file was made, an excluded id still among the rows, a
            relabelled id missing or holding another label, or a base fold outside 0..k-1 (or not one per repeat).
    """
    if "edits" not in meta:
        return NO_EDITS
    edits = FoldEdits.from_record(meta["edits"], source)
    here = dict(zip(folds.ids.tolist(), folds.table["label"].iloc[: folds.n_rows].tolist()))
    inside = [i for i in edits.excluded if i in here]
    if inside:
        raise StackerError(f"{source}: ids it records as excluded are among its rows, first {preview(inside)}")
    moved = [i for i, _, new in edits.relabels if here.get(i) != new]
    if moved:
        raise StackerError(f"{source}: ids it records as relabelled are missing or hold another label, first "
                           f"{preview(moved)}")
    bad = [r.id for r in edits.excluded_rows
           if len(r.folds) != folds.repeats or not all(0 <= f < folds.k for f in r.folds)]
    if bad:
        raise StackerError(f"{source}: excluded ids with base folds that are not one of 0..{folds.k - 1} per "
                           f"repeat, first {preview(bad)}")
    return edits


def _read_parquet(path: Path) -> tuple[pd.DataFrame, dict]:
    """A parquet file's table and its stacker metadata ({} for a file from another tool)."""
    if not path.is_file():
        raise StackerError(f"{path}: file not found")
    try:
        pf = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise StackerError(f"{path}: not a readable parquet file ({e})") from None
    raw = (pf.schema.metadata or {}).get(META_KEY)
    return pf.to_pandas(), (json.loads(raw) if raw else {})


def _row_order_digest(folds: Folds) -> str:
    """The digest stacker 0.1.0 recorded: the same rows hashed in file order, not sorted."""
    h = hashlib.sha256()
    for i, y, f in zip(folds.ids, folds.table["label"], folds.fold):
        h.update(f"{i}\t{y}\t{int(f)}\n".encode())
    return h.hexdigest()
