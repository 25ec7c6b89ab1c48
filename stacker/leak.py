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
- accuracy excess (with other models): OOF accuracy minus the model's agreement
  on test with the other models' consensus, the best label-free stand-in for its
  test accuracy. A model far better than the rest on OOF while not standing out
  on test is suspicious; a genuinely stronger model stands out on both.

Neither gap is zero for an honest model: test rows may differ from train rows,
and a mean over K fold models (all a foreign tool may give) is smoother than one
fold model. Those effects hit every model alike, so each model is compared with
the others: its gap's robust z-score against the other models' gaps (median and
MAD), with the scale never below the gap's own sampling error (its standard
error over rows), so that a few near-identical models cannot make noise look significant.
With fewer than three models there is no spread to compare with; then, given
per-fold test tables, the gap is tested against its own sampling error alone.
The flag threshold is a z of 4: far outside the honest models' spread.
Measured false-positive and detection rates are in the README (bench/leak_bench.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CLIP = 1e-6
Z_FLAG = 4.0  # a leak is flagged beyond 4 robust standard deviations of the honest models' spread
MIN_MODELS_FOR_SPREAD = 3  # median and MAD of at least two other models


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
    """

    y: np.ndarray
    fold: np.ndarray
    oof: np.ndarray
    test: np.ndarray
    test_folds: np.ndarray | None
    models: list[str]


def sharpness(p: np.ndarray) -> np.ndarray:
    """(..., C) -> (...) log-odds of the top class probability."""
    top = np.clip(p.max(axis=-1), CLIP, 1 - CLIP)
    return np.log(top / (1 - top))


def leak_report(data: LeakInputs) -> dict[str, dict]:
    """{model: {"consistency": z, "flagged": bool, "reason": str, ...}} for every model.

    `consistency` is the largest of the model's z-scores (sharpness gap, accuracy
    excess, worst fold); below about 2 is ordinary, `Z_FLAG` and above is flagged.
    """
    tests = data.test_folds if data.test_folds is not None else data.test[None]
    sums = (data.oof.sum(axis=1), tests.sum(axis=2))  # (N, C), (K or 1, T, C): the others' consensus by subtraction
    gaps = [_model_gaps(data, m, sums) for m in range(len(data.models))]
    report = {}
    for m, name in enumerate(data.models):
        report[name] = _judge(gaps, m)
    return report


def _model_gaps(data: LeakInputs, m: int, sums: tuple[np.ndarray, np.ndarray]) -> dict:
    """One model's statistics, each as (value, standard error)."""
    s_oof = sharpness(data.oof[:, m])  # (N,)
    folds = np.unique(data.fold)
    if data.test_folds is not None:
        s_test = [sharpness(data.test_folds[k, :, m]) for k in range(len(folds))]  # K x (T,)
    else:
        s_test = [sharpness(data.test[:, m])] * len(folds)
    fold_gaps = [_mean_gap(s_oof[data.fold == f], s_test[i]) for i, f in enumerate(folds)]
    out = {"sharpness": _mean_gap(s_oof, np.concatenate(s_test)), "folds": fold_gaps,
           "own_reference": data.test_folds is not None}
    if data.oof.shape[1] > 1:
        out["agreement"] = _agreement_gap(data, m, sums)
    return out


def _mean_gap(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(mean(a) - mean(b), its standard error): the rows of each side are independent draws."""
    if len(a) < 2 or len(b) < 2:
        return 0.0, np.inf
    se = np.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
    return float(a.mean() - b.mean()), float(se + 1e-12)


def _agreement_gap(data: LeakInputs, m: int, sums: tuple[np.ndarray, np.ndarray]) -> tuple[float, float]:
    """Agreement with the other models' consensus, OOF minus test, with its standard error.

    Accuracy and agreement differ by an offset that belongs to the model and its
    company (how its errors line up with theirs), the same on OOF and test rows
    for an honest model; so what is left, agreement on OOF minus agreement on
    test, is zero up to noise. A model that saw its OOF rows agrees with the
    consensus wherever the consensus is right, more than on test.
    """
    on_oof = (sums[0] - data.oof[:, m]).argmax(axis=1)  # (N,) the other models' consensus
    agree_oof = (data.oof[:, m].argmax(axis=1) == on_oof).astype(float)
    # Like for like: fold model k against the others' fold models k, as on the OOF rows; only a
    # mean test table gives the others' mean (which agrees a little more, for honest models too).
    tests = data.test_folds if data.test_folds is not None else data.test[None]  # (K or 1, T, M, C)
    test_sums = sums[1]  # (K or 1, T, C)
    agree_test = np.concatenate([(t[:, m].argmax(axis=1) == (total - t[:, m]).argmax(axis=1)).astype(float)
                                 for t, total in zip(tests, test_sums)])
    return _mean_gap(agree_oof, agree_test)


def _judge(gaps: list[dict], m: int) -> dict:
    """The model's z-scores against the others (or its own error), the flag and its reason."""
    mine = gaps[m]
    others = [g for i, g in enumerate(gaps) if i != m]
    z = {}
    if mine["own_reference"]:
        z["sharpness"] = _z(mine["sharpness"], [g["sharpness"] for g in others], True)
    if "agreement" in mine:
        # two-sided: a leaked model drops the errors it shares with the others, which moves its
        # agreement with them up or down depending on how often the consensus is right
        z["agreement"] = abs(_z(mine["agreement"], [g["agreement"] for g in others], False))
    fold_z = _fold_z(mine["folds"]) if mine["own_reference"] else []
    z["fold"] = max(fold_z) if fold_z else float("nan")
    finite = {k: v for k, v in z.items() if np.isfinite(v)}
    worst = max(finite, key=finite.get) if finite else None
    score = finite[worst] if worst else float("nan")
    # Against its own error alone (fewer than 3 models) a z is reported, never flagged: a test set a
    # little harder than the train rows moves an honest lone model's gap as far as a small leak would.
    by_spread = len(others) + 1 >= MIN_MODELS_FOR_SPREAD or worst == "fold"
    flagged = bool(worst) and score >= Z_FLAG and by_spread
    return {"consistency": score, "z": z, "flagged": flagged,
            "sharpness_gap": mine["sharpness"][0],
            "agreement_gap": mine["agreement"][0] if "agreement" in mine else None,
            "reason": _reason(worst, score, mine, fold_z) if flagged else ""}


def _z(mine: tuple[float, float], others: list[tuple[float, float]], own_reference: bool) -> float:
    """Robust z of a gap against the other models' gaps; against its own error when they are too few."""
    value, se = mine
    if len(others) + 1 >= MIN_MODELS_FOR_SPREAD:
        values = np.array([v for v, _ in others])
        centre = float(np.median(values))
        spread = 1.4826 * float(np.median(np.abs(values - centre)))
        return (value - centre) / max(spread, se)
    if own_reference:  # one fold model against itself: honest gaps are zero up to noise
        return value / se
    return float("nan")  # a mean test table alone has no honest level to compare with


def _fold_z(folds: list[tuple[float, float]]) -> list[float]:
    """Each fold's sharpness gap against the model's other folds (one leaked fold stands out)."""
    if len(folds) < MIN_MODELS_FOR_SPREAD:
        return []
    return [_z(f, folds[:i] + folds[i + 1:], False) for i, f in enumerate(folds)]


def _reason(worst: str, score: float, mine: dict, fold_z: list[float]) -> str:
    if worst == "sharpness":
        return (f"its OOF rows are sharper than its test rows by {mine['sharpness'][0]:+.2f} log-odds, "
                f"{score:.1f} robust SDs beyond the other models: trained on its own OOF rows?")
    if worst == "agreement":
        return (f"its agreement with the other models' consensus differs between OOF and test by "
                f"{mine['agreement'][0]:+.3f}, {score:.1f} robust SDs beyond the others: its OOF errors are not "
                "those of a model that never saw the rows")
    k = int(np.argmax(fold_z))
    return (f"fold {k}'s OOF rows are sharper than fold {k}'s test predictions by {mine['folds'][k][0]:+.2f} "
            f"log-odds, {score:.1f} robust SDs beyond its other folds: that fold leaked?")
