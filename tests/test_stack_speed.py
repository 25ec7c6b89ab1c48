"""The meta level's speed changes keep its results: row limits, prepared fits, task splits, threaded
decisions, float32 ensemble selection, and the faster id checks."""
import json
from dataclasses import replace
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from oof import EPS, PredictionTable, StackerError
from oof.ids import align
from oof.tables import _any_blank, check_rows
from stack_fixtures import fast_config, make_run_folds, noisy_copy, specialists
from stacker import StackConfig
from stacker.candidates import candidate_class, candidate_names, ensemble_selection
from stacker.candidates.lgbm import sample_rows
from stacker.guard import decide, fit_tasks, held_out_keys, nested_estimate
from stacker.workers import PARALLEL_MIN_VALUES, FitWorkers, decide_in_threads, split_keys, start_workers, task_order
from stacker.inputs import MetaData
from stacker.metrics import Metric

C = 3
LGBM = ("lgbm_wide", "lgbm_class_shared")


@pytest.fixture(scope="module")
def meta():
    """400 rows in 4 folds, 5 models (two specialists, three noisy copies), 3 classes."""
    rng = np.random.default_rng(0)
    folds = make_run_folds(400, C, k=4, seed=0)
    y = folds.y
    models = [specialists(y, rng, range(2), C), specialists(y, rng, range(1, 3), C)]
    models += [noisy_copy(y, C, a, rng) for a in (0.7, 0.6, 0.5)]
    X = np.stack(models, axis=1)  # (N, M, C)
    return MetaData(X, y, np.asarray(folds.fold), tuple("abcde"), tuple(f"c{i}" for i in range(C)))


def _fit(name, data, config, rows, seed=5, prepared=None):
    cls = candidate_class(name)
    if prepared is None:
        prepared = cls.prepare(data.X, data.y, config, data.models, data.classes)
    candidate = cls.from_config(config, Metric(config.metric, C), seed, data.models, data.classes)
    return candidate.fit_prepared(prepared, rows, data.X.shape)


# sample_rows


def test_sample_rows_keeps_rows_at_or_under_the_limit_and_for_no_limit():
    rows = np.arange(0, 300, 3)
    for limit in (-1, len(rows), len(rows) + 1, 10**6):
        np.testing.assert_array_equal(sample_rows(rows, limit, seed=0), rows)


def test_sample_rows_draws_limit_sorted_unique_rows_repeatable_by_seed():
    rows = np.arange(0, 3000, 3)
    drawn = sample_rows(rows, 40, seed=1)
    assert len(drawn) == 40 and len(np.unique(drawn)) == 40
    assert (np.diff(drawn) > 0).all() and np.isin(drawn, rows).all()
    np.testing.assert_array_equal(sample_rows(rows, 40, seed=1), drawn)
    assert not np.array_equal(sample_rows(rows, 40, seed=2), drawn)


# lgbm_max_rows


def _root_count(candidate) -> int:
    """Rows the booster's first tree was grown on (its root's count)."""
    root = candidate.booster_.dump_model()["tree_info"][0]["tree_structure"]
    return int(root.get("internal_count", root.get("leaf_count")))


@pytest.mark.parametrize("name", LGBM)
def test_lgbm_trains_on_lgbm_max_rows_of_the_rows_it_is_given(meta, name):
    rows = np.flatnonzero(meta.fold != 0)  # ~300 rows
    limit, groups = 150, (1 if name == "lgbm_wide" else C)
    config = fast_config(lgbm_bagging_fraction=1.0, lgbm_max_rounds=5)  # no bagging: the root sees every row
    prepared = candidate_class(name).prepare(meta.X, meta.y, config, meta.models, meta.classes)
    fit = lambda max_rows, fit_rows: _fit(name, meta, fast_config(  # noqa: E731
        lgbm_bagging_fraction=1.0, lgbm_max_rounds=5, lgbm_max_rows=max_rows), fit_rows, prepared=prepared)
    small, everything = fit(limit, rows), fit(-1, rows)
    n_valid = round(config.lgbm_valid_fraction * limit)  # the inner split's early-stopping rows
    assert _root_count(small) == (limit - n_valid) * groups
    assert _root_count(everything) == (len(rows) - round(config.lgbm_valid_fraction * len(rows))) * groups
    # the limit draws sample_rows(rows, limit, seed), then splits those as a fit given them would
    drawn = fit(-1, sample_rows(rows, limit, 5))
    held = meta.X[meta.fold == 0]
    np.testing.assert_array_equal(small.predict_proba(held), drawn.predict_proba(held))
    np.testing.assert_array_equal(fit(len(rows), rows).predict_proba(held), everything.predict_proba(held))
    assert not np.allclose(small.predict_proba(held), everything.predict_proba(held))


def test_lgbm_max_rows_and_wide_models_are_checked():
    assert StackConfig(lgbm_max_rows=-1).lgbm_max_rows == -1
    assert StackConfig(lgbm_max_rows=500).lgbm_max_rows == 500
    assert StackConfig(lgbm_wide_models=2.5).lgbm_wide_models == 2.5
    assert StackConfig(lgbm_wide_models=-1).lgbm_wide_models == -1
    for bad in (0, -2, 2.5):
        with pytest.raises(StackerError, match=r"stack\.lgbm_max_rows: expected an integer >= 1 or -1 for no limit"):
            StackConfig(lgbm_max_rows=bad)
    for bad in (0, -2):
        with pytest.raises(StackerError, match=r"stack\.lgbm_wide_models: expected"):
            StackConfig(lgbm_wide_models=bad)


def test_wide_booster_samples_about_lgbm_wide_models_per_class():
    from stacker.candidates.lgbm import wide_feature_fraction

    config = StackConfig(lgbm_feature_fraction=0.5, lgbm_wide_models=5)
    assert wide_feature_fraction(config, 35) == pytest.approx(5 / 35)
    assert wide_feature_fraction(config, 3) == 0.5  # few models: the shared fraction
    assert wide_feature_fraction(replace(config, lgbm_wide_models=-1), 35) == 0.5


# Candidate.prepare / fit_prepared


@pytest.mark.parametrize("name", [n for n in candidate_names() if candidate_class(n).prepare_cost < 1])
def test_prepared_fit_predicts_as_a_fit_on_the_rows(meta, name):
    config = fast_config()
    rows, held = np.flatnonzero(meta.fold != 1), meta.fold == 1
    prepared = _fit(name, meta, config, rows).predict_proba(meta.X[held])
    candidate = candidate_class(name).from_config(config, Metric(config.metric, C), 5, meta.models, meta.classes)
    direct = candidate.fit(meta.X[rows], meta.y[rows]).predict_proba(meta.X[held])
    # the same rows, the same transform, row by row: equal up to float rounding
    np.testing.assert_allclose(prepared, direct, rtol=1e-6, atol=1e-12)


# split_keys / task_order


@pytest.mark.parametrize("workers", [1, 2, 3, 4, 8])
def test_split_keys_hold_every_key_once_in_tasks_sized_by_prepare_cost(workers):
    keys = held_out_keys(5, nested=True)  # 15 keys
    for name in candidate_names():
        tasks = split_keys(name, keys, workers)
        assert sorted(k for task in tasks for k in task) == sorted(keys) and all(tasks)
        expected = max(1, workers // 2) if name in LGBM else min(2 * workers, len(keys))
        assert len(tasks) == expected, name


def test_task_order_starts_lightgbm_then_reversed_registry_order():
    assert task_order(candidate_names()) == ["lgbm_wide", "lgbm_class_shared", "logreg", "weights",
                                             "ensemble_selection", "temperature", "best_single", "logit_mean",
                                             "mean"]
    assert task_order(("mean", "lgbm_class_shared", "logreg")) == ["lgbm_class_shared", "logreg", "mean"]
    assert task_order(("mean", "best_single")) == ["best_single", "mean"]


# decisions in threads


@pytest.fixture(scope="module")
def guard_fits(meta):
    names = ("mean", "best_single", "ensemble_selection", "logreg", "lgbm_class_shared")
    config = fast_config(lgbm_max_rounds=5)
    metric = Metric(config.metric, C)
    preds, _ = fit_tasks(meta, names, held_out_keys(meta.k, True), config, metric, workers=1)
    return preds, config, metric


def test_nested_estimate_in_threads_equals_in_turn(meta, guard_fits):
    preds, config, metric = guard_fits
    in_turn = nested_estimate(meta, preds, metric, config, pool=None)
    with warnings.catch_warnings(), ThreadPoolExecutor(2) as pool:
        threaded = nested_estimate(meta, preds, metric, config, pool=pool)
    assert [f["fold"] for f in in_turn["folds"]] == list(range(meta.k))
    assert json.dumps(threaded) == json.dumps(in_turn)


def test_main_decision_in_threads_equals_in_turn(meta, guard_fits):
    from stacker.guard import assemble

    preds, config, metric = guard_fits
    oof = {name: assemble(p, meta.fold) for name, p in preds.items()}
    assert decide_in_threads(1) is None
    pool = decide_in_threads(2)
    with warnings.catch_warnings(), pool:
        threaded = pool.submit(decide, meta.y, oof, metric, config, [config.seed, 7]).result()
    assert json.dumps(threaded) == json.dumps(decide(meta.y, oof, metric, config, [config.seed, 7]))


def test_run_guard_decides_the_same_with_worker_processes_and_in_process(meta):
    from stacker.guard import run_guard

    config = fast_config(lgbm_max_rounds=5, candidates=("mean", "best_single", "logreg"))
    metric = Metric(config.metric, C)
    with threadpool_limits(limits=1, user_api="blas"):  # as StackGuard.fit runs it: one BLAS thread, as a worker's
        in_workers = run_guard(meta, config, metric, log=lambda *a: None, workers=FitWorkers(2).start())
        in_process = run_guard(meta, config, metric, log=lambda *a: None)
    assert json.dumps(in_workers.decision) == json.dumps(in_process.decision)
    for name in config.candidates:
        np.testing.assert_allclose(in_workers.oof[name], in_process.oof[name], rtol=1e-6, atol=1e-9)
    assert in_process.fitted.name == in_process.decision["chosen"]  # the choice, fitted on every row
    np.testing.assert_array_equal(in_workers.fitted.predict_proba(meta.X), in_process.fitted.predict_proba(meta.X))


# ensemble selection: float32 logs, float64 sums


def reference_selection(p_true, steps, init):
    """Greedy selection in float64: the init models of lowest log-loss, then the pick of lowest blend loss."""
    n_models = p_true.shape[1]
    picks = np.zeros(n_models)
    start = np.argsort(-np.log(np.clip(p_true, EPS, 1)).mean(axis=0), kind="stable")[:min(init, n_models)]
    picks[start] += 1
    total = p_true[:, start].sum(axis=1)
    for k in range(len(start), steps):
        loss = -np.log(np.clip((total[:, None] + p_true) / (k + 1), EPS, 1)).mean(axis=0)
        best = int(np.argmin(loss))  # the first of equals
        picks[best] += 1
        total += p_true[:, best]
    return picks / steps


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("twins", [False, True])
def test_ensemble_selection_equals_a_float64_reference(seed, twins):
    rng = np.random.default_rng(seed)
    p_true = rng.beta(np.linspace(1, 4, 8), 2, size=(500, 8))  # models of rising quality
    if twins:
        p_true[:, 5] = p_true[:, 7]  # two identical models: ties go to the first
    for steps, init in ((30, 3), (20, 0), (12, 8)):
        weights = ensemble_selection(p_true, steps, init)
        np.testing.assert_array_equal(weights, reference_selection(p_true, steps, init))
    if twins:
        assert ensemble_selection(p_true, 30, 0)[7] == 0


# blank and aligned ids


def test_blank_check_reads_ids_that_are_not_str():
    assert not _any_blank(np.array([1, 2, 3], dtype=object))
    assert not _any_blank(np.array(["a", 0, "b"], dtype=object))
    assert _any_blank(np.array([1, " "], dtype=object))
    assert _any_blank(np.array([" ", 1], dtype=object))
    assert _any_blank(np.array(["a", ""], dtype=object))
    assert not _any_blank(np.array(["a", "b"], dtype=object))


def test_prediction_table_with_a_blank_id_is_refused():
    proba = np.full((3, 2), 0.5)
    check_rows(PredictionTable(np.array([10, 11, 12], dtype=object), proba, ("x", "y")))
    with pytest.raises(StackerError, match=r"<memory>: blank id in row\(s\) '1'"):
        check_rows(PredictionTable(np.array(["a", "  ", "b"], dtype=object), proba, ("x", "y")))
    with pytest.raises(StackerError, match=r"blank id in row\(s\) '2'"):
        check_rows(PredictionTable(np.array([7, 8, " "], dtype=object), proba, ("x", "y")))


def test_align_same_order_and_permutation():
    have = ["a", "b", "c", "d"]
    np.testing.assert_array_equal(align(have, have, "src", "train"), np.arange(4))
    want = ["c", "a", "d", "b"]
    index = align(have, want, "src", "train")
    np.testing.assert_array_equal(index, [2, 0, 3, 1])
    assert np.asarray(have, dtype=object)[index].tolist() == want


def test_align_refuses_duplicates_and_names_a_missing_id():
    with pytest.raises(StackerError, match=r"src: duplicate ids, first 'a'"):
        align(["a", "a", "b"], ["a", "b", "c"], "src", "train")
    with pytest.raises(StackerError, match=r"src: 1 train id\(s\) missing, first 'c'"):
        align(["a", "b", "x"], ["a", "b", "c"], "src", "train")
    with pytest.raises(StackerError, match=r"src: 1 id\(s\) that are not train ids, first 'x'"):
        align(["a", "b", "x", "c"], ["a", "b", "c"], "src", "train")


# start_workers


def test_start_workers_starts_none_for_small_inputs_or_one_job():
    assert start_workers(StackConfig(n_jobs=2), PARALLEL_MIN_VALUES - 1) is None
    assert start_workers(StackConfig(n_jobs=-1), 1000) is None
    assert start_workers(StackConfig(n_jobs=1), 100 * PARALLEL_MIN_VALUES) is None
