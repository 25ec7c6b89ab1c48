"""stack.predict_budget: the guard stacks the units (model, TTA view choice) a gain-per-second rule picks
within the budget, the floor is their plain mean, the nested estimate picks again per outer fold; fit-stack's
test side and `stacker predict` render exactly the chosen views and fold models."""
from __future__ import annotations

import numpy as np
import pytest

from oof import RunPaths, StackerError, make_folds, read_json, read_table, write_json
from oof.views import ViewTable, read_views
from stack_fixtures import noisy_copy
from stacker import StackConfig, StackGuard
from stacker.budget import ModelCost, PredictInputs, Units, select_units
from stacker.metrics import Metric
from tiny import run_cli

CLASSES = [f"c{c}" for c in range(4)]


def _views(y, accuracies, rng) -> np.ndarray:
    """(V, N, C): one noisy view per accuracy, each its own noise."""
    return np.stack([noisy_copy(y, len(CLASSES), a, rng) for a in accuracies])


def _synthetic(n=600, seed=0):
    """Three models with 3 views each; "big" is strong and slow, "small" weaker and cheap, "mid" between."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    folds = make_folds([f"r{i:04d}" for i in range(n)], [CLASSES[c] for c in y], k=4, seed=0, classes=CLASSES)
    specs = {"big": ((0.80, 0.78, 0.78), 1.0), "mid": ((0.70, 0.69, 0.69), 0.3), "small": ((0.62, 0.6, 0.6), 0.05)}
    views, costs, tables = {}, {}, {}
    meta = {"tta": {"combine": "mean", "beta": 0.0}}
    for name, (accs, per_view) in specs.items():
        proba = _views(folds.y, accs, rng)
        views[name] = ViewTable(folds.ids, proba, tuple(CLASSES), folds.fold, meta)
        tables[name] = views[name].table(3, name)
        costs[name] = ModelCost(load_seconds=0.5, image_view_seconds=per_view / 1000, views=3, fold_models=4,
                                device="cpu")
    return folds, tables, PredictInputs(costs, views, test_rows=1000)


def _units(inputs: PredictInputs, folds, tables) -> Units:
    from stacker.budget import build_units
    return build_units(tables, inputs, StackConfig(), 1)


def test_select_units_keeps_every_step_within_the_budget_and_prefers_gain_per_second():
    folds, tables, inputs = _synthetic()
    units = _units(inputs, folds, tables)
    metric = Metric("accuracy", 4)
    # seconds: 4 fold models x (0.5 s + 1000 images x views x per-view)
    assert units.seconds[units.names.index("small@1")] == pytest.approx(4 * (0.5 + 1000 * 0.05 / 1000))
    whole = select_units(units.X, folds.y, units, float("inf"), metric)
    assert [step["seconds"] for step in whole.path] == sorted(step["seconds"] for step in whole.path)
    assert whole.path[0]["model"] == "small"  # the most score per second from nothing: the cheap model
    for budget in (3.0, 6.0, 12.0):
        chosen = select_units(units.X, folds.y, units, budget, metric)
        spent = sum(units.seconds[u] for u in chosen.chosen)
        assert spent <= budget and chosen.path[-1]["seconds"] == pytest.approx(spent)
        assert len({units.models[u] for u in chosen.chosen}) == len(chosen.chosen)  # one view choice per model
        mean = np.mean([units.X[0][:, u] for u in chosen.chosen], axis=0)
        assert chosen.path[-1]["score"] == pytest.approx(metric.score(folds.y, mean))
    with pytest.raises(StackerError, match="cannot fit a single model: the cheapest, small@1, needs"):
        select_units(units.X, folds.y, units, 1.0, metric)


def test_the_guard_stacks_the_chosen_units_and_its_floor_is_their_plain_mean():
    folds, tables, inputs = _synthetic()
    config = StackConfig(n_bootstrap=200, candidates=("mean", "logit_mean", "weights"), predict_budget=6.0)
    guard = StackGuard(config, log=None).fit(tables, folds, predict=inputs)
    record = guard.decision_["predict"]
    assert record["seconds"] <= 6.0 and record["budget"] == 6.0 and record["rows"] == 1000
    assert guard.models_ == [u["name"] for u in record["units"]] == guard.decision_["used"]
    assert record["ensemble_seconds"] > 6.0  # the whole ensemble would not fit
    floor = np.mean([inputs.views[u["model"]].choice(u["views"]) for u in record["units"]], axis=0)
    assert np.allclose(guard.oof_["mean"], floor)
    assert all(c["predict_seconds"] == record["seconds"] for c in guard.decision_["candidates"].values())
    assert set(record["outer"]) == {"0", "1", "2", "3"}  # chosen again inside each outer fold
    assert guard.decision_["nested"]["score"] > 0


def test_without_a_budget_the_decision_is_the_guards_own_plus_its_predicted_seconds():
    folds, tables, inputs = _synthetic()
    config = StackConfig(n_bootstrap=200, candidates=("mean", "logit_mean", "weights"))
    plain = StackGuard(config, log=None).fit(tables, folds).decision_
    costed = StackGuard(config, log=None).fit(tables, folds, predict=inputs).decision_
    record = costed.pop("predict")
    for scores in costed["candidates"].values():
        assert scores.pop("predict_seconds") == record["seconds"]
    assert costed == plain
    assert record["seconds"] == record["ensemble_seconds"] and record["budget"] is None
    assert record["path"] and record["path"][0]["model"] == "small"  # the front, for the report


def test_a_budget_without_recorded_costs_stops_in_one_line():
    folds, tables, inputs = _synthetic()
    config = StackConfig(n_bootstrap=200, candidates=("mean",), predict_budget=10.0)
    partial = PredictInputs({m: c for m, c in inputs.costs.items() if m != "mid"}, inputs.views, 1000)
    with pytest.raises(StackerError, match="no recorded prediction cost for mid"):
        StackGuard(config, log=None).fit(tables, folds, predict=partial)
    with pytest.raises(StackerError, match="no recorded prediction cost"):
        StackGuard(config, log=None).fit(tables, folds)


def _budget_args(paths, *sets):
    return ("fit-stack", "--run", paths.root, *[a for s in sets for a in ("--set", s)])


def test_fit_stack_and_stacker_predict_render_only_the_chosen_views_and_folds(trained_copy, tmp_path,
                                                                             small_digits_dir):
    paths = RunPaths(trained_copy.run)
    folds_classes = read_table(paths.oof("test_resnet"), [str(c) for c in range(10)], "oof").classes
    views = read_views(paths.oof_views("test_resnet"), folds_classes)
    assert views.views == 3 and np.allclose(views.choice(3), read_table(paths.oof("test_resnet"), folds_classes,
                                                                         "oof").proba)
    whole = read_json(paths.decision)["predict"]
    budget = 0.55 * whole["ensemble_seconds"]
    result = run_cli(*_budget_args(paths, f"stack.predict_budget={budget}", "stack.predict_folds=2"))
    assert result.returncode == 0, result.stderr
    decision = read_json(paths.decision)
    record = decision["predict"]
    assert record["seconds"] <= budget and all(u["fold_models"] == 2 for u in record["units"])
    assert f"fit-stack: predict budget {budget:g} s for 80 images" in result.stdout
    images = ("--images", small_digits_dir / "test_images", "--sample-submission",
              small_digits_dir / "sample_submission.csv")
    for model in paths.predicted_models():  # a fold model the stack never renders need not travel with the run
        paths.weights(model, 2).unlink()
    out = RunPaths(tmp_path / "out")
    result = run_cli("predict", "--run", paths.root, *images, "--out", out.root)
    assert result.returncode == 0, result.stderr
    for unit in record["units"]:
        table = read_table(out.test(unit["model"]), folds_classes, "test")
        assert len(table.meta["tta"]["views"]) + 1 == unit["views"] and len(table.meta["weights_sha256"]) == 2
        assert not out.test_fold(unit["model"], 2).exists()  # the third fold model is never run
    run_stack = read_table(paths.stack_test, folds_classes, "test")
    new_stack = read_table(out.stack_test, folds_classes, "test")
    order = np.argsort(run_stack.ids), np.argsort(new_stack.ids)
    assert np.abs(run_stack.proba[order[0]] - new_stack.proba[order[1]]).max() < 1e-9  # the same images, views, folds
    printed = f"for 80 images through {len(record['units'])} models"
    assert printed in result.stdout


def test_a_budget_the_ensemble_cannot_meet_is_one_line_exit_2(trained_copy):
    paths = RunPaths(trained_copy.run)
    result = run_cli(*_budget_args(paths, "stack.predict_budget=0.000001"))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "cannot fit a single model" in result.stderr
    for model in paths.predicted_models():  # tables from another tool: no costs
        metrics = read_json(paths.predict_metrics(model))
        metrics.pop("cost")
        write_json(paths.predict_metrics(model), metrics)
    result = run_cli(*_budget_args(paths, "stack.predict_budget=100"))
    assert result.returncode == 2 and "no recorded prediction cost for" in result.stderr, result.stderr


def test_a_meta_model_reaches_full_fits_only_with_allow_full_meta():
    from stacker.applied import applied_side

    folds, tables, _ = _synthetic()
    assert applied_side({"chosen": "mean"}, StackConfig(test_models="full"), folds) == {
        "models": "full", "validated": False, "fold_models": 0}
    allowed = applied_side({"chosen": "lgbm_wide"}, StackConfig(test_models="full", allow_full_meta=True), folds)
    assert allowed["models"] == "full" and not allowed["validated"] and "sharper" in allowed["warning"]
    assert applied_side({"chosen": "logreg"}, StackConfig(predict_folds=2), folds) == {
        "models": "folds", "validated": True, "fold_models": 2}
    config = StackConfig(n_bootstrap=200, candidates=("mean", "weights", "logreg", "lgbm_class_shared"),
                         test_models="both")
    guard = StackGuard(config, log=None).fit(tables, folds)
    assert set(guard.decision_["left_out"]) == {"logreg", "lgbm_class_shared"}  # never chosen, never applied
    assert "allow_full_meta" in guard.decision_["left_out"]["logreg"]
    assert set(guard.decision_["candidates"]) == {"mean", "weights"}
    allowed = StackGuard(StackConfig(**{**config.to_dict(), "allow_full_meta": True}), log=None).fit(tables, folds)
    assert set(allowed.decision_["candidates"]) == set(config.candidates)


def test_predicted_seconds_count_the_fold_models_and_full_fits_rendered():
    folds, tables, inputs = _synthetic()
    per_unit = {}
    for models, predict_folds in (("folds", -1), ("folds", 2), ("full", -1), ("both", 2)):
        config = StackConfig(n_bootstrap=200, candidates=("mean",), test_models=models, predict_folds=predict_folds)
        record = StackGuard(config, log=None).fit(tables, folds, predict=inputs).decision_["predict"]
        per_unit[models, predict_folds] = record["units"][0]["seconds"]
    assert per_unit["folds", 2] == pytest.approx(per_unit["folds", -1] / 2)  # 2 of the 4 fold models
    assert per_unit["full", -1] == pytest.approx(per_unit["folds", -1] / 4)  # one full fit, as a fold model costs
    assert per_unit["both", 2] == pytest.approx(per_unit["folds", -1] * 3 / 4)


def test_full_fits_feed_the_test_side_unvalidated_and_stacker_predict_renders_them(trained_copy, tmp_path,
                                                                                 small_digits_dir):
    paths = RunPaths(trained_copy.run)
    for stage in (("train-base", "--config", trained_copy.config, "--full"), ("predict-oof", "--run", paths.root)):
        result = run_cli(*stage)
        assert result.returncode == 0, result.stderr
    classes = read_table(paths.oof("test_resnet"), [str(c) for c in range(10)], "oof").classes
    result = run_cli(*_budget_args(paths, "stack.test_models=both", "stack.candidates=[mean]"))
    assert result.returncode == 0, result.stderr
    decision = read_json(paths.decision)
    assert decision["test_side"] == {"models": "both", "validated": False, "fold_models": 3}
    assert decision["chosen"] == "mean"
    assert "UNVALIDATED" in paths.stack_report.read_text() and "UNVALIDATED" in (paths.root / "report.html").read_text()
    members = []
    for model in decision["used"]:  # each model: its 3 fold models and its full fit, the full fit as a fourth fold
        parts = [read_table(paths.test_fold(model, k), classes, "test").proba for k in range(3)]
        members.append((sum(parts) + read_table(paths.test_full(model), classes, "test").proba) / 4)
    stack = read_table(paths.stack_test, classes, "test")
    assert np.allclose(stack.proba, np.mean(members, axis=0), atol=1e-9)
    out = RunPaths(tmp_path / "out")
    result = run_cli("predict", "--run", paths.root, "--images", small_digits_dir / "test_images",
                     "--sample-submission", small_digits_dir / "sample_submission.csv", "--out", out.root)
    assert result.returncode == 0, result.stderr
    assert out.test_full("test_resnet").is_file() and "test_resnet full fit: 80 test rows" in result.stdout
    new = read_table(out.stack_test, classes, "test")
    order = np.argsort(stack.ids), np.argsort(new.ids)
    assert np.abs(stack.proba[order[0]] - new.proba[order[1]]).max() < 1e-9
    result = run_cli(*_budget_args(paths, "stack.test_models=full", "stack.candidates=[mean]"))
    assert result.returncode == 0, result.stderr
    fulls = [read_table(paths.test_full(m), classes, "test").proba for m in decision["used"]]
    assert np.allclose(read_table(paths.stack_test, classes, "test").proba, np.mean(fulls, axis=0), atol=1e-9)


def test_a_budget_over_repeated_folds_chooses_one_set_of_units_for_every_repeat():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 4, 400)
    folds = make_folds([f"r{i:04d}" for i in range(400)], [CLASSES[c] for c in y], k=3, seed=0, classes=CLASSES,
                       repeats=2)
    ids, fold, repeat = np.tile(folds.ids, 2), folds.fold_matrix.ravel(), np.repeat([0, 1], 400)
    meta = {"tta": {"combine": "mean", "beta": 0.0}}
    views, costs, tables = {}, {}, {}
    for name, accs, per_view in (("big", (0.8, 0.75), 1.0), ("small", (0.6, 0.6), 0.1)):
        proba = np.concatenate([_views(folds.y, accs, rng) for _ in range(2)], axis=1)  # (V, R * N, C)
        views[name] = ViewTable(ids, proba, tuple(CLASSES), fold, meta, repeat)
        tables[name] = views[name].table(2, name)
        costs[name] = ModelCost(0.1, per_view / 1000, views=2, fold_models=6, device="cpu")
    inputs = PredictInputs(costs, views, test_rows=1000)
    whole = sum(c.seconds(2, 1000, 6) for c in costs.values())
    config = StackConfig(n_bootstrap=200, candidates=("mean", "weights"), predict_budget=0.6 * whole)
    guard = StackGuard(config, log=None).fit(tables, folds, predict=inputs)
    record = guard.decision_["predict"]
    assert record["seconds"] <= 0.6 * whole and guard.repeats_ == 2
    assert guard.oof_["mean"].shape == (2, 400, 4)  # each repeat scored on its own rows, the same units
    floor = np.mean([views[u["model"]].choice(u["views"]) for u in record["units"]], axis=0).reshape(2, 400, 4)
    assert np.allclose(guard.oof_["mean"], floor)


def test_when_no_unit_beats_a_uniform_guess_the_best_single_unit_is_chosen():
    folds, tables, inputs = _synthetic(n=200)
    units = _units(inputs, folds, tables)
    flat = [np.full_like(units.X[0], 0.25)]  # every unit a uniform guess: no move gains on it
    flat[0][:, 3] = np.eye(4)[(folds.y + 1) % 4] * 0.5 + 0.125  # one unit wrong everywhere, but different
    chosen = select_units(flat, folds.y, units._replace(X=flat), float("inf"), Metric("accuracy", 4))
    assert len(chosen.chosen) == 1 and len(chosen.path) == 1  # never an empty ensemble


def test_a_test_side_the_run_cannot_give_is_refused_before_the_guard(trained_copy):
    paths = RunPaths(trained_copy.run)
    result = run_cli(*_budget_args(paths, "stack.test_models=full"))
    assert result.returncode == 2 and "has no full fit" in result.stderr and "train-base --full" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_predict_folds_without_recorded_costs_still_renders_that_many_fold_models(trained_copy):
    from oof.views import renders

    paths = RunPaths(trained_copy.run)
    for model in paths.predicted_models():  # tables from another tool: no costs, so no predict record
        metrics = read_json(paths.predict_metrics(model))
        metrics.pop("cost")
        write_json(paths.predict_metrics(model), metrics)
    result = run_cli(*_budget_args(paths, "stack.predict_folds=1", "stack.candidates=[mean]"))
    assert result.returncode == 0, result.stderr
    decision = read_json(paths.decision)
    assert "predict" not in decision and decision["test_side"]["fold_models"] == 1
    assert all(r.fold_models == 1 for r in renders(decision))
    classes = read_table(paths.oof("test_resnet"), [str(c) for c in range(10)], "oof").classes
    folds0 = [read_table(paths.test_fold(m, 0), classes, "test").proba for m in decision["used"]]
    assert np.allclose(read_table(paths.stack_test, classes, "test").proba, np.mean(folds0, axis=0), atol=1e-9)
