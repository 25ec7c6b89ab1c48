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
"""
from __future__ import annotations

import itertools
import time

import numpy as np

from oof import log_loss

from .candidates import FLOOR, create_candidate
from .config import StackConfig
from .inputs import MetaData
from .metrics import Metric, bootstrap_counts


def fit_seed(seed: int, key: tuple[int, ...]) -> int:
    """Seed of the fit that holds out folds `key`: the same for a key whatever the order of work."""
    return int(np.random.SeedSequence([seed, 1 + len(key), *key]).generate_state(1)[0] % 2**31)


def held_out_keys(k: int, nested: bool) -> list[tuple[int, ...]]:
    """Fold sets to hold out: each fold, plus each pair of folds for the nested estimate."""
    singles = [(f,) for f in range(k)]
    return singles + (list(itertools.combinations(range(k), 2)) if nested else [])


def fit_held_out(data: MetaData, name: str, key: tuple[int, ...], config: StackConfig, metric: Metric):
    """Fit candidate `name` on every fold but `key`; return ((n_key, C) predictions for folds `key`, seconds)."""
    start = time.perf_counter()
    held = np.isin(data.fold, key)
    candidate = create_candidate(name, config, metric, fit_seed(config.seed, key), data.models, data.classes)
    candidate.fit(data.X[~held], data.y[~held])
    return candidate.predict_proba(data.X[held]), time.perf_counter() - start


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


def decide(y, probas: dict[str, np.ndarray], metric: Metric, config: StackConfig, seed) -> dict:
    """Score candidates on paired bootstrap resamples and choose one (module docstring, 1-3).

    Args:
        y: (n,) labels.
        probas: {candidate: (n, C) out-of-fold probabilities}, in complexity order, holding FLOOR.
        seed: seed of the resamples.

    Returns:
        {"candidates": {name: scores}, "best": name, "chosen": name, "reason": str}.
    """
    names = list(probas)
    boot = metric.bootstrap(y, [probas[n] for n in names], bootstrap_counts(y, config.n_bootstrap, seed))
    score = np.array([metric.score(y, probas[n]) for n in names])
    floor = names.index(FLOOR)
    tail = 100 * (1 - config.confidence) / 2
    records = {}
    for i, name in enumerate(names):
        gain = boot[:, i] - boot[:, floor]  # (B,) paired gains over the mean
        records[name] = {
            "score": float(score[i]), "log_loss": log_loss(y, probas[name]),
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


def nested_estimate(y, fold, preds: dict, metric: Metric, config: StackConfig) -> dict:
    """Run `decide` inside each outer fold on its inner folds; score each choice on its outer fold.

    Args:
        preds: {candidate: {key: predictions}} with single and pair keys.
    """
    outer_proba = None
    per_fold = []
    for o in np.unique(fold):
        inner = fold != o
        probas = {name: assemble(p, fold, outer=int(o)) for name, p in preds.items()}
        d = decide(y[inner], probas, metric, config, seed=[config.seed, 7, int(o)])
        p = preds[d["chosen"]][(int(o),)]  # (n_o, C) the choice, fitted on every other fold
        outer_proba = np.empty((len(y), p.shape[1])) if outer_proba is None else outer_proba
        outer_proba[fold == o] = p
        per_fold.append({"fold": int(o), "chosen": d["chosen"], "score": metric.score(y[fold == o], p),
                         "reason": d["reason"]})
    return {"score": metric.score(y, outer_proba), "log_loss": log_loss(y, outer_proba), "folds": per_fold}


def run_guard(data: MetaData, config: StackConfig, metric: Metric, log=print):
    """Meta-level OOF for every candidate of `config.candidates`, the decision, and the nested estimate.

    Fits run one after another: LightGBM is not safe to train and predict in
    several Python threads at once (seen here: std::bad_alloc and a segfault
    when one thread built a Dataset while another predicted), so the parallelism
    is OpenMP's inside each booster (`config.n_jobs`). Every fit has its own
    seed (`fit_seed`), so its result does not depend on the order of work.

    Returns:
        (decision, oof, timings): `decide`'s dict plus "nested" (None when off or
        K < 3: inner folds need two folds to train on); {candidate: (N, C)};
        {candidate: seconds summed over its fits}.
    """
    nested = config.nested and data.k >= 3
    keys = held_out_keys(data.k, nested)
    preds = {name: {} for name in config.candidates}
    timings = dict.fromkeys(config.candidates, 0.0)
    for name in config.candidates:
        for key in keys:
            preds[name][key], seconds = fit_held_out(data, name, key, config, metric)
            timings[name] += seconds
        log(f"  {name:<20} {len(keys):>3} fits {timings[name]:7.1f} s")
    oof = {name: assemble(p, data.fold) for name, p in preds.items()}
    decision = decide(data.y, oof, metric, config, seed=[config.seed, 7])
    decision["nested"] = nested_estimate(data.y, data.fold, preds, metric, config) if nested else None
    if config.nested and not nested:
        decision["nested_note"] = f"nested estimate needs K >= 3 folds, got K={data.k}"
    return decision, oof, timings
