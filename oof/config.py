"""Building config dataclasses from YAML mappings, shared by every package's config."""
from __future__ import annotations

from dataclasses import fields

from .errors import StackerError


def build_config(cls, mapping, key: str):
    """`cls(**mapping)`, naming the section when a key is unknown or the value is not a mapping.

    Values are checked by the dataclass's own `__post_init__`.
    """
    if mapping is None:
        mapping = {}
    if not isinstance(mapping, dict):
        raise StackerError(f"{key}: must be a mapping of keys to values, got {type(mapping).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(mapping) - known)
    if unknown:
        raise StackerError(f"{key}: unknown key(s) {unknown}; known: {sorted(known)}")
    try:
        return cls(**mapping)
    except TypeError as e:  # e.g. a list where a number belongs, caught by a comparison
        raise StackerError(f"{key}: {e}") from None
