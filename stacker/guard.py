"""The meta-overfitting guard: honest meta-level scores and a decision you can trust.

Meta-level OOF: each candidate is fitted on K-1 folds of the OOF rows (the same
folds as the base models) and predicts the held-out fold. The decision compares
every candidate with the plain mean on paired bootstrap resamples of the rows:

  1. admissible: the mean, and any candidate that beats it by >= `min_gain`
     with bootstrap win probability >= `confidence`;
  2. best: the admissible candidate of highest score;
  3. chosen: the simplest admissible candidate (the registry's complexity order)
     that the best does not beat by >= `min_gain` with win probability
     >= `confidence`: within noise of the best, the simpler one generalises.

Nested estimate: choosing the best of seven scores on the same rows is itself
optimistic, so the whole procedure (meta-OOF on the inner folds, bootstrap,
decision) runs again inside each outer fold, and the candidate it chose is scored
on that outer fold. That pooled score is the expected score of what `submit`
uses. A fit that trains on all rows but folds {a, b} serves both outer fold a
(inner fold b) and outer fold b (inner fold a), so the nested estimate costs
K(K-1)/2 extra fits per candidate, not K(K-1).

Speed: the 15 fits of a candidate are independent and seeded by their
held-out folds alone (`fit_seed`), so they run in `config.n_jobs` worker processes
(`fit_tasks`; the processes, the shared rows and the decisions' threads are
`stacker.workers`), each fit on one thread; each task prepares a candidate's rows once
(`Candidate.prepare`: the LightGBM ones bin every row, why that is honest:
`stacker.candidates.lgbm`) and fits on row subsets of them. The results are the same fits
whatever the number of workers and the order of work.
"""
from __future__ import annotations

import contextlib
import itertools
import time
import warnings
from typing import NamedTuple

import numpy as np

from oof import info, log_loss

from .budget import BudgetPlan
from .candidates import FLOOR, candidate_class, create_candidate
from .config import StackConfig
from .inputs import MetaData
from .metrics import Metric, bootstrap_counts
from .repeats import repeat_log_loss, repeat_scores
from .workers import FitWorkers, InTurn, decide_in_threads, fit_workers, split_keys, task_order


def fit_seed(seed: int, key: tuple[int, ...]) -> int:
    """Seed of the fit that holds out folds `key`: the same for a key whatever the order of work."""
    return int(np.random.SeedSequence([seed, 1 + len(key), *key]).generate_state(1)[0] % 2**31)


def held_out_keys(k: int, nested: bool) -> list[tuple[int, ...]]:
    """Fold sets to hold out: each fold, plus each pair of folds for the nested estimate."""
    singles = [(f,) for f in range(k)]
    return singles + (list(itertools.combinations(range(k), 2)) if nested else [])


def fit_held_out(data: MetaData, cls, key: tuple[int, ...], config: StackConfig, metric: Metric, prepared):
    """Fit candidate class `cls` on every fold but `key`; return (n_key, C) predictions for folds `key`.

    prepared: `cls.prepare` of all of `data`'s rows, shared by the fits of one task (`fit_keys`).
    """
    held = np.isin(data.fold, key)
    candidate = cls.from_config(config, metric, fit_seed(config.seed, key), data.models, data.classes)
    candidate.row_groups = data.groups
    candidate.fit_prepared(prepared, np.flatnonzero(~held), data.X.shape)
    return candidate.predict_proba(data.X[held])


def fit_keys(data: MetaData, cls, keys: list, config: StackConfig, metric: Metric) -> tuple[dict, float]:
    """Fit `cls` once per held-out key in `keys`; return ({key: predictions}, seconds).

    One task of `fit_tasks`: the candidate prepares its rows (`Candidate.prepare`: LightGBM bins
    them, logistic regression takes logs) once here for all of its keys.
    """
    start = time.perf_counter()
    prepared = cls.prepare(data.X, data.y, config, data.models, data.classes)
    preds = {key: fit_held_out(data, cls, key, config, metric, prepared) for key in keys}
    return preds, time.perf_counter() - start


def fit_tasks(data: MetaData, names, keys: list, config: StackConfig, metric: Metric, workers: FitWorkers | int):
    """Run every candidate's held-out fits; return ({name: {key: predictions}}, {name: seconds}).

    workers: the fit workers (`stacker.workers.start_workers`), or their number (1: in this process).
    With n > 1 workers the fits of each candidate split into tasks (`split_keys`) run by the
    worker processes, the longest first (`task_order`), so that no worker is left with a long
    task at the end while the other waits. Each worker runs one thread (LightGBM `num_threads`,
    BLAS limited by joblib): no OpenMP barrier waits for a descheduled sibling on a busy machine.
    """
    workers = workers if isinstance(workers, FitWorkers) else FitWorkers(workers)
    tasks = [(name, part) for name in task_order(names) for part in split_keys(name, keys, workers.n)]
    done = workers.map(fit_keys, data, [(candidate_class(name), part, config, metric) for name, part in tasks],
                       "meta-level fits")
    preds, timings = {name: {} for name in names}, dict.fromkeys(names, 0.0)
    for (name, _), (part, seconds) in zip(tasks, done):
        preds[name].update(part)
        timings[name] += seconds
    return preds, timings


def assemble(preds: dict, fold: np.ndarray, outer: int | None = None) -> np.ndarray:
    """Out-of-fold (n, C) predictions from held-out fits, in row order.

    outer=None: every row from the fit that held out its fold alone (meta-level OOF).
    outer=o: the rows outside fold o, each from the fit that held out {o, its fold}.
    """
    rows = np.arange(len(fold)) if outer is None else np.flatnonzero(fold != outer)
    out = None
    for f in np.unique(fold[rows]):
        key = (int(f),) if outer is None else tuple(sorted((outer, int(f))))
        p = preds[key][fold[np.isin(fold, key)] == f]  # this fold's rows within the key's rows
        out = np.empty((len(rows), p.shape[1])) if out is None else out
        out[fold[rows] == f] = p
    return out


def decide(y, probas: dict[str, np.ndarray], metric: Metric, config: StackConfig, seed, groups=None) -> dict:
    """Score candidates on paired bootstrap resamples and choose one (module docstring, 1-3).

    Args:
        y: (n,) labels.
        probas: {candidate: (n, C) out-of-fold probabilities}, in complexity order, holding FLOOR;
            with repeats (R, n, C), scored as `stacker.repeats.repeat_scores` says.
        seed: seed of the resamples.
        groups: (n,) group of each row, or None; with groups the resamples draw whole groups
            (`bootstrap_counts`).

    Returns:
        {"candidates": {name: scores}, "best": name, "chosen": name, "reason": str}.
    """
    names = list(probas)
    score, boot = repeat_scores(y, [probas[n] for n in names], metric, bootstrap_counts(y, config.n_bootstrap, seed, groups))
    floor = names.index(FLOOR)
    tail = 100 * (1 - config.confidence) / 2
    records = {}
    for i, name in enumerate(names):
        gain = boot[:, i] - boot[:, floor]  # (B,) paired gains over the mean
        records[name] = {
            "score": float(score[i]), "log_loss": repeat_log_loss(y, probas[name]),
            "interval": np.percentile(boot[:, i], [tail, 100 - tail]).tolist(),
            "gain": float(score[i] - score[floor]),
            "gain_interval": np.percentile(gain, [tail, 100 - tail]).tolist(),
            "win_probability": float((gain > 0).mean()) if i != floor else None,
        }
    beats = lambda a, b: (score[a] - score[b] >= config.min_gain  # noqa: E731
                          and (boot[:, a] > boot[:, b]).mean() >= config.confidence)
    admissible = [i for i in range(len(names)) if i == floor or beats(i, floor)]
    best = max(admissible, key=lambda i: (score[i], -i))  # ties go to the simpler
    chosen = next(i for i in admissible if i == best or not beats(best, i))
    for i, name in enumerate(names):
        records[name]["admissible"] = i in admissible
    return {"candidates": records, "best": names[best], "chosen": names[chosen],
            "reason": _reason(names, records, best, chosen, config)}


def _reason(names, records, best, chosen, config) -> str:
    rec = records[names[chosen]]
    if names[chosen] == FLOOR:
        others = [n for n in names if n != FLOOR]
        if not others:
            return "the mean is the only candidate"
        near = max(others, key=lambda n: records[n]["score"])
        return (f"no candidate beat the mean by >= {config.min_gain} with win probability >= "
                f"{config.confidence}; closest: {near} ({records[near]['gain']:+.4f}, "
                f"win probability {records[near]['win_probability']:.3f})")
    text = (f"{names[chosen]} beats the mean by {rec['gain']:+.4f} with win probability "
            f"{rec['win_probability']:.3f} (>= {config.confidence})")
    if best != chosen:
        diff = records[names[best]]["score"] - rec["score"]
        text += f"; {names[best]} scores {diff:+.4f} more but is more complex and within noise of it"
    return text


def nested_estimate(data: MetaData, preds: dict, metric: Metric, config: StackConfig, pool=None) -> dict:
    """Run `decide` inside each outer fold on its inner folds; score each choice on its outer fold.

    Args:
        data: the rows' labels, folds and groups (`MetaData`; its X is not read).
        preds: {candidate: {key: predictions}} with single and pair keys.
        pool: an executor that runs the outer folds' decisions at once (`decide_in_threads`); None: in turn.
    """
    result = nested_result(data, preds, metric, nested_jobs(data, preds, metric, config, pool))
    del result["proba"]
    return result


def nested_jobs(data: MetaData, preds: dict, metric: Metric, config: StackConfig, pool=None,
                per_outer: dict | None = None) -> list:
    """`nested_estimate`'s outer-fold decisions, submitted to `pool` (run at once without one): [(fold, future)].

    per_outer: {outer fold: its own `preds`} where outer folds fit their candidates on inputs of their own
    (a budget's choice made again inside each outer fold, `stacker.budget`); None: `preds` for every one.
    """
    per_outer = per_outer or {}
    return [(int(o), (pool or InTurn()).submit(_inner_decision, data, per_outer.get(int(o), preds), int(o), metric,
                                                config))
            for o in np.unique(data.fold)]


def nested_result(data: MetaData, preds: dict, metric: Metric, jobs: list, per_outer: dict | None = None) -> dict:
    """The nested estimate from `nested_jobs`' decisions: each outer fold scored with its choice.

    "proba" holds the pooled outer-fold predictions (N, C), for `nested_check`; `run_guard` drops it
    from the decision.
    """
    y, fold = data.y, data.fold
    outer_proba = None
    per_fold = []
    for o, job in jobs:
        d = job.result()
        p = (per_outer or {}).get(o, preds)[d["chosen"]][(o,)]  # (n_o, C) the choice, fitted on every other fold
        outer_proba = np.empty((len(y), p.shape[1])) if outer_proba is None else outer_proba
        outer_proba[fold == o] = p
        per_fold.append({"fold": o, "chosen": d["chosen"], "score": metric.score(y[fold == o], p),
                         "reason": d["reason"]})
    return {"score": metric.score(y, outer_proba), "log_loss": log_loss(y, outer_proba), "folds": per_fold,
            "proba": outer_proba}


def _inner_decision(data: MetaData, preds: dict, outer: int, metric: Metric, config: StackConfig) -> dict:
    """`decide` on the rows outside fold `outer`, from the fits that held out `outer` and each row's fold."""
    inner = data.fold != outer
    probas = {name: assemble(p, data.fold, outer=outer) for name, p in preds.items()}
    groups = None if data.groups is None else data.groups[inner]
    return decide(data.y[inner], probas, metric, config, [config.seed, 7, outer], groups)


class GuardResult(NamedTuple):
    """`run_guard`'s result on one fold assignment."""

    decision: dict  # `decide`'s dict plus "nested" (None when off or K < 3: inner folds need two folds to train on)
    oof: dict[str, np.ndarray]  # {candidate: (N, C) meta-level OOF probabilities}
    timings: dict[str, float]  # {candidate: seconds summed over its held-out fits}
    fitted: object  # the chosen candidate fitted on every row (`fit_chosen`)


def fit_chosen(data: MetaData, chosen: str, config: StackConfig, metric: Metric):
    """Candidate `chosen` fitted on every row of `data` (the stack's fit), seeded by `fit_seed(config.seed, ())`."""
    candidate = create_candidate(chosen, config, metric, fit_seed(config.seed, ()), data.models, data.classes)
    candidate.row_groups = data.groups
    return candidate.fit(data.X, data.y)


def run_guard(data: MetaData, config: StackConfig, metric: Metric, log=info,
              workers: FitWorkers | None = None, plan: BudgetPlan | None = None) -> GuardResult:
    """Meta-level OOF for every candidate of `config.candidates`, the decision, the chosen candidate fitted
    on every row, and the nested estimate.

    The fit of the choice runs on this thread while the nested estimate's decisions run in theirs, so
    the two overlap (a logistic regression's fit on 100,000 rows: 6 s on the 2-core bench machine).

    Fits run in worker processes (`fit_tasks`), not threads: LightGBM is not safe to
    train and predict in several Python threads at once (seen here: std::bad_alloc
    and a segfault when one thread built a Dataset while another predicted). Every
    fit has its own seed (`fit_seed`), so its result does not depend on the order of work.
    The decisions (the main one and each outer fold's) run at once in threads (`decide_in_threads`).

    Args:
        workers: the fit workers, started ahead (`stacker.workers.start_workers`); None: as many as
            `fit_workers` gives for these rows.
        plan: under a budget, the units and choices (`stacker.budget.BudgetPlan`): `data` holds the units
            chosen on every row, and each outer fold of the nested estimate fits the candidates on its own
            choice (`fit_plan`); None: `data`'s models for every fit.
    """
    nested = config.nested and data.k >= 3
    keys = held_out_keys(data.k, nested)
    workers = workers or FitWorkers(fit_workers(config, data.X.size))
    if plan is None:
        preds, timings = fit_tasks(data, config.candidates, keys, config, metric, workers)
        per_outer = None
    else:
        preds, timings, per_outer = fit_plan(data, plan, keys, config, metric, workers)
    for name in config.candidates:
        log(f"  {name:<20} {len(keys):>3} fits {timings[name]:7.1f} s")
    oof = {name: assemble(p, data.fold) for name, p in preds.items()}
    pool = decide_in_threads(workers.n)
    # one warnings-filter state around the threads: `Metric.bootstrap`'s catch_warnings is not thread-safe
    with warnings.catch_warnings(), pool or contextlib.nullcontext():
        main = (pool or InTurn()).submit(decide, data.y, oof, metric, config, [config.seed, 7], data.groups)
        jobs = nested_jobs(data, preds, metric, config, pool, per_outer) if nested else None
        fitted = fit_chosen(data, main.result()["chosen"], config, metric)
        estimate = nested_result(data, preds, metric, jobs, per_outer) if nested else None
        decision = {**main.result(), "nested": estimate}
    if estimate is not None:
        warning = nested_check(data, estimate.pop("proba"), metric, config)
        if warning:
            estimate["warning"] = warning
    if config.nested and not nested:
        decision["nested_note"] = f"nested estimate needs K >= 3 folds, got K={data.k}"
    return GuardResult(decision, oof, timings, fitted)


def fit_plan(data: MetaData, plan: BudgetPlan, keys: list, config: StackConfig, metric: Metric,
             workers: FitWorkers) -> tuple[dict, dict, dict]:
    """The held-out fits under a budget: ({name: {key: predictions}} on `data` (the main choice),
    {name: seconds}, {outer fold: its own preds}).

    A pair key {a, b} on the main choice serves outer fold a only where a's own choice is the main one, so
    the main fits keep the single keys and the pairs that touch such a fold; each other choice fits, for
    its outer folds, the single key and the pairs with every other fold on its own units.
    """
    by_choice: dict[tuple, list[int]] = {}
    for o, chosen in plan.outer.items():
        by_choice.setdefault(tuple(chosen), []).append(o)
    same = set(by_choice.pop(tuple(plan.main), []))
    main_keys = [key for key in keys if len(key) == 1 or same & set(key)]
    preds, timings = fit_tasks(data, config.candidates, main_keys, config, metric, workers)
    per_outer = {o: preds for o in same}
    for chosen, folds in by_choice.items():
        own = sorted({(o,) for o in folds} | {tuple(sorted((o, f))) for o in folds for f in range(data.k) if f != o})
        own_preds, own_timings = fit_tasks(plan.units.data(data, chosen, plan.repeat), config.candidates, own,
                                           config, metric, workers)
        per_outer.update({o: own_preds for o in folds})
        timings = {name: timings[name] + own_timings[name] for name in timings}
    return preds, timings, per_outer


def nested_check(data: MetaData, outer_proba: np.ndarray, metric: Metric, config: StackConfig) -> str:
    """A warning when the nested estimate is too good to be true, or "".

    A stack gains on its best base model by combining models, a little; a nested estimate
    above the best model's own OOF score by more than `NESTED_SDS` bootstrap standard
    deviations of the two scores apart, or at the metric's maximum (every row right, a log-loss of 0),
    says that some OOF rows were seen in training, not that the stack is that good.
    """
    y = data.y
    models = data.X.shape[1]
    base = [metric.score(y, data.X[:, m]) for m in range(models)]
    best = int(np.argmax(base))
    estimate = metric.score(y, outer_proba)
    perfect = metric.score(y, np.eye(data.X.shape[2])[y])
    if estimate >= perfect - 1e-12:
        return (f"the nested estimate is the metric's maximum ({estimate:.4f}): no honest stack is right on every "
                "row; some OOF rows were seen in training (a leaked model or split folds)")
    counts = bootstrap_counts(y, config.n_bootstrap, [config.seed, 11], data.groups)
    boot = metric.bootstrap(y, [outer_proba, np.asarray(data.X[:, best], dtype=np.float64)], counts)
    # The two scores' spread apart (unpaired), not the paired gain's: a real stacking gain is often
    # several paired SDs (3-4 on bench/leak_scenarios.py's honest sets, confirmed by their test sets).
    gain, sd = estimate - base[best], float(np.hypot(np.std(boot[:, 0], ddof=1), np.std(boot[:, 1], ddof=1)))
    if gain > NESTED_SDS * sd and gain > 0:
        return (f"the nested estimate {estimate:.4f} is above the best model's OOF score ({data.models[best]} "
                f"{base[best]:.4f}) by {gain:+.4f}, {gain / max(sd, 1e-12):.1f} bootstrap SDs: more than stacking "
                "gains honestly; check the models and folds for leaks")
    return ""


NESTED_SDS = 3.0
