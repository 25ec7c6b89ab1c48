"""Atomic writes: every file is written under a temporary name, then renamed.

A crash never leaves a half-written file that a later stage would trust:
`os.replace` is atomic on POSIX and Windows when both names are on one
filesystem, which holds because the temporary file sits beside the target.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

import pandas as pd

from .errors import StackerError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` on success.

    The temporary file is removed if the block raises.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        _settle(tmp)
        os.replace(tmp, path)
        _sync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def remove_temps(folder: str | os.PathLike, prefix: str = "") -> None:
    """Delete the temporary files that killed writers of `<folder>/<prefix>*` left behind.

    Call it only where no other process can be writing the same files (under the job's lock, or
    before rebuilding a cache): a live writer's temporary file would vanish under it.
    """
    folder = Path(folder)
    if folder.is_dir():
        for tmp in folder.glob(f".{prefix}*.tmp"):
            tmp.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it; set straight back
    os.umask(mask)
    return mask


def _settle(tmp: Path) -> None:
    """Give the file the mode a plain `open` would (mkstemp makes 0600) and put its bytes on disk.

    Without the fsync a power cut after the rename can leave an empty file under the final name.
    """
    os.chmod(tmp, 0o666 & ~_umask())
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_dir(folder: Path) -> None:
    """Make the rename itself durable (POSIX); Windows has no directory handles to sync."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | os.PathLike, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=json_default) + "\n")


def read_json(path: str | os.PathLike):
    """A JSON file's value; a damaged one (a truncated upload, a hand edit) is one line naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StackerError(f"{path}: damaged JSON ({type(e).__name__}: {e}); redo the stage that wrote it "
                           "with --force") from None


def read_csv_strings(path: str | os.PathLike):
    """A CSV read as text: every cell a string, blanks kept as '' (ids like 'NA' stay ids).

    Raises:
        StackerError: a missing or unreadable file, named.
    """
    path = Path(path)
    if not path.is_file():
        raise StackerError(f"{path}: file not found")
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as e:  # pandas raises several types for a damaged file
        raise StackerError(f"{path}: not a readable CSV file ({e})") from None


def json_default(obj):
    """numpy scalars and arrays and paths as JSON values (json.dumps's `default`), without importing numpy."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"cannot write {type(obj).__name__} as JSON")
