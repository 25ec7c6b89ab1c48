"""StackGuard: the guarded stack as a notebook-friendly estimator.

    guard = StackGuard(StackConfig(metric="accuracy")).fit({"convnext": oof_a, "vit": oof_b}, folds)
    guard.decision_["chosen"], guard.decision_["reason"]
    proba = guard.predict_proba({"convnext": test_a, "vit": test_b})  # (N_test, C)

Tables are `oof.PredictionTable`s or DataFrames in the contract's layout (`id`,
`fold` for OOF, one column per class); `folds` is an `oof.Folds`
(`oof.load_folds("folds.csv")` reads one made by any tool). `StackGuard.from_state`
rebuilds a fitted guard from its saved decision and state (`stacker.load_stack`
reads them from a run).

With repeated folds (`folds.repeats` R > 1, OOF tables with a `repeat` column) every
candidate is scored per repeat and the chosen one fitted per repeat (`stacker.repeats`
says why): the guard runs once per fold assignment, and R = 1 is one such run.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Mapping, Sequence

import numpy as np
from threadpoolctl import threadpool_limits

import oof
from oof import Folds, PredictionTable, StackerError, build_config, check_rows, info, log_loss, validate_test

from .applied import full_fit_refusal
from .budget import BudgetPlan, PredictInputs, Selection, Units, budget_record, build_units, plan_budget, select_units
from .candidates import candidate_class, normalise_rows, suited_candidates
from .config import StackConfig
from .guard import GuardResult, decide, fit_chosen, run_guard
from .inputs import (MetaData, align_test_tables, as_oof_tables, meta_features, repeat_features, sure_share,
                     suspicious_models)
from .leak import LeakCheck, LeakInputs, declared_leaks, leak_report
from .metrics import Metric
from .repeats import (RepeatAverage, combine_model_scores, combine_repeats, merge_leak_checks, repeat_config)
from .split_leak import split_leak
from .workers import FitWorkers

# This many models flagged by the statistics at once points at the folds, not at each model.
MANY_FLAGGED = 3


class StackGuard:
    """Score every candidate out of fold, choose one with the guard, fit it on all OOF rows.

    Args:
        config: meta-level options; default `StackConfig()`.
        log: callable for progress lines and warnings (the `stacker` logger by default; None is silent).

    Attributes (after fit):
        decision_: the JSON-able decision: scores, intervals, choice, reason, nested estimate.
        models_: the models used, in input order (suspicious ones excluded).
        classes_: class names, the column order of `predict_proba`.
        candidate_: the chosen candidate, fitted on every OOF row.
        oof_: {candidate: (N, C)} meta-level out-of-fold probabilities; (R, N, C) with R > 1 repeats.
        repeats_: R, the fold assignments the meta-level was fitted on (one fit of the choice each).
        timings_: {candidate: seconds} of its meta-level fits.
    """

    def __init__(self, config: StackConfig | None = None, log=info):
        self.config = config
        self.log = log

    @classmethod
    def from_state(cls, decision: dict, state: dict, booster_text: str | None = None,
                   source: str = "decision") -> "StackGuard":
        """The fitted guard that `decision_` and `state()` (and the candidate's booster text) describe.

        Args:
            decision: the saved `decision_`; its "config" is checked like the YAML's.
            state: the saved `state()`: the chosen candidate's name and learned state, models, classes.
            booster_text: the chosen candidate's LightGBM model, when it has one; with repeats a list
                of R texts (None for a repeat without one).
            source: where the decision comes from, for the config's error messages.

        Raises:
            StackerError: a saved config that fails the checks.
            KeyError: a missing key (damaged files).
        """
        guard = cls(build_config(StackConfig, decision["config"], f"{source}: config"))
        guard.decision_, guard.models_, guard.classes_ = decision, list(state["models"]), tuple(state["classes"])
        fitted = candidate_class(state["candidate"])
        if "repeats" in state:  # one fit per repeat; booster_text is then a list, one per repeat
            texts = booster_text or [None] * len(state["repeats"])
            guard.candidate_ = RepeatAverage([fitted.from_state(s, t) for s, t in zip(state["repeats"], texts)])
        else:
            guard.candidate_ = fitted.from_state(state, booster_text)
        guard.repeats_ = len(state.get("repeats", [state]))
        guard.predict_ = decision.get("predict")
        return guard

    def fit(self, oof_tables: Mapping, folds: Folds, test_tables: Mapping | None = None,
            fold_tables: Sequence[Mapping] = (), workers: FitWorkers | None = None,
            predict: PredictInputs | None = None) -> "StackGuard":
        """Score the candidates, decide, and fit the chosen one on every OOF row.

        Args:
            oof_tables: {model: OOF table or DataFrame}.
            folds: the fold assignment the tables were made on.
            test_tables: {model: test table}, optional: the leak check compares each model's OOF rows
                with its test rows (`stacker.leak`); without them only near-certain memorisers are found.
            fold_tables: per fold k, {model: fold model k's test table}, optional: the leak check's
                like-for-like reference (one fold model on unseen rows, as the OOF rows are). With
                repeats, R x K of them, repeat-major (repeat r's fold k at r * K + k).
            workers: the meta-level fits' worker processes, started ahead (`stacker.workers.start_workers`,
                as `fit_stack` does while it reads the tables); None: as many as the rows call for.
            predict: the models' measured prediction costs and OOF view tables (`stacker.budget`); with
                costs for every model the decision records predicted seconds (`predict_`), and
                `config.predict_budget` needs them: the guard then stacks the units it chooses.
        """
        config = self.config or StackConfig()
        log = self.log or (lambda *a: None)
        tables = as_oof_tables(oof_tables, folds)
        names, y = list(tables), folds.y
        Xs = repeat_features(tables, folds.repeats)  # R x (N, M, C); R = 1 without repeats
        leaks, excluded = self._screen(Xs, folds, tables, test_tables, fold_tables, log)
        self.models_ = [m for m in names if m not in excluded]
        self.classes_, self.repeats_ = tuple(folds.classes), folds.repeats
        used = [names.index(m) for m in self.models_]
        groups = folds.group_index
        datas = [MetaData(X[:, used], y, one.fold, tuple(self.models_), self.classes_, groups)
                 for X, one in zip(Xs, folds.each_repeat())]
        metric = Metric(config.metric, len(self.classes_))
        log(_describe_inputs(folds, len(self.models_), config))
        datas, plans = self._budget(tables, datas, predict, config, metric, log)
        # One BLAS thread: OpenBLAS threads spinning after a logistic-regression fit
        # slowed the next LightGBM fit's OpenMP threads 3x on the 2-core bench machine.
        with threadpool_limits(limits=1, user_api="blas"):
            decision = self._fit_repeats(datas, config, metric, log, workers, plans)
        scores = [_model_scores(y, X, names, metric, leaks, excluded) for X in Xs]
        self.decision_ = self._record(decision, config, folds,
                                      scores[0] if len(scores) == 1 else combine_model_scores(scores), excluded)
        return self

    def _screen(self, Xs: list[np.ndarray], folds: Folds, tables: dict, test_tables, fold_tables, log):
        """The leak checks of every repeat and the tables' declared leaks: (`LeakCheck` with the declared
        leaks among its suspicious models, {model: reason} of the models to leave out).

        Sets `warnings_` and `split_leak_`; stops on a split leak or when every model looks leaked.
        """
        config = self.config or StackConfig()
        names = list(tables)
        self.warnings_, self.split_leak_ = [], None
        leaks = self._check_repeat_leaks(Xs, folds, names, test_tables, fold_tables)
        self._check_split(leaks.split, config, log)
        self._check_many_flagged(leaks.consistency, log)
        suspicious = dict(leaks.suspicious)
        for name, why in declared_leaks({m: t.meta for m, t in tables.items()}).items():
            suspicious.setdefault(name, why)
        excluded = _exclude(suspicious, config.allow_suspicious, log)
        if len(excluded) == len(names):
            raise StackerError(f"fit-stack: every model looks leaked ({', '.join(names)}); nothing is left to "
                               "stack. Pass --allow-suspicious (stack.allow_suspicious: true) to keep them")
        return leaks._replace(suspicious=suspicious), excluded

    def _budget(self, tables: dict, datas: list[MetaData], predict: PredictInputs | None, config: StackConfig,
                metric: Metric, log) -> tuple[list[MetaData], list | None]:
        """The units and, under `config.predict_budget`, their choice: (the rows the guard fits on, each repeat's
        `BudgetPlan` or None). Sets `predict_` (decision.json's `predict`, None without recorded costs) and,
        under a budget, `models_` to the chosen units."""
        self.predict_ = None
        budget = config.predict_budget
        known = predict is not None and all(m in predict.costs for m in self.models_)
        if budget is None and not known:
            return datas, None
        units = build_units({m: tables[m] for m in self.models_}, predict or PredictInputs(), config, len(datas))
        if budget is None:
            whole = tuple(u for u, name in enumerate(units.names) if name in self.models_)
            path = select_units(units.X, datas[0].y, units, float("inf"), metric) if _path_affordable(units) else None
            self.predict_ = budget_record(units, Selection(whole, []), path, config, predict, [])
            return datas, None
        selection, plans = plan_budget(units, datas, config, metric)
        path = select_units(units.X, datas[0].y, units, float("inf"), metric) if _path_affordable(units) else None
        self.predict_ = budget_record(units, selection, path, config, predict, plans)
        self.models_ = [units.names[u] for u in selection.chosen]
        log(f"fit-stack: predict budget {budget:g} s for {self.predict_['rows']} images: "
            f"{len(selection.chosen)} of {len(set(units.models))} models chosen "
            f"({', '.join(self.models_)}), predicted {self.predict_['seconds']:.3g} s of the whole ensemble's "
            f"{self.predict_['ensemble_seconds']:.3g} s")
        return [units.data(data, selection.chosen, r) for r, data in enumerate(datas)], plans

    def _record(self, decision: dict, config: StackConfig, folds: Folds, models: dict, excluded: dict) -> dict:
        """`decision_`: the guard's decision with what it was fitted on; repeats' keys only when R > 1."""
        record = {
            "version": oof.__version__, "metric": config.metric, "chosen": decision["chosen"],
            "reason": decision["reason"], "best": decision["best"],
            "rows": folds.n_rows, "k": folds.k, "classes": list(self.classes_), "folds_sha256": folds.sha256,
            "models": models, "used": list(self.models_), "excluded": excluded, "left_out": decision["left_out"],
            "candidates": decision["candidates"], "nested": decision["nested"],
            "test_features": config.test_features, "config": config.to_dict(),
        }
        if "nested_note" in decision:
            record["nested_note"] = decision["nested_note"]
        if self.predict_ is not None:  # every candidate stacks the same units: one predicted time for all
            record["predict"] = self.predict_
            for scores in record["candidates"].values():
                scores["predict_seconds"] = self.predict_["seconds"]
        if folds.groups_sha256 is not None:  # an ungrouped decision keeps its keys
            record["groups_sha256"] = folds.groups_sha256
        if self.split_leak_ is not None:
            record["split_leak"] = self.split_leak_
        warnings = self.warnings_ + ([f"nested estimate: {decision['nested']['warning']}"]
                                     if (decision.get("nested") or {}).get("warning") else [])
        if warnings:
            record["warnings"] = warnings
        if folds.repeats > 1:  # a one-assignment decision has no repeat keys (its digest is a one-repeat run's)
            record.update({key: decision[key] for key in ("repeat_decisions", "agreement")}, repeats=folds.repeats)
        return record

    def _fit_repeats(self, datas: list[MetaData], config: StackConfig, metric: Metric, log, workers,
                     plans: list | None = None) -> dict:
        """The guard on each fold assignment, one call per repeat (`_guard_assignment`), and the decision: the
        one assignment's, or `_decide_over_repeats` with R > 1.

        Sets `oof_`, `timings_` and `candidate_`: the choice fitted on each repeat's rows (a `RepeatAverage`
        of the R fits when R > 1), each repeat's own fit where that repeat chose the same.
        """
        runs = []
        for r, data in enumerate(datas):
            if len(datas) > 1:
                log(f"fit-stack: repeat {r} ({r + 1} of {len(datas)}): meta-level OOF on its own OOF rows and folds")
            runs.append(_guard_assignment(data, repeat_config(config, r), metric, log, workers,
                                          plans[r] if plans else None))
        if len(runs) == 1:
            decision, self.oof_, self.timings_ = runs[0].decision, runs[0].oof, runs[0].timings
        else:
            decision, self.oof_, self.timings_ = _decide_over_repeats(runs, datas[0], config, metric)
        chosen, members = decision["chosen"], []
        for r, (run, data) in enumerate(zip(runs, datas)):  # a repeat whose own choice differs fits this one
            same = run.decision["chosen"] == chosen
            members.append(run.fitted if same else fit_chosen(data, chosen, repeat_config(config, r), metric))
        self.candidate_ = members[0] if len(members) == 1 else RepeatAverage(members)
        return decision

    def state(self) -> dict:
        """The chosen candidate's learned state as JSON-able values (no pickle)."""
        return {"candidate": self.decision_["chosen"], "models": list(self.models_),
                "classes": list(self.classes_), **self.candidate_.state()}

    def predict_proba(self, test_tables: Mapping) -> np.ndarray:
        """(N_test, C) probabilities of the chosen candidate on one set of test tables.

        Rows follow the first table's ids; models the guard excluded may be present and are ignored.
        """
        return self._predict(self._test_tables(test_tables))

    def predict_table(self, test_tables: Mapping, fold_tables: Sequence[Mapping] = ()) -> PredictionTable:
        """The stack's test predictions as a contract test table, per `config.test_features`.

        Args:
            test_tables: {model: test table}, the mean over each model's fold models.
            fold_tables: per fold k, {model: that fold model's test table}; needed for "per_fold".
                With repeats, R x K of them, repeat-major: repeat r's meta-model reads repeat r's fold tables.
        """
        config = self.config or StackConfig()
        tables = self._test_tables(test_tables)
        ids = next(iter(tables.values())).ids
        if config.test_features == "per_fold":
            if not fold_tables:
                raise StackerError("stack.test_features: 'per_fold' needs each fold model's test table "
                                   "(preds/<model>/test_fold<k>.parquet)")
            per_repeat = self._tables_per_repeat(len(fold_tables))
            proba = np.mean([self._predict(self._test_tables(t, ids), i // per_repeat)
                             for i, t in enumerate(fold_tables)], axis=0)
        else:
            proba = self._predict(tables)
        meta = {"model": "stack", "candidate": self.decision_["chosen"], "models": list(self.models_),
                "folds_sha256": self.decision_["folds_sha256"], "test_features": config.test_features,
                "version": oof.__version__}
        table = PredictionTable(ids, normalise_rows(proba), self.classes_, None, meta, "<stack test>")
        check_rows(table)
        return table

    def _check_split(self, split, config: StackConfig, log) -> None:
        """Stop on a split leak (`stacker.split_leak`), or with allow_suspicious record it as a warning."""
        if split is None:
            return
        self.split_leak_ = split.record()
        if not split.leaks:
            return
        if not config.allow_suspicious:
            raise StackerError(f"fit-stack: {split.message()}")
        self.warnings_.append(f"{split.message()} (kept: allow_suspicious)")
        log(f"warning: {self.warnings_[-1]}")

    def _check_many_flagged(self, consistency: dict, log) -> None:
        """Warn when MANY_FLAGGED or more models look leaked at once: the folds are the likelier cause."""
        flagged = [m for m, r in consistency.items() if r.get("flagged")]
        if len(flagged) >= MANY_FLAGGED:
            self.warnings_.append(
                f"{len(flagged)} models look leaked at once ({', '.join(flagged)}): more likely the folds leak "
                "(near-duplicate images or a group's rows split across folds) than each model; consider "
                "folds.duplicates: group or a group column")
            log(f"warning: {self.warnings_[-1]}")

    def _check_leaks(self, X: np.ndarray, folds: Folds, names: list[str], test_tables, fold_tables) -> LeakCheck:
        """The leak check of one fold assignment: its OOF rows `X` (N, M, C), its `folds` and its K fold tables."""
        if test_tables is None:
            return LeakCheck(suspicious_models(folds.y, X, names), {}, None)
        reference = self._leak_reference(test_tables, names, folds)
        ids = next(iter(reference.values())).ids
        test = meta_features(reference)  # (T, M, C)
        if fold_tables and len(fold_tables) != folds.k:
            raise StackerError(f"fold test tables: {len(fold_tables)} given for {folds.k} folds; give one per fold")
        per_fold = (np.stack([meta_features({m: validate_test(t, ids, folds.classes)  # the test table's row order
                                             for m, t in self._leak_reference(f, names, folds).items()})
                              for f in fold_tables]) if fold_tables else None)  # (K, T, M, C)
        split = split_leak(X, folds.fold, test, per_fold)
        suspicious = suspicious_models(folds.y, X, names, test if len(names) == 1 else None)
        report = leak_report(LeakInputs(folds.y, folds.fold, X, test, per_fold, names, folds.group_index))
        keep = [m for m, name in enumerate(names) if name not in suspicious]
        if suspicious and keep:
            # The others judged again without the memorisers found above: a model right on every OOF row
            # but not on test moves the others' consensus between OOF and test, and with it their gaps.
            report.update(leak_report(LeakInputs(folds.y, folds.fold, X[:, keep], test[:, keep],
                                                 None if per_fold is None else per_fold[:, :, keep],
                                                 [names[m] for m in keep], folds.group_index)))
        for name, r in report.items():
            if r["flagged"]:
                suspicious.setdefault(name, r["reason"])
        return LeakCheck(suspicious, report, split)

    @staticmethod
    def _leak_reference(tables: Mapping, names: list[str], folds: Folds) -> dict[str, PredictionTable]:
        missing = [m for m in names if m not in tables]
        if missing:
            raise StackerError(f"test tables: no table for model(s) {missing}; the OOF tables hold {names}")
        return align_test_tables({m: tables[m] for m in names}, folds.classes)

    def _test_tables(self, tables: Mapping, ids=None) -> dict[str, PredictionTable]:
        missing = [m for m in self.models_ if m not in tables]
        if missing:
            raise StackerError(f"test tables: no table for model(s) {missing}; the stack uses {self.models_}")
        aligned = align_test_tables({m: tables[m] for m in self.models_}, self.classes_)
        if ids is not None:  # per-fold tables follow the main test tables' row order
            aligned = {m: validate_test(t, ids, self.classes_) for m, t in aligned.items()}
        return aligned

    def _predict(self, tables: dict[str, PredictionTable], repeat: int | None = None) -> np.ndarray:
        """The chosen candidate on the tables: every repeat's fit averaged, or repeat `repeat`'s alone."""
        candidate = self.candidate_
        if repeat is not None and isinstance(candidate, RepeatAverage):
            candidate = candidate.members_[repeat]
        return candidate.predict_proba(meta_features(tables))

    def _tables_per_repeat(self, n_tables: int) -> int:
        """K: per-fold test tables given per repeat (all of them without repeats)."""
        repeats = getattr(self, "repeats_", 1)
        if n_tables % repeats:
            raise StackerError(f"fold test tables: {n_tables} given for {repeats} repeats; give each repeat's K "
                               "tables, repeat-major")
        return n_tables // repeats

    def _check_repeat_leaks(self, Xs: list[np.ndarray], folds: Folds, names: list[str], test_tables,
                            fold_tables) -> LeakCheck:
        """The leak check of every repeat (`_check_leaks`, one call per fold assignment); with R > 1 merged
        (`merge_leak_checks`: a model flagged in any repeat, each model's worst repeat's report, the split
        leak of the largest share).

        Per repeat, not on repeat 0 alone: each repeat's OOF rows come from fold models of their own,
        and a leak in any one repeat's fold models (a resumed job that trained on every row, a fold
        file edited between repeats) leaks that repeat's rows into its meta-level fits. The check is
        numpy over rows (no model is fitted), small beside the 15 fits per candidate per repeat (its
        cost: docs/speed.md). The test
        reference (the mean over all R x K fold models) is shared; the per-fold tables are the repeat's own.
        """
        checks = [self._check_leaks(X, one, names, test_tables, tables)
                  for X, one, tables in zip(Xs, folds.each_repeat(), _fold_tables_per_repeat(fold_tables, folds))]
        return checks[0] if len(checks) == 1 else merge_leak_checks(checks)


def _fold_tables_per_repeat(fold_tables: Sequence[Mapping], folds: Folds) -> list[Sequence[Mapping]]:
    """Each repeat's K fold tables, from R x K of them, repeat-major (all of them without repeats:
    `StackGuard._check_leaks` checks their number)."""
    if folds.repeats == 1:
        return [fold_tables]
    k = folds.k
    if fold_tables and len(fold_tables) != folds.repeats * k:
        raise StackerError(f"fold test tables: {len(fold_tables)} given for {folds.repeats} repeats x {k} folds; "
                           "give one per repeat and fold, repeat-major")
    return [list(fold_tables)[r * k:(r + 1) * k] for r in range(folds.repeats)]


def _guard_assignment(data: MetaData, config: StackConfig, metric: Metric, log, workers,
                      plan: BudgetPlan | None = None) -> GuardResult:
    """The guard on one fold assignment: `run_guard` over the candidates that can differ from the mean under
    `metric`; decision["left_out"] holds {candidate: why} of the others (`Candidate.unsuited`), each
    announced in the log."""
    names, left_out = suited_candidates(config.candidates, metric)
    left_out.update({n: why for n in names if (why := full_fit_refusal(n, config))})
    names = tuple(n for n in names if n not in left_out)
    for name, why in left_out.items():
        log(f"fit-stack: candidate {name} left out: {why}")
    result = run_guard(data, replace(config, candidates=names), metric, log, workers, plan)
    return result._replace(decision={**result.decision, "left_out": left_out})


def _decide_over_repeats(runs: list[GuardResult], data: MetaData, config: StackConfig, metric: Metric):
    """The decision over R > 1 repeats, from each repeat's `_guard_assignment` (`data`: repeat 0's rows; every
    repeat has the same labels and groups).

    Returns:
        (decision, oof, timings): `decide` on each candidate's (R, N, C) meta-level OOF, with `combine_repeats`'
        per-repeat scores, decisions and nested estimate; {candidate: (R, N, C)}; {candidate: seconds summed
        over repeats}.
    """
    names = list(runs[0].oof)
    oof_probas = {name: np.stack([run.oof[name] for run in runs]) for name in names}
    decision = decide(data.y, oof_probas, metric, config, [config.seed, 7], data.groups)
    decision = combine_repeats({**decision, "left_out": runs[0].decision["left_out"]}, [run.decision for run in runs])
    return decision, oof_probas, {name: sum(run.timings[name] for run in runs) for name in names}


# The greedy path without a budget is drawn for the report alone; past this many (unit moves x values)
# it would cost more than the fits, and the report draws the budget's own path (or none).
PATH_MAX_WORK = 5e9


def _path_affordable(units: Units) -> bool:
    U = len(units.names)
    return U * U * units.X[0].size * len(units.X) / max(U, 1) <= PATH_MAX_WORK


def _describe_inputs(folds: Folds, n_models: int, config: StackConfig) -> str:
    """The log line that says what the guard fits on."""
    groups = folds.group_index
    repeats = f" x {folds.repeats} repeats" if folds.repeats > 1 else ""
    grouped = f" in {int(groups.max()) + 1} groups" if groups is not None else ""
    return (f"fit-stack: {n_models} models, {len(folds.classes)} classes, {len(folds.y)} rows{grouped}, "
            f"{folds.k} folds{repeats}; metric {config.metric}")


def _exclude(suspicious: dict, allow: bool, log) -> dict:
    """{model: reason} of the models to leave out, each announced with a warning."""
    for name, why in suspicious.items():
        action = ("kept (allow_suspicious)" if allow else
                  "excluded; pass --allow-suspicious (stack.allow_suspicious: true) to keep it")
        log(f"warning: model {name!r} looks leaked: {why} -> {action}")
    return {} if allow else dict(suspicious)


def _model_scores(y, X, names, metric: Metric, leaks: LeakCheck, excluded: dict) -> dict:
    """Each base model's own OOF metric and log-loss, and its leak-check figures.

    Args:
        leaks: the leak check (its suspicious models with the declared leaks among them).
        excluded: {model: reason} of the models left out.
    """
    share = sure_share(y, X)
    out = {}
    for m, name in enumerate(names):
        status = "excluded" if name in excluded else "suspicious, kept" if name in leaks.suspicious else "used"
        z = leaks.consistency.get(name, {}).get("consistency")
        out[name] = {"score": metric.score(y, X[:, m]), "log_loss": log_loss(y, X[:, m]),
                     "sure_share": float(share[m]), "consistency": float(z) if z is not None and np.isfinite(z)
                     else None, "status": status}
        if name in leaks.suspicious:
            out[name]["reason"] = leaks.suspicious[name]
    return out
