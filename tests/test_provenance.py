"""Run integrity: every artifact knows what made it, and no crash, rerun or edit makes a stage trust a stale one."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from filelock import FileLock
from PIL import Image
from safetensors.torch import save_model

from base_models.config import DataConfig, FoldsConfig, TTAConfig
from base_models.jobs import StageOptions, load_targets, prepare_run, train_base
from base_models.predict_oof import predict_oof
from base_models.stages import train_base_stage
from base_models.models import timm_model
from base_models.train import build_model
from oof import RunPaths, StackerError, file_digest, load_folds, read_json, read_table, validate_oof, write_json
from tiny import MODEL, QUIET, TINY, plain_copy, predicted_run, specs

REPO = Path(__file__).resolve().parents[1]
TTA = TTAConfig(n=2)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_digits_dir):
    """One run, folds seed 1, every fold trained and predicted once; tests work on copies of it."""
    return predicted_run(tmp_path_factory.mktemp("provenance") / "run", small_digits_dir, specs(), TTA, seed=1)


def copy_run(trained, dest: Path) -> RunPaths:
    """The run copied elsewhere as a plain copy does: every file's time is the copy's, not the original's."""
    return plain_copy(trained[0], dest)


def logged(fn, *args, **options) -> list[str]:
    lines = []
    fn(*args, options=StageOptions(log=lines.append, **options))
    return lines


# ---------------------------------------------------------------- fold k's rows come from fold k's weights


def constant_weights(paths: RunPaths, folds, fold: int, favoured: int) -> None:
    """Replace a fold's weights with a model that ignores its input and always favours one class,
    recording the new file's digest in the history as a finished job would."""
    model = build_model(specs()[0], load_targets(paths, folds, []), pretrained=False)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()  # BatchNorm weights 0: every feature is 0, so the logits are the classifier's bias
        timm_model(model).get_classifier().bias[favoured] = 5.0
    save_model(model, str(paths.weights(MODEL, fold)))


def test_fold_k_rows_are_predicted_by_fold_k_weights_alone(trained, tmp_path):
    paths = copy_run(trained, tmp_path / "run")
    folds = trained[1]
    before = read_table(paths.oof(MODEL), folds.classes, "oof")
    test_before = [read_table(paths.test_fold(MODEL, k), folds.classes, "test").proba for k in range(3)]
    constant_weights(paths, folds, fold=2, favoured=7)
    # the history still vouches for the old file: both stages refuse the changed weights
    with pytest.raises(StackerError, match=r"test_resnet fold 2 was changed after training.*--force"):
        train_base(paths, specs(), folds, options=QUIET)
    with pytest.raises(StackerError, match=r"fold2\.safetensors: test_resnet fold 2 was changed after training"):
        predict_oof(paths, specs(), folds, TTA, options=QUIET)
    history = read_json(paths.history(MODEL, 2))
    write_json(paths.history(MODEL, 2), {**history, "weights_sha256": file_digest(paths.weights(MODEL, 2))})
    lines = logged(predict_oof, paths, specs(), folds, TTA)
    assert "oof.parquet was made from other weights_sha256" in lines[0]
    after = read_table(paths.oof(MODEL), folds.classes, "oof")
    in_fold2 = folds.fold == 2
    np.testing.assert_array_equal(after.proba[~in_fold2], before.proba[~in_fold2])  # bit for bit
    assert (after.proba[in_fold2].argmax(1) == 7).all()
    assert np.ptp(after.proba[in_fold2], axis=0).max() == 0  # one constant row: the input never mattered
    assert not np.allclose(after.proba[in_fold2], before.proba[in_fold2])
    for k in range(3):
        test_after = read_table(paths.test_fold(MODEL, k), folds.classes, "test").proba
        assert np.array_equal(test_after, test_before[k]) == (k != 2)
    assert after.meta["weights_sha256"][2] == file_digest(paths.weights(MODEL, 2))
    assert after.meta["weights_sha256"][:2] == before.meta["weights_sha256"][:2]


# ---------------------------------------------------------------- another fold assignment


def test_weights_of_another_fold_assignment_are_refused_then_retrained(trained, tmp_path, small_digits_dir):
    paths = copy_run(trained, tmp_path / "run")
    # As after an old `train-base --force` stopped right after rewriting the folds: new folds, old weights.
    _, folds2 = prepare_run(paths, DataConfig(root=str(small_digits_dir)), FoldsConfig(k=3, seed=2), (16, 16),
                            force=True, log=QUIET.log)
    assert folds2.sha256 != trained[1].sha256
    with pytest.raises(StackerError, match=r"fold0\.history\.json: test_resnet folds 0, 1, 2 were trained on "
                                           r"other training rows or labels \(another fold assignment, .*\); pass "
                                           r"--force to train them again"):
        train_base(paths, specs(), folds2, options=QUIET)
    with pytest.raises(StackerError, match=r"fold0\.safetensors: test_resnet fold 0 was trained on other training "
                                           r"rows or labels \(another fold assignment, .*\); run train-base --force "
                                           r"to retrain it"):
        predict_oof(paths, specs(), folds2, TTA, options=QUIET)
    with pytest.raises(StackerError, match=r"oof\.parquet: was made on another fold assignment"):
        validate_oof(read_table(paths.oof(MODEL), folds2.classes, "oof"), folds2)  # and fit-stack's own check
    train_base(paths, specs(), folds2, options=StageOptions(force=True, log=QUIET.log))
    assert read_json(paths.history(MODEL, 0))["folds_sha256"] == folds2.sha256
    predict_oof(paths, specs(), folds2, TTA, options=QUIET)
    oof = validate_oof(read_table(paths.oof(MODEL), folds2.classes, "oof"), folds2)
    assert oof.meta["weights_sha256"] == [read_json(paths.history(MODEL, k))["weights_sha256"] for k in range(3)]


def stage_config(paths: RunPaths, data_dir, seed: int) -> dict:
    return {"run_dir": str(paths.root), "data": {"root": str(data_dir)}, "folds": {"k": 3, "seed": seed},
            "train": TINY, "models": [{"arch": MODEL}], "tta": {"n": 2}}


def test_an_interrupted_force_leaves_no_old_result(trained, tmp_path, small_digits_dir):
    paths = copy_run(trained, tmp_path / "run")

    def stop_once_folds_are_written(line):
        if line.startswith("folds:"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_base_stage(stage_config(paths, small_digits_dir, seed=2), force=True, log=stop_once_folds_are_written)
    assert load_folds(paths.folds).seed == 2
    for k in range(3):  # deleted before the folds were rewritten, let alone before any training
        assert not paths.weights(MODEL, k).exists() and not paths.history(MODEL, k).exists()

    def stop_at_first_epoch(line):
        lines.append(line)
        if "epoch" in line:
            raise KeyboardInterrupt

    lines = []
    with pytest.raises(KeyboardInterrupt):
        train_base_stage(stage_config(paths, small_digits_dir, seed=2), log=stop_at_first_epoch)
    assert "train-base: 3 jobs, 0 already done, 3 to run" in lines


def test_predict_force_deletes_the_tables_first(trained, tmp_path):
    paths, folds = copy_run(trained, tmp_path / "run"), trained[1]

    def stop_after_fold_0(line):
        if "fold 0:" in line:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        predict_oof(paths, specs(), folds, TTA, options=StageOptions(force=True, log=stop_after_fold_0))
    gone = [paths.oof(MODEL), paths.test(MODEL), paths.test_fold(MODEL, 1), paths.test_fold(MODEL, 2),
            paths.predict_metrics(MODEL)]
    assert not any(p.exists() for p in gone)
    assert "not predicted yet" in logged(predict_oof, paths, specs(), folds, TTA)[0]


# ---------------------------------------------------------------- predict-oof: current by recorded provenance


@pytest.mark.parametrize("tta, train, differs", [
    (TTAConfig(n=1), {}, "tta"),
    (TTAConfig(n=2, combine="mean"), {}, "tta"),
    (TTAConfig(n=2, beta=0.5), {}, "tta"),
    (TTA, {"predict_size": 12}, "tta"),  # not part of the weights' recipe: no retraining needed
])
def test_predict_redoes_tables_when_prediction_settings_change(trained, tmp_path, tta, train, differs):
    paths, folds = copy_run(trained, tmp_path / "run"), trained[1]
    lines = logged(predict_oof, paths, specs(**train), folds, tta)
    assert f"oof.parquet was made from other {differs}; predicting" in lines[0]
    meta = read_table(paths.oof(MODEL), folds.classes, "oof").meta
    assert (meta["tta"]["n"], meta["tta"]["combine"], meta["tta"]["beta"]) == (tta.n, tta.combine, tta.beta)
    assert meta["tta"]["size"] == [train.get("predict_size", 16)] * 2
    assert "already predicted" in logged(predict_oof, paths, specs(**train), folds, tta)[0]


def test_a_copied_run_is_still_current(trained, tmp_path):
    paths, folds = copy_run(trained, tmp_path / "run"), trained[1]
    # the copy's weights are newer than its tables now: times prove nothing either way
    assert paths.weights(MODEL, 2).stat().st_mtime_ns > paths.oof(MODEL).stat().st_mtime_ns
    assert "3 already done, 0 to run" in logged(train_base, paths, specs(), folds)[0]
    assert "already predicted" in logged(predict_oof, paths, specs(), folds, TTA)[0]
    meta = read_table(paths.oof(MODEL), folds.classes, "oof").meta
    assert meta["cache_sha256"] == {"train": read_json(paths.cache_index("train"))["digest"],
                                    "test": read_json(paths.cache_index("test"))["digest"]}
    assert meta["resize"] == "squish" and meta["folds_sha256"] == folds.sha256


def test_a_missing_or_foreign_table_is_predicted_again(trained, tmp_path):
    paths, folds = copy_run(trained, tmp_path / "run"), trained[1]
    paths.test_fold(MODEL, 1).unlink()
    assert "test_fold1.parquet is missing or unreadable" in logged(predict_oof, paths, specs(), folds, TTA)[0]
    paths.predict_metrics(MODEL).unlink()
    assert "metrics.json is missing" in logged(predict_oof, paths, specs(), folds, TTA)[0]


# ---------------------------------------------------------------- images changed on disk


def moved_dataset(trained, tmp_path, small_digits_dir):
    """A copy of the run and of its dataset, the cache rebuilt from the copy: same pixels, so the same digest."""
    paths, folds = copy_run(trained, tmp_path / "run"), trained[1]
    data_dir = tmp_path / "data"
    shutil.copytree(small_digits_dir, data_dir)
    lines = []
    prepare_run(paths, DataConfig(root=str(data_dir)), FoldsConfig(k=3, seed=1), (16, 16), log=lines.append)
    assert any("320 of 320 images changed on disk" in s for s in lines)  # other paths: decoded again ...
    assert "3 already done" in logged(train_base, paths, specs(), folds)[0]  # ... to the same pixels
    return paths, folds, data_dir


def overwrite_image(folder: Path, split: str, seed: int) -> None:
    first = sorted(p for p in (folder / split).rglob("*.png"))[0]
    size = Image.open(first).size
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).save(first)
    st = os.stat(first)
    os.utime(first, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


def test_a_changed_train_image_makes_the_weights_stale(trained, tmp_path, small_digits_dir):
    paths, folds, data_dir = moved_dataset(trained, tmp_path, small_digits_dir)
    overwrite_image(data_dir, "train_images", seed=1)
    lines = []
    prepare_run(paths, DataConfig(root=str(data_dir)), FoldsConfig(k=3, seed=1), (16, 16), log=lines.append)
    assert any("1 of 320 images changed on disk" in s for s in lines)
    with pytest.raises(StackerError, match=r"test_resnet folds 0, 1, 2 were trained on other images \(the train "
                                           r"image cache changed\); pass --force"):
        train_base(paths, specs(), folds, options=QUIET)
    with pytest.raises(StackerError, match=r"fold0\.safetensors: test_resnet fold 0 was trained on other images"):
        predict_oof(paths, specs(), folds, TTA, options=QUIET)


def test_a_changed_test_image_makes_the_tables_stale_not_the_weights(trained, tmp_path, small_digits_dir):
    paths, folds, data_dir = moved_dataset(trained, tmp_path, small_digits_dir)
    overwrite_image(data_dir, "test_images", seed=2)
    prepare_run(paths, DataConfig(root=str(data_dir)), FoldsConfig(k=3, seed=1), (16, 16), log=QUIET.log)
    assert "3 already done" in logged(train_base, paths, specs(), folds)[0]
    lines = logged(predict_oof, paths, specs(), folds, TTA)
    assert "oof.parquet was made from other cache_sha256; predicting" in lines[0]


# ---------------------------------------------------------------- two processes, one run directory


def test_a_job_locked_by_another_process_is_skipped(tmp_path, small_digits_dir):
    paths = RunPaths(tmp_path / "run")
    _, folds = prepare_run(paths, DataConfig(root=str(small_digits_dir)), FoldsConfig(k=3), (16, 16),
                           log=QUIET.log)
    paths.model_dir(MODEL).mkdir(parents=True)
    with FileLock(paths.job_lock(MODEL, 1)):  # its own open file: the same flock conflict another process meets
        lines = logged(train_base, paths, specs(), folds)
    assert "  test_resnet fold 1: running in another process, skipped" in lines
    assert [paths.history(MODEL, k).is_file() for k in range(3)] == [True, False, True]


TRAIN_IN_SUBPROCESS = """
import sys, time
import torch
torch.set_num_threads(1)  # two processes on a small machine: no oversubscribed cores, the same sums in each
from base_models.config import model_specs
from base_models.jobs import StageOptions, train_base
from oof import RunPaths, load_folds

def log(line):
    print(line, flush=True)
    if "epoch" in line:
        time.sleep(0.5)  # each job outlasts the other process's start-up, so the two really overlap

paths = RunPaths(sys.argv[1])
specs = model_specs([{"arch": "test_resnet"}, {"arch": "test_efficientnet"}], %r)
train_base(paths, specs, load_folds(paths.folds), options=StageOptions(log=log))
""" % TINY


def test_two_processes_train_every_job_exactly_once(tmp_path, small_digits_dir):
    runs = {name: RunPaths(tmp_path / name) for name in ("alone", "shared")}
    for paths in runs.values():
        prepare_run(paths, DataConfig(root=str(small_digits_dir)), FoldsConfig(k=3), (16, 16), log=QUIET.log)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}

    def start(paths):
        return subprocess.Popen([sys.executable, "-c", TRAIN_IN_SUBPROCESS, str(paths.root)], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)

    procs = [start(runs["shared"]), start(runs["shared"])]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    alone = start(runs["alone"]).communicate(timeout=600)[0]
    assert all(p.returncode == 0 for p in procs), outputs
    lines = [s for out in outputs for s in out.splitlines()]
    for model in ("test_resnet", "test_efficientnet"):
        for k in range(3):
            assert sum(f"{model} fold {k} epoch  1/1" in s for s in lines) == 1, outputs
            assert file_digest(runs["shared"].weights(model, k)) == file_digest(runs["alone"].weights(model, k))
    assert sum("epoch  1/1" in s for s in alone.splitlines()) == 6
