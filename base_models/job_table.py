"""`stacker jobs`: where every (model, fold) job of a run stands, read from the run's files alone
(every (model, repeat, fold) job with `folds.repeats` > 1: the table gains a repeat column), and each
model's full fit (`train-base --full`, fold "full") where it has one: a history, a checkpoint or a lock file.

A job's state, the first that holds:

    running   another process holds the job's lock: train-base is training it (or --force deleting it)
    stale     finished, but from other training rows or labels (`data.exclude`, `data.relabel`), folds,
              train images, settings or weights (`job_state.stale_reason`): train-base refuses it until --force
    done      its history marks it finished and it is current
    partial   an interrupted job's checkpoint: the next train-base resumes it after that epoch
    pending   nothing yet

Pure reading: nothing is created or written in the run (a read-only Kaggle dataset, a run being
trained by a Slurm array). torch is needed only for a partial job's epoch, read from its checkpoint
with `torch.load(weights_only=True)` as every checkpoint is; without torch that job is shown
partial, its epoch unknown. A lock is probed by taking a shared flock on the lock
file opened read-only, for an instant (a train-base trying that very lock in that instant would
find it held and skip the job, to be picked up by the next train-base).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import pandas as pd

from oof import RunPaths, StackerError, duration, info, load_folds, read_json, run_paths

from .cache import load_cache
from .config import ModelSpec, base_configs
from .job_state import Sources, is_trained, job_sources, stale_reason

COLUMNS = ("model", "repeat", "fold", "state", "epoch", "device", "amp", "seconds", "valid_loss", "error_rate",
           "reason")
STATES = ("running", "stale", "done", "partial", "pending")


def job_table(cfg: dict, log=info) -> pd.DataFrame:
    """Every (model, fold) job of the run a config names, its state, device, time and score; printed.

    Args:
        cfg: a raw config (`oof.load_config`): the run's run.yaml, or the config train-base is given.
        log: where the printed table's lines go.

    Returns:
        One row per job, model by model (`COLUMNS`; a model's full fit after its fold jobs, fold "full",
        where it has one): state one of `STATES`; epoch the last finished
        epoch (a finished job's kept epoch); seconds the sum of its epochs' times; valid_loss and
        error_rate that epoch's; reason why a stale job is stale.
    """
    paths = run_paths(cfg)
    if not cfg.get("models"):
        raise StackerError(f"{paths.config}: not found and no models configured; pass the run's --config")
    _, folds_cfg, specs, _ = base_configs(cfg)
    folds = load_folds(paths.folds) if paths.folds.is_file() else None
    cache, unchecked = _current_cache(paths, folds)
    k, repeats = (folds.k, folds.repeats) if folds is not None else (folds_cfg.k, folds_cfg.repeats)
    rows = []
    for spec in specs:
        for repeat in range(repeats):
            at = paths.for_repeat(repeat)
            checked = [cache is not None and is_trained(at, spec.name, fold) for fold in range(k)]  # digests of these
            rows += [_job_row(at, spec, fold, job_sources(folds.for_repeat(repeat), fold, spec, cache)
                              if checked[fold] else None) for fold in range(k)]
        if _has_full_fit(paths, spec.name):
            checked = cache is not None and is_trained(paths, spec.name, None)
            rows.append(_job_row(paths, spec, None, job_sources(folds.for_repeat(0), None, spec, cache)
                                 if checked else None))
    table = pd.DataFrame(rows, columns=list(COLUMNS))
    for line in format_job_table(table):
        log(line)
    if unchecked and (table["state"] == "done").any():
        log(f"done jobs not checked for staleness: {unchecked}")
    return table


def _current_cache(paths: RunPaths, folds) -> tuple[str | None, str | None]:
    """The train cache a job would train on now, by digest (with the folds, what a job is checked
    against); or None and why it is unknown."""
    if folds is None:
        return None, f"{paths.folds} not found"
    try:
        return load_cache(paths, "train").digest, None
    except (StackerError, OSError, ValueError) as e:  # no cache, or its data file missing or cut short
        return None, str(e)


def _has_full_fit(paths: RunPaths, model: str) -> bool:
    """Whether `train-base --full` ever started the model's full fit: its history, checkpoint or lock file is there."""
    return any(path(model, None).is_file() for path in (paths.history, paths.checkpoint, paths.job_lock))


def _job_row(paths: RunPaths, spec: ModelSpec, fold: int | None, sources: Sources | None) -> dict:
    """One job's row (`paths` its repeat's; fold None the full fit, its fold "full"): the finished job's
    history, else its checkpoint's epoch records, else nothing."""
    name = spec.name
    row = {"model": name, "repeat": paths.repeat, "fold": "full" if fold is None else fold, "state": "pending"}
    if is_trained(paths, name, fold):
        history = read_json(paths.history(name, fold))
        reason = stale_reason(paths, spec, fold, sources) if sources is not None else None
        row.update(_scores(history.get("epochs", []), history.get("kept_epoch")), state="stale" if reason else "done",
                   device=history.get("device_name"), amp=history.get("amp"), reason=reason)
    elif paths.checkpoint(name, fold).is_file():
        row.update(_scores(checkpoint_history(paths.checkpoint(name, fold)) or [], None), state="partial")
    if lock_held(paths.job_lock(name, fold)):
        row["state"] = "running"
    return row


def _scores(epochs: list[dict], kept: int | None) -> dict:
    """The kept epoch's (else the last one's) number, losses, and the time of all epochs."""
    if not epochs:
        return {}
    record = next((e for e in epochs if e.get("epoch") == kept), epochs[-1])
    return {"epoch": record.get("epoch"), "seconds": sum(e.get("seconds", 0.0) for e in epochs),
            "valid_loss": record.get("valid_loss"), "error_rate": record.get("error_rate")}


def lock_held(path: Path) -> bool:
    """Whether another process holds a job's lock (FileLock's flock), probed without creating or writing
    anything: the lock file, when there is one, is opened read-only and a shared lock tried without waiting."""
    try:
        import fcntl
    except ImportError:  # Windows: FileLock's own probe, which opens the file for writing
        return _held_by_filelock(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # no lock file: never taken; an unreadable one: nothing to tell
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # releases the shared lock
    return False


def _held_by_filelock(path: Path) -> bool:
    from filelock import FileLock, Timeout

    if not path.is_file():
        return False
    try:
        FileLock(path, timeout=0).acquire().lock.release()
    except Timeout:
        return True
    return False


def checkpoint_history(path: Path) -> list[dict] | None:
    """An interrupted job's per-epoch records, read from its checkpoint; None when unreadable or without torch.

    Read as every checkpoint is, with `torch.load(weights_only=True)` (never a general unpickler); without
    torch the job is still shown as partial, its epoch unknown.
    """
    try:
        import torch
    except ImportError:
        return None
    try:
        return list(torch.load(path, map_location="cpu", weights_only=True)["history"])
    except Exception:  # a status view reports what it can: this job is partial, its epoch unknown
        return None


# ---------------------------------------------------------------- printing


def format_job_table(table: pd.DataFrame) -> list[str]:
    """The table as aligned lines, then one line of counts per state."""
    header = ("model", "fold", "state", "device", "amp", "time", "valid_loss", "error_rate", "note")
    cells = [header] + [_cells(row) for row in table.itertuples(index=False)]
    if len(table) and table["repeat"].max() > 0:  # a run with repeats: the repeat beside the fold
        cells = [(c[0], "repeat" if i == 0 else str(row.repeat), *c[1:])
                 for i, (c, row) in enumerate(zip(cells, [None, *table.itertuples(index=False)]))]
    widths = [max(len(c[i]) for c in cells) for i in range(len(cells[0]) - 1)]
    lines = ["  ".join([c.ljust(w) for c, w in zip(row, widths)] + [row[-1]]).rstrip() for row in cells]
    counts = table["state"].value_counts()
    summary = ", ".join(f"{counts[s]} {s}" for s in STATES if s in counts)
    return lines + [f"{len(table)} jobs: {summary}"]


def _cells(row) -> tuple[str, ...]:
    state = row.state
    if state == "partial":
        state = "partial" if _missing(row.epoch) else f"partial at epoch {int(row.epoch)}"
    time = "-" if _missing(row.seconds) else duration(row.seconds)
    return (row.model, str(row.fold), state, _text(row.device), _text(row.amp), time,
            _number(row.valid_loss), _number(row.error_rate), "" if _missing(row.reason) else row.reason)


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _text(value) -> str:
    return "-" if _missing(value) else str(value)


def _number(value) -> str:
    return "-" if _missing(value) else f"{value:.4f}"
