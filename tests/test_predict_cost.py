"""predict-oof's measured prediction cost: each fold model's fixed overhead and seconds per image per view, in its
tables' metadata (measured once, never compared for staleness) and in metrics.json; the leaderboard shows it."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from oof import RunPaths, read_json, read_table, write_table
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

