"""The interface every meta-level candidate shares, and the array helpers its families use.

A candidate combines M models' class probabilities. X is (N, M, C): N rows, M
models, C classes, each X[n, m] a probability row. `__init__` only stores
hyperparameters; `fit(X, y)` learns from training rows and its learned state
ends in `_`; `predict_proba(X)` gives (N, C). Two classmethods are the only
ways to build one: `from_config` (fresh, hyperparameters from the StackConfig)
and `from_state` (fitted, from what `state()` and `booster_text()` saved as
JSON and LightGBM text, so a decision is saved without pickle).
"""
from __future__ import annotations

from typing import ClassVar

import numpy as np

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


class Candidate:
    """Fit on (N, M, C) meta-features and labels; predict (N, C) probabilities.

    A subclass sets `name` (its word in `stack.candidates` and decision.json) and
    overrides `predict_proba`, and where it learns something `fit`, `state`,
    `from_state` (and `booster_text` for a LightGBM model); `from_config` where
    it has hyperparameters; `unsuited` where some metrics cannot see what it changes.
    """

    name: ClassVar[str] = ""
    # About how many fits `prepare` costs; 1 or more: the guard gives it fewer, longer tasks (`split_keys`).
    prepare_cost: ClassVar[float] = 0.0
    # A meta-model learns a function of its features from the OOF rows (LightGBM, logistic regression): fold
    # models' sharpness is what it learned on, so full-fit predictions reach it only with stack.allow_full_meta.
    meta_model: ClassVar[bool] = False

    @classmethod
    def from_config(cls, config, metric, seed: int, models=(), classes=()) -> "Candidate":
        """A fresh, unfitted candidate with its hyperparameters from the config.

        Args:
            config: the `StackConfig`.
            metric: the configured `Metric`.
            seed: seed of this fit (LightGBM subsampling and its inner split).
            models, classes: names, used only to label LightGBM features.
        """
        return cls()

    @classmethod
    def from_state(cls, state: dict, booster_text: str | None = None) -> "Candidate":
        """The fitted candidate that `state()` (and `booster_text()`) saved, ready to predict.

        Hyperparameters only steer `fit`, so they are not needed here.
        """
        return cls()

    @classmethod
    def unsuited(cls, metric) -> str | None:
        """Why this candidate cannot score differently from the mean under `metric`, or None.

        A reason leaves the candidate out of that fit (`suited_candidates`): it could
        only tie the floor, so fitting and scoring it would cost time and say nothing.
        """
        return None

    # (N,) group of each row of the X that `prepare` (or `fit`) sees, set by the guard before a fit; None:
    # independent rows. A candidate that splits its training rows (LightGBM's early stopping) keeps groups
    # whole, or copies of one photo on both sides of the split make its validation loss optimistic.
    row_groups: np.ndarray | None = None

    @classmethod
    def prepare(cls, X: np.ndarray, y: np.ndarray, config, models=(), classes=()):
        """What the fits of one guard task share, made once from all N rows (`stacker.guard.fit_keys`).

        The default is the rows themselves. A candidate that transforms its rows
        before it learns (log-probabilities, LightGBM's bins) does so once here, not
        once per fit on a copy of the training rows.
        """
        return X, y

    def fit_prepared(self, prepared, rows: np.ndarray, shape: tuple[int, int, int]) -> "Candidate":
        """Fit on the sorted rows `rows` of `prepare`'s result, made from an X of (N, M, C) `shape`."""
        X, y = prepared
        return self.fit(X[rows], y[rows])

    def fit(self, X: np.ndarray, y: np.ndarray) -> "Candidate":
        self.n_models_ = X.shape[1]
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def state(self) -> dict:
        """The learned state as JSON-able values; {} when nothing is learned."""
        return {}

    def booster_text(self) -> str | None:
        """A LightGBM model in its text format; None for candidates without one."""
        return None
