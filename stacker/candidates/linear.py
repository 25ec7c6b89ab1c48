"""Linear candidates: logistic regression on every model's centred log-probabilities."""
from __future__ import annotations

import warnings

import numpy as np

from .base import Candidate, logits


class LogRegLogits(Candidate):
    """Multinomial logistic regression (L2, lbfgs) on every model's centred log-probabilities.

    C x (M*C) weights: with many models this can fit OOF noise, which the guard
    measures. `alpha` is the L2 strength per row (scikit-learn's C = 1 / (alpha * N)),
    so the same value means the same prior on 400 rows and on 10,000.
    """

    meta_model = True

    name = "logreg"

    def __init__(self, alpha: float = 0.1, max_iter: int = 300):
        self.alpha = alpha
        self.max_iter = max_iter

    @classmethod
    def from_config(cls, config, metric, seed, models=(), classes=()):
        return cls(config.logreg_alpha, config.logreg_max_iter)

    @classmethod
    def from_state(cls, state, booster_text=None):
        from sklearn.linear_model import LogisticRegression

        # scikit-learn has no constructor from fitted values: these are the attributes its predict reads.
        model = LogisticRegression()
        model.classes_ = np.asarray(state["classes_seen"])
        model.coef_ = np.asarray(state["coef"], dtype=np.float64)
        model.intercept_ = np.asarray(state["intercept"], dtype=np.float64)
        model.n_features_in_ = model.coef_.shape[1]
        linear = cls()
        linear.model_, linear.n_classes_ = model, int(state["n_classes"])
        return linear

    @classmethod
    def prepare(cls, X, y, config, models=(), classes=()):
        return _flat_logits(X), y  # every row's features once per guard task, not once per fit

    def fit_prepared(self, prepared, rows, shape):
        features, y = prepared
        self.n_models_ = shape[1]
        return self._fit_features(features[rows], y[rows], shape[2])

    def fit(self, X, y):
        super().fit(X, y)
        return self._fit_features(_flat_logits(X), y, X.shape[2])

    def _fit_features(self, features: np.ndarray, y: np.ndarray, n_classes: int) -> "LogRegLogits":
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression

        self.n_classes_ = n_classes
        self.model_ = LogisticRegression(C=1.0 / (self.alpha * len(y)), max_iter=self.max_iter, tol=1e-4)
        with warnings.catch_warnings():
            # A capped lbfgs is regularisation too; the guard scores what it gives.
            warnings.simplefilter("ignore", ConvergenceWarning)
            self.model_.fit(features, y)
        return self

    def predict_proba(self, X):
        out = np.zeros((len(X), self.n_classes_))  # a class absent from training gets 0
        out[:, self.model_.classes_] = self.model_.predict_proba(_flat_logits(X))
        return out

    def state(self):
        return {"classes_seen": self.model_.classes_.tolist(), "coef": self.model_.coef_.tolist(),
                "intercept": self.model_.intercept_.tolist(), "n_classes": self.n_classes_,
                "features": "centred log-probabilities, model-major"}


def _flat_logits(X: np.ndarray) -> np.ndarray:
    return logits(X).reshape(len(X), -1).astype(np.float32)  # (N, M*C), feature m*C + c
