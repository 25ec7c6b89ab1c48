"""`stacker jobs` and `train-base --only` end to end.

One run is trained once (two of its six jobs, by --only); the tests read it with `stacker jobs`
(pending, done, running, stale, without torch), interrupt a real job (running, then partial),
start two --only processes at once on one fresh run, and check bad --only items fail in one line.
`stacker(...)` runs the CLI in this process (`tiny.run_cli`); the interrupted job, the two processes at
once and the run without torch are real processes.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from filelock import FileLock

from oof import RunPaths, file_digest, load_folds
from test_no_torch import without_torch
from tiny import MODELS, TINY, CliResult, write_config
from tiny import run_cli as stacker

ROOT = Path(__file__).resolve().parents[1]


def job_states(result: CliResult | subprocess.CompletedProcess) -> dict[tuple[str, int], tuple[str, str]]:
    """{(model, fold): (state, note)} from `stacker jobs`' printed table (columns 2+ spaces apart)."""
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["model", "fold", "state"]
    rows = {}
    for line in lines[1:]:
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) >= 8 and cells[1].isdigit():
            rows[cells[0], int(cells[1])] = (cells[2], cells[8] if len(cells) > 8 else "")
    return rows


def states(result) -> dict[tuple[str, int], str]:
    return {job: state for job, (state, _) in job_states(result).items()}


def grid(state="pending", **others) -> dict[tuple[str, int], str]:
    """Every job of the two-model, three-fold run in `state`, but `others` ("model:fold" with ':' as '__')."""
    out = {(m, f): state for m in MODELS for f in range(3)}
    for key, value in others.items():
        model, fold = key.rsplit("__", 1)
        out[model, int(fold)] = value
    return out


def snapshot(run: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(run)): (p.stat().st_size, p.stat().st_mtime_ns) for p in run.rglob("*")}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_digits_dir):
    """A run of two models and three folds, of which train-base --only trained test_resnet folds 0 and 1."""
    root = tmp_path_factory.mktemp("jobs")
    config = write_config(root / "run.yaml", small_digits_dir, root / "run", train=TINY)
    result = stacker("train-base", "--config", config, "--only", "test_resnet:0", "--only", "test_resnet:1",
                     "--engine", "local")
    assert result.returncode == 0, result.stderr
    return root, config, root / "run"


def test_jobs_on_a_fresh_run_are_all_pending_and_create_nothing(tmp_path, small_digits_dir):
    config = write_config(tmp_path / "run.yaml", small_digits_dir, tmp_path / "run", train=TINY)
    result = stacker("jobs", "--config", config)
    assert states(result) == grid("pending")
    assert result.stdout.splitlines()[-1] == "6 jobs: 6 pending"
    assert not (tmp_path / "run").exists()


def test_only_trains_exactly_the_named_jobs_and_jobs_writes_nothing(trained):
    _, _, run = trained
    before = snapshot(run)
    result = stacker("jobs", "--run", run)
    assert states(result) == grid(test_resnet__0="done", test_resnet__1="done")
    assert snapshot(run) == before  # a status view: no lock file, no temp file, nothing touched
    row = next(line for line in result.stdout.splitlines() if line.startswith("test_resnet") and " 0 " in line)
    assert "cpu" in row and re.search(r"\d+\.\d+s", row)  # device and time of the job
    history = json.loads(RunPaths(run).history("test_resnet", 0).read_text())
    assert f"{history['epochs'][-1]['valid_loss']:.4f}" in row


def test_jobs_runs_without_torch(trained):
    _, _, run = trained
    result = without_torch("jobs", "--run", run)  # the prelude also asserts torch was never imported
    assert states(result) == grid(test_resnet__0="done", test_resnet__1="done")


def test_a_job_whose_lock_another_process_holds_is_running(trained):
    _, _, run = trained
    # the lock's own open file: the flock conflict that a train-base in another process makes
    with FileLock(RunPaths(run).job_lock("test_efficientnet", 0), timeout=0):
        assert states(stacker("jobs", "--run", run))[("test_efficientnet", 0)] == "running"
    assert states(stacker("jobs", "--run", run))[("test_efficientnet", 0)] == "pending"  # its lock file stays


def test_a_changed_recipe_key_makes_finished_jobs_stale(trained):
    root, _, run = trained
    copy = root / "stale_run"  # beside the run: its relative data.root still resolves
    shutil.copytree(run, copy)
    saved = yaml.safe_load((copy / "run.yaml").read_text())
    next(m for m in saved["models"] if m["name"] == "test_resnet")["lr"] = 0.05
    (copy / "run.yaml").write_text(yaml.safe_dump(saved))
    rows = job_states(stacker("jobs", "--run", copy))
    assert {job: state for job, (state, _) in rows.items()} == grid(test_resnet__0="stale", test_resnet__1="stale")
    assert rows["test_resnet", 0][1] == "trained with other settings (lr)"


def test_an_interrupted_job_is_running_then_partial(tmp_path, small_digits_dir):
    config = write_config(tmp_path / "run.yaml", small_digits_dir, tmp_path / "run",
                          train={**TINY, "epochs": 60}, models=[{"arch": "test_resnet"}])
    proc = subprocess.Popen([sys.executable, "-m", "stacker_cli", "train-base", "--config", str(config), "--only",
                             "test_resnet:2"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    try:
        for line in proc.stdout:  # the checkpoint is written before an epoch's progress line
            if "test_resnet fold 2 epoch" in line:
                break
        assert states(stacker("jobs", "--run", tmp_path / "run"))[("test_resnet", 2)] == "running"
    finally:
        proc.kill()
        proc.wait()
    rows = states(stacker("jobs", "--run", tmp_path / "run"))
    assert re.fullmatch(r"partial at epoch \d+", rows["test_resnet", 2]), rows
    assert {rows["test_resnet", f] for f in (0, 1)} == {"pending"}


@pytest.mark.parametrize("item, message", [
    ("test_resnet", r"--only 'test_resnet': expected MODEL:FOLD"),
    ("test_resnet:one", r"--only 'test_resnet:one': expected MODEL:FOLD"),
    ("test_resnet:-1", r"--only 'test_resnet:-1': expected MODEL:FOLD"),
    ("resnet50:0", r"--only 'resnet50:0': 'resnet50' is not a model of the run \['test_resnet', "),
    ("test_resnet:3", r"--only 'test_resnet:3': fold 3 is out of range: the run's folds are 0\.\.2"),
])
def test_bad_only_items_are_one_line_errors(trained, item, message):
    _, config, _ = trained
    result = stacker("train-base", "--config", config, "--only", "test_resnet:0", "--only", item)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert re.match(rf"stacker: error: {message}", result.stderr), result.stderr


def test_two_only_processes_at_once_on_a_fresh_run_both_succeed(tmp_path, small_digits_dir):
    config = write_config(tmp_path / "run.yaml", small_digits_dir, tmp_path / "run", train=TINY)
    procs = [subprocess.Popen([sys.executable, "-m", "stacker_cli", "train-base", "--config", str(config), "--only", job],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
             for job in ("test_resnet:0", "test_efficientnet:1")]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
    run = RunPaths(tmp_path / "run")
    result = stacker("jobs", "--run", run.root)  # done, not stale: folds, cache and weights digests all match
    assert states(result) == grid(test_resnet__0="done", test_efficientnet__1="done")
    for model, fold in (("test_resnet", 0), ("test_efficientnet", 1)):
        history = json.loads(run.history(model, fold).read_text())
        assert history["weights_sha256"] == file_digest(run.weights(model, fold)) and history["kept_epoch"] == 1
    assert [m["name"] for m in yaml.safe_load(run.config.read_text())["models"]] == list(MODELS)
    assert load_folds(run.folds).k == 3
    assert not [p for p in run.root.rglob("*") if p.name.endswith(".tmp")]  # no write was left half done

    # --force with --only redoes just those jobs, and never rewrites the folds under the others
    kept = {path: path.stat().st_mtime_ns for path in (run.folds, run.weights("test_efficientnet", 1))}
    redone = run.weights("test_resnet", 0).stat().st_mtime_ns
    result = stacker("train-base", "--config", config, "--only", "test_resnet:0", "--force")
    assert result.returncode == 0, result.stderr
    assert {path: path.stat().st_mtime_ns for path in kept} == kept
    assert run.weights("test_resnet", 0).stat().st_mtime_ns != redone


def test_jobs_help_and_the_new_train_base_flags():
    result = stacker("jobs", "--help")
    assert result.returncode == 0 and "--run" in result.stdout and "writes nothing" in " ".join(result.stdout.split())
    result = stacker("train-base", "--help")
    assert result.returncode == 0 and all(flag in result.stdout for flag in ("--only", "--engine", "--address"))
