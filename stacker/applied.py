"""The stack's test side: which predictions of which models the chosen candidate is applied to.

Each model (or unit, under a budget: `stacker.budget`) contributes its fold models' test predictions,
its full fit's (`train-base --full`: one model trained on every train row), or both, as
`stack.test_models` says:

    folds   the mean over its first F fold models (`stack.predict_folds`; F = every one: test.parquet)
    full    its full fit's test table
    both    the F fold models and the full fit, the full fit weighted as one more fold: (F * folds + full) / (F + 1)

at its view choice (its first v views, from the per-view tables `oof.views`; every view: the tables
themselves). No OOF row comes from a full fit, so nothing scores it: the decision marks such a test
side unvalidated. A blend (means, weights, a temperature) only averages its inputs and works on any
of them; a meta-model (`Candidate.meta_model`: LightGBM, logistic regression) learned its function
on fold models' OOF rows, and a full fit's predictions are sharper than any fold model's, so it is
applied to them only with `stack.allow_full_meta: true`, with a warning; without it the meta-models are
left out of the guard (`full_fit_refusal`: the decision's `left_out` says why), so that whatever it
chooses can be applied to the test side it asked for.
"""
from __future__ import annotations

import numpy as np

from oof import Folds, PredictionTable, RunPaths, StackerError, file_digest, read_table, validate_test
from oof.views import parse_unit, read_views

from .candidates import candidate_class
from .config import StackConfig


def check_test_side(paths: RunPaths, models: list[str], folds: Folds, config: StackConfig) -> None:
    """Refuse, before the guard runs, a test side the run cannot give: full fits a model has none of, or per-fold
    test features with repeated folds and not every fold model (each repeat's meta-model is applied to its own K
    fold models' tables, which a subset or a full fit does not give)."""
    if config.test_models != "folds":
        missing = [m for m in models if not paths.test_full(m).is_file()]
        if missing:
            raise StackerError(f"stack.test_models {config.test_models}: {', '.join(missing)} has no full fit "
                               f"({paths.test_full(missing[0])}); run train-base --full, then predict-oof")
    if config.test_features == "per_fold" and folds.repeats > 1 and (config.predict_folds != -1
                                                                     or config.test_models != "folds"):
        raise StackerError("stack.test_features: per_fold with repeated folds applies each repeat's meta-model to "
                           "that repeat's K fold models; it needs predict_folds -1 and test_models folds (or use "
                           "test_features mean)")


def applied_side(decision: dict, config: StackConfig, folds: Folds) -> dict:
    """decision.json's `test_side`: the fits the stack is applied to ("folds", "full" or "both"), whether they
    are validated, and the warning a meta-model applied to full fits gets (`full_fit_refusal` keeps it out of the
    guard otherwise)."""
    asked, every = config.test_models, folds.k * folds.repeats
    n = 0 if asked == "full" else every if config.predict_folds == -1 else min(config.predict_folds, every)
    if asked == "folds":
        return {"models": "folds", "validated": True, "fold_models": n}
    side = {"models": asked, "validated": False, "fold_models": n}
    if candidate_class(decision["chosen"]).meta_model:
        side["warning"] = (f"stack.allow_full_meta: the meta-model {decision['chosen']} learned on fold models' OOF "
                           "rows and is applied to full fits' sharper predictions; no OOF row scores that")
    return side


def full_fit_refusal(name: str, config: StackConfig) -> str | None:
    """Why candidate `name` is left out of the guard, or None: a meta-model, with full fits on the test side
    and `stack.allow_full_meta` off. Left out before the guard scores anything, so that the choice is one the
    test side can apply (and a budget's predicted seconds hold for it)."""
    if config.test_models == "folds" or config.allow_full_meta or not candidate_class(name).meta_model:
        return None
    return (f"a meta-model learns from fold models' OOF rows, and stack.test_models {config.test_models} applies the "
            "stack to full fits' sharper predictions (stack.allow_full_meta: true allows it)")


def stack_test_tables(paths: RunPaths, decision: dict, folds: Folds, test_tables: dict, fold_tables: list
                      ) -> tuple[dict, list]:
    """The test tables the stack is applied to (`applied_side`, decision.json's test_side, its units and fold models), in
    `test_tables`' row order: ({unit: table}, per-fold [{unit: table}], one more for the full fit with "both").

    The models' own tables (`test_tables`, `fold_tables`) where the stack applies whole models through every
    fold model; otherwise made from the per-view tables.

    Raises:
        StackerError: full fits asked for but a model has none (`train-base --full`, then predict-oof).
    """
    models = (decision.get("test_side") or {}).get("models", "folds")
    units = _units(decision, folds)
    ids = next(iter(test_tables.values())).ids
    if (models == "folds" and all(_whole(u, folds) for u in units)) or not len(ids):  # no test set: nothing to render
        return test_tables, fold_tables
    per_fold = [] if models == "full" else _fold_parts(paths, units, folds, ids)
    full = {} if models == "folds" else {u["name"]: _full_table(paths, u, folds, ids) for u in units}
    means = {}
    for u in units:
        parts = [p[u["name"]] for p in per_fold] + ([full[u["name"]]] if full else [])
        proba = np.mean([t.proba for t in parts], axis=0)  # the full fit weighs as one more fold model
        means[u["name"]] = PredictionTable(ids, proba, folds.classes, None, parts[0].meta, f"<{u['name']} test>")
    tables = per_fold + ([full] if full else [])
    return means, tables if folds.repeats == 1 or len(tables) == folds.k * folds.repeats else []


def _units(decision: dict, folds: Folds) -> list[dict]:
    """The units of the decision's `predict` record, else each used model at every view through the fold models
    its `test_side` records (`stack.predict_folds`)."""
    record = decision.get("predict")
    if record is not None:
        return record["units"]
    side = decision.get("test_side") or {}
    n = side.get("fold_models", folds.k * folds.repeats)
    return [{"name": name, "model": parse_unit(name)[0], "views": None, "fold_models": n} for name in decision["used"]]


def _whole(unit: dict, folds: Folds) -> bool:
    return unit["name"] == unit["model"] and unit["fold_models"] == folds.k * folds.repeats


def _fold_parts(paths: RunPaths, units: list[dict], folds: Folds, ids) -> list[dict]:
    """Per fold model (the first F, repeat-major) {unit: its test table at the unit's views}."""
    slots = [(r, k) for r in range(folds.repeats) for k in range(folds.k)]
    parts = [{} for _ in slots[:min(u["fold_models"] for u in units)]]
    for u in units:
        for i, (r, k) in enumerate(slots[:len(parts)]):
            at = paths.for_repeat(r)
            if u["name"] == u["model"]:
                table = read_table(at.test_fold(u["model"], k), folds.classes, "test")
            else:
                path = at.test_views_fold(u["model"], k)
                table = read_views(path, folds.classes).table(u["views"], str(path))
            parts[i][u["name"]] = validate_test(table, ids, folds.classes)
    return parts


def _full_table(paths: RunPaths, unit: dict, folds: Folds, ids) -> PredictionTable:
    """A unit's full-fit test table at its views."""
    model = unit["model"]
    path = paths.test_full(model) if unit["name"] == model else paths.test_views_full(model)
    if not path.is_file():
        raise StackerError(f"{path}: stack.test_models asks for {model}'s full fit, which has none; run train-base "
                           f"--full --only {model}, then predict-oof")
    if unit["name"] == model:
        table = read_table(path, folds.classes, "test")
    else:
        table = read_views(path, folds.classes).table(unit["views"], str(path))
    weights = paths.weights(model, None)
    recorded = table.meta.get("weights_sha256") or [None]
    if table.meta.get("folds_sha256") != folds.sha256 or not weights.is_file() or file_digest(weights) != recorded[0]:
        raise StackerError(f"{path}: not predicted by {model}'s full fit of these folds' rows ({weights.name} or the "
                           "folds changed since); run train-base --full, then predict-oof")
    return validate_test(table, ids, folds.classes)
