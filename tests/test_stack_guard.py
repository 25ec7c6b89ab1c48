"""The guard with known answers: it keeps the mean unless a candidate really wins."""
import json
import os
from dataclasses import replace

import numpy as np
import pytest

from oof import StackerError
from stack_fixtures import (fast_config, make_run_folds, make_test_tables, noisy_copy, oof_tables, pure_noise,
                            specialists)
from stacker import Metric, StackGuard, decide
from stacker.guard import fit_tasks, held_out_keys
from stacker.workers import PARALLEL_MIN_VALUES, FitWorkers, start_workers
from stacker.inputs import MetaData

C = 10


def test_complementary_specialists_a_stacker_wins_clearly_and_is_chosen():
    rng = np.random.default_rng(0)
    folds = make_run_folds(500, C, seed=0)
    probas = {"low": specialists(folds.y, rng, range(5)), "high": specialists(folds.y, rng, range(5, 10))}
    guard = StackGuard(fast_config(lgbm_max_rounds=20), log=None).fit(oof_tables(folds, probas), folds)
    d = guard.decision_
    assert d["chosen"] in ("logreg", "lgbm_wide"), d["reason"]
    chosen = d["candidates"][d["chosen"]]
    assert d["candidates"]["mean"]["score"] < 0.7  # the surer of right and wrong wins the mean
    assert chosen["score"] > 0.85 and chosen["gain"] > 0.3 and chosen["win_probability"] >= 0.95
    assert d["candidates"]["ensemble_selection"]["score"] < 0.7  # one weight per model cannot
    assert d["nested"]["score"] > 0.85


def test_two_good_models_and_thirty_noise_models_no_lgbm_and_noise_ignored():
    rng = np.random.default_rng(1)
    folds = make_run_folds(600, C, seed=1)
    probas = {"good_a": noisy_copy(folds.y, C, 0.75, rng), "good_b": noisy_copy(folds.y, C, 0.7, rng)}
    probas.update({f"noise{i:02d}": pure_noise(len(folds.y), C, rng) for i in range(30)})
    config = fast_config(lgbm_max_rounds=30, lgbm_learning_rate=0.3, lgbm_min_data_in_leaf=20)
    guard = StackGuard(config, log=None).fit(oof_tables(folds, probas), folds)
    d = guard.decision_
    assert not d["chosen"].startswith("lgbm"), d["reason"]
    assert d["chosen"] in ("best_single", "ensemble_selection"), d["reason"]
    state = guard.state()
    if d["chosen"] == "ensemble_selection":
        assert sum(state["weights"][:2]) >= 0.9  # the two good models carry the blend
    else:
        assert state["model_index"] == 0
    assert all(f["chosen"] in ("best_single", "ensemble_selection") for f in d["nested"]["folds"])


def test_identical_inputs_give_identical_decisions():
    rng = np.random.default_rng(2)
    folds = make_run_folds(300, C, seed=2)
    probas = {m: noisy_copy(folds.y, C, a, rng) for m, a in (("a", 0.8), ("b", 0.7), ("c", 0.6))}
    y_test = rng.integers(0, C, 50)
    test = make_test_tables([f"t{i}" for i in range(50)], folds.classes,
                            {m: noisy_copy(y_test, C, 0.7, rng) for m in probas})
    runs = [StackGuard(fast_config(), log=None).fit(oof_tables(folds, probas), folds) for _ in range(2)]
    assert json.dumps(runs[0].decision_) == json.dumps(runs[1].decision_)
    np.testing.assert_array_equal(runs[0].predict_proba(test), runs[1].predict_proba(test))
    for name in runs[0].oof_:
        np.testing.assert_array_equal(runs[0].oof_[name], runs[1].oof_[name])


def test_leaked_model_is_excluded_unless_allowed():
    rng = np.random.default_rng(3)
    folds = make_run_folds(300, C, seed=3)
    probas = {m: noisy_copy(folds.y, C, a, rng) for m, a in (("a", 0.8), ("b", 0.7))}
    probas["leaky"] = noisy_copy(folds.y, C, 1.0, rng, confidence=0.995)
    lines = []
    guard = StackGuard(fast_config(), log=lines.append).fit(oof_tables(folds, probas), folds)
    assert guard.models_ == ["a", "b"] and "leaky" in guard.decision_["excluded"]
    assert guard.decision_["models"]["leaky"]["status"] == "excluded"
    assert any("warning: model 'leaky' looks leaked" in line for line in lines)
    kept = StackGuard(fast_config(allow_suspicious=True), log=None).fit(oof_tables(folds, probas), folds)
    assert kept.models_ == ["a", "b", "leaky"] and kept.decision_["excluded"] == {}
    assert kept.decision_["models"]["leaky"]["status"] == "suspicious, kept"


def test_equally_strong_honest_models_are_not_suspicious():
    rng = np.random.default_rng(4)
    folds = make_run_folds(300, C, seed=4)
    probas = {m: noisy_copy(folds.y, C, 0.99, rng, confidence=0.995) for m in ("a", "b", "c")}
    guard = StackGuard(fast_config(candidates=["mean"]), log=None).fit(oof_tables(folds, probas), folds)
    assert guard.decision_["excluded"] == {} and guard.models_ == ["a", "b", "c"]


def test_decide_prefers_the_simpler_candidate_within_noise():
    rng = np.random.default_rng(5)
    y = rng.integers(0, C, 1000)
    right = lambda share: np.where(rng.random(1000) < share, y, (y + 1) % C)  # noqa: E731
    onehot = lambda labels: np.eye(C)[labels] * 0.9 + 0.01  # noqa: E731
    mean_labels = right(0.7)
    es_labels = np.where(rng.random(1000) < 0.5, y, mean_labels)  # ~85% right
    wide_labels = es_labels.copy()
    wrong = np.flatnonzero(wide_labels != y)[:1]
    wide_labels[wrong] = y[wrong]  # one row better than ensemble selection
    probas = {"mean": onehot(mean_labels), "logit_mean": onehot(mean_labels),
              "ensemble_selection": onehot(es_labels), "lgbm_wide": onehot(wide_labels)}
    d = decide(y, probas, Metric("accuracy", C), fast_config(), seed=0)
    assert d["best"] == "lgbm_wide" and d["chosen"] == "ensemble_selection"
    assert "lgbm_wide scores +0.0010 more but is more complex and within noise" in d["reason"]
    assert not d["candidates"]["logit_mean"]["admissible"]
    assert d["candidates"]["logit_mean"]["win_probability"] == 0  # identical rows never win
    low, high = d["candidates"]["ensemble_selection"]["interval"]
    assert low < d["candidates"]["ensemble_selection"]["score"] < high


def test_decide_falls_back_to_the_mean_and_says_why():
    rng = np.random.default_rng(6)
    y = rng.integers(0, C, 400)
    base = noisy_copy(y, C, 0.7, rng)
    nudged = base.copy()
    nudged[0] = np.eye(C)[y[0]]  # one row better: a gain of 0.0025, not a real one
    d = decide(y, {"mean": base, "lgbm_wide": nudged}, Metric("accuracy", C), fast_config(), seed=0)
    assert d["chosen"] == "mean"
    assert d["reason"].startswith("no candidate beat the mean by >= 0.002 with win probability >= 0.95; "
                                  "closest: lgbm_wide")


def test_two_folds_skip_the_nested_estimate_and_say_so():
    rng = np.random.default_rng(7)
    folds = make_run_folds(200, C, k=2, seed=7)
    probas = {m: noisy_copy(folds.y, C, 0.7, rng) for m in ("a", "b")}
    guard = StackGuard(fast_config(), log=None).fit(oof_tables(folds, probas), folds)
    assert guard.decision_["nested"] is None
    assert "K >= 3" in guard.decision_["nested_note"]


def test_dataframes_are_accepted_and_test_tables_must_share_ids():
    rng = np.random.default_rng(8)
    folds = make_run_folds(200, C, seed=8)
    probas = {m: noisy_copy(folds.y, C, 0.7, rng) for m in ("a", "b")}
    frames = {m: t.to_frame() for m, t in oof_tables(folds, probas).items()}
    guard = StackGuard(fast_config(candidates=["mean", "logit_mean"]), log=None).fit(frames, folds)
    ids = [f"t{i}" for i in range(20)]
    test = {m: t.to_frame() for m, t in make_test_tables(ids, folds.classes, {
        m: noisy_copy(rng.integers(0, C, 20), C, 0.7, rng) for m in ("a", "b")}).items()}
    assert guard.predict_proba(test).shape == (20, C)
    test["b"] = test["b"].assign(id=[f"x{i}" for i in range(20)])
    with pytest.raises(StackerError, match=r"<b test table>: 20 test id\(s\) missing, first 't0'"):
        guard.predict_proba(test)
    with pytest.raises(StackerError, match=r"no table for model\(s\) \['b'\]"):
        guard.predict_proba({"a": test["a"]})


def test_per_fold_test_features_average_the_fold_predictions():
    rng = np.random.default_rng(9)
    folds = make_run_folds(200, C, seed=9)
    probas = {m: noisy_copy(folds.y, C, 0.7, rng) for m in ("a", "b")}
    guard = StackGuard(fast_config(test_features="per_fold"), log=None).fit(oof_tables(folds, probas), folds)
    ids = [f"t{i}" for i in range(30)]
    per_fold = [make_test_tables(ids, folds.classes, {m: pure_noise(30, C, rng) for m in probas})
                for _ in range(folds.k)]
    mean_tables = make_test_tables(ids, folds.classes, {
        m: np.mean([t[m].proba for t in per_fold], axis=0) for m in probas})
    table = guard.predict_table(mean_tables, per_fold)
    expected = np.mean([guard.predict_proba(t) for t in per_fold], axis=0)
    np.testing.assert_allclose(table.proba, expected / expected.sum(axis=1, keepdims=True))
    assert table.meta["test_features"] == "per_fold"
    with pytest.raises(StackerError, match=r"stack\.test_features: 'per_fold' needs each fold model's test"):
        guard.predict_table(mean_tables)


def test_fits_in_worker_processes_equal_the_fits_in_process():
    # Each fit is seeded by its held-out folds alone, so two workers (a process pool,
    # rows shared as a memory map) give the same predictions as one process.
    rng = np.random.default_rng(3)
    folds = make_run_folds(300, C, seed=3)
    X = np.stack([noisy_copy(folds.y, C, a, rng) for a in (0.8, 0.6, 0.5)], axis=1)  # (N, M, C)
    data = MetaData(X, folds.y, folds.fold, ("a", "b", "c"), tuple(f"c{i}" for i in range(C)))
    config = fast_config(lgbm_max_rounds=5)
    names, keys = ("mean", "logreg", "lgbm_wide"), held_out_keys(5, nested=True)
    one, _ = fit_tasks(data, names, keys, config, Metric("accuracy", C), workers=1)
    # the workers started ahead, as fit_stack does while it reads tables; fit_tasks waits for that start
    started = start_workers(replace(config, n_jobs=2), PARALLEL_MIN_VALUES)
    assert started is not None or (os.cpu_count() or 1) < 2
    two, timings = fit_tasks(data, names, keys, config, Metric("accuracy", C), workers=started or FitWorkers(2))
    assert started is None or (started.n == 2 and not started.starting)
    for name in names:
        assert set(two[name]) == set(keys) and timings[name] > 0
        for key in keys:
            np.testing.assert_allclose(two[name][key], one[name][key], rtol=1e-6, atol=1e-9)
