"""predict-oof: TTA combination, contract tables, reproducibility on CPU."""
from __future__ import annotations

import numpy as np
import pytest

from base_models.augment import tta_views
from base_models.config import DataConfig, FoldsConfig, TTAConfig, model_specs
from base_models.jobs import StageOptions, prepare_run, train_base
from base_models.predict_oof import predict_oof
from base_models.predict import combine_tta
from base_models.table_schema import TABLE_SCHEMA, view_records
from oof import RunPaths, StackerError, read_table, validate_oof

QUIET = StageOptions(log=lambda s: None)


def test_combine_tta_lerp_is_fastai_default():
    plain = np.array([[0.8, 0.2]])
    aug = np.array([[[0.4, 0.6]], [[0.6, 0.4]]])  # mean (0.5, 0.5)
    assert combine_tta(plain, aug, "lerp", 0.25) == pytest.approx(np.array([[0.575, 0.425]]))
    assert combine_tta(plain, aug, "mean", 0.25) == pytest.approx(np.array([[0.6, 0.4]]))
    assert combine_tta(plain, aug[:0], "lerp", 0.25) is plain  # n=0: TTA off


@pytest.fixture(scope="module")
def predicted(tmp_path_factory, small_digits_dir):
    paths = RunPaths(tmp_path_factory.mktemp("predict") / "run")
    specs = model_specs([{"arch": "test_resnet"}], {"size": 16, "epochs": 4, "batch_size": 32, "lr": 1e-2})
    _, folds = prepare_run(paths, DataConfig(root=str(small_digits_dir)), FoldsConfig(k=3), (16, 16),
                           log=lambda s: None)
    train_base(paths, specs, folds, options=QUIET)
    metrics = predict_oof(paths, specs, folds, TTAConfig(n=3), options=QUIET)
    return paths, specs, folds, metrics


def test_tables_follow_the_contract(predicted):
    paths, _, folds, metrics = predicted
    oof = validate_oof(read_table(paths.oof("test_resnet"), folds.classes, "oof"), folds)
    assert oof.meta["folds_sha256"] == folds.sha256 and oof.meta["tta"]["n"] == 3
    assert oof.meta["schema"] == TABLE_SCHEMA and oof.meta["tta"]["views"] == view_records(tta_views(3))
    assert oof.meta["keep"] == "last"  # read by the leak check: keep: best tunes on the OOF rows
    test = read_table(paths.test("test_resnet"), folds.classes, "test")
    per_fold = [read_table(paths.test_fold("test_resnet", k), folds.classes, "test").proba for k in range(folds.k)]
    np.testing.assert_allclose(test.proba, np.mean(per_fold, axis=0), atol=1e-12)
    assert len(test.ids) == 80
    accuracy = (oof.proba.argmax(1) == folds.y).mean()
    assert accuracy == pytest.approx(metrics["test_resnet"]["accuracy"])
    assert accuracy > 0.4  # four epochs on 213 digits per fold beat chance (0.1) by far: rows line up


def test_predict_is_reproducible_and_skips_finished(predicted, tmp_path):
    paths, specs, folds, _ = predicted
    before = read_table(paths.oof("test_resnet"), folds.classes, "oof").proba
    lines = []
    predict_oof(paths, specs, folds, TTAConfig(n=3), options=StageOptions(log=lines.append))
    assert "already predicted" in lines[0]
    predict_oof(paths, specs, folds, TTAConfig(n=3), options=StageOptions(force=True, log=lambda s: None))
    after = read_table(paths.oof("test_resnet"), folds.classes, "oof").proba
    np.testing.assert_array_equal(before, after)  # same weights, same views: same OOF file on CPU


def test_predict_needs_every_fold_trained(predicted):
    paths, specs, folds, _ = predicted
    other = model_specs([{"arch": "test_convnext"}], {"size": 16, "epochs": 1})
    with pytest.raises(StackerError, match=r"test_convnext: folds \[0, 1, 2\] are not trained yet"):
        predict_oof(paths, other, folds, TTAConfig(), options=QUIET)


def test_retrained_weights_make_predictions_stale(predicted):
    paths, specs, folds, _ = predicted
    # Retrained with the same seed: bit-identical weights on CPU, so the tables (which record the
    # weights' digests, not their times) are still current.
    train_base(paths, specs, folds, options=StageOptions(force=True, log=lambda s: None))
    lines = []
    predict_oof(paths, specs, folds, TTAConfig(n=3), options=StageOptions(log=lines.append))
    assert "already predicted" in lines[0]
    reseeded = model_specs([{"arch": "test_resnet"}], {"size": 16, "epochs": 4, "batch_size": 32, "lr": 1e-2,
                                                       "seed": 7})
    train_base(paths, reseeded, folds, options=StageOptions(force=True, log=lambda s: None))
    lines = []
    predict_oof(paths, reseeded, folds, TTAConfig(n=3), options=StageOptions(log=lines.append))
    assert "test_resnet: oof.parquet was made from other weights_sha256; predicting" in lines[0]
    assert any("OOF accuracy" in s for s in lines)
