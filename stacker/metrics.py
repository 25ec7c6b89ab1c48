"""Scores of class probabilities: the configured metric, log-loss, paired bootstrap.

Every score is greater-is-better (scikit-learn's scorer convention, so log-loss
as a metric is `neg_log_loss`); `oof.log_loss` itself is reported as a loss.

The bootstrap resamples rows (or whole groups, when the folds have them) once and
scores every candidate on the same resamples (paired), as row-count weights: (B, N) counts, one row per resample.
Accuracy and log-loss are means over rows, so a resample's score is one matrix
product. Label metrics depend on the confusion matrix only: the (B, C, C)
confusion matrices of all resamples are one sparse product, and the common ones
(balanced accuracy, MCC, F1 / precision / recall / Jaccard with macro, micro,
weighted or binary averaging) are computed from them in numpy, checked against
scikit-learn in the tests; other label metrics call scikit-learn once per
resample on the C*C cells (about 1 ms each). ROC AUC (binary, one-vs-rest macro and weighted) sorts
each candidate's rows once and takes every resample's weighted pair counts from cumulative sums
(`weighted_auc`). Other probability metrics score all rows per resample: the slow case, seconds per
candidate.
"""
from __future__ import annotations

import warnings

import numpy as np
from scipy import sparse
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.metrics import get_scorer

from oof import StackerError, log_loss_rows

_ROW_MEANS = ("accuracy", "neg_log_loss")  # metrics that are a mean of per-row scores
_BOOTSTRAP_CHUNK = 100  # resamples drawn at once: (100, N) int64 indices, 8 MB at N=10,000


class _Predictions(ClassifierMixin, BaseEstimator):
    """Probabilities already made, posing as a classifier so any scikit-learn scorer can score them.

    `X` holds row indices into `proba`; `response_` records what the scorer asked
    for ("label" or "proba"), which tells a label metric from a probability one.
    """

    def __init__(self, proba):
        self.proba = proba

    def fit(self, X, y):  # scorers never fit; present for the estimator API
        return self

    def predict_proba(self, X):
        self.response_ = "proba"
        return self.proba[X[:, 0]]

    def predict(self, X):
        self.response_ = "label"
        return self.proba[X[:, 0]].argmax(axis=1)


class Metric:
    """A scikit-learn scorer name applied to (N, C) probabilities and integer labels.

    Args:
        name: scorer name, e.g. "accuracy", "neg_log_loss", "f1_macro".
        n_classes: C; labels are 0..C-1.
    """

    def __init__(self, name: str, n_classes: int):
        self.name = name
        self.n_classes = n_classes
        self._scorer = get_scorer(name)
        self.uses_labels = self._probe()

    def score(self, y: np.ndarray, proba: np.ndarray, sample_weight=None) -> float:
        """The metric of probabilities `proba` (N, C) for labels `y` (N,); greater is better."""
        if self.name in _ROW_MEANS and sample_weight is None:
            return float(self.rows(y, proba).mean())
        return self._call(y, proba, sample_weight)

    @property
    def row_mean(self) -> bool:
        """Whether the metric is the mean of per-row scores (`rows`)."""
        return self.name in _ROW_MEANS

    def rows(self, y: np.ndarray, proba: np.ndarray) -> np.ndarray:
        """(N,) per-row scores of a row-mean metric."""
        if self.name == "accuracy":
            return (proba.argmax(axis=1) == y).astype(np.float64)
        return -log_loss_rows(y, proba)

    def bootstrap(self, y: np.ndarray, probas: list[np.ndarray], counts: np.ndarray) -> np.ndarray:
        """(B, K) scores of K candidates' probabilities on B paired resamples.

        Args:
            y: (N,) labels.
            probas: K arrays (N, C).
            counts: (B, N) times each row is drawn in each resample.
        """
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a class absent from a resample warns, by design
            if self.name in _ROW_MEANS:
                rows = np.stack([self.rows(y, p) for p in probas], axis=1)  # (N, K)
                # over the rows drawn: N for a row bootstrap, varying with the groups' sizes for a cluster one
                totals = counts.sum(axis=1, dtype=np.float64)[:, None]
                return (counts @ rows.astype(np.float32)).astype(np.float64) / totals
            if self.uses_labels:
                return np.stack([self._bootstrap_labels(y, p.argmax(axis=1), counts) for p in probas], axis=1)
            if self.name in RANKING_METRICS:
                return np.stack([ranking_score(self.name, y, p, counts) for p in probas], axis=1)
            return np.array([[self._call(y, p, w) for p in probas] for w in counts])

    def _bootstrap_labels(self, y, pred, counts) -> np.ndarray:
        """(B,) scores of predicted labels (N,) from each resample's confusion cells."""
        c = self.n_classes
        cells, index = np.unique(y * c + pred, return_inverse=True)  # the (true, predicted) pairs seen
        onehot = sparse.csr_matrix((np.ones(len(y)), (np.arange(len(y)), index)), shape=(len(y), len(cells)))
        weights = np.asarray(counts @ onehot, dtype=np.float64)  # (B, n_cells) rows per pair per resample
        if self.name in CONFUSION_METRICS:
            confusion = np.zeros((len(counts), c * c))
            confusion[:, cells] = weights
            return confusion_score(self.name, confusion.reshape(-1, c, c))
        true, onehot_pred = cells // c, np.eye(c)[cells % c]
        return np.array([self._call(true, onehot_pred, w) for w in weights])

    def _call(self, y, proba, sample_weight=None) -> float:
        estimator = _Predictions(proba)
        estimator.classes_ = np.arange(self.n_classes)
        rows = np.arange(len(y))[:, None]
        kwargs = {} if sample_weight is None else {"sample_weight": sample_weight}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return float(self._scorer(estimator, rows, y, **kwargs))
        except ValueError as e:  # e.g. a class that no row of a fold or resample holds
            raise StackerError(f"stack.metric: {self.name!r} failed on {len(y)} rows ({e})") from None

    def _probe(self) -> bool:
        # Score a tiny C-class example once, to learn whether the scorer reads labels.
        c = self.n_classes
        y = np.arange(2 * c) % c
        proba = np.full((2 * c, c), 0.5 / max(c - 1, 1))
        proba[np.arange(2 * c), (y + np.arange(2 * c) // c) % c] = 0.5
        estimator = _Predictions(proba)
        estimator.classes_ = np.arange(c)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._scorer(estimator, np.arange(2 * c)[:, None], y)
        except Exception as e:  # scikit-learn raises many types for an unfit metric
            raise StackerError(f"stack.metric: {self.name!r} cannot score {c}-class predictions ({e})") from None
        return getattr(estimator, "response_", "label") == "label"


CONFUSION_METRICS = ("balanced_accuracy", "matthews_corrcoef") + tuple(
    f"{family}{average}" for family in ("f1", "precision", "recall", "jaccard")
    for average in ("", "_macro", "_micro", "_weighted"))


def confusion_score(name: str, confusion: np.ndarray) -> np.ndarray:
    """(B,) scikit-learn's `name` from (B, C, C) confusion matrices (rows true, columns predicted).

    As scikit-learn: averages run over the labels present in y_true or y_pred of
    each resample, a zero division counts 0, plain "f1" etc. score class 1 of two.
    """
    tp = np.diagonal(confusion, axis1=1, axis2=2)  # (B, C)
    true, pred = confusion.sum(axis=2), confusion.sum(axis=1)  # (B, C) rows of each true / predicted class
    n = true.sum(axis=1)  # (B,)
    with np.errstate(divide="ignore", invalid="ignore"):
        if name == "balanced_accuracy":
            return np.nanmean(np.where(true > 0, tp / true, np.nan), axis=1)
        if name == "matthews_corrcoef":
            cov_tp = tp.sum(axis=1) * n - (true * pred).sum(axis=1)
            denominator = np.sqrt((n ** 2 - (pred ** 2).sum(axis=1)) * (n ** 2 - (true ** 2).sum(axis=1)))
            return np.where(denominator > 0, cov_tp / denominator, 0.0)
        family, _, average = name.partition("_")
        if average == "micro":  # single-label multiclass: micro precision = recall = F1 = accuracy
            hits = tp.sum(axis=1)
            return hits / (2 * n - hits) if family == "jaccard" else hits / n
        denominator = {"precision": pred, "recall": true, "f1": (true + pred) / 2, "jaccard": true + pred - tp}[family]
        per_class = np.where(denominator > 0, tp / denominator, 0.0)  # (B, C)
    if average == "":
        return per_class[:, 1]
    if average == "weighted":
        return (per_class * true).sum(axis=1) / n
    present = (true + pred) > 0
    return (per_class * present).sum(axis=1) / present.sum(axis=1)


RANKING_METRICS = ("roc_auc", "roc_auc_ovr", "roc_auc_ovr_weighted")
_RANKING_CELLS = 5_000_000  # (resamples x rows) per chunk of `weighted_auc`: 40 MB of float64 per array


def ranking_score(name: str, y: np.ndarray, proba: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """(B,) scikit-learn's ROC AUC `name` of (N, C) probabilities on B resamples (`counts`, (B, N) row weights).

    As scikit-learn scores them with sample weights: with two classes every one is the AUC of the second
    class's probability; with more, "roc_auc_ovr" the mean of each class's one-vs-rest AUC and
    "roc_auc_ovr_weighted" their mean weighted by each class's weight in the resample. Each AUC sorts
    the rows once (`weighted_auc`), not once per resample.
    """
    if proba.shape[1] == 2:
        return weighted_auc(y == 1, proba[:, 1], counts)
    per_class = np.stack([weighted_auc(y == c, proba[:, c], counts) for c in range(proba.shape[1])], axis=1)
    if name == "roc_auc_ovr_weighted":
        support = np.stack([counts[:, y == c].sum(axis=1, dtype=np.float64) for c in range(proba.shape[1])], axis=1)
        return (per_class * support).sum(axis=1) / support.sum(axis=1)
    return per_class.mean(axis=1)


def weighted_auc(positive: np.ndarray, score: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """(B,) ROC AUC of `score` (N,) for the rows `positive` (N,) marks, each resample weighting the rows by its
    row of `counts` (B, N): the weighted share of (positive, negative) pairs ranked right, a tie counting one
    half, which is the trapezoid under scikit-learn's weighted ROC curve.

    The negatives are sorted by score once, and each positive's place among them found once (`searchsorted`,
    the ties' two ends); per resample, the negatives' weight below a positive is a cumulative sum read at those
    places, in chunks of resamples. NaN where a resample lacks a class.
    """
    positive = np.asarray(positive, dtype=bool)
    negatives, positives = np.flatnonzero(~positive), np.flatnonzero(positive)
    negatives = negatives[np.argsort(score[negatives], kind="stable")]
    ranked = score[negatives]
    below = np.searchsorted(ranked, score[positives], "left")  # negatives strictly below each positive
    through = np.searchsorted(ranked, score[positives], "right")  # ... and those tied with it
    out = np.empty(len(counts))
    step = max(1, _RANKING_CELLS // max(len(score), 1))
    for a in range(0, len(counts), step):
        chunk = counts[a:a + step]
        cumulative = np.zeros((len(chunk), len(negatives) + 1))
        np.cumsum(np.take(chunk, negatives, axis=1), axis=1, out=cumulative[:, 1:])
        pairs = 0.5 * (np.take(cumulative, below, axis=1) + np.take(cumulative, through, axis=1))
        weights = np.take(chunk, positives, axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            out[a:a + step] = (np.einsum("ij,ij->i", weights, pairs)
                               / (weights.sum(axis=1, dtype=np.float64) * cumulative[:, -1]))
    return out


def bootstrap_counts(y: np.ndarray, n_bootstrap: int, seed, groups: np.ndarray | None = None) -> np.ndarray:
    """(B, N) float32 times each row is drawn in each of B resamples, stratified by class.

    Each class's rows are resampled with replacement among themselves, so every
    resample holds every class as often as the data does: a rare class can never
    vanish from a resample and leave a per-class metric (AUC, recall) undefined.

    With `groups` ((N,) int group index: a duplicate cluster, a plant, a patient) the
    groups are the units drawn (a cluster bootstrap): each group is drawn with
    replacement among the groups of its majority label, and a drawn group brings all
    of its rows. Rows of one group are not independent draws (copies of one photo are
    scored alike), so resampling rows would make every interval too narrow. The
    output is the same one (B, N) matrix: (B, G) group counts taken per row.
    """
    y = np.asarray(y)
    if groups is None:
        return _stratified_counts(y, n_bootstrap, seed)
    groups = np.unique(np.asarray(groups), return_inverse=True)[1].ravel()  # 0..G-1
    n_groups = int(groups.max()) + 1 if len(groups) else 0
    votes = np.zeros((n_groups, int(y.max()) + 1 if len(y) else 1), dtype=np.int64)
    np.add.at(votes, (groups, y), 1)
    majority = votes.argmax(axis=1)  # ties go to the lower class index
    group_counts = _stratified_counts(majority, n_bootstrap, seed)  # (B, G)
    return np.take(group_counts, groups, axis=1)


def _stratified_counts(y: np.ndarray, n_bootstrap: int, seed) -> np.ndarray:
    """(B, N) float32 draws of each of N units, each class's units resampled among themselves."""
    n_rows = len(y)
    rng = np.random.default_rng(seed)
    classes = [np.flatnonzero(y == c) for c in np.unique(y)]
    counts = np.empty((n_bootstrap, n_rows), dtype=np.float32)
    draws = np.empty((min(_BOOTSTRAP_CHUNK, n_bootstrap), n_rows), dtype=np.int64)
    for start in range(0, n_bootstrap, _BOOTSTRAP_CHUNK):
        b = min(_BOOTSTRAP_CHUNK, n_bootstrap - start)
        # every class's draws (the same random numbers, in the same order, as one bincount per class)
        # side by side in one buffer, offset by resample, and counted in one bincount
        end = 0
        for rows in classes:
            block = draws[:b, end:end + len(rows)]
            np.take(rows, rng.integers(0, len(rows), size=(b, len(rows))), out=block)
            block += n_rows * np.arange(b)[:, None]
            end += len(rows)
        counts[start:start + b] = np.bincount(draws[:b].ravel(), minlength=b * n_rows).reshape(b, n_rows)
    return counts
