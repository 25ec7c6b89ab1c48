"""`train-base --full` and predict-oof's full-fit tables: each model trained once more on every train row.

One run (test_resnet, three folds, `tiny.TINY`) goes through train-base, predict-oof (no full fit yet),
train-base --full and predict-oof once per module, in this process (`tiny.run_cli`); a test that runs a
stage on it takes a copy beside it. The resumed job, the repeats and the lock are library calls on runs of
their own; the refused `keep: best` is a real process.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from filelock import FileLock
from safetensors.torch import load_file

from base_models.job_state import rows_digest
from base_models.job_table import job_table
from base_models.jobs import StageOptions, train_full
from oof import RunPaths, file_digest, load_folds, read_json, read_table
from oof.views import read_views
from tiny import MODEL, QUIET, TINY, TWO_EPOCHS, CliResult, copy_run, prepared, specs, write_config
from tiny import run_cli as stacker

ROOT = Path(__file__).resolve().parents[1]
KEEP_BEST = ("stacker: error: test_resnet: train.keep: best cannot train a full fit (train-base --full): it has no "
             "epoch to keep without a validation fold; use keep: last")


@dataclass(frozen=True)
class Fitted:
    root: Path
    config: Path
    run: Path
    results: dict  # stage -> CliResult, in the order they ran


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, small_digits_dir) -> Fitted:
    """One model's three fold jobs trained and predicted, then its full fit trained and predicted. Read it as it
    is; a test that writes takes `copied`."""
    root = tmp_path_factory.mktemp("full")
    config = write_config(root / "run.yaml", small_digits_dir, root / "run", train=TINY, models=[{"arch": MODEL}])
    results = {"train-base": stacker("train-base", "--config", config),
               "predict-oof": stacker("predict-oof", "--run", root / "run"),
               "train-base --full": stacker("train-base", "--config", config, "--full"),
               "predict-oof full": stacker("predict-oof", "--run", root / "run")}
    for stage, result in results.items():
        assert result.returncode == 0, (stage, result.stderr)
    return Fitted(root, config, root / "run", results)


def copied(fitted: Fitted, name: str) -> RunPaths:
    """This test's own copy of the fitted run, beside it (its relative data.root still resolves), times kept."""
    dest = fitted.root / name
    shutil.rmtree(dest, ignore_errors=True)
    return RunPaths(copy_run(fitted.run, dest))


def one_error(result: CliResult) -> str:
    """The one line a refused stage printed (exit 2)."""
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stacker: error: "), result.stderr
    return lines[0]


def job_rows(result: CliResult) -> dict[tuple[str, str], list[str]]:
    """{(model, fold): cells} of `stacker jobs`' printed table, the fold as printed ("0", "full")."""
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["model", "fold", "state"]
    rows = {}
    for line in lines[1:-1]:
        cells = re.split(r"\s{2,}", line.strip())
        rows[cells[0], cells[1]] = cells
    return rows


def test_the_full_fit_trains_once_on_every_row_and_records_its_data(fitted):
    paths = RunPaths(fitted.run)
    folds = load_folds(paths.folds)
    history = read_json(paths.history(MODEL, None))
    assert history["fold"] is None and history["train_rows"] == len(folds.ids) == 320
    assert history["rows_sha256"] == rows_digest(folds, None)
    assert history["rows_sha256"] not in {read_json(paths.history(MODEL, k))["rows_sha256"] for k in range(3)}
    assert history["cache_sha256"] == read_json(paths.history(MODEL, 0))["cache_sha256"]
    assert history["weights_sha256"] == file_digest(paths.weights(MODEL, None))
    assert history["train"] == read_json(paths.history(MODEL, 0))["train"]  # the fold jobs' recipe and epochs
    assert [e["epoch"] for e in history["epochs"]] == [1] and history["kept_epoch"] == 1
    assert all(np.isfinite(e["train_loss"]) and "valid_loss" not in e for e in history["epochs"])
    assert paths.history_csv(MODEL, None).is_file() and paths.job_log(MODEL, None).is_file()
    assert not paths.checkpoint(MODEL, None).exists()  # removed once the job finished
    full = fitted.results["train-base --full"].stdout
    assert "train-base --full: 1 full fits, 0 already done, 1 to run" in full
    assert "test_resnet full fit epoch  1/1" in full and not re.search(r"fold \d", full)  # no fold job ran
    assert "full fit" not in fitted.results["train-base"].stdout  # plain train-base trains no full fit


def test_a_rerun_is_already_done_and_force_retrains(fitted):
    paths = copied(fitted, "rerun")
    stamp = paths.weights(MODEL, None).stat().st_mtime_ns
    result = stacker("train-base", "--run", paths.root, "--full")
    assert result.returncode == 0, result.stderr
    assert "train-base --full: 1 full fits, 1 already done, 0 to run" in result.stdout
    assert paths.weights(MODEL, None).stat().st_mtime_ns == stamp
    folds_stamp = paths.weights(MODEL, 0).stat().st_mtime_ns
    result = stacker("train-base", "--run", paths.root, "--full", "--force", "--only", MODEL)
    assert result.returncode == 0, result.stderr
    assert paths.weights(MODEL, None).stat().st_mtime_ns != stamp
    assert paths.weights(MODEL, 0).stat().st_mtime_ns == folds_stamp  # --full --force retrains full fits alone


def test_a_relabel_makes_the_full_fit_stale_refused_with_the_flags_that_retrain_it(fitted):
    paths = copied(fitted, "relabel")
    folds = load_folds(paths.folds)
    row, label = str(folds.ids[0]), folds.table["label"].iloc[0]
    saved = yaml.safe_load(paths.config.read_text())
    saved["data"]["relabel"] = {row: next(c for c in folds.classes if c != label)}
    paths.config.write_text(yaml.safe_dump(saved))
    line = one_error(stacker("train-base", "--run", paths.root, "--full"))
    assert line == (f"stacker: error: {paths.history(MODEL, None)}: test_resnet full fit was trained on other training "
                    "rows or labels (data.exclude / data.relabel changed them); pass --full --force --only "
                    "test_resnet to train it again (or give a model with new settings a new name)")
    assert job_rows(stacker("jobs", "--run", paths.root))[MODEL, "full"][2] == "stale"
    result = stacker("train-base", "--run", paths.root, "--full", "--force", "--only", MODEL)
    assert result.returncode == 0, result.stderr
    relabelled = load_folds(paths.folds)
    assert read_json(paths.history(MODEL, None))["rows_sha256"] == rows_digest(relabelled, None)
    assert job_rows(stacker("jobs", "--run", paths.root))[MODEL, "full"][2] == "done"


def test_keep_best_is_refused_in_one_line_before_anything_is_made(tmp_path, small_digits_dir):
    config = write_config(tmp_path / "run.yaml", small_digits_dir, tmp_path / "run", train={**TINY, "keep": "best"},
                          models=[{"arch": MODEL}])
    out = subprocess.run([sys.executable, "-m", "stacker_cli", "train-base", "--config", str(config), "--full"],
                         capture_output=True, text=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                         timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [KEEP_BEST]
    run = RunPaths(tmp_path / "run")
    assert not run.folds.exists() and not run.cache.exists() and not (run.root / "models").exists()


def test_full_only_names_models(fitted):
    line = one_error(stacker("train-base", "--config", fitted.config, "--full", "--only", f"{MODEL}:0"))
    assert line == ("stacker: error: --only 'test_resnet:0': with --full, expected MODEL (its full fit), "
                    "e.g. test_resnet")
    line = one_error(stacker("train-base", "--config", fitted.config, "--full", "--only", "resnet50"))
    assert line == "stacker: error: --only 'resnet50': 'resnet50' is not a model of the run ['test_resnet']"


def test_a_killed_full_fit_resumes_from_its_checkpoint_to_identical_weights(tmp_path, small_digits_dir):
    spec = specs(train=TWO_EPOCHS)
    paths, folds = prepared(tmp_path / "reference", small_digits_dir)
    train_full(paths, spec, folds, options=QUIET)
    reference = load_file(paths.weights(MODEL, None))
    other, folds2 = prepared(tmp_path / "killed", small_digits_dir)

    def stop_after_first_epoch(line):
        if "full fit epoch  1/2" in line:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_full(other, spec, folds2, options=StageOptions(log=stop_after_first_epoch))
    assert other.checkpoint(MODEL, None).is_file() and not other.weights(MODEL, None).exists()
    cfg = {"run_dir": str(other.root), "data": {"root": str(small_digits_dir)}, "folds": {"k": 3}, "train": TWO_EPOCHS,
           "models": [{"arch": MODEL}]}
    row = job_table(cfg, log=lambda line: None).set_index("fold").loc["full"]
    assert (row["state"], row["epoch"]) == ("partial", 1)
    with FileLock(other.job_lock(MODEL, None), timeout=0):  # another process training it: skipped, not run twice
        lines = []
        train_full(other, spec, folds2, options=StageOptions(log=lines.append))
        assert any("test_resnet full fit: running in another process, skipped" in s for s in lines)
    lines = []
    train_full(other, spec, folds2, options=StageOptions(log=lines.append))
    assert not any("epoch  1/2" in s for s in lines) and any("epoch  2/2" in s for s in lines)
    resumed = load_file(other.weights(MODEL, None))
    assert reference.keys() == resumed.keys()
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)


def test_repeated_folds_still_make_one_full_fit(tmp_path, small_digits_dir):
    paths, folds = prepared(tmp_path / "run", small_digits_dir, repeats=2)
    lines = []
    train_full(paths, specs(), folds, options=StageOptions(log=lines.append))
    assert "train-base --full: 1 full fits, 0 already done, 1 to run" in lines
    assert not paths.for_repeat(1).model_dir(MODEL).exists()
    history = read_json(paths.history(MODEL, None))
    assert history["train_rows"] == 320
    assert history["rows_sha256"] == rows_digest(folds.for_repeat(0), None) == rows_digest(folds.for_repeat(1), None)


def test_predict_oof_writes_the_full_fit_tables_with_their_record(fitted):
    paths = RunPaths(fitted.run)
    assert "full fit" not in fitted.results["predict-oof"].stdout  # no full weights: nothing
    assert "predict-oof: test_resnet full fit: 80 test rows" in fitted.results["predict-oof full"].stdout
    classes = load_folds(paths.folds).classes
    table, folds_test = (read_table(path, classes, "test") for path in (paths.test_full(MODEL), paths.test(MODEL)))
    assert (table.ids == folds_test.ids).all() and table.proba.shape == (80, len(classes))
    meta = table.meta
    assert meta["fit"] == "full" and meta["weights_sha256"] == [read_json(paths.history(MODEL, None))["weights_sha256"]]

    def shared(record):  # what the model's fold test table records too: folds, TTA, caches, precision
        return {k: v for k, v in record.items() if k not in ("weights_sha256", "fit", "job")}

    assert shared(meta) == shared(folds_test.meta) and meta["tta"]["n"] == 2
    assert set(meta["job"]) == {"seconds", "cost"}
    assert (meta["job"]["cost"]["images"], meta["job"]["cost"]["views"]) == (80, 3)
    views = read_views(paths.test_views_full(MODEL), classes)
    assert views.proba.shape == (3, 80, len(classes)) and views.fold is None
    assert shared(views.meta) == shared(meta) and views.meta["fit"] == "full"
    np.testing.assert_allclose(views.choice(3), table.proba, atol=1e-6)  # the views combined as the table holds


def test_current_full_tables_are_skipped_force_redoes_them_and_stale_weights_are_refused(fitted):
    paths = copied(fitted, "predict")
    stamp = paths.test_full(MODEL).stat().st_mtime_ns
    result = stacker("predict-oof", "--run", paths.root)
    assert result.returncode == 0, result.stderr
    assert "predict-oof: 1 full fits, 1 already predicted, 0 to run" in result.stdout
    assert paths.test_full(MODEL).stat().st_mtime_ns == stamp
    result = stacker("predict-oof", "--run", paths.root, "--force")
    assert result.returncode == 0, result.stderr
    assert paths.test_full(MODEL).stat().st_mtime_ns != stamp
    record = read_json(paths.history(MODEL, None))
    paths.history(MODEL, None).write_text(json.dumps({**record, "weights_sha256": "0" * 64}))
    line = one_error(stacker("predict-oof", "--run", paths.root))
    assert line == (f"stacker: error: {paths.weights(MODEL, None)}: test_resnet full fit was changed after training "
                    "(the weights file is not the one its history records); run train-base --full --force --only "
                    "test_resnet to retrain it")


def test_jobs_lists_the_full_fit(fitted):
    rows = job_rows(stacker("jobs", "--run", fitted.run))
    assert set(rows) == {(MODEL, "0"), (MODEL, "1"), (MODEL, "2"), (MODEL, "full")}
    full = rows[MODEL, "full"]
    assert full[2] == "done" and full[3] == "cpu" and re.fullmatch(r"\d+\.\d+s", full[5])
    assert full[6:8] == ["-", "-"]  # no validation fold: no valid_loss, no error_rate
