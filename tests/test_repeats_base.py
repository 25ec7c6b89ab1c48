"""Repeated k-fold at the base level: one job per (model, repeat, fold), repeat 0 exactly a run without
repeats, each repeat's OOF rows from its own fold models, the test table the mean over all of them."""
from __future__ import annotations

import numpy as np
import pytest

from base_models.config import TTAConfig
from base_models.job_table import job_table
from base_models.jobs import StageOptions, train_base
from base_models.predict_oof import predict_oof
from base_models.stages import parse_only
from oof import RunPaths, StackerError, file_digest, read_json, read_table, validate_oof
from tiny import QUIET, TWO_EPOCHS, prepared
from tiny import specs as tiny_specs

TTA = TTAConfig(n=1)
K, R = 3, 2


def specs():
    return tiny_specs(train=TWO_EPOCHS)


def predicted_run(root, data_dir, repeats: int):
    paths, folds = prepared(root, data_dir, k=K, repeats=repeats)
    train_base(paths, specs(), folds, options=QUIET)
    metrics = predict_oof(paths, specs(), folds, TTA, options=QUIET)
    return paths, folds, metrics


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_digits_dir):
    """The same one-model run without repeats and with two."""
    root = tmp_path_factory.mktemp("repeats")
    return predicted_run(root / "one", small_digits_dir, 1), predicted_run(root / "two", small_digits_dir, R)


def test_repeat_zero_is_the_run_without_repeats(runs):
    (one, one_folds, _), (two, two_folds, _) = runs
    assert two_folds.for_repeat(0).sha256 == one_folds.sha256
    for fold in range(K):
        assert file_digest(two.weights("test_resnet", fold)) == file_digest(one.weights("test_resnet", fold))
        same = [read_table(p.test_fold("test_resnet", fold), one_folds.classes, "test") for p in (one, two)]
        np.testing.assert_array_equal(same[0].proba, same[1].proba)
        assert two.for_repeat(1).weights("test_resnet", fold).is_file()  # repeat 1's models in repeat1/
    assert (two.root / "models" / "test_resnet" / "repeat1" / "fold2.history.json").is_file()


def test_the_oof_table_holds_each_repeat_from_its_own_fold_models(runs):
    _, (two, folds, metrics) = runs
    oof = validate_oof(read_table(two.oof("test_resnet"), folds.classes, "oof"), folds)
    n = len(folds.ids)
    assert len(oof.ids) == R * n and list(np.unique(oof.repeat)) == [0, 1]
    assert (oof.fold == folds.fold_matrix.ravel()).all()
    for repeat in range(R):
        at = two.for_repeat(repeat)
        for fold in range(K):
            part = read_table(at.oof_fold("test_resnet", fold), folds.classes, "oof")
            rows = repeat * n + folds.for_repeat(repeat).valid_rows(fold)
            np.testing.assert_array_equal(oof.proba[rows], part.proba)
    test = read_table(two.test("test_resnet"), folds.classes, "test")
    per_model = [read_table(two.for_repeat(r).test_fold("test_resnet", f), folds.classes, "test").proba
                 for r in range(R) for f in range(K)]
    np.testing.assert_allclose(test.proba, np.mean(per_model, axis=0), atol=1e-12)
    assert len(test.meta["weights_sha256"]) == R * K and test.meta["repeats"] == R


def test_metrics_report_each_repeat_and_the_spread(runs):
    _, (two, folds, metrics) = runs
    saved = read_json(two.predict_metrics("test_resnet"))
    each = [r["accuracy"] for r in saved["repeats"]]
    assert len(each) == R and saved["accuracy"] == pytest.approx(np.mean(each))
    assert saved["accuracy_std"] == pytest.approx(np.std(each, ddof=1))
    oof = read_table(two.oof("test_resnet"), folds.classes, "oof")
    n = len(folds.ids)
    assert each[1] == pytest.approx((oof.proba[n:].argmax(1) == folds.y).mean())
    assert metrics["test_resnet"] == saved


def test_a_rerun_skips_every_repeat_and_a_lost_fold_table_is_redone_alone(runs):
    _, (two, folds, _) = runs
    lines = []
    predict_oof(two, specs(), folds, TTA, options=StageOptions(log=lines.append))
    assert "already predicted" in lines[0]
    before = read_table(two.oof("test_resnet"), folds.classes, "oof").proba
    two.for_repeat(1).oof_fold("test_resnet", 2).unlink()
    lines = []
    predict_oof(two, specs(), folds, TTA, options=StageOptions(log=lines.append))
    assert "predict-oof: 6 fold jobs, 5 already predicted, 1 to run" in lines
    assert any("test_resnet repeat 1 fold 2: " in line for line in lines)
    np.testing.assert_array_equal(read_table(two.oof("test_resnet"), folds.classes, "oof").proba, before)


def test_jobs_table_lists_every_repeat(runs, small_digits_dir):
    _, (two, _, _) = runs
    cfg = {"run_dir": str(two.root), "data": {"root": str(small_digits_dir)}, "folds": {"k": K, "repeats": R},
           "train": TWO_EPOCHS, "models": [{"arch": "test_resnet"}]}
    lines = []
    table = job_table(cfg, lines.append)
    assert list(zip(table["repeat"], table["fold"])) == [(r, f) for r in range(R) for f in range(K)]
    assert set(table["state"]) == {"done"}
    assert lines[0].split()[:4] == ["model", "repeat", "fold", "state"]


def test_only_names_the_repeat_when_there_are_repeats():
    assert parse_only(["test_resnet:1:2"], specs(), K, R) == (("test_resnet", 1, 2),)
    assert parse_only(["test_resnet:2"], specs(), K, 1) == (("test_resnet", 0, 2),)
    with pytest.raises(StackerError, match=r"expected MODEL:REPEAT:FOLD \(the run has 2 repeats: name the repeat\)"):
        parse_only(["test_resnet:2"], specs(), K, R)
    with pytest.raises(StackerError, match=r"repeat 2 is out of range: the run's repeats are 0\.\.1"):
        parse_only(["test_resnet:2:0"], specs(), K, R)


def test_stacker_predict_runs_every_repeats_fold_models(runs, small_digits_dir, tmp_path):
    """A new test set (here the run's own test images) through all R x K fold models: each fold table
    equals the run's own, and the mean table the run's test table."""
    from base_models.config import DataConfig as Data
    from base_models.dataset import NewTestImages
    from base_models.predict_run import SavedRun, predict_new_test

    _, (two, folds, _) = runs
    images = NewTestImages(small_digits_dir / "test_images",
                           sample_submission=small_digits_dir / "sample_submission.csv")
    out = RunPaths(tmp_path / "out")
    predict_new_test(SavedRun(two, Data(root=str(small_digits_dir)), specs(), TTA), ["test_resnet"], images, out,
                     QUIET)
    for repeat in range(R):
        for fold in range(K):
            mine = read_table(out.for_repeat(repeat).test_fold("test_resnet", fold), folds.classes, "test")
            run = read_table(two.for_repeat(repeat).test_fold("test_resnet", fold), folds.classes, "test")
            row = {i: n for n, i in enumerate(run.ids)}  # the sample's id order may differ from the run's
            np.testing.assert_array_equal(mine.proba, run.proba[[row[i] for i in mine.ids]])
    np.testing.assert_allclose(read_table(out.test("test_resnet"), folds.classes, "test").proba.sum(),
                               read_table(two.test("test_resnet"), folds.classes, "test").proba.sum(), rtol=1e-9)
