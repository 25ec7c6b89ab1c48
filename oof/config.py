"""Config dataclasses: built from YAML mappings, checked against one declarative rule table each.

Every config dataclass of every package declares `SECTION` (its YAML key) and
`RULES`, a table from field name to the forms its value may take, as
scikit-learn's `_parameter_constraints`:

    RULES = {"lr": (number(0, open_low=True),), "clip_grad": (number(0, open_low=True), NULL)}

and its `__post_init__` calls `check_fields(self)` once its values are in their
final types; cross-field rules (es_init <= es_steps) follow that call. Numbers
are finite and never booleans, so NaN, inf and `true` are refused everywhere.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Callable

from .errors import StackerError


@dataclass(frozen=True)
class Rule:
    """One form a value may take: a test and the words an error uses for it."""

    test: Callable[[Any], bool]
    text: str

    def __call__(self, value) -> bool:
        return bool(self.test(value))


def _is_number(v, integer: bool) -> bool:
    if isinstance(v, bool):
        return False
    if integer:
        return isinstance(v, int)
    return isinstance(v, (int, float)) and math.isfinite(v)


def number(low=None, high=None, *, integer: bool = False, open_low: bool = False,
           open_high: bool = False) -> Rule:
    """A finite number (an integer with `integer`) within optional bounds, closed unless `open_*`."""
    def test(v):
        if not _is_number(v, integer):
            return False
        above = low is None or (v > low if open_low else v >= low)
        below = high is None or (v < high if open_high else v <= high)
        return above and below

    kind = "an integer" if integer else "a number"
    if low is not None and high is not None:
        bounds = f" in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
    elif low is not None:
        bounds = f" {'>' if open_low else '>='} {low}"
    elif high is not None:
        bounds = f" {'<' if open_high else '<='} {high}"
    else:
        bounds = ""
    return Rule(test, kind + bounds)


def one_of(*values) -> Rule:
    """One of a fixed vocabulary of values."""
    return Rule(lambda v: isinstance(v, (str, int, float, bool, type(None))) and v in values,
                f"one of {list(values)}")


def instance(cls: type | tuple[type, ...], text: str) -> Rule:
    """An instance of `cls` (booleans are not integers)."""
    return Rule(lambda v: isinstance(v, cls) and not (isinstance(v, bool) and bool not in _as_tuple(cls)), text)


def each(rule: Rule, text: str) -> Rule:
    """A list or tuple (not a string) whose every item passes `rule`."""
    return Rule(lambda v: isinstance(v, (list, tuple)) and all(rule(x) for x in v), text)


def _as_tuple(cls):
    return cls if isinstance(cls, tuple) else (cls,)


NULL = Rule(lambda v: v is None, "null")
BOOL = instance(bool, "true or false")
STRING = Rule(lambda v: isinstance(v, str) and v.strip() != "", "a non-empty string")
SEED = number(0, 2**32 - 1, integer=True)  # numpy's and torch's seeds are unsigned 32-bit


def check_fields(obj) -> None:
    """Check every field of a config dataclass against its class's `RULES`, naming `SECTION.field`."""
    cls = type(obj)
    for name, allowed in cls.RULES.items():
        value = getattr(obj, name)
        if not any(rule(value) for rule in allowed):
            expected = " or ".join(rule.text for rule in allowed)
            raise StackerError(f"{cls.SECTION}.{name}: expected {expected}, got {value!r}")


class ConfigSection:
    """Base of a config dataclass whose values need no conversion: `__post_init__` checks `RULES`."""

    SECTION: str = ""
    RULES: dict = {}

    def __post_init__(self):
        check_fields(self)


def build_config(cls, mapping, key: str):
    """`cls(**mapping)`, naming the section when a key is unknown or a value does not fit.

    Values are checked by the dataclass itself (`check_fields` in its `__post_init__`).
    """
    if mapping is None:
        mapping = {}
    if not isinstance(mapping, dict):
        raise StackerError(f"{key}: must be a mapping of keys to values, got {mapping!r}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(map(str, mapping)) - known)
    if unknown:
        raise StackerError(f"{key}: unknown key(s) {unknown}; known: {sorted(known)}")
    try:
        return cls(**mapping)
    except (TypeError, ValueError) as e:  # a compound value of the wrong shape, caught by a comparison
        if isinstance(e, StackerError):
            raise
        raise StackerError(f"{key}: {e}") from None
