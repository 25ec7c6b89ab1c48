"""LightGBM meta-models: "wide" (one feature per model and class) and "class-shared".

Both early-stop on an inner split of the rows they are given (the training
folds only; never the held-out fold) and keep the booster at its best
iteration without a refit: a refit on all training rows would double the cost
of the nested guard for a small gain.

Speed. The guard fits each booster 15 times (5 folds + 10 pairs for the nested
estimate) on subsets of the same rows. Binning the features (LightGBM `Dataset`
construction) costs as much as training: at 100,000 rows x 35 models x 10 classes
on the 2-core bench machine, 6.6 s CPU per wide fit. So `prepare` bins every OOF
row once (per worker task of the guard) and `fit_prepared` trains on
`Dataset.subset`s of it (0.14 s for 80% of the rows), for the inner training rows
and the early-stopping rows alike.

Why binning all rows is honest. The bins are quantiles of the feature values
alone: no label, no prediction, no held-out score enters them, so they cannot
carry a held-out row's label into a fit. It is the same kind of step as fitting
a scaler on every row's features, and the held-out rows' share of the 63
quantiles moves each boundary by a fraction of a bin (a quantile of 80,000 or of
100,000 rows differs by about its sampling error, well under 1% of the rows). What must
not see the held-out fold does not: the trees, the early-stopping split (drawn
from the training rows only) and its stopping round. On the bench, bins from all
rows and bins from the training rows alone give meta-level OOF accuracies within
0.0012 of each other (10,000 and 100,000 rows, both boosters) and the same choices.
The boundaries come from up to 50,000 sampled feature rows (`DATASET_PARAMS`),
drawn from all rows. `fit` (a candidate on its own, e.g. the final fit on all
rows) bins what it is given.

Rows per fit (`lgbm_max_rows`). A booster trains on at most `lgbm_max_rows`
(15,000) of the rows it is given, drawn by its seed; the guard scores exactly that
procedure, and the final fit on all rows follows it too. Its 7-leaf trees stop
after 50-150 rounds; past a few tens of thousands of rows they gain little, while
every round's histograms, gradients and score updates grow with the rows. On the
100,000-row bench (80,000 rows per fit), with the wide booster's 5 models per class
and tree (`lgbm_wide_models`), 15,000 rows against all 80,000: meta-level OOF
accuracy within 0.0008 for both boosters, log-loss 0.007 (wide) and 0.002
(class-shared) higher, and the 15 fits in the guard 31 s against 220 s (wide) and
35 s against 131 s (class-shared) of CPU. Log-loss pays more than accuracy: a user
who stacks for log-loss at this scale can raise the limit. Below it (the
10,000-row bench) nothing changes.
"""
from __future__ import annotations

import re

import lightgbm as lgb
import numpy as np

from .base import Candidate, normalise_rows


# Dataset (binning) parameters: one binned Dataset serves fits of different seeds, so its
# sampling seed is fixed, not the fit's. min_data_in_bin=3 is LightGBM's default. The bin
# boundaries come from 50,000 sampled rows (LightGBM's default samples 200,000): 63 quantiles are
# as good from 50,000 rows, and finding them from 100,000 took a third of binning's 8.5 s.
DATASET_PARAMS = {"data_random_seed": 1, "min_data_in_bin": 3, "feature_pre_filter": False, "verbose": -1,
                  "bin_construct_sample_cnt": 50_000}


def dataset_params(config) -> dict:
    """Parameters that decide the bins; the same for every fit that shares a binned Dataset."""
    return {**DATASET_PARAMS, "max_bin": config.lgbm_max_bin}


def lgbm_params(config, seed: int) -> dict:
    """LightGBM parameters from the `StackConfig`, deterministic for a seed.

    One thread: the guard runs fits in parallel processes (`config.n_jobs`), which
    keeps both cores busy without OpenMP threads waiting on each other.
    """
    return {
        **dataset_params(config),
        "learning_rate": config.lgbm_learning_rate,
        "num_leaves": config.lgbm_num_leaves,
        "max_depth": config.lgbm_max_depth,
        "min_data_in_leaf": config.lgbm_min_data_in_leaf,
        "feature_fraction": config.lgbm_feature_fraction,
        "bagging_fraction": config.lgbm_bagging_fraction,
        "bagging_freq": 1 if config.lgbm_bagging_fraction < 1 else 0,
        "lambda_l2": config.lgbm_lambda_l2,
        "num_threads": 1,
        "seed": int(seed),
        "deterministic": True,
        "force_col_wise": True,
    }


def inner_split(n_rows: int, valid_fraction: float, seed: int, groups: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """Shuffled (train_rows, valid_rows) of range(n_rows) for early stopping; both non-empty.

    With `groups` ((n_rows,) group of each row) whole groups go to one side, drawn in a shuffled
    order until the validation side holds about `valid_fraction` of the rows; one group alone
    (nothing to split) falls back to rows.
    """
    n_valid = min(max(1, int(round(valid_fraction * n_rows))), n_rows - 1)
    if groups is not None:
        names, group_of = np.unique(groups, return_inverse=True)
        if len(names) > 1:
            order = np.random.default_rng(seed).permutation(len(names))
            sizes = np.bincount(group_of.ravel(), minlength=len(names))[order]
            # the shortest prefix of shuffled groups reaching n_valid rows, leaving some group to train on
            take = min(int(np.searchsorted(np.cumsum(sizes), n_valid)) + 1, len(names) - 1)
            valid = np.isin(group_of.ravel(), order[:take])
            return np.flatnonzero(~valid), np.flatnonzero(valid)
    order = np.random.default_rng(seed).permutation(n_rows)
    return np.sort(order[n_valid:]), np.sort(order[:n_valid])


def wide_feature_fraction(config, n_models: int) -> float:
    """The wide booster's feature fraction for M models: about `lgbm_wide_models` per class (config)."""
    share = config.lgbm_feature_fraction
    return share if config.lgbm_wide_models < 0 else min(share, config.lgbm_wide_models / n_models)


def sample_rows(rows: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """Sorted `rows`, or `limit` of them drawn without replacement by `seed` when there are more (-1: all).

    Its own stream of `seed` ([seed, 1]), apart from the inner split's, which then splits what it draws.
    """
    if limit < 0 or len(rows) <= limit:
        return rows
    return np.sort(np.random.default_rng([seed, 1]).choice(rows, size=limit, replace=False))


def feature_names(names) -> list[str]:
    """LightGBM-safe feature names: it refuses JSON specials such as ':' and ','."""
    safe = [re.sub(r'[\s"\\,:\[\]{}]', "_", str(n)) for n in names]
    return safe if len(set(safe)) == len(safe) else [f"f{i}_{s}" for i, s in enumerate(safe)]


def train_booster(params: dict, binned: lgb.Dataset, rows: np.ndarray, config, groups: int = 1,
                  row_groups: np.ndarray | None = None) -> lgb.Booster:
    """Train on `binned`'s rows `rows`, early-stopping on an inner split of them seeded by `params["seed"]`.

    Args:
        params: `lgbm_params` plus the objective.
        binned: a constructed Dataset (`bin_features`) of `groups` consecutive feature rows
            per original row (class-shared rows come C per image).
        rows: sorted original rows to train on; the inner split keeps each one's feature
            rows together, so that one image never sits on both sides of the split.
        config: the `StackConfig` (inner split, rounds, early stopping).
        row_groups: (len(rows),) group of each of `rows`, kept whole by the inner split; None: rows.
    """
    train, valid = inner_split(len(rows), config.lgbm_valid_fraction, params["seed"], row_groups)
    train = (rows[train][:, None] * groups + np.arange(groups)).ravel()  # sorted, as subset() wants
    valid = (rows[valid][:, None] * groups + np.arange(groups)).ravel()
    booster = lgb.train(params, binned.subset(train), num_boost_round=config.lgbm_max_rounds,
                        valid_sets=[binned.subset(valid)],
                        callbacks=[lgb.early_stopping(config.lgbm_early_stopping, verbose=False)])
    return booster


def bin_features(features: np.ndarray, target: np.ndarray, config, names=None) -> lgb.Dataset:
    """A constructed (binned) Dataset of every feature row; fits take `subset`s of it.

    `free_raw_data=False` keeps the features that `subset` needs; `names` label the booster's features.
    """
    names = feature_names(names) if names is not None and len(names) == features.shape[1] else "auto"
    return lgb.Dataset(features, target, params=dataset_params(config), feature_name=names,
                       free_raw_data=False).construct()


class _Booster(Candidate):
    """A LightGBM meta-model; subclasses give the objective, the feature rows and the target.

    Args:
        config: the `StackConfig`, whose `lgbm_*` fields are the booster's parameters.
        seed: seed of this fit.
        models, classes: names, used only to label the booster's features.
    """

    meta_model = True

    features = ""  # what a feature row holds, for the saved state
    prepare_cost = 1.0  # binning every row costs about one fit

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

    @classmethod
    def prepare(cls, X, y, config, models=(), classes=()) -> lgb.Dataset:
        """Every row of (N, M, C) `X` binned once, for `fit_prepared` on subsets of the rows (module docstring)."""
        booster = cls(config, 0, models, classes)
        return bin_features(booster._rows(X), booster._target(y, X.shape[2]), config, booster._names())

    def fit(self, X, y):
        return self.fit_prepared(self.prepare(X, y, self.config, self.models, self.classes), np.arange(len(X)), X.shape)

    def fit_prepared(self, binned: lgb.Dataset, rows: np.ndarray, shape: tuple[int, int, int]):
        """Fit on the sorted original rows `rows` of `binned` (from `prepare` of an (N, M, C) `shape` X)."""
        n, m, c = shape
        self.n_models_ = m
        params = {**lgbm_params(self.config, self.seed), **self._objective(m, c)}
        groups = binned.num_data() // n  # feature rows per original row
        rows = sample_rows(np.asarray(rows), self.config.lgbm_max_rows, self.seed)
        row_groups = None if self.row_groups is None else np.asarray(self.row_groups)[rows]
        self.booster_ = train_booster(params, binned, rows, self.config, groups, row_groups)
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
        return {"objective": "multiclass", "num_class": c, "feature_fraction": wide_feature_fraction(self.config, m)}

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
    """(N, M, C) -> (N*C, M) float32: row n*C + c holds every model's probability of class c.

    One copy (a transpose cannot be a view of this shape), in float32: LightGBM bins
    float32 anyway, and at 100,000 rows x 10 classes x 35 models it is 140 MB, not 280.
    """
    n, m, c = X.shape
    out = np.empty((n, c, m), dtype=np.float32)
    out[...] = X.transpose(0, 2, 1)
    return out.reshape(n * c, m)
