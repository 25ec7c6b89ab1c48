"""Candidates of the meta level: ways to combine M models' class probabilities.

Every candidate has the same small interface: `fit(X, y)` on the meta-features
of training rows and `predict_proba(X)`, where X is (N, M, C): N rows, M models,
C classes, each X[n, m] a probability row. `__init__` only stores arguments;
learned state ends in `_`; `state()` returns it as JSON-able values and
`booster_text()` a LightGBM model in its text format (None for the others), so
a decision is saved without pickle.

The LightGBM candidates live in `lgbm.py`; `make_combiner` builds any of them.
"""
from __future__ import annotations

import warnings

import numpy as np

from .config import StackConfig
from .metrics import Metric, log_loss_rows

# Probability floor before taking logs of meta-features: bounds one model's veto
# in a logit mean at log(1e-6) = -13.8, and keeps logistic-regression inputs finite.
LOG_EPS = 1e-6


def logits(X: np.ndarray) -> np.ndarray:
    """Log-probabilities centred over classes: (..., C) -> (..., C), softmax-invariant."""
    log_p = np.log(np.clip(X, LOG_EPS, 1.0))
    return log_p - log_p.mean(axis=-1, keepdims=True)


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def normalise_rows(p: np.ndarray) -> np.ndarray:
    """Rows scaled to sum to 1; a row of zeros becomes uniform."""
    total = p.sum(axis=-1, keepdims=True)
    uniform = np.full_like(p, 1.0 / p.shape[-1])
    return np.where(total > 0, p / np.where(total > 0, total, 1.0), uniform)


class Combiner:
    """Fit on (N, M, C) meta-features and labels; predict (N, C) probabilities."""

    name = ""

    def fit(self, X: np.ndarray, y: np.ndarray) -> "Combiner":
        self.n_models_ = X.shape[1]
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def state(self) -> dict:
        return {}

    def booster_text(self) -> str | None:
        return None

    def restore(self, state: dict, booster_text: str | None = None) -> "Combiner":
        """Put back the fitted state that `state()` (and `booster_text()`) saved."""
        return self


class Mean(Combiner):
    """Arithmetic mean of the models' probabilities: no fitted state, the guard's floor."""

    name = "mean"

    def predict_proba(self, X):
        return X.mean(axis=1)  # (N, C)


class LogitMean(Combiner):
    """Geometric mean: mean of log-probabilities, then softmax over classes."""

    name = "logit_mean"

    def predict_proba(self, X):
        return softmax(np.log(np.clip(X, LOG_EPS, 1.0)).mean(axis=1))


class BestSingle(Combiner):
    """The one model that scores best on the training rows (ties: lower log-loss, then first)."""

    name = "best_single"

    def __init__(self, metric: Metric):
        self.metric = metric

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

    def restore(self, state, booster_text=None):
        self.model_ = int(state["model_index"])
        return self


class EnsembleSelection(Combiner):
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

    def fit(self, X, y):
        super().fit(X, y)
        p_true = X[np.arange(len(y)), :, y]  # (N, M)
        self.weights_ = ensemble_selection(p_true, self.steps, self.init)
        return self

    def predict_proba(self, X):
        return normalise_rows(np.einsum("nmc,m->nc", X, self.weights_))

    def state(self):
        return {"weights": self.weights_.tolist()}

    def restore(self, state, booster_text=None):
        self.weights_ = np.asarray(state["weights"], dtype=np.float64)
        return self


def ensemble_selection(p_true: np.ndarray, steps: int, init: int) -> np.ndarray:
    """(M,) weights = picks / steps from each model's true-class probabilities (N, M)."""
    n_models = p_true.shape[1]
    picks = np.zeros(n_models)
    start = np.argsort(-np.log(np.clip(p_true, 1e-15, 1)).mean(axis=0), kind="stable")[:min(init, n_models)]
    picks[start] += 1
    total = p_true[:, start].sum(axis=1)  # (N,) summed true-class probability of the picks so far
    for k in range(len(start), steps):
        trial = (total[:, None] + p_true) / (k + 1)  # (N, M): blend if model m were added
        best = int(np.argmin(-np.log(np.clip(trial, 1e-15, 1)).mean(axis=0)))
        picks[best] += 1
        total += p_true[:, best]
    return picks / picks.sum()


class LogRegLogits(Combiner):
    """Multinomial logistic regression (L2, lbfgs) on every model's centred log-probabilities.

    C x (M*C) weights: with many models this can fit OOF noise, which the guard
    measures. `alpha` is the L2 strength per row (scikit-learn's C = 1 / (alpha * N)),
    so the same value means the same prior on 400 rows and on 10,000.
    """

    name = "logreg"

    def __init__(self, alpha: float = 0.1, max_iter: int = 300):
        self.alpha = alpha
        self.max_iter = max_iter

    def fit(self, X, y):
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression

        super().fit(X, y)
        self.n_classes_ = X.shape[2]
        self.model_ = LogisticRegression(C=1.0 / (self.alpha * len(y)), max_iter=self.max_iter, tol=1e-4)
        with warnings.catch_warnings():
            # A capped lbfgs is regularisation too; the guard scores what it gives.
            warnings.simplefilter("ignore", ConvergenceWarning)
            self.model_.fit(_flat_logits(X), y)
        return self

    def predict_proba(self, X):
        out = np.zeros((len(X), self.n_classes_))  # a class absent from training gets 0
        out[:, self.model_.classes_] = self.model_.predict_proba(_flat_logits(X))
        return out

    def state(self):
        return {"classes_seen": self.model_.classes_.tolist(), "coef": self.model_.coef_.tolist(),
                "intercept": self.model_.intercept_.tolist(), "n_classes": self.n_classes_,
                "features": "centred log-probabilities, model-major"}

    def restore(self, state, booster_text=None):
        from sklearn.linear_model import LogisticRegression

        self.model_ = LogisticRegression()
        self.model_.classes_ = np.asarray(state["classes_seen"])
        self.model_.coef_ = np.asarray(state["coef"], dtype=np.float64)
        self.model_.intercept_ = np.asarray(state["intercept"], dtype=np.float64)
        self.model_.n_features_in_ = self.model_.coef_.shape[1]
        self.n_classes_ = int(state["n_classes"])
        return self


def _flat_logits(X: np.ndarray) -> np.ndarray:
    return logits(X).reshape(len(X), -1).astype(np.float32)  # (N, M*C), feature m*C + c


def make_combiner(name: str, config: StackConfig, metric: Metric, seed: int,
                  models=(), classes=()) -> Combiner:
    """A fresh, unfitted candidate `name` (one of `config.CANDIDATES`).

    Args:
        seed: seed of this fit (LightGBM subsampling and its inner split).
        models, classes: names, used only to label LightGBM features.
    """
    from .lgbm import LGBMClassShared, LGBMWide

    if name == "mean":
        return Mean()
    if name == "logit_mean":
        return LogitMean()
    if name == "best_single":
        return BestSingle(metric)
    if name == "ensemble_selection":
        return EnsembleSelection(config.es_steps, config.es_init)
    if name == "logreg":
        return LogRegLogits(config.logreg_alpha, config.logreg_max_iter)
    if name == "lgbm_wide":
        return LGBMWide(config, seed, models, classes)
    if name == "lgbm_class_shared":
        return LGBMClassShared(config, seed, models, classes)
    raise ValueError(f"unknown candidate {name!r}")  # the config validated the vocabulary
