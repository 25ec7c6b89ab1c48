"""OOF sets with the leaks real Kaggle data has, made with scikit-learn models on synthetic rows.

Each scenario returns the same dict: the train labels `y`, the base models' `fold` and the
rows' true `source` (the photo a row is a copy of, or the plant it shows), every model's OOF
probabilities (N, M, C), its fold models' test probabilities (K, T, M, C) and the test labels,
so a check can be scored against what the test set says.

- duplicates: 6 classes, each source row with 1-3 near-copies (a photo saved two to four times,
  resized or recompressed: the source plus a little noise), 7,181 train rows; the test set has
  no copy of a train row. `folds="random"` ignores the copies (the split leak), `"grouped"` keeps
  each source's copies in one fold (the honest control).
- grouped: several rows per group sharing a group effect (several photos of one plant): not
  near-identical, but correlated; `folds="random"` or `"grouped"`.
- plain: independent rows (no copies, no groups).

Models: logistic regression, naive Bayes, 1-NN, 5-NN, random forest, extra trees; `extra`
adds a memoriser (a 1-NN fitted on every train row, predicting its own rows as OOF, with the
honest fold models' test tables) or a strong model (gradient boosting) among weaker ones.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

CACHE = Path("/tmp/stacker-leak-scenarios")


def rows(kind: str, seed: int = 0, n_train: int = 7181, n_test: int = 2000, classes: int = 6,
         copy_noise: float = 0.02):
    """(X_train, y_train, source, X_test, y_test) of one scenario's rows."""
    from sklearn.datasets import make_classification

    rng = np.random.default_rng([seed, 11])
    if kind == "duplicates":
        n_sources = int(round(n_train / 3.0))
        copies = rng.integers(1, 4, n_sources)  # 1-3 near-copies of each source
        total = int((copies + 1).sum())
        keep = np.ones(total, bool)
        keep[rng.choice(total, max(total - n_train, 0), replace=False)] = False  # trim to n_train rows
        X, y = make_classification(n_sources + n_test, 20, n_informative=8, n_redundant=4, n_classes=classes,
                                   n_clusters_per_class=2, class_sep=1.5, flip_y=0.03, random_state=seed)
        src_X, src_y = X[:n_sources], y[:n_sources]
        source = np.repeat(np.arange(n_sources), copies + 1)
        noise = rng.normal(0, copy_noise, (total, X.shape[1])) * X.std(axis=0)
        Xtr, ytr = src_X[source] + noise, src_y[source]
        return Xtr[keep], ytr[keep], source[keep], X[n_sources:], y[n_sources:]
    if kind == "grouped":
        # train and test rows alike: each group (a plant) has a label and an effect shared by its 2-6 rows;
        # the test set's groups are new ones
        X, y = make_classification(n_train + n_test, 20, n_informative=8, n_redundant=4, n_classes=classes,
                                   n_clusters_per_class=2, class_sep=1.5, flip_y=0.03, random_state=seed)
        pools = {c: np.flatnonzero(y == c) for c in range(classes)}

        def grouped_rows(n: int):
            sizes = rng.integers(2, 7, n)  # more groups than needed, cut at n rows
            group = np.repeat(np.arange(n), sizes)[:n]
            label = rng.integers(0, classes, n)[group]
            shift = rng.normal(0, 0.8, (n, X.shape[1])) * X.std(axis=0)
            base = np.array([rng.choice(pools[c]) for c in label])
            return X[base] + shift[group], label, group

        Xtr, ytr, source = grouped_rows(n_train)
        Xte, yte, _ = grouped_rows(n_test)
        return Xtr, ytr, source, Xte, yte
    X, y = make_classification(n_train + n_test, 20, n_informative=8, n_redundant=4, n_classes=classes,
                               n_clusters_per_class=2, class_sep=1.5, flip_y=0.03, random_state=seed)
    return X[:n_train], y[:n_train], np.arange(n_train), X[n_train:], y[n_train:]


def families(seed: int) -> dict:
    from sklearn.ensemble import ExtraTreesClassifier, HistGradientBoostingClassifier, RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.naive_bayes import GaussianNB
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return {
        "logreg": lambda: make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)),
        "nb": GaussianNB,
        "knn1": lambda: make_pipeline(StandardScaler(), KNeighborsClassifier(1)),
        "knn5": lambda: make_pipeline(StandardScaler(), KNeighborsClassifier(5)),
        "rf": lambda: RandomForestClassifier(100, min_samples_leaf=2, random_state=seed, n_jobs=2),
        "et": lambda: ExtraTreesClassifier(100, min_samples_leaf=2, random_state=seed, n_jobs=2),
        "hgb": lambda: HistGradientBoostingClassifier(max_iter=200, random_state=seed),
    }


def make_folds_for(y, source, how: str, k: int = 5, seed: int = 0) -> np.ndarray:
    """(N,) base-model folds: stratified by label ("random") or keeping each source whole ("grouped")."""
    import pandas as pd

    from oof import make_folds, make_group_folds

    ids = [f"r{i:05d}" for i in range(len(y))]
    if how == "random":
        return make_folds(ids, y, k, seed).fold
    train = pd.DataFrame({"id": ids, "label": [str(v) for v in y], "source": [str(s) for s in source]})
    return make_group_folds(train, "source", k, seed).fold


def scenario(kind: str, folds: str, seed: int = 0, models=("logreg", "nb", "knn1", "knn5", "rf", "et"),
             k: int = 5, copy_noise: float = 0.02) -> dict:
    """A scenario's tables (module docstring), cached under CACHE by its arguments."""
    key = CACHE / f"{kind}-{folds}-{seed}-{'-'.join(models)}-{k}-{copy_noise}.npz"
    if key.is_file():
        z = np.load(key, allow_pickle=False)
        out = {name: z[name] for name in z.files}
        out["models"] = list(models)
        return out
    Xtr, ytr, source, Xte, yte = rows(kind, seed, copy_noise=copy_noise)
    fold = make_folds_for(ytr, source, folds, k, seed)
    make = families(seed)
    C = len(np.unique(ytr))
    oof = np.zeros((len(ytr), len(models), C))
    tests = np.zeros((k, len(yte), len(models), C))
    full_oof = np.zeros_like(oof)
    for m, name in enumerate(models):
        for f in range(k):
            model = make[name]().fit(Xtr[fold != f], ytr[fold != f])
            oof[fold == f, m] = model.predict_proba(Xtr[fold == f])
            tests[f, :, m] = model.predict_proba(Xte)
        full_oof[:, m] = make[name]().fit(Xtr, ytr).predict_proba(Xtr)  # a memoriser's OOF: trained on every row
    out = {"y": ytr, "fold": fold, "source": source, "oof": oof, "tests": tests, "test_y": yte,
           "full_oof": full_oof}
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = key.with_suffix(".tmp.npz")
    np.savez(tmp, **out)
    tmp.rename(key)
    out["models"] = list(models)
    return out


def with_memoriser(data: dict, who: str = "knn1") -> dict:
    """The set with model `who` turned memoriser: fitted on every train row, it predicts its own rows as OOF,
    while its test tables stay the honest fold models' (a fold loop that reused the final model for OOF)."""
    m = data["models"].index(who)
    out = dict(data)
    out["oof"] = data["oof"].copy()
    out["oof"][:, m] = data["full_oof"][:, m]
    out["models"] = [f"{who}_all" if name == who else name for name in data["models"]]
    return out


def strong_among_weak(seed: int = 0) -> dict:
    """The plain set with one strong honest model (gradient boosting) beside five weaker ones."""
    return scenario("plain", "random", seed, models=("logreg", "nb", "knn1", "knn5", "rf", "hgb"))


def guard_run(data: dict, groups: bool, per_fold: bool, config=None) -> dict:
    """fit-stack's guard on a scenario: refused or not, what it excluded and chose, the nested estimate against
    the test set's score of the stack's predictions, in standard errors of their difference."""
    import pandas as pd

    from oof import StackerError, folds_from_table
    from stacker import StackConfig, StackGuard

    y, fold = data["y"], data["fold"]
    classes = [str(c) for c in range(data["oof"].shape[2])]
    ids = np.array([f"r{i:05d}" for i in range(len(y))], dtype=object)
    frame = pd.DataFrame({"id": ids, "label": [classes[v] for v in y], "fold": fold})
    if groups:
        frame["group"] = [f"g{s}" for s in data["source"]]
    folds = folds_from_table(frame, "<scenario folds>", classes)
    test_ids = [f"t{i:05d}" for i in range(len(data["test_y"]))]

    def table(p, rows, with_fold):
        t = pd.DataFrame(p, columns=classes)
        t.insert(0, "id", rows)
        if with_fold:
            t.insert(1, "fold", fold)
        return t

    names = data["models"]
    oof_tables = {m: table(data["oof"][:, i], ids, True) for i, m in enumerate(names)}
    tests = data["tests"]
    test_tables = {m: table(tests.mean(axis=0)[:, i], test_ids, False) for i, m in enumerate(names)}
    fold_tables = [{m: table(tests[k, :, i], test_ids, False) for i, m in enumerate(names)}
                   for k in range(len(tests))] if per_fold else []
    guard = StackGuard(config or StackConfig(), log=None)
    try:
        guard.fit(oof_tables, folds, test_tables, fold_tables)
    except StackerError as e:
        return {"refused": str(e)}
    d = guard.decision_
    proba = guard.predict_proba(test_tables)
    test_score = float((proba.argmax(axis=1) == data["test_y"]).mean())
    low, high = d["candidates"][d["chosen"]]["interval"]
    # the difference's standard error: the chosen candidate's (cluster) bootstrap one, from its 95% interval,
    # and the test score's own over its independent rows
    se = float(np.hypot((high - low) / 3.92, np.sqrt(test_score * (1 - test_score) / len(proba))))
    nested = d["nested"]["score"] if d.get("nested") else float("nan")
    return {"refused": "", "excluded": sorted(d["excluded"]), "chosen": d["chosen"], "nested": nested,
            "test": test_score, "se": se, "off_by_se": (nested - test_score) / se if se > 0 else float("nan"),
            "warnings": d.get("warnings", []), "split_share": (d.get("split_leak") or {}).get("share")}
