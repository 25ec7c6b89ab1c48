"""The OOF-vs-test leak check (stacker.leak) on real scikit-learn models with leaks built in.

Digits, a quarter held out as test, 5 folds; each family's fold models predict their
held-out fold and the test set, as predict-oof does. A leak replaces one model's
tables with those of the same family fitted on every train row: all of them ("all
rows", its K fold tables then one table), only its OOF rows ("oof only": the test
tables stay honest fold models', which only the statistics can tell), or fold 0's.
"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import load_digits
from sklearn.ensemble import ExtraTreesClassifier, HistGradientBoostingClassifier, RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, train_test_split
from sklearn.neighbors import KNeighborsClassifier

from oof import PredictionTable, RunPaths, folds_from_table, write_folds, write_table
from stacker import StackConfig, fit_stack
from stacker.leak import Z_FLAG, LeakInputs, declared_leaks, leak_report

K = 5
FAMILIES = {
    "logreg": lambda: LogisticRegression(max_iter=300),
    "rf": lambda: RandomForestClassifier(50, random_state=0, n_jobs=1),
    "et": lambda: ExtraTreesClassifier(50, random_state=0, n_jobs=1),
    "knn": lambda: KNeighborsClassifier(10),
    "hgb": lambda: HistGradientBoostingClassifier(max_iter=30, random_state=0),
}


@pytest.fixture(scope="module")
def digits_sets():
    X, y = load_digits(return_X_y=True)
    X = X / 16.0
    Xtr, Xte, ytr, _ = train_test_split(X, y, test_size=0.25, random_state=0, stratify=y)
    fold = np.empty(len(ytr), dtype=int)
    for f, (_, valid) in enumerate(StratifiedKFold(K, shuffle=True, random_state=0).split(Xtr, ytr)):
        fold[valid] = f
    models = {}
    for name, make in FAMILIES.items():
        oof, tests = np.zeros((len(ytr), 10)), []
        for f in range(K):
            model = make().fit(Xtr[fold != f], ytr[fold != f])
            oof[fold == f] = model.predict_proba(Xtr[fold == f])
            tests.append(model.predict_proba(Xte))
        full = make().fit(Xtr, ytr)
        models[name] = {"oof": oof, "tests": np.array(tests), "leak_oof": full.predict_proba(Xtr),
                        "leak_test": full.predict_proba(Xte)}
    return ytr, fold, models


def leak_inputs(sets, names, leak=None, who=None, per_fold=True) -> LeakInputs:
    y, fold, models = sets
    oof, tests = [], []
    for name in names:
        t = models[name]
        o, f = t["oof"].copy(), t["tests"].copy()
        if name == who and leak in ("all rows", "smoothed"):
            o, f = t["leak_oof"].copy(), np.stack([t["leak_test"]] * K)
        if name == who and leak == "oof only":
            o = t["leak_oof"].copy()
        if name == who and leak == "one fold":
            o[fold == 0], f[0] = t["leak_oof"][fold == 0], t["leak_test"]
        if name == who and leak == "smoothed":  # label smoothing 0.1 caps every probability at 0.91
            o, f = 0.9 * o + 0.01, 0.9 * f + 0.01
        oof.append(o)
        tests.append(f)
    oof, tests = np.stack(oof, axis=1), np.stack(tests, axis=2)
    return LeakInputs(y, fold, oof, tests.mean(axis=0), tests if per_fold else None, list(names))


@pytest.mark.parametrize("per_fold", [True, False])
def test_no_honest_model_is_flagged(digits_sets, per_fold):
    report = leak_report(leak_inputs(digits_sets, list(FAMILIES), per_fold=per_fold))
    assert not [m for m, r in report.items() if r["flagged"]], report
    assert all(r["consistency"] < Z_FLAG for r in report.values())


@pytest.mark.parametrize("who", ["logreg", "hgb", "et"])
def test_a_lone_honest_model_is_not_flagged(digits_sets, who):
    assert not leak_report(leak_inputs(digits_sets, [who]))[who]["flagged"]


@pytest.mark.parametrize("leak, who", [
    ("oof only", "rf"), ("oof only", "et"), ("oof only", "hgb"),
    ("one fold", "rf"), ("one fold", "et"), ("one fold", "hgb"),
    ("smoothed", "et"),
])
def test_leaks_are_flagged_with_a_reason_and_only_them(digits_sets, leak, who):
    report = leak_report(leak_inputs(digits_sets, list(FAMILIES), leak, who))
    assert report[who]["flagged"] and report[who]["consistency"] >= Z_FLAG
    assert "OOF" in report[who]["reason"] and len(report[who]["reason"].splitlines()) == 1
    if leak == "one fold":
        assert report[who]["reason"].startswith("fold 0's OOF rows")
    assert not [m for m, r in report.items() if r["flagged"] and m != who]


@pytest.mark.parametrize("who", ["rf", "et"])
def test_one_leaked_fold_is_found_from_the_labels_without_fold_tables(digits_sets, who):
    """Right-ness per fold needs no test table: a mean test table (other tools) is enough."""
    report = leak_report(leak_inputs(digits_sets, list(FAMILIES), "one fold", who, per_fold=False))
    assert report[who]["flagged"] and report[who]["z"]["fold_right"] >= Z_FLAG
    assert report[who]["reason"].startswith("fold 0's OOF rows give the true class")
    assert not [m for m, r in report.items() if r["flagged"] and m != who]


@pytest.mark.parametrize("who", list(FAMILIES))
def test_a_model_fitted_on_every_row_is_flagged_by_its_identical_fold_tables(digits_sets, who):
    """Even a low-capacity model whose leak barely changes its OOF rows (logistic regression, k-NN)."""
    for leak in ("all rows", "smoothed"):
        report = leak_report(leak_inputs(digits_sets, list(FAMILIES), leak, who))
        assert report[who]["flagged"] and report[who]["identical_folds"], (leak, report[who])
        assert not [m for m, r in report.items() if r["flagged"] and m != who]


def test_a_lone_leaked_model_is_reported_not_flagged(digits_sets):
    """Against its own error alone, a harder test set could look like a leak: the z is shown, nothing is excluded."""
    report = leak_report(leak_inputs(digits_sets, ["hgb"], "oof only", "hgb"))["hgb"]
    assert report["consistency"] >= Z_FLAG and not report["flagged"]
    # ... but identical fold tables are a fact, not a statistic: flagged alone too
    assert leak_report(leak_inputs(digits_sets, ["hgb"], "all rows", "hgb"))["hgb"]["flagged"]


def test_declared_leaks_read_the_tables_metadata():
    assert declared_leaks({"a": {"keep": "best"}, "b": {"keep": "last"}, "c": {}}).keys() == {"a"}


def test_two_honest_models_are_not_flagged(digits_sets):
    for pair in (["rf", "hgb"], ["logreg", "knn"]):
        for per_fold in (True, False):
            report = leak_report(leak_inputs(digits_sets, pair, per_fold=per_fold))
            assert not any(r["flagged"] for r in report.values())


def write_leak_run(root, sets, data: LeakInputs, metas: dict | None = None) -> RunPaths:
    """The check's inputs as a run's tables (OOF, mean test, per-fold test), with optional OOF metadata."""
    y, fold, _ = sets
    ids = np.array([f"r{i:04d}" for i in range(len(y))])
    classes = [str(c) for c in range(10)]
    folds = folds_from_table(pd.DataFrame({"id": ids, "label": [classes[c] for c in y], "fold": fold}), "digits",
                             classes)
    paths = RunPaths(root)
    write_folds(paths.folds, folds)
    test_ids = np.array([f"t{i:03d}" for i in range(data.test.shape[0])])
    for m, name in enumerate(data.models):
        meta = (metas or {}).get(name, {})
        write_table(paths.oof(name), PredictionTable(ids, data.oof[:, m], folds.classes, fold, meta))
        write_table(paths.test(name), PredictionTable(test_ids, data.test[:, m], folds.classes))
        for k in range(K):
            write_table(paths.test_fold(name, k), PredictionTable(test_ids, data.test_folds[k, :, m], folds.classes))
    return paths


def test_fit_stack_excludes_the_leak_and_explains_it(digits_sets, tmp_path):
    """The issue's case: a random forest fitted on every row scores OOF 1.0 and would be best_single."""
    y = digits_sets[0]
    data = leak_inputs(digits_sets, list(FAMILIES), "all rows", "rf")
    paths = write_leak_run(tmp_path, digits_sets, data)
    assert (data.oof[:, 1].argmax(axis=1) == y).mean() == 1.0  # the leaked forest looks perfect
    lines = []
    decision = fit_stack(tmp_path, StackConfig(n_bootstrap=200, nested=False), log=lines.append)
    assert list(decision["excluded"]) == ["rf"] and "OOF" in decision["excluded"]["rf"]
    assert decision["models"]["rf"]["status"] == "excluded" and decision["models"]["rf"]["consistency"] >= Z_FLAG
    assert all(decision["models"][m]["consistency"] < Z_FLAG for m in FAMILIES if m != "rf")
    assert "rf" not in decision["used"]
    assert any("model 'rf' looks leaked" in line for line in lines)
    saved = json.loads(paths.decision.read_text())
    assert saved["models"]["rf"]["reason"] == decision["excluded"]["rf"]
    assert "excluded as suspicious: rf:" in paths.stack_report.read_text()


def test_fit_stack_excludes_a_model_whose_tables_say_keep_best(digits_sets, tmp_path):
    """Epochs picked on the OOF rows: too mild for the statistics, known from the tables; --allow-suspicious keeps."""
    data = leak_inputs(digits_sets, list(FAMILIES))
    write_leak_run(tmp_path, digits_sets, data, {"hgb": {"keep": "best"}, "rf": {"keep": "last"}})
    decision = fit_stack(tmp_path, StackConfig(n_bootstrap=200, nested=False), log=None)
    assert list(decision["excluded"]) == ["hgb"] and "keep: best" in decision["excluded"]["hgb"]
    decision = fit_stack(tmp_path, StackConfig(n_bootstrap=200, nested=False, allow_suspicious=True), log=None,
                         force=True)
    assert not decision["excluded"] and "hgb" in decision["used"]
    assert decision["models"]["hgb"]["status"] == "suspicious, kept"


def test_a_run_without_a_test_set_still_stacks(tmp_path):
    """predict-oof writes header-only test tables when a dataset has no test images: all empty is fine."""
    from stack_fixtures import fast_config, make_run_folds, specialists, write_run

    rng = np.random.default_rng(0)
    folds = make_run_folds(300, 3, seed=0)
    oof = {m: specialists(folds.y, rng, [0, 1, 2], n_classes=3) for m in ("a", "b", "c")}
    root = write_run(tmp_path / "run", folds, oof, {m: np.zeros((0, 3)) for m in oof}, [])
    decision = fit_stack(root, fast_config(), log=None)
    assert decision["used"] == ["a", "b", "c"] and not decision["excluded"]


def test_saturated_or_tiny_test_sets_are_not_taken_for_identical_fold_tables():
    """Honest fold models agree on rows where all are sure, and one test row proves nothing."""
    rng = np.random.default_rng(0)
    y, fold = rng.integers(0, 3, 300), np.arange(300) % 5
    oof = np.stack([np.eye(3)[y] * 0.8 + 0.2 / 3] * 3, axis=1)  # (N, M, C), three alike honest models
    for t in (1, 40):
        sure = np.full((5, t, 3, 3), 1e-8)
        sure[..., 0] = 1 - 2e-8  # every fold model certain of class 0 on every test row
        report = leak_report(LeakInputs(y, fold, oof, sure.mean(axis=0), sure, ["a", "b", "c"]))
        assert not any(r["identical_folds"] or r["flagged"] for r in report.values()), (t, report)
