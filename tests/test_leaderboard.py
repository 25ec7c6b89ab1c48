"""`stacker leaderboard`: each model's stored OOF figures as soon as it has predictions, the candidates once
fit-stack has run; and the expected calibration error it (and the HTML report) uses."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import stacker_cli as cli
from oof import (PredictionTable, RunPaths, StackerError, accuracy, log_loss, make_folds, read_json, write_bytes,
                 write_folds, write_json, write_table)
from stack_fixtures import fast_config, noisy_copy, strong_weak_run
from stacker import fit_stack
from stacker.leaderboard import expected_calibration_error, leaderboard, print_leaderboard, read_run
from test_no_torch import without_torch

MODELS = ("strong", "middle", "weak")


def add_training_files(paths: RunPaths, folds, name: str, index: int, rng) -> None:
    """What train-base and predict-oof leave beside a model's tables: histories, weights, metrics, the
    plain view's OOF (not for the last model, as in runs made before oof_plain existed)."""
    for r in range(folds.repeats):
        for k in range(folds.k):
            epochs = [{"epoch": e, "train_loss": 2.0 / e, "valid_loss": 2.2 / e, "error_rate": 0.5 / e,
                       "seconds": 0.25 * (index + 1), "lr": 1e-3} for e in (1, 2, 3)]
            write_json(paths.for_repeat(r).history(name, k), {"model": name, "fold": k, "epochs": epochs})
            write_bytes(paths.for_repeat(r).weights(name, k), bytes(1000 * (index + 1)))
    oof = read_run(paths.root).models[name].oof
    y = np.tile(folds.y, folds.repeats)
    metrics = {"accuracy": accuracy(y, oof.proba), "log_loss": log_loss(y, oof.proba), "seconds": 1.5 + index}
    if index < 2:  # over-confident plain view, a little less accurate: what TTA is for
        plain = noisy_copy(y, len(folds.classes), 0.8 - 0.1 * index, rng, confidence=0.95)
        write_table(paths.oof_plain(name), PredictionTable(oof.ids, plain, oof.classes, oof.fold, oof.meta,
                                                           repeat=oof.repeat))
        metrics.update(accuracy_no_tta=accuracy(y, plain), log_loss_no_tta=log_loss(y, plain))
    write_json(paths.predict_metrics(name), metrics)


def report_run(root, stack: bool = True):
    """strong / middle / weak models on 300 rows with every file a run holds, and (stack=True) their stack."""
    run, folds, _ = strong_weak_run(root, n_rows=300, n_test=40)
    paths, rng = RunPaths(run), np.random.default_rng(5)
    for index, name in enumerate(MODELS):
        add_training_files(paths, folds, name, index, rng)
    paths.config.write_text("folds:\n  k: 5  # <script>alert('not run')</script> & more\n", encoding="utf-8")
    if stack:
        fit_stack(run, fast_config(n_bootstrap=100), log=None)
    return run


def repeat_run(root):
    """Two models on folds with 2 repeats (R x N-row OOF tables, per-repeat metrics), stacked on the means."""
    rng = np.random.default_rng(3)
    labels = [f"c{c}" for c in rng.integers(0, 4, 200)]
    folds = make_folds([f"r{i:03d}" for i in range(200)], labels, k=4, seed=0, classes=[f"c{c}" for c in range(4)],
                       repeats=2)
    paths = RunPaths(root)
    write_folds(paths.folds, folds)
    for index, (name, acc) in enumerate((("alpha", 0.8), ("beta", 0.7))):
        each = [noisy_copy(folds.y, 4, acc, rng) for _ in range(2)]
        write_table(paths.oof(name), PredictionTable(
            np.tile(folds.ids, 2), np.concatenate(each), folds.classes, folds.fold_matrix.ravel(),
            {"model": name, "folds_sha256": folds.sha256}, repeat=np.repeat([0, 1], folds.n_rows)))
        write_table(paths.test(name), PredictionTable(np.array(["t0", "t1"], dtype=object),
                                                      np.full((2, 4), 0.25), folds.classes))
        add_training_files(paths, folds, name, index + 2, rng)  # no plain view
        scores = [{"accuracy": accuracy(folds.y, p), "log_loss": log_loss(folds.y, p)} for p in each]
        metrics = read_json(paths.predict_metrics(name))
        write_json(paths.predict_metrics(name), {**metrics, "repeats": scores, "accuracy_std": float(
            np.std([s["accuracy"] for s in scores], ddof=1))})
    fit_stack(root, fast_config(candidates=["mean", "logit_mean"], nested=False), log=None)
    return root


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
