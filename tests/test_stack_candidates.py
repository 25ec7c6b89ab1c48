"""Candidates and scores: shapes, known answers, rebuilding from saved state, the registry,
the bootstrap against a direct resample."""
import json
import warnings

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import get_scorer

from oof import RunPaths, StackerError, read_table
from stack_fixtures import fast_config, make_run_folds, noisy_copy, pure_noise, specialists, write_run
from stacker import (CANDIDATES, Candidate, EnsembleSelection, Metric, StackConfig, candidate_class,
                     candidate_names, create_candidate, ensemble_selection, fit_stack, load_stack, register,
                     registered, unregister)
from stacker.candidates.lgbm import feature_names
from stacker.metrics import CONFUSION_METRICS, RANKING_METRICS, _Predictions, bootstrap_counts

C = 10


@pytest.fixture(scope="module")
def meta():
    """(X, y): 300 rows, 4 models of falling accuracy, 10 classes."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, C, 300)
    X = np.stack([noisy_copy(y, C, a, rng) for a in (0.9, 0.7, 0.5, 0.3)], axis=1)  # (N, M, C)
    return X, y


@pytest.mark.parametrize("name", CANDIDATES)
def test_every_candidate_predicts_probability_rows_and_rebuilds_from_its_state(meta, name):
    X, y = meta
    candidate = create_candidate(name, fast_config(), Metric("accuracy", C), seed=0,
                                 models=["a", "b", "c", "d"], classes=[f"k:{c}" for c in range(C)])
    proba = candidate.fit(X[:200], y[:200]).predict_proba(X[200:])
    assert proba.shape == (100, C)
    np.testing.assert_allclose(proba.sum(axis=1), 1, atol=1e-6)
    assert (proba >= 0).all()
    state, booster = candidate.state(), candidate.booster_text()
    assert (booster is not None) == name.startswith("lgbm")
    saved = json.loads(json.dumps(state))  # what combiner.json holds
    rebuilt = candidate_class(name).from_state(saved, booster)
    # logreg fits float32 features with float32 weights; its rebuilt weights are float64: ~1e-6 apart
    np.testing.assert_allclose(rebuilt.predict_proba(X[200:]), proba, rtol=1e-5, atol=1e-9)


def test_mean_and_logit_mean_known_answers():
    X = np.array([[[0.5, 0.5], [0.9, 0.1]]])  # (1, 2, 2)
    y = np.array([0])
    mean = create_candidate("mean", fast_config(), Metric("accuracy", 2), 0).fit(X, y)
    np.testing.assert_allclose(mean.predict_proba(X), [[0.7, 0.3]])
    geometric = create_candidate("logit_mean", fast_config(), Metric("accuracy", 2), 0).fit(X, y)
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
    best = create_candidate("best_single", fast_config(), Metric("accuracy", C), 0).fit(X, y)
    assert best.state() == {"model_index": 0}


def test_lgbm_feature_names_are_made_safe():
    assert feature_names(["convnext:cat", "vit:a,b"]) == ["convnext_cat", "vit_a_b"]
    assert feature_names(["a:b", "a_b"]) == ["f0_a_b", "f1_a_b"]


# ---------------------------------------------------------------- the registry


class LeastSure(Candidate):
    """A test-only candidate that knows the specialists fixture's secret: per row, trust the less sure model
    (a specialist is surest exactly where it is wrong). It fits nothing and scores 1.0 there."""

    name = "least_sure"

    def predict_proba(self, X):
        model = X.max(axis=2).argmin(axis=1)  # (N,) the model whose top probability is lowest
        return X[np.arange(len(X)), model]


def specialists_run(root, n_classes=4):
    """A run of two specialists (classes 0-1 and 2-3): the mean follows the wrong one on every row."""
    rng = np.random.default_rng(0)
    folds = make_run_folds(300, n_classes, seed=0)
    y_test = rng.integers(0, n_classes, 30)
    known = {"a": [0, 1], "b": [2, 3]}
    oof = {m: specialists(folds.y, rng, k, n_classes=n_classes) for m, k in known.items()}
    test = {m: specialists(y_test, rng, k, n_classes=n_classes) for m, k in known.items()}
    return write_run(root, folds, oof, test, [f"t{i}" for i in range(30)]), folds


def test_a_registered_candidate_is_scored_reported_chosen_and_rebuilt(tmp_path):
    root, folds = specialists_run(tmp_path / "run")
    paths = RunPaths(root)
    with registered(LeastSure, before="best_single"):
        assert candidate_names()[:4] == ("mean", "logit_mean", "least_sure", "best_single")
        assert "least_sure" in StackConfig().candidates  # the default is every registered candidate
        config = fast_config(candidates=["best_single", "least_sure", "mean"])
        assert config.candidates == ("mean", "least_sure", "best_single")  # complexity order
        decision = fit_stack(root, config, log=None)
        assert decision["chosen"] == "least_sure", decision["reason"]
        saved = json.loads(paths.decision.read_text())
        assert list(saved["candidates"]) == ["mean", "least_sure", "best_single"]
        assert saved["candidates"]["least_sure"]["score"] == 1.0 and saved["candidates"]["mean"]["score"] < 0.1
        assert all(f["chosen"] == "least_sure" for f in saved["nested"]["folds"])
        assert "* least_sure" in paths.stack_report.read_text()
        board = pd.read_csv(paths.leaderboard)
        rows = board[board["kind"] == "candidate"].set_index("name")
        assert rows.loc["least_sure", "chosen"] == True and rows["chosen"].sum() == 1  # noqa: E712
        guard = load_stack(root)
        assert isinstance(guard.candidate_, LeastSure)
        tables = {m: read_table(paths.test(m), folds.classes, "test") for m in ("a", "b")}
        expected = read_table(paths.stack_test, folds.classes, "test").proba
        np.testing.assert_allclose(guard.predict_table(tables).proba, expected)
    assert "least_sure" not in candidate_names() and candidate_names() == CANDIDATES
    with pytest.raises(StackerError, match=r"stack\.candidates: unknown candidate 'least_sure'"):
        StackConfig(candidates=["mean", "least_sure"])
    with pytest.raises(StackerError, match=r"decision\.json: stack\.candidates: unknown candidate 'least_sure'"):
        load_stack(root)


def test_register_refuses_what_would_break_the_registry():
    register(LeastSure)
    try:
        assert candidate_names()[-1] == "least_sure"  # no `before`: the most complex
        with pytest.raises(ValueError, match=r"'least_sure' is already registered"):
            register(LeastSure)
    finally:
        unregister("least_sure")
    with pytest.raises(ValueError, match=r"no candidate 'xgboost' to insert before"):
        register(LeastSure, before="xgboost")
    with pytest.raises(ValueError, match=r"a Candidate subclass with a name"):
        register(type("Nameless", (Candidate,), {}))
    with pytest.raises(ValueError, match=r"'mean' is the guard's floor"):
        unregister("mean")
    assert candidate_names() == CANDIDATES


BINARY = ("f1", "precision", "recall", "jaccard")  # average="binary": two classes only


@pytest.mark.parametrize("name, n_classes", [
    (name, n) for n in (2, 6)
    for name in ("accuracy", "neg_log_loss", "top_k_accuracy", *CONFUSION_METRICS, *RANKING_METRICS)
    if n == 2 or name not in (*BINARY, "roc_auc")])
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


@pytest.mark.parametrize("n_classes", [2, 4])
def test_ranking_bootstrap_equals_scikit_learns_weighted_auc_with_ties_and_groups(n_classes):
    rng = np.random.default_rng(7)
    y = rng.integers(0, n_classes, 2000)
    proba = np.round(noisy_copy(y, n_classes, 0.6, rng), 1)  # coarse: many tied scores
    proba /= proba.sum(axis=1, keepdims=True)
    counts = bootstrap_counts(y, 30, seed=5, groups=rng.integers(0, 300, len(y)))  # whole groups: many zeros
    for name in RANKING_METRICS if n_classes == 2 else RANKING_METRICS[1:]:
        metric = Metric(name, n_classes)
        fast = metric.bootstrap(y, [proba], counts)[:, 0]
        slow = np.array([metric.score(y, proba, sample_weight=w) for w in counts])
        assert np.abs(fast - slow).max() < 1e-12, name


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


@pytest.mark.parametrize("name", ["lgbm_wide", "lgbm_class_shared"])
def test_lgbm_fit_on_binned_rows_never_reads_the_held_out_labels(meta, name):
    # The guard bins every row once (features only) and fits on subsets: relabelling the
    # rows a fit holds out changes nothing of what it predicts.
    X, y = meta
    rows = np.arange(200)
    y_other = y.copy()
    y_other[200:] = (y[200:] + 1) % C
    cls, config = candidate_class(name), fast_config(lgbm_max_rounds=10)
    probas = [cls.from_config(config, None, 0).fit_prepared(cls.prepare(X, labels, config), rows, X.shape)
              .predict_proba(X[200:]) for labels in (y, y_other)]
    np.testing.assert_array_equal(probas[0], probas[1])
    assert probas[0].shape == (100, C)
    np.testing.assert_allclose(probas[0].sum(axis=1), 1, atol=1e-6)
