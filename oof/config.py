"""Building config dataclasses from YAML mappings, shared by every package's config."""
from __future__ import annotations

import types
import typing
from dataclasses import fields

from .errors import StackerError

_SCALARS = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def build_config(cls, mapping, key: str):
    """`cls(**mapping)`, naming the section when a key is unknown or a value has the wrong type.

    Scalar fields (int, float, str, bool, or one of them or null) are type-checked
    here; ranges and compound values are checked by the dataclass's `__post_init__`.
    """
    if mapping is None:
        mapping = {}
    if not isinstance(mapping, dict):
        raise StackerError(f"{key}: must be a mapping of keys to values, got {mapping!r}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(mapping) - known)
    if unknown:
        raise StackerError(f"{key}: unknown key(s) {unknown}; known: {sorted(known)}")
    hints = typing.get_type_hints(cls)
    for name, value in mapping.items():
        _check_scalar(hints[name], value, f"{key}.{name}")
    try:
        return cls(**mapping)
    except (TypeError, ValueError) as e:  # a compound value of the wrong shape, caught by a comparison
        raise StackerError(f"{key}: {e}") from None


def _check_scalar(hint, value, key: str) -> None:
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union \
        else (hint,)
    allowed = [a for a in args if a in _SCALARS]
    if not allowed or len(allowed) + (type(None) in args) != len(args):
        return  # a compound type: checked by the dataclass itself
    if value is None and type(None) in args:
        return
    ok = any(isinstance(value, t) and not (isinstance(value, bool) and t is not bool) for t in allowed)
    ok = ok or (float in allowed and isinstance(value, int) and not isinstance(value, bool))
    if not ok:
        expected = " or ".join(_SCALARS[t] for t in allowed) + (" or null" if type(None) in args else "")
        raise StackerError(f"{key}: must be {expected}, got {value!r}")
