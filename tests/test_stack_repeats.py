"""The meta level with repeated folds (folds.repeats R > 1): per-repeat meta-OOF, combined scores,
per-repeat final fits saved and applied, external tables with a repeat column, and the trap closed."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from oof import PredictionTable, RunPaths, StackerError, make_folds, read_table, write_folds, write_table
from stack_fixtures import fast_config, make_test_tables, noisy_copy, specialists
from stacker import StackGuard, fit_stack, load_stack
from stacker.apply import apply_stack
from stacker.candidates import candidate_class, normalise_rows
from stacker.guard import assemble, fit_chosen, fit_keys
from stacker.inputs import MetaData
from stacker.metrics import Metric
from stacker.repeats import repeat_config

R, K = 3, 5


def repeat_folds(n_rows: int, n_classes: int, seed: int = 0, repeats: int = R):
    rng = np.random.default_rng([seed, 1])
    classes = [f"c{c}" for c in range(n_classes)]
    labels = [classes[c] for c in rng.integers(0, n_classes, n_rows)]
    return make_folds([f"r{i:04d}" for i in range(n_rows)], labels, k=K, seed=seed, classes=classes, repeats=repeats)


def repeat_table(folds, probas: list[np.ndarray], model: str) -> PredictionTable:
    """One model's OOF table of every repeat: R x N rows, repeat-major, as predict-oof writes it."""
    n = folds.n_rows
    return PredictionTable(np.tile(folds.ids, folds.repeats), np.concatenate(probas), folds.classes,
                           folds.fold_matrix.ravel(), {"model": model, "folds_sha256": folds.sha256}, "<memory>",
                           np.repeat(np.arange(folds.repeats), n))


def specialist_run(root, n_rows=300, n_test=40, seed=0):
    """A run of R repeats with two specialists (a learned candidate beats the mean); returns (root, folds, test ids)."""
    rng = np.random.default_rng(seed)
    folds = repeat_folds(n_rows, 4, seed)
    known = {"a": [0, 1], "b": [2, 3]}
    y_test = rng.integers(0, 4, n_test)
    test_ids = [f"t{i:03d}" for i in range(n_test)]
    paths = RunPaths(root)
    write_folds(paths.folds, folds)
    for m, k in known.items():
        write_table(paths.oof(m), repeat_table(folds, [specialists(folds.y, rng, k, 4) for _ in range(R)], m))
        write_table(paths.test(m), make_test_tables(test_ids, folds.classes,
                                                    {m: specialists(y_test, rng, k, 4)})[m])
    return root, folds, test_ids


@pytest.fixture(scope="module")
def repeat_run(tmp_path_factory):
    root, folds, test_ids = specialist_run(tmp_path_factory.mktemp("repeats") / "run")
    decision = fit_stack(root, fast_config(candidates=["mean", "lgbm_wide"], lgbm_max_rounds=10), log=None)
    return root, folds, test_ids, decision


def test_each_repeat_is_scored_on_its_own_folds_and_the_scores_combine(repeat_run):
    root, folds, _, decision = repeat_run
    assert decision["repeats"] == R and decision["folds_sha256"] == folds.sha256
    oof = {m: read_table(RunPaths(root).oof(m), folds.classes, "oof") for m in ("a", "b")}
    # repeat 0 alone, as a one-repeat run: the same meta-level OOF scores as repeat 0 of the combined fit
    one = folds.for_repeat(0)
    alone = StackGuard(fast_config(candidates=["mean", "lgbm_wide"], lgbm_max_rounds=10), log=None).fit(
        {m: PredictionTable(one.ids, t.proba[:folds.n_rows], one.classes, one.fold, {}) for m, t in oof.items()}, one)
    for name, record in decision["candidates"].items():
        assert len(record["repeat_scores"]) == R
        assert record["repeat_scores"][0] == pytest.approx(alone.decision_["candidates"][name]["score"], abs=1e-12)
        assert record["score"] == pytest.approx(np.mean(record["repeat_scores"]), abs=1e-12)
        assert record["repeat_std"] == pytest.approx(np.std(record["repeat_scores"]), abs=1e-12)
    assert decision["chosen"] == "lgbm_wide"  # the specialists need a learned combiner, in every repeat
    chosen = read_table(RunPaths(root).stack_oof, folds.classes, "oof")  # every repeat's meta-level OOF rows
    assert len(chosen.ids) == R * folds.n_rows and list(np.unique(chosen.repeat)) == list(range(R))
    assert [d["chosen"] for d in decision["repeat_decisions"]] == ["lgbm_wide"] * R and decision["agreement"] == 1
    assert len(decision["nested"]["repeat_scores"]) == R
    assert {f["repeat"] for f in decision["nested"]["folds"]} == set(range(R))
    assert len(decision["models"]["a"]["repeat_scores"]) == R


def test_the_choice_is_fitted_per_repeat_saved_and_reapplied(repeat_run):
    root, folds, test_ids, decision = repeat_run
    paths = RunPaths(root)
    state = json.loads(paths.stack_state.read_text())
    assert state["candidate"] == "lgbm_wide" and len(state["repeats"]) == R
    boosters = [paths.stack / s["booster"] for s in state["repeats"]]
    assert boosters[0] == paths.stack_booster and len(set(boosters)) == R and all(b.is_file() for b in boosters)
    guard = load_stack(root)
    tables = {m: read_table(paths.test(m), folds.classes, "test") for m in ("a", "b")}
    saved = read_table(paths.stack_test, folds.classes, "test").proba
    np.testing.assert_allclose(guard.predict_table(tables).proba, saved, rtol=1e-6, atol=1e-9)
    each = [member.predict_proba(np.stack([t.proba for t in tables.values()], axis=1))
            for member in guard.candidate_.members_]
    np.testing.assert_allclose(saved, normalise_rows(np.mean(each, axis=0)), rtol=1e-6, atol=1e-9)
    assert not np.allclose(each[0], each[1])  # three fits on three repeats' OOF rows, not one
    report = (paths.stack_report).read_text()
    assert "per repeat (own OOF, own folds)" in report and "100% of repeats agree" in report
    board = pd.read_csv(paths.leaderboard)
    assert board["repeat_std"].notna().all() and len(board["repeat_scores"][0].split()) == R


def test_a_repeat_that_chose_otherwise_gets_the_combined_choice_fitted_on_its_own_rows():
    rng = np.random.default_rng(0)
    folds = repeat_folds(300, 4, seed=0)

    def weak(known):  # specialists diluted in noise: the repeats' own choices split
        return [0.15 * specialists(folds.y, rng, known, 4) + 0.85 * noisy_copy(folds.y, 4, 0.6, rng) for _ in range(R)]

    tables = {"a": repeat_table(folds, weak([0, 1]), "a"), "b": repeat_table(folds, weak([2, 3]), "b"),
              "c": repeat_table(folds, [noisy_copy(folds.y, 4, 0.65, rng) for _ in range(R)], "c")}
    config = fast_config(candidates=["mean", "best_single", "weights", "logreg", "lgbm_wide"], lgbm_max_rounds=10,
                         nested=False, confidence=0.8, min_gain=0.0)
    guard = StackGuard(config, log=None).fit(tables, folds)
    chosen, own = guard.decision_["chosen"], [d["chosen"] for d in guard.decision_["repeat_decisions"]]
    assert chosen in own and set(own) != {chosen}, own  # the repeats disagree: the case under test
    metric = Metric(config.metric, 4)
    for r, member in enumerate(guard.candidate_.members_):
        X = np.stack([t.proba[r * folds.n_rows:(r + 1) * folds.n_rows] for t in tables.values()], axis=1)
        data = MetaData(X, folds.y, folds.for_repeat(r).fold, ("a", "b", "c"), tuple(folds.classes))
        assert member.name == chosen
        expected = fit_chosen(data, chosen, repeat_config(config, r), metric)
        np.testing.assert_array_equal(member.predict_proba(X), expected.predict_proba(X))


def test_per_fold_test_features_give_each_repeat_its_own_fold_tables(tmp_path):
    root, folds, test_ids = specialist_run(tmp_path / "run", n_rows=200)
    rng = np.random.default_rng(4)
    tables = {}
    for r in range(R):
        for k in range(K):
            for m in ("a", "b"):
                proba = rng.dirichlet(np.ones(4), size=len(test_ids))
                tables[r, k, m] = proba
                write_table(RunPaths(root).for_repeat(r).test_fold(m, k),
                            PredictionTable(np.array(test_ids, dtype=object), proba, folds.classes, None,
                                            {"folds_sha256": folds.for_repeat(r).sha256}))
    fit_stack(root, fast_config(candidates=["mean", "logit_mean"], test_features="per_fold", nested=False), log=None)
    stack = read_table(RunPaths(root).stack_test, folds.classes, "test").proba
    guard = load_stack(root)
    per_fold = [guard.candidate_.members_[r].predict_proba(np.stack([tables[r, k, m] for m in ("a", "b")], axis=1))
                for r in range(R) for k in range(K)]  # repeat r's fit on repeat r's fold tables
    np.testing.assert_allclose(stack, normalise_rows(np.mean(per_fold, axis=0)), atol=1e-12)
    # stacker predict: the same tables predicted elsewhere give the same stack
    out = RunPaths(tmp_path / "out")
    for (r, k, m), proba in tables.items():
        write_table(out.for_repeat(r).test_fold(m, k), PredictionTable(np.array(test_ids, dtype=object), proba,
                                                                       folds.classes))
    for m in ("a", "b"):
        write_table(out.test(m), read_table(RunPaths(root).test(m), folds.classes, "test"))
    apply_stack(root, out.root, log=None)
    np.testing.assert_allclose(read_table(out.stack_test, folds.classes, "test").proba, stack, atol=1e-12)


def test_tables_from_another_tool_with_a_repeat_column_fit(tmp_path):
    rng = np.random.default_rng(2)
    folds = repeat_folds(200, 4)
    root = tmp_path / "run"
    root.mkdir()
    folds.table.to_csv(root / "folds.csv", index=False)  # id, label, fold, repeat
    paths = RunPaths(root)
    for m, k in {"a": [0, 1], "b": [2, 3]}.items():
        paths.preds_dir(m).mkdir(parents=True)
        frame = repeat_table(folds, [specialists(folds.y, rng, k, 4) for _ in range(R)], m).to_frame()
        frame.sample(frac=1, random_state=0).to_csv(paths.preds_dir(m) / "oof.csv", index=False)  # any row order
        test = make_test_tables([f"t{i}" for i in range(20)], folds.classes, {m: specialists(folds.y[:20], rng, k, 4)})
        test[m].to_frame().to_csv(paths.preds_dir(m) / "test.csv", index=False)
    decision = fit_stack(root, fast_config(candidates=["mean", "logit_mean"], nested=False), log=None)
    assert decision["repeats"] == R and decision["folds_sha256"] == folds.sha256
    assert len(load_stack(root).candidate_.members_) == R


def test_oof_without_repeats_is_refused_against_repeated_folds(tmp_path):
    root, folds, _ = specialist_run(tmp_path / "run", n_rows=100)
    paths = RunPaths(root)
    one = folds.for_repeat(0)
    write_table(paths.oof("a"), PredictionTable(one.ids, np.full((100, 4), 0.25), one.classes, one.fold,
                                                {"folds_sha256": folds.sha256}))
    with pytest.raises(StackerError, match=r"oof\.parquet: has no repeat column, but the folds hold 3 repeat\(s\)"):
        fit_stack(root, fast_config(candidates=["mean"]), log=None)


def test_a_model_leaked_in_one_repeat_is_flagged_naming_the_repeat():
    rng = np.random.default_rng(6)
    folds = repeat_folds(200, 4, seed=6)
    honest = {m: [specialists(folds.y, rng, [0, 1, 2, 3], 4) for _ in range(R)] for m in ("a", "b", "c")}
    honest["c"][1] = normalise_rows(np.eye(4)[folds.y] + 0.001)  # repeat 1's fold models saw their OOF rows
    guard = StackGuard(fast_config(candidates=["mean"], nested=False), log=None).fit(
        {m: repeat_table(folds, p, m) for m, p in honest.items()}, folds)
    assert list(guard.decision_["excluded"]) == ["c"] and guard.decision_["excluded"]["c"].startswith("repeat 1: ")
    assert guard.models_ == ["a", "b"]


# ---------------------------------------------------------------- the trap


def test_the_repeat_trap_is_closed():
    """Noise models: each fold model's prediction for a row it did not train on knows nothing of the label,
    but (as real models do) gives the same image nearly the same prediction in every repeat. The honest
    meta-level score is chance (1/3). A memorising meta-model (a deep LightGBM) is cross-validated:

    - mixing repeats (every repeat's OOF rows in one meta-CV, each row with its own repeat's fold, which
      is what a one-assignment stacker does with an R x N table): row i is held out in repeat r's fold
      while its other repeats' rows, nearly the same features with its label, train the meta-model.
      It scores far above chance;
    - ours (StackGuard on the R-repeat tables: each repeat on its own OOF and folds): near chance, and
      so is the nested estimate;
    - OOF averaged over repeats, scored on repeat 0's folds: each row's average is made only of
      predictions of models that never saw that row, and a meta-training row's target is not in any
      held-out row's features; measured here near chance too. The leak of repeats is their mixing.
    """
    rng = np.random.default_rng(3)
    n, c, models = 300, 3, ("a", "b", "c")
    folds = repeat_folds(n, c, seed=3)
    looks = {m: rng.dirichlet(np.full(c, 2.0), size=n) for m in models}  # (N, C) what each model sees in a row
    oof = {m: [normalise_rows(looks[m] * rng.uniform(0.9, 1.1, (n, c))) for _ in range(R)] for m in models}
    config = fast_config(candidates=["mean", "lgbm_wide"], lgbm_max_rounds=100, lgbm_min_data_in_leaf=2,
                         lgbm_learning_rate=0.3, lgbm_early_stopping=100)
    metric = Metric("accuracy", c)
    X = np.stack([np.stack([oof[m][r] for m in models], axis=1) for r in range(R)])  # (R, N, M, C)

    def meta_cv(data: MetaData) -> float:
        preds, _ = fit_keys(data, candidate_class("lgbm_wide"), [(f,) for f in range(K)], config, metric)
        return metric.score(data.y, assemble(preds, data.fold))

    mixed = meta_cv(MetaData(X.reshape(R * n, len(models), c), np.tile(folds.y, R), folds.fold_matrix.ravel(),
                             models, folds.classes))
    averaged = meta_cv(MetaData(X.mean(axis=0), folds.y, folds.fold_matrix[0], models, folds.classes))
    guard = StackGuard(config, log=None).fit({m: repeat_table(folds, oof[m], m) for m in models}, folds)
    ours = guard.decision_["candidates"]["lgbm_wide"]
    assert mixed > 0.6  # chance is 1/3
    assert abs(ours["score"] - 1 / 3) < 0.07 and all(abs(s - 1 / 3) < 0.1 for s in ours["repeat_scores"])
    assert abs(averaged - 1 / 3) < 0.07
    assert abs(guard.decision_["nested"]["score"] - 1 / 3) < 0.07
