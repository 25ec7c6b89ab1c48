"""StackGuard: the guarded stack as a notebook-friendly estimator.

    guard = StackGuard(StackConfig(metric="accuracy")).fit({"convnext": oof_a, "vit": oof_b}, folds)
    guard.decision_["chosen"], guard.decision_["reason"]
    proba = guard.predict_proba({"convnext": test_a, "vit": test_b})  # (N_test, C)

Tables are `oof.PredictionTable`s or DataFrames in the contract's layout (`id`,
`fold` for OOF, one column per class); `folds` is an `oof.Folds`
(`oof.load_folds("folds.csv")` reads one made by any tool). `StackGuard.from_state`
rebuilds a fitted guard from its saved decision and state (`stacker.load_stack`
reads them from a run).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Mapping, Sequence

import numpy as np
from threadpoolctl import threadpool_limits

import oof
from oof import Folds, PredictionTable, StackerError, build_config, check_rows, log_loss, validate_test

from .candidates import candidate_class, create_candidate, normalise_rows, suited_candidates
from .config import StackConfig
from .guard import fit_seed, run_guard
from .inputs import MetaData, align_test_tables, as_oof_tables, meta_features, sure_share, suspicious_models
from .leak import LeakInputs, declared_leaks, leak_report
from .metrics import Metric


class StackGuard:
    """Score every candidate out of fold, choose one with the guard, fit it on all OOF rows.

    Args:
        config: meta-level options; default `StackConfig()`.
        log: callable for progress lines and warnings (print by default; None is silent).

    Attributes (after fit):
        decision_: the JSON-able decision: scores, intervals, choice, reason, nested estimate.
        models_: the models used, in input order (suspicious ones excluded).
        classes_: class names, the column order of `predict_proba`.
        candidate_: the chosen candidate, fitted on every OOF row.
        oof_: {candidate: (N, C)} meta-level out-of-fold probabilities.
        timings_: {candidate: seconds} of its meta-level fits.
    """

    def __init__(self, config: StackConfig | None = None, log=print):
        self.config = config
        self.log = log

    @classmethod
    def from_state(cls, decision: dict, state: dict, booster_text: str | None = None,
                   source: str = "decision") -> "StackGuard":
        """The fitted guard that `decision_` and `state()` (and the candidate's booster text) describe.

        Args:
            decision: the saved `decision_`; its "config" is checked like the YAML's.
            state: the saved `state()`: the chosen candidate's name and learned state, models, classes.
            booster_text: the chosen candidate's LightGBM model, when it has one.
            source: where the decision comes from, for the config's error messages.

        Raises:
            StackerError: a saved config that no longer passes the checks.
            KeyError: a missing key (damaged files).
        """
        guard = cls(build_config(StackConfig, decision["config"], f"{source}: config"))
        guard.decision_, guard.models_, guard.classes_ = decision, list(state["models"]), tuple(state["classes"])
        guard.candidate_ = candidate_class(state["candidate"]).from_state(state, booster_text)
        return guard

    def fit(self, oof_tables: Mapping, folds: Folds, test_tables: Mapping | None = None,
            fold_tables: Sequence[Mapping] = ()) -> "StackGuard":
        """Score the candidates, decide, and fit the chosen one on every OOF row.

        Args:
            oof_tables: {model: OOF table or DataFrame}.
            folds: the fold assignment the tables were made on.
            test_tables: {model: test table}, optional: the leak check compares each model's OOF rows
                with its test rows (`stacker.leak`); without them only near-certain memorisers are found.
            fold_tables: per fold k, {model: fold model k's test table}, optional: the leak check's
                like-for-like reference (one fold model on unseen rows, as the OOF rows are).
        """
        config = self.config or StackConfig()
        log = self.log or (lambda *a: None)
        tables = as_oof_tables(oof_tables, folds)
        names, y = list(tables), folds.y
        X = meta_features(tables)  # (N, M, C)
        suspicious, consistency = self._check_leaks(X, folds, names, test_tables, fold_tables)
        for name, why in declared_leaks({m: t.meta for m, t in tables.items()}).items():
            suspicious.setdefault(name, why)
        excluded = _exclude(suspicious, config.allow_suspicious, log)
        if len(excluded) == len(names):
            raise StackerError(f"fit-stack: every model looks leaked ({', '.join(names)}); nothing is left to "
                               "stack. Pass --allow-suspicious (stack.allow_suspicious: true) to keep them")
        self.models_ = [m for m in names if m not in excluded]
        self.classes_ = tuple(folds.classes)
        data = MetaData(X[:, [names.index(m) for m in self.models_]], y, folds.fold, tuple(self.models_),
                        self.classes_)
        metric = Metric(config.metric, len(self.classes_))
        log(f"fit-stack: {len(self.models_)} models, {len(self.classes_)} classes, {len(y)} rows, "
            f"{folds.k} folds; metric {config.metric}")
        # One BLAS thread: OpenBLAS threads spinning after a logistic-regression fit
        # slowed the next LightGBM fit's OpenMP threads 3x on the 2-core bench machine.
        with threadpool_limits(limits=1, user_api="blas"):
            decision, self.oof_, self.timings_ = _run_suited(data, config, metric, log)
            self.candidate_ = create_candidate(decision["chosen"], config, metric, fit_seed(config.seed, ()),
                                               data.models, data.classes).fit(data.X, y)
        self.decision_ = {
            "version": oof.__version__, "metric": config.metric, "chosen": decision["chosen"],
            "reason": decision["reason"], "best": decision["best"],
            "rows": len(y), "k": folds.k, "classes": list(self.classes_), "folds_sha256": folds.sha256,
            "models": _model_scores(y, X, names, metric, (suspicious, excluded, consistency)),
            "used": list(self.models_), "excluded": excluded, "left_out": decision["left_out"],
            "candidates": decision["candidates"], "nested": decision["nested"],
            "test_features": config.test_features, "config": config.to_dict(),
        }
        if "nested_note" in decision:
            self.decision_["nested_note"] = decision["nested_note"]
        return self

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
        """
        config = self.config or StackConfig()
        tables = self._test_tables(test_tables)
        ids = next(iter(tables.values())).ids
        if config.test_features == "per_fold":
            if not fold_tables:
                raise StackerError("stack.test_features: 'per_fold' needs each fold model's test table "
                                   "(preds/<model>/test_fold<k>.parquet)")
            proba = np.mean([self._predict(self._test_tables(t, ids)) for t in fold_tables], axis=0)
        else:
            proba = self._predict(tables)
        meta = {"model": "stack", "candidate": self.decision_["chosen"], "models": list(self.models_),
                "folds_sha256": self.decision_["folds_sha256"], "test_features": config.test_features,
                "version": oof.__version__}
        table = PredictionTable(ids, normalise_rows(proba), self.classes_, None, meta, "<stack test>")
        check_rows(table)
        return table

    def _check_leaks(self, X: np.ndarray, folds: Folds, names: list[str], test_tables, fold_tables):
        """({model: reason} of the models that look leaked, {model: OOF/test consistency report})."""
        if test_tables is None:
            return suspicious_models(folds.y, X, names), {}
        reference = self._leak_reference(test_tables, names, folds)
        ids = next(iter(reference.values())).ids
        test = meta_features(reference)  # (T, M, C)
        if fold_tables and len(fold_tables) != folds.k:
            raise StackerError(f"fold test tables: {len(fold_tables)} given for {folds.k} folds; give one per fold")
        per_fold = (np.stack([meta_features({m: validate_test(t, ids, folds.classes)  # the test table's row order
                                             for m, t in self._leak_reference(f, names, folds).items()})
                              for f in fold_tables]) if fold_tables else None)  # (K, T, M, C)
        report = leak_report(LeakInputs(folds.y, folds.fold, X, test, per_fold, names))
        suspicious = suspicious_models(folds.y, X, names, test if len(names) == 1 else None)
        for name, r in report.items():
            if r["flagged"]:
                suspicious.setdefault(name, r["reason"])
        return suspicious, report

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

    def _predict(self, tables: dict[str, PredictionTable]) -> np.ndarray:
        return self.candidate_.predict_proba(meta_features(tables))


def _run_suited(data: MetaData, config: StackConfig, metric: Metric, log):
    """`run_guard` over the candidates that can differ from the mean under `metric`; decision["left_out"]
    holds {candidate: why} of the others (`Candidate.unsuited`), each announced in the log."""
    names, left_out = suited_candidates(config.candidates, metric)
    for name, why in left_out.items():
        log(f"fit-stack: candidate {name} left out: {why}")
    decision, oof_probas, timings = run_guard(data, replace(config, candidates=names), metric, log)
    return {**decision, "left_out": left_out}, oof_probas, timings


def _exclude(suspicious: dict, allow: bool, log) -> dict:
    """{model: reason} of the models to leave out, each announced with a warning."""
    for name, why in suspicious.items():
        action = ("kept (allow_suspicious)" if allow else
                  "excluded; pass --allow-suspicious (stack.allow_suspicious: true) to keep it")
        log(f"warning: model {name!r} looks leaked: {why} -> {action}")
    return {} if allow else dict(suspicious)


def _model_scores(y, X, names, metric: Metric, checks: tuple[dict, dict, dict]) -> dict:
    """Each base model's own OOF metric and log-loss, and its leak-check figures.

    Args:
        checks: ({model: reason} suspicious, {model: reason} excluded, {model: consistency report}).
    """
    suspicious, excluded, consistency = checks
    share = sure_share(y, X)
    out = {}
    for m, name in enumerate(names):
        status = "excluded" if name in excluded else "suspicious, kept" if name in suspicious else "used"
        z = consistency.get(name, {}).get("consistency")
        out[name] = {"score": metric.score(y, X[:, m]), "log_loss": log_loss(y, X[:, m]),
                     "sure_share": float(share[m]), "consistency": float(z) if z is not None and np.isfinite(z)
                     else None, "status": status}
        if name in suspicious:
            out[name]["reason"] = suspicious[name]
    return out
