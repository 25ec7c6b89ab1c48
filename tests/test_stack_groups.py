"""Groups at the meta level: cluster bootstrap, design effect, grouped inner splits, split leaks, memorisers,
the nested check and provenance, on small seeded synthetic OOF sets (numpy, LightGBM, files, the CLI)."""
from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pandas as pd
import pytest

import stacker_cli as cli
from oof import RunPaths, StackerError, folds_from_table, read_json, write_folds
from stack_fixtures import (fast_config, make_run_folds, make_test_tables, noisy_copy, oof_tables, smoothed_copy,
                            specialists, strong_weak_run, write_run)
from stacker import StackGuard, fit_stack, write_submission
from stacker.candidates import create_candidate
from stacker.candidates.lgbm import inner_split
from stacker.guard import NESTED_SDS, decide, nested_check
from stacker.inputs import MEMO_DISAGREEMENTS, MetaData, disagreements, memorisers
from stacker.leak import LeakInputs, design_effect, leak_report
from stacker.metrics import Metric, bootstrap_counts
from stacker.report import format_report
from stacker.split_leak import MIN_MODELS, REFUSE_SHARE, split_leak

MEAN = {"candidates": ["mean"]}  # provenance tests are about files, not choices
QUICK = {"candidates": ["mean", "logit_mean", "best_single"]}  # no booster: the guard's logic in well under 1 s


def pair_groups(fold: np.ndarray, shift: int = 0) -> np.ndarray:
    """(N,) a group per two consecutive rows of each fold (rows in `fold` order); `shift` pairs them one row
    later (same folds, other groups). Every group sits in one fold."""
    groups = np.empty(len(fold), dtype=object)
    for f in np.unique(fold):
        rows = np.flatnonzero(fold == f)
        groups[rows] = [f"g{f}-{(i + shift) // 2}" for i in range(len(rows))]
    return groups


# ---------------------------------------------------------------- 1. bootstrap_counts with groups


def reference_row_counts(y: np.ndarray, n_bootstrap: int, seed) -> np.ndarray:
    """The pre-groups `bootstrap_counts`, written plainly: per chunk of 100 resamples, each class's rows
    drawn with replacement (one `rng.integers` block per class, classes in sorted order) and counted."""
    rng = np.random.default_rng(seed)
    counts = np.zeros((n_bootstrap, len(y)), dtype=np.float32)
    for start in range(0, n_bootstrap, 100):
        b = min(100, n_bootstrap - start)
        for c in np.unique(y):
            rows = np.flatnonzero(y == c)
            draws = rng.integers(0, len(rows), size=(b, len(rows)))
            for i in range(b):
                np.add.at(counts[start + i], rows[draws[i]], 1)
    return counts


def majority_labels(y, groups) -> dict:
    """{group: its most frequent label, ties to the lower label}."""
    out = {}
    for g in dict.fromkeys(groups):
        votes = Counter(y[groups == g])
        out[g] = min(votes, key=lambda c: (-votes[c], c))
    return out


def test_grouped_counts_draw_whole_groups_within_majority_strata():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    groups = np.array([f"p{g}" for g in rng.integers(0, 70, 300)], dtype=object)  # 1-10 rows, mixed labels
    counts = bootstrap_counts(y, 150, 4, groups)
    assert counts.shape == (150, 300) and counts.dtype == np.float32
    majority = majority_labels(y, groups)
    per_group = {}
    for g in majority:
        rows = np.flatnonzero(groups == g)
        assert (counts[:, rows] == counts[:, rows[:1]]).all(), g  # a drawn group brings all of its rows
        per_group[g] = counts[:, rows[0]]
    for label in set(majority.values()):
        stratum = [g for g, m in majority.items() if m == label]
        drawn = np.sum([per_group[g] for g in stratum], axis=0)  # (B,) groups drawn from this stratum
        assert (drawn == len(stratum)).all(), label
    assert not (counts.sum(axis=1) == 300).all()  # rows drawn vary with the groups' sizes
    np.testing.assert_array_equal(counts, bootstrap_counts(y, 150, 4, groups))  # seeded


def test_without_groups_the_counts_are_the_old_row_bootstrap():
    y = np.random.default_rng(1).integers(0, 4, 230)
    old = reference_row_counts(y, 250, [42, 7])  # 250: three chunks, the last a partial one
    np.testing.assert_array_equal(bootstrap_counts(y, 250, [42, 7]), old)
    np.testing.assert_array_equal(bootstrap_counts(y, 250, [42, 7], None), old)


def test_singleton_groups_give_a_valid_row_bootstrap():
    y = np.random.default_rng(2).integers(0, 4, 200)
    rows = bootstrap_counts(y, 120, 3)
    # groups 0..N-1 in row order are the rows themselves, drawn in the same order: the same numbers
    np.testing.assert_array_equal(bootstrap_counts(y, 120, 3, np.arange(200)), rows)
    # other names of singleton groups number the units in another order: a valid row bootstrap (every
    # class's rows drawn as often as the class holds rows, integer counts), not the same numbers
    renamed = bootstrap_counts(y, 120, 3, np.random.default_rng(5).permutation(200))
    assert (renamed >= 0).all() and (renamed == np.round(renamed)).all()
    for c in range(4):
        assert (renamed[:, y == c].sum(axis=1) == (y == c).sum()).all()
    assert not np.array_equal(renamed, rows)


def test_a_metric_on_a_cluster_bootstrap_divides_by_the_rows_drawn():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 240)
    groups = np.repeat(np.arange(80), rng.multinomial(240 - 80, np.ones(80) / 80) + 1)  # sizes 1..~7
    counts = bootstrap_counts(y, 100, 0, groups)
    right = np.eye(3)[y]
    half = noisy_copy(y, 3, 0.5, rng)
    boot = Metric("accuracy", 3).bootstrap(y, [right, half], counts)
    np.testing.assert_array_equal(boot[:, 0], 1.0)  # never above 1, as dividing by N would make it
    hits = (half.argmax(axis=1) == y).astype(float)
    np.testing.assert_allclose(boot[:, 1], counts @ hits / counts.sum(axis=1), rtol=1e-6)


# ---------------------------------------------------------------- 2. intervals of copied rows


def test_copied_rows_as_groups_widen_the_interval_of_the_mean():
    rng = np.random.default_rng(0)
    y0 = rng.integers(0, 5, 300)
    p0 = noisy_copy(y0, 5, 0.7, rng)
    copies = 3
    y, p, groups = np.repeat(y0, copies), np.repeat(p0, copies, axis=0), np.repeat(np.arange(300), copies)
    metric, config = Metric("accuracy", 5), fast_config(n_bootstrap=400)
    width = {}
    for name, g in (("rows", None), ("groups", groups)):
        interval = decide(y, {"mean": p}, metric, config, [0, 7], g)["candidates"]["mean"]["interval"]
        width[name] = interval[1] - interval[0]
    # 900 rows that are 300 photos: about sqrt(3) = 1.73 times wider
    assert 1.4 < width["groups"] / width["rows"] < 2.1, width


def test_the_guard_resamples_the_folds_groups():
    """StackGuard.fit on copies kept in one fold: with the copies as the folds' groups every candidate's
    interval is wider, the nested estimate's inner decisions less sure and the leak check's z no larger than
    when the same rows are taken as independent."""
    rng = np.random.default_rng(1)
    copies, n = 3, 200
    y0 = rng.integers(0, 5, n)
    oof = {m: np.repeat(noisy_copy(y0, 5, a, rng), copies, axis=0) for m, a in (("a", 0.8), ("b", 0.7), ("c", 0.6))}
    table = pd.DataFrame({"id": [f"r{i:04d}" for i in range(n * copies)], "label": [f"c{c}" for c in
                          np.repeat(y0, copies)], "fold": np.repeat(np.arange(n) % 5, copies)})
    classes = [f"c{c}" for c in range(5)]
    plain = folds_from_table(table, "copies", classes)
    grouped = folds_from_table(table.assign(group=np.repeat(np.arange(n), copies).astype(str)), "copies", classes)
    assert grouped.sha256 == plain.sha256
    y_test = rng.integers(0, 5, 300)
    tests = make_test_tables([f"t{i}" for i in range(300)], classes,
                             {m: noisy_copy(y_test, 5, a, rng) for m, a in (("a", 0.8), ("b", 0.7), ("c", 0.6))})
    widths, certainty, consistency = {}, {}, {}
    for name, folds in (("rows", plain), ("groups", grouped)):
        decision = StackGuard(fast_config(**QUICK), log=None).fit(oof_tables(folds, oof), folds, tests).decision_
        consistency[name] = np.array([decision["models"][m]["consistency"] for m in oof])
        widths[name] = {c: r["interval"][1] - r["interval"][0] for c, r in decision["candidates"].items()}
        # each outer fold's inner decision: how sure it is of its closest candidate's win or loss
        wins = np.array([float(re.search(r"win probability ([\d.]+)\)", f["reason"]).group(1))
                         for f in decision["nested"]["folds"]])
        certainty[name] = np.mean(np.abs(wins - 0.5))
    for c in widths["rows"]:
        assert widths["groups"][c] > 1.3 * widths["rows"][c], (c, widths)
    assert certainty["groups"] < certainty["rows"] - 0.03, certainty  # the inner decisions resample groups too
    # the leak check's standard errors count groups: no model's z grows, some shrink
    assert (consistency["groups"] <= consistency["rows"] + 1e-9).all(), consistency
    assert consistency["groups"].sum() < consistency["rows"].sum() - 0.3, consistency


# ---------------------------------------------------------------- 3. design effect


def test_design_effect_is_one_without_groups_and_the_copy_count_with_copies():
    values = np.random.default_rng(0).normal(size=120)
    assert design_effect(values, None) == 1.0
    assert design_effect(values, np.arange(120)) == pytest.approx(1.0)  # singleton groups
    for k in (2, 3, 5):
        copied = np.repeat(values, k)
        assert design_effect(copied, np.repeat(np.arange(120), k)) == pytest.approx(k)
        assert design_effect(copied, None) == 1.0
    noisy = np.repeat(values, 3) + np.random.default_rng(1).normal(0, 0.1, 360)  # near-copies
    assert 2.5 < design_effect(noisy, np.repeat(np.arange(120), 3)) <= 3.0
    assert design_effect(np.ones(10), np.arange(10) // 2) == 1.0  # no spread: nothing to inflate


def test_the_leak_z_of_an_honest_model_with_copied_rows_shrinks_with_groups():
    """An honest lone model with per-fold test tables: its OOF rows come 3 copies at a time, so a mean over
    them is as uncertain as one over a third of the rows; counted as rows, its z is sqrt(3) too large."""
    rng = np.random.default_rng(2)
    k, copies = 5, 3
    y0 = rng.integers(0, 5, 200)
    p0 = noisy_copy(y0, 5, 0.8, rng)
    y, p = np.repeat(y0, copies), np.repeat(p0, copies, axis=0)
    fold, groups = np.repeat(np.arange(200) % k, copies), np.repeat(np.arange(200), copies)
    y_test = rng.integers(0, 5, 300)
    test_folds = np.stack([noisy_copy(y_test, 5, 0.8, rng) for _ in range(k)])[:, :, None]  # (K, T, 1, C)
    report = {name: leak_report(LeakInputs(y, fold, p[:, None], test_folds.mean(axis=0), test_folds, ["m"], g))["m"]
              for name, g in (("rows", None), ("groups", groups))}
    rows, grouped = report["rows"], report["groups"]
    assert abs(rows["z"]["sharpness"]) > 2  # this seed's gap, read as rows, looks like a 3-SD effect
    assert abs(grouped["z"]["sharpness"]) < abs(rows["z"]["sharpness"]) / 1.3
    assert grouped["consistency"] < rows["consistency"]
    assert not grouped["flagged"] and not rows["flagged"]


# ---------------------------------------------------------------- 4. inner_split with groups


@pytest.mark.parametrize("groups_of", [
    lambda rng, n: rng.integers(0, 120, n),  # sizes 1 to ~12
    lambda rng, n: np.repeat(np.arange(n // 4), 4),  # copies of 4
    lambda rng, n: np.array([f"plant{g}" for g in rng.integers(0, 30, n)], dtype=object),  # string names
    lambda rng, n: np.concatenate([np.zeros(n - 40, int), np.arange(1, 41)]),  # one group of 460 rows, 40 alone
])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_grouped_inner_split_keeps_groups_whole(groups_of, seed):
    n, fraction = 500, 0.2
    groups = groups_of(np.random.default_rng(seed), n)
    train, valid = inner_split(n, fraction, seed, groups)
    assert len(train) and len(valid)
    assert np.array_equal(np.sort(np.concatenate([train, valid])), np.arange(n))
    assert not set(groups[train]) & set(groups[valid])
    largest = max(Counter(groups).values())
    if largest < n // 2:  # the validation side: the shortest prefix of groups reaching 20% of the rows
        assert fraction * n <= len(valid) < fraction * n + largest


def test_inner_split_without_real_groups_falls_back_to_rows():
    rows = inner_split(300, 0.2, 5)
    assert len(rows[1]) == 60
    one_group = inner_split(300, 0.2, 5, np.zeros(300, int))
    singletons = inner_split(300, 0.2, 5, np.arange(300))  # each row its own group: the same shuffle
    for split in (one_group, singletons):
        np.testing.assert_array_equal(split[0], rows[0])
        np.testing.assert_array_equal(split[1], rows[1])
    train, valid = inner_split(10, 0.2, 0, np.array([0] * 9 + [1]))  # two groups: one each side
    assert {len(train), len(valid)} == {1, 9}


# ---------------------------------------------------------------- 5. LightGBM meta-models with groups


def specialist_set(n_rows=600, seed=0):
    rng = np.random.default_rng(seed)
    folds = make_run_folds(n_rows, 4, seed=seed)
    oof = {m: specialists(folds.y, rng, known, n_classes=4) for m, known in {"a": [0, 1], "b": [2, 3]}.items()}
    return folds, oof


def test_groups_reach_the_boosters_inner_split():
    folds, oof = specialist_set()
    X = np.stack(list(oof.values()), axis=1)
    config = fast_config(lgbm_max_rounds=20, lgbm_learning_rate=0.3, lgbm_early_stopping=2)
    texts = {}
    for name, groups in (("rows", None), ("singletons", np.arange(len(X))), ("pairs", np.arange(len(X)) // 2)):
        candidate = create_candidate("lgbm_wide", config, Metric("accuracy", 4), 3, ("a", "b"), folds.classes)
        candidate.row_groups = groups
        texts[name] = candidate.fit(X, folds.y).booster_text()
    assert texts["singletons"] == texts["rows"]  # singleton groups split the rows as rows
    assert texts["pairs"] != texts["rows"]  # another early-stopping split: another booster


def test_a_booster_stack_fits_on_grouped_folds_and_records_the_groups():
    folds, oof = specialist_set()
    grouped = folds.with_groups(pair_groups(folds.fold), "test groups")
    config = fast_config(candidates=["mean", "lgbm_wide"], lgbm_max_rounds=20, lgbm_learning_rate=0.3)
    lines = []
    guard = StackGuard(config, log=lines.append).fit(oof_tables(grouped, oof), grouped)
    decision = guard.decision_
    assert decision["chosen"] == "lgbm_wide" and decision["nested"]["score"] > 0.6
    assert decision["groups_sha256"] == grouped.groups_sha256 and len(grouped.groups_sha256) == 64
    np.testing.assert_array_equal(guard.candidate_.row_groups, grouped.group_index)  # the final fit's
    assert any(f"{folds.n_rows} rows in {folds.n_rows // 2} groups" in line for line in lines)
    plain = StackGuard(config, log=None).fit(oof_tables(folds, oof), folds).decision_
    assert "groups_sha256" not in plain and plain["chosen"] == "lgbm_wide"


# ---------------------------------------------------------------- 6. split leaks

K, M, C = 5, 4, 5
ACCURACIES = (0.8, 0.75, 0.7, 0.65)


def models_of(y: np.ndarray, rng) -> np.ndarray:
    """(N, M, C) M honest models' probabilities for labels y."""
    return np.stack([noisy_copy(y, C, a, rng) for a in ACCURACIES], axis=1)


def twin_set(layout: str, n_sources: int = 200, n_test: int = 400, seed: int = 0):
    """(y, fold, oof (N, M, C), y_test, test (T, M, C)): N = 2 * n_sources OOF rows.

    layout: "split" each row has a near-identical copy (every model's probabilities jittered by ~0.1%)
    in another fold; "together" the copy in its own fold; "none" no copies. The test rows are of the same
    models and labels, without copies.
    """
    rng = np.random.default_rng(seed)
    y0 = rng.integers(0, C, n_sources)
    p0 = models_of(y0, rng)
    f0 = rng.integers(0, K, n_sources)
    if layout == "none":
        y1 = rng.integers(0, C, n_sources)
        p1, f1 = models_of(y1, rng), rng.integers(0, K, n_sources)
    else:
        y1, p1 = y0, p0 * np.exp(rng.normal(0, 1e-3, p0.shape))
        p1 /= p1.sum(axis=-1, keepdims=True)
        f1 = f0 if layout == "together" else (f0 + rng.integers(1, K, n_sources)) % K
    y_test = rng.integers(0, C, n_test)
    return (np.concatenate([y0, y1]), np.concatenate([f0, f1]), np.concatenate([p0, p1]), y_test,
            models_of(y_test, rng))


@pytest.mark.parametrize("layout, leaks", [("split", True), ("together", False), ("none", False)])
def test_split_leak_sees_twins_across_folds(layout, leaks):
    _, fold, oof, _, test = twin_set(layout)
    found = split_leak(oof, fold, test)
    assert found is not None and found.leaks is leaks, found
    assert (found.share >= REFUSE_SHARE) is leaks and found.oof_rows == 400 and found.test_rows == 400
    if leaks:
        assert found.share > 0.95 and found.message().startswith("the folds leak: ")
    assert found.record()["leaks"] is leaks


def test_split_leak_needs_several_models_and_open_rows():
    _, fold, oof, _, test = twin_set("split")
    assert MIN_MODELS == 3
    assert split_leak(oof[:, :2], fold, test[:, :2]) is None  # two models' rows coincide by chance
    assert split_leak(oof[:, :3], fold, test[:, :3]).leaks
    sure = np.eye(C)[oof.argmax(axis=2)]  # every model certain of every row: nothing open to compare
    assert split_leak(sure, fold, test) is None


def twin_folds(y: np.ndarray, fold: np.ndarray, groups=None):
    """Folds of the twin set's rows (ids r0000.., in row order), as another tool would bring them."""
    ids = [f"r{i:04d}" for i in range(len(y))]
    table = pd.DataFrame({"id": ids, "label": [f"c{c}" for c in y], "fold": fold})
    if groups is not None:
        table["group"] = groups
    folds = folds_from_table(table, "twins", [f"c{c}" for c in range(C)])
    assert list(folds.ids) == ids
    return folds


def twin_tables(layout: str, seed: int = 0):
    """(folds, {model: OOF (N, C)}, {model: test (T, C)}, test ids) of `twin_set`."""
    y, fold, oof, y_test, test = twin_set(layout, seed=seed)
    names = [f"m{m}" for m in range(M)]
    return (twin_folds(y, fold), {n: oof[:, m] for m, n in enumerate(names)},
            {n: test[:, m] for m, n in enumerate(names)}, [f"t{i:03d}" for i in range(len(y_test))])


def test_fit_refuses_folds_that_split_twins_unless_allowed():
    folds, oof, test, test_ids = twin_tables("split")
    tables, tests = oof_tables(folds, oof), make_test_tables(test_ids, folds.classes, test)
    with pytest.raises(StackerError, match=r"^fit-stack: the folds leak: \d+% of the OOF rows have a near-identical "
                                           r"twin in another fold .*--allow-suspicious stacks anyway$"):
        StackGuard(fast_config(**QUICK), log=None).fit(tables, folds, tests)
    lines = []
    guard = StackGuard(fast_config(**QUICK, allow_suspicious=True), log=lines.append).fit(tables, folds, tests)
    decision = guard.decision_
    assert decision["split_leak"]["leaks"] and decision["split_leak"]["share"] >= REFUSE_SHARE
    leak = [w for w in decision["warnings"] if w.startswith("the folds leak: ")]
    assert len(leak) == 1 and leak[0].endswith("(kept: allow_suspicious)")
    assert f"warning: {leak[0]}" in lines and f"warning: {leak[0]}" in format_report(decision)
    assert decision["used"] == list(oof)


def test_twins_kept_in_one_fold_fit_with_a_clean_record():
    folds, oof, test, test_ids = twin_tables("together")
    grouped = twin_folds(folds.y, folds.fold, [f"s{i % (folds.n_rows // 2)}" for i in range(folds.n_rows)])
    decision = StackGuard(fast_config(**QUICK), log=None).fit(
        oof_tables(grouped, oof), grouped, make_test_tables(test_ids, grouped.classes, test)).decision_
    assert decision["split_leak"]["leaks"] is False and decision["split_leak"]["share"] < REFUSE_SHARE
    assert not [w for w in decision.get("warnings", []) if "folds leak" in w]
    assert "groups_sha256" in decision


def test_the_cli_refuses_a_split_leak_in_one_line_and_stacks_with_allow_suspicious(tmp_path, capsys,
                                                                                   restore_logging):
    folds, oof, test, test_ids = twin_tables("split")
    root = write_run(tmp_path / "run", folds, oof, test, test_ids)
    quick = ["--set", "stack.n_bootstrap=200", "--set", "stack.candidates=[mean, logit_mean, best_single]"]
    returncode = cli.main(["fit-stack", "--run", str(root), *quick])
    stderr = capsys.readouterr().err
    assert returncode == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stacker: error: fit-stack: the folds leak: "), stderr
    assert "Traceback" not in stderr and not RunPaths(root).decision.exists()

    assert cli.main(["fit-stack", "--run", str(root), "--allow-suspicious", *quick]) == 0
    paths = RunPaths(root)
    decision = read_json(paths.decision)
    assert decision["config"]["allow_suspicious"] is True and decision["split_leak"]["leaks"] is True
    assert "warning: the folds leak: " in paths.stack_report.read_text()
    assert "warning: the folds leak: " in capsys.readouterr().out  # the report as fit-stack prints it
    assert cli.main(["leaderboard", "--run", str(root)]) == 0
    assert "warning: the folds leak: " in capsys.readouterr().out
    page = paths.report.read_text()
    assert '<div class="warning">' in page and "the folds leak: " in page


# ---------------------------------------------------------------- 7. memorisers


def honest_models(y, rng, n_classes=5, accuracies=(0.7, 0.7, 0.7)) -> list[np.ndarray]:
    return [noisy_copy(y, n_classes, a, rng) for a in accuracies]


def test_the_one_hot_truth_among_honest_models_is_a_memoriser():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 400)
    X = np.stack([np.eye(5)[y], *honest_models(y, rng)], axis=1)
    names = ["memo", "a", "b", "c"]
    counts, wrong = disagreements(y, X)
    assert counts[0] >= MEMO_DISAGREEMENTS and wrong[0] == 0
    found = memorisers(y, X, names)
    assert list(found) == ["memo"]
    assert "disagrees" in found["memo"] and f"right on {counts[0]} of the {counts[0]} OOF rows" in found["memo"]


def test_an_honest_strong_model_is_not_a_memoriser():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 5, 600)
    X = np.stack([noisy_copy(y, 5, 0.97, rng), *honest_models(y, rng)], axis=1)
    counts, wrong = disagreements(y, X)
    assert counts[0] >= MEMO_DISAGREEMENTS and wrong[0] / counts[0] > 0.05  # it misses a share of them
    assert memorisers(y, X, ["strong", "a", "b", "c"]) == {}
    assert memorisers(y, X[:, :1], ["strong"]) == {}  # one model: no consensus to leave


@pytest.mark.parametrize("with_tests", [False, True])
def test_fit_excludes_a_memoriser_with_or_without_test_tables(with_tests):
    """A smoothed memoriser (right on every row, never near-certain) escapes the sure-share check;
    its disagreements give it away."""
    rng = np.random.default_rng(2)
    folds = make_run_folds(400, 5, seed=2)
    oof = {"memo": smoothed_copy(folds.y, 5, 1.0, rng), **dict(zip("abc", honest_models(folds.y, rng)))}
    y_test = rng.integers(0, 5, 200)
    test = {"memo": noisy_copy(y_test, 5, 0.8, rng), **dict(zip("abc", honest_models(y_test, rng)))}
    tests = make_test_tables([f"t{i}" for i in range(200)], folds.classes, test) if with_tests else None
    decision = StackGuard(fast_config(**QUICK), log=None).fit(oof_tables(folds, oof), folds, tests).decision_
    assert list(decision["excluded"]) == ["memo"] and "disagrees" in decision["excluded"]["memo"]
    assert decision["used"] == ["a", "b", "c"]


# ---------------------------------------------------------------- 8. the nested check


def memo_set(seed=3):
    rng = np.random.default_rng(seed)
    folds = make_run_folds(400, 5, seed=seed)
    return folds, {"memo": np.eye(5)[folds.y], **dict(zip("abc", honest_models(folds.y, rng, 5, (0.6, 0.55, 0.5))))}


def test_a_kept_memoriser_makes_the_nested_estimate_warn_of_the_maximum():
    folds, oof = memo_set()
    lines = []
    decision = StackGuard(fast_config(**QUICK, allow_suspicious=True), log=lines.append).fit(
        oof_tables(folds, oof), folds).decision_
    assert "memo" in decision["used"] and decision["models"]["memo"]["status"] == "suspicious, kept"
    assert decision["nested"]["score"] == 1.0
    warning = decision["nested"]["warning"]
    assert "maximum" in warning and "seen in training" in warning
    assert f"nested estimate: {warning}" in decision["warnings"]
    assert f"warning: nested estimate: {warning}" in format_report(decision)


def test_an_honest_set_has_no_nested_warning():
    root_folds, oof = strong_weak_set()
    decision = StackGuard(fast_config(**QUICK), log=None).fit(oof_tables(root_folds, oof), root_folds).decision_
    assert decision["nested"]["score"] > 0 and "warning" not in decision["nested"]
    assert "warnings" not in decision


def strong_weak_set(seed=0):
    rng = np.random.default_rng(seed)
    folds = make_run_folds(400, 10, seed=seed)
    return folds, {m: noisy_copy(folds.y, 10, a, rng) for m, a in (("strong", 0.85), ("middle", 0.75), ("weak", 0.6))}


def test_nested_check_on_its_own():
    folds, oof = strong_weak_set()
    X = np.stack(list(oof.values()), axis=1)
    data = MetaData(X, folds.y, folds.fold, tuple(oof), folds.classes)
    metric, config = Metric("accuracy", 10), fast_config()
    rng = np.random.default_rng(9)
    assert "maximum" in nested_check(data, np.eye(10)[folds.y], metric, config)
    assert nested_check(data, X[:, 0], metric, config) == ""  # as good as the best model: honest
    assert nested_check(data, X.mean(axis=1), metric, config) == ""
    too_good = noisy_copy(folds.y, 10, 0.97, rng)  # 0.97 against a best model of 0.85: 12 points
    warning = nested_check(data, too_good, metric, config)
    assert "above the best model's OOF score (strong" in warning and "bootstrap SDs" in warning
    assert bootstrap_sds(warning) > NESTED_SDS


def bootstrap_sds(warning: str) -> float:
    """The "x.y bootstrap SDs" figure of a nested warning."""
    return float(re.search(r"([\d.]+) bootstrap SDs", warning).group(1))


def test_nested_check_counts_copies_once_with_groups():
    """The same gain over rows that come in 3 copies is about sqrt(3) fewer SDs when the copies are groups."""
    folds, oof = strong_weak_set()
    copies = 3
    X = np.repeat(np.stack(list(oof.values()), axis=1), copies, axis=0)
    y, fold = np.repeat(folds.y, copies), np.repeat(folds.fold, copies)
    outer = np.repeat(noisy_copy(folds.y, 10, 0.97, np.random.default_rng(9)), copies, axis=0)
    metric, config = Metric("accuracy", 10), fast_config()
    sds = {name: bootstrap_sds(nested_check(MetaData(X, y, fold, tuple(oof), folds.classes, g), outer, metric,
                                            config))
           for name, g in (("rows", None), ("groups", np.repeat(np.arange(folds.n_rows), copies)))}
    assert 1.4 < sds["rows"] / sds["groups"] < 2.1, sds


# ---------------------------------------------------------------- 9. provenance of the groups


@pytest.mark.parametrize("before, after", [(None, 0), (0, 1), (0, None)])
def test_changed_groups_make_the_stack_stale(tmp_path, before, after):
    """Groups are not part of the folds' sha256 (which row each model saw is unchanged), but the meta
    level's bootstrap and inner splits follow them: other groups, another stack."""
    root, folds, test_ids = strong_weak_run(tmp_path / "run")
    paths = RunPaths(root)

    def regroup(shift):
        grouped = folds if shift is None else folds.with_groups(pair_groups(folds.fold, shift), "test groups")
        write_folds(paths.folds, grouped)
        return grouped

    sample = tmp_path / "sample_submission.csv"
    pd.DataFrame({"image_id": test_ids, "label": ["c0"] * len(test_ids)}).to_csv(sample, index=False)
    old = regroup(before)
    decision = fit_stack(root, fast_config(**MEAN), log=None)
    assert decision.get("groups_sha256") == old.groups_sha256
    write_submission(root, sample, log=None)
    new = regroup(after)
    assert new.sha256 == old.sha256 and new.groups_sha256 != old.groups_sha256
    stale = r"stack/decision\.json: the stack is stale \(the folds' groups changed \(sha256 \w+ -> \w+\)\); " \
            r"run fit-stack$"
    with pytest.raises(StackerError, match=stale):
        write_submission(root, sample, log=None)
    lines = []
    decision = fit_stack(root, fast_config(**MEAN), log=lines.append)
    assert lines[0].startswith(f"fit-stack: {paths.decision} is stale (the folds' groups changed (sha256 ")
    assert lines[0].endswith("; fitting the stack again")
    assert decision.get("groups_sha256") == new.groups_sha256 == read_json(paths.decision).get("groups_sha256")
    assert write_submission(root, sample, log=None).is_file()
    lines = []
    fit_stack(root, fast_config(**MEAN), log=lines.append)
    assert "is current" in lines[0]
