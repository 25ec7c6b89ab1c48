"""Blends: candidates that average the models' probability rows, with fixed or fitted weights."""
from __future__ import annotations

import numpy as np

from oof import EPS, log_loss_rows

from ..metrics import Metric
from .base import LOG_EPS, Candidate, normalise_rows, softmax


class Mean(Candidate):
    """Arithmetic mean of the models' probabilities: no fitted state, the guard's floor."""

    name = "mean"

    def predict_proba(self, X):
        return X.mean(axis=1)  # (N, C)


class LogitMean(Candidate):
    """Geometric mean: mean of log-probabilities, then softmax over classes."""

    name = "logit_mean"

    def predict_proba(self, X):
        return softmax(np.log(np.clip(X, LOG_EPS, 1.0)).mean(axis=1))


class BestSingle(Candidate):
    """The one model that scores best on the training rows (ties: lower log-loss, then first).

    Args:
        metric: scores each model in `fit`; not needed to predict.
    """

    name = "best_single"

    def __init__(self, metric: Metric | None = None):
        self.metric = metric

    @classmethod
    def from_config(cls, config, metric, seed, models=(), classes=()):
        return cls(metric)

    @classmethod
    def from_state(cls, state, booster_text=None):
        best = cls()
        best.model_ = int(state["model_index"])
        return best

    def fit(self, X, y):
        super().fit(X, y)
        scores = np.array([self.metric.score(y, X[:, m]) for m in range(X.shape[1])])
        losses = np.array([log_loss_rows(y, X[:, m]).mean() for m in range(X.shape[1])])
        self.model_ = int(np.lexsort((losses, -scores))[0])
        return self

    def predict_proba(self, X):
        return X[:, self.model_]

    def state(self):
        return {"model_index": self.model_}


class EnsembleSelection(Candidate):
    """Greedy ensemble selection with replacement (Caruana et al., 2004).

    Sorted initialisation picks the `init` models of lowest log-loss once each;
    each further step adds the model (repeats allowed) whose addition gives the
    lowest log-loss; weights are picks / `steps`. It optimises log-loss, not the
    configured metric: log-loss is smooth and moves with every pick, where
    accuracy ties on most steps and lets noise choose; and the blend of
    probability rows needs only each model's probability of the true class,
    (N, M), so every step is one vectorised pass. The guard still scores the
    result with the configured metric.
    """

    name = "ensemble_selection"

    def __init__(self, steps: int = 50, init: int = 3):
        self.steps = steps
        self.init = init

    @classmethod
    def from_config(cls, config, metric, seed, models=(), classes=()):
        return cls(config.es_steps, config.es_init)

    @classmethod
    def from_state(cls, state, booster_text=None):
        blend = cls()
        blend.weights_ = np.asarray(state["weights"], dtype=np.float64)
        return blend

    def fit(self, X, y):
        super().fit(X, y)
        p_true = X[np.arange(len(y)), :, y]  # (N, M)
        self.weights_ = ensemble_selection(p_true, self.steps, self.init)
        return self

    def predict_proba(self, X):
        return normalise_rows(np.einsum("nmc,m->nc", X, self.weights_))

    def state(self):
        return {"weights": self.weights_.tolist()}


def ensemble_selection(p_true: np.ndarray, steps: int, init: int) -> np.ndarray:
    """(M,) weights = picks / steps from each model's true-class probabilities (N, M)."""
    n_models = p_true.shape[1]
    picks = np.zeros(n_models)
    start = np.argsort(-np.log(np.clip(p_true, EPS, 1)).mean(axis=0), kind="stable")[:min(init, n_models)]
    picks[start] += 1
    total = p_true[:, start].sum(axis=1)  # (N,) summed true-class probability of the picks so far
    for k in range(len(start), steps):
        trial = (total[:, None] + p_true) / (k + 1)  # (N, M): blend if model m were added
        best = int(np.argmin(-np.log(np.clip(trial, EPS, 1)).mean(axis=0)))
        picks[best] += 1
        total += p_true[:, best]
    return picks / picks.sum()
