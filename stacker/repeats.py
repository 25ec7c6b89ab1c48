"""The meta level with repeated folds (`folds.repeats` R > 1), kept honest.

Why per repeat. A meta-model cross-validated on the rows of several repeats at once (the
R x N table read as one, each row with its own repeat's fold) holds row i out in one
repeat while i's rows of the other repeats, nearly the same features and the same label,
train it: that leaks, strongly (tests/test_stack_repeats.py, noise models: 0.73 accuracy
where chance is 0.33). Averaging each row's OOF over repeats first, as repeated k-fold
users and AutoGluon do, removes that duplication; what is left is second order: the
features of a meta-training row come from other repeats' fold models that trained on the
held-out rows (as they do within one assignment), while a held-out row's average is made
only of models that never saw it; that test measures it at chance (0.32). mljar turns
stacking off with repeats over this worry. Scoring each repeat on its own OOF and folds
makes the meta level exactly a one-assignment run, R times, so no argument is needed, and
the per-repeat spread and agreement come with it.

What stacker does, repeat by repeat:

- each candidate's meta-level OOF is computed per repeat r, on repeat r's OOF rows with
  repeat r's folds (`Folds.for_repeat(r).fold`), exactly as a one-repeat run does (the
  guard's `run_guard` per repeat, repeat 0 with the configured seed, so a one-repeat
  run is unchanged, repeat r > 0 with `repeat_seed(seed, r)`);
- scores combine across repeats: a candidate's score is the mean over repeats of its
  repeat scores, and each paired bootstrap resample (rows drawn once, the same rows for
  every repeat and candidate) scores the mean over repeats of metric(y[idx], p_r[idx]).
  For a per-row metric that is "each row's score averaged over repeats, resampled by
  row"; for AUC and the other set metrics it is the mean of the repeats' AUCs on the
  same resample. `repeat_scores` does this inside the guard's `decide`, whose rule is
  otherwise unchanged. The mean over repeats takes out the split-to-split noise of the
  meta-model's fits, so a gain is found with more power than on one repeat; each repeat's
  own decision is kept beside it (a choice made on no single repeat shows as low agreement);
- the nested estimate runs per repeat (its outer folds are that repeat's) and its scores
  are averaged;
- the chosen candidate is fitted once per repeat on that repeat's OOF rows
  (`RepeatAverage`), and the stack predicts the mean of their predictions.

decision.json also gets each candidate's per-repeat scores and their spread, and each
repeat's own decision (the guard's rule on that repeat alone) with how often it agrees
with the combined one: a choice that flips between repeats is within split noise.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from oof import log_loss, repeat_seed

from .leak import LeakCheck
from .metrics import Metric


def repeat_scores(y: np.ndarray, probas: list[np.ndarray], metric: Metric, counts: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(K,) scores and (B, K) paired bootstrap scores of K candidates, combined over repeats.

    Args:
        y: (n,) labels.
        probas: K arrays, each (n, C) (one repeat: exactly the metric's score and bootstrap)
            or (R, n, C): one (n, C) per repeat, rows in the same order in every repeat.
        counts: (B, n) times each row is drawn in each resample, shared by every repeat.
    """
    if all(p.ndim == 2 for p in probas):
        return np.array([metric.score(y, p) for p in probas]), metric.bootstrap(y, probas, counts)
    each = [[p[r] for p in probas] for r in range(len(probas[0]))]  # R x K arrays (n, C)
    score = np.mean([[metric.score(y, p) for p in ps] for ps in each], axis=0)
    boot = np.mean([metric.bootstrap(y, ps, counts) for ps in each], axis=0)
    return score, boot


def repeat_log_loss(y: np.ndarray, proba: np.ndarray) -> float:
    """Log-loss of (n, C) probabilities, or the mean over repeats of (R, n, C) ones."""
    if proba.ndim == 2:
        return log_loss(y, proba)
    return float(np.mean([log_loss(y, p) for p in proba]))


def repeat_config(config, repeat: int):
    """The config repeat `repeat`'s meta-level fits use: repeat 0 keeps the seed (it is the
    one-repeat run), repeat r > 0 gets `repeat_seed(seed, r)`, so repeats draw their own inner splits."""
    return config if repeat == 0 else replace(config, seed=repeat_seed(config.seed, repeat))


def combine_repeats(decision: dict, per_repeat: list[dict]) -> dict:
    """The combined decision (the guard's `decide` on every repeat's OOF) with each repeat's view added.

    Args:
        decision: `decide` on (R, n, C) OOF per candidate.
        per_repeat: each repeat's own `run_guard` decision (its "candidates", "chosen", "nested").

    Returns:
        `decision` plus, per candidate, "repeat_scores" and "repeat_std" (std across repeats);
        "repeat_decisions" (each repeat's chosen, best and reason), "agreement" (share of
        repeats whose own choice is the combined one) and "nested" (per repeat, averaged).
    """
    for name, record in decision["candidates"].items():
        scores = [d["candidates"][name]["score"] for d in per_repeat]
        record["repeat_scores"], record["repeat_std"] = scores, float(np.std(scores))
    decision["repeat_decisions"] = [{"repeat": r, "chosen": d["chosen"], "best": d["best"], "reason": d["reason"]}
                                    for r, d in enumerate(per_repeat)]
    decision["agreement"] = float(np.mean([d["chosen"] == decision["chosen"] for d in per_repeat]))
    decision["nested"] = combine_nested([d.get("nested") for d in per_repeat])
    notes = [d["nested_note"] for d in per_repeat if "nested_note" in d]
    if notes:
        decision["nested_note"] = notes[0]
    return decision


def combine_nested(nested: list[dict | None]) -> dict | None:
    """Each repeat's nested estimate (outer folds of its own), averaged; None when it was off."""
    if any(n is None for n in nested):
        return None
    scores = [n["score"] for n in nested]
    folds = [{**f, "repeat": r} for r, n in enumerate(nested) for f in n["folds"]]
    combined = {"score": float(np.mean(scores)), "log_loss": float(np.mean([n["log_loss"] for n in nested])),
                "repeat_scores": scores, "repeat_std": float(np.std(scores)), "folds": folds}
    warnings = [f"repeat {r}: {n['warning']}" for r, n in enumerate(nested) if n.get("warning")]
    if warnings:
        combined["warning"] = "; ".join(warnings)
    return combined


def combine_model_scores(per_repeat: list[dict]) -> dict:
    """Each base model's figures per repeat -> means, with "repeat_scores" and "repeat_std" (R > 1)."""
    out = {}
    for name, first in per_repeat[0].items():
        scores = [d[name]["score"] for d in per_repeat]
        out[name] = {**first, "score": float(np.mean(scores)),
                     "log_loss": float(np.mean([d[name]["log_loss"] for d in per_repeat])),
                     "sure_share": float(np.mean([d[name]["sure_share"] for d in per_repeat])),
                     "repeat_scores": scores, "repeat_std": float(np.std(scores))}
    return out


def merge_leak_checks(per_repeat: list[LeakCheck]) -> LeakCheck:
    """Each repeat's leak check -> one: the models flagged in any repeat (their reason naming the repeat), each
    model's report from its worst repeat (highest consistency z), and the split leak of the largest share.

    A leak in one repeat's fold models leaks that repeat's OOF rows into the meta level as
    surely as a leak in all of them, so a model flagged in any repeat is flagged, naming the repeat.
    """
    suspicious, worst, worst_z = {}, {}, {}
    for r, check in enumerate(per_repeat):
        for name, why in check.suspicious.items():
            suspicious.setdefault(name, f"repeat {r}: {why}")
        for name, rep in check.consistency.items():
            z = rep.get("consistency")
            z = -np.inf if z is None or not np.isfinite(z) else z
            if name not in worst or z > worst_z[name]:
                worst[name], worst_z[name] = {**rep, "repeat": r}, z
    splits = [c.split for c in per_repeat if c.split is not None]
    split = max(splits, key=lambda sp: sp.share) if splits else None  # a split leak in any repeat leaks
    return LeakCheck(suspicious, worst, split)


class RepeatAverage:
    """The chosen candidate fitted once per repeat (on that repeat's OOF rows): the mean of their predictions.

    Attributes:
        members_: the R fitted candidates, in repeat order.
    """

    def __init__(self, members):
        self.members_ = list(members)

    @property
    def name(self) -> str:
        return self.members_[0].name

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """(N, C) mean of every repeat's candidate on the same (N, M, C) features."""
        return np.mean([m.predict_proba(X) for m in self.members_], axis=0)

    def state(self) -> dict:
        """{"repeats": [each member's state]}: the boosters' files are named by the writer (`stacker.fit`)."""
        return {"repeats": [m.state() for m in self.members_]}

    def booster_text(self) -> None:
        """None: each member's booster is saved on its own (`booster_texts`)."""
        return None

    def booster_texts(self) -> list[str | None]:
        return [m.booster_text() for m in self.members_]
