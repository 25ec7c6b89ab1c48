"""Scores of class probabilities: the configured metric, log-loss, paired bootstrap.

Every score is greater-is-better (scikit-learn's scorer convention, so log-loss
as a metric is `neg_log_loss`); `log_loss` itself is reported as a loss.

The bootstrap resamples rows once and scores every candidate on the same
resamples (paired), as row-count weights: (B, N) counts, one row per resample.
Accuracy and log-loss are means over rows, so a resample's score is one matrix
product; label metrics (balanced accuracy, F1, ...) depend on the confusion
matrix only, so each resample scores the C*C confusion cells with their counts
as sample weights; other probability metrics (ROC AUC, ...) score all rows per
resample and are the slow case (seconds per candidate at 10,000 rows).
"""
from __future__ import annotations

import warnings

import numpy as np
from scipy import sparse
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.metrics import get_scorer

from oof import StackerError

EPS = 1e-15  # probability floor of log-loss: one confident miss costs at most -log(1e-15) = 34.5
_ROW_MEANS = ("accuracy", "neg_log_loss")  # metrics that are a mean of per-row scores
_BOOTSTRAP_CHUNK = 100  # resamples drawn at once: (100, N) int64 indices, 8 MB at N=10,000


def log_loss_rows(y: np.ndarray, proba: np.ndarray) -> np.ndarray:
    """(N,) -log of each row's probability on its true class, floored at EPS."""
    return -np.log(np.clip(proba[np.arange(len(y)), y], EPS, 1.0))


def log_loss(y: np.ndarray, proba: np.ndarray) -> float:
    return float(log_loss_rows(y, proba).mean())


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
                return (counts @ rows.astype(np.float32)).astype(np.float64) / len(y)
            if self.uses_labels:
                return np.stack([self._bootstrap_cells(y, p, counts) for p in probas], axis=1)
            return np.array([[self._call(y, p, w) for p in probas] for w in counts])

    def _bootstrap_cells(self, y, proba, counts) -> np.ndarray:
        # Label metrics depend on (true, predicted) pairs only: score the confusion cells.
        c = self.n_classes
        cell = y * c + proba.argmax(axis=1)  # (N,)
        cells, index = np.unique(cell, return_inverse=True)
        onehot = sparse.csr_matrix((np.ones(len(y)), (np.arange(len(y)), index)), shape=(len(y), len(cells)))
        weights = np.asarray(counts @ onehot)  # (B, n_cells)
        true, pred = cells // c, np.eye(c)[cells % c]
        return np.array([self._call(true, pred, w) for w in weights])

    def _call(self, y, proba, sample_weight=None) -> float:
        estimator = _Predictions(proba)
        estimator.classes_ = np.arange(self.n_classes)
        rows = np.arange(len(y))[:, None]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if sample_weight is None:
                return float(self._scorer(estimator, rows, y))
            return float(self._scorer(estimator, rows, y, sample_weight=sample_weight))

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


def bootstrap_counts(n_rows: int, n_bootstrap: int, seed) -> np.ndarray:
    """(B, N) float32 times each row is drawn in each of B resamples with replacement."""
    rng = np.random.default_rng(seed)
    chunks = []
    for start in range(0, n_bootstrap, _BOOTSTRAP_CHUNK):
        b = min(_BOOTSTRAP_CHUNK, n_bootstrap - start)
        draws = rng.integers(0, n_rows, size=(b, n_rows)) + n_rows * np.arange(b)[:, None]
        chunks.append(np.bincount(draws.ravel(), minlength=b * n_rows).reshape(b, n_rows))
    return np.concatenate(chunks).astype(np.float32)
