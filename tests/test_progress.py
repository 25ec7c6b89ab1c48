"""What a run says: the `stacker` logger (silent in a notebook unless asked), bars only on a terminal,
one plain line per finished job with the grid's ETA."""
from __future__ import annotations

import logging
import re

import pytest

from oof import LOGGER, GridProgress, bar, duration, info


@pytest.fixture
def unconfigured_logger():
    """The `stacker` logger as a notebook finds it: no handler of its own, nothing configured."""
    saved = (list(LOGGER.handlers), LOGGER.level, LOGGER.propagate)
    LOGGER.handlers, LOGGER.propagate = [], True
    LOGGER.setLevel(logging.NOTSET)
    yield LOGGER
    LOGGER.handlers, LOGGER.level, LOGGER.propagate = saved[0], saved[1], saved[2]


def test_a_library_call_prints_nothing_unless_asked(unconfigured_logger, capsys, caplog):
    info("train-base: 6 jobs")
    assert capsys.readouterr() == ("", "")  # logging's last resort shows WARNING and above only
    with caplog.at_level(logging.INFO, logger="stacker"):
        info("train-base: 6 jobs")
    assert caplog.messages == ["train-base: 6 jobs"]


def test_warnings_reach_the_warning_level(unconfigured_logger, caplog):
    with caplog.at_level(logging.WARNING, logger="stacker"):
        info("fit-stack: 8 candidates")
        info("warning: model 'x' looks leaked")
    assert caplog.messages == ["warning: model 'x' looks leaked"]


def test_bars_are_off_where_stderr_is_no_terminal():
    items = range(3)
    assert bar(items, total=3, desc="x") is items  # pytest captures stderr: not a terminal
    nothing = bar(total=5)
    nothing.update(2)
    nothing.close()


def test_grid_progress_says_done_elapsed_and_eta():
    lines = []
    grid = GridProgress(3, lines.append)
    for name in ("a fold 0", "a fold 1", "a fold 2"):
        grid.step(name)
    assert re.fullmatch(r"job 1/3, \d+\.\ds so far, ETA \d+\.\ds \(a fold 0\)", lines[0])
    assert re.fullmatch(r"job 3/3, \d+\.\ds so far \(a fold 2\)", lines[2])  # no ETA once done


@pytest.mark.parametrize("seconds, text", [(12.34, "12.3s"), (245, "4m05s"), (4320, "1h12m")])
def test_duration(seconds, text):
    assert duration(seconds) == text
