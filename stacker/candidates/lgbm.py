"""LightGBM meta-models: "wide" (one feature per model and class) and "class-shared".

Both early-stop on an inner split of the rows they are given (the training
folds only; never the held-out fold) and keep the booster at its best
iteration without a refit: a refit on all training rows would double the cost
of the nested guard for a small gain. Measured on the bench (10,000 rows x 35
models x 10 classes, 2-core CPU, one thread), one wide fit on 8,000 rows takes about 1.3 s.
"""
from __future__ import annotations

import re

import lightgbm as lgb
import numpy as np

from .base import Candidate, normalise_rows


def lgbm_params(config, seed: int) -> dict:
    """LightGBM parameters from the `StackConfig`, deterministic for a seed and thread count."""
    return {
        "learning_rate": config.lgbm_learning_rate,
        "num_leaves": config.lgbm_num_leaves,
        "max_depth": config.lgbm_max_depth,
        "min_data_in_leaf": config.lgbm_min_data_in_leaf,
        "feature_fraction": config.lgbm_feature_fraction,
        "bagging_fraction": config.lgbm_bagging_fraction,
        "bagging_freq": 1 if config.lgbm_bagging_fraction < 1 else 0,
        "lambda_l2": config.lgbm_lambda_l2,
        "max_bin": config.lgbm_max_bin,
        "num_threads": config.threads,
        "seed": int(seed),
        "deterministic": True,
        "force_col_wise": True,
        "verbose": -1,
    }


def inner_split(n_rows: int, valid_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Shuffled (train_rows, valid_rows) of range(n_rows) for early stopping; both non-empty."""
    order = np.random.default_rng(seed).permutation(n_rows)
    n_valid = min(max(1, int(round(valid_fraction * n_rows))), n_rows - 1)
    return np.sort(order[n_valid:]), np.sort(order[:n_valid])


def feature_names(names) -> list[str]:
    """LightGBM-safe feature names: it refuses JSON specials such as ':' and ','."""
    safe = [re.sub(r'[\s"\\,:\[\]{}]', "_", str(n)) for n in names]
    return safe if len(set(safe)) == len(safe) else [f"f{i}_{s}" for i, s in enumerate(safe)]


def train_booster(params: dict, X, y, config, groups: int = 1, names=None) -> lgb.Booster:
    """Train with early stopping on an inner split seeded by `params["seed"]`.

    Args:
        params: `lgbm_params` plus the objective.
        config: the `StackConfig` (inner split, rounds, early stopping).
        X, y: training features and labels, `groups` consecutive rows per original
            row (class-shared rows come C per image), split together so that one
            image never sits on both sides of the split.
        names: feature names for the booster's text.
    """
    n = len(y) // groups
    train, valid = inner_split(n, config.lgbm_valid_fraction, params["seed"])
    train = (train[:, None] * groups + np.arange(groups)).ravel()
    valid = (valid[:, None] * groups + np.arange(groups)).ravel()
    names = feature_names(names) if names is not None and len(names) == X.shape[1] else "auto"
    dtrain = lgb.Dataset(X[train], y[train], feature_name=names, free_raw_data=True)
    dvalid = lgb.Dataset(X[valid], y[valid], reference=dtrain)
    booster = lgb.train(params, dtrain, num_boost_round=config.lgbm_max_rounds, valid_sets=[dvalid],
                        callbacks=[lgb.early_stopping(config.lgbm_early_stopping, verbose=False)])
    return booster


class _Booster(Candidate):
    """A LightGBM meta-model; subclasses give the objective, the feature rows and the target.

    Args:
        config: the `StackConfig`, whose `lgbm_*` fields are the booster's parameters.
        seed: seed of this fit.
        models, classes: names, used only to label the booster's features.
    """

    features = ""  # what a feature row holds, for the saved state

    def __init__(self, config=None, seed: int = 0, models=(), classes=()):
        self.config = config
        self.seed = seed
        self.models = models
        self.classes = classes

    @classmethod
    def from_config(cls, config, metric, seed, models=(), classes=()):
        return cls(config, seed, models, classes)

    @classmethod
    def from_state(cls, state, booster_text=None):
        fitted = cls()
        fitted.booster_ = lgb.Booster(model_str=booster_text)
        fitted.best_iteration_ = int(state["best_iteration"])
        return fitted

    def fit(self, X, y):
        super().fit(X, y)
        n, m, c = X.shape
        params = {**lgbm_params(self.config, self.seed), **self._objective(m, c)}
        rows = self._rows(X)  # len(rows) // n feature rows per image, kept together by the inner split
        self.booster_ = train_booster(params, rows, self._target(y, c), self.config,
                                      groups=len(rows) // n, names=self._names())
        self.best_iteration_ = self.booster_.best_iteration or self.booster_.current_iteration()
        return self

    def _score(self, X) -> np.ndarray:
        return self.booster_.predict(self._rows(X), num_iteration=self.best_iteration_)

    def state(self):
        return {"best_iteration": self.best_iteration_, "features": self.features}

    def booster_text(self):
        return self.booster_.model_to_string(num_iteration=self.best_iteration_)


class LGBMWide(_Booster):
    """Multiclass booster over M*C features `<model>:<class>` (each model's probability of each class)."""

    name = "lgbm_wide"
    features = "probability of model m for class c at column m*C + c"

    def _objective(self, m, c):
        return {"objective": "multiclass", "num_class": c}

    def _rows(self, X):
        return X.reshape(len(X), -1)  # (N, M*C)

    def _target(self, y, c):
        return y

    def _names(self):
        return [f"{a}:{b}" for a in self.models for b in self.classes] or None

    def predict_proba(self, X):
        return self._score(X)


class LGBMClassShared(_Booster):
    """One binary booster over (row, class) pairs, then renormalised over classes per row.

    A pair's features are each model's probability of that class (M features,
    shared by all classes), its label whether the class is the row's; monotone
    increasing constraints say that more belief from any model never lowers the
    score. Probabilities rather than logits: trees split on ranks, so any
    monotone transform of a feature gives the same trees.
    """

    name = "lgbm_class_shared"
    features = "probability of model m for the pair's class at column m"

    def _objective(self, m, c):
        return {"objective": "binary", "monotone_constraints": [1] * m}

    def _rows(self, X):
        return _pairs(X)  # (N*C, M)

    def _target(self, y, c):
        return (np.arange(c)[None, :] == y[:, None]).ravel().astype(np.float64)  # (N*C,)

    def _names(self):
        return list(self.models) or None

    def predict_proba(self, X):
        return normalise_rows(self._score(X).reshape(len(X), -1))  # (N, C)


def _pairs(X: np.ndarray) -> np.ndarray:
    """(N, M, C) -> (N*C, M): row n*C + c holds every model's probability of class c."""
    n, m, c = X.shape
    return X.transpose(0, 2, 1).reshape(n * c, m)
