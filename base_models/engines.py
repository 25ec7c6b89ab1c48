"""Engines: where and when a stage's (model, fold) jobs run (train-base's, predict-oof's); never what a job computes.

An engine is an `Engine` subclass, registered by name in `ENGINES` (the one registry: `engine.name`'s
vocabulary and the CLI's `--engine` choices read it); a new engine is one class plus one line there.
It gets a picklable `work(job) -> seconds inside train_fold (None: skipped)` and the jobs, runs each
job once, and returns one `JobResult` per job. A job is idempotent (its file lock, its
resume checkpoint, the skip of a job finished meanwhile live in the work itself), so an engine may
rerun a job whose worker died: it resumes from its last epoch checkpoint.

- `local`: one worker process per visible GPU (or `parallel` on CPU), fed from one shared queue, so
  a free worker takes the next job; each worker is pinned to one GPU (CUDA_VISIBLE_DEVICES).
- `ray`: one Ray task per job; a dead worker is retried up to `max_retries` times, an error the job
  raises is not. A GPU job's worker is retired after it (`max_calls=1`), so the next job starts on a
  GPU whose memory is all free; CPU workers are reused (a fresh process per job costs 5-10 s here, the
  import of torch, for nothing: a CPU job leaves no device memory behind). Without an address (nor
  RAY_ADDRESS) stacker starts a local cluster with the GPUs torch sees and enough CPUs for every GPU
  slot to run a job at once: max(workers, GPU slots) x num_cpus, a slot being a job's `num_gpus`
  share of a card (`local_cluster_cpus`). A job given a fraction of a card (0 < num_gpus < 1) runs
  with STACKER_GPU_SHARE set to that fraction, so its image cache takes that share of the card's
  budget (`batches`) instead of every job on the card placing a full one.

A job that fails ends the stage with one line naming it, after the other jobs finish (their results
are kept); a summary table (job, state, seconds, worker) ends every engine run.
"""
from __future__ import annotations

import math
import multiprocessing
import os
import socket
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from oof import GridProgress, StackerError, info

RAY_MISSING = "engine.name ray: Ray is not installed; pip install 'stacker[ray]'"
# A Ray GPU job's share of its card, where it has a fraction of one (engine.num_gpus < 1): read where the
# job places its image cache, which then takes that share of the card's budget.
GPU_SHARE_ENV = "STACKER_GPU_SHARE"


@dataclass(frozen=True)
class JobResult:
    """What an engine reports of one job: `state` is done, skipped (finished elsewhere) or failed."""

    model: str
    fold: int | None  # None: the model's full fit
    state: str
    seconds: float  # the job's wall time in its worker, placing the cache included
    train_seconds: float  # inside train_fold; seconds - train_seconds is the engine's own per-job cost
    worker: str  # host:pid and the GPUs the worker saw
    error: str = ""
    repeat: int = 0

    @property
    def job(self) -> str:
        return job_label(self.model, self.fold, self.repeat)


def job_label(model: str, fold: int | None, repeat: int = 0) -> str:
    """How a job is named in logs and errors: "resnet26d fold 3", "resnet26d repeat 1 fold 3", or
    "resnet26d full fit" for fold None (the model trained on every train row)."""
    if fold is None:
        return f"{model} full fit"
    return f"{model} fold {fold}" if not repeat else f"{model} repeat {repeat} fold {fold}"


class JobLog:
    """A job's log: each line appended to its own file (`RunPaths.job_log`), then to `echo`, or, in a
    worker (echo None), printed with the job's prefix for the driver's console.

    Picklable without an echo (no lambdas), so it travels with the job to a worker process or a Ray node.
    """

    def __init__(self, path, prefix: str, echo: Callable[[str], None] | None = None):
        self.path, self.prefix, self.echo = Path(path), prefix, echo

    def __call__(self, line: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
        if self.echo is not None:
            self.echo(line)
        else:
            line = line.strip()
            print(line if line.startswith(self.prefix) else f"[{self.prefix}] {line}", flush=True)


def worker_name() -> str:
    """host:pid and the GPUs this process may use, for the summary and for errors."""
    gpus = os.environ.get("CUDA_VISIBLE_DEVICES")
    return f"{socket.gethostname()}:{os.getpid()}" + (f" gpu {gpus}" if gpus else "")


def timed_job(work: Callable, job) -> JobResult:
    """Run one job in this process and time it."""
    t0 = time.perf_counter()
    train_seconds = work(job)
    state = "skipped" if train_seconds is None else "done"
    return JobResult(job.model.name, job.fold, state, time.perf_counter() - t0, train_seconds or 0.0, worker_name(),
                     repeat=getattr(job, "repeat", 0))


def run_jobs(work: Callable, jobs: list, cfg, workers: int, log=info, stage: str = "train-base") -> list[JobResult]:
    """Every job of `stage` through the engine `cfg.name` names (`cfg`: the `engine:` section,
    `config.EngineConfig`), `workers` at once where the engine runs workers of its own.

    Raises:
        StackerError: a job failed (one line naming the first, with how many others failed too).
    """
    results = create_engine(cfg).run(work, jobs, workers, log, stage)
    log_summary(results, log)
    raise_failures(results)
    return results


def raise_failures(results: list[JobResult]) -> None:
    failed = [r for r in results if r.state == "failed"]
    if failed:
        first = failed[0]
        more = f"; {len(failed) - 1} other job(s) failed too, see the summary" if len(failed) > 1 else ""
        raise StackerError(f"{first.job}: {first.error}{more}")


def log_summary(results: list[JobResult], log=info) -> None:
    """One row per job: job, state, seconds, worker/device."""
    log(f"  {'job':<28} {'state':<8} {'seconds':>8}  worker")
    for r in results:
        log(f"  {r.job:<28} {r.state:<8} {r.seconds:>8.1f}  {r.worker}" + (f"  ({r.error})" if r.error else ""))


def failed(job, error: str, worker: str = "") -> JobResult:
    return JobResult(job.model.name, job.fold, "failed", 0.0, 0.0, worker, error, getattr(job, "repeat", 0))


class Engine:
    """Where a stage's jobs run: `run` gives one `JobResult` per job, in the jobs' order.

    `__init__` only stores the `engine:` section (`config.EngineConfig`, checked already). `workers`
    and `runs_here` have the defaults of an engine that starts workers of its own; `run` is the one
    method a subclass must give.
    """

    def __init__(self, cfg):
        self.cfg = cfg

    def workers(self, todo: list, parallel: int) -> int:
        """Jobs at once for the pending jobs `todo`: `parallel` (--parallel), what a cluster the engine
        starts is sized for."""
        return parallel

    def runs_here(self, workers: int) -> bool:
        """True where the stage runs the jobs itself, one after another in this process (the images placed
        once per device, nothing pickled), and never calls `run`."""
        return False

    def run(self, work: Callable, jobs: list, workers: int, log, stage: str) -> list[JobResult]:
        """Run `work(job)` once for each job; a job's error is its result (`failed`), never raised."""
        raise NotImplementedError(f"{type(self).__name__} gives no run")


# ---------------------------------------------------------------- local: one process per GPU, one queue


def _pin_worker(slots, threads: int) -> None:
    """A local worker's initializer: take one GPU slot from the shared queue and see that GPU alone;
    use its share of the CPU cores (as Ray gives a task OMP_NUM_THREADS = its num_cpus)."""
    slot = slots.get()
    if slot is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(slot)
    import torch

    torch.set_num_threads(threads)


def worker_threads(workers: int) -> int:
    """CPU threads per local worker: OMP_NUM_THREADS when set, else the cores shared out.

    On CPU a job's weights are bit-identical across engines for the same threads per job; another
    thread count may sum in another order (torch's CPU kernels split reductions by thread)."""
    return int(os.environ.get("OMP_NUM_THREADS") or max(1, (os.cpu_count() or 1) // workers))


class LocalEngine(Engine):
    """`local`: `workers` spawned processes fed from one queue, each pinned to one GPU; one worker runs
    the jobs in this process."""

    def workers(self, todo: list, parallel: int) -> int:
        """One per visible GPU where a job runs on CUDA, else `parallel`; never more than jobs."""
        import torch

        from .models import resolve_device

        cuda = any(resolve_device(j.model.train.device).type == "cuda" for j in todo)
        return max(1, min(torch.cuda.device_count() if cuda else parallel, len(todo)))

    def runs_here(self, workers: int) -> bool:
        return workers == 1

    def run(self, work: Callable, jobs: list, workers: int, log, stage: str) -> list[JobResult]:
        """`workers` spawned processes; each takes the next job when free (one submitted task per job)."""
        import torch

        gpus = torch.cuda.device_count()
        # The devices this process may use, as CUDA_VISIBLE_DEVICES names them (indices, UUIDs or MIG ids):
        # a worker pinned to "slot 2" of a Slurm allocation "4,5,6" must see device 6, not device 2.
        visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        names = (visible or [str(i) for i in range(gpus)])[:gpus]
        ctx = multiprocessing.get_context("spawn")  # never fork a process that may hold CUDA
        slots = ctx.Queue()
        for slot in range(workers):
            slots.put(names[slot % len(names)] if gpus else None)
        log(f"{stage}: local engine, {workers} workers" + (f" on GPUs {', '.join(names[:workers])}" if gpus
                                                              else " on CPU"))
        results, grid = {}, GridProgress(len(jobs), log)
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_pin_worker,
                                 initargs=(slots, worker_threads(workers))) as pool:
            futures = {pool.submit(timed_job, work, job): i for i, job in enumerate(jobs)}
            for future in as_completed(futures):
                i = futures[future]
                results[i] = _local_result(future, jobs[i], stage)
                grid.step(f"{results[i].job} {results[i].state}")
        return [results[i] for i in range(len(jobs))]


def _local_result(future, job, stage: str) -> JobResult:
    try:
        return future.result()
    except StackerError as e:
        return failed(job, str(e))
    except BrokenProcessPool:
        return failed(job, f"its worker process died (killed, or out of memory); run {stage} again to "
                           "resume it (training resumes from its last checkpoint)")
    except Exception as e:  # anything else a job raised (CUDA out of memory, a damaged weights file): named
        traceback.print_exception(e)
        return failed(job, f"{type(e).__name__}: {e}".splitlines()[0])


# ---------------------------------------------------------------- ray: one task per job


def _import_ray():
    try:
        import ray
    except ImportError:
        raise StackerError(RAY_MISSING) from None
    return ray


def _timed_cpu_job(work: Callable, job) -> JobResult:
    """`timed_job` as a Ray function of its own: Ray keeps max_calls per function, and CPU workers are reused."""
    return timed_job(work, job)


def _timed_gpu_job(work: Callable, job, share: float) -> JobResult:
    """`timed_job` in a Ray GPU task (its worker retired after it) holding `share` GPUs: a fraction of a
    card is told to the job in STACKER_GPU_SHARE, so its image cache takes that share of the card."""
    if 0 < share < 1:
        os.environ[GPU_SHARE_ENV] = str(share)
    else:
        os.environ.pop(GPU_SHARE_ENV, None)
    return timed_job(work, job)


def gpu_slots(gpus_visible: int, num_gpus_per_job: float) -> int:
    """Jobs the visible GPUs run at once at `num_gpus_per_job` each: 4 GPUs at 0.5 are 8 slots, at 2 are 2."""
    if gpus_visible <= 0 or num_gpus_per_job <= 0:
        return 0
    return int(math.floor(gpus_visible / num_gpus_per_job + 1e-9))  # 3 / 0.3 is 9.99...: still 10 slots


def local_cluster_cpus(workers: int, num_cpus: float, gpus_visible: int, num_gpus_per_job: float) -> int:
    """CPUs of the local Ray cluster stacker starts: enough for `workers` jobs at once, and for a job on
    every GPU slot (`gpu_slots`), at `num_cpus` CPUs per job; at least 1."""
    return max(1, math.ceil(round(max(workers, gpu_slots(gpus_visible, num_gpus_per_job)) * num_cpus, 6)))


class RayEngine(Engine):
    """`ray`: one Ray task per job on the cluster `engine.address` (or RAY_ADDRESS) names, else on a local
    cluster sized for every GPU slot; a job asks `asked_gpus` GPUs and `engine.num_cpus` CPUs."""

    def run(self, work: Callable, jobs: list, workers: int, log, stage: str) -> list[JobResult]:
        """One Ray task per job, results gathered as they finish; the workers' lines stream to this console."""
        ray, cfg = _import_ray(), self.cfg
        started = self._init(ray, workers, jobs)
        resources = ray.cluster_resources()
        log(f"{stage}: ray engine, {'local ' if started else ''}cluster {int(resources.get('CPU', 0))} CPUs, "
            f"{resources.get('GPU', 0):g} GPUs{started}")
        gpu_task = ray.remote(max_calls=1, max_retries=cfg.max_retries)(_timed_gpu_job)  # retired after each job
        cpu_task = ray.remote(max_retries=cfg.max_retries)(_timed_cpu_job)  # reused: max_calls is per function
        gpus = [self.job_gpus(job, resources) for job in jobs]  # every refusal before the first job starts
        refs = {(gpu_task.options(num_gpus=g, num_cpus=cfg.num_cpus).remote(work, job, g) if g else
                 cpu_task.options(num_gpus=0, num_cpus=cfg.num_cpus).remote(work, job)): i
                for i, (job, g) in enumerate(zip(jobs, gpus))}
        results, pending, grid = {}, list(refs), GridProgress(len(jobs), log)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            i = refs[done[0]]
            results[i] = self._result(ray, done[0], jobs[i], stage)
            grid.step(f"{results[i].job} {results[i].state}")
        return [results[i] for i in range(len(jobs))]

    def job_share(self, jobs: list) -> float:
        """GPUs per job a local cluster is sized for: what the jobs ask (`asked_gpus`) once it has GPUs."""
        return max((self.asked_gpus(job, 1) for job in jobs), default=self.cfg.num_gpus or 0)

    def asked_gpus(self, job, cluster_gpus: float) -> float:
        """engine.num_gpus, else 1 for a job that may use a GPU (train.device not cpu) on a cluster with GPUs."""
        if self.cfg.num_gpus is not None:
            return self.cfg.num_gpus
        return 1 if cluster_gpus and job.model.train.device != "cpu" else 0

    def job_gpus(self, job, resources: dict) -> float:
        """GPUs a job asks Ray for; refused up front when no node of the cluster could ever give them."""
        cluster, num_cpus = resources.get("GPU", 0), self.cfg.num_cpus
        gpus = self.asked_gpus(job, cluster)
        if gpus > cluster:
            raise StackerError(f"engine.num_gpus: {job.model.name} asks {gpus:g} GPUs per job, the cluster has "
                               f"{cluster:g}; the jobs could never start")
        if gpus > 1 and gpus != int(gpus):
            raise StackerError(f"engine.num_gpus: {gpus:g} is neither a whole number nor a fraction of one GPU")
        if num_cpus > resources.get("CPU", 0):
            raise StackerError(f"engine.num_cpus: {num_cpus:g} per job, the cluster has "
                               f"{resources.get('CPU', 0):g} CPUs; the jobs could never start")
        return gpus

    def _init(self, ray, workers: int, jobs: list) -> str:
        """Join `engine.address` (or RAY_ADDRESS), else start a local cluster with the GPUs torch sees and
        `local_cluster_cpus` CPUs, so every GPU slot runs a job at once.

        Returns:
            "" for a cluster joined; for one started, what it was sized for (the end of the engine's log line).
        """
        address = self.cfg.address or os.environ.get("RAY_ADDRESS")
        if ray.is_initialized() or address:
            ray.init(address=address, ignore_reinit_error=True)
            return ""
        import torch

        gpus, share, num_cpus = torch.cuda.device_count(), self.job_share(jobs), self.cfg.num_cpus
        slots = gpu_slots(gpus, share)
        cpus = local_cluster_cpus(workers, num_cpus, gpus, share)
        # the GPUs the slots were counted from: torch's count is Ray's too, so the CPUs fit the GPU slots
        ray.init(num_cpus=cpus, num_gpus=gpus, ignore_reinit_error=True)
        why = f"{gpus} GPUs at {share:g} GPU per job" if slots and slots >= workers else f"--parallel {workers}"
        return f" for {max(workers, slots)} jobs at once ({why}, {num_cpus:g} CPU each)"

    def _result(self, ray, ref, job, stage: str) -> JobResult:
        """The job's result, or one line saying how it failed: its own error (not retried), Ray's memory
        monitor, or a worker that died on every try."""
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as e:
            cause = e.cause if isinstance(e.cause, StackerError) else None
            if cause is None:
                print(str(e), file=sys.stderr)  # a bug, not a user error: its traceback
            return failed(job, str(cause) if cause else f"{type(e.cause).__name__}: {e.cause}")
        except ray.exceptions.OutOfMemoryError:
            return failed(job, "killed by Ray's memory monitor (its node ran out of host memory) and not retried "
                               "again; give it more memory (engine.num_cpus reserves more of a node) or run fewer "
                               "jobs per node")
        except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError, ray.exceptions.TaskCancelledError):
            retries = self.cfg.max_retries
            return failed(job, f"its worker died on each of its {retries + 1} tries (engine.max_retries "
                               f"{retries}); run {stage} again to resume it (training from its last checkpoint)")


# The engine registry, name -> class: `engine.name`'s vocabulary and `--engine`'s choices. A new engine is
# an `Engine` subclass plus one line here.
ENGINES: dict[str, type[Engine]] = {
    "local": LocalEngine,
    "ray": RayEngine,
}


def create_engine(cfg) -> Engine:
    """The engine `cfg.name` names (`cfg`: the `engine:` section, checked against `ENGINES`)."""
    return ENGINES[cfg.name](cfg)
