"""Digests that tie every artifact to what made it.

A consumer compares the digests an artifact recorded with those of its inputs
now; any difference means the artifact is stale. File digests are over bytes;
config digests over canonical JSON (sorted keys, no spaces), so the same
values always give the same digest whatever their order in the YAML.
"""
from __future__ import annotations

import hashlib
import json
import os

from .atomic import json_default

_CHUNK = 1 << 20


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def json_digest(obj) -> str:
    """sha256 of a JSON-able value in canonical form."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=json_default)
    return hashlib.sha256(text.encode()).hexdigest()

