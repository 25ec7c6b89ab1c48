"""StackConfig: every meta-level option and its default, validated once.

This dataclass is the single place the defaults live. The CLI builds it from
the YAML `stack:` mapping (`oof.build_config(StackConfig, mapping, "stack")`,
which names unknown keys), so every value is checked here and a bad one raises `oof.StackerError` with the
key that holds it (`stack.min_gain: ...`).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from oof import StackerError

# The candidate vocabulary, in complexity order: the guard prefers an earlier
# name when scores are within noise. `mean` is the floor (no fitted state); the
# logit mean has none either but changes the blend's shape; `best_single` fits
# one discrete choice; ensemble selection fits M non-negative weights; the
# class-shared booster learns one monotone function of M features shared by all
# classes; logistic regression fits C x (M*C) free weights; the wide booster
# learns C tree ensembles over M*C features, the most freedom of all.
CANDIDATES = ("mean", "logit_mean", "best_single", "ensemble_selection",
              "lgbm_class_shared", "logreg", "lgbm_wide")
FLOOR = "mean"
TEST_FEATURES = ("mean", "per_fold")

# scikit-learn scorers that score regressions: meaningless on class labels.
_REGRESSION_SCORERS = ("r2", "explained_variance", "neg_max_error", "d2_absolute_error_score",
                       "neg_mean_", "neg_median_", "neg_root_mean_")
# scikit-learn's clustering scorers: label permutations score the same, so a class prediction is not judged.
_CLUSTERING_SCORERS = ("rand_score", "mutual_info_score", "v_measure_score", "homogeneity_score",
                       "completeness_score", "fowlkes_mallows_score")


@dataclass
class StackConfig:
    """Options of fit-stack (the YAML `stack:` section).

    Attributes:
        metric: scikit-learn scorer name (greater is better), scored on class
            probabilities or argmax labels: "accuracy", "neg_log_loss",
            "balanced_accuracy", "f1_macro", ... Log-loss is reported always.
        candidates: combiners to score, from `CANDIDATES`; must hold "mean".
        min_gain: smallest metric gain over the mean that counts as real.
        confidence: paired-bootstrap win probability over the mean a more
            complex candidate needs; also the level of the reported intervals.
        n_bootstrap: bootstrap resamples of the rows.
        seed: seed of the bootstrap, the inner splits and LightGBM.
        test_features: "mean" applies the combiner to the mean of the fold
            models' test probabilities (test.parquet); "per_fold" applies it to
            each fold model's test probabilities and averages the results. The
            meta-model was trained on single-model OOF rows, so "per_fold" feeds
            it features of the same sharpness; "mean" feeds it smoother, usually
            better-calibrated features it never saw. A plain mean is the same
            either way; trees and logistic regression can differ a little.
        allow_suspicious: keep models whose OOF looks leaked.
        nested: run the whole selection inside each outer fold for an honest
            estimate of the chosen combiner (about doubles the fitting work).
        es_steps: total picks of ensemble selection, initial ones included.
        es_init: best models picked once each before the greedy steps.
        logreg_alpha: L2 strength per row of the logistic regression on logits
            (scikit-learn's C = 1 / (alpha * rows)). M*C collinear features
            overfit fast: on the bench (35 models, 8,000 rows) alpha=0.1 lost
            0.5 points of accuracy to the mean and alpha=0.00125 lost 4.
        logreg_max_iter: lbfgs iterations of the logistic regression.
        lgbm_*: LightGBM meta-model parameters. Defaults are conservative on
            purpose: meta-features are few, strong and collinear, so shallow
            trees, large leaves, subsampling and L2 keep the booster from
            memorising OOF noise; early stopping uses an inner split of the
            training folds only (`lgbm_valid_fraction`) and rounds are capped.
        n_jobs: threads of each LightGBM fit; -1 uses every core. 1 by default:
            on the 2-core bench machine 2 threads took fit_stack from 44 s to
            31 s when the machine was idle, but with another process keeping
            both cores busy a 3 s guard took 41 s (OpenMP threads waiting for
            a descheduled sibling at every barrier). Raise it on a machine of your own.
    """

    metric: str = "accuracy"
    candidates: tuple[str, ...] = CANDIDATES
    min_gain: float = 0.002
    confidence: float = 0.95
    n_bootstrap: int = 1000
    seed: int = 42
    test_features: str = "mean"
    allow_suspicious: bool = False
    nested: bool = True
    es_steps: int = 50
    es_init: int = 3
    logreg_alpha: float = 0.1
    logreg_max_iter: int = 300
    lgbm_learning_rate: float = 0.1
    lgbm_num_leaves: int = 7
    lgbm_max_depth: int = 3
    lgbm_min_data_in_leaf: int = 100
    lgbm_feature_fraction: float = 0.5
    lgbm_bagging_fraction: float = 0.7
    lgbm_lambda_l2: float = 10.0
    lgbm_max_rounds: int = 200
    lgbm_early_stopping: int = 20
    lgbm_valid_fraction: float = 0.2
    lgbm_max_bin: int = 63
    n_jobs: int = 1

    def __post_init__(self):
        for name, (ok, expected) in _RULES.items():
            value = getattr(self, name)
            if not ok(value):
                raise StackerError(f"stack.{name}: expected {expected}, got {value!r}")
        self.candidates = _check_candidates(self.candidates)
        _check_metric(self.metric)
        if self.es_init > self.es_steps:
            raise StackerError(f"stack.es_init: {self.es_init} initial picks exceed es_steps={self.es_steps}")

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    @property
    def threads(self) -> int:
        return (os.cpu_count() or 1) if self.n_jobs == -1 else self.n_jobs


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _fraction(v) -> bool:
    return _is_number(v) and 0 < v <= 1


_RULES = {
    "metric": (lambda v: isinstance(v, str), "a scikit-learn scorer name"),
    "min_gain": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "confidence": (lambda v: _is_number(v) and 0.5 <= v < 1, "a probability in [0.5, 1)"),
    "n_bootstrap": (lambda v: _is_int(v) and v >= 100, "an integer >= 100"),
    "seed": (_is_int, "an integer"),
    "test_features": (lambda v: v in TEST_FEATURES, f"one of {list(TEST_FEATURES)}"),
    "allow_suspicious": (lambda v: isinstance(v, bool), "true or false"),
    "nested": (lambda v: isinstance(v, bool), "true or false"),
    "es_steps": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "es_init": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "logreg_alpha": (lambda v: _is_number(v) and v > 0, "a number > 0"),
    "logreg_max_iter": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "lgbm_learning_rate": (lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "lgbm_num_leaves": (lambda v: _is_int(v) and v >= 2, "an integer >= 2"),
    "lgbm_max_depth": (lambda v: _is_int(v) and (v >= 1 or v == -1), "an integer >= 1, or -1 for no limit"),
    "lgbm_min_data_in_leaf": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "lgbm_feature_fraction": (_fraction, "a fraction in (0, 1]"),
    "lgbm_bagging_fraction": (_fraction, "a fraction in (0, 1]"),
    "lgbm_lambda_l2": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "lgbm_max_rounds": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "lgbm_early_stopping": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "lgbm_valid_fraction": (lambda v: _is_number(v) and 0 < v < 1, "a fraction in (0, 1)"),
    "lgbm_max_bin": (lambda v: _is_int(v) and v >= 2, "an integer >= 2"),
    "n_jobs": (lambda v: _is_int(v) and (v >= 1 or v == -1), "an integer >= 1, or -1 for every core"),
}


def _check_candidates(candidates) -> tuple[str, ...]:
    if isinstance(candidates, str) or not hasattr(candidates, "__iter__"):
        raise StackerError(f"stack.candidates: expected a list of names from {list(CANDIDATES)}, "
                           f"got {candidates!r}")
    names = list(candidates)
    unknown = [c for c in names if c not in CANDIDATES]
    if unknown:
        raise StackerError(f"stack.candidates: unknown candidate {unknown[0]!r}; "
                           f"choose from {list(CANDIDATES)}")
    if len(set(names)) != len(names):
        raise StackerError(f"stack.candidates: a candidate is listed twice in {names}")
    if FLOOR not in names:
        raise StackerError(f"stack.candidates: must include {FLOOR!r}, the floor the guard "
                           "compares every other candidate against")
    return tuple(c for c in CANDIDATES if c in names)  # complexity order


def _check_metric(metric: str) -> None:
    from sklearn.metrics import get_scorer_names  # lazy: building a config stays cheap

    if metric not in get_scorer_names():
        raise StackerError(f"stack.metric: {metric!r} is not a scikit-learn scorer name "
                           "(e.g. accuracy, neg_log_loss, balanced_accuracy, f1_macro)")
    if metric.startswith(_REGRESSION_SCORERS):
        raise StackerError(f"stack.metric: {metric!r} scores regressions, not class predictions")
    if metric.endswith(_CLUSTERING_SCORERS):
        raise StackerError(f"stack.metric: {metric!r} scores clusterings (it ignores which label is which), "
                           "not class predictions")
