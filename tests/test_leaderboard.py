"""`stacker leaderboard`: each model's stored OOF figures as soon as it has predictions, the candidates once
fit-stack has run; and the expected calibration error it (and the HTML report) uses."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import stacker_cli as cli
from oof import RunPaths, StackerError, accuracy, log_loss, read_json
from stack_fixtures import MODELS, repeat_run, report_run, strong_weak_run
from stacker.leaderboard import expected_calibration_error, leaderboard, print_leaderboard, read_run
from test_no_torch import without_torch

@pytest.fixture(scope="module")
def run(stacked_report_run):
    return stacked_report_run


# ---------------------------------------------------------------- ECE


def reference_ece(y, proba, n_bins=15):
    """Guo et al.'s loop: bins (lower, upper], |accuracy - confidence| weighted by the bin's share of rows."""
    confidence, correct = proba.max(axis=1), proba.argmax(axis=1) == y
    total = 0.0
    for lower, upper in zip(np.linspace(0, 1, n_bins + 1)[:-1], np.linspace(0, 1, n_bins + 1)[1:]):
        inside = (confidence > lower) & (confidence <= upper)
        if inside.any():
            total += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return total


@pytest.mark.parametrize("confidence, right, expected", [
    (0.8, 8, 0.0),     # 80% sure, right on 8 of 10 rows: calibrated
    (0.95, 5, 0.45),   # 95% sure, right on half: over-confident by 0.45
    (0.35, 10, 0.65),  # 35% sure, always right: under-confident
])
def test_ece_of_rows_in_one_bin_is_the_gap_between_accuracy_and_confidence(confidence, right, expected):
    y = np.zeros(10, dtype=int)
    proba = np.tile([confidence, 1 - confidence, 0.0], (10, 1))
    proba[right:] = [1 - confidence, confidence, 0.0]  # the wrong rows: as sure, of class 1
    assert expected_calibration_error(y, proba) == pytest.approx(expected)


def test_ece_equals_the_reference_loop_on_random_rows():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 2000)
    proba = rng.dirichlet(np.full(5, 0.3), 2000)
    assert expected_calibration_error(y, proba) == pytest.approx(reference_ece(y, proba), abs=1e-12)


# ---------------------------------------------------------------- leaderboard


def test_model_rows_hold_the_stored_figures_and_the_candidates_the_decision(run):
    frame = leaderboard(read_run(run))
    decision = read_json(RunPaths(run).decision)
    models = frame[frame["kind"] == "model"].set_index("name")
    assert list(models.index) == ["strong", "middle", "weak"]  # best OOF accuracy first
    for index, name in enumerate(MODELS):
        metrics = read_json(RunPaths(run).predict_metrics(name))
        row = models.loc[name]
        assert row["accuracy"] == metrics["accuracy"] and row["log_loss"] == metrics["log_loss"]
        assert row["predict_seconds"] == metrics["seconds"] and row["epochs"] == 3
        assert row["train_seconds"] == pytest.approx(5 * 3 * 0.25 * (index + 1))  # K folds x 3 epochs
        assert row["weights_mb"] == pytest.approx(5 * 1000 * (index + 1) / 1e6)
        assert row["score"] == decision["models"][name]["score"] and row["status"] == "used"
        assert row["ece"] > 0 and len(row["fold_scores"].split()) == 5
    assert models.loc["strong", "accuracy_no_tta"] == read_json(RunPaths(run).predict_metrics("strong"))[
        "accuracy_no_tta"] and models.loc["strong", "ece_no_tta"] > models.loc["strong", "ece"]
    assert pd.isna(models.loc["weak", "ece_no_tta"])  # no oof_plain: TTA only
    candidates = frame[frame["kind"] == "candidate"].set_index("name")
    for name, c in decision["candidates"].items():
        assert candidates.loc[name, "score"] == c["score"] and candidates.loc[name, "gain"] == c["gain"]
    assert candidates.index[candidates["chosen"].astype(bool)].tolist() == [decision["chosen"]]


def test_the_cli_prints_it_after_predict_oof_and_writes_the_csv(tmp_path):
    run = report_run(tmp_path / "run", stack=False)
    csv = tmp_path / "board.csv"
    lines = []
    assert cli.cmd_leaderboard(cli.build_parser().parse_args(["leaderboard", "--run", str(run), "--csv", str(csv)]),
                               log=lines.append) == 0
    text = "\n".join(lines)
    assert "no stack yet" in text and all(name in text for name in MODELS)
    written = pd.read_csv(csv)
    assert list(written["name"]) == ["strong", "middle", "weak"] and set(written["kind"]) == {"model"}
    assert written["accuracy"].tolist() == [read_json(RunPaths(run).predict_metrics(m))["accuracy"] for m in MODELS]


def test_one_model_with_predictions_is_enough_and_none_is_refused(tmp_path):
    run, folds, _ = strong_weak_run(tmp_path / "run", n_rows=100)
    for name in ("middle", "weak"):
        RunPaths(run).oof(name).unlink()
    frame = print_leaderboard(run, log=None)
    assert frame["name"].tolist() == ["strong"]
    assert frame.loc[0, "accuracy"] == accuracy(folds.y, read_run(run).models["strong"].oof.proba)  # no metrics
    RunPaths(run).oof("strong").unlink()
    with pytest.raises(StackerError, match="no model has an OOF table yet"):
        print_leaderboard(run, log=None)


def test_repeats_show_the_stored_spread_and_every_repeats_folds(tmp_path):
    run = repeat_run(tmp_path / "run")
    frame = leaderboard(read_run(run))
    row = frame[frame["name"] == "alpha"].iloc[0]
    assert row["accuracy_std"] == read_json(RunPaths(run).predict_metrics("alpha"))["accuracy_std"]
    assert len(row["fold_scores"].split()) == 2 * 4  # R x K
    assert "repeat_std" in frame.columns  # the decision's per-repeat spread, from leaderboard_frame


def test_leaderboard_runs_without_torch(run):
    result = without_torch("leaderboard", "--run", run)
    assert result.returncode == 0, result.stderr
    assert "lgbm_wide" in result.stdout and "strong" in result.stdout
