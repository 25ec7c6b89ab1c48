"""Blends: candidates that average the models' probability rows, with fixed or fitted weights.

Rank and power averaging are not candidates, on purpose. A rank average replaces
each model's probabilities by their ranks over the rows: its output is no
probability row (log-loss, the per_fold test features and the contract's
row sums lose their meaning; normalising the rows back breaks the ranks), and a
test row's value depends on the other test rows it is ranked with. It can only
help a ranking metric (AUC) when the models' scales differ, and there the
geometric mean (`logit_mean`) and fitted `weights` already absorb scale
differences of models that output probabilities, as ours do. A power mean
(mean of p^k) is one more exponent between the arithmetic and the max, a
Kaggle leaderboard knob that the guard would have to pay for with one more
comparison on the same rows for a gain it cannot separate from noise.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from oof import EPS, log_loss_rows

from ..metrics import Metric
from .base import LOG_EPS, Candidate, normalise_rows, softmax


class _Fixed(Candidate):
    """A candidate that learns nothing from rows: its guard fits take none."""

    def fit_prepared(self, prepared, rows, shape):
        self.n_models_ = shape[1]
        return self


class Mean(_Fixed):
    """Arithmetic mean of the models' probabilities: no fitted state, the guard's floor."""

    name = "mean"

    def predict_proba(self, X):
        return X.mean(axis=1)  # (N, C)


class LogitMean(_Fixed):
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

    @classmethod
    def prepare(cls, X, y, config, models=(), classes=()):
        """Under a metric that is a mean over rows (accuracy, log-loss), every model's per-row scores
        and log-losses, (N, M) each, once per guard task: a fit then only averages its rows. Under
        other metrics, the rows."""
        metric = Metric(config.metric, X.shape[2])
        if not metric.row_mean:
            return X, y
        per_model = range(X.shape[1])
        return _RowScores(np.stack([metric.rows(y, X[:, m]) for m in per_model], axis=1),
                          np.stack([log_loss_rows(y, X[:, m]) for m in per_model], axis=1))

    def fit_prepared(self, prepared, rows, shape):
        if not isinstance(prepared, _RowScores):
            return super().fit_prepared(prepared, rows, shape)
        self.n_models_ = shape[1]
        return self._pick(prepared.scores[rows].mean(axis=0), prepared.losses[rows].mean(axis=0))

    def fit(self, X, y):
        super().fit(X, y)
        scores = np.array([self.metric.score(y, X[:, m]) for m in range(X.shape[1])])
        return self._pick(scores, np.array([log_loss_rows(y, X[:, m]).mean() for m in range(X.shape[1])]))

    def _pick(self, scores: np.ndarray, losses: np.ndarray) -> "BestSingle":
        self.model_ = int(np.lexsort((losses, -scores))[0])  # best score, then lowest log-loss, then first
        return self

    def predict_proba(self, X):
        return X[:, self.model_]

    def state(self):
        return {"model_index": self.model_}


@dataclass
class _RowScores:
    """`BestSingle.prepare` under a row-mean metric: (N, M) per-row scores and log-losses."""

    scores: np.ndarray
    losses: np.ndarray


class WeightedBlend(Candidate):
    """A weighted mean of the models' probability rows: (M,) weights on the simplex, fitted by a subclass."""

    @classmethod
    def from_state(cls, state, booster_text=None):
        blend = cls()
        blend.weights_ = np.asarray(state["weights"], dtype=np.float64)
        return blend

    @classmethod
    def prepare(cls, X, y, config, models=(), classes=()):
        return true_class_proba(X, y)  # all the weights are fitted on

    def fit_prepared(self, prepared, rows, shape):
        self.n_models_ = shape[1]
        return self.fit_weights(prepared[rows])

    def fit(self, X, y):
        super().fit(X, y)
        return self.fit_weights(true_class_proba(X, y))

    def fit_weights(self, p_true: np.ndarray) -> "WeightedBlend":
        """Set `weights_` from each model's probability of each training row's true class, (N, M)."""
        raise NotImplementedError

    def predict_proba(self, X):
        return normalise_rows(np.einsum("nmc,m->nc", X, self.weights_))

    def state(self):
        return {"weights": self.weights_.tolist()}


class EnsembleSelection(WeightedBlend):
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

    def fit_weights(self, p_true):
        self.weights_ = ensemble_selection(p_true, self.steps, self.init)
        return self


def true_class_proba(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(N, M) each model's probability of each row's true class, from (N, M, C) X and (N,) labels."""
    return X[np.arange(len(y)), :, y]


def ensemble_selection(p_true: np.ndarray, steps: int, init: int) -> np.ndarray:
    """(M,) weights = picks / steps from each model's true-class probabilities (N, M).

    Each step scores every model's addition by the summed log of (picks so far + it):
    the blend's log-loss up to the constant log(k + 1) of dividing by the k + 1 picks.
    Logs in float32 (2.4x faster at 100,000 rows), summed in float64: the same picks
    as float64 logs on the bench at 10,000 and 100,000 rows.
    """
    n_models = p_true.shape[1]
    picks = np.zeros(n_models)
    start = np.argsort(-np.log(np.clip(p_true, EPS, 1)).mean(axis=0), kind="stable")[:min(init, n_models)]
    picks[start] += 1
    p = p_true.astype(np.float32)
    total = p[:, start].sum(axis=1)  # (N,) summed true-class probability of the picks so far
    trial = np.empty_like(p)  # (N, M): picks so far + model m, then its log
    for k in range(len(start), steps):
        np.add(total[:, None], p, out=trial)
        np.maximum(trial, np.float32(EPS * (k + 1)), out=trial)  # the blend clipped at EPS, times k + 1
        np.log(trial, out=trial)
        best = int(np.argmax(trial.sum(axis=0, dtype=np.float64)))  # first of equals, as argmin of the loss
        picks[best] += 1
        total += p[:, best]
    return picks / picks.sum()


class SimplexWeights(WeightedBlend):
    """Non-negative weights summing to 1 that minimise the blend's log-loss on the training rows (SLSQP).

    The continuous relative of ensemble selection: M free weights instead of
    picks in steps of 1/steps, so it can fit OOF noise more closely; the guard
    measures whether that pays. It minimises log-loss whatever the configured
    metric: accuracy and other label metrics are step functions of the weights
    (zero gradient almost everywhere: SLSQP could not move, and a search over the
    steps would follow noise), while log-loss is a proper score of the blend and
    convex in the weights (minus the log of a linear function), so SLSQP from
    uniform weights reaches its one minimum, the same on every run. The guard
    scores the result with the configured metric.

    Args:
        max_iter: SLSQP iterations; a stop at the cap keeps the weights reached
            when they improve on the start (`simplex_weights`).

    Attributes:
        weights_: (M,) the weights; uniform (the plain mean) when SLSQP gave
            nothing better.
        converged_: SLSQP's own verdict; False for a fallback or a stop at the cap.
    """

    name = "weights"

    def __init__(self, max_iter: int = 200):
        self.max_iter = max_iter

    @classmethod
    def from_state(cls, state, booster_text=None):
        blend = super().from_state(state, booster_text)
        blend.converged_ = bool(state["converged"])
        return blend

    def fit_weights(self, p_true):
        self.weights_, self.converged_ = simplex_weights(p_true, self.max_iter)
        return self

    def state(self):
        return {**super().state(), "converged": self.converged_}


class TemperatureMean(Candidate):
    """The mean of the models' probabilities recalibrated by one temperature: softmax(log(mean) / T).

    A mean of models is less sure than its members where they disagree and as
    sure as they are where they share a mistake; one temperature fitted on the
    training rows (Guo et al., 2017) corrects the blend's overall sharpness at
    the cost of one scalar. T is found by a bounded search on log T (T in
    [1/100, 100]), minimising log-loss, which is convex in 1/T and so unimodal
    there: the search finds its one minimum.

    T > 0 keeps each row's order of classes, and in the binary case the order of
    rows by P(positive): the mean's labels and binary rankings are untouched, so
    under a label metric or a binary ROC AUC / average precision it would tie
    the mean exactly. `unsuited` says so and the guard leaves it out there (one
    line in the log and decision.json's "left_out") rather than fit and score a
    copy of the floor. Under multiclass AUC a class's ranking across rows can
    change, so it stays.

    Attributes:
        temperature_: T; 1 when the search gave nothing finite.
    """

    name = "temperature"

    @classmethod
    def unsuited(cls, metric):
        if metric.uses_labels:
            return f"it keeps the mean's predicted labels, so under {metric.name} it would tie the mean"
        if metric.n_classes == 2 and metric.name.startswith(_BINARY_RANK_METRICS):
            return f"it keeps the mean's order of rows, so under binary {metric.name} it would tie the mean"
        return None

    @classmethod
    def from_state(cls, state, booster_text=None):
        scaled = cls()
        scaled.temperature_ = float(state["temperature"])
        return scaled

    def fit(self, X, y):
        super().fit(X, y)
        self.temperature_ = fit_temperature(_log_mean(X), y)
        return self

    def predict_proba(self, X):
        return softmax(_log_mean(X) / self.temperature_)

    def state(self):
        return {"temperature": self.temperature_}


# scikit-learn scorers that read a binary problem's P(positive) only through its order over the rows.
_BINARY_RANK_METRICS = ("roc_auc", "average_precision")
# The temperature's search range: T in [1/100, 100]. The bench's mean of 35 models needs T = 0.50 (its
# log-loss out of fold 0.261, against 0.385 at T = 1); on rows the mean gets all right the loss keeps falling as T -> 0,
# and the bound stops it there, with a blend already near-certain (the guard scores it out of fold).
_LOG_T_BOUNDS = (-np.log(100.0), np.log(100.0))


def _log_mean(X: np.ndarray) -> np.ndarray:
    """(N, C) log of the models' mean probabilities (floored at LOG_EPS)."""
    return np.log(np.clip(X.mean(axis=1), LOG_EPS, 1.0))


def simplex_weights(p_true: np.ndarray, max_iter: int = 200) -> tuple[np.ndarray, bool]:
    """(M,) weights >= 0 summing to 1 that minimise the log-loss of p_true @ w, and whether SLSQP converged.

    Args:
        p_true: (N, M) each model's probability of each row's true class.
        max_iter: SLSQP iterations.

    SLSQP starts from uniform weights (the plain mean). Its result is kept when it
    is finite and no worse than uniform on these rows, even after a stop at
    `max_iter`; otherwise the uniform weights are returned: never worse than the mean.
    """
    from scipy.optimize import minimize  # lazy: only a fit needs it

    n_models = p_true.shape[1]
    uniform = np.full(n_models, 1.0 / n_models)

    def loss(w):
        return float(-np.log(np.clip(p_true @ w, EPS, None)).mean())

    def grad(w):  # (M,) d loss / d w
        return -(p_true / np.clip(p_true @ w, EPS, None)[:, None]).mean(axis=0)

    sums_to_one = {"type": "eq", "fun": lambda w: w.sum() - 1.0, "jac": lambda w: np.ones_like(w)}
    result = minimize(loss, uniform, jac=grad, method="SLSQP", bounds=[(0.0, 1.0)] * n_models,
                      constraints=(sums_to_one,), options={"maxiter": max_iter, "ftol": 1e-9})
    w = np.clip(np.nan_to_num(result.x, nan=-1.0), 0.0, None)  # SLSQP may overstep a bound by ~1e-12
    if not w.sum() > 0:
        return uniform, False
    w = w / w.sum()
    if loss(w) > loss(uniform):
        return uniform, False
    return w, bool(result.success)


def fit_temperature(log_p: np.ndarray, y: np.ndarray) -> float:
    """The T > 0 that minimises the log-loss of softmax(log_p / T) for labels y; 1 when the search fails.

    Args:
        log_p: (N, C) log-probabilities (any per-row shift: softmax ignores it).
        y: (N,) labels.
    """
    from scipy.optimize import minimize_scalar  # lazy: only a fit needs it

    true = log_p[np.arange(len(y)), y]  # (N,)

    def loss(log_t):
        t = np.exp(log_t)
        z = log_p / t
        top = z.max(axis=1)
        log_norm = top + np.log(np.exp(z - top[:, None]).sum(axis=1))  # (N,) log-sum-exp
        return float((log_norm - true / t).mean())

    result = minimize_scalar(loss, bounds=_LOG_T_BOUNDS, method="bounded", options={"xatol": 1e-4})
    if not np.isfinite(result.x) or not loss(result.x) <= loss(0.0):
        return 1.0
    return float(np.exp(result.x))
