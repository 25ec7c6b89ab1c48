"""oof.folds: stratified assignment, reproducibility, the folds.parquet contract and foreign folds."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from oof import StackerError, folds_from_table, load_folds, make_folds, repeat_seed, write_folds
from oof.folds import META_KEY

# 3 classes of unequal size (23 + 17 + 11 = 51 rows), labels interleaved so row order says nothing.
COUNTS = {"blast": 23, "healthy": 17, "tungro": 11}


def _rows():
    labels = [c for c, n in COUNTS.items() for _ in range(n)]
    order = np.random.default_rng(0).permutation(len(labels))
    ids = [f"img{i:03d}.jpg" for i in range(len(labels))]
    return ids, [labels[j] for j in order]


@pytest.fixture
def folds():
    ids, labels = _rows()
    return make_folds(ids, labels, k=5, seed=7)


@pytest.mark.parametrize("k, seed", [(2, 0), (5, 7), (5, 8), (11, 3)])  # 11: the smallest class's size
def test_folds_are_stratified_and_balanced(k, seed):
    ids, labels = _rows()
    folds = make_folds(ids, labels, k=k, seed=seed)
    t = folds.table
    assert folds.k == k and folds.seed == seed and folds.classes == ("blast", "healthy", "tungro")
    assert sorted(set(t["fold"])) == list(range(k))
    sizes = t["fold"].value_counts()
    assert sizes.max() - sizes.min() <= 1
    assert sizes.sum() == sum(COUNTS.values())
    for c, n in COUNTS.items():
        per_fold = t.loc[t["label"] == c, "fold"].value_counts().reindex(range(k), fill_value=0)
        # each class is dealt in turn: every fold gets floor(n/k) or ceil(n/k) of it
        assert per_fold.min() == n // k and per_fold.max() == -(-n // k), (c, per_fold.tolist())


def test_folds_keep_input_rows_and_helpers(folds):
    ids, labels = _rows()
    assert list(folds.ids) == ids
    assert list(folds.table["label"]) == labels
    assert list(folds.y) == [folds.classes.index(y) for y in labels]
    for f in range(folds.k):
        valid, train = folds.valid_rows(f), folds.train_rows(f)
        assert set(valid).isdisjoint(train) and len(valid) + len(train) == len(ids)
        assert (folds.fold[valid] == f).all()


def test_same_seed_same_folds_other_seed_other_folds():
    ids, labels = _rows()
    a, b = make_folds(ids, labels, k=5, seed=7), make_folds(ids, labels, k=5, seed=7)
    c = make_folds(ids, labels, k=5, seed=8)
    np.testing.assert_array_equal(a.fold, b.fold)
    assert a.sha256 == b.sha256
    assert (a.fold != c.fold).any() and a.sha256 != c.sha256


@pytest.mark.parametrize("ids, labels, k, match", [
    (["a", "b", "c", "d"], ["x", "x", "y", "y"], 1, r"k must be an integer of at least 2, got 1"),
    (["a", "b", "c", "d"], ["x", "x", "y", "y"], 0, r"k must be an integer of at least 2, got 0"),
    (["a", "b", "c", "d"], ["x", "x", "y", "y"], 2.0, r"k must be an integer of at least 2, got 2\.0"),
    # class 'y' has 2 images < k=3; the smallest class says which k would work
    (["a", "b", "c", "d", "e"], ["x", "x", "x", "y", "y"], 3,
     r"class 'y' has 2 images, fewer than k=3.*k <= 2 would work"),
    (["a", "b", "a", "d"], ["x", "x", "y", "y"], 2, r"train ids: duplicate ids, first 'a'"),
    (["a", " ", "c", "d"], ["x", "x", "y", "y"], 2, r"train ids: blank id in row\(s\) '1'"),
    (["a", "b", "c", "d"], ["x", "", "y", "y"], 2, r"train ids: blank label in row\(s\) '1'"),
    (["a", "b", "c", "d"], ["x", "x", "fold", "fold"], 2, r"class 'fold' is also a column name"),
    (["a", "b", "c", "d"], ["x", "x", "x", "x"], 2, r"1 class\(es\) \['x'\]; classification needs at least 2"),
])
def test_make_folds_errors(ids, labels, k, match):
    with pytest.raises(StackerError, match=match):
        make_folds(ids, labels, k=k, seed=0)


def test_one_image_class_message_does_not_suggest_k_below_2():
    with pytest.raises(StackerError, match=r"class 'y' has 1 images, fewer than k=2") as e:
        make_folds(["a", "b", "c", "d"], ["x", "x", "x", "y"], k=2, seed=0)
    assert "k <= 1" not in str(e.value)


def test_make_folds_refuses_label_outside_given_classes():
    with pytest.raises(StackerError, match=r"'z'"):
        make_folds(list("abcdef"), list("xxyyzz"), k=2, seed=0, classes=["x", "y"])


def test_write_load_round_trip_keeps_metadata(tmp_path, folds):
    path = tmp_path / "run" / "folds.parquet"
    write_folds(path, folds)
    meta = json.loads(pq.read_schema(path).metadata[META_KEY])
    assert meta == {"k": 5, "seed": 7, "classes": ["blast", "healthy", "tungro"], "sha256": folds.sha256}
    back = load_folds(path)
    assert (back.k, back.seed, back.classes, back.sha256) == (folds.k, folds.seed, folds.classes, folds.sha256)
    pd.testing.assert_frame_equal(back.table, folds.table)
    assert [p.name for p in path.parent.iterdir()] == ["folds.parquet"]  # no temporary file left


def test_classes_order_is_kept_through_file(tmp_path):
    f = make_folds(["a", "b", "c", "d"], ["x", "x", "y", "y"], k=2, seed=0, classes=["y", "x"])
    write_folds(tmp_path / "folds.parquet", f)
    back = load_folds(tmp_path / "folds.parquet")
    assert back.classes == ("y", "x")
    assert list(back.y) == [1, 1, 0, 0]


def _rewrite_keeping_metadata(path, edit):
    table = pq.read_table(path)
    df = edit(table.to_pandas())
    new = pa.Table.from_pandas(df, preserve_index=False).replace_schema_metadata(table.schema.metadata)
    pq.write_table(new, path)


def _move_first_row_to_next_fold(df):
    df.loc[0, "fold"] = (df.loc[0, "fold"] + 1) % 5
    return df


def _relabel_first_row(df):
    df.loc[0, "label"] = "healthy" if df.loc[0, "label"] != "healthy" else "blast"
    return df


@pytest.mark.parametrize("edit", [_move_first_row_to_next_fold, _relabel_first_row,
                                  lambda df: df.iloc[1:].reset_index(drop=True)],
                         ids=["fold", "label", "dropped-row"])
def test_tampered_folds_file_is_refused(tmp_path, folds, edit):
    path = tmp_path / "folds.parquet"
    write_folds(path, folds)
    _rewrite_keeping_metadata(path, edit)
    assert META_KEY in pq.read_schema(path).metadata
    with pytest.raises(StackerError, match=rf"{path.name}: ids, labels or folds were changed.*sha256"):
        load_folds(path)


def test_foreign_csv_folds_load(tmp_path):
    path = tmp_path / "my_folds.csv"
    path.write_text("id,label,fold\n001.jpg,a,0\n002.jpg,b,1\n003.jpg,a,1\n004.jpg,b,0\n005.jpg,a,2\n")
    f = load_folds(path)
    assert f.k == 3 and f.seed is None and f.classes == ("a", "b")
    assert list(f.ids) == ["001.jpg", "002.jpg", "003.jpg", "004.jpg", "005.jpg"]
    assert list(f.fold) == [0, 1, 1, 0, 2]
    # the digest is the one our own file would carry for the same rows
    assert f.sha256 == folds_from_table(f.table, "memory").sha256
    # the same assignment re-sorted is the same assignment
    resorted = tmp_path / "resorted.csv"
    f.table.iloc[::-1].to_csv(resorted, index=False)
    assert load_folds(resorted).sha256 == f.sha256


def test_foreign_parquet_without_metadata_loads(tmp_path):
    path = tmp_path / "f.parquet"
    pd.DataFrame({"id": ["1", "2", "3", "4"], "label": ["a", "b", "a", "b"], "fold": [0, 0, 1, 1]}).to_parquet(path)
    f = load_folds(path)
    assert f.k == 2 and f.seed is None and list(f.fold) == [0, 0, 1, 1]


@pytest.mark.parametrize("csv, match", [
    ("id,label,fold\n1,a,0\n2,b,x\n3,a,1\n", r"bad\.csv: fold must be an integer; first bad ids '2'"),
    ("id,label,fold\n1,a,0\n2,b,1.5\n3,a,1\n", r"bad\.csv: fold must be an integer; first bad ids '2'"),
    ("id,label,fold\n1,a,0\n2,b,\n3,a,1\n", r"bad\.csv: fold must be an integer; first bad ids '2'"),
    ("id,label,fold\n1,a,0\n2,b,2\n3,a,2\n", r"bad\.csv: folds must be 0\.\.K-1 with every fold used, got"),
    ("id,label,fold\n1,a,1\n2,b,2\n3,a,1\n", r"bad\.csv: folds must be 0\.\.K-1 with every fold used, got"),
    ("id,label,fold\n1,a,-1\n2,b,0\n", r"bad\.csv: folds must be 0\.\.K-1 with every fold used, got"),
    ("id,label\n1,a\n2,b\n", r"bad\.csv: missing column\(s\) \['fold'\]"),
    ("image,label,fold\n1,a,0\n2,b,1\n", r"bad\.csv: missing column\(s\) \['id'\]"),
    ("id,label,fold\n1,a,0\n1,b,1\n", r"bad\.csv: duplicate ids, first '1'"),
])
def test_bad_foreign_folds(tmp_path, csv, match):
    path = tmp_path / "bad.csv"
    path.write_text(csv)
    with pytest.raises(StackerError, match=match):
        load_folds(path)


def test_fold_gap_message_lists_plain_integers(tmp_path):
    path = tmp_path / "gap.csv"
    path.write_text("id,label,fold\n1,a,0\n2,b,2\n3,a,2\n")
    with pytest.raises(StackerError, match=r"gap\.csv: folds must be 0\.\.K-1 with every fold used, got \[0, 2\]$"):
        load_folds(path)


def test_foreign_folds_with_one_fold_are_refused(tmp_path):
    path = tmp_path / "one.csv"
    path.write_text("id,label,fold\n1,a,0\n2,b,0\n3,a,0\n")
    with pytest.raises(StackerError, match=r"one\.csv: .*fold"):
        load_folds(path)


@pytest.mark.parametrize("name, content, match", [
    ("absent.parquet", None, r"absent\.parquet: folds file not found"),
    ("junk.parquet", b"not a parquet file", r"junk\.parquet: not a readable parquet file"),
])
def test_unreadable_folds_file(tmp_path, name, content, match):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(StackerError, match=match):
        load_folds(path)


def test_a_folds_file_of_stacker_0_1_0_keeps_its_row_order_digest(tmp_path):
    """0.1.0 hashed rows in file order; its files load, with the digest their tables carry."""
    import hashlib
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    folds = make_folds([f"i{9 - n}" for n in range(8)], list("aabbaabb"), k=2, seed=0)  # not in id order
    legacy = hashlib.sha256("".join(f"{i}\t{y}\t{f}\n" for i, y, f in folds.table.itertuples(index=False))
                            .encode()).hexdigest()
    table = pa.Table.from_pandas(folds.table, preserve_index=False)
    meta = {"k": 2, "seed": 0, "classes": ["a", "b"], "sha256": legacy}
    pq.write_table(table.replace_schema_metadata({META_KEY: json.dumps(meta).encode()}), tmp_path / "f.parquet")
    assert load_folds(tmp_path / "f.parquet").sha256 == legacy != folds.sha256


# ---------------------------------------------------------------- repeats

# The assignment and digest of `make_folds(_rows(), k=5, seed=7)` with one repeat: the file every one-repeat run
# has written, pinned so that repeats can never change it.
ONE_REPEAT_SHA256 = "7533144c0effd84980a6acf24ba2002d4ee8013b81d23a3cb2441be5bcc2fdfe"
ONE_REPEAT_FOLDS = "422004332410120102111123042340400304101423334342231"


def test_one_repeat_is_the_pinned_assignment_file_and_digest(tmp_path, folds):
    one = make_folds(*_rows(), k=5, seed=7, repeats=1)
    assert one.repeats == 1 and one.sha256 == folds.sha256 == ONE_REPEAT_SHA256
    assert "".join(map(str, one.fold)) == ONE_REPEAT_FOLDS
    assert one.for_repeat(0) is one and one.each_repeat() == [one]
    write_folds(tmp_path / "default.parquet", folds)
    write_folds(tmp_path / "one.parquet", one)
    assert (tmp_path / "one.parquet").read_bytes() == (tmp_path / "default.parquet").read_bytes()
    assert pq.read_schema(tmp_path / "one.parquet").names == ["id", "label", "fold"]
    assert set(json.loads(pq.read_schema(tmp_path / "one.parquet").metadata[META_KEY])) == {"k", "seed", "classes",
                                                                                          "sha256"}


def test_repeats_round_trip_through_the_file_with_their_digest(tmp_path):
    ids, labels = _rows()
    three = make_folds(ids, labels, k=5, seed=7, repeats=3)
    path = tmp_path / "folds.parquet"
    write_folds(path, three)
    meta = json.loads(pq.read_schema(path).metadata[META_KEY])
    assert meta == {"k": 5, "seed": 7, "classes": ["blast", "healthy", "tungro"], "sha256": three.sha256, "repeats": 3}
    saved = pd.read_parquet(path)
    assert list(saved.columns) == ["id", "label", "fold", "repeat"] and len(saved) == 3 * len(ids)
    assert list(saved["repeat"]) == [r for r in range(3) for _ in ids]
    back = load_folds(path)
    assert (back.repeats, back.k, back.seed, back.classes, back.sha256) == (3, 5, 7, three.classes, three.sha256)
    np.testing.assert_array_equal(back.fold_matrix, three.fold_matrix)
    assert list(back.ids) == ids and list(back.y) == [back.classes.index(y) for y in labels]
    # repeat 0 is the single assignment; each view is what one repeat drawn with its own seed is
    assert back.for_repeat(0).sha256 == ONE_REPEAT_SHA256
    for r, view in enumerate(back.each_repeat()):
        alone = make_folds(ids, labels, k=5, seed=repeat_seed(7, r))
        assert (view.repeats, view.seed, view.sha256) == (1, repeat_seed(7, r), alone.sha256)
        pd.testing.assert_frame_equal(view.table, alone.table)
    assert three.sha256 not in {v.sha256 for v in three.each_repeat()}
    assert make_folds(ids, labels, k=5, seed=7, repeats=3).sha256 == three.sha256  # deterministic
    assert make_folds(ids, labels, k=5, seed=7, repeats=2).sha256 != three.sha256


def test_repeats_differ_and_each_is_stratified():
    ids, labels = _rows()
    folds = make_folds(ids, labels, k=5, seed=7, repeats=3)
    assert repeat_seed(7, 0) == 7 and len({repeat_seed(7, r) for r in range(3)}) == 3
    m = folds.fold_matrix
    assert m.shape == (3, len(ids))
    for a, b in ((0, 1), (0, 2), (1, 2)):
        assert (m[a] != m[b]).mean() > 0.5, (a, b)
    for fold in m:
        t = pd.DataFrame({"label": labels, "fold": fold})
        for c, n in COUNTS.items():
            per_fold = t.loc[t["label"] == c, "fold"].value_counts().reindex(range(5), fill_value=0)
            assert per_fold.min() == n // 5 and per_fold.max() == -(-n // 5)


@pytest.mark.parametrize("use", [lambda f: f.fold, lambda f: f.train_rows(0), lambda f: f.valid_rows(0)],
                         ids=["fold", "train_rows", "valid_rows"])
def test_one_assignment_accessors_refuse_several_repeats(use):
    folds = make_folds(*_rows(), k=5, seed=7, repeats=2)
    with pytest.raises(StackerError, match=r"hold 2 repeats; take one with Folds\.for_repeat\(r\)"):
        use(folds)
    view = folds.for_repeat(1)
    assert len(view.valid_rows(0)) + len(view.train_rows(0)) == len(folds.ids) == 51


@pytest.mark.parametrize("repeat", [2, -1, "0"])
def test_for_repeat_outside_the_run_is_refused(repeat):
    with pytest.raises(StackerError, match=r"is not a repeat of the run \(0\.\.1\)"):
        make_folds(*_rows(), k=5, seed=7, repeats=2).for_repeat(repeat)


@pytest.mark.parametrize("repeats", [0, 1.0, True])
def test_make_folds_refuses_bad_repeats(repeats):
    with pytest.raises(StackerError, match=r"repeats must be an integer of at least 1"):
        make_folds(*_rows(), k=5, seed=7, repeats=repeats)


def _move_one_row_of_the_last_repeat(df):
    row = len(df) - 1
    df.loc[row, "fold"] = (df.loc[row, "fold"] + 1) % 5
    return df


def test_tampered_repeat_is_refused(tmp_path):
    path = tmp_path / "folds.parquet"
    write_folds(path, make_folds(*_rows(), k=5, seed=7, repeats=3))
    _rewrite_keeping_metadata(path, _move_one_row_of_the_last_repeat)
    with pytest.raises(StackerError, match=r"folds\.parquet: ids, labels or folds were changed.*sha256"):
        load_folds(path)


def test_foreign_csv_with_repeats_loads_in_first_repeat_order(tmp_path):
    path = tmp_path / "folds.csv"
    path.write_text("id,label,fold,repeat\n1,a,0,0\n2,b,0,0\n3,a,1,0\n4,b,1,0\n"
                    "4,b,0,1\n3,a,1,1\n2,b,1,1\n1,a,0,1\n")
    f = load_folds(path)
    assert (f.repeats, f.k, f.seed) == (2, 2, None)
    assert list(f.ids) == ["1", "2", "3", "4"]
    assert f.fold_matrix.tolist() == [[0, 0, 1, 1], [0, 1, 1, 0]]
    assert f.for_repeat(1).sha256 == folds_from_table(f.for_repeat(1).table, "memory").sha256


@pytest.mark.parametrize("rows, match", [
    ("1,a,0,0\n2,b,1,0\n1,a,0,2\n2,b,1,2\n", r"repeats must be 0\.\.R-1 with every repeat used, got \[0, 2\]"),
    ("1,a,0,0\n2,b,1,0\n1,a,0,1\n", r"bad\.csv repeat 1: 1 train id\(s\) missing, first '2'"),
    ("1,a,0,0\n2,b,1,0\n1,a,0,1\n1,a,1,1\n", r"bad\.csv repeat 1: duplicate ids, first '1'"),
    ("1,a,0,0\n2,b,1,0\n1,b,0,1\n2,b,1,1\n", r"bad\.csv: ids with another label in another repeat, first '1'"),
    ("1,a,0,0\n2,b,1,0\n3,a,0,0\n1,a,0,1\n2,b,1,1\n3,a,2,1\n",
     r"bad\.csv: repeat 1 has 3 folds, repeat 0 has 2; every repeat needs the same K"),
    ("1,a,0,0\n2,b,1,0\n1,a,0,x\n2,b,1,1\n", r"bad\.csv: repeat must be an integer; first bad ids '1'"),
])
def test_bad_foreign_repeats(tmp_path, rows, match):
    path = tmp_path / "bad.csv"
    path.write_text("id,label,fold,repeat\n" + rows)
    with pytest.raises(StackerError, match=match):
        load_folds(path)
