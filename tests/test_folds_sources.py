"""Where a run's folds come from: grouped folds (folds.group_column), a file made elsewhere (folds.file),
and the folds config that picks between them and today's stratified folds."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from base_models.config import FoldsConfig
from base_models.dataset import DatasetSpec
from oof import (RunPaths, StackerError, build_config, check_groups_whole, folds_from_table, load_folds, make_folds,
                 make_group_folds, read_fold_file)

CLASSES = ("blast", "healthy", "tungro")


def _patients(n_groups: int = 60, seed: int = 0) -> pd.DataFrame:
    """A train table of 60 patients with 1 to 6 images each; a patient's images mostly share a class."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 7, n_groups)
    group = np.repeat([f"p{g:02d}" for g in range(n_groups)], sizes)
    usual = np.repeat(rng.integers(0, 3, n_groups), sizes)
    label = np.where(rng.random(len(group)) < 0.8, usual, rng.integers(0, 3, len(group)))
    order = rng.permutation(len(group))  # rows of a patient scattered through the CSV
    return pd.DataFrame({"id": [f"img{i:03d}.jpg" for i in range(len(group))],
                         "label": [CLASSES[c] for c in label[order]], "patient": group[order]})


def _folds_per_group(groups, fold) -> pd.Series:
    return pd.Series(fold).groupby(np.asarray(groups)).nunique()


# ---------------------------------------------------------------- grouped folds


def test_grouped_folds_keep_every_group_in_one_fold_in_every_repeat():
    train = _patients()
    folds = make_group_folds(train, "patient", k=5, seed=3, repeats=2)
    assert (folds.repeats, folds.k, folds.seed, folds.classes) == (2, 5, 3, CLASSES)
    assert list(folds.ids) == list(train["id"]) and list(folds.y) == [CLASSES.index(c) for c in train["label"]]
    for fold in folds.fold_matrix:
        assert (_folds_per_group(train["patient"], fold) == 1).all()  # no patient straddles folds
        sizes = np.bincount(fold, minlength=5)
        assert sizes.min() > 0.7 * len(train) / 5, sizes
        for c in range(3):  # every class in every fold's training part, spread over the folds
            per_fold = np.bincount(fold[folds.y == c], minlength=5)
            assert (per_fold.sum() - per_fold > 0).all() and (per_fold > 0).sum() >= 4, (c, per_fold)
    assert (folds.fold_matrix[0] != folds.fold_matrix[1]).any()
    again = make_group_folds(train, "patient", k=5, seed=3, repeats=2)
    assert again.sha256 == folds.sha256 != make_group_folds(train, "patient", k=5, seed=4, repeats=2).sha256
    check_groups_whole(folds, train["patient"], "memory")


def test_groups_whole_check_names_a_straddling_group():
    train = _patients()
    folds = make_folds(train["id"], train["label"], k=5, seed=0)  # ungrouped: patients straddle folds
    with pytest.raises(StackerError, match=r"mine: group 'p\d\d' straddles [2-5] folds; a group's rows must share"):
        check_groups_whole(folds, train["patient"], "mine")


def _one_big_patient():
    train = _patients()
    train.loc[:49, "patient"] = "p99"  # 50 of 213 rows, more than a fifth (42.6)
    return train


def _blank_group():
    train = _patients()
    train.loc[[3, 8], "patient"] = " "
    return train


@pytest.mark.parametrize("make, k, match", [
    (_one_big_patient, 5, r"folds\.group_column 'patient': group 'p99' has 50 rows, more than a fold's share "
                          r"\(213 rows / k=5 = 42\.6\); lower k, or use a finer group column"),
    (_blank_group, 5, r"folds\.group_column 'patient': empty group for 2 row\(s\), first ids 'img003\.jpg', "
                      r"'img008\.jpg'; every row needs a group"),
    (lambda: _patients().drop(columns="patient"), 5,
     r"folds\.group_column 'patient': not a column of the train table \(its other columns: \[\]\)"),
    (lambda: _patients(n_groups=4), 5, r"folds\.group_column 'patient': 4 groups, fewer than k=5"),
])
def test_grouped_folds_refusals(make, k, match):
    with pytest.raises(StackerError, match=match):
        make_group_folds(make(), "patient", k=k, seed=0)


def test_grouped_folds_refuse_a_class_that_one_fold_holds_whole():
    train = _patients()
    tungro = train["label"] == "tungro"
    train.loc[tungro, "patient"] = "p98"  # every tungro image is one patient's...
    train = train[~tungro | (np.cumsum(tungro) <= 10)].reset_index(drop=True)  # ...and small enough for a fold
    with pytest.raises(StackerError, match=r"folds\.group_column 'patient': fold \d's training part has no 'tungro' "
                                           r"image \(all 10 are in fold \d\); every fold model must see every class"):
        make_group_folds(train, "patient", k=5, seed=0)


# ---------------------------------------------------------------- a fold file made elsewhere


def _dataset():
    train = _patients()
    return train["id"], train["label"]


def _write_file(path, ids, fold, repeat=None, label=None):
    table = pd.DataFrame({"id": ids, "fold": fold})
    if repeat is not None:
        table["repeat"] = repeat
    if label is not None:
        table["label"] = label
    table.to_csv(path, index=False)
    return path


def test_a_fold_file_is_read_in_dataset_order_with_dataset_labels(tmp_path):
    ids, labels = _dataset()
    made = make_folds(ids, labels, k=4, seed=1)
    shuffled = made.table.sample(frac=1, random_state=0)  # another row order, no label column
    folds = read_fold_file(_write_file(tmp_path / "my_folds.csv", shuffled["id"], shuffled["fold"]), ids, labels)
    assert (folds.k, folds.seed, folds.repeats, folds.classes) == (4, None, 1, CLASSES)
    assert list(folds.ids) == list(ids) and list(folds.fold) == list(made.fold)
    assert folds.sha256 == made.sha256 == folds_from_table(made.table, "memory").sha256


def test_a_fold_file_with_repeats_and_labels(tmp_path):
    ids, labels = _dataset()
    made = make_folds(ids, labels, k=5, seed=1, repeats=3)
    t = made.table.iloc[::-1]
    path = _write_file(tmp_path / "my_folds.csv", t["id"], t["fold"], t["repeat"], t["label"])
    folds = read_fold_file(path, ids, labels)
    assert (folds.repeats, folds.k, folds.sha256) == (3, 5, made.sha256)
    np.testing.assert_array_equal(folds.fold_matrix, made.fold_matrix)


def _bad_file(kind: str, ids: pd.Series, labels: pd.Series):
    """A fold file for the dataset `ids` broken one way: (ids, folds, extra columns)."""
    ids, labels = list(ids), list(labels)
    fold = [i % 3 for i in range(len(ids))]
    if kind == "duplicate":
        return ids + [ids[5]], fold + [0], {}
    if kind == "unknown":
        return ids[:-2] + ["zz1.jpg", "zz2.jpg"], fold, {}
    if kind == "missing":
        return ids[:-1], fold[:-1], {}
    if kind == "gap":
        return ids, [0 if f == 1 else f for f in fold], {}
    if kind == "one_fold":
        return ids, [0] * len(ids), {}
    if kind == "class_in_one_fold":
        return ids, [2 if y == "tungro" else i % 2 for i, y in enumerate(labels)], {}
    if kind == "not_integer":
        return ids, fold[:-1] + ["1.5"], {}
    if kind == "label":
        return ids, fold, {"label": ["blast"] * len(ids)}
    if kind == "repeat_duplicate":
        return ids + ids, fold + fold, {"repeat": [0] * len(ids) + [1] * (len(ids) - 1) + [0]}
    raise AssertionError(kind)


@pytest.mark.parametrize("kind, match", [
    ("duplicate", r"my_folds\.csv: duplicate ids, first 'img005\.jpg'"),
    ("unknown", r"my_folds\.csv: 2 id\(s\) that are not train ids, first 'zz1\.jpg', 'zz2\.jpg'; the file must be "
                r"made for this dataset"),
    ("missing", r"my_folds\.csv: 1 train id\(s\) missing, first 'img\d+\.jpg'"),
    ("gap", r"my_folds\.csv: folds must be 0\.\.K-1 with every fold used, got \[0, 2\]$"),
    ("one_fold", r"my_folds\.csv: needs at least 2 folds, got 1"),
    ("class_in_one_fold", r"my_folds\.csv: fold 2's training part has no 'tungro' image \(all \d+ are in fold 2\); "
                          r"every fold model must see every class"),
    ("not_integer", r"my_folds\.csv: fold must be an integer; first bad ids 'img\d+\.jpg'"),
    ("label", r"my_folds\.csv: label differs from the train data's for ids 'img\d+\.jpg'"),
    ("repeat_duplicate", r"my_folds\.csv repeat 0: duplicate ids, first 'img\d+\.jpg'"),
])
def test_bad_fold_files_are_refused_naming_file_rule_and_ids(tmp_path, kind, match):
    ids, labels = _dataset()
    file_ids, fold, extra = _bad_file(kind, ids, labels)
    table = pd.DataFrame({"id": file_ids, "fold": fold, **extra})
    table.to_csv(tmp_path / "my_folds.csv", index=False)
    with pytest.raises(StackerError, match=match):
        read_fold_file(tmp_path / "my_folds.csv", ids, labels)


def test_fold_file_without_fold_column(tmp_path):
    (tmp_path / "f.csv").write_text("image,fold\na,0\n")
    with pytest.raises(StackerError, match=r"f\.csv: missing column\(s\) \['id'\]; a folds file has id, fold"):
        read_fold_file(tmp_path / "f.csv", ["a", "b"], ["x", "y"])


# ---------------------------------------------------------------- the folds: config


def test_default_folds_config_is_todays_stratified_assignment():
    train = _patients()
    cfg = build_config(FoldsConfig, {"k": 5, "seed": 7}, "folds")
    assert (cfg.repeats, cfg.group_column, cfg.file) == (1, None, None)
    made = cfg.assign(train, CLASSES)
    assert made.repeats == 1 and made.sha256 == make_folds(train["id"], train["label"], 5, 7, CLASSES).sha256
    grouped = build_config(FoldsConfig, {"k": 5, "repeats": 2, "group_column": "patient"}, "folds").assign(train,
                                                                                                           CLASSES)
    assert grouped.repeats == 2 and (_folds_per_group(train["patient"], grouped.fold_matrix[1]) == 1).all()


@pytest.mark.parametrize("section, match", [
    ({"repeats": 0}, r"folds\.repeats: expected an integer >= 1, got 0"),
    ({"repeats": 2.5}, r"folds\.repeats: expected an integer >= 1"),
    ({"group_column": ""}, r"folds\.group_column: expected a non-empty string or null"),
    ({"file": 3}, r"folds\.file: expected a non-empty string or null, got 3"),
])
def test_folds_config_rules(section, match):
    with pytest.raises(StackerError, match=match):
        build_config(FoldsConfig, section, "folds")


def test_folds_file_resolves_where_data_root_does_and_must_agree_on_k_and_repeats(tmp_path, monkeypatch):
    train = _patients()
    made = make_folds(train["id"], train["label"], k=4, seed=1, repeats=2)
    _write_file(tmp_path / "my_folds.csv", made.table["id"], made.table["fold"], made.table["repeat"])
    monkeypatch.chdir(tmp_path)
    cfg = build_config(FoldsConfig, {"k": 4, "repeats": 2, "file": "my_folds.csv"}, "folds")
    assert cfg.file == str(tmp_path.resolve() / "my_folds.csv")
    assert cfg.assign(train, CLASSES).sha256 == made.sha256
    for section in ({"k": 5, "repeats": 2}, {"k": 4}):
        wrong = build_config(FoldsConfig, {**section, "file": "my_folds.csv"}, "folds")
        with pytest.raises(StackerError, match=r"folds\.file: .*my_folds\.csv holds k=4 folds in 2 repeat\(s\), but "
                                               r"folds\.k is \d and folds\.repeats \d; set them to the file's"):
            wrong.assign(train, CLASSES)
    grouped = build_config(FoldsConfig, {"k": 4, "repeats": 2, "file": "my_folds.csv", "group_column": "patient"},
                           "folds")
    with pytest.raises(StackerError, match=r"folds\.file: .*my_folds\.csv repeat 0: group 'p\d\d' straddles"):
        grouped.assign(train, CLASSES)


def test_a_run_keeps_its_folds_and_refuses_a_changed_file(tmp_path):
    """train-base's fold step: made once, then checked against the config and the file on every call."""
    from base_models.jobs import _run_folds
    from oof import DataEdits

    train = _patients()
    spec = DatasetSpec(train.assign(path="unused"), pd.DataFrame({"id": [], "path": []}), CLASSES)
    made = make_folds(train["id"], train["label"], k=3, seed=2, repeats=2)
    _write_file(tmp_path / "my_folds.csv", made.table["id"], made.table["fold"], made.table["repeat"])
    cfg = build_config(FoldsConfig, {"k": 3, "repeats": 2, "file": str(tmp_path / "my_folds.csv")}, "folds")
    paths, lines = RunPaths(tmp_path / "run"), []
    first = _run_folds(paths, spec, cfg, DataEdits(), False, lines.append)
    assert lines == [f"folds: k=3 seed=None repeats=2 file={cfg.file} -> {paths.folds}"]
    assert load_folds(paths.folds).sha256 == first.sha256 == made.sha256
    assert _run_folds(paths, spec, cfg, DataEdits(), False, lines.append).sha256 == made.sha256 and len(lines) == 1
    other = make_folds(train["id"], train["label"], k=3, seed=3, repeats=2)
    _write_file(tmp_path / "my_folds.csv", other.table["id"], other.table["fold"], other.table["repeat"])
    with pytest.raises(StackerError, match=r"folds\.parquet: made from another dataset or folds config"):
        _run_folds(paths, spec, cfg, DataEdits(), False, lines.append)
