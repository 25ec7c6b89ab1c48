"""Bench: the leak check's false-positive and detection rates on OOF sets with known leaks.

    python bench/leak_bench.py [--datasets digits breast_cancer wine synthetic] [--run RUN_DIR ...]
                                [--scenarios dup-random ...] [--split-cost]

Honest sets: for each dataset that ships with scikit-learn (and one synthetic
5-class set of 3,000 rows), a quarter held out as test, 5 stratified folds on the
rest, seven model families (logistic regression, random forest, extra trees,
k-NN, naive Bayes, histogram gradient boosting, LightGBM), each fold model
predicting its held-out fold (OOF) and the test set. `--run` adds a stacker
run's own tables (e.g. the demo's tiny CNNs) as a further honest set.

Leaks, one model at a time, the others honest:
- all rows: the model fitted on every train row "predicts" its own rows as OOF
  and the test set for every fold (a wrong fold loop, a notebook reusing a model
  trained on everything): its K fold test tables are one table;
- oof only: the OOF rows from the all-rows model, the test tables from the
  honest fold models (OOF and test made apart): only the statistics can see it;
- one fold: fold 0's rows and test table come from the all-rows model;
- smoothed: "oof only" with label smoothing 0.1 on its probabilities (caps the
  sharpness that shows most leaks);
- epoch-picked: LightGBM whose boosting round is chosen on each fold's own
  validation rows, with the metadata stacker writes for `keep: best`.

Each cell is `family:flag z/size`: Y flagged, - not; z the consistency z (or `=`
when flagged for identical fold tables); size the leak's effect on the OOF rows,
in standard errors: how much more probability the leaked rows give the true
class than the honest model's, over the honest model's paired spread. A leak of
size under about 4 is inside the noise of the rows it touched: no check can
tell it from an honest model that happened to do well there.

Each set is checked twice: with the per-fold test tables stacker writes, and
with only the mean test table (what other tools may give). The tables list, per
dataset, every honest model flagged (false positives) and, per family and leak
type, whether the leaked model was flagged, with its consistency z.

Scenarios (`--scenarios`, bench/leak_scenarios.py: six scikit-learn families on 7,181 rows,
a test set of 2,000 rows, the whole guard as fit-stack runs it):
- dup-random: each source row with 1-3 near-copies, random stratified folds (must be refused);
- dup-grouped: the same rows, each source's copies in one fold, the groups given (the honest control);
- dup-grouped-nogroups: the same folds without telling the meta level the groups;
- grouped: 2-6 correlated rows per group (photos of one plant), group folds, groups given;
- memoriser: the 1-NN model's OOF rows predicted by a 1-NN fitted on every row, its test tables honest;
- strong: one strong honest model (gradient boosting) among weaker ones.
Each row: refused or not, the models excluded, the choice, the nested estimate against the
stack's test accuracy (off: their difference in standard errors of the difference), and the
split-leak share (`stacker.split_leak`).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))  # leak_scenarios

from stacker.leak import LeakInputs, declared_leaks, leak_report  # noqa: E402

LEAKS = ("all rows", "oof only", "one fold", "smoothed", "epoch-picked")


def families(seed: int) -> dict:
    import lightgbm as lgb
    from sklearn.ensemble import ExtraTreesClassifier, HistGradientBoostingClassifier, RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.naive_bayes import GaussianNB
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return {
        "logreg": lambda: make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)),
        "rf": lambda: RandomForestClassifier(200, random_state=seed, n_jobs=1),
        "et": lambda: ExtraTreesClassifier(200, random_state=seed, n_jobs=1),
        "knn": lambda: make_pipeline(StandardScaler(), KNeighborsClassifier(10)),
        "nb": GaussianNB,
        "hgb": lambda: HistGradientBoostingClassifier(max_iter=100, random_state=seed),
        "lgbm": lambda: lgb.LGBMClassifier(n_estimators=100, verbose=-1, random_state=seed, n_jobs=1),
    }


def load(name: str):
    from sklearn import datasets

    if name == "synthetic":
        return datasets.make_classification(3000, 20, n_informative=10, n_classes=5, random_state=0, flip_y=0.05)
    return getattr(datasets, f"load_{name}")(return_X_y=True)


def oof_set(name: str, seed: int = 0, k: int = 5) -> dict:
    """Honest and leaked predictions of every family on one dataset."""
    from sklearn.model_selection import StratifiedKFold, train_test_split

    X, y = load(name)
    Xtr, Xte, ytr, _ = train_test_split(X, y, test_size=0.25, random_state=seed, stratify=y)
    fold = np.empty(len(ytr), dtype=int)
    for f, (_, valid) in enumerate(StratifiedKFold(k, shuffle=True, random_state=seed).split(Xtr, ytr)):
        fold[valid] = f
    out = {}
    for family, make in families(seed).items():
        oof, tests = np.zeros((len(ytr), len(np.unique(y)))), []
        for f in range(k):
            model = make().fit(Xtr[fold != f], ytr[fold != f])
            oof[fold == f] = model.predict_proba(Xtr[fold == f])
            tests.append(model.predict_proba(Xte))
        full = make().fit(Xtr, ytr)
        out[family] = {"oof": oof, "tests": np.array(tests), "leak_oof": full.predict_proba(Xtr),
                       "leak_test": full.predict_proba(Xte)}
    out["lgbm_picked"] = epoch_picked(Xtr, ytr, Xte, fold, seed)
    return {"y": ytr, "fold": fold, "models": out}


def epoch_picked(Xtr, ytr, Xte, fold, seed) -> dict:
    """LightGBM with each fold's boosting round chosen by that fold's own validation log-loss."""
    import lightgbm as lgb

    oof, tests = np.zeros((len(ytr), len(np.unique(ytr)))), []
    for f in np.unique(fold):
        model = lgb.LGBMClassifier(n_estimators=300, learning_rate=0.05, verbose=-1, random_state=seed, n_jobs=1)
        model.fit(Xtr[fold != f], ytr[fold != f])
        rows, y = Xtr[fold == f], ytr[fold == f]
        losses = [-np.log(np.clip(model.predict_proba(rows, num_iteration=i)[np.arange(len(y)), y], 1e-15, 1)).mean()
                  for i in range(10, 301, 10)]
        best = 10 * (1 + int(np.argmin(losses)))
        oof[fold == f] = model.predict_proba(rows, num_iteration=best)
        tests.append(model.predict_proba(Xte, num_iteration=best))
    return {"oof": oof, "tests": np.array(tests)}


def smooth(p: np.ndarray, eps: float = 0.1) -> np.ndarray:
    return (1 - eps) * p + eps / p.shape[-1]


def inputs(data: dict, names: list[str], leak: str | None = None, who: str | None = None,
           per_fold: bool = True) -> LeakInputs:
    """The check's inputs with model `who` leaked in way `leak` (None: every model honest)."""
    oof, tests = [], []
    for name in names:
        t = data["models"][name]
        o, f = t["oof"].copy(), t["tests"].copy()
        if name == who and leak == "all rows":
            o, f = t["leak_oof"].copy(), np.stack([t["leak_test"]] * len(f))
        elif name == who and leak in ("oof only", "smoothed"):
            o = t["leak_oof"].copy()
        elif name == who and leak == "one fold":
            o[data["fold"] == 0], f[0] = t["leak_oof"][data["fold"] == 0], t["leak_test"]
        if name == who and leak == "smoothed":
            o, f = smooth(o), smooth(f)
        oof.append(o)
        tests.append(f)
    oof, tests = np.stack(oof, axis=1), np.stack(tests, axis=2)  # (N, M, C), (K, T, M, C)
    return LeakInputs(data["y"], data["fold"], oof, tests.mean(axis=0), tests if per_fold else None, names)


def check_dataset(name: str, data: dict) -> list[str]:
    """Report lines for one dataset: false positives, then each leak's detection."""
    honest = [m for m in data["models"] if m != "lgbm_picked"]
    lines = []
    for per_fold in (True, False):
        mode = "per-fold tables" if per_fold else "mean test only"
        report = leak_report(inputs(data, honest, per_fold=per_fold))
        flagged = [m for m in honest if report[m]["flagged"]]
        worst = max(report[m]["consistency"] for m in honest)
        lines.append(f"{name:14} {mode:16} honest: {len(flagged)}/{len(honest)} flagged {flagged or ''}"
                     f" (largest z {worst:.1f})")
        for leak in LEAKS[:4]:
            cells = [detection(data, honest, leak, who, per_fold) for who in honest]
            lines.append(f"{'':31}{leak:10} " + " ".join(cells))
        picked = [*honest[:-1], "lgbm_picked"]  # the epoch-picked LightGBM in place of the plain one
        r = leak_report(inputs(data, picked, per_fold=per_fold))["lgbm_picked"]
        declared = declared_leaks({"lgbm_picked": {"keep": "best"}})  # as predict-oof records keep: best
        flag = " flagged (declared by its tables)" if r["flagged"] or "lgbm_picked" in declared else ""
        lines.append(f"{'':31}{'epoch-pick':10} lgbm z {r['consistency']:.1f}{flag}")
    return lines


def detection(data, names, leak, who, per_fold) -> str:
    report = leak_report(inputs(data, names, leak, who, per_fold))
    collateral = [m for m in names if m != who and report[m]["flagged"]]
    mark = "Y" if report[who]["flagged"] else "-"
    z = "=" if report[who]["identical_folds"] else f"{report[who]['consistency']:.0f}"
    return (f"{who}:{mark}{z}/{leak_size(data, names, leak, who):.0f}"
            + (f"(+{','.join(collateral)})" if collateral else ""))


def leak_size(data, names, leak, who) -> float:
    """The leak's effect on the rows it touched, in standard errors of the honest model's paired advantage.

    Advantage per row: p_model(true class) minus the other models' mean p(true class); "smoothed" is
    compared with the honest model smoothed alike.
    """
    honest, leaked = inputs(data, names), inputs(data, names, leak, who)
    if leak == "smoothed":  # the smoothing is the model's own, not the leak: compare with the smoothed honest model
        honest.oof[:, names.index(who)] = smooth(honest.oof[:, names.index(who)])
    m, y, rows = names.index(who), data["y"], np.arange(len(data["y"]))
    touched = data["fold"] == 0 if leak == "one fold" else np.ones(len(y), bool)
    others = np.delete(honest.oof, m, axis=1).mean(axis=1)[rows, y]
    before, after = honest.oof[rows, m, y] - others, leaked.oof[rows, m, y] - others
    se = before.std(ddof=1) / np.sqrt(touched.sum())
    return float((after[touched].mean() - before[touched].mean()) / se)


def run_set(run: Path) -> dict:
    """A stacker run's own tables as an honest set (every model, per-fold test tables)."""
    import oof

    paths = oof.RunPaths(run)
    folds = oof.load_folds(paths.folds)
    models = {}
    for m in paths.predicted_models():
        table = oof.validate_oof(oof.read_table(paths.oof(m), folds.classes, "oof"), folds)
        tests = [oof.read_table(paths.test_fold(m, k), folds.classes, "test").proba for k in range(folds.k)]
        models[m] = {"oof": table.proba, "tests": np.array(tests)}
    return {"y": folds.y, "fold": folds.fold, "models": models}


def cost(rows: int = 10_000, models: int = 35, classes: int = 10, k: int = 5, test_rows: int = 2_500) -> float:
    """Seconds the check takes on random tables the size of bench/stack_bench.py's default (best of 3)."""
    rng = np.random.default_rng(0)
    y, fold = rng.integers(0, classes, rows), np.arange(rows) % k
    oof = rng.dirichlet(np.ones(classes), (rows, models))
    tests = rng.dirichlet(np.ones(classes), (k, test_rows, models))
    data = LeakInputs(y, fold, oof, tests.mean(axis=0), tests, [f"m{i}" for i in range(models)])
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        leak_report(data)
        times.append(time.perf_counter() - t0)
    return min(times)


SCENARIOS = ("dup-random", "dup-grouped", "dup-grouped-nogroups", "grouped", "memoriser", "strong")


def scenario_data(name: str):
    """(tables, groups given) of one scenario."""
    import leak_scenarios as ls

    return {"dup-random": lambda: (ls.scenario("duplicates", "random"), False),
            "dup-grouped": lambda: (ls.scenario("duplicates", "grouped"), True),
            "dup-grouped-nogroups": lambda: (ls.scenario("duplicates", "grouped"), False),
            "grouped": lambda: (ls.scenario("grouped", "grouped"), True),
            "memoriser": lambda: (ls.with_memoriser(ls.scenario("plain", "random")), False),
            "strong": lambda: (ls.strong_among_weak(), False)}[name]()


def scenario_lines(names) -> list[str]:
    import leak_scenarios as ls

    lines = [f"{'scenario':22}{'tables':10}{'refused':9}{'excluded':24}{'chosen':20}{'nested':>8}{'test':>8}"
             f"{'off SE':>8}{'share':>7}  warnings"]
    for name in names:
        data, groups = scenario_data(name)
        for per_fold in (True, False):
            r = ls.guard_run(data, groups, per_fold)
            mode = "per-fold" if per_fold else "mean"
            if r["refused"]:
                share = r["refused"].split("the folds leak: ")[-1].split("%")[0] + "%"
                lines.append(f"{name:22}{mode:10}{'yes':9}{'-':24}{'-':20}{'':>8}{'':>8}{'':>8}{share:>7}")
                continue
            excluded = ",".join(r["excluded"]) or "-"
            share = "-" if r["split_share"] is None else f"{r['split_share']:.0%}"
            lines.append(f"{name:22}{mode:10}{'no':9}{excluded:24}{r['chosen']:20}{r['nested']:>8.4f}"
                         f"{r['test']:>8.4f}{r['off_by_se']:>+8.1f}{share:>7}  {len(r['warnings'])}"
                         + "".join(f"\n{'':24}warning: {w}" for w in r["warnings"]))
    return lines


def split_cost(rows: int = 1_000_000, models: int = 20, classes: int = 10, test_rows: int = 100_000) -> float:
    """Seconds of `split_leak` on random float32 tables of rows x models x classes (best of 2)."""
    from stacker.split_leak import split_leak

    rng = np.random.default_rng(0)
    oof = rng.random((rows, models, classes), dtype=np.float32)
    oof /= oof.sum(axis=2, keepdims=True)
    test = rng.random((test_rows, models, classes), dtype=np.float32)
    test /= test.sum(axis=2, keepdims=True)
    fold = np.arange(rows) % 5
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        split_leak(oof, fold, test)
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="*", default=["digits", "breast_cancer", "wine", "iris", "synthetic"])
    parser.add_argument("--run", nargs="*", default=[], help="stacker run directories to add as honest sets")
    parser.add_argument("--scenarios", nargs="*", default=list(SCENARIOS), choices=SCENARIOS,
                        help="the guard on scenarios with copies, groups and memorisers (none: skip)")
    parser.add_argument("--split-cost", action="store_true",
                        help="time the split-leak check at 1,000,000 rows x 20 models x 10 classes")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    if args.scenarios:
        print("\n".join(scenario_lines(args.scenarios)), flush=True)
    if args.split_cost:
        print(f"split-leak check: {split_cost():.2f}s at 1,000,000 OOF rows x 20 models x 10 classes, "
              "100,000 test rows", flush=True)
    for name in args.datasets:
        print("\n".join(check_dataset(name, oof_set(name))), flush=True)
    for run in args.run:
        data = run_set(Path(run))
        report = leak_report(inputs(data, list(data["models"])))
        print(f"{Path(run).name:14} per-fold tables  honest: "
              f"{sum(r['flagged'] for r in report.values())}/{len(report)} flagged, z "
              + ", ".join(f"{m} {r['consistency']:.1f}" for m, r in report.items()))
    print(f"cost: {cost():.2f}s for 10,000 OOF rows x 35 models x 10 classes, 5 fold tables of 2,500 test rows "
          "(compare with bench/stack_bench.py's fit-stack time at that size)")
    print(f"\n{time.perf_counter() - t0:.0f}s; Y = flagged, '-' = not flagged, the number is the consistency z; "
          "(+m) = an honest model flagged beside the leaked one")
    return 0


if __name__ == "__main__":
    sys.exit(main())
