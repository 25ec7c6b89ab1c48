"""The fast.ai Paddy recipe: each technique proved to do what it says, on real tiny timm models."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from base_models.augment import PLAIN
from base_models.batches import ImageSource
from base_models.cache import load_cache
from base_models.config import DataConfig, FoldsConfig, SamplingConfig, TrainConfig, TTAConfig
from base_models.jobs import StageOptions, load_targets, prepare_run, train_base
from base_models.predict_oof import predict_oof
from base_models.models import create_model, model_norm, timm_model
from base_models.predict import ViewPlan, predict_views
from base_models.train import (TrainInputs, _segment_optimizer, build_model, epoch_order, load_fold_model,
                               read_history, sampling_weights, segments, train_fold)
from oof import RunPaths, StackerError, log_loss, read_json, read_table
from tiny import QUIET, first_fold, prepared, specs


@pytest.fixture
def pretrained_file(tmp_path):
    """A test_resnet checkpoint as a user would bring one: 1000-class ImageNet-style head."""
    torch.manual_seed(123)
    model = timm.create_model("test_resnet")
    path = tmp_path / "test_resnet.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


# ---------------------------------------------------------------- fine-tune schedule


def test_frozen_epoch_keeps_backbone_bit_identical_and_trains_the_head(tmp_path, small_digits_dir, pretrained_file):
    paths, folds = prepared(tmp_path / "run", small_digits_dir)
    spec = specs({"arch": "test_resnet", "pretrained": str(pretrained_file)}, freeze_epochs=1)

    def stop_after_frozen_epoch(line):
        if "frozen" in line:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_base(paths, spec, folds, options=StageOptions(log=stop_after_frozen_epoch))
    after = torch.load(paths.checkpoint("test_resnet", 0), weights_only=True)["model"]
    file = load_file(pretrained_file)
    torch.manual_seed(spec[0].train.seed + 0)  # the job's seed: the same fresh head as the job drew
    start = build_model(spec[0], load_targets(paths, folds, []))
    head = {n for n, _ in timm_model(start).get_classifier().named_parameters(prefix="fc")}
    for name, value in start.named_parameters():
        if name in head:
            assert not torch.equal(after[name], value), f"head {name} did not train"
        else:
            assert torch.equal(after[name], file[name]), f"backbone {name} changed while frozen"


def test_fine_tune_schedule_freezes_first_and_gives_the_backbone_lr_over_lr_mult(pretrained_file):
    cfg = TrainConfig(size=16, epochs=2, lr=1e-2, lr_mult=100, freeze_epochs=1)
    plan = segments(cfg, fine_tune=True)
    assert [(s.frozen, s.epochs, s.pct_start) for s in plan] == [(True, 1, 0.99), (False, 2, 0.25)]
    assert [s.frozen for s in segments(cfg, fine_tune=False)] == [False]  # from scratch: nothing to freeze
    model = create_model("test_resnet", 10, str(pretrained_file))
    optimizer, scheduler = _segment_optimizer(model, cfg, plan[1], True, steps=10)
    assert [g["max_lr"] for g in optimizer.param_groups] == pytest.approx([1e-4, 1e-2])
    optimizer, _ = _segment_optimizer(model, cfg, plan[0], True, steps=10)
    assert len(optimizer.param_groups) == 1  # frozen: the heads alone
    assert not any(p.requires_grad for p in timm_model(model).conv1.parameters())


def valid_loss_of_saved_weights(paths, folds, spec, fold: int) -> float:
    """The saved weights evaluated again as the job evaluated each epoch: plain view, held-out fold."""
    targets = load_targets(paths, folds, [])
    model = load_fold_model(paths, spec, fold, targets, torch.device("cpu"))
    images = ImageSource(load_cache(paths, "train").images, torch.device("cpu"))
    rows = folds.valid_rows(fold)
    plan = ViewPlan(spec.train.size, [PLAIN], model_norm(model), spec.train.batch_size)
    return log_loss(folds.y[rows], predict_views(model, images, rows, plan)[0][0])


@pytest.mark.parametrize("keep", ["best", "last"])
def test_keep_best_saves_the_best_epochs_weights(tmp_path, small_digits_dir, keep):
    paths, folds = prepared(tmp_path / "run", small_digits_dir)
    # a last phase at 30x the learning rate wrecks the model: its best epoch is an earlier one
    phases = [{"size": 16, "epochs": 2}, {"size": 16, "epochs": 1, "lr_factor": 30}]
    spec = specs(phases=phases, keep=keep)
    train_base(paths, spec, folds, options=first_fold())
    record = read_json(paths.history("test_resnet", 0))
    losses = [h["valid_loss"] for h in record["epochs"]]
    kept = int(np.argmin(losses)) + 1 if keep == "best" else 3
    assert record["kept_epoch"] == kept and (kept < 3) == (keep == "best")
    assert valid_loss_of_saved_weights(paths, folds, spec[0], 0) == pytest.approx(losses[kept - 1], rel=1e-9)


@pytest.mark.parametrize("extra", [
    {"ema_decay": 0.9},
    {"mixup_alpha": 0.4, "cutmix_alpha": 1.0},
    {"label_smoothing": 0.1, "accum_steps": 2, "clip_grad": 1.0},
    {"compile": True},  # ignored with a note on CPU
])
def test_optional_techniques_train_to_finite_results(tmp_path, small_digits_dir, extra):
    paths, folds = prepared(tmp_path / "run", small_digits_dir)
    lines = []
    spec = specs(**extra)
    train_base(paths, spec, folds, options=first_fold(lines.append))
    history = read_history(paths, "test_resnet", 0)
    assert np.isfinite(history[-1]["train_loss"]) and np.isfinite(history[-1]["valid_loss"])
    assert all(torch.isfinite(t).all() for t in load_file(paths.weights("test_resnet", 0)).values()
               if t.is_floating_point())
    if "compile" in extra:
        assert any("compile is ignored on CPU" in s for s in lines)


@pytest.fixture(scope="module")
def one_fold(tmp_path_factory, small_digits_dir):
    """Train fold 0 alone under a model name, on one prepared run; the baseline's weights."""
    paths, folds = prepared(tmp_path_factory.mktemp("options") / "run", small_digits_dir)
    inputs = TrainInputs(paths, folds, load_targets(paths, folds, []),
                         ImageSource(load_cache(paths, "train").images, torch.device("cpu")))

    def train(name: str, **extra) -> dict[str, torch.Tensor]:
        spec = specs({"arch": "test_resnet", "name": name}, **extra)[0]
        train_fold(spec, 0, inputs, log=lambda s: None)
        return load_file(paths.weights(name, 0))

    return train, train("baseline")


@pytest.mark.parametrize("option, changes", [
    ({}, False),  # the control: training is deterministic, so any difference below is the option's
    ({"mixup_alpha": 0.4}, True),
    ({"cutmix_alpha": 1.0}, True),
    ({"label_smoothing": 0.1}, True),
    ({"accum_steps": 2}, True),
    ({"clip_grad": 0.01}, True),  # far below this model's gradient norms: it must clip
])
def test_each_training_option_changes_the_weights(one_fold, option, changes):
    train, baseline = one_fold
    weights = train("_".join(f"{k}{v}" for k, v in option.items()) or "again", **option)
    assert any(not torch.equal(baseline[k], weights[k]) for k in baseline) == changes


def test_ema_weights_are_saved_instead_of_the_raw_ones(tmp_path, small_digits_dir):
    raw_paths, folds = prepared(tmp_path / "raw", small_digits_dir)
    ema_paths, _ = prepared(tmp_path / "ema", small_digits_dir)
    train_base(raw_paths, specs(), folds, options=first_fold())
    train_base(ema_paths, specs(ema_decay=0.5), folds, options=first_fold())
    raw, ema = load_file(raw_paths.weights("test_resnet", 0)), load_file(ema_paths.weights("test_resnet", 0))
    assert any(not torch.equal(raw[k], ema[k]) for k in raw if raw[k].is_floating_point())


# ---------------------------------------------------------------- progressive resizing


def test_phases_feed_each_size_and_carry_the_weights_over(tmp_path, small_digits_dir):
    one_paths, folds = prepared(tmp_path / "one", small_digits_dir)
    two_paths, _ = prepared(tmp_path / "two", small_digits_dir)
    first = {"size": [12, 10], "epochs": 2}
    train_base(one_paths, specs(phases=[first]), folds, options=first_fold())
    # A second phase at lr 0 changes no weight: whatever it ends with was carried over from phase one.
    phases = [first, {"size": 16, "epochs": 1, "lr_factor": 0.0}]
    train_base(two_paths, specs(phases=phases), folds, options=first_fold())
    history = read_history(two_paths, "test_resnet", 0)
    assert [(h["phase"], h["size"]) for h in history] == [(0, [12, 10]), (0, [12, 10]), (1, [16, 16])]
    one, two = load_file(one_paths.weights("test_resnet", 0)), load_file(two_paths.weights("test_resnet", 0))
    trained = [k for k in one if "running" not in k and "num_batches" not in k]  # BatchNorm statistics still move
    assert all(torch.equal(one[k], two[k]) for k in trained)


def test_predict_size_defaults_to_the_last_phase_and_can_be_larger():
    cfg = TrainConfig(phases=[{"size": 128, "epochs": 6}, {"size": [256, 192], "epochs": 3}])
    assert cfg.prediction_size == (256, 192) and cfg.epochs == 9
    assert TrainConfig(size=224, predict_size=288).prediction_size == (288, 288)


def test_a_size_the_architecture_cannot_take_fails_before_training(tmp_path, small_digits_dir):
    paths, folds = prepared(tmp_path / "run", small_digits_dir)
    spec = specs("test_vit", size=[48, 40])  # 40 is no multiple of the patch
    with pytest.raises(StackerError, match=r"model test_vit: cannot take 48x40 images.*dynamic_img_size"):
        train_base(paths, spec, folds, options=QUIET)
    assert not (paths.root / "models" / "test_vit").exists()


# ---------------------------------------------------------------- weighted sampling


@pytest.mark.parametrize("power", [0.0, 0.5, 1.0])
def test_class_balanced_sampling_matches_the_requested_weights(power):
    y = np.repeat([0, 1, 2], [100, 300, 600])
    w = sampling_weights(SamplingConfig("class_balanced", power), y, None)
    generator = torch.Generator().manual_seed(0)
    draws = np.concatenate([y[epoch_order(len(y), w, generator)] for _ in range(50)])  # 50 epochs
    counts = np.array([100, 300, 600], dtype=float)
    expected = counts ** (1 - power) / (counts ** (1 - power)).sum()  # count * count**-p
    np.testing.assert_allclose(np.bincount(draws) / len(draws), expected, atol=0.01)


def test_uniform_sampling_is_the_default_and_sees_each_row_once():
    assert TrainConfig().sampling.weights == "uniform"
    assert sampling_weights(SamplingConfig(), np.zeros(5, int), None) is None
    order = epoch_order(500, None, torch.Generator().manual_seed(0))
    assert sorted(order) == list(range(500))


def test_a_weight_column_from_the_csv_steers_sampling(tmp_path, small_digits_dir):
    csv = pd.read_csv(small_digits_dir / "train.csv", dtype=str)
    csv["w"] = np.where(csv["label"] == "0", 0.0, 1.0)  # class '0' never drawn for training
    csv.to_csv(tmp_path / "train_w.csv", index=False)
    paths, folds = prepared(tmp_path / "run", small_digits_dir, train_csv=str(tmp_path / "train_w.csv"))
    spec = specs(sampling={"weights": "w"})
    train_base(paths, spec, folds, options=QUIET)
    predict_oof(paths, spec, folds, TTAConfig(n=0), options=QUIET)
    oof = read_table(paths.oof("test_resnet"), folds.classes, "oof")
    assert (oof.proba.argmax(1) == 0).sum() == 0  # a class the model never trained on is never predicted
    spec = specs({"arch": "test_resnet", "name": "bad"}, sampling={"weights": "nope"})
    with pytest.raises(StackerError, match=r"bad: train.sampling.weights 'nope' is neither"):
        train_base(paths, spec, folds, options=QUIET)


# ---------------------------------------------------------------- multi-target


def test_extra_targets_get_their_own_heads_and_tables(tmp_path, small_digits_dir):
    csv = pd.read_csv(small_digits_dir / "train.csv", dtype=str)
    csv["parity"] = np.where(csv["label"].astype(int) % 2 == 0, "even", "odd")
    csv.to_csv(tmp_path / "train_mt.csv", index=False)
    data = DataConfig(root=str(small_digits_dir), train_csv=str(tmp_path / "train_mt.csv"), extra_targets=["parity"])
    paths = RunPaths(tmp_path / "run")
    _, folds = prepare_run(paths, data, FoldsConfig(k=3), (16, 16), log=QUIET.log)
    spec = specs(target_weights={"parity": 0.5})
    train_base(paths, spec, folds, data, QUIET)
    predict_oof(paths, spec, folds, TTAConfig(n=1), data, QUIET)
    main = read_table(paths.oof("test_resnet"), folds.classes, "oof")
    parity = read_table(paths.oof("test_resnet", "parity"), ("even", "odd"), "oof")
    test = read_table(paths.test("test_resnet", "parity"), ("even", "odd"), "test")
    assert main.proba.shape == (len(folds.ids), 10)
    assert parity.proba.shape == (len(folds.ids), 2) and test.proba.shape == (80, 2)
    assert (parity.fold == main.fold).all() and parity.meta["folds_sha256"] == folds.sha256


# ---------------------------------------------------------------- offline pretrained weights


def test_pretrained_file_round_trips_and_the_classifier_is_replaced(tmp_path, pretrained_file):
    file = load_file(pretrained_file)
    model = create_model("test_resnet", 3, str(pretrained_file))
    state = model.state_dict()
    for key, value in file.items():
        if key.startswith("fc."):
            assert state[key].shape[0] == 3  # 1000 ImageNet classes -> a fresh 3-class head
        else:
            assert torch.equal(state[key], value), key
    pth = tmp_path / "weights.pth"  # a plain PyTorch state dict loads the same way (weights_only)
    torch.save({"state_dict": file}, pth)
    again = create_model("test_resnet", 3, str(pth)).state_dict()
    assert torch.equal(again["conv1.0.weight"], file["conv1.0.weight"])


def test_bad_pretrained_files_are_clear_errors(tmp_path):
    other = tmp_path / "effnet.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model("test_efficientnet").state_dict().items()}, str(other))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not weights")
    cases = [(tmp_path / "missing.safetensors", "pretrained weights file not found"),
             (other, "does not fit test_resnet"),
             (junk, "not a readable weights file|does not fit test_resnet")]
    for path, message in cases:
        with pytest.raises(StackerError, match=message):
            create_model("test_resnet", 10, str(path))
