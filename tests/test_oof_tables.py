"""oof.tables and oof.atomic: the prediction-table contract, checked on real parquet and CSV files."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from oof import (PredictionTable, StackerError, atomic_path, make_folds, read_json, read_table, validate_oof,
                 validate_test, write_json, write_table, write_text)

CLASSES = ("blast", "healthy", "tungro")
N = 12


@pytest.fixture
def folds():
    ids = [f"id{i:02d}" for i in range(N)]
    labels = [CLASSES[i % 3] for i in range(N)]
    return make_folds(ids, labels, k=3, seed=1)


def _oof_frame(folds) -> pd.DataFrame:
    p = np.random.default_rng(0).dirichlet(np.ones(len(CLASSES)), size=N)
    return pd.concat([pd.DataFrame({"id": folds.ids, "fold": folds.fold}),
                      pd.DataFrame(p, columns=list(CLASSES))], axis=1)


def _table(folds, **meta) -> PredictionTable:
    df = _oof_frame(folds)
    return PredictionTable(df["id"].to_numpy(dtype=object), df[list(CLASSES)].to_numpy(), CLASSES,
                           df["fold"].to_numpy(), dict(meta))


def _files_in(folder):
    return sorted(p.name for p in folder.iterdir())


def test_parquet_round_trip_keeps_values_and_metadata(tmp_path, folds):
    meta = {"model": "resnet", "folds_sha256": folds.sha256, "tta": {"n": 4, "beta": 0.25}, "version": "0.1.0"}
    t = _table(folds, **meta)
    path = tmp_path / "preds" / "resnet" / "oof.parquet"
    write_table(path, t)
    back = read_table(path, CLASSES, "oof")
    assert list(back.ids) == list(t.ids) and back.classes == CLASSES
    np.testing.assert_array_equal(back.proba, t.proba)
    np.testing.assert_array_equal(back.fold, t.fold)
    assert back.meta == meta and back.source == str(path)
    assert list(pq.read_schema(path).names) == ["id", "fold", *CLASSES]
    assert _files_in(path.parent) == ["oof.parquet"]


def test_csv_round_trip_keeps_string_ids(tmp_path):
    # ids that look like numbers must stay strings ("007" is not 7)
    df = pd.DataFrame({"id": ["007", "010", "100"], "a": [0.25, 1.0, 0.0], "b": [0.75, 0.0, 1.0]})
    path = tmp_path / "test.csv"
    write_text(path, df.to_csv(index=False))
    back = read_table(path, ["a", "b"], "test")
    assert list(back.ids) == ["007", "010", "100"] and back.fold is None and back.meta == {}
    np.testing.assert_allclose(back.proba, df[["a", "b"]].to_numpy(), rtol=0, atol=1e-15)



def test_csv_ids_that_look_like_missing_values_stay_ids(tmp_path):
    path = tmp_path / "test.csv"
    path.write_text("id,a,b\nNA,0.5,0.5\nnull,0.2,0.8\n")
    assert list(read_table(path, ["a", "b"], "test").ids) == ["NA", "null"]

def test_oof_csv_round_trip(tmp_path, folds):
    t = _table(folds)
    path = tmp_path / "oof.csv"
    write_text(path, t.to_frame().to_csv(index=False))
    back = validate_oof(read_table(path, CLASSES, "oof"), folds)
    np.testing.assert_allclose(back.proba, t.proba, rtol=1e-15, atol=0)
    np.testing.assert_array_equal(back.fold, folds.fold)


def test_validate_oof_returns_rows_in_folds_order(tmp_path, folds):
    df = _oof_frame(folds)
    shuffled = df.iloc[np.random.default_rng(3).permutation(N)].reset_index(drop=True)
    assert list(shuffled["id"]) != list(folds.ids)
    path = tmp_path / "oof.parquet"
    shuffled.to_parquet(path, index=False)  # a foreign file: no metadata
    out = validate_oof(read_table(path, CLASSES, "oof"), folds)
    assert list(out.ids) == list(folds.ids)
    np.testing.assert_array_equal(out.fold, folds.fold)
    np.testing.assert_array_equal(out.proba, df[list(CLASSES)].to_numpy())


def _set(row, **values):
    def edit(df):
        df = df.copy()
        for col, v in values.items():
            df[col] = df[col].astype(object if isinstance(v, str) else float)
            df.loc[row, col] = v
        return df
    return edit


def _extra_row(df):
    row = df.iloc[[0]].assign(id="stranger.jpg")
    return pd.concat([df, row], ignore_index=True)


def _other_fold(df):
    df = df.copy()
    df.loc[7, "fold"] = (df.loc[7, "fold"] + 1) % 3
    return df


# (case, edit of a valid OOF frame, rule the message must name); ids are id00..id11
IN_01 = r"probabilities must lie in \[0, 1\]"
OOF_ERRORS = [
    ("missing-class", lambda df: df.drop(columns=["healthy"]), r"missing column\(s\) \['healthy'\]"),
    ("missing-fold", lambda df: df.drop(columns=["fold"]), r"missing column\(s\) \['fold'\]"),
    ("extra-column", lambda df: df.assign(variety="x"), r"unexpected column\(s\) \['variety'\]"),
    ("nan", _set(2, blast=np.nan), r"probabilities must be finite numbers; first bad ids 'id02'"),
    ("text", _set(2, blast="high"), r"probabilities must be finite numbers; first bad ids 'id02'"),
    ("negative", _set(3, blast=-0.1, healthy=0.6, tungro=0.5), IN_01 + r"; first bad ids 'id03'"),
    ("above-1", _set(3, blast=1.5, healthy=0.0, tungro=0.0), IN_01 + r"; first bad ids 'id03'"),
    ("sum", _set(4, blast=0.5, healthy=0.3, tungro=0.1),
     r"each row must sum to 1 within 0\.0001; first bad ids 'id04'"),
    ("duplicate-id", _set(5, id="id04"), r"duplicate ids, first 'id04'"),
    ("blank-id", _set(5, id=" "), r"blank id in row\(s\) '5'"),
    ("missing-id", lambda df: df.drop(index=6), r"1 train id\(s\) missing, first 'id06'"),
    ("extra-id", _extra_row, r"1 id\(s\) that are not train ids, first 'stranger\.jpg'"),
    ("other-fold", _other_fold, r"fold differs from folds\.parquet.*first bad ids 'id07'"),
    ("fractional-fold", _set(8, fold=1.5), r"fold must be an integer; first bad ids 'id08'"),
]


@pytest.mark.parametrize("suffix", ["csv", "parquet"])
@pytest.mark.parametrize("edit, match", [c[1:] for c in OOF_ERRORS], ids=[c[0] for c in OOF_ERRORS])
def test_bad_oof_table_is_refused(tmp_path, folds, edit, match, suffix):
    df = edit(_oof_frame(folds))
    path = tmp_path / f"oof_bad.{suffix}"
    if suffix == "csv":
        df.to_csv(path, index=False)
    else:
        df.astype({c: str for c in df.columns if df[c].dtype == object}).to_parquet(path, index=False)
    with pytest.raises(StackerError, match=rf"oof_bad\.{suffix}: {match}"):
        validate_oof(read_table(path, CLASSES, "oof"), folds)


def test_oof_from_another_fold_assignment_is_refused(tmp_path, folds):
    other = make_folds(folds.ids, folds.table["label"], k=3, seed=2)
    path = tmp_path / "oof_bad.parquet"
    write_table(path, _table(folds, model="m", folds_sha256=other.sha256))
    with pytest.raises(StackerError, match=rf"oof_bad\.parquet: was made on another fold assignment "
                                           rf"\(folds sha256 {other.sha256[:12]} != {folds.sha256[:12]}\)"):
        validate_oof(read_table(path, CLASSES, "oof"), folds)


def test_oof_with_classes_in_another_order_is_refused(tmp_path, folds):
    path = tmp_path / "oof_bad.parquet"
    write_table(path, _table(folds))
    reordered = ("tungro", "blast", "healthy")
    with pytest.raises(StackerError, match=r"oof_bad\.parquet: classes \['tungro', 'blast', 'healthy'\] "
                                           r"differ from the folds' \['blast', 'healthy', 'tungro'\]"):
        validate_oof(read_table(path, reordered, "oof"), folds)


def test_validate_test_orders_rows_and_names_missing_ids(tmp_path):
    df = pd.DataFrame({"id": ["c", "a", "b"], "x": [0.1, 0.2, 0.3], "y": [0.9, 0.8, 0.7]})
    path = tmp_path / "test.parquet"
    df.to_parquet(path, index=False)
    t = validate_test(read_table(path, ["x", "y"], "test"), ["a", "b", "c"], ["x", "y"])
    assert list(t.ids) == ["a", "b", "c"]
    np.testing.assert_array_equal(t.proba[:, 0], [0.2, 0.3, 0.1])
    with pytest.raises(StackerError, match=r"test\.parquet: 1 test id\(s\) missing, first 'd'"):
        validate_test(read_table(path, ["x", "y"], "test"), ["a", "b", "c", "d"], ["x", "y"])


@pytest.mark.parametrize("name, content, match", [
    ("absent.parquet", None, r"absent\.parquet: prediction table not found"),
    ("junk.parquet", b"PAR1 but not really", r"junk\.parquet: not a readable parquet file"),
])
def test_unreadable_table(tmp_path, name, content, match):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(StackerError, match=match):
        read_table(path, CLASSES, "oof")


def test_atomic_writes_leave_no_temporary_file(tmp_path):
    write_text(tmp_path / "a.txt", "one")
    write_text(tmp_path / "a.txt", "two")
    write_json(tmp_path / "b.json", {"n": np.int64(3), "x": np.arange(2)})
    assert (tmp_path / "a.txt").read_text() == "two"
    assert read_json(tmp_path / "b.json") == {"n": 3, "x": [0, 1]}
    assert _files_in(tmp_path) == ["a.txt", "b.json"]


def test_exception_inside_atomic_path_keeps_old_file(tmp_path):
    target = tmp_path / "oof.parquet"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="crash"):
        with atomic_path(target) as tmp:
            assert tmp.parent == tmp_path and tmp != target
            tmp.write_text("half-written")
            raise RuntimeError("crash")
    assert target.read_text() == "old"
    assert _files_in(tmp_path) == ["oof.parquet"]



# ---------------------------------------------------------------- repeats (folds.repeats R > 1)

@pytest.fixture
def folds3():
    ids = [f"id{i:02d}" for i in range(N)]
    return make_folds(ids, [CLASSES[i % 3] for i in range(N)], k=3, seed=1, repeats=3)


def _repeat_frame(folds3) -> pd.DataFrame:
    """An OOF frame of every repeat: id, repeat, fold, classes; repeat-major, each repeat's rows shuffled."""
    rng = np.random.default_rng(0)
    parts = []
    for r, one in enumerate(folds3.each_repeat()):
        p = rng.dirichlet(np.ones(len(CLASSES)), size=N)
        part = pd.concat([pd.DataFrame({"id": one.ids, "repeat": r, "fold": one.fold}),
                          pd.DataFrame(p, columns=list(CLASSES))], axis=1)
        parts.append(part.iloc[rng.permutation(N)])
    return pd.concat(parts, ignore_index=True)


@pytest.mark.parametrize("suffix", ["csv", "parquet"])
def test_repeat_tables_round_trip_and_come_back_repeat_major_in_folds_order(tmp_path, folds3, suffix):
    df = _repeat_frame(folds3)
    path = tmp_path / f"oof.{suffix}"
    df.to_csv(path, index=False) if suffix == "csv" else df.to_parquet(path, index=False)
    out = validate_oof(read_table(path, CLASSES, "oof"), folds3)
    assert list(out.ids) == list(folds3.ids) * 3
    np.testing.assert_array_equal(out.repeat, np.repeat([0, 1, 2], N))
    np.testing.assert_array_equal(out.fold, folds3.fold_matrix.ravel())
    want = df.set_index(["repeat", "id"]).loc[list(zip(out.repeat, out.ids)), list(CLASSES)].to_numpy()
    np.testing.assert_allclose(out.proba, want, rtol=1e-15, atol=0)
    written = tmp_path / "back.parquet"
    write_table(written, PredictionTable(out.ids, out.proba, CLASSES, out.fold, {"folds_sha256": folds3.sha256},
                                         repeat=out.repeat))
    assert list(pq.read_schema(written).names) == ["id", "repeat", "fold", *CLASSES]
    np.testing.assert_array_equal(validate_oof(read_table(written, CLASSES, "oof"), folds3).proba, out.proba)


def _other_repeat_fold(df):
    df = df.copy()
    row = df.index[(df["repeat"] == 2) & (df["id"] == "id05")][0]
    df.loc[row, "fold"] = (df.loc[row, "fold"] + 1) % 3
    return df


REPEAT_ERRORS = [
    ("no-repeat-column", lambda df: df[df["repeat"] == 0].drop(columns=["repeat"]),
     r": has no repeat column, but the folds hold 3 repeat\(s\)"),
    ("two-repeats", lambda df: df[df["repeat"] < 2], r": has 2 repeat\(s\) in its repeat column, but the folds hold 3"),
    ("other-fold", _other_repeat_fold, r" repeat 2: fold differs from folds\.parquet.*first bad ids 'id05'"),
    ("duplicate-in-repeat", lambda df: pd.concat([df, df[(df["repeat"] == 1) & (df["id"] == "id03")]]),
     r" repeat 1: duplicate ids, first 'id03'"),
    ("missing-in-repeat", lambda df: df[~((df["repeat"] == 1) & (df["id"] == "id07"))],
     r" repeat 1: 1 train id\(s\) missing, first 'id07'"),
    ("negative-repeat", lambda df: df.assign(repeat=df["repeat"].where(df["id"] != "id09", -1)),
     r": repeat must be 0\.\.R-1; first bad ids 'id09'"),
    ("fractional-repeat", lambda df: df.assign(repeat=df["repeat"].astype(float).where(df["id"] != "id01", 0.5)),
     r": repeat must be an integer; first bad ids 'id01'"),
]


@pytest.mark.parametrize("edit, match", [c[1:] for c in REPEAT_ERRORS], ids=[c[0] for c in REPEAT_ERRORS])
def test_bad_repeat_table_is_refused(tmp_path, folds3, edit, match):
    path = tmp_path / "oof_bad.csv"
    edit(_repeat_frame(folds3)).to_csv(path, index=False)
    with pytest.raises(StackerError, match=rf"oof_bad\.csv{match}"):
        validate_oof(read_table(path, CLASSES, "oof"), folds3)


def test_repeat_table_against_one_assignment_is_refused_and_repeat_zero_alone_is_one(tmp_path, folds, folds3):
    path = tmp_path / "oof_bad.csv"
    _repeat_frame(folds3).to_csv(path, index=False)
    with pytest.raises(StackerError, match=r"oof_bad\.csv: has 3 repeat\(s\) in its repeat column, but the folds "
                                           r"hold 1 repeat\(s\)"):
        validate_oof(read_table(path, CLASSES, "oof"), folds)
    # another tool's single assignment may still write repeat = 0: that is one repeat, read as today's table
    one = tmp_path / "oof.csv"
    _oof_frame(folds).assign(repeat=0).to_csv(one, index=False)
    out = validate_oof(read_table(one, CLASSES, "oof"), folds)
    assert out.repeat is None and list(out.ids) == list(folds.ids)
    # a one-repeat table records that repeat's digest, which is not the whole run's
    single = tmp_path / "oof_one.parquet"
    write_table(single, PredictionTable(folds.ids, _table(folds).proba, CLASSES, folds.fold,
                                        {"folds_sha256": folds3.for_repeat(0).sha256}))
    with pytest.raises(StackerError, match=r"oof_one\.parquet: was made on another fold assignment"):
        validate_oof(read_table(single, CLASSES, "oof"), folds3)
