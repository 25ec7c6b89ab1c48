"""Ray on one multi-GPU machine: the local cluster stacker starts runs a job on every GPU slot at once
(fractional `engine.num_gpus` gives several slots per card), and a job holding a fraction of a card is
told its share (STACKER_GPU_SHARE) so that its image cache takes that share of the card.

What a GPU would report, torch.cuda.device_count, is faked; the Ray cluster, its tasks and their
worker processes are real (a GPU is a logical resource to Ray's scheduler: the tasks need no card).
"""
from __future__ import annotations

import functools
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from base_models import engines
from base_models.config import EngineConfig
from oof import StackerError


@pytest.mark.parametrize("workers, num_cpus, gpus, share, cpus", [
    (1, 1, 0, 0, 1),  # CPU only, --parallel 1: one CPU
    (4, 1, 0, 0, 4),  # CPU only, --parallel 4
    (3, 0.5, 0, 0, 2),  # 3 jobs of half a CPU need 1.5: rounded up, not down to 1
    (1, 1, 4, 1, 4),  # 4 GPUs, a whole one per job: 4 jobs at once
    (1, 1, 2, 0.5, 4),  # two jobs per card
    (1, 2, 2, 0.25, 16),  # four per card, 2 CPUs each
    (1, 1, 3, 0.3, 10),  # 3 / 0.3 is 9.999...: still 10 slots
    (1, 1, 1, 0.4, 2),  # 2 slots of 0.4; the rest of the card is no slot
    (1, 1, 4, 2, 2),  # two GPUs per job
    (6, 1, 2, 1, 6),  # --parallel above the GPU slots
    (1, 1, 2, 0, 1),  # engine.num_gpus 0: CPU jobs on a GPU machine
])
def test_local_cluster_cpus_fit_every_gpu_slot(workers, num_cpus, gpus, share, cpus):
    assert engines.local_cluster_cpus(workers, num_cpus, gpus, share) == cpus


def fake_job(fold: int, device: str = "cuda"):
    """A job as the engine reads it (name, fold, device), without the training side's imports."""
    return SimpleNamespace(model=SimpleNamespace(name="m", train=SimpleNamespace(device=device)), fold=fold)


def job_share_of(cfg: EngineConfig, *devices: str) -> float:
    return engines.RayEngine(cfg).job_share([fake_job(0, d) for d in devices])


def test_the_share_a_local_cluster_is_sized_for():
    assert job_share_of(EngineConfig(name="ray"), "auto", "cpu") == 1  # a job may use a GPU: one each
    assert job_share_of(EngineConfig(name="ray"), "cpu") == 0  # CPU jobs only: no GPU slots
    assert job_share_of(EngineConfig(name="ray", num_gpus=0.25), "cpu") == 0.25  # as job_gpus asks


def wait_for_all(folder: str, n: int, job) -> float:
    """A job that records its GPU share and card, then waits until all `n` jobs have started: it finishes
    only where the cluster runs them all at once."""
    share, card = os.environ.get(engines.GPU_SHARE_ENV, "none"), os.environ.get("CUDA_VISIBLE_DEVICES", "")
    (Path(folder) / f"job{job.fold}").write_text(f"{share} {card}")
    deadline = time.monotonic() + 60
    while len(list(Path(folder).glob("job*"))) < n:
        if time.monotonic() > deadline:
            raise StackerError(f"only {len(list(Path(folder).glob('job*')))} of {n} jobs ran at once")
        time.sleep(0.05)
    return 0.0


def test_a_local_ray_cluster_runs_a_job_on_every_gpu_slot_and_tells_each_its_share(tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        pytest.skip("another test's Ray cluster is running; this test starts its own")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)  # what a machine with 2 GPUs reports
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    shared, whole = tmp_path / "shared", tmp_path / "whole"
    shared.mkdir()
    whole.mkdir()
    lines = []
    try:  # --parallel 1 (the default): 2 cards at half a card per job are 4 jobs at once
        results = engines.run_jobs(functools.partial(wait_for_all, str(shared), 4), [fake_job(f) for f in range(4)],
                                   EngineConfig(name="ray", num_gpus=0.5), 1, lines.append)
        resources = ray.cluster_resources()
        engines.run_jobs(functools.partial(wait_for_all, str(whole), 1), [fake_job(0)],
                         EngineConfig(name="ray", num_gpus=1), 1, lines.append)  # the cluster is joined
    finally:
        ray.shutdown()
    assert (resources["CPU"], resources["GPU"]) == (4, 2)
    assert "train-base: ray engine, local cluster 4 CPUs, 2 GPUs for 4 jobs at once (2 GPUs at 0.5 GPU per " \
           "job, 1 CPU each)" in lines
    assert [r.state for r in results] == ["done"] * 4
    seen = [(shared / f"job{f}").read_text().split() for f in range(4)]
    assert [share for share, _ in seen] == ["0.5"] * 4
    assert sorted(card for _, card in seen) == ["0", "0", "1", "1"]  # two jobs on each card
    assert (whole / "job0").read_text().split()[0] == "none"  # a whole card: no share to divide
    assert "train-base: ray engine, cluster 4 CPUs, 2 GPUs" in lines
