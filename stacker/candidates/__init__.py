"""The candidate registry: every way the meta level may combine the models, in complexity order.

    create_candidate("ensemble_selection", config, metric, seed).fit(X, y).predict_proba(X_test)

`BUILTIN` is the one ordered list that `StackConfig` (its default and its
vocabulary), the guard and decision.json read. A new candidate is a `Candidate`
subclass in the module of its family (`blends`, `linear`, `lgbm`) plus one line
in `BUILTIN`; `register` / `registered` add one at run time (a test's, a user's).
"""
from __future__ import annotations

from contextlib import contextmanager

from .base import LOG_EPS, Candidate, logits, normalise_rows, softmax
from .blends import (BestSingle, EnsembleSelection, LogitMean, Mean, SimplexWeights, TemperatureMean, WeightedBlend,
                     ensemble_selection, fit_temperature, simplex_weights)
from .lgbm import LGBMClassShared, LGBMWide
from .linear import LogRegLogits

# Complexity order: the guard prefers an earlier candidate when scores are within
# noise. `mean` is the floor (no fitted state); the logit mean has none either
# but changes the blend's shape; `best_single` fits one discrete choice;
# `temperature` fits one scalar on top of the mean and keeps its labels;
# ensemble selection fits M non-negative weights in steps of 1/steps; `weights`
# fits M continuous ones; the class-shared booster learns one monotone function
# of M features shared by all classes; logistic regression fits C x (M*C) free
# weights; the wide booster learns C tree ensembles over M*C features, the most
# freedom of all.
BUILTIN = (Mean, LogitMean, BestSingle, TemperatureMean, EnsembleSelection, SimplexWeights, LGBMClassShared,
           LogRegLogits, LGBMWide)
FLOOR = Mean.name  # the candidate every other one must beat

_registry: dict[str, type[Candidate]] = {cls.name: cls for cls in BUILTIN}  # name -> class, in order
CANDIDATES = tuple(_registry)  # the built-in names; `candidate_names()` includes registered ones


def candidate_names() -> tuple[str, ...]:
    """Every registered candidate's name, in complexity order."""
    return tuple(_registry)


def candidate_class(name: str) -> type[Candidate]:
    """The class registered as `name`; `StackConfig` has already checked the name."""
    if name not in _registry:
        raise KeyError(f"unknown candidate {name!r}; registered: {list(_registry)}")
    return _registry[name]


def create_candidate(name: str, config, metric, seed: int, models=(), classes=()) -> Candidate:
    """A fresh, unfitted candidate `name`, its hyperparameters from `config` (see `Candidate.from_config`)."""
    return candidate_class(name).from_config(config, metric, seed, models, classes)


def suited_candidates(names, metric) -> tuple[tuple[str, ...], dict[str, str]]:
    """(the candidates of `names` that can differ from the mean under `metric`, {left out: why}).

    `Candidate.unsuited` gives the reason; the floor is always kept.
    """
    left_out = {n: why for n in names if n != FLOOR and (why := candidate_class(n).unsuited(metric))}
    return tuple(n for n in names if n not in left_out), left_out


def register(cls: type[Candidate], before: str | None = None) -> type[Candidate]:
    """Add a candidate class to the registry under `cls.name`.

    Args:
        cls: a `Candidate` subclass with a `name` of its own.
        before: the registered candidate it is simpler than; None puts it last (most complex).

    Returns:
        `cls`, so that this works as a class decorator too.

    Raises:
        ValueError: not a Candidate, a name without a word, a name taken, or `before` unknown.
    """
    if not (isinstance(cls, type) and issubclass(cls, Candidate)) or not cls.name:
        raise ValueError(f"{cls!r}: a candidate is a Candidate subclass with a name")
    if cls.name in _registry:
        raise ValueError(f"candidate {cls.name!r} is already registered")
    if before is not None and before not in _registry:
        raise ValueError(f"register: no candidate {before!r} to insert before")
    items = list(_registry.items())
    at = len(items) if before is None else list(_registry).index(before)
    _registry.clear()  # rebuilt in place: the order is the dict's insertion order
    _registry.update(items[:at] + [(cls.name, cls)] + items[at:])
    return cls


def unregister(name: str) -> None:
    """Remove candidate `name`; the floor stays, the guard cannot work without it."""
    if name == FLOOR:
        raise ValueError(f"candidate {FLOOR!r} is the guard's floor and cannot be removed")
    candidate_class(name)
    del _registry[name]


@contextmanager
def registered(cls: type[Candidate], before: str | None = None):
    """`register(cls, before)` for the duration of a `with` block, then `unregister`."""
    register(cls, before)
    try:
        yield cls
    finally:
        unregister(cls.name)


__all__ = [
    "BUILTIN", "CANDIDATES", "FLOOR", "LOG_EPS", "BestSingle", "Candidate", "EnsembleSelection",
    "LGBMClassShared", "LGBMWide", "LogRegLogits", "LogitMean", "Mean", "SimplexWeights", "TemperatureMean",
    "WeightedBlend", "candidate_class", "candidate_names", "create_candidate", "ensemble_selection",
    "fit_temperature", "logits", "normalise_rows", "register", "registered", "simplex_weights", "softmax",
    "suited_candidates", "unregister",
]
