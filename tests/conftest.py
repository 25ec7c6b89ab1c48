"""Shared fixtures: offline, seeded, small, CPU."""
from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never reach the hub: test_* models are randomly initialised

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
    import logging

    from oof import LOGGER

    handlers, level, propagate = LOGGER.handlers[:], LOGGER.level, LOGGER.propagate
    warnings_handlers = logging.getLogger("py.warnings").handlers[:]
    yield
    LOGGER.handlers, LOGGER.level, LOGGER.propagate = handlers, level, propagate
    logging.getLogger("py.warnings").handlers = warnings_handlers
    logging.captureWarnings(False)
