"""Candidates and scores: shapes, known answers, the bootstrap against a direct resample."""
import warnings

import numpy as np
import pytest
from sklearn.metrics import get_scorer

from stack_fixtures import fast_config, noisy_copy, pure_noise
from stacker import CANDIDATES, EnsembleSelection, Metric, ensemble_selection, make_combiner
from stacker.lgbm import feature_names
from stacker.metrics import CONFUSION_METRICS, _Predictions, bootstrap_counts

C = 10


@pytest.fixture(scope="module")
def meta():
    """(X, y): 300 rows, 4 models of falling accuracy, 10 classes."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, C, 300)
    X = np.stack([noisy_copy(y, C, a, rng) for a in (0.9, 0.7, 0.5, 0.3)], axis=1)  # (N, M, C)
    return X, y


@pytest.mark.parametrize("name", CANDIDATES)
def test_every_candidate_predicts_probability_rows(meta, name):
    X, y = meta
    combiner = make_combiner(name, fast_config(), Metric("accuracy", C), seed=0,
                             models=["a", "b", "c", "d"], classes=[f"k:{c}" for c in range(C)])
    proba = combiner.fit(X[:200], y[:200]).predict_proba(X[200:])
    assert proba.shape == (100, C)
    np.testing.assert_allclose(proba.sum(axis=1), 1, atol=1e-6)
    assert (proba >= 0).all()
    state = combiner.state()
    assert isinstance(state, dict)
    assert (combiner.booster_text() is not None) == name.startswith("lgbm")


def test_mean_and_logit_mean_known_answers():
    X = np.array([[[0.5, 0.5], [0.9, 0.1]]])  # (1, 2, 2)
    y = np.array([0])
    mean = make_combiner("mean", fast_config(), Metric("accuracy", 2), 0).fit(X, y)
    np.testing.assert_allclose(mean.predict_proba(X), [[0.7, 0.3]])
    geometric = make_combiner("logit_mean", fast_config(), Metric("accuracy", 2), 0).fit(X, y)
    expected = np.sqrt([0.5 * 0.9, 0.5 * 0.1])
    np.testing.assert_allclose(geometric.predict_proba(X), [expected / expected.sum()])


def test_ensemble_selection_favours_the_strong_models(meta):
    X, y = meta
    weights = EnsembleSelection(steps=40, init=2).fit(X, y).weights_
    assert weights.sum() == pytest.approx(1)
    assert weights[0] == weights.max() and weights[0] > 0.4
    assert weights[:2].sum() > weights[2:].sum()
    assert np.all(np.round(weights * 40) == weights * 40)  # picks / steps


def test_ensemble_selection_starts_with_the_best_and_repeats():
    # model 1 is best alone; model 2 is useless: it is never picked.
    p_true = np.array([[0.6, 0.9, 0.01], [0.9, 0.6, 0.01]])  # (N=2, M=3)
    weights = ensemble_selection(p_true, steps=4, init=1)
    assert weights[2] == 0 and weights.sum() == pytest.approx(1)
    assert weights[0] > 0 and weights[1] > 0  # the blend of 0 and 1 beats either alone


def test_best_single_picks_the_strongest_on_training_rows(meta):
    X, y = meta
    best = make_combiner("best_single", fast_config(), Metric("accuracy", C), 0).fit(X, y)
    assert best.state() == {"model_index": 0}


def test_lgbm_feature_names_are_made_safe():
    assert feature_names(["convnext:cat", "vit:a,b"]) == ["convnext_cat", "vit_a_b"]
    assert feature_names(["a:b", "a_b"]) == ["f0_a_b", "f1_a_b"]


BINARY = ("f1", "precision", "recall", "jaccard")  # average="binary": two classes only


@pytest.mark.parametrize("name, n_classes", [
    (name, n) for n in (2, 6) for name in ("accuracy", "neg_log_loss", "top_k_accuracy", *CONFUSION_METRICS)
    if n == 2 or name not in BINARY])
def test_bootstrap_scores_equal_scikit_learn_on_the_resampled_rows(name, n_classes):
    rng = np.random.default_rng(1)
    y = rng.integers(0, n_classes, 300)
    if n_classes > 2 and name in CONFUSION_METRICS:
        y[y == n_classes - 1] = 0  # a class no row holds: averages must run over present labels
    probas = [noisy_copy(y, n_classes, 0.7, rng), pure_noise(300, n_classes, rng)]
    metric = Metric(name, n_classes)
    counts = bootstrap_counts(y, 40, seed=3)
    boot = metric.bootstrap(y, probas, counts)  # (B, 2)
    assert boot.shape == (40, 2)
    for b in (0, 17, 39):
        rows = np.repeat(np.arange(len(y)), counts[b].astype(int))
        for k, proba in enumerate(probas):
            direct = sklearn_score(name, y[rows], proba[rows], n_classes)
            assert boot[b, k] == pytest.approx(direct, abs=1e-6), (name, b, k)


def sklearn_score(name, y, proba, n_classes):
    """scikit-learn's own scorer on plain rows, the reference for Metric."""
    estimator = _Predictions(proba)
    estimator.classes_ = np.arange(n_classes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_scorer(name)(estimator, np.arange(len(y))[:, None], y)


def test_bootstrap_counts_are_seeded_resamples_stratified_by_class():
    y = np.repeat([0, 1, 2], [45, 4, 1])  # a rare class must never vanish from a resample
    counts = bootstrap_counts(y, 120, seed=0)
    assert counts.shape == (120, 50) and (counts.sum(axis=1) == 50).all()
    for c, n in enumerate([45, 4, 1]):
        assert (counts[:, y == c].sum(axis=1) == n).all()
    np.testing.assert_array_equal(counts, bootstrap_counts(y, 120, seed=0))
    assert not np.array_equal(counts, bootstrap_counts(y, 120, seed=1))
