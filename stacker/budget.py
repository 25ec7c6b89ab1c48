"""An inference budget the guard respects (`stack.predict_budget`): which models, and how many TTA views
of each, a code competition's notebook can afford to render.

A unit is one model at one view choice v (the plain view and the first v - 1 augmented ones,
`oof.views`); its OOF rows come from predict-oof's view table, v = all views from the model's OOF
table itself. Its cost is what predict-oof measured on the model's fold models (`metrics.json`'s
`cost`): per fold model a fixed overhead (weights read, model built) and seconds per image per view,
so for `stack.predict_rows` images through F fold models (`stack.predict_folds`)

    seconds = F * (load_seconds + rows * v * image_view_seconds) / stack.predict_speed_ratio

(F counts a full fit as one more model where `stack.test_models` renders it: `rendered_models`.)

Selection is greedy, by score gain per second (`select_units`): from nothing, it adds the unit, or
moves a chosen model to more views, that gains most of the guard's metric per extra second among
the moves that keep the total within the budget; where no move gains on the metric, the one that
lowers the log-loss most per second (accuracy moves in steps, the log-loss sees what they hide);
it stops where no move gains (and where not even the first unit gains on a uniform guess, takes the
best-scoring unit that fits: an ensemble is never empty). That is AutoGluon's `infer_limit` question
answered with a trade-off (its own rule drops the lowest-scoring model first, whatever it costs),
the knapsack's greedy by value per cost. No unit is chosen twice and members
are not weighted: the guard's floor is the plain mean of what this picks, and every candidate is
fitted on the picked units' OOF rows alone.

Choosing the units on the same rows that then score them is optimistic, so the nested estimate
chooses again inside each outer fold from the inner rows alone (`BudgetPlan.outer`), fits every
candidate on that fold's choice, and scores the outer fold with it: the estimate includes the
selection's own luck.

The number of fold models F changes only the test side, which no OOF row scores (each OOF row comes
from one fold model whatever F is), so it is a setting, not something the guard chooses.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, NamedTuple

import numpy as np

from oof import Folds, PredictionTable, RunPaths, StackerError, log_loss, read_json, read_table
from oof.views import ViewTable, read_views, unit_name

from .config import StackConfig
from .inputs import MetaData
from .metrics import Metric

# A move must gain more than this (metric or log-loss) to count: float noise is not a gain.
MIN_MOVE_GAIN = 1e-12


@dataclass(frozen=True)
class ModelCost:
    """One model's measured prediction cost, per fold model, on the device predict-oof ran on."""

    load_seconds: float
    image_view_seconds: float
    views: int  # the views its tables render (the plain one and tta.n)
    fold_models: int  # R x K
    device: str

    @classmethod
    def from_record(cls, record: dict) -> "ModelCost":
        """From metrics.json's `cost` (`base_models.predict_oof.model_cost`)."""
        return cls(float(record["load_seconds"]), float(record["image_view_seconds"]), int(record["views"]),
                   int(record["fold_models"]), str(record["device"]))

    def seconds(self, views: int, rows: int, folds: int, speed_ratio: float = 1.0) -> float:
        """Predicted seconds of `rows` images through `folds` fold models at `views` views each."""
        return folds * (self.load_seconds + rows * views * self.image_view_seconds) / speed_ratio


@dataclass(frozen=True)
class PredictInputs:
    """What fit-stack knows about the models' prediction: costs and every view's OOF rows, where recorded.

    Attributes:
        costs: {model: its measured cost}; a model without one (tables from another tool) is absent.
        views: {model: its OOF view table}, current with its OOF table; absent: whole models only.
        test_rows: images the predicted seconds are for when `stack.predict_rows` is not set.
    """

    costs: dict[str, ModelCost] = field(default_factory=dict)
    views: dict[str, ViewTable] = field(default_factory=dict)
    test_rows: int = 0


class Units(NamedTuple):
    """Every unit of the used models, models in order, each model's view choices ascending."""

    names: tuple[str, ...]
    models: tuple[str, ...]  # the model of each unit
    views: tuple[int, ...]  # its view choice
    seconds: np.ndarray  # (U,) predicted seconds of each
    X: list[np.ndarray]  # per repeat (N, U, C) OOF probabilities

    def data(self, like: MetaData, chosen, repeat: int = 0) -> MetaData:
        """`like`'s rows with the units `chosen` (indices) as its models."""
        chosen = list(chosen)
        return MetaData(self.X[repeat][:, chosen], like.y, like.fold, tuple(self.names[u] for u in chosen),
                        like.classes, like.groups)


class Selection(NamedTuple):
    """`select_units`' result: the units picked (indices, ascending: the models' order) and every step's
    ensemble, in the order picked."""

    chosen: tuple[int, ...]
    path: list[dict]  # per step: the unit added (or moved to more views), total seconds, score, log-loss


class BudgetPlan(NamedTuple):
    """One fold assignment's units and choices: every unit, the choice on all rows, each outer fold's own."""

    units: Units
    repeat: int
    main: tuple[int, ...]
    outer: dict[int, tuple[int, ...]]  # {outer fold: units chosen on the rows outside it}


def predict_rows(config: StackConfig, inputs: PredictInputs) -> int:
    """The images the budget is for: `stack.predict_rows`, else the run's own test set."""
    return config.predict_rows if config.predict_rows is not None else inputs.test_rows


def fold_models(config: StackConfig, cost: ModelCost) -> int:
    """Fold models per model on the test side: none with `stack.test_models: full`, else `stack.predict_folds`,
    else every one (R x K)."""
    if config.test_models == "full":
        return 0
    return cost.fold_models if config.predict_folds == -1 else min(config.predict_folds, cost.fold_models)


def rendered_models(config: StackConfig, cost: ModelCost) -> int:
    """Models per unit the test side renders: its fold models, and its full fit with `stack.test_models` full
    or both (a full fit is one more model of the same architecture and size: it costs what a fold model does)."""
    return fold_models(config, cost) + (config.test_models != "folds")


def build_units(tables: Mapping[str, PredictionTable], inputs: PredictInputs, config: StackConfig,
                repeats: int) -> Units:
    """The units of `tables`' models (validated OOF tables, repeat-major rows): each model at every view choice
    its view table holds, or at its every view alone without one.

    Raises:
        StackerError: a model without a recorded cost (a budget is predicted from the costs).
    """
    missing = [m for m in tables if m not in inputs.costs]
    if missing:
        raise StackerError(f"stack.predict_budget: no recorded prediction cost for {', '.join(missing)} (tables "
                           "from another tool, or predicted before predict-oof measured costs); run predict-oof "
                           "--force on them, or leave predict_budget unset")
    rows = predict_rows(config, inputs)
    if rows == 0 and config.predict_budget is not None:
        raise StackerError("stack.predict_rows: the run has no test set to predict the budget's images from; give "
                           "the hidden test set's size")
    names, models, views, seconds, columns = [], [], [], [], []
    for model, table in tables.items():
        cost = inputs.costs[model]
        view_table = inputs.views.get(model)
        choices = range(1, cost.views + 1) if view_table is not None else [cost.views]
        for v in choices:
            names.append(unit_name(model, v, cost.views))
            models.append(model)
            views.append(v)
            seconds.append(cost.seconds(v, rows, rendered_models(config, cost), config.predict_speed_ratio))
            columns.append(table.proba if v == cost.views else view_table.choice(v))
    X = np.stack(columns, axis=1)  # (R * N, U, C)
    return Units(tuple(names), tuple(models), tuple(views), np.asarray(seconds),
                 list(X.reshape(repeats, len(X) // repeats, *X.shape[1:])))


def select_units(X: list[np.ndarray], y: np.ndarray, units: Units, budget: float, metric: Metric) -> Selection:
    """The greedy choice of units within `budget` seconds (module docstring).

    Args:
        X: per repeat (n, U, C) the units' OOF probabilities on the rows to choose on.
        y: (n,) their labels.
        units: the units (models, view choices, seconds).
        budget: seconds; inf for the whole path.
        metric: the guard's metric.

    Raises:
        StackerError: not even the cheapest unit fits the budget.
    """
    cheapest = int(np.argmin(units.seconds))
    if units.seconds[cheapest] > budget:
        raise StackerError(f"stack.predict_budget: {budget:g} s cannot fit a single model: the cheapest, "
                           f"{units.names[cheapest]}, needs a predicted {units.seconds[cheapest]:.3g} s; give a "
                           "larger budget, fewer predict_rows or predict_folds, or a faster card's predict_speed_ratio")
    search = _Search(X, y, units, metric)
    chosen: dict[str, int] = {}
    sums = [np.zeros(x[:, 0].shape) for x in X]
    uniform = np.full(sums[0].shape, 1.0 / sums[0].shape[1])
    state = (_score(metric, y, [uniform]), log_loss(y, uniform), 0.0)  # (score, log-loss, seconds)
    path = []
    while (move := search.best_move(chosen, sums, state, budget)) is not None:
        u, score, loss, extra = move
        old = chosen.get(units.models[u])
        for s, x in zip(sums, X):
            s += x[:, u] - (x[:, old] if old is not None else 0.0)
        chosen[units.models[u]] = u
        state = (score, loss, state[2] + extra)
        path.append({"unit": units.names[u], "model": units.models[u], "views": units.views[u],
                     "seconds": state[2], "score": score, "log_loss": loss})
    if not chosen:  # nothing beat a uniform guess: the best single unit that fits
        u = max((u for u in range(len(units.names)) if units.seconds[u] <= budget),
                key=lambda u: (_score(metric, y, [x[:, u] for x in X]), -u))
        path.append({"unit": units.names[u], "model": units.models[u], "views": units.views[u],
                     "seconds": float(units.seconds[u]), "score": _score(metric, y, [x[:, u] for x in X]),
                     "log_loss": float(np.mean([log_loss(y, x[:, u]) for x in X]))})
        chosen[units.models[u]] = u
    return Selection(tuple(sorted(chosen.values())), path)


class _Search(NamedTuple):
    """The rows and units `select_units` chooses among."""

    X: list[np.ndarray]
    y: np.ndarray
    units: Units
    metric: Metric

    def best_move(self, chosen: dict, sums: list[np.ndarray], state: tuple, budget: float):
        """(unit, score, log-loss, extra seconds) of the move of most gain per second, or None: no move gains.

        A move adds a model's unit, or replaces a chosen model's unit by one of more views. Gains on the
        metric rank first; where none gains on it, the moves that keep it and lower the log-loss."""
        score, loss, seconds = state
        units = self.units
        best = {True: None, False: None}  # gains the metric: (rate, unit, score, loss, extra)
        for u in range(len(units.names)):
            old = chosen.get(units.models[u])
            if old is not None and units.views[u] <= units.views[old]:
                continue
            extra = float(units.seconds[u] - (units.seconds[old] if old is not None else 0.0))
            if seconds + extra > budget:
                continue
            n = len(chosen) + (old is None)
            probas = [(s + x[:, u] - (x[:, old] if old is not None else 0.0)) / n for s, x in zip(sums, self.X)]
            new_score = _score(self.metric, self.y, probas)
            new_loss = float(np.mean([log_loss(self.y, p) for p in probas]))
            metric_gain, loss_gain = new_score - score, loss - new_loss
            tier = metric_gain > MIN_MOVE_GAIN
            if not tier and (metric_gain < -MIN_MOVE_GAIN or loss_gain <= MIN_MOVE_GAIN):
                continue
            rate = (metric_gain if tier else loss_gain) / max(extra, 1e-9)
            if best[tier] is None or rate > best[tier][0]:
                best[tier] = (rate, u, new_score, new_loss, extra)
        pick = best[True] or best[False]
        return None if pick is None else pick[1:]


def _score(metric: Metric, y: np.ndarray, probas: list[np.ndarray]) -> float:
    return float(np.mean([metric.score(y, p) for p in probas]))


def plan_budget(units: Units, datas: list[MetaData], config: StackConfig, metric: Metric) -> tuple[Selection,
                                                                                                     list[BudgetPlan]]:
    """The choice on every row (the score averaged over the repeats) and each repeat's plan: per outer fold the
    choice on the rows outside it, for the nested estimate (none when it is off or K < 3)."""
    budget = config.predict_budget
    main = select_units(units.X, datas[0].y, units, budget, metric)
    nested = config.nested and datas[0].k >= 3
    plans = []
    for r, data in enumerate(datas):
        outer = {}
        for o in range(data.k if nested else 0):
            inner = data.fold != o
            outer[o] = select_units([units.X[r][inner]], data.y[inner], units, budget, metric).chosen
        plans.append(BudgetPlan(units, r, main.chosen, outer))
    return main, plans


def budget_record(units: Units, selection: Selection, path: Selection | None, config: StackConfig,
                  inputs: PredictInputs, plans: list[BudgetPlan]) -> dict:
    """decision.json's `predict`: what the stack's test side renders and its predicted seconds."""
    ensemble = [u for u, (m, v) in enumerate(zip(units.models, units.views)) if v == inputs.costs[m].views]
    record = {
        "budget": config.predict_budget, "rows": predict_rows(config, inputs),
        "speed_ratio": config.predict_speed_ratio, "folds": config.predict_folds,
        "devices": sorted({inputs.costs[m].device for m in set(units.models)}),
        "seconds": float(sum(units.seconds[u] for u in selection.chosen)),
        "ensemble_seconds": float(sum(units.seconds[u] for u in ensemble)),
        "units": [_unit_record(units, u, inputs, config) for u in selection.chosen],
        "path": (path or selection).path,
    }
    if plans and plans[0].outer:
        record["outer"] = {str(o): [units.names[u] for u in chosen] for o, chosen in plans[0].outer.items()}
    return record


def _unit_record(units: Units, u: int, inputs: PredictInputs, config: StackConfig) -> dict:
    model = units.models[u]
    return {"name": units.names[u], "model": model, "views": units.views[u],
            "fold_models": fold_models(config, inputs.costs[model]), "full": config.test_models != "folds",
            "seconds": float(units.seconds[u])}


def read_predict_inputs(paths: RunPaths, models: list[str], folds: Folds, test_rows: int,
                        views: bool) -> PredictInputs:
    """The costs predict-oof recorded (metrics.json) and, with `views` (under a budget: V views of every OOF row
    are V times the OOF table's memory), the OOF view tables that are current with the models' OOF tables
    (recording the same weights, folds and TTA settings); models lacking either are left out of it."""
    costs, tables = {}, {}
    for model in models:
        metrics = paths.predict_metrics(model)
        record = (read_json(metrics) if metrics.is_file() else {}).get("cost")
        if record:
            costs[model] = ModelCost.from_record(record)
        table = _current_views(paths, model, folds) if views else None
        if table is not None:
            tables[model] = table
    return PredictInputs(costs, tables, test_rows)


def _current_views(paths: RunPaths, model: str, folds: Folds) -> ViewTable | None:
    """The model's OOF view table when it records what its OOF table records, holds its rows in the folds' order,
    and its last view choice is the OOF table's probabilities; else None."""
    path = paths.oof_views(model)
    if not path.is_file() or not paths.oof(model).is_file():
        return None
    oof = read_table(paths.oof(model), folds.classes, "oof")
    table = read_views(path, folds.classes)
    rows = np.tile(folds.ids, folds.repeats)  # the folds' order, as the validated OOF tables hold their rows
    same = (len(table.ids) == len(oof.ids) == len(rows) and (table.ids == oof.ids).all() and (oof.ids == rows).all()
            and {k: v for k, v in table.meta.items() if k != "job"} == {k: v for k, v in oof.meta.items()
                                                                        if k != "job"})
    if not same or not np.allclose(table.choice(table.views), oof.proba, atol=1e-6):
        return None
    return table

