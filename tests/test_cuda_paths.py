"""The CUDA-only branches, on CPU: what a card would report (its count, capability, free memory, rng
states) is fed in; the torch, timm, files and training around it are real.

- resume where fewer GPUs are visible than where the checkpoint was saved;
- torch.compile skipped on cards Triton refuses (compute capability < 7.0);
- no step waits on the host: no blocking copy to a device, and a constant number of host reads per epoch;
- the cache is read through its memory map, never copied whole into the process;
- the GPU cache budget follows the card's free memory, train and test together;
- fp16's skipped steps are the GradScaler's skips, not only non-finite losses.
"""
from __future__ import annotations

import functools
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from base_models import train as train_module
from base_models.batches import (GPU_SHARE_ENV, CacheBudget, ImageSource, cache_budget_gb, cache_plan, gpu_share,
                                 on_device_plan)
from base_models.cache import load_cache
from base_models.config import TrainConfig
from base_models.jobs import load_targets
from base_models.predict import autocast_supported, compile_note, compile_refusal
from base_models.train import (TrainInputs, _compiled, _rng_states, _set_rng_states, _setup, _start_segment,
                               _steps_per_epoch, _train_epoch, own_cuda_state, read_history, train_fold)
from oof import StackerError
from tiny import QUIET, TINY
from tiny import prepared as tiny_prepared
from tiny import specs as tiny_specs

CPU = torch.device("cpu")
CUDA = torch.device("cuda")
needs_cpu_fp16 = pytest.mark.skipif(not autocast_supported("cpu", "fp16"),
                                    reason=f"torch {torch.__version__} has no float16 autocast on CPU")


specs = functools.partial(tiny_specs, train={**TINY, "batch_size": 16, "lr": 3e-3})  # twice TINY's steps an epoch


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, small_digits_dir):
    return tiny_prepared(tmp_path_factory.mktemp("cuda_paths") / "run", small_digits_dir)


def job_inputs(paths, folds) -> TrainInputs:
    cache = load_cache(paths, "train")
    return TrainInputs(paths, folds, load_targets(paths, folds, []), ImageSource(cache.images, CPU), cache.digest)


def job_state(paths, folds, spec):
    state = _setup(spec, 0, job_inputs(paths, folds), None, QUIET.log)
    state.steps = _steps_per_epoch(state)
    _start_segment(state, 0, state.schedule[0], None)
    return state


class FakeCards:
    """What `torch.cuda` reports on a machine with `count` cards: their rng states, the current device."""

    def __init__(self, count: int):
        self.count, self.set = count, []
        self.states = [torch.full((16,), i, dtype=torch.uint8) for i in range(count)]

    def _check(self, device) -> int:
        index = 0 if device in (None, "cuda") else int(getattr(device, "index", device) or 0)
        if index >= self.count:  # as torch does for a device this machine does not have
            raise IndexError(f"device index {index} out of range for {self.count} device(s)")
        return index

    def get_rng_state(self, device="cuda"):
        return self.states[self._check(device)].clone()

    def set_rng_state(self, state, device="cuda"):
        self.set.append((self._check(device), int(state[0])))

    def install(self, monkeypatch):
        for module in (torch.cuda, torch.cuda.random):
            monkeypatch.setattr(module, "get_rng_state", self.get_rng_state)
            monkeypatch.setattr(module, "set_rng_state", self.set_rng_state)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: self.count)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


# ---------------------------------------------------------------- 1. rng states and fewer GPUs


def test_a_checkpoint_saved_on_two_gpus_resumes_on_one(monkeypatch):
    two = FakeCards(2)
    two.install(monkeypatch)
    generator = torch.Generator().manual_seed(0)
    old = {**_rng_states(generator, CUDA), "cuda_rng": [two.get_rng_state(0), two.get_rng_state(1)]}
    old.pop("cuda_rng_device")  # a checkpoint that saved every visible card's state
    one = FakeCards(1)
    one.install(monkeypatch)
    _set_rng_states(old, generator, CUDA)  # an engine worker that sees one card
    assert one.set == [(0, 0)]  # its own device's entry, and nothing else


def test_a_checkpoint_holds_its_own_devices_state_alone(monkeypatch, tmp_path):
    cards = FakeCards(2)
    cards.install(monkeypatch)
    generator = torch.Generator().manual_seed(0)
    saved = _rng_states(generator, torch.device("cuda", 1))
    assert saved["cuda_rng_device"] == 1 and len(saved["cuda_rng"]) == 1 and int(saved["cuda_rng"][0][0]) == 1
    torch.save(saved, tmp_path / "rng.pt")
    loaded = torch.load(tmp_path / "rng.pt", weights_only=True)  # loads as a checkpoint does
    one = FakeCards(1)
    one.install(monkeypatch)
    _set_rng_states(loaded, generator, CUDA)  # resumed in a worker pinned to that card, now device 0
    assert one.set == [(0, 1)]


@pytest.mark.parametrize("saved, own, expected", [
    ({"cuda_rng": []}, 0, None),                          # saved on CPU
    ({"cuda_rng": ["a", "b"]}, None, None),               # resumed on CPU
    ({"cuda_rng": ["a", "b"]}, 1, "b"),                   # every card's states: the own one's
    ({"cuda_rng": ["a"]}, 3, None),                       # a card the saving machine did not have
    ({"cuda_rng": ["a"], "cuda_rng_device": 2}, 0, "a"),  # the job's own state, wherever it now runs
])
def test_own_cuda_state(saved, own, expected):
    assert own_cuda_state(saved, own) == expected


def test_cpu_checkpoints_record_no_cuda_state():
    saved = _rng_states(torch.Generator().manual_seed(0), CPU)
    assert saved["cuda_rng"] == [] and saved["cuda_rng_device"] is None


# ---------------------------------------------------------------- 2. compile on old cards


@pytest.mark.parametrize("capability, skipped", [((6, 0), True), ((6, 1), True), ((7, 0), False), ((7, 5), False),
                                                 ((9, 0), False)])
def test_compile_is_refused_below_capability_7(capability, skipped):
    note = compile_refusal("cuda", capability, "Tesla P100-PCIE-16GB")
    assert (note is not None) == skipped
    if skipped:
        assert "Tesla P100" in note and f"{capability[0]}.{capability[1]}" in note and "7.0" in note


def test_a_p100_trains_uncompiled_with_a_note(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (6, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla P100-PCIE-16GB")
    model, notes = torch.nn.Linear(2, 2), []
    assert _compiled(model, TrainConfig(compile=True), CUDA, notes.append) is model
    assert len(notes) == 1 and "ignored on Tesla P100" in notes[0]
    assert compile_note(CUDA) is not None


def test_a_t4_compiles(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    model = torch.nn.Linear(2, 2)
    assert _compiled(model, TrainConfig(compile=True), CUDA, print) is not model  # torch.compile's wrapper


# ---------------------------------------------------------------- 4. no step waits on the host

MOVES = {torch.as_tensor, torch.tensor, torch.Tensor.to, torch.Tensor.cuda, torch.Tensor.copy_}


STACKER_CODE = str(Path(train_module.__file__).parent)


def _called_from_stacker() -> bool:
    """Whether the torch call being made comes from base_models/ (torch's own internals are not judged:
    on CUDA the fused AdamW makes its step counters on the device)."""
    frame = sys._getframe(2)  # past this function and the mode's __torch_function__: the code calling torch
    while frame is not None and frame.f_code.co_filename.endswith(("overrides.py", "_python_dispatch.py")):
        frame = frame.f_back
    return frame is not None and frame.f_code.co_filename.startswith(STACKER_CODE)


class DeviceMoves(TorchFunctionMode):
    """Calls in stacker's code that move host data to a device and block: every such call names a device,
    and a non-blocking one (pinned memory) says so. On CUDA each blocking one synchronises the host."""

    def __init__(self):
        super().__init__()
        self.blocking = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in MOVES and not kwargs.get("non_blocking", False) and _called_from_stacker():
            named = kwargs.get("device") is not None or any(isinstance(a, (torch.device, str)) for a in args[1:])
            if named or func in (torch.Tensor.cuda, torch.Tensor.copy_):
                self.blocking.append(getattr(func, "__name__", str(func)))
        return func(*args, **kwargs)


OPTIM = f"{os.sep}torch{os.sep}optim{os.sep}"


def _in_optimizer() -> bool:
    frame = sys._getframe(1)
    while frame is not None and OPTIM not in frame.f_code.co_filename:
        frame = frame.f_back
    return frame is not None


class HostReads(TorchDispatchMode):
    """Reads of a tensor's value by the host (`.item()`, `float()`, `bool()`): a sync on CUDA.

    A non-fused AdamW reads its step counters on the host; the CUDA path runs the fused one, which
    does not, so with a non-fused optimizer (CPU without fp16) the optimizer's own reads are left out.
    """

    def __init__(self, fused: bool):
        super().__init__()
        self.fused, self.reads = fused, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and (self.fused or not _in_optimizer()):
            self.reads += 1
        return func(*args, **(kwargs or {}))


def epoch_counts(state):
    order = state.train_rows[np.random.default_rng(0).permutation(len(state.train_rows))]
    moves, reads = DeviceMoves(), HostReads(bool(state.optimizer.defaults.get("fused")))
    with moves, reads:
        _train_epoch(state, order, state.schedule[0].size)
    return moves.blocking, reads.reads, state.steps


@pytest.mark.parametrize("amp", ["off", pytest.param("fp16", marks=needs_cpu_fp16)])
@pytest.mark.parametrize("extra", [{}, {"clip_grad": 1.0, "ema_decay": 0.9}])
def test_an_epoch_reads_the_host_a_fixed_number_of_times(prepared, amp, extra):
    state = job_state(*prepared, specs(amp=amp, **extra)[0])
    blocking, reads, steps = epoch_counts(state)
    assert steps >= 10  # a read per step would show
    assert blocking == []  # every per-batch number reaches the device through `to_device`
    assert reads == 3  # the epoch's loss, non-finite batches and skipped steps, read once at its end


def test_mixup_steps_read_nothing_either(prepared):
    state = job_state(*prepared, specs(mixup_alpha=0.4, cutmix_alpha=1.0)[0])
    blocking, reads, _ = epoch_counts(state)
    assert blocking == [] and reads == 3


# ---------------------------------------------------------------- 5. the cache is not copied


def _anon_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    pytest.skip("no RssAnon in /proc/self/status")


def test_the_cache_is_read_through_its_memory_map(tmp_path):
    shape = (1200, 256, 192, 3)  # 177 MB, a cache of Paddy's recipe size
    images = np.memmap(tmp_path / "train.u8", np.uint8, "w+", shape=shape)
    images[::97] = 7
    images.flush()
    images = np.memmap(tmp_path / "train.u8", np.uint8, "r", shape=shape)
    before = _anon_rss_mb()
    source = ImageSource(images, CPU)
    grown = _anon_rss_mb() - before
    assert grown < 40, f"placing a 177 MB cache took {grown:.0f} MB of process memory"
    batch, n = next(source.batches(np.array([0, 97, 5]), 3))
    assert n == 3 and batch[:2].eq(7).all() and batch[2].eq(0).all() and batch.is_contiguous()


# ---------------------------------------------------------------- 6. the GPU cache budget


@pytest.mark.parametrize("setting, free, reserve, share, expected", [
    ("auto", 15.0, 6.0, 1.0, 9.0),    # a T4 with 15 GB free
    ("auto", 4.0, 6.0, 1.0, 0.0),     # less free than the reserve: nothing on the card
    ("auto", 80.0, 6.0, 0.5, 37.0),   # half an H100's memory for a job with half the card
    (3.0, 15.0, 6.0, 1.0, 3.0),       # an explicit budget is kept
    (0.0, 15.0, 6.0, 1.0, 0.0),       # 0: the pinned host path
])
def test_cache_budget(setting, free, reserve, share, expected):
    assert cache_budget_gb(setting, free, reserve, share) == pytest.approx(expected)


def test_an_explicit_budget_above_free_memory_is_refused_in_one_line():
    with pytest.raises(StackerError, match=r"^train.gpu_cache_gb: 12 GB, but the card has 10.0 GB free for this "
                                           r"job; lower it, or set auto"):
        cache_budget_gb(12.0, 10.0, 2.0)
    with pytest.raises(StackerError, match=r"5.0 GB free for this job \(its 0.5 share of the card\)"):
        cache_budget_gb(8.0, 10.0, 2.0, share=0.5)


def test_train_and_test_share_one_budget():
    # A T4 (15 GB free) and a 480x640 cache: train 6 GB, test 4 GB. Per split under a fixed 8 GB each
    # both would land on the card beside the model; under one budget only train does.
    budget_gb, plan = cache_plan([6.0, 4.0], CacheBudget(), 15.0)
    assert budget_gb == 9.0 and plan == [True, False]
    assert on_device_plan([1.5, 0.5], 9.0) == [True, True]  # the recipe's 256x192 cache: both fit
    assert on_device_plan([10.0, 0.5], 9.0) == [False, True]  # test still fits after train did not


def test_a_fractional_gpu_gets_its_share(monkeypatch):
    monkeypatch.setenv(GPU_SHARE_ENV, "0.25")
    assert gpu_share() == 0.25
    assert cache_plan([3.0], CacheBudget(), 40.0, gpu_share()) == (8.5, [True])
    monkeypatch.delenv(GPU_SHARE_ENV)
    assert gpu_share() == 1.0


def test_gpu_cache_gb_is_auto_by_default_and_checked():
    assert TrainConfig().gpu_cache_gb == "auto" and TrainConfig(gpu_cache_gb=2).gpu_cache_gb == 2
    with pytest.raises(StackerError, match="gpu_cache_gb"):
        TrainConfig(gpu_cache_gb="all")
    with pytest.raises(StackerError, match="gpu_reserve_gb"):
        TrainConfig(gpu_reserve_gb=-1)


# ---------------------------------------------------------------- 7. fp16's skipped steps


@needs_cpu_fp16
def test_skipped_steps_are_the_scalers_skips(tmp_path, small_digits_dir, monkeypatch):
    # A scale of 2^40 overflows fp16's gradients (max 65504) with finite losses: the scaler skips and
    # halves until the gradients fit. growth_interval keeps it from growing within the epoch, so every
    # halving is one skipped step.
    init = 2.0 ** 40
    monkeypatch.setattr(torch.amp, "GradScaler",
                        functools.partial(torch.amp.GradScaler, init_scale=init, growth_interval=10_000))
    paths, folds = tiny_prepared(tmp_path / "run", small_digits_dir)
    train_fold(specs(amp="fp16")[0], 0, job_inputs(paths, folds), log=QUIET.log)
    epoch = read_history(paths, "test_resnet", 0)[0]
    halvings = round(math.log2(init / epoch["loss_scale"]))
    assert epoch["nonfinite_batches"] == 0 and halvings >= 5
    assert epoch["skipped_steps"] == halvings
