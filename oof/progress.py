"""What a run says while it works: the `stacker` logger, tqdm bars on a terminal, the job grid's ETA.

Every stage reports through `log` callables whose default is `info`, a message to the `stacker`
logger at INFO. Nothing configures that logger but the command line (`cli.py`: the console at
INFO, WARNING with -q, DEBUG with -v, and `<run>/logs/<stage>.log`), so a library call from a
notebook prints nothing unless asked: `logging.basicConfig(level=logging.INFO)`, or pass
`log=print`.

Bars (`bar`) show rate and ETA for the long loops (decoding, an epoch's steps, TTA, the meta
level's fits) only when stderr is a terminal and the logger would show INFO; in CI, under nohup
or in a Kaggle commit log there are no bar control characters, only the plain lines the stages
log anyway (an epoch's line, a job's line). `GridProgress` adds one plain line per finished job
of a grid: "job 7/50, 1m12s so far, ETA 8m24s".
"""
from __future__ import annotations

import logging
import os
import sys
import time

LOGGER = logging.getLogger("stacker")


def info(message: str) -> None:
    """The stages' default `log`: one message to the `stacker` logger, at INFO; at WARNING when it says
    "warning:" (a leaked-looking model left out, a sample's placeholder labels), so -q still shows it."""
    if message.lstrip().lower().startswith("warning:"):
        LOGGER.warning(message)
    else:
        LOGGER.info(message)


def bars_enabled() -> bool:
    """Bars only on a terminal whose console shows INFO (not with -q), unless STACKER_PROGRESS=0."""
    if os.environ.get("STACKER_PROGRESS", "1") == "0" or not sys.stderr.isatty():
        return False
    consoles = [h for h in LOGGER.handlers if isinstance(h, logging.StreamHandler)
                and not isinstance(h, logging.FileHandler)]
    return LOGGER.isEnabledFor(logging.INFO) and any(h.level <= logging.INFO for h in consoles)


def bar(iterable=None, total: int | None = None, desc: str = "", unit: str = "it"):
    """`iterable` wrapped in a transient tqdm bar (rate, ETA) when bars are enabled; else `iterable` itself.

    With no iterable it returns an object with `update(n)` and `close()` (a bar, or one doing nothing).
    """
    if not bars_enabled():
        return iterable if iterable is not None else _NoBar()
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True, file=sys.stderr)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


class GridProgress:
    """One plain line per finished job of a grid of `total`: done so far, elapsed, and the ETA from the
    mean time per finished job (jobs running at once finish in parallel, so it is the wall-clock rate)."""

    def __init__(self, total: int, log=info, what: str = "job"):
        self.total, self.log, self.what, self.done = total, log, what, 0
        self.t0 = time.perf_counter()

    def step(self, note: str = "") -> None:
        self.done += 1
        elapsed = time.perf_counter() - self.t0
        left = elapsed / self.done * (self.total - self.done)
        eta = f", ETA {duration(left)}" if self.done < self.total else ""
        note = f" ({note})" if note else ""
        self.log(f"{self.what} {self.done}/{self.total}, {duration(elapsed)} so far{eta}{note}")


def duration(seconds: float) -> str:
    """12.3s, 4m05s, 1h12m."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, s = divmod(round(seconds), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{s:02d}s"
