"""torch.compile on CPU (inductor): the training steps and the TTA prediction compile once, then never again.

A job ignores `train.compile` on CPU (a cold inductor compile of test_resnet's training graph took
70-100 s on 2 CPU cores, ~10 s from inductor's on-disk cache), so these tests compile the job's own
forward the way `_compiled` does on CUDA and drive it through the job's own step functions. A
recompile after the first batches would raise (`error_on_recompile`).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from base_models.augment import PLAIN, tta_views
from base_models.batches import ImageSource
from base_models.cache import load_cache
from base_models.config import DataConfig, FoldsConfig, model_specs
from base_models.jobs import load_targets, prepare_run
from base_models.predict import ViewPlan, predict_views
from base_models.train import (TrainInputs, _setup, _start_segment, _steps_per_epoch, _train_epoch, build_model,
                               epoch_order)
from oof import RunPaths

pytestmark = pytest.mark.slow  # both tests: ~110 s on 2 cores with a cold inductor cache, ~30 s warm
CPU = torch.device("cpu")


@pytest.fixture
def job(tmp_path, small_digits_dir):
    """Fold 0 of a bf16 job with EMA and clipping, its forward compiled as on CUDA, in its first segment."""
    paths = RunPaths(tmp_path / "run")
    # 32 px: at 16 px test_resnet's layer4 sees 1x1 maps, where oneDNN's bf16 conv weight gradient
    # (3x3, stride 2) on CPU is intermittently non-finite (torch 2.14.1, oneDNN 3.12; eager too)
    _, folds = prepare_run(paths, DataConfig(root=str(small_digits_dir)), FoldsConfig(k=3), (32, 32),
                           log=lambda s: None)
    spec = model_specs([{"arch": "test_resnet"}], {"size": 32, "epochs": 2, "batch_size": 32, "amp": "bf16",
                                                   "ema_decay": 0.9, "clip_grad": 1.0})[0]
    cache = load_cache(paths, "train")
    inputs = TrainInputs(paths, folds, load_targets(paths, folds, []), ImageSource(cache.images, CPU), cache.digest)
    state = _setup(spec, 0, inputs, None, lambda s: None)
    state.forward = torch.compile(state.model)
    state.steps = _steps_per_epoch(state)
    _start_segment(state, 0, state.schedule[0], None)
    torch._dynamo.reset()
    counters.clear()
    return state


def graphs() -> tuple[int, int]:
    return counters["frames"]["total"], counters["stats"]["unique_graphs"]


def test_compiled_training_steps_compile_in_the_first_batch_only(job):
    def epoch():
        order = job.train_rows[epoch_order(len(job.train_rows), job.sample_w, job.generator)]
        return _train_epoch(job, order, (32, 32))

    loss, seen, nonfinite, skipped = epoch()
    first = graphs()
    assert first[1] >= 1 and np.isfinite(loss) and seen == (32, 32) and nonfinite == skipped == 0
    with torch._dynamo.config.patch(error_on_recompile=True):
        loss2, *_ = epoch()  # every step has the first one's shape: the last partial batch is dropped
    assert graphs() == first and np.isfinite(loss2)
    assert all(torch.isfinite(p).all() for p in job.ema.module.parameters())  # EMA follows the compiled forward


def test_compiled_tta_prediction_compiles_once_for_every_fold_model(job):
    images = ImageSource(load_cache(job.inputs.paths, "train").images, CPU)
    plan = ViewPlan((32, 32), [PLAIN, *tta_views(3)], job.norm, 32, fixed_shape=True, amp="bf16")
    eager = predict_views(job.model, images, np.arange(70), plan)[0]
    predict_views(torch.compile(job.model), images, np.arange(32), plan)  # compiles: one full batch
    first = graphs()
    with torch._dynamo.config.patch(error_on_recompile=True):
        # a padded last batch (70 = 32 + 32 + 6) and another fold's model: no new graph
        compiled = predict_views(torch.compile(job.model), images, np.arange(70), plan)[0]
        torch.manual_seed(1)
        other = build_model(job.spec, job.inputs.targets, pretrained=False).eval()
        predict_views(torch.compile(other), images, np.arange(70), plan)
    assert graphs() == first
    assert compiled.shape == (4, 70, 10) and np.isfinite(compiled).all()
    assert np.abs(compiled - eager).max() < 0.02  # the compiled bf16 graph predicts what eager bf16 does
