"""The leak check: out-of-fold rows that a model saw in training, found by comparing OOF with test.

A model's OOF rows and its test rows come from the same kind of model on data it
never saw: fold k's OOF rows and fold k's test table (`test_fold<k>`) are both
predictions of fold model k on unseen images. So whatever a model's OOF rows look
like, its test rows must look alike, up to sampling noise. A leak breaks that: a
model that saw its OOF rows is sharper and more often right on them than on
test. Two statistics carry that, per model and per fold:

- sharpness gap: mean log-odds of the top class, OOF minus test. Log-odds, not
  probability, because leaks show at the top end (0.97 -> 0.999 is +3.5 in log
  odds, +0.03 in probability); clipped at 1e-6 so one row moves it at most 13.8.
  Compared across models as a t-statistic (gap over its standard error), so a
  model whose probabilities are capped (label smoothing) counts as much as a
  booster's. Only against per-fold test tables: a mean over K fold models is
  smoother than one, and more so for some families than others.
- agreement gap (with other models): agreement with the other models'
  consensus, OOF minus test. A model far better than the rest on OOF while not
  standing out on test is suspicious; a genuinely stronger model stands out on both.

Two more find leaks of part of the rows or of every row that barely change sharpness:

- right-ness per fold: how much more probability the model gives the true class
  than the other models' mean does, per fold. A fold the model saw stands out
  from its other folds (labels are only on the OOF side, so this one compares
  folds, not OOF with test). It needs no test table.
- identical fold tables: K fold models trained on different rows never predict
  the test set identically; K identical tables are one model's, and a model that
  predicted the test set after training on every row also saw its OOF rows (a
  fold loop that fits on all rows, a notebook reusing its final model).

Neither gap is zero for an honest model: test rows may differ from train rows,
and a mean over K fold models (all a foreign tool may give) is smoother than one
fold model. Those effects hit every model alike, so each model is compared with
the others: its gap's robust z-score against the other models' gaps (median and
MAD), with the scale never below the gap's own sampling error (its standard
error over rows), so that a few near-identical models cannot make noise look significant.
With fewer than three models there is no spread to compare with; then, given
per-fold test tables, the gap is tested against its own sampling error alone.
The flag threshold is a z of 4: far outside the honest models' spread.

A leak whose effect on the OOF rows is inside the honest folds' noise cannot be told
from noise by any check (bench/leak_bench.py measures each leak's size and what it
costs the stack). A leak that is known rather than measured is declared by the
tables: `declared_leaks` reads their metadata (`keep: best` picked each fold's epoch
on that fold's own OOF rows).
Measured false-positive and detection rates are in docs/meta.md and docs/leak.md (bench/leak_bench.py).

Repeated folds (`folds.repeats` R > 1): the check runs once per repeat, on that repeat's
OOF rows, folds and per-fold test tables (`StackGuard._check_repeat_leaks`), and a model
flagged in any repeat is flagged, naming the repeat. Not on repeat 0 alone: each repeat
has fold models of its own, a leak in one repeat's (a job resumed on the wrong rows)
reaches the meta level through that repeat's fits just as well, and repeat 0 cannot show
it. It stays cheap: no model is fitted here, only numpy over the rows, small beside that
repeat's meta-level fits (15 per candidate); its cost at the bench's size is in docs/speed.md. R checks at a z of 4 raise the
false-positive rate at most R-fold (the repeats share models and rows, so less).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

CLIP = 1e-6
Z_FLAG = 4.0  # a leak is flagged beyond 4 robust standard deviations of the honest models' spread
MIN_MODELS_FOR_SPREAD = 3  # median and MAD of at least two other models
# Fold models trained on different rows differ by far more than float32 storage rounding (~6e-8).
SAME_TABLE_ATOL = 1e-6
MIN_OPEN_ROWS = 10  # test rows on which some fold model is unsure: fewer cannot show K models apart


@dataclass
class LeakInputs:
    """Everything the check reads.

    Attributes:
        y: (N,) OOF labels.
        fold: (N,) fold of each OOF row.
        oof: (N, M, C) OOF probabilities.
        test: (T, M, C) test probabilities, the mean over fold models.
        test_folds: (K, T, M, C) each fold model's test probabilities, or None.
        models: the M model names.
        groups: (N,) group of each OOF row, or None (independent rows): standard errors over OOF
            rows count groups (`design_effect`), since copies of one photo are scored alike.
    """

    y: np.ndarray
    fold: np.ndarray
    oof: np.ndarray
    test: np.ndarray
    test_folds: np.ndarray | None
    models: list[str]
    groups: np.ndarray | None = None


class Gap(NamedTuple):
    """A statistic of a model, OOF minus test (or against the other models), and its standard error."""

    value: float
    se: float


@dataclass(frozen=True)
class ModelGaps:
    """One model's statistics (`_model_gaps`).

    Attributes:
        sharpness: mean top-class log-odds, OOF minus test.
        folds: per fold, its OOF rows' sharpness minus that fold's test predictions'.
        own_reference: whether the test side is each fold model's own table (per-fold tables), not their mean.
        identical: whether the K fold test tables are one table (`_identical_folds`).
        agreement, support: agreement with the other models' consensus, OOF minus test (`_agreement_gap`);
            None for a lone model.
        right: per fold, the true class's probability over the other models' (`_fold_rightness`); None for a
            lone model.
    """

    sharpness: Gap
    folds: list[Gap]
    own_reference: bool
    identical: bool
    agreement: Gap | None = None
    support: Gap | None = None
    right: list[Gap] | None = None


class ModelSums(NamedTuple):
    """Probabilities summed over the models: the other models' consensus by subtraction."""

    oof: np.ndarray  # (N, C)
    tests: np.ndarray  # (K or 1, T, C): per fold model's test table, or the mean test table


class LeakCheck(NamedTuple):
    """The leak check of one fold assignment's OOF tables, or of every repeat's merged
    (`stacker.repeats.merge_leak_checks`)."""

    suspicious: dict[str, str]  # {model: reason} of the models that look leaked
    consistency: dict[str, dict]  # {model: its `leak_report` record}; empty without test tables
    split: object | None  # a `stacker.split_leak.SplitLeak` (whose module imports this one); None without test tables


def sharpness(p: np.ndarray) -> np.ndarray:
    """(..., C) -> (...) log-odds of the top class probability."""
    top = np.clip(row_max(p), CLIP, 1 - CLIP)
    return np.log(top / (1 - top))


# numpy reduces a short, strided last axis (C = 10 of a model's (N, M, C) slice) one row at a time:
# 21 ms per model at 100,000 rows. One vectorised pass per class takes 7 ms, with the same result.
def row_max(p: np.ndarray) -> np.ndarray:
    """(..., C) -> (...) the largest value of each row, as p.max(axis=-1)."""
    top = p[..., 0].copy()
    for c in range(1, p.shape[-1]):
        np.maximum(top, p[..., c], out=top)
    return top


def declared_leaks(metas: dict[str, dict]) -> dict[str, str]:
    """{model: reason} for tables whose metadata says their OOF rows were used to train or tune them.

    One such setting exists: `keep: best` picks each fold model's epoch by its
    score on that fold's validation rows, which are its OOF rows, so they are
    mildly optimistic (the statistics above cannot see a leak that small).
    """
    return {m: ("its epochs were picked on their own OOF rows (train.keep: best), so its OOF scores are "
                "optimistic; retrain it with keep: last")
            for m, meta in metas.items() if (meta or {}).get("keep") == "best"}


def leak_report(data: LeakInputs) -> dict[str, dict]:
    """{model: {"consistency": z, "flagged": bool, "reason": str, ...}} for every model.

    `consistency` is the largest of the model's z-scores (sharpness gap, accuracy
    excess, worst fold); below about 2 is ordinary, `Z_FLAG` and above is flagged.
    """
    tests = data.test_folds if data.test_folds is not None else data.test[None]
    sums = ModelSums(data.oof.sum(axis=1), tests.sum(axis=2))
    gaps = [_model_gaps(data, m, sums) for m in range(len(data.models))]
    report = {}
    for m, name in enumerate(data.models):
        report[name] = _judge(gaps, m)
    return report


def _model_gaps(data: LeakInputs, m: int, sums: ModelSums) -> ModelGaps:
    """One model's statistics."""
    s_oof = sharpness(data.oof[:, m])  # (N,)
    folds = np.unique(data.fold)
    if data.test_folds is not None:
        s_test = [sharpness(data.test_folds[k, :, m]) for k in range(len(folds))]  # K x (T,)
    else:
        s_test = [sharpness(data.test[:, m])] * len(folds)
    fold_gaps = [_mean_gap(s_oof[data.fold == f], s_test[i], _subset(data.groups, data.fold == f))
                 for i, f in enumerate(folds)]
    sharp = _mean_gap(s_oof, np.concatenate(s_test), data.groups)
    own, identical = data.test_folds is not None, _identical_folds(data, m)
    if data.oof.shape[1] == 1:
        return ModelGaps(sharp, fold_gaps, own, identical)
    agreement, support = _agreement_gap(data, m, sums)
    return ModelGaps(sharp, fold_gaps, own, identical, agreement, support, _fold_rightness(data, m, sums.oof, folds))


def _identical_folds(data: LeakInputs, m: int) -> bool:
    """Whether the model's K fold test tables are one table, on rows where fold models could differ.

    Rows on which every fold model is sure (top probability past 1 - 1e-3: float32 softmax
    saturates) say nothing: honest fold models agree there too. At least MIN_OPEN_ROWS rows
    below that must exist, and match, for the tables to count as one model's.
    """
    tests = data.test_folds
    if tests is None or len(tests) < 2 or tests.shape[1] == 0:
        return False
    t = tests[:, :, m]  # (K, T, C)
    open_rows = (t.max(axis=2) < 1 - 1e-3).any(axis=0)
    if open_rows.sum() < MIN_OPEN_ROWS:
        return False
    return bool(np.abs(t[1:, open_rows] - t[0, open_rows]).max() <= SAME_TABLE_ATOL)


def _fold_rightness(data: LeakInputs, m: int, oof_sum: np.ndarray, folds: np.ndarray) -> list[Gap]:
    """Per fold, the mean of p_model(true class) - p_others(true class), with a pooled standard error.

    Pairing with the other models on the same rows takes out how hard each fold is.
    Probabilities, not log-loss: bounded, so one row cannot carry a fold. The
    standard error uses the spread of every OOF row, since a fold the model saw
    has little spread of its own (all right, all sure).
    """
    rows = np.arange(len(data.y))
    others = (oof_sum[rows, data.y] - data.oof[rows, m, data.y]) / (data.oof.shape[1] - 1)
    diff = data.oof[rows, m, data.y] - others
    sd = diff.std(ddof=1) * np.sqrt(design_effect(diff, data.groups)) if len(diff) > 1 else np.inf
    out = []
    for f in folds:
        d = diff[data.fold == f]
        out.append(Gap(float(d.mean()), float(sd / np.sqrt(len(d)) + 1e-12)) if len(d) else Gap(0.0, np.inf))
    return out


def _mean_gap(a: np.ndarray, b: np.ndarray, groups_a: np.ndarray | None = None) -> Gap:
    """mean(a) - mean(b) and its standard error: the rows of each side are independent draws, or the
    groups of a's rows are (`groups_a`, the OOF side's groups)."""
    if len(a) < 2 or len(b) < 2:
        return Gap(0.0, np.inf)
    se = np.sqrt(a.var(ddof=1) / len(a) * design_effect(a, groups_a) + b.var(ddof=1) / len(b))
    return Gap(float(a.mean() - b.mean()), float(se + 1e-12))


def design_effect(values: np.ndarray, groups: np.ndarray | None) -> float:
    """How much grouping inflates the variance of the mean of `values` over independent rows: >= 1, 1 without groups.

    The cluster-robust variance (the squared sums of each group's deviations) over the
    rows' own (the sum of squared deviations). Copies of one photo move together, so
    a mean over N rows in G groups of copies is about as uncertain as one over G rows.
    """
    if groups is None or len(values) < 2:
        return 1.0
    r = values - values.mean()
    row_var = float(r @ r)
    if row_var <= 0:
        return 1.0
    _, group_of = np.unique(groups, return_inverse=True)
    sums = np.bincount(group_of.ravel(), weights=r)
    return max(1.0, float(sums @ sums) / row_var)


def _subset(groups: np.ndarray | None, rows: np.ndarray) -> np.ndarray | None:
    return None if groups is None else groups[rows]


def _agreement_gap(data: LeakInputs, m: int, sums: ModelSums) -> tuple[Gap, Gap]:
    """(agreement, support): agreement with the other models' consensus, OOF minus test.

    Two measures of it: "agreement", whether the model's top class is the
    consensus's; "support", the probability the model gives the consensus's class
    (finer: it moves before the top class does, as a low-capacity leak does).
    Accuracy and agreement differ by an offset that belongs to the model and its
    company (how its errors line up with theirs), the same on OOF and test rows
    for an honest model; so what is left, OOF minus test, is zero up to noise. A
    model that saw its OOF rows agrees with the consensus wherever the consensus
    is right (and leaves it where it is wrong) more than on test.
    """
    rows = np.arange(len(data.y))
    on_oof = (sums.oof - data.oof[:, m]).argmax(axis=1)  # (N,) the other models' consensus
    agree_oof = (data.oof[:, m].argmax(axis=1) == on_oof).astype(float)
    support_oof = data.oof[rows, m, on_oof]
    # Like for like: fold model k against the others' fold models k, as on the OOF rows; only a
    # mean test table gives the others' mean (which agrees a little more, for honest models too).
    tests = data.test_folds if data.test_folds is not None else data.test[None]  # (K or 1, T, M, C)
    agree_test, support_test = [], []
    for t, total in zip(tests, sums.tests):
        consensus = (total - t[:, m]).argmax(axis=1)
        agree_test.append((t[:, m].argmax(axis=1) == consensus).astype(float))
        support_test.append(t[np.arange(len(consensus)), m, consensus])
    return (_mean_gap(agree_oof, np.concatenate(agree_test), data.groups),
            _mean_gap(support_oof, np.concatenate(support_test), data.groups))


def _judge(gaps: list[ModelGaps], m: int) -> dict:
    """The model's z-scores against the others (or its own error), the flag and its reason."""
    mine = gaps[m]
    others = [g for i, g in enumerate(gaps) if i != m]
    z = {}
    if mine.own_reference:
        # In units of each model's own standard error: models' log-odds spread differs ten-fold (a booster's
        # reach 13.8, a smoothed model's stop at 2.3), so raw gaps of different models are not comparable.
        z["sharpness"] = _z(_standardised(mine.sharpness), [_standardised(g.sharpness) for g in others], True)
    if mine.agreement is not None:
        # two-sided: a leaked model drops the errors it shares with the others, which moves its
        # agreement with them up or down depending on how often the consensus is right
        smoothed = not mine.own_reference
        z["agreement"] = abs(_z(mine.agreement, [g.agreement for g in others], False, smoothed=smoothed))
        z["support"] = abs(_z(mine.support, [g.support for g in others], False, smoothed=smoothed))
    fold_z = {"fold": _fold_z(mine.folds) if mine.own_reference else [],
              "fold_right": _fold_z(mine.right) if mine.right is not None else []}
    for key, values in fold_z.items():
        z[key] = max(values) if values else float("nan")
    finite = {k: v for k, v in z.items() if np.isfinite(v)}
    worst = max(finite, key=finite.get) if finite else None
    score = finite[worst] if worst else float("nan")
    # Against its own error alone (fewer than 3 models) a z is reported, never flagged: a test set a
    # little harder than the train rows moves an honest lone model's gap as far as a small leak would.
    by_spread = len(others) + 1 >= MIN_MODELS_FOR_SPREAD or worst in fold_z
    flagged = bool(worst) and score >= Z_FLAG and by_spread
    reason = _reason(worst, score, mine, fold_z.get(worst, [])) if flagged else ""
    if mine.identical and not flagged:
        flagged, reason = True, ("its fold test tables are all the same table, so one model made them, not one "
                                 "per fold: a model fitted on every row, its OOF rows included?")
    return {"consistency": score, "z": z, "flagged": flagged, "identical_folds": mine.identical,
            "sharpness_gap": mine.sharpness.value,
            "agreement_gap": mine.agreement.value if mine.agreement is not None else None,
            "support_gap": mine.support.value if mine.support is not None else None,
            "reason": reason}


def _standardised(gap: Gap) -> Gap:
    """A gap as a t-statistic (gap / its standard error), whose own error is 1."""
    return Gap(gap.value / gap.se if np.isfinite(gap.se) else 0.0, 1.0)


def _z(mine: Gap, others: list[Gap], own_reference: bool, smoothed: bool = False) -> float:
    """Robust z of a gap against the other models' gaps; against its own error when they are too few.

    smoothed: the test side is a mean over fold models. Averaging moves every model's gap by an
    amount of its family (a mean of 1-NN fold models agrees with the others unlike a mean of
    forests), of the order of the others' median gap, so the spread is never below half of it.
    """
    if len(others) + 1 >= MIN_MODELS_FOR_SPREAD:
        values = np.array([g.value for g in others])
        centre = float(np.median(values))
        spread = 1.4826 * float(np.median(np.abs(values - centre)))
        if smoothed:
            spread = max(spread, abs(centre) / 2)
        return (mine.value - centre) / max(spread, mine.se)
    if own_reference:  # one fold model against itself: honest gaps are zero up to noise
        return mine.value / mine.se
    return float("nan")  # a mean test table alone has no honest level to compare with


def _fold_z(folds: list[Gap]) -> list[float]:
    """Each fold's statistic against the model's other folds (one leaked fold stands out)."""
    if len(folds) < MIN_MODELS_FOR_SPREAD:
        return []
    return [_z(f, folds[:i] + folds[i + 1:], False) for i, f in enumerate(folds)]


def _reason(worst: str, score: float, mine: ModelGaps, fold_z: list[float]) -> str:
    if worst == "sharpness":
        return (f"its OOF rows are sharper than its test rows by {mine.sharpness.value:+.2f} log-odds, "
                f"{score:.1f} robust SDs beyond the other models: trained on its own OOF rows?")
    if worst == "agreement":
        return (f"its agreement with the other models' consensus differs between OOF and test by "
                f"{mine.agreement.value:+.3f}, {score:.1f} robust SDs beyond the others: its OOF errors are not "
                "those of a model that never saw the rows")
    if worst == "support":
        return (f"the probability it gives the other models' consensus class differs between OOF and test by "
                f"{mine.support.value:+.3f}, {score:.1f} robust SDs beyond the others: its OOF rows are not "
                "those of a model that never saw them")
    k = int(np.argmax(fold_z))
    if worst == "fold_right":
        return (f"fold {k}'s OOF rows give the true class {mine.right[k].value:+.3f} more probability than the other "
                f"models do, {score:.1f} robust SDs beyond its other folds: that fold leaked?")
    return (f"fold {k}'s OOF rows are sharper than fold {k}'s test predictions by {mine.folds[k].value:+.2f} "
            f"log-odds, {score:.1f} robust SDs beyond its other folds: that fold leaked?")
