"""A split leak, named from the tables alone: near-duplicate rows (or one group's rows) in different folds.

When the folds split copies of one photo, each copy's OOF row comes from a fold model
that trained on another copy. Every flexible model then looks better on OOF rows than
on test rows, all at once, so comparing models with each other (`stacker.leak`) cannot
see it: the per-model check flags a few and keeps the rest.

The trace it leaves is in the rows themselves. Copies in different folds are predicted
alike by every model, so a typical OOF row has a near-identical twin in another fold,
far closer than rows of a set without copies lie to each other. The test rows are that
reference, with the same structure: with per-fold test tables each test row is taken
from one fold model (row t from fold model t mod K) and its twins are sought among the
rows of the other fold models, as an OOF row's are among the other folds; with a mean
table, among all other test rows (smoother predictions lie closer: that errs towards
not refusing). The statistic:

    share = the share of OOF rows whose nearest OOF row of another fold is nearer than
            the median test row's nearest test row (the test rows' own share is 1/2)

A shifted test set moves where rows lie, not whether the OOF rows come in twins, and
copies kept in one fold (groups) leave no cross-fold twin; `REFUSE_SHARE` is the share
at which fit-stack stops. Rows that every model is sure of are left out: sure rows of one
class are alike whether or not they are copies. The distance between two rows is their
worst model's Euclidean distance between the square roots of the probabilities (Hellinger
up to a factor): sure and unsure regions of the simplex count alike.

Nearest rows are found approximately, in O(N log N): rows are sorted along a few random
projections and compared with their `WINDOW` neighbours in each order; OOF and test rows
are searched the same way. The nearest distance shrinks slowly as the number of rows
grows; the test rows' median is extrapolated to the OOF rows' count (a power law, its
exponent fitted on subsets of the test rows, clipped to MAX_EXPONENT, over at most MAX_RATIO
times as many rows). A test set much smaller than the OOF rows leaves that extrapolation
uncertain: it errs towards a larger exponent (a nearer threshold, a lower share), so towards
missing a partial leak, not towards refusing honest folds. At most `MAX_ROWS` rows of each side
are used: 4.4 s at 1,000,000 OOF rows x 20 models x 10 classes (bench/leak_bench.py --split-cost).

Measured on bench/leak_bench.py's scenarios (docs/leak.md): random folds over near-copies give
0.60-0.66 with 2,000 test rows (0.55-0.62 with 300-600), copies kept in one fold, grouped rows and
sets without copies 0.35-0.50.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .leak import row_max

SURE = 0.99  # a row every model gives at least this to its top class says nothing about copies
WINDOW = 16  # neighbours compared along each projection
PROJECTIONS = 4
MAX_ROWS = 50_000  # rows of each side searched (a random sample): more cost time, not evidence
MIN_ROWS = 50  # fewer open OOF rows: no verdict
MIN_TEST_ROWS = 200  # fewer open test rows: their median nearest distance, extrapolated, is no reference
MIN_MODELS = 3  # twins "in every model" need several models: one model's rows coincide by chance
MAX_EXPONENT = 0.25  # measured 0-0.07 on 2,000 test rows of six families; a 3-model set of few classes is lower-dimensional
MAX_RATIO = 16  # the extrapolation from the test rows' count to the OOF rows' goes no further
REFUSE_SHARE = 0.55  # honest sets measured 0.35-0.50; random folds over copies 0.55-0.66 (docs/leak.md)
Z_REFUSE = 4.0  # and the share beyond 1/2 by 4 binomial standard errors: small sets need a clear excess


@dataclass(frozen=True)
class SplitLeak:
    """The statistic and its verdict.

    Attributes:
        share: OOF rows whose nearest row of another fold is nearer than the test reference distance.
        reference: that distance (the test rows' median nearest distance, scaled to the OOF rows' count).
        oof_rows, test_rows: rows searched on each side (open rows: not every model sure).
        leaks: share >= REFUSE_SHARE, and beyond 1/2 by Z_REFUSE binomial standard errors.
    """

    share: float
    reference: float
    oof_rows: int
    test_rows: int
    leaks: bool

    def message(self) -> str:
        return (f"the folds leak: {self.share:.0%} of the OOF rows have a near-identical twin in another fold "
                f"(nearer than the test rows' median twin, {self.reference:.3f}; a set without copies across "
                f"folds gives about 50%, the limit is {REFUSE_SHARE:.0%}): near-duplicate images or a group's "
                "rows were split across folds, so every model's OOF scores are optimistic. Make the folds "
                "again with folds.duplicates: group (train-base finds the copies) or a group column "
                "(folds.group_column, or `group` in folds.csv), and retrain; --allow-suspicious stacks anyway")

    def record(self) -> dict:
        return {"share": self.share, "reference": self.reference, "oof_rows": self.oof_rows,
                "test_rows": self.test_rows, "limit": REFUSE_SHARE, "leaks": self.leaks}


def split_leak(oof: np.ndarray, fold: np.ndarray, test: np.ndarray, test_folds: np.ndarray | None = None,
               seed: int = 0) -> SplitLeak | None:
    """The split-leak statistic (module docstring), or None when either side has too few open rows.

    Args:
        oof: (N, M, C) OOF probabilities.
        fold: (N,) fold of each OOF row.
        test: (T, M, C) test probabilities, the mean over fold models.
        test_folds: (K, T, M, C) each fold model's test probabilities, or None.
    """
    rng = np.random.default_rng(seed)
    if test_folds is not None and len(test_folds) > 1:
        t_fold = np.arange(test.shape[0]) % len(test_folds)
        reference = test_folds[t_fold, np.arange(test.shape[0])]  # (T, M, C): row t from fold model t mod K
    else:
        t_fold, reference = None, test
    o_rows, t_rows = _open_rows(oof, rng), _open_rows(reference, rng)
    if len(o_rows) < MIN_ROWS or len(t_rows) < MIN_TEST_ROWS or oof.shape[1] < MIN_MODELS:
        return None
    d_oof = nearest_distance(oof[o_rows], fold[o_rows], seed)
    d_test = nearest_distance(reference[t_rows], None if t_fold is None else t_fold[t_rows], seed)
    m_test = float(np.median(d_test))
    threshold = m_test * min(len(o_rows) / len(t_rows), MAX_RATIO) ** -_size_exponent(
        reference[t_rows], None if t_fold is None else t_fold[t_rows], m_test, rng, seed)
    share = float((d_oof < threshold).mean())
    z = (share - 0.5) / np.sqrt(0.25 / len(o_rows) + 0.25 / len(t_rows))  # both sides' medians are estimates
    return SplitLeak(share, threshold, len(o_rows), len(t_rows), bool(share >= REFUSE_SHARE and z >= Z_REFUSE))


def _size_exponent(p: np.ndarray, fold: np.ndarray | None, median: float, rng, seed: int) -> float:
    """b of median nearest distance ~ rows^-b, fitted on a quarter, a half and all of the test rows.

    Clipped to [0, MAX_EXPONENT]: on small sets the window search is nearly exact while on
    large ones it misses some nearest rows, so an exponent measured on a few hundred test rows
    overstates how much nearer the OOF rows' nearest rows are; too large an exponent would hide
    a leak, never invent one.
    """
    sizes, medians = [len(p)], [median]
    for share in (4, 2):
        rows = np.sort(rng.choice(len(p), len(p) // share, replace=False))
        if len(rows) >= MIN_ROWS:
            sizes.append(len(rows))
            medians.append(float(np.median(nearest_distance(p[rows], None if fold is None else fold[rows], seed))))
    if len(sizes) < 2 or min(medians) <= 0:
        return 0.0
    slope = np.polyfit(np.log(sizes), np.log(medians), 1)[0]
    return float(np.clip(-slope, 0, MAX_EXPONENT))


def _open_rows(p: np.ndarray, rng) -> np.ndarray:
    """Sorted rows on which some model is unsure (top probability under SURE), at most MAX_ROWS of them."""
    rows = np.flatnonzero((row_max(p) < SURE).any(axis=1))
    return np.sort(rng.choice(rows, MAX_ROWS, replace=False)) if len(rows) > MAX_ROWS else rows


def nearest_distance(p: np.ndarray, fold: np.ndarray | None, seed: int = 0) -> np.ndarray:
    """(N,) approximate distance from each row of (N, M, C) `p` to its nearest other row (of another fold).

    Distance: the largest over models of the Euclidean distance between square-rooted
    probability vectors. Candidates: each row's WINDOW neighbours in the order of each of
    PROJECTIONS random projections. A row with no candidate gets inf.
    """
    n, m, c = p.shape
    roots = np.sqrt(np.clip(p, 0, 1)).astype(np.float32)  # (N, M, C)
    directions = np.random.default_rng([seed, 3]).normal(size=(m * c, PROJECTIONS)).astype(np.float32)
    keys = roots.reshape(n, m * c) @ directions  # (N, P)
    best = np.full(n, np.inf, dtype=np.float32)
    for r in range(PROJECTIONS):
        order = np.argsort(keys[:, r], kind="stable")
        ranked = roots[order]  # (N, M, C) in this projection's order: each offset compares two slices
        ranked_fold = None if fold is None else fold[order]
        for offset in range(1, min(WINDOW, n - 1) + 1):
            diff = ranked[offset:] - ranked[:-offset]
            d = np.sqrt(np.einsum("nmc,nmc->nm", diff, diff).max(axis=1))
            if ranked_fold is not None:
                d[ranked_fold[offset:] == ranked_fold[:-offset]] = np.inf
            a, b = order[:-offset], order[offset:]  # within one offset each row appears once on each side
            best[a] = np.minimum(best[a], d)
            best[b] = np.minimum(best[b], d)
    return best
