"""TTA views in table metadata: tables record the views they rendered, under a schema version.

A table made from other views under the same `tta.n` is stale; a schema-1 table (no views recorded)
means the frozen `SCHEMA1_VIEWS` of its n, so it stays current while those are the views a call would
render, and `stacker predict` renders them whatever `tta_views` gives.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import base_models.augment as augment
import base_models.predict_oof as predict_oof_module
from base_models.augment import View, tta_views
from base_models.config import DataConfig, TTAConfig, model_specs
from base_models.dataset import NewTestImages
from base_models.jobs import StageOptions
from base_models.predict_oof import predict_oof
from base_models.predict_run import SavedRun, predict_new_test
from base_models.table_schema import (SCHEMA1_VIEWS, TABLE_SCHEMA, is_current, recorded_views, stale_keys,
                                      view_records)
from oof.views import read_views
from oof import RunPaths, StackerError, read_table, write_table
from tiny import plain_copy, predicted_run

MODEL = "test_resnet"
TINY = {"size": 16, "epochs": 1, "freeze_epochs": 0, "batch_size": 32, "lr": 1e-2}
TTA = TTAConfig(n=2)
QUIET = StageOptions(log=lambda s: None)


def specs():
    return model_specs([{"arch": MODEL}], TINY)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_digits_dir):
    """One run, K=2, trained one epoch and predicted with n=2; tests work on copies of it."""
    return predicted_run(tmp_path_factory.mktemp("tta_views") / "run", small_digits_dir, specs(), TTA, k=2)


def copy_run(trained, dest: Path) -> RunPaths:
    return plain_copy(trained[0], dest)


def logged(fn, *args) -> list[str]:
    lines = []
    fn(*args, options=StageOptions(log=lines.append))
    return lines


def tables(paths: RunPaths, folds):
    """Every prediction table of the model: (path, its table); each view table (`oof.views`) as its view choice
    of every view, which records the same metadata."""
    for path in sorted(paths.preds_dir(MODEL).glob("*.parquet")):
        if "_views" in path.name:
            yield path, read_views(path, folds.classes).table(1, str(path))
        else:
            yield path, read_table(path, folds.classes, "test" if path.name.startswith("test") else "oof")


def as_schema_1(paths: RunPaths, folds) -> None:
    """Every table rewritten as schema-1 tables were: no `schema` key, `tta` without views."""
    for path in paths.preds_dir(MODEL).glob("*_views*.parquet"):
        path.unlink()  # schema-1 runs kept no view apart
    for path, table in list(tables(paths, folds)):
        meta = {k: v for k, v in table.meta.items() if k != "schema"}
        meta["tta"] = {k: v for k, v in meta["tta"].items() if k != "views"}
        write_table(path, replace(table, meta=meta))


def use_views(monkeypatch, views) -> None:
    """This checkout's `tta_views` replaced by `views`, wherever a stage could ask it."""
    monkeypatch.setattr(augment, "tta_views", views)
    monkeypatch.setattr(predict_oof_module, "tta_views", views)


def reordered(n):
    return tta_views(n)[::-1]


def inserted(n):  # a view added in front: n names other views
    return [View(zoom=0.7), *tta_views(n)][:n]


def replaced(n):  # another view in the last place
    return [*tta_views(n)[:-1], View(flip=True, zoom=0.6, cx=1.0, cy=-1.0)]


def snapshot(root: Path) -> dict:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(root.glob("*")) if p.is_file()}


# ---------------------------------------------------------------- predict-oof


def test_tables_record_schema_and_views(trained):
    paths, folds = trained
    for path, table in tables(paths, folds):
        assert table.meta["schema"] == TABLE_SCHEMA, path.name
        assert table.meta["tta"]["views"] == view_records(tta_views(2)), path.name
        assert recorded_views(table.meta) == tta_views(2)


@pytest.mark.parametrize("views", [reordered, inserted], ids=lambda f: f.__name__)
def test_other_views_under_the_same_n_are_predicted_again(trained, tmp_path, monkeypatch, views):
    paths, folds = copy_run(trained, tmp_path / "run"), trained[1]
    before = [read_table(paths.test_fold(MODEL, k), folds.classes, "test").proba for k in range(2)]
    use_views(monkeypatch, views)
    lines = logged(predict_oof, paths, specs(), folds, TTA)
    assert lines[0] == f"predict-oof: {MODEL}: oof.parquet was made from other tta views; predicting"
    assert "predict-oof: 2 fold jobs, 0 already predicted, 2 to run" in lines
    for path, table in tables(paths, folds):
        assert table.meta["tta"]["views"] == view_records(views(2)), path.name
    after = [read_table(paths.test_fold(MODEL, k), folds.classes, "test").proba for k in range(2)]
    if views is inserted:  # other pixels through the same weights: other probabilities
        assert all(np.abs(a - b).max() > 1e-6 for a, b in zip(after, before))
    assert "already predicted" in logged(predict_oof, paths, specs(), folds, TTA)[0]


def test_a_schema_1_run_stays_current(trained, tmp_path):
    paths, folds = copy_run(trained, tmp_path / "run"), trained[1]
    assert tta_views(2) == list(SCHEMA1_VIEWS[:2]), "this checkout's tta_views(2) is what schema 1's n: 2 means"
    as_schema_1(paths, folds)
    before = snapshot(paths.preds_dir(MODEL))
    assert "already predicted" in logged(predict_oof, paths, specs(), folds, TTA)[0]
    assert snapshot(paths.preds_dir(MODEL)) == before  # not one table written again
    paths.oof(MODEL).unlink()  # its schema-1 fold tables are current: assembled again, none predicted
    lines = logged(predict_oof, paths, specs(), folds, TTA)
    assert "predict-oof: 2 fold jobs, 2 already predicted, 0 to run" in lines
    assert any("OOF accuracy" in s for s in lines)


def test_a_schema_1_run_is_stale_under_other_views(trained, tmp_path, monkeypatch):
    """n: 2 of a schema-1 table names the frozen views, not what `tta_views(2)` gives now."""
    paths, folds = copy_run(trained, tmp_path / "run"), trained[1]
    as_schema_1(paths, folds)
    use_views(monkeypatch, replaced)
    lines = logged(predict_oof, paths, specs(), folds, TTA)
    assert lines[0] == f"predict-oof: {MODEL}: oof.parquet was made from other tta views; predicting"
    assert "predict-oof: 2 fold jobs, 0 already predicted, 2 to run" in lines


# ---------------------------------------------------------------- stacker predict


def new_test(run: RunPaths, data: Path, out: Path) -> RunPaths:
    """`stacker predict` of the run's own test images into `out`."""
    saved = SavedRun(run, DataConfig(root=str(data)), specs(), TTA)
    images = NewTestImages(data / "test_images", sample_submission=data / "sample_submission.csv")
    predict_new_test(saved, [MODEL], images, RunPaths(out), QUIET)
    return RunPaths(out)


def test_stacker_predict_renders_a_schema_1_runs_frozen_views(trained, tmp_path, monkeypatch, small_digits_dir):
    paths, folds = copy_run(trained, tmp_path / "run"), trained[1]
    as_schema_1(paths, folds)
    use_views(monkeypatch, inserted)  # this checkout's n: 2 renders other views (other numbers: see above)
    out = new_test(paths, small_digits_dir, tmp_path / "pred")
    for k in range(2):
        new, old = (read_table(p.test_fold(MODEL, k), folds.classes, "test") for p in (out, paths))
        assert list(new.ids) == list(old.ids)
        np.testing.assert_allclose(new.proba, old.proba, atol=1e-6, rtol=0)
        assert new.meta["schema"] == TABLE_SCHEMA and new.meta["tta"]["views"] == view_records(SCHEMA1_VIEWS[:2])
    lines = []
    predict_new_test(SavedRun(paths, DataConfig(root=str(small_digits_dir)), specs(), TTA), [MODEL],
                     NewTestImages(small_digits_dir / "test_images",
                                   sample_submission=small_digits_dir / "sample_submission.csv"),
                     out, StageOptions(log=lines.append))
    assert f"predict: {MODEL} already predicted (--force to redo)" in lines


@pytest.mark.parametrize("edit, message", [
    (lambda m: {**m, "schema": 3}, r"test\.parquet: table metadata schema 3, this stacker reads schemas 1 to 2"),
    (lambda m: {**m, "tta": {**m["tta"], "views": m["tta"]["views"][:1]}}, r"test\.parquet: records no readable tta"),
    (lambda m: {**m, "tta": {**m["tta"], "views": [{"flip": "yes", "zoom": 1, "cx": 0, "cy": 0}] * 2}},
     r"test\.parquet: records no readable tta views .*run predict-oof again"),
    (lambda m: {k: v for k, v in m.items() if k != "schema"} | {"tta": {**m["tta"], "n": 12}},
     r"test\.parquet: records no readable tta views"),
], ids=["newer-schema", "fewer-views-than-n", "malformed-view", "schema-1-n-beyond-frozen"])
def test_stacker_predict_refuses_views_it_cannot_render(trained, tmp_path, small_digits_dir, edit, message):
    paths, folds = copy_run(trained, tmp_path / "run"), trained[1]
    table = read_table(paths.test(MODEL), folds.classes, "test")
    write_table(paths.test(MODEL), replace(table, meta=edit(table.meta)))
    with pytest.raises(StackerError, match=message) as refused:
        new_test(paths, small_digits_dir, tmp_path / "pred")
    assert "\n" not in str(refused.value)
    assert not (tmp_path / "pred").exists()  # refused before anything is decoded or written


# ---------------------------------------------------------------- is_current


SETTINGS = {"n": 2, "combine": "lerp", "beta": 0.25, "size": [16, 16]}
CURRENT = {"schema": 2, "model": "m", "folds_sha256": "f", "version": "1.0", "amp": "off",
           "tta": {**SETTINGS, "views": view_records(SCHEMA1_VIEWS[:2])}}
SCHEMA_1 = {"model": "m", "folds_sha256": "f", "version": "0.9", "amp": "off", "tta": SETTINGS}


def with_tta(meta, **tta):
    return {**meta, "tta": {**meta["tta"], **tta}}


@pytest.mark.parametrize("recorded, expected, keys", [
    (CURRENT, CURRENT, []),
    ({**CURRENT, "version": "2.0", "job": {"seconds": 3.0}}, CURRENT, []),  # recorded, never compared
    (SCHEMA_1, CURRENT, []),  # schema 1: n: 2 means the frozen views, those expected
    (SCHEMA_1, with_tta(CURRENT, views=view_records(SCHEMA1_VIEWS[1::-1])), ["tta views"]),
    (SCHEMA_1, with_tta(CURRENT, views=view_records(replaced(2))), ["tta views"]),
    (CURRENT, with_tta(CURRENT, views=view_records(reordered(2))), ["tta views"]),
    ({**CURRENT, "tta": SETTINGS}, CURRENT, ["tta views"]),  # schema 2 without views: not the expected ones
    (with_tta(SCHEMA_1, n=3), CURRENT, ["tta"]),
    (CURRENT, with_tta(CURRENT, n=3, views=view_records(SCHEMA1_VIEWS[:3])), ["tta"]),
    (with_tta(CURRENT, beta=0.5), CURRENT, ["tta"]),
    ({**SCHEMA_1, "amp": "bf16"}, CURRENT, ["amp"]),
    ({**CURRENT, "schema": 3}, CURRENT, ["schema"]),
    ({**CURRENT, "weights_sha256": "a"}, {**CURRENT, "weights_sha256": "b"}, ["weights_sha256"]),
    ({}, CURRENT, ["amp", "folds_sha256", "model", "schema", "tta"]),  # a foreign table records nothing
])
def test_is_current(recorded, expected, keys):
    assert stale_keys(recorded, expected) == keys
    assert is_current(recorded, expected) is (keys == [])


def test_schema_1_views_are_the_frozen_list():
    assert recorded_views(SCHEMA_1) == list(SCHEMA1_VIEWS[:2])
    assert recorded_views(with_tta(SCHEMA_1, n=0)) == []
    assert SCHEMA1_VIEWS[:3] == (View(flip=True), View(zoom=0.85), View(flip=True, zoom=0.85))
    assert len(set(SCHEMA1_VIEWS)) == len(SCHEMA1_VIEWS) == 11
    assert recorded_views(with_tta(CURRENT, n=1, views=view_records(replaced(1)))) == replaced(1)
