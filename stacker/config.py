"""StackConfig and SubmitConfig: every meta-level and submit option and its default, validated once.

These dataclasses are the single place the defaults live. The CLI builds them from
the raw config's `stack:` and `submit:` sections with `stack_config(cfg)` and
`submit_config(cfg)` (`oof.build_config`,
which names unknown keys); `__post_init__` checks every value against `RULES`
and then the rules that span fields, and a bad value raises `oof.StackerError`
with the key that holds it (`stack.min_gain: ...`).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import ClassVar

from oof import (BOOL, NULL, SEED, STRING, ConfigSection, Rule, StackerError, build_config, check_fields, each,
                 number, one_of)
from oof.run_config import SUBMIT_FORMATS  # submit.format's vocabulary, which the CLI reads too

from .candidates import FLOOR, candidate_names

TEST_FEATURES = ("mean", "per_fold")
TEST_MODELS = ("folds", "full", "both")

# scikit-learn scorers that score regressions: meaningless on class labels.
_REGRESSION_SCORERS = ("r2", "explained_variance", "neg_max_error", "d2_absolute_error_score",
                       "neg_mean_", "neg_median_", "neg_root_mean_")
# scikit-learn's clustering scorers: label permutations score the same, so a class prediction is not judged.
_CLUSTERING_SCORERS = ("rand_score", "mutual_info_score", "v_measure_score", "homogeneity_score",
                       "completeness_score", "fowlkes_mallows_score")


def _said(rule: Rule, text: str) -> Rule:
    """`rule` with the words an error uses for it replaced by `text`."""
    return Rule(rule.test, text)


COUNT = number(1, integer=True)
NON_NEGATIVE = number(0)
FRACTION = _said(number(0, 1, open_low=True), "a fraction in (0, 1]")
NO_LIMIT = _said(number(-1, -1, integer=True), "-1 for no limit")
EVERY_CORE = _said(number(-1, -1, integer=True), "-1 for every core")
ALL_FOLDS = _said(number(-1, -1, integer=True), "-1 for every fold model")


@dataclass
class StackConfig:
    """Options of fit-stack (the YAML `stack:` section).

    Attributes:
        metric: scikit-learn scorer name (greater is better), scored on class
            probabilities or argmax labels: "accuracy", "neg_log_loss",
            "balanced_accuracy", "f1_macro", ... Log-loss is reported always.
        candidates: candidates to score, from the registry (`stacker.candidates`,
            default every registered one); must hold "mean". Put in complexity order.
        min_gain: smallest metric gain over the mean that counts as real.
        confidence: paired-bootstrap win probability over the mean a more
            complex candidate needs; also the level of the reported intervals.
        n_bootstrap: bootstrap resamples of the rows.
        seed: seed of the bootstrap, the inner splits and LightGBM.
        test_features: "mean" applies the chosen candidate to the mean of the fold
            models' test probabilities (test.parquet); "per_fold" applies it to
            each fold model's test probabilities and averages the results. The
            meta-model was trained on single-model OOF rows, so "per_fold" feeds
            it features of the same sharpness; "mean" feeds it smoother, usually
            better-calibrated features it never saw. A plain mean is the same
            either way; trees and logistic regression can differ a little.
        allow_suspicious: keep models whose OOF looks leaked.
        nested: run the whole selection inside each outer fold for an honest
            estimate of the chosen candidate (about doubles the fitting work).
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
            Early stopping waits 10 rounds without a better validation loss: on the
            bench, against 20 rounds, the best round was the same for the class-shared
            booster and every score within 0.0015, for ~15% fewer rounds.
        lgbm_wide_models: the wide booster's trees each sample about this many of
            the M models' features per class: its feature fraction is
            min(`lgbm_feature_fraction`, this / M); -1 keeps `lgbm_feature_fraction`.
            Its M*C features are M models' views of the same C classes, and its cost
            grows with M: with 35 models (fraction 0.14 against 0.5) the bench's
            meta-OOF accuracy is within 0.0008 of the full fraction's at 10k and 100k rows,
            for a third of the time; with 3 models (the demo) it keeps 0.5, where a quarter had cost
            the demo's wide booster 0.006 of accuracy.
        lgbm_max_rows: rows a booster trains on (its early-stopping rows
            included); a fit given more trains on that many drawn at random by
            its seed, -1 for all. A booster of 7-leaf trees stops after 50-150
            rounds and gains little from more rows, while its cost grows with
            them: on the 100,000-row bench (80,000 rows per fit) 15,000 rows kept
            every meta-OOF accuracy within 0.0004, at a fifth of the time or
            less, and cost 0.002-0.008 of log-loss (`stacker.candidates.lgbm`).
        n_jobs: worker processes that run the guard's meta-level fits, each fit
            on one thread; -1 uses every core. Processes, not OpenMP threads:
            on the 2-core bench machine 2 LightGBM threads per fit took fit_stack
            from 44 s to 31 s when the machine was idle, but with another process
            keeping both cores busy a 3 s guard took 41 s (OpenMP threads waiting
            for a descheduled sibling at every barrier); independent fits in two
            processes share a busy core without waiting on each other. Small inputs
            (under a million meta-features) fit in-process: a pool costs more.
        predict_budget: seconds the stack's test side may take for `predict_rows`
            images, on the device predict-oof measured the costs on (a code
            competition's limit, less decoding and margin); the guard scores only
            ensembles that fit, choosing models and TTA views (`stacker.budget`).
            null: every model at every view.
        predict_rows: the images `predict_budget` and the predicted seconds are
            for (the hidden test set's size); null: the run's own test set.
        predict_speed_ratio: how many times faster the card the notebook runs on is
            than the one the costs were measured on (2.0: predicted seconds halve).
            No built-in card table: measure both on one model.
        predict_folds: fold models per model on the test side, the first ones of
            the run (repeat-major); -1 every one. Each OOF row comes from one fold
            model whatever this is, so no OOF row scores it: a setting, never chosen.
        test_models: which models' test predictions the stack is applied to:
            "folds" the mean of the fold models, "full" the model trained on every
            row (`train-base --full`, unvalidated: no OOF row comes from it),
            "both" the fold models and the full one, the full one weighted as one
            more fold.
        allow_full_meta: apply a fitted meta-model (logistic regression, LightGBM)
            to full-fit predictions: it learned from fold models' OOF rows, and a
            full model's are sharper, so without this only blends (means and
            weights, which only average) are applied to them.
    """

    SECTION: ClassVar[str] = "stack"
    RULES: ClassVar[dict] = {
        "metric": (_said(STRING, "a scikit-learn scorer name"),),
        "candidates": (each(STRING, "a list of candidate names"),),
        "min_gain": (NON_NEGATIVE,),
        "confidence": (_said(number(0.5, 1, open_high=True), "a probability in [0.5, 1)"),),
        # Below 100 resamples a 95% interval's tails rest on 2 or 3 of them; above 100,000 the
        # (B, N) float32 bootstrap counts pass 4 GB at N = 10,000 rows.
        "n_bootstrap": (number(100, 100_000, integer=True),),
        "seed": (SEED,),
        "test_features": (one_of(*TEST_FEATURES),),
        "allow_suspicious": (BOOL,),
        "nested": (BOOL,),
        "es_steps": (COUNT,),
        "es_init": (number(0, integer=True),),
        "logreg_alpha": (number(0, open_low=True),),
        "logreg_max_iter": (COUNT,),
        "lgbm_learning_rate": (number(0, 1, open_low=True),),
        "lgbm_num_leaves": (number(2, integer=True),),
        "lgbm_max_depth": (COUNT, NO_LIMIT),
        "lgbm_min_data_in_leaf": (COUNT,),
        "lgbm_feature_fraction": (FRACTION,),
        "lgbm_wide_models": (number(0, open_low=True), NO_LIMIT),
        "lgbm_bagging_fraction": (FRACTION,),
        "lgbm_lambda_l2": (NON_NEGATIVE,),
        "lgbm_max_rounds": (COUNT,),
        "lgbm_early_stopping": (COUNT,),
        "lgbm_valid_fraction": (_said(number(0, 1, open_low=True, open_high=True), "a fraction in (0, 1)"),),
        "lgbm_max_bin": (number(2, integer=True),),
        "lgbm_max_rows": (COUNT, NO_LIMIT),
        "n_jobs": (COUNT, EVERY_CORE),
        "predict_budget": (_said(number(0, open_low=True), "seconds > 0"), NULL),
        "predict_rows": (COUNT, NULL),
        "predict_speed_ratio": (number(0, open_low=True),),
        "predict_folds": (COUNT, ALL_FOLDS),
        "test_models": (one_of(*TEST_MODELS),),
        "allow_full_meta": (BOOL,),
    }

    metric: str = "accuracy"
    candidates: tuple[str, ...] = field(default_factory=candidate_names)
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
    lgbm_wide_models: float = 5
    lgbm_bagging_fraction: float = 0.7
    lgbm_lambda_l2: float = 10.0
    lgbm_max_rounds: int = 200
    lgbm_early_stopping: int = 10
    lgbm_valid_fraction: float = 0.2
    lgbm_max_bin: int = 63
    lgbm_max_rows: int = 15_000
    n_jobs: int = -1
    predict_budget: float | None = None
    predict_rows: int | None = None
    predict_speed_ratio: float = 1.0
    predict_folds: int = -1
    test_models: str = "folds"
    allow_full_meta: bool = False

    def __post_init__(self):
        check_fields(self)
        self.candidates = _check_candidates(self.candidates)
        _check_metric(self.metric)
        if self.es_init > self.es_steps:
            raise StackerError(f"stack.es_init: {self.es_init} initial picks exceed es_steps={self.es_steps}")

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    @property
    def threads(self) -> int:
        return (os.cpu_count() or 1) if self.n_jobs == -1 else self.n_jobs


def stack_config(cfg: dict) -> StackConfig:
    """The `StackConfig` of a raw config (`oof.load_config`): its `stack` section, checked."""
    return build_config(StackConfig, cfg.get("stack"), StackConfig.SECTION)


@dataclass
class SubmitConfig(ConfigSection):
    """Options of submit (the YAML `submit:` section).

    Attributes:
        format: what the submission's prediction columns hold. "labels": the
            argmax class in the sample's one label column. "proba": a probability
            per class in the sample's per-class columns, or with one column and
            two classes P(positive class), the second class in the run's class
            order. "auto": the sample decides (per-class columns or fractional
            placeholders ask for probabilities, class names for labels); where
            it cannot (one column of 0s and two classes, as Kaggle's AUC-scored
            binary competitions), `stack.metric` does: ROC AUC, average
            precision, log-loss or Brier score write P(positive class), any
            other metric labels. A 0/1 label throws an AUC's ranking away.
    """

    SECTION: ClassVar[str] = "submit"
    RULES: ClassVar[dict] = {"format": (one_of(*SUBMIT_FORMATS),)}

    format: str = "auto"


def submit_config(cfg: dict) -> SubmitConfig:
    """The `SubmitConfig` of a raw config (`oof.load_config`): its `submit` section, checked."""
    return build_config(SubmitConfig, cfg.get("submit"), SubmitConfig.SECTION)


def _check_candidates(names) -> tuple[str, ...]:
    """Registered, each once, the floor among them; returned in the registry's complexity order."""
    registry = candidate_names()  # read now: a candidate registered after import counts
    unknown = [c for c in names if c not in registry]
    if unknown:
        raise StackerError(f"stack.candidates: unknown candidate {unknown[0]!r}; "
                           f"choose from {list(registry)}")
    if len(set(names)) != len(names):
        raise StackerError(f"stack.candidates: a candidate is listed twice in {list(names)}")
    if FLOOR not in names:
        raise StackerError(f"stack.candidates: must include {FLOOR!r}, the floor the guard "
                           "compares every other candidate against")
    return tuple(c for c in registry if c in names)


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
