"""Shared fixtures: offline, seeded, small, CPU; the expensive ones built once per session and copied per test."""
from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never reach the hub: test_* models are randomly initialised

from dataclasses import dataclass
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
    """The demo's digits dataset (Kaggle folder layout, 16 px PNGs), written once per session."""
    from base_models.demo_data import write_digits_dataset

    return write_digits_dataset(tmp_path_factory.mktemp("digits") / "data", size=16)


@pytest.fixture(scope="session")
def small_digits_dir(tmp_path_factory):
    """400 digits (320 train, 80 test) at 16 px: enough to train a test_* model in a second."""
    from base_models.demo_data import write_digits_dataset

    return write_digits_dataset(tmp_path_factory.mktemp("small_digits") / "data", size=16, n_images=400)


@pytest.fixture
def restore_logging():
    """`cli.main` in the test's process points the `stacker` logger at this test's stdout; give the next
    test the logger it had."""
    from tiny import kept_logging

    with kept_logging():
        yield


@dataclass(frozen=True)
class TrainedRun:
    """A run the four stages made, the config it was made from, and what each stage returned and printed."""

    run: Path
    config: Path
    results: dict  # stage -> tiny.CliResult


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, small_digits_dir) -> TrainedRun:
    """Both test_* models on the 400 digits (3 folds, `tiny.CLI_TRAIN`, 2 TTA views) through train-base,
    predict-oof, fit-stack and submit, once per session, in this process. Read it as it is; a test that writes
    takes `trained_copy`."""
    from tiny import run_cli, write_config

    root = tmp_path_factory.mktemp("trained")
    config = write_config(root / "run.yaml", small_digits_dir, root / "run")
    results = {"train-base": run_cli("train-base", "--config", config)}
    for stage in ("predict-oof", "fit-stack", "submit"):
        results[stage] = run_cli(stage, "--run", root / "run")
    return TrainedRun(root / "run", config, results)


@pytest.fixture
def trained_copy(trained_run, tmp_path, small_digits_dir) -> TrainedRun:
    """This test's own copy of `trained_run` (every file's time kept: all four stages find it current) and a
    config that names the copy."""
    from tiny import copy_run, write_config

    run = copy_run(trained_run.run, tmp_path / "run")
    return TrainedRun(run, write_config(tmp_path / "run.yaml", small_digits_dir, run), trained_run.results)


@pytest.fixture(scope="session")
def stacked_report_run(tmp_path_factory) -> Path:
    """`stack_fixtures.report_run` once per session: three synthetic models with every file a run holds,
    stacked. The leaderboard and report tests read it and write nothing into it."""
    from stack_fixtures import report_run

    return report_run(tmp_path_factory.mktemp("report") / "run")
