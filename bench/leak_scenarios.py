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
        n_groups = n_train // 4
        sizes = rng.integers(2, 7, n_groups)
        X, y = make_classification(n_train + n_test, 20, n_informative=8, n_redundant=4, n_classes=classes,
                                   n_clusters_per_class=2, class_sep=1.5, flip_y=0.03, random_state=seed)
        source = np.repeat(np.arange(n_groups), sizes)[:n_train]
        group_y = y[:n_groups]
        group_shift = rng.normal(0, 0.8, (n_groups, X.shape[1])) * X.std(axis=0)
        # every row of a group shares its label and a group effect, drawn around rows of that label
        pool = {c: np.flatnonzero(y[:n_train] == c) for c in range(classes)}
        base = np.array([rng.choice(pool[group_y[g]]) for g in source])
        Xtr = X[base] + group_shift[source]
        Xte = X[n_train:] + rng.normal(0, 0.8, (n_test, X.shape[1])) * X.std(axis=0)
        return Xtr, group_y[source], source, Xte, y[n_train:]
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
    """The set plus `<who>_all`: model `who` fitted on every row, its own rows as OOF, honest test tables."""
    m = data["models"].index(who)
    out = dict(data)
    out["oof"] = np.concatenate([data["oof"], data["full_oof"][:, m:m + 1]], axis=1)
    out["tests"] = np.concatenate([data["tests"], data["tests"][:, :, m:m + 1]], axis=2)
    out["full_oof"] = np.concatenate([data["full_oof"], data["full_oof"][:, m:m + 1]], axis=1)
    out["models"] = [*data["models"], f"{who}_all"]
    return out
