"""The fitted blends `weights` (simplex weights, SLSQP) and `temperature` (the mean, recalibrated):
known answers on planted data, saved state, and their place in the guard."""
import json

import numpy as np
import pytest

from oof import RunPaths, log_loss, make_folds, read_table
from stack_fixtures import fast_config, make_run_folds, noisy_copy, oof_tables, pure_noise, write_run
from stacker import Metric, StackGuard, fit_stack, load_stack
from stacker.candidates import (SimplexWeights, TemperatureMean, candidate_names, simplex_weights, softmax,
                                suited_candidates)

C = 5


def planted_temperature(n_rows: int, t: float, seed: int = 0):
    """(X, y): labels drawn from softmax(z), and two models that both say softmax(t * z): a mean over-sure by t."""
    rng = np.random.default_rng(seed)
    z = 2.0 * rng.normal(size=(n_rows, C))
    calibrated = softmax(z)
    y = np.array([rng.choice(C, p=p) for p in calibrated])
    sure = softmax(t * z)
    return np.stack([sure, sure], axis=1), y  # (N, 2, C)


def over_sure_run(n_rows: int, n_test: int, t: float = 2.5, seed: int = 0):
    """(folds, oof, test): labels drawn from softmax(z), three models saying softmax(t * (z + their own noise))."""
    rng = np.random.default_rng(seed)
    z = 2.0 * rng.normal(size=(n_rows + n_test, C))
    y = np.array([rng.choice(C, p=p) for p in softmax(z)])
    classes = [f"c{c}" for c in range(C)]
    folds = make_folds([f"r{i:04d}" for i in range(n_rows)], [classes[c] for c in y[:n_rows]], k=5, seed=seed,
                       classes=classes)
    models = {m: softmax(t * (z + 0.3 * rng.normal(size=z.shape))) for m in "abc"}
    return folds, {m: p[:n_rows] for m, p in models.items()}, {m: p[n_rows:] for m, p in models.items()}


def test_weights_lie_on_the_simplex_and_find_the_planted_good_model():
    rng = np.random.default_rng(0)
    y = rng.integers(0, C, 600)
    X = np.stack([noisy_copy(y, C, 0.3, rng), noisy_copy(y, C, 0.9, rng), noisy_copy(y, C, 0.3, rng),
                  pure_noise(600, C, rng)], axis=1)  # (N, 4, C): model 1 is the good one
    blend = SimplexWeights().fit(X, y)
    w = blend.weights_
    assert blend.converged_ and (w >= 0).all() and w.sum() == pytest.approx(1, abs=1e-9)
    assert w[1] > 0.8 and w[1] == w.max()
    np.testing.assert_allclose(blend.predict_proba(X).sum(axis=1), 1)


@pytest.mark.parametrize("seed", range(4))
def test_weights_are_never_worse_than_the_mean_on_their_training_rows(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, C, 300)
    models = [noisy_copy(y, C, a, rng, confidence=c) for a, c in ((0.6, 0.9), (0.5, 0.5), (0.7, 0.99))]
    X = np.stack(models + [models[0]], axis=1)  # a duplicate model too: the optimum is not unique
    blend = SimplexWeights().fit(X, y)
    assert log_loss(y, blend.predict_proba(X)) <= log_loss(y, X.mean(axis=1)) + 1e-12


def test_weights_of_one_model_or_identical_models():
    rng = np.random.default_rng(1)
    y = rng.integers(0, C, 100)
    p_true = noisy_copy(y, C, 0.8, rng)[np.arange(100), y]
    np.testing.assert_allclose(simplex_weights(p_true[:, None])[0], [1.0])
    weights, _ = simplex_weights(np.stack([p_true] * 3, axis=1))  # every blend is the same: uniform stays
    np.testing.assert_allclose(weights, 1 / 3, atol=1e-9)


def test_temperature_recovers_a_planted_over_confidence():
    X, y = planted_temperature(4000, t=2.5)
    fitted = TemperatureMean().fit(X, y)
    assert fitted.temperature_ == pytest.approx(2.5, rel=0.1)
    assert log_loss(y, fitted.predict_proba(X)) < log_loss(y, X.mean(axis=1)) - 0.1
    too_unsure, y = planted_temperature(4000, t=0.5, seed=1)
    assert TemperatureMean().fit(too_unsure, y).temperature_ == pytest.approx(0.5, rel=0.1)


@pytest.mark.parametrize("t", [0.05, 0.7, 3.0, 80.0])
def test_temperature_keeps_the_mean_s_argmax(t):
    X = np.random.default_rng(2).dirichlet(np.ones(C) * 0.5, size=(500, 3))  # (N, M, C)
    proba = TemperatureMean.from_state({"temperature": t}).predict_proba(X)
    np.testing.assert_array_equal(proba.argmax(axis=1), X.mean(axis=1).argmax(axis=1))
    np.testing.assert_allclose(proba.sum(axis=1), 1)


@pytest.mark.parametrize("candidate", [SimplexWeights, TemperatureMean])
def test_fit_state_from_state_predicts_the_same(candidate):
    X, y = planted_temperature(300, t=2.0, seed=3)
    X = np.concatenate([X, np.random.default_rng(3).dirichlet(np.ones(C), size=(300, 1))], axis=1)
    fitted = candidate().fit(X[:200], y[:200])
    saved = json.loads(json.dumps(fitted.state()))  # what combiner.json holds
    rebuilt = candidate.from_state(saved)
    np.testing.assert_array_equal(rebuilt.predict_proba(X[200:]), fitted.predict_proba(X[200:]))


def test_temperature_is_left_out_where_it_can_only_tie_the_mean():
    names = candidate_names()
    assert names.index("best_single") < names.index("temperature") < names.index("ensemble_selection") \
        < names.index("weights") < names.index("lgbm_class_shared")
    for metric, classes in (("accuracy", 3), ("f1_macro", 3), ("roc_auc", 2), ("average_precision", 2)):
        kept, left_out = suited_candidates(names, Metric(metric, classes))
        assert "temperature" not in kept and list(left_out) == ["temperature"] and "weights" in kept
    for metric, classes in (("neg_log_loss", 3), ("neg_brier_score", 2), ("roc_auc_ovr", 3)):
        assert suited_candidates(names, Metric(metric, classes)) == (names, {})


def test_the_guard_scores_both_and_reports_what_it_left_out():
    rng = np.random.default_rng(4)
    folds = make_run_folds(300, C, seed=4)
    probas = {m: noisy_copy(folds.y, C, a, rng, confidence=0.95) for m, a in (("a", 0.8), ("b", 0.6), ("c", 0.5))}
    lines = []
    guard = StackGuard(fast_config(), log=lines.append).fit(oof_tables(folds, probas), folds)
    d = guard.decision_
    assert "weights" in d["candidates"] and "temperature" not in d["candidates"]
    assert list(d["left_out"]) == ["temperature"] and "under accuracy" in d["left_out"]["temperature"]
    assert any(line.startswith("fit-stack: candidate temperature left out: ") for line in lines)
    assert d["config"]["candidates"] == list(candidate_names())  # the config as given, not as filtered
    folds, oof, _ = over_sure_run(300, 0)  # three models 2.5 times too sure in logit: so is their mean
    over_sure = StackGuard(fast_config(metric="neg_log_loss", candidates=["mean", "temperature", "weights"]),
                           log=None).fit(oof_tables(folds, oof), folds)
    d = over_sure.decision_
    assert list(d["candidates"]) == ["mean", "temperature", "weights"] and d["left_out"] == {}
    assert d["chosen"] == "temperature", d["reason"]
    assert over_sure.candidate_.temperature_ == pytest.approx(2.5, rel=0.25)
    assert d["candidates"]["temperature"]["gain"] > 0.1 and d["nested"]["score"] > d["candidates"]["mean"]["score"]


@pytest.mark.parametrize("candidate", ["temperature", "weights"])
def test_load_stack_rebuilds_the_chosen_blend_from_its_files(tmp_path, candidate):
    if candidate == "weights":  # one strong model and two noise models: the mean is diluted
        rng = np.random.default_rng(5)
        folds, y_test = make_run_folds(400, C, seed=5), rng.integers(0, C, 40)
        oof, test = ({"a": noisy_copy(y, C, 0.9, rng), "b": pure_noise(len(y), C, rng),
                      "c": pure_noise(len(y), C, rng)} for y in (folds.y, y_test))
    else:  # three over-sure models: the mean needs T > 1
        folds, oof, test = over_sure_run(400, 40, seed=5)
    root = write_run(tmp_path / "run", folds, oof, test, [f"t{i}" for i in range(40)])
    fit_stack(root, fast_config(metric="neg_log_loss", candidates=["mean", candidate]), log=None)
    guard = load_stack(root)
    assert guard.decision_["chosen"] == candidate, guard.decision_["reason"]
    tables = {m: read_table(RunPaths(root).test(m), folds.classes, "test") for m in guard.models_}
    expected = read_table(RunPaths(root).stack_test, folds.classes, "test").proba
    np.testing.assert_allclose(guard.predict_table(tables).proba, expected, rtol=1e-6, atol=1e-9)
