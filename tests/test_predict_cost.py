"""predict-oof's measured prediction cost: each fold model's fixed overhead and seconds per image per view, in its
tables' metadata (measured once, never compared for staleness) and in metrics.json; the leaderboard shows it."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from oof import RunPaths, read_json, read_table, write_json, write_table
from stacker.leaderboard import leaderboard, read_run
from tiny import run_cli

MODEL = "test_resnet"


def test_each_fold_table_records_its_cost_and_metrics_json_sums_the_test_side(trained_run):
    paths = RunPaths(trained_run.run)
    folds = read_run(paths.root).folds
    costs = [read_table(paths.oof_fold(MODEL, k), folds.classes, "oof").meta["job"]["cost"] for k in range(folds.k)]
    for cost in costs:
        assert cost["device"] == "cpu" and cost["views"] == 3 and cost["images"] == 80  # plain + tta.n 2; the test set
        assert cost["load_seconds"] > 0 and 0 < cost["image_view_seconds"] < 1
    model = read_json(paths.predict_metrics(MODEL))["cost"]
    per_view = np.mean([c["image_view_seconds"] for c in costs])
    assert model["fold_models"] == 3 and model["image_seconds"] == pytest.approx(3 * 3 * per_view)
    assert model["fixed_seconds"] == pytest.approx(sum(c["load_seconds"] for c in costs))
    row = leaderboard(read_run(paths.root)).set_index("name").loc[MODEL]
    assert row["image_ms"] == pytest.approx(1000 * model["image_seconds"])
    printed = run_cli("leaderboard", "--run", paths.root).stdout
    assert "ms/img" in printed and f"{1000 * model['image_seconds']:.2f}" in printed


def test_a_cost_is_measured_once_and_never_makes_a_table_stale(trained_copy):
    paths = RunPaths(trained_copy.run)
    folds = read_run(paths.root).folds
    part = read_table(paths.oof_fold(MODEL, 0), folds.classes, "oof")
    recorded = {**part.meta["job"]["cost"], "load_seconds": 123.0}  # as another machine measured it
    write_table(paths.oof_fold(MODEL, 0), replace(part, meta={**part.meta, "job": {**part.meta["job"],
                                                                                   "cost": recorded}}))
    paths.oof(MODEL).unlink()  # the model's tables are assembled again from its current parts
    result = run_cli("predict-oof", "--run", paths.root)
    assert result.returncode == 0, result.stderr
    assert f"{MODEL} fold 0:" not in result.stdout  # no fold model predicted again
    again = read_table(paths.oof_fold(MODEL, 0), folds.classes, "oof").meta["job"]["cost"]
    assert again["load_seconds"] == 123.0  # reused, not measured again
    fixed = read_json(paths.predict_metrics(MODEL))["cost"]["fixed_seconds"]
    assert fixed > 123.0



def test_stacker_predict_prints_its_predicted_time_and_refuses_a_budget_it_cannot_meet(trained_copy, tmp_path,
                                                                                      small_digits_dir):
    paths = RunPaths(trained_copy.run)
    images = ("--images", small_digits_dir / "test_images", "--sample-submission",
              small_digits_dir / "sample_submission.csv")
    refused = run_cli("predict", "--run", paths.root, *images, "--out", tmp_path / "tight", "--budget", "0.0001")
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "--budget 0.0001: the stack's" in refused.stderr and "for 80 images" in refused.stderr
    assert not RunPaths(tmp_path / "tight").cache.exists()  # refused before anything was decoded
    result = run_cli("predict", "--run", paths.root, *images, "--out", tmp_path / "out", "--budget", "3600")
    assert result.returncode == 0, result.stderr
    models = read_json(paths.decision)["used"]  # the models the stack applies
    costs = [read_json(paths.predict_metrics(m))["cost"] for m in models]
    expected = sum(c["fixed_seconds"] + 80 * c["image_seconds"] for c in costs)
    assert f"predict: predicted {expected:.1f} s for 80 images" in result.stdout


def test_a_budget_without_recorded_costs_is_one_line(trained_copy, tmp_path, small_digits_dir):
    paths = RunPaths(trained_copy.run)
    for model in paths.predicted_models():  # as tables from another tool, or predicted before costs were kept
        metrics = read_json(paths.predict_metrics(model))
        metrics.pop("cost")
        write_json(paths.predict_metrics(model), metrics)
    stale = run_cli("predict", "--run", paths.root, "--images", small_digits_dir / "test_images", "--out", tmp_path / "x")
    assert stale.returncode == 2 and "metrics.json changed" in stale.stderr  # the costs are one of the stack's inputs
    assert run_cli("fit-stack", "--run", paths.root).returncode == 0
    args = ("predict", "--run", paths.root, "--images", small_digits_dir / "test_images", "--sample-submission",
            small_digits_dir / "sample_submission.csv", "--out", tmp_path / "out")
    refused = run_cli(*args, "--budget", "100")
    assert refused.returncode == 2 and "no recorded prediction cost for" in refused.stderr, refused.stderr
    result = run_cli(*args)  # no budget: the time is unknown, and said so
    assert result.returncode == 0 and "predicted time unknown" in result.stdout, result.stderr
