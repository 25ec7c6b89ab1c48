"""oof.folds: stratified assignment, reproducibility, the folds.parquet contract and foreign folds."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from oof import StackerError, folds_from_table, load_folds, make_folds, write_folds
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
