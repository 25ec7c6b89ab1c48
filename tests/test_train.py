"""Training jobs: one-cycle schedule, saved results, resume after interruption, skipping finished work."""
from __future__ import annotations

import math
from functools import partial

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from base_models.config import TrainConfig
from base_models.jobs import StageOptions, train_base
from base_models.train import one_cycle, read_history
from oof import StackerError
from tiny import QUIET, TWO_EPOCHS, first_fold, prepared
from tiny import specs as tiny_specs

specs = partial(tiny_specs, train=TWO_EPOCHS)


@pytest.fixture
def run(tmp_path, small_digits_dir):
    return prepared(tmp_path / "run", small_digits_dir)


@pytest.mark.parametrize("step, expected", [
    (0, 1e-2 / 25),                                      # starts at lr / div
    (12, None),                                          # cosine warm-up: checked by formula
    (24, 1e-2),                                          # peaks at lr after pct_start of the steps
    (60, None),                                          # cosine decay: checked by formula
    (99, 1e-2 / 25 / 1e5),                               # ends at lr / div / div_final
])
def test_one_cycle_follows_warmup_then_cosine(step, expected):
    cfg = TrainConfig(lr=1e-2, pct_start=0.25, div=25, div_final=1e5)
    opt = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), lr=cfg.lr)
    # torch's OneCycleLR puts the peak at step pct_start * total - 1 and the end at total - 1
    sched = one_cycle(opt, cfg.lr, 100, cfg.pct_start, cfg.div, cfg.div_final)
    for _ in range(step):
        opt.step()
        sched.step()
    lr = opt.param_groups[0]["lr"]
    if expected is None:  # cosine between the phase ends: lr/div -> lr over 0..24, lr -> lr/div/div_final after
        start, end, t = ((cfg.lr / cfg.div, cfg.lr, step / 24) if step <= 24 else
                         (cfg.lr, cfg.lr / cfg.div / cfg.div_final, (step - 24) / (99 - 24)))
        expected = end + (start - end) * (1 + math.cos(math.pi * t)) / 2
    assert lr == pytest.approx(expected, rel=1e-6)


def test_train_saves_last_epoch_weights_and_history(run):
    paths, folds = run
    spec = specs()
    train_base(paths, spec, folds, options=QUIET)
    for k in range(folds.k):
        history = read_history(paths, "test_resnet", k)
        assert [h["epoch"] for h in history] == [1, 2]
        assert all(np.isfinite(h["train_loss"]) and 0 <= h["error_rate"] <= 1 for h in history)
        weights = load_file(paths.weights("test_resnet", k))
        assert weights and all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())
        assert not paths.checkpoint("test_resnet", k).exists()  # removed once the job finished
        table = pd.read_csv(paths.history_csv("test_resnet", k))
        assert list(table.columns[:9]) == ["epoch", "phase", "frozen", "size", "lr", "train_loss", "valid_loss",
                                           "error_rate", "seconds"]
        assert table["epoch"].tolist() == [1, 2] and table["size"].tolist() == ["16x16", "16x16"]
        np.testing.assert_allclose(table["valid_loss"], [h["valid_loss"] for h in history])


def interrupted_after_first_epoch(root, data_dir, spec):
    """A fresh run of `spec` stopped (as by Ctrl-C) right after fold 0's first epoch."""
    paths, folds = prepared(root, data_dir)

    def stop_after_first_epoch(line):
        if "epoch  1/2" in line:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_base(paths, spec, folds, options=StageOptions(log=stop_after_first_epoch))
    return paths, folds


def test_interrupted_job_resumes_to_identical_weights(tmp_path, run, small_digits_dir):
    paths, folds = run
    train_base(paths, specs(), folds, options=first_fold())
    reference = load_file(paths.weights("test_resnet", 0))
    other, folds2 = interrupted_after_first_epoch(tmp_path / "interrupted", small_digits_dir, specs())
    assert other.checkpoint("test_resnet", 0).is_file()
    assert not other.weights("test_resnet", 0).exists()
    lines = []
    train_base(other, specs(), folds2, options=first_fold(lines.append))
    assert not any("fold 0 epoch  1/2" in s for s in lines)  # epoch 1 was not trained again
    resumed = load_file(other.weights("test_resnet", 0))
    assert reference.keys() == resumed.keys()
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)


def test_finished_jobs_are_skipped_and_force_retrains(run):
    paths, folds = run
    train_base(paths, specs(epochs=1), folds, options=QUIET)
    stamp = paths.weights("test_resnet", 0).stat().st_mtime_ns
    lines = []
    train_base(paths, specs(epochs=1), folds, options=StageOptions(log=lines.append))
    assert "3 already done, 0 to run" in lines[0]
    assert paths.weights("test_resnet", 0).stat().st_mtime_ns == stamp
    train_base(paths, specs(epochs=1), folds, options=StageOptions(force=True, log=lambda s: None))
    assert paths.weights("test_resnet", 0).stat().st_mtime_ns != stamp


def test_changed_recipe_of_a_finished_model_is_refused(run):
    paths, folds = run
    train_base(paths, specs(epochs=1), folds, options=QUIET)
    with pytest.raises(StackerError, match=r"fold0\.history\.json: test_resnet folds 0, 1, 2 were trained with other "
                                           r"settings \(lr\); pass --force to train them again"):
        train_base(paths, specs(epochs=1, lr=1e-3), folds, options=QUIET)


def test_resume_with_mixup_is_bit_identical_and_other_settings_are_refused(tmp_path, run, small_digits_dir):
    paths, folds = run
    mixup = specs(mixup_alpha=0.4)
    train_base(paths, mixup, folds, options=first_fold())
    reference = load_file(paths.weights("test_resnet", 0))
    other, folds2 = interrupted_after_first_epoch(tmp_path / "interrupted", small_digits_dir, mixup)
    with pytest.raises(StackerError, match=r"interrupted job of other settings \(lr\).*--force"):
        train_base(other, specs(mixup_alpha=0.4, lr=1e-3), folds2, options=QUIET)
    train_base(other, mixup, folds2, options=first_fold())  # numpy's RNG (timm's Mixup) is restored too
    resumed = load_file(other.weights("test_resnet", 0))
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)


def test_too_few_rows_for_a_batch_is_a_clear_error(run):
    paths, folds = run
    with pytest.raises(StackerError, match=r"training rows are fewer than batch_size\*accum_steps=1024"):
        train_base(paths, specs(batch_size=256, accum_steps=4), folds, options=QUIET)
