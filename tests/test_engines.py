"""Engines: the (model, fold) grid on a shared local queue and on Ray gives the very weights of one worker;
a killed worker's job resumes from its checkpoint; a failing job is named and the others' results kept."""
from __future__ import annotations

import os
import shutil
import signal
import sys
from dataclasses import replace

import pytest

from base_models import engines, jobs
from base_models.config import DataConfig, EngineConfig, FoldsConfig, TTAConfig, engine_config, model_specs
from base_models.jobs import StageOptions, prepare_run, train_base
from base_models.predict_oof import predict_oof
from base_models.train import is_trained
from oof import RunPaths, StackerError, file_digest, read_table

TINY = {"size": 16, "epochs": 2, "batch_size": 32, "lr": 3e-3}
MODELS = ("test_resnet", "test_efficientnet")
K = 3
RAY = EngineConfig(name="ray")


def quiet(**options) -> StageOptions:
    return StageOptions(log=lambda s: None, **options)


def specs(*extra):
    return model_specs([{"arch": m} for m in MODELS] + list(extra), TINY)


def new_run(root, data_dir):
    paths = RunPaths(root)
    _, folds = prepare_run(paths, DataConfig(root=str(data_dir)), FoldsConfig(k=K), (16, 16), log=lambda s: None)
    return paths, folds


def digests(paths: RunPaths, jobs_done) -> dict:
    return {(m, f): file_digest(paths.weights(m, f)) for m, f in jobs_done}


GRID = [(m, f) for m in MODELS for f in range(K)]


@pytest.fixture(scope="module", autouse=True)
def one_thread_per_job():
    """One CPU thread in every job, in this process, the local workers and Ray's (OMP_NUM_THREADS=1 is
    Ray's default for a 1-CPU task): the same threads give bit-identical weights on CPU."""
    import torch

    before, threads = os.environ.get("OMP_NUM_THREADS"), torch.get_num_threads()
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    if before is None:
        os.environ.pop("OMP_NUM_THREADS")
    else:
        os.environ["OMP_NUM_THREADS"] = before


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, small_digits_dir):
    """The grid trained by one worker, in this process."""
    paths, folds = new_run(tmp_path_factory.mktemp("reference") / "run", small_digits_dir)
    train_base(paths, specs(), folds, options=quiet())
    return paths, folds


@pytest.fixture(scope="module")
def reference(reference_run):
    """The weights every engine must reproduce."""
    return digests(reference_run[0], GRID)


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()


def test_local_engine_two_workers_gives_the_one_worker_weights(tmp_path, small_digits_dir, reference):
    paths, folds = new_run(tmp_path / "run", small_digits_dir)
    lines = []
    train_base(paths, specs(), folds, options=StageOptions(parallel=2, log=lines.append))
    assert digests(paths, GRID) == reference
    assert any("local engine, 2 workers" in line for line in lines)
    assert sum(" done " in line for line in lines) == len(GRID)  # the summary table, one row per job
    assert "epoch  2/2" in paths.job_log("test_resnet", 1).read_text()


def test_ray_engine_gives_the_one_worker_weights(tmp_path, small_digits_dir, reference, ray_cluster):
    paths, folds = new_run(tmp_path / "run", small_digits_dir)
    train_base(paths, specs(), folds, options=quiet(engine=RAY))
    assert digests(paths, GRID) == reference


class KillAfterFirstEpoch:
    """A job's work whose worker SIGKILLs itself right after epoch 1's checkpoint, on its first try alone."""

    def __init__(self, work, marker):
        self.work, self.marker = work, marker

    def __call__(self, job):
        marker = self.marker

        class KillingLog(jobs.JobLog):
            def __call__(self, line):
                super().__call__(line)
                if "epoch  1/2" in line and not marker.exists():  # logged once the checkpoint is saved
                    marker.touch()
                    os.kill(os.getpid(), signal.SIGKILL)

        original, jobs.JobLog = jobs.JobLog, KillingLog  # in this worker process alone, for this job alone
        try:
            return self.work(job)
        finally:
            jobs.JobLog = original  # Ray reuses CPU workers


def test_ray_retries_a_killed_worker_and_the_job_resumes(tmp_path, small_digits_dir, reference, ray_cluster,
                                                          monkeypatch):
    ray_cluster.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    marker = tmp_path / "killed-once"
    run_jobs = jobs.run_jobs
    monkeypatch.setattr(jobs, "run_jobs", lambda work, *a: run_jobs(KillAfterFirstEpoch(work, marker), *a))
    paths, folds = new_run(tmp_path / "run", small_digits_dir)
    train_base(paths, specs(), folds, options=quiet(engine=RAY, only=(("test_resnet", 0),)))
    assert marker.exists()
    log = paths.job_log("test_resnet", 0).read_text()
    assert log.count("started on") == 2 and log.count("epoch  1/2") == 1  # the retry resumed at epoch 2
    assert digests(paths, [("test_resnet", 0)]) == {("test_resnet", 0): reference[("test_resnet", 0)]}


@pytest.fixture(params=list(engines.ENGINES))
def engine(request) -> StageOptions:
    """Two jobs at once on each registered engine: two local worker processes, Ray tasks, ..."""
    if request.param == "ray":
        request.getfixturevalue("ray_cluster")  # skipped where ray cannot be imported
    return StageOptions(log=lambda s: None, parallel=2, engine=EngineConfig(name=request.param))


def test_a_failing_job_is_not_retried_and_named_in_one_line(tmp_path, small_digits_dir, engine, monkeypatch):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not weights")
    monkeypatch.setattr(jobs, "check_models", lambda *a: None)  # let the bad file reach the job itself
    paths, folds = new_run(tmp_path / "run", small_digits_dir)
    bad = {"name": "bad", "arch": "test_resnet", "pretrained": str(junk)}
    with pytest.raises(StackerError, match=r"^bad fold 1: .*junk\.safetensors") as e:
        train_base(paths, specs(bad), folds, options=replace(engine, only=(("bad", 1), ("test_resnet", 0))))
    assert "\n" not in str(e.value)
    assert is_trained(paths, "test_resnet", 0) and not is_trained(paths, "bad", 1)
    assert paths.job_log("bad", 1).read_text().count("started on") == 1  # an error the job raised: no retry


def test_only_runs_exactly_those_jobs(tmp_path, small_digits_dir):
    paths, folds = new_run(tmp_path / "run", small_digits_dir)
    only = (("test_efficientnet", 2), ("test_resnet", 1))
    train_base(paths, specs(), folds, options=quiet(only=only))
    assert {(m, f) for m, f in GRID if is_trained(paths, m, f)} == set(only)


@pytest.mark.parametrize("only, match", [
    ((("resnet", 0),), r"only: no model 'resnet' in the run; its models are \['test_efficientnet', 'test_resnet'\]"),
    ((("test_resnet", 3),), r"only: test_resnet fold 3 is not a fold of the run \(0\.\.2\)"),
    ((("test_resnet", -1),), r"only: test_resnet fold -1 is not a fold of the run"),
])
def test_only_refuses_unknown_jobs(only, match):
    with pytest.raises(StackerError, match=match):
        jobs.select_jobs(jobs.job_grid(specs(), K), only, K)


@pytest.mark.parametrize("section, match", [
    ({"name": "dask"}, r"engine\.name: expected one of \['local', 'ray'\], got 'dask'"),
    ({"num_gpus": -1}, r"engine\.num_gpus: expected a number >= 0 or null, got -1"),
    ({"max_retries": 1.5}, r"engine\.max_retries: expected an integer >= 0, got 1\.5"),
    ({"gpus": 1}, r"engine: unknown key\(s\) \['gpus'\]"),
])
def test_engine_config_errors_name_the_key(section, match):
    with pytest.raises(StackerError, match=match):
        engine_config({"engine": section})


@pytest.mark.parametrize("num_gpus, resources, match", [
    (0.5, {"CPU": 2}, r"engine\.num_gpus: test_resnet asks 0\.5 GPUs per job, the cluster has 0"),
    (3, {"CPU": 8, "GPU": 2}, r"asks 3 GPUs per job, the cluster has 2; the jobs could never start"),
    (1.5, {"CPU": 8, "GPU": 2}, r"engine\.num_gpus: 1\.5 is neither a whole number nor a fraction of one GPU"),
])
def test_ray_refuses_gpus_that_never_schedule(num_gpus, resources, match):
    job = jobs.job_grid(specs(), K)[0]
    with pytest.raises(StackerError, match=match):
        engines.RayEngine(EngineConfig(name="ray", num_gpus=num_gpus)).job_gpus(job, resources)


def test_a_worker_that_cannot_see_the_run_says_where(tmp_path):
    with pytest.raises(StackerError, match=rf"^.+: cannot read {tmp_path}/nowhere/folds.*shared storage"):
        jobs.check_run_visible(RunPaths(tmp_path / "nowhere"))


def test_a_missing_ray_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(StackerError, match=r"^engine\.name ray: Ray is not installed; pip install 'stacker\[ray\]'$"):
        engines.run_jobs(print, [], RAY, 1)


def crash_on_fold_one(job):
    """A job function for the local engine: fold 1 raises what torch would (not a StackerError)."""
    if job.fold == 1:
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")
    return 0.0


def test_any_error_in_a_local_job_is_one_line_naming_it_after_the_others_ran():
    from types import SimpleNamespace

    from base_models.config import EngineConfig
    from base_models.engines import run_jobs

    jobs = [SimpleNamespace(model=SimpleNamespace(name="m"), fold=f) for f in range(3)]
    lines = []
    with pytest.raises(StackerError, match=r"^m fold 1: RuntimeError: CUDA out of memory\. Tried to allocate "
                                           r"2\.00 GiB$"):
        run_jobs(crash_on_fold_one, jobs, EngineConfig(), 2, lines.append)
    assert sum(" done " in line for line in lines) == 2, lines  # the other jobs ran and are in the summary


# ---------------------------------------------------------------- predict-oof: one job per (model, fold)

TTA = TTAConfig(n=1)


def tables(paths: RunPaths, folds) -> dict:
    """Every table predict-oof writes for the grid, as probabilities: the assembled ones and each fold's."""
    out = {}
    for m in MODELS:
        out[m, "oof"] = read_table(paths.oof(m), folds.classes, "oof").proba
        out[m, "test"] = read_table(paths.test(m), folds.classes, "test").proba
        for f in range(K):
            out[m, f] = read_table(paths.test_fold(m, f), folds.classes, "test").proba
    return out


def same_tables(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all((a[key] == b[key]).all() for key in a)


def trained_copy(reference_run, root):
    """A copy of the trained reference run, predicted nowhere yet."""
    shutil.copytree(reference_run[0].root, root)
    return RunPaths(root), reference_run[1]


@pytest.fixture(scope="module")
def predicted_reference(reference_run, tmp_path_factory):
    """The grid predicted by one worker, in this process: the tables every engine must reproduce."""
    paths, folds = trained_copy(reference_run, tmp_path_factory.mktemp("predicted") / "run")
    predict_oof(paths, specs(), folds, TTA, options=quiet())
    return tables(paths, folds)


def test_predict_oof_on_an_engine_gives_the_one_worker_tables(tmp_path, reference_run, predicted_reference,
                                                              engine):
    paths, folds = trained_copy(reference_run, tmp_path / "run")
    lines = []
    metrics = predict_oof(paths, specs(), folds, TTA, options=replace(engine, log=lines.append))
    assert same_tables(tables(paths, folds), predicted_reference)
    assert set(metrics) == set(MODELS) and sum(" done " in line for line in lines) == len(GRID)
    assert "test_resnet fold 2: " in paths.job_log("test_resnet", 2).read_text()  # the job's own log


def test_predict_oof_only_writes_a_model_once_all_its_folds_are_in(tmp_path, reference_run, predicted_reference):
    paths, folds = trained_copy(reference_run, tmp_path / "run")
    lines = []
    predict_oof(paths, specs(), folds, TTA, options=quiet(only=(("test_resnet", 0), ("test_resnet", 2))))
    assert paths.oof_fold("test_resnet", 2).is_file() and not paths.oof("test_resnet").exists()
    assert not paths.oof_fold("test_efficientnet", 0).exists()
    metrics = predict_oof(paths, specs(), folds, TTA, options=StageOptions(only=(("test_resnet", 1),),
                                                                          log=lines.append))
    assert "2 already predicted, 1 to run" not in " ".join(lines)  # --only counts its own jobs alone
    assert "1 fold jobs, 0 already predicted, 1 to run" in " ".join(lines) and set(metrics) == {"test_resnet"}
    predict_oof(paths, specs(), folds, TTA, options=quiet())
    assert same_tables(tables(paths, folds), predicted_reference)


def test_an_interrupted_predict_oof_resumes_at_the_missing_fold(tmp_path, reference_run, predicted_reference):
    paths, folds = trained_copy(reference_run, tmp_path / "run")
    predict_oof(paths, specs(), folds, TTA, options=quiet())
    for path in (paths.oof("test_resnet"), paths.oof_fold("test_resnet", 1), paths.predict_metrics("test_resnet")):
        path.unlink()  # as a call killed while fold 1's job ran leaves it
    lines = []
    predict_oof(paths, specs(), folds, TTA, options=StageOptions(log=lines.append))
    assert "predict-oof: 3 fold jobs, 2 already predicted, 1 to run" in lines
    assert "test_efficientnet already predicted" in " ".join(lines)
    assert same_tables(tables(paths, folds), predicted_reference)


def test_predict_oof_only_refuses_a_fold_not_trained(tmp_path, small_digits_dir):
    paths, folds = new_run(tmp_path / "run", small_digits_dir)
    train_base(paths, specs(), folds, options=quiet(only=(("test_resnet", 0),)))
    predict_oof(paths, specs(), folds, TTA, options=quiet(only=(("test_resnet", 0),)))  # its own fold: fine
    assert paths.oof_fold("test_resnet", 0).is_file()
    with pytest.raises(StackerError, match=r"^test_resnet: folds \[1\] are not trained yet; run train-base first$"):
        predict_oof(paths, specs(), folds, TTA, options=quiet(only=(("test_resnet", 1),)))
