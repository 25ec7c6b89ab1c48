"""Where the guard's work runs: worker processes for the held-out fits, threads for the decisions.

The fits run in loky worker processes (`FitWorkers`), each fit on one thread, the rows shared with
them as a read-only memory map; the workers can be started ahead (`start_workers`) so that they
spawn and import LightGBM while the caller reads its tables. The decisions run in a thread pool
(`decide_in_threads`). None of this changes a result: every fit and every decision has its own seed.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from oof import bar

from .candidates import candidate_class
from .config import StackConfig
from .inputs import MetaData

# Below this many meta-features (N*M*C) the guard's fits take a few seconds in all and
# starting worker processes (each imports LightGBM and scikit-learn, ~2 s) costs more than it saves.
PARALLEL_MIN_VALUES = 1_000_000


def fit_workers(config: StackConfig, n_values: int) -> int:
    """Worker processes for the guard's fits on `n_values` meta-features (N*M*C): `config.threads`,
    or 1 for small inputs."""
    return 1 if n_values < PARALLEL_MIN_VALUES else max(1, min(config.threads, os.cpu_count() or 1))


class FitWorkers:
    """The processes that run the guard's held-out fits: `n` loky workers, or this process alone when n is 1.

    joblib keeps its loky workers alive between calls (one executor per process), so the workers
    `start` spawns are the ones `map` runs on; `map` waits for that start first, since one joblib
    call at a time drives the executor.
    """

    def __init__(self, n: int):
        self.n = n
        self._start: threading.Thread | None = None

    def start(self) -> FitWorkers:
        """Spawn the workers in a background thread (each imports LightGBM and scikit-learn, 2-3 s); no-op for n = 1."""
        if self.n > 1 and self._start is None:
            self._start = threading.Thread(target=_start_pool, args=(self.n,), name="stacker-start-workers",
                                           daemon=True)
            self._start.start()
        return self

    @property
    def starting(self) -> bool:
        """Whether the background start is still running."""
        return self._start is not None and self._start.is_alive()

    def map(self, fn, data: MetaData, calls: list[tuple], desc: str) -> list:
        """[fn(data, *call) for call in calls], with a progress bar.

        n = 1: in this process, in order. n > 1: in the workers, each call's result in order of
        `calls`; the workers read `data.X` from one read-only memory map (`shared_rows`), not a
        copy per call.
        """
        if self.n == 1:
            return [fn(data, *call) for call in bar(calls, total=len(calls), desc=desc, unit="task")]
        from joblib import Parallel, delayed

        if self._start is not None:
            self._start.join()
            self._start = None
        with shared_rows(data) as shared:
            run = Parallel(n_jobs=self.n, backend="loky", return_as="generator")
            return list(bar(run(delayed(fn)(shared, *call) for call in calls), total=len(calls), desc=desc,
                            unit="task"))


def start_workers(config: StackConfig, n_values: int) -> FitWorkers | None:
    """The fit workers for `n_values` meta-features (N*M*C), started in the background, so that they spawn
    while the caller reads its tables and checks them for leaks; None when the fits run in this process."""
    workers = fit_workers(config, n_values)
    return FitWorkers(workers).start() if workers > 1 else None


def _start_pool(workers: int) -> None:
    from joblib import Parallel, delayed

    try:
        Parallel(n_jobs=workers, backend="loky")(delayed(_import_fit_modules)() for _ in range(workers))
    except Exception:  # only a head start: the fits start their pool themselves, and say what fails
        pass


def _import_fit_modules() -> None:
    import lightgbm  # noqa: F401
    import sklearn.linear_model  # noqa: F401


@contextlib.contextmanager
def shared_rows(data: MetaData):
    """`data` with X as a read-only memory map of a file in /dev/shm (memory; the temporary folder where there
    is none), removed on exit. joblib sends a memory map to its workers as its file name."""
    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as tmp:
        path = os.path.join(tmp, "X.npy")
        np.save(path, data.X)
        yield MetaData(np.load(path, mmap_mode="r"), data.y, data.fold, data.models, data.classes, data.groups)


def split_keys(name: str, keys: list, workers: int) -> list[list]:
    """A candidate's held-out keys in tasks for `workers` processes.

    A candidate prepares its rows once per task (`Candidate.prepare`). Where that costs
    about a fit or more (LightGBM's binning), its keys split into half as many tasks as
    there are workers (one for two); the others split finer (two tasks per worker),
    which evens out the workers' loads.
    """
    n = max(1, workers // 2) if _costly_prepare(name) else 2 * workers
    return [keys[i::n] for i in range(n) if keys[i::n]]


def task_order(names) -> list[str]:
    """Candidates in the order their tasks start: those with a costly `prepare` (the longest
    tasks), then the others, each group most complex first (the registry's order, reversed)."""
    return sorted(reversed(names), key=lambda n: not _costly_prepare(n))  # stable: keeps each group's order


def _costly_prepare(name: str) -> bool:
    """Whether candidate `name`'s `prepare` costs about a fit or more (LightGBM's binning)."""
    return candidate_class(name).prepare_cost >= 1


class InTurn:
    """An executor's `submit` that runs the call at once: `result()` gives what it returned."""

    def submit(self, fn, *args):
        done = Future()
        done.set_result(fn(*args))
        return done


def decide_in_threads(workers: int) -> ThreadPoolExecutor | None:
    """A thread pool for the guard's decisions, or None for one worker (run them `InTurn`).

    Most of a decision is drawing and counting bootstrap resamples and multiplying
    matrices, numpy calls that release the GIL: two threads did the work of two
    decisions at 100,000 rows in 3.1 s instead of 5.4 s. Each decision has its own
    seed, so the result is the same in threads or in turn.
    """
    return ThreadPoolExecutor(workers, thread_name_prefix="stacker-decide") if workers > 1 else None
