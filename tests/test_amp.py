"""Mixed precision (train.amp): the choice per card, fp16 with loss scaling, divergence, resume, on CPU.

The CUDA choices are checked with injected compute capabilities; the fp16 + GradScaler path itself
runs on CPU, where torch autocasts to float16 too (skipped, with the reason, on a torch that does not).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file

from base_models.augment import PLAIN, tta_views
from base_models.batches import ImageSource
from base_models.cache import load_cache
from base_models.config import DataConfig, FoldsConfig, TrainConfig, TTAConfig, model_specs
from base_models.jobs import StageOptions, load_targets, prepare_run, train_base
from base_models.predict_oof import predict_oof
from base_models.models import model_norm
from base_models.predict import ViewPlan, autocast_supported, choose_amp, predict_views, resolve_amp
from base_models.train import (Sources, TrainInputs, _load_checkpoint, _optimizer_step, _setup, _start_segment,
                               _steps_per_epoch, read_history, stale_reason, train_fold)
from oof import RunPaths, StackerError, read_json, read_table, write_json

QUIET = StageOptions(log=lambda s: None)
TINY = {"size": 16, "epochs": 2, "batch_size": 32, "lr": 3e-3}
CPU = torch.device("cpu")
needs_cpu_fp16 = pytest.mark.skipif(not autocast_supported("cpu", "fp16"),
                                    reason=f"torch {torch.__version__} has no float16 autocast on CPU")


def specs(**train):
    return model_specs([{"arch": "test_resnet"}], {**TINY, **train})


def prepared(root, data_dir):
    paths = RunPaths(root)
    _, folds = prepare_run(paths, DataConfig(root=str(data_dir)), FoldsConfig(k=3), (16, 16), log=QUIET.log)
    return paths, folds


def job_inputs(paths, folds) -> TrainInputs:
    cache = load_cache(paths, "train")
    return TrainInputs(paths, folds, load_targets(paths, folds, []), ImageSource(cache.images, CPU), cache.digest)


def job_state(paths, folds, spec):
    """A fold-0 job of `spec` set up as train_fold does, in its first segment."""
    state = _setup(spec, 0, job_inputs(paths, folds), None, QUIET.log)
    state.steps = _steps_per_epoch(state)
    _start_segment(state, 0, state.schedule[0], None)
    return state


# ---------------------------------------------------------------- the choice


@pytest.mark.parametrize("setting, device_type, capability, expected", [
    ("auto", "cuda", (9, 0), "bf16"),   # H100
    ("auto", "cuda", (8, 0), "bf16"),   # A100
    ("auto", "cuda", (8, 9), "bf16"),   # L4
    ("auto", "cuda", (7, 5), "fp16"),   # T4: no bf16 tensor cores
    ("auto", "cuda", (7, 0), "fp16"),   # V100
    ("auto", "cuda", (6, 0), "fp16"),   # P100
    ("auto", "cpu", None, "off"),
    ("bf16", "cpu", None, "bf16"),      # explicit settings are kept
    ("fp16", "cuda", (9, 0), "fp16"),
    ("off", "cuda", (9, 0), "off"),
])
def test_choose_amp_picks_the_precision_the_card_has(setting, device_type, capability, expected):
    assert choose_amp(setting, device_type, capability) == expected


@pytest.mark.parametrize("value", ["fp32", "float16", True, None])
def test_amp_setting_is_checked_once_at_the_edge(value):
    with pytest.raises(StackerError, match=r"train\.amp: expected one of \['auto', 'bf16', 'fp16', 'off'\]"):
        TrainConfig(amp=value)


def test_a_precision_torch_cannot_autocast_to_is_refused_naming_the_job(monkeypatch):
    monkeypatch.setattr("base_models.predict.autocast_supported", lambda device_type, amp: False)
    with pytest.raises(StackerError, match=r"^m fold 0: train\.amp fp16: torch .* cannot autocast to fp16 on cpu; "
                                           r"use amp: auto or off$"):
        resolve_amp("fp16", CPU, "m fold 0")
    assert resolve_amp("auto", CPU, "m fold 0") == "off"  # off needs no autocast


# ---------------------------------------------------------------- fp16 with a GradScaler, on CPU


@pytest.fixture(scope="module")
def fp16_run(tmp_path_factory, small_digits_dir):
    paths, folds = prepared(tmp_path_factory.mktemp("fp16") / "run", small_digits_dir)
    spec = specs(amp="fp16", clip_grad=1.0)  # clipping: the gradients are unscaled first
    train_base(paths, spec, folds, options=QUIET)
    return paths, folds, spec


@needs_cpu_fp16
def test_fp16_job_trains_a_timm_model_and_records_its_precision(fp16_run):
    paths, folds, _ = fp16_run
    for k in range(folds.k):
        record = read_json(paths.history("test_resnet", k))
        assert (record["amp"], record["device_name"], record["train"]["amp"]) == ("fp16", "cpu", "fp16")
        for epoch in record["epochs"]:
            assert np.isfinite(epoch["train_loss"]) and np.isfinite(epoch["valid_loss"])
            assert 0 < epoch["loss_scale"] <= 2.0 ** 16 and epoch["nonfinite_batches"] >= 0
        weights = load_file(paths.weights("test_resnet", k))
        assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())
        assert all(t.dtype != torch.float16 for t in weights.values())  # autocast: the weights stay float32
        assert record["epochs"][1]["train_loss"] < record["epochs"][0]["train_loss"]  # it learns


@needs_cpu_fp16
def test_fp16_predictions_record_their_precision_and_are_close_to_float32(fp16_run):
    paths, folds, spec = fp16_run
    predict_oof(paths, spec, folds, TTAConfig(n=2), options=QUIET)
    oof = read_table(paths.oof("test_resnet"), folds.classes, "oof")
    assert oof.meta["amp"] == "fp16" and np.isfinite(oof.proba).all()
    lines = []
    predict_oof(paths, spec, folds, TTAConfig(n=2), options=StageOptions(log=lines.append))
    assert "already predicted" in lines[0]  # the recorded precision is the one it would use now


def test_float32_job_records_off_and_cpu(tmp_path, small_digits_dir):
    paths, folds = prepared(tmp_path / "run", small_digits_dir)
    state = job_state(paths, folds, specs(epochs=1)[0])
    assert (state.amp, state.scaler) == ("off", None)  # auto on CPU


@needs_cpu_fp16
def test_an_overflowing_step_is_skipped_and_the_scale_halved(tmp_path, small_digits_dir):
    paths, folds = prepared(tmp_path / "run", small_digits_dir)
    state = job_state(paths, folds, specs(amp="fp16", clip_grad=1.0)[0])
    state.scaler.scale(torch.ones(()))  # the scaler starts its scale on first use, as backward does
    scale = state.scaler.get_scale()
    before = {k: v.clone() for k, v in state.model.state_dict().items()}
    for p in state.model.parameters():
        p.grad = torch.full_like(p, scale)
    next(state.model.parameters()).grad[0] = float("inf")  # one overflowed gradient
    _optimizer_step(state)
    after = state.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # no AdamW step, not even its weight decay
    assert state.scaler.get_scale() == scale / 2
    assert all(torch.isfinite(t).all() for t in after.values() if t.is_floating_point())


@needs_cpu_fp16
def test_gradients_are_unscaled_before_they_are_clipped(tmp_path, small_digits_dir, monkeypatch):
    paths, folds = prepared(tmp_path / "run", small_digits_dir)
    state = job_state(paths, folds, specs(amp="fp16", clip_grad=1.0)[0])
    scale = state.scaler.scale(torch.ones(())).item()
    params = list(state.model.parameters())
    for p in params:
        p.grad = torch.full_like(p, 0.01 * scale)  # backward of a scaled loss: true gradient 0.01
    true_norm = 0.01 * sum(p.numel() for p in params) ** 0.5
    seen = []
    clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda ps, max_norm: seen.append(clip(ps, max_norm)))
    _optimizer_step(state)
    assert seen and float(seen[0]) == pytest.approx(float(true_norm), rel=1e-4)
    assert state.scaler.get_scale() == scale  # a finite step keeps the scale


# ---------------------------------------------------------------- a diverged epoch is never kept


@pytest.mark.parametrize("amp", ["off", pytest.param("fp16", marks=needs_cpu_fp16)])
def test_a_non_finite_epoch_fails_the_job_and_keeps_no_weights(tmp_path, small_digits_dir, monkeypatch, amp):
    from base_models import train as train_module

    paths, folds = prepared(tmp_path / "run", small_digits_dir)
    real_loss = train_module._loss

    def nan_from_epoch_two(state, x, ys):  # epoch 1 trains; every loss of epoch 2 is NaN
        loss = real_loss(state, x, ys)
        return loss * float("nan") if state.history else loss

    monkeypatch.setattr(train_module, "_loss", nan_from_epoch_two)
    with pytest.raises(StackerError, match=rf"^test_resnet fold 0 epoch 2: training diverged \(non-finite "
                                           rf"train_loss.*amp {amp}\); nothing of this epoch is kept"):
        train_base(paths, specs(amp=amp), folds, options=QUIET)
    assert not paths.weights("test_resnet", 0).exists() and not paths.history("test_resnet", 0).exists()
    checkpoint = torch.load(paths.checkpoint("test_resnet", 0), weights_only=True)  # epoch 1's, finite
    assert [h["epoch"] for h in checkpoint["history"]] == [1]
    assert all(torch.isfinite(t).all() for t in checkpoint["model"].values() if t.is_floating_point())


# ---------------------------------------------------------------- resume and staleness


def overflow_at(chosen: dict[int, set[int]]):
    """An `_optimizer_step` whose gradients are non-finite at the chosen steps ({epoch: {step in epoch}},
    both from 0), as an fp16 overflow leaves them, so the scaler skips exactly those steps and halves its
    scale on any CPU. The step count restarts with each job, so a resumed job overflows where an
    uninterrupted one does."""
    seen = {"state": None, "epoch": -1, "step": 0}

    def step(state):
        if seen["state"] is not state or seen["epoch"] != len(state.history):
            seen.update(state=state, epoch=len(state.history), step=0)
        if seen["step"] in chosen.get(seen["epoch"], ()):
            next(iter(state.model.parameters())).grad.fill_(float("inf"))
        seen["step"] += 1
        return _optimizer_step(state)
    return step


@needs_cpu_fp16
def test_fp16_resume_restores_the_loss_scale_and_is_bit_identical(tmp_path, small_digits_dir, monkeypatch):
    # Overflows at chosen steps (two in epoch 1, one in epoch 2) set the loss scale: 2^14 after epoch 1 and
    # 2^13 after epoch 2 when the resume restores it, 2^15 when it starts again from a fresh 2^16.
    from base_models import train as train_module

    monkeypatch.setattr(train_module, "_optimizer_step", overflow_at({0: {0, 2}, 1: {1}}))
    fresh = 2.0 ** 16
    spec = specs(amp="fp16")[0]
    paths, folds = prepared(tmp_path / "reference", small_digits_dir)
    train_fold(spec, 0, job_inputs(paths, folds), log=QUIET.log)
    reference, reference_history = load_file(paths.weights("test_resnet", 0)), read_history(paths, "test_resnet", 0)
    assert [h["loss_scale"] for h in reference_history] == [fresh / 4, fresh / 8]
    assert [h["skipped_steps"] for h in reference_history] == [2, 1]
    other, folds = prepared(tmp_path / "interrupted", small_digits_dir)

    def stop_after_first_epoch(line):
        if "epoch  1/2" in line:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_fold(spec, 0, job_inputs(other, folds), log=stop_after_first_epoch)
    checkpoint = _load_checkpoint(other.checkpoint("test_resnet", 0), spec, job_inputs(other, folds).sources)
    assert checkpoint["scaler"]["scale"] == fresh / 4
    torch.save({**checkpoint, "scaler": None}, tmp_path / "lost_scale.pt")
    train_fold(spec, 0, job_inputs(other, folds), log=QUIET.log)  # resumes from the checkpoint (weights_only)
    resumed = load_file(other.weights("test_resnet", 0))
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)
    assert read_history(other, "test_resnet", 0)[1]["loss_scale"] == fresh / 8
    (tmp_path / "lost_scale.pt").replace(other.checkpoint("test_resnet", 0))  # the same epoch, its scale lost
    train_fold(spec, 0, job_inputs(other, folds), log=QUIET.log)
    assert read_history(other, "test_resnet", 0)[1]["loss_scale"] == fresh / 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fp16_resume_on_cuda_restores_the_state_and_stays_close(tmp_path, small_digits_dir):
    # The CUDA copy of the test above. cuDNN autotunes (cudnn.benchmark) and some kernels sum with
    # atomics, so a resumed CUDA job is not promised bit for bit: it resumes at the same epoch, loss
    # scale and schedule, and its weights stay close to an uninterrupted job's.
    spec = specs(amp="fp16", device="cuda")[0]
    paths, folds = prepared(tmp_path / "reference", small_digits_dir)
    cuda_inputs = _cuda_inputs
    train_fold(spec, 0, cuda_inputs(paths, folds), log=QUIET.log)
    reference = load_file(paths.weights("test_resnet", 0))
    other, folds = prepared(tmp_path / "interrupted", small_digits_dir)

    def stop_after_first_epoch(line):
        if "epoch  1/2" in line:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_fold(spec, 0, cuda_inputs(other, folds), log=stop_after_first_epoch)
    checkpoint = _load_checkpoint(other.checkpoint("test_resnet", 0), spec, cuda_inputs(other, folds).sources)
    assert checkpoint["cuda_rng_device"] == torch.cuda.current_device() and len(checkpoint["cuda_rng"]) == 1
    train_fold(spec, 0, cuda_inputs(other, folds), log=QUIET.log)
    resumed = load_file(other.weights("test_resnet", 0))
    history = read_history(other, "test_resnet", 0)
    assert [h["epoch"] for h in history] == [1, 2]
    assert history[0]["loss_scale"] == read_history(paths, "test_resnet", 0)[0]["loss_scale"]
    for k in reference:
        if reference[k].is_floating_point():
            torch.testing.assert_close(resumed[k], reference[k], rtol=0.05, atol=0.05)


def _cuda_inputs(paths, folds) -> TrainInputs:
    from base_models.batches import place_images

    cache = load_cache(paths, "train")
    (images,) = place_images([cache.images], torch.device("cuda"))
    return TrainInputs(paths, folds, load_targets(paths, folds, []), images, cache.digest)


@needs_cpu_fp16
@pytest.mark.parametrize("history_amp, spec_amp, stale", [
    ("fp16", "fp16", None),
    ("fp16", "auto", "trained with other settings (amp)"),
    (None, "auto", None),  # an older history, from before train.amp: trained as auto picks
    (None, "fp16", "trained with other settings (amp)"),
])
def test_amp_is_part_of_the_recipe(fp16_run, tmp_path, history_amp, spec_amp, stale):
    paths, folds, _ = fp16_run
    record = read_json(paths.history("test_resnet", 0))
    if history_amp is None:
        record["train"].pop("amp")
    copy = RunPaths(tmp_path / "run")
    copy.model_dir("test_resnet").mkdir(parents=True)
    write_json(copy.history("test_resnet", 0), record)
    copy.weights("test_resnet", 0).write_bytes(paths.weights("test_resnet", 0).read_bytes())
    sources = Sources(folds.sha256, load_cache(paths, "train").digest)
    assert stale_reason(copy, specs(amp=spec_amp, clip_grad=1.0)[0], 0, sources) == stale


# ---------------------------------------------------------------- bf16 and channels_last on CPU


@pytest.fixture(scope="module")
def eval_model():
    torch.manual_seed(0)
    return timm.create_model("test_resnet", num_classes=10).eval()


@pytest.mark.parametrize("amp", ["bf16", pytest.param("fp16", marks=needs_cpu_fp16)])
def test_channels_last_and_autocast_stay_close_to_float32(eval_model, amp):
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = torch.softmax(eval_model(x), 1)
        model = eval_model.to(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[amp]):
            low = torch.softmax(model(x.contiguous(memory_format=torch.channels_last)).float(), 1)
        eval_model.to(memory_format=torch.contiguous_format)
    assert torch.isfinite(low).all()
    assert (low - reference).abs().max() < 0.02  # bf16 keeps 8 bits of mantissa: ~1% on a probability


@pytest.mark.parametrize("amp", ["bf16", pytest.param("fp16", marks=needs_cpu_fp16)])
def test_predict_views_under_autocast_match_float32(eval_model, small_digits_dir, tmp_path, amp):
    paths, _ = prepared(tmp_path / "run", small_digits_dir)
    images = ImageSource(load_cache(paths, "train").images, CPU)
    rows = np.arange(70)  # 2 full batches of 32 and a partial one
    views = [PLAIN, *tta_views(2)]
    plans = {a: ViewPlan((16, 16), views, model_norm(eval_model), 32, amp=a) for a in ("off", amp)}
    reference, low = (predict_views(eval_model, images, rows, plans[a])[0] for a in ("off", amp))
    assert low.shape == reference.shape == (3, 70, 10) and np.isfinite(low).all()
    np.testing.assert_allclose(low.sum(axis=2), 1.0, atol=1e-6)
    assert np.abs(low - reference).max() < 0.02


@needs_cpu_fp16
def test_history_json_is_plain(fp16_run):
    """The history's new keys read back as JSON numbers and strings (no tensors, no NaN for a finite run)."""
    paths, _, _ = fp16_run
    text = paths.history("test_resnet", 0).read_text()
    assert "NaN" not in text and json.loads(text)["device_name"] == "cpu"


def test_weights_that_do_not_fit_the_arch_are_one_line_naming_the_file(tmp_path):
    """Another arch's (or timm version's) weights under a model's name: a StackerError, not a torch traceback."""
    import numpy as np
    from safetensors.torch import save_model

    from base_models.config import model_specs
    from base_models.train import Target, build_model, load_fold_model
    from oof import RunPaths, StackerError

    specs = model_specs([{"arch": "test_resnet"}, {"arch": "test_efficientnet", "name": "wrong"}], {"size": 16})
    targets = [Target(None, ("a", "b"), np.array([0, 1]))]
    paths = RunPaths(tmp_path)
    paths.model_dir("test_resnet").mkdir(parents=True)
    save_model(build_model(specs[1], targets, pretrained=False), str(paths.weights("test_resnet", 0)))
    with pytest.raises(StackerError, match=r"fold0\.safetensors: does not load into test_resnet \("):
        load_fold_model(paths, specs[0], 0, targets, torch.device("cpu"))
