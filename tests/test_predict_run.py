"""stacker predict: a new test set through a finished run that moved and cannot be written.

The run is trained, predicted, stacked and submitted through the CLI, then "uploaded" as a
Kaggle dataset: moved to another folder without its cache, made read-only, the training data
and the pretrained weights file deleted. Predicting the run's own test images from there must
give submit's submission exactly and its probabilities within 1e-5, and leave the run as it was.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import save_file

from oof import RunPaths, load_config, load_folds, read_table, run_paths, write_run_config
from tiny import run_cli

REPO = Path(__file__).resolve().parents[1]
MODELS = ("test_efficientnet", "test_resnet")  # the stack's order: sorted names


def stacker(*args):
    """`stacker ARGS` in this process (`tiny.run_cli`): its exit code, stdout and stderr."""
    return run_cli(*args)


def stacker_process(*args):
    """`stacker ARGS` as a real process, as a Kaggle notebook cell runs it."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "stacker_cli", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=600)


def ok(result):
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@dataclass(frozen=True)
class Uploaded:
    """The moved, read-only run, the test set kept apart, and what submit wrote before the move."""

    run: Path
    images: Path
    sample: Path
    expected: Path  # the run's stack/test.parquet, preds/ and submission.csv, copied before the move
    classes: tuple


def pretrained_file(path: Path) -> Path:
    """A test_resnet checkpoint as a user brings one (ImageNet-style head), written where train-base reads it."""
    import timm

    torch.manual_seed(0)
    path.parent.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in timm.create_model("test_resnet").state_dict().items()}, str(path))
    return path


def train_and_submit(root: Path, data: Path) -> Path:
    weights = pretrained_file(root / "weights" / "test_resnet.safetensors")
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump({
        "run_dir": str(root / "trained"), "data": {"root": str(data)}, "folds": {"k": 2},
        "train": {"size": 16, "epochs": 1, "freeze_epochs": 0, "batch_size": 32, "lr": 1e-2, "device": "cpu"},
        "models": [{"arch": "test_resnet", "pretrained": str(weights)}, {"arch": "test_efficientnet"}],
        "tta": {"n": 2}, "stack": {"n_bootstrap": 200}}))
    ok(stacker("train-base", "--config", config))
    for stage in ("predict-oof", "fit-stack", "submit"):
        ok(stacker(stage, "--run", root / "trained"))
    weights.unlink()  # predict builds each fold model without it
    return root / "trained"


def set_writable(root: Path, writable: bool) -> None:
    for p in [root, *root.rglob("*")]:
        mode = p.stat().st_mode
        p.chmod(mode | stat.S_IWUSR if writable else mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


@pytest.fixture(scope="module")
def uploaded(tmp_path_factory, small_digits_dir):
    root = tmp_path_factory.mktemp("predict_run")
    data = root / "data"
    shutil.copytree(small_digits_dir, data)
    trained = train_and_submit(root, data)
    test_set = root / "hidden_test"  # the competition's test set, apart from the training data
    shutil.copytree(data / "test_images", test_set / "images")
    shutil.copy(data / "sample_submission.csv", test_set)
    expected = root / "expected"
    for name in ("stack", "preds", "submission.csv"):
        copy = shutil.copytree if (trained / name).is_dir() else shutil.copy
        copy(trained / name, expected / name)
    shutil.rmtree(data)  # neither the training images ...
    shutil.rmtree(RunPaths(trained).cache)  # ... nor the training cache travel
    run = root / "kaggle" / "input" / "my-run"
    run.parent.mkdir(parents=True)
    shutil.move(trained, run)  # the old path no longer exists
    set_writable(run, False)
    yield Uploaded(run, test_set / "images", test_set / "sample_submission.csv", expected,
                   load_folds(RunPaths(run).folds).classes)
    set_writable(run, True)


def snapshot(root: Path) -> dict:
    """Every file and folder under `root` (itself too): files by size, mtime and sha256, folders by mtime."""
    out = {}
    for p in [root, *sorted(root.rglob("*"))]:
        st = p.lstat()
        digest = None if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        out[p.relative_to(root).as_posix()] = (st.st_size if digest else None, st.st_mtime_ns, digest)
    return out


def table(path: Path, classes):
    return read_table(path, classes, "test")


@pytest.fixture(scope="module")
def predicted(uploaded, tmp_path_factory):
    out = tmp_path_factory.mktemp("kaggle_working") / "pred"
    before = snapshot(uploaded.run)
    result = stacker_process("predict", "--run", uploaded.run, "--images", uploaded.images,
                             "--sample-submission", uploaded.sample, "--out", out)
    return out, result, before


def test_predict_reproduces_submit_from_a_moved_read_only_run(uploaded, predicted):
    out, result, before = predicted
    ok(result)
    assert snapshot(uploaded.run) == before  # no lock, temp file, cache or edit: names, sizes, times, bytes
    assert yaml.safe_load((uploaded.run / "run.yaml").read_text())["run_dir"] == "."
    sub, want = (pd.read_csv(p, dtype=str, keep_default_na=False) for p in (out / "submission.csv",
                                                                             uploaded.expected / "submission.csv"))
    pd.testing.assert_frame_equal(sub, want)
    paths, expected = RunPaths(out), RunPaths(uploaded.expected)
    stack, stack_want = table(paths.stack_test, uploaded.classes), table(expected.stack_test, uploaded.classes)
    assert list(stack.ids) == list(stack_want.ids)
    np.testing.assert_allclose(stack.proba, stack_want.proba, atol=1e-5, rtol=0)
    for model in MODELS:
        for new, old in [(paths.test(model), expected.test(model))] + [
                (paths.test_fold(model, k), expected.test_fold(model, k)) for k in range(2)]:
            new, old = table(new, uploaded.classes), table(old, uploaded.classes)
            np.testing.assert_allclose(new.proba, old.proba, atol=1e-5, rtol=0)
            assert new.meta["cache_sha256"] == old.meta["cache_sha256"]  # the same images decode to the same pixels
            assert new.meta["tta"] == old.meta["tta"] and new.meta["schema"] == old.meta["schema"]  # the run's views
    lines = result.stdout.splitlines()
    assert any(re.match(r"  cache test: 80 images at 16x16", s) for s in lines)
    assert "  test_resnet fold 1: 80 test rows" in lines
    assert any(s.startswith("submission: ") and "80 rows, labels" in s for s in lines)


def test_a_rerun_keeps_current_tables_and_an_interrupted_one_resumes(uploaded, predicted, tmp_path):
    ok(predicted[1])
    out = tmp_path / "pred"
    shutil.copytree(predicted[0], out)
    args = ("predict", "--run", uploaded.run, "--images", uploaded.images, "--sample-submission", uploaded.sample,
            "--out", out)
    again = ok(stacker(*args)).stdout
    assert "predict: test_resnet already predicted" in again and "is current" in again
    paths = RunPaths(out)
    before = table(paths.test("test_resnet"), uploaded.classes).proba
    paths.test_fold("test_resnet", 1).unlink()  # killed during fold 1
    paths.test("test_resnet").unlink()
    resumed = ok(stacker(*args)).stdout
    assert "predict: test_resnet: 1 of 2 fold models to run" in resumed
    assert "test_resnet fold 0" not in resumed and "cache test" not in resumed  # fold 0 and the cache reused
    np.testing.assert_array_equal(table(paths.test("test_resnet"), uploaded.classes).proba, before)
    assert "is current" in resumed  # the same tables, the same stack file: the submission stands


def test_without_a_sample_the_layout_is_id_label_in_sorted_id_order(uploaded, tmp_path):
    """A CSV naming the images by other ids (and no sample): `id,label`, ids sorted, the same labels."""
    files = sorted(p.name for p in uploaded.images.iterdir())
    listing = pd.DataFrame({"file": files[::-1], "name": [f"img_{f}" for f in files[::-1]]})
    listing.to_csv(tmp_path / "test.csv", index=False)
    ok(stacker("predict", "--run", uploaded.run, "--images", uploaded.images, "--csv", tmp_path / "test.csv",
               "--id-column", "name", "--path-column", "file", "--out", tmp_path / "pred"))
    sub = pd.read_csv(tmp_path / "pred" / "submission.csv", dtype=str)
    assert list(sub.columns) == ["id", "label"] and list(sub["id"]) == sorted(f"img_{f}" for f in files)
    want = pd.read_csv(uploaded.expected / "submission.csv", dtype=str).set_index("image_id")["label"]
    assert list(sub["label"]) == list(want.loc[[i.removeprefix("img_") for i in sub["id"]]])


def test_a_per_fold_stack_is_applied_per_fold(uploaded, tmp_path):
    """stack.test_features per_fold: the stack applied to each fold model's table, then averaged, as fit-stack."""
    run = tmp_path / "run"
    shutil.copytree(uploaded.run, run, copy_function=shutil.copyfile)
    set_writable(run, True)
    ok(stacker("fit-stack", "--run", run, "--test-features", "per_fold", "--force"))
    ok(stacker("submit", "--run", run, "--sample-submission", uploaded.sample, "--force"))
    ok(stacker("predict", "--run", run, "--images", uploaded.images, "--sample-submission", uploaded.sample,
               "--out", tmp_path / "pred"))
    new, old = table(RunPaths(tmp_path / "pred").stack_test, uploaded.classes), table(RunPaths(run).stack_test,
                                                                                       uploaded.classes)
    assert new.meta["test_features"] == "per_fold"
    np.testing.assert_allclose(new.proba, old.proba, atol=1e-5, rtol=0)
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "pred" / "submission.csv", dtype=str),
                                  pd.read_csv(run / "submission.csv", dtype=str))


# ---------------------------------------------------------------- a run trained on a GPU, predicted on CPU


def as_trained_on_a_gpu(uploaded, root: Path) -> Path:
    """A copy of the run whose run.yaml reads as a GPU run's: `train.device: cuda` (test_efficientnet's own
    key dropped, so it inherits it) and test_resnet's own `device: cuda` with `amp: bf16`."""
    run = root / "gpu-run"
    shutil.copytree(uploaded.run, run, copy_function=shutil.copyfile)
    set_writable(run, True)
    config = yaml.safe_load((run / "run.yaml").read_text())
    config["train"] = {**(config.get("train") or {}), "device": "cuda"}
    for model in config["models"]:
        if model["name"] == "test_resnet":
            model.update(device="cuda", amp="bf16")
        else:
            model.pop("device")
    (run / "run.yaml").write_text(yaml.safe_dump(config))
    set_writable(run, False)  # read-only, as under /kaggle/input
    return run


def predict_args(uploaded, run: Path, out: Path, *more):
    return ("predict", "--run", run, "--images", uploaded.images, "--sample-submission", uploaded.sample,
            "--out", out, *more)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_cuda_run_without_cuda_is_refused_in_one_line_naming_cuda(uploaded, tmp_path, capsys, restore_logging):
    import stacker_cli as cli

    run = as_trained_on_a_gpu(uploaded, tmp_path)
    result = stacker(*predict_args(uploaded, run, tmp_path / "pred"))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert re.fullmatch(r"stacker: error: test_\w+: train\.device cuda \(the run's run\.yaml\), but no CUDA device "
                        r"is visible here; stacker predict --device cpu predicts on the CPU", result.stderr.strip())
    assert not (tmp_path / "pred").exists()  # refused before anything is decoded or written
    capsys.readouterr()
    assert cli.main([str(a) for a in predict_args(uploaded, run, tmp_path / "pred", "--device", "cuda")]) == 2
    assert capsys.readouterr().err == ("stacker: error: --device cuda: no CUDA device is visible here; use "
                                       "--device cpu (or auto)\n")
    assert not (tmp_path / "pred").exists()
    set_writable(run, True)


def test_device_cpu_predicts_a_cuda_run_in_float32(uploaded, predicted, tmp_path):
    """--device cpu overrides train.device and each model's own device key; the tables equal the run's own
    `stacker predict` on CPU (float32 both times) and record amp off."""
    ok(predicted[1])
    run = as_trained_on_a_gpu(uploaded, tmp_path)
    result = ok(stacker(*predict_args(uploaded, run, tmp_path / "pred", "--device", "cpu")))
    notes = [s for s in result.stdout.splitlines() if "float32" in s]
    assert notes == ["note: test_resnet: train.amp bf16 is not used on the CPU (--device cpu): it predicts in "
                     "float32"]
    new, old = RunPaths(tmp_path / "pred"), RunPaths(predicted[0])
    for model in MODELS:
        for path in (lambda p: p.test(model), *(lambda p, k=k: p.test_fold(model, k) for k in range(2))):
            got, want = table(path(new), uploaded.classes), table(path(old), uploaded.classes)
            np.testing.assert_array_equal(got.proba, want.proba)
            assert got.meta["amp"] == "off" and got.meta == want.meta
    pd.testing.assert_frame_equal(pd.read_csv(new.root / "submission.csv", dtype=str),
                                  pd.read_csv(old.root / "submission.csv", dtype=str))
    set_writable(run, True)


# ---------------------------------------------------------------- bad input: one line naming it


def bad_image(uploaded, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(uploaded.images, images)
    first = sorted(images.iterdir())[0]
    first.write_bytes(b"not an image")
    return {"--images": images}, rf"{re.escape(first.name)}: cannot decode image"


def image_not_in_sample(uploaded, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(uploaded.images, images)
    shutil.copy(sorted(images.iterdir())[0], images / "extra.png")
    return {"--images": images}, r"sample_submission\.csv: no row for image id\(s\) 'extra\.png'"


def sample_id_without_image(uploaded, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(uploaded.images, images)
    gone = sorted(images.iterdir())[-1]
    gone.unlink()
    return {"--images": images}, rf"images: no image for id\(s\) '{re.escape(gone.name)}'"


def weights_missing(uploaded, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(uploaded.run, run, copy_function=shutil.copyfile)
    set_writable(run, True)
    RunPaths(run).weights("test_efficientnet", 1).unlink()
    return {"--run": run}, r"models/test_efficientnet/fold1\.safetensors: weights missing from the run"


def weights_replaced(uploaded, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(uploaded.run, run, copy_function=shutil.copyfile)
    set_writable(run, True)
    shutil.copy(RunPaths(run).weights("test_resnet", 0), RunPaths(run).weights("test_resnet", 1))
    return {"--run": run}, r"fold1\.safetensors: not the weights test_resnet's run tables were predicted with"


def out_inside_the_run(uploaded, tmp_path):
    return {"--out": uploaded.run / "pred"}, r"inside the run .*; stacker predict never writes into the run"


@pytest.mark.parametrize("case", [bad_image, image_not_in_sample, sample_id_without_image, weights_missing,
                                  weights_replaced, out_inside_the_run], ids=lambda f: f.__name__)
def test_bad_input_is_one_line_naming_it(uploaded, tmp_path, case):
    before = snapshot(uploaded.run)
    given, message = case(uploaded, tmp_path)
    args = {"--run": uploaded.run, "--images": uploaded.images, "--sample-submission": uploaded.sample,
            "--out": tmp_path / "pred", **given}
    result = stacker("predict", *[x for pair in args.items() for x in pair])
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("stacker: error: ") and re.search(message, last), last
    assert snapshot(uploaded.run) == before


# ---------------------------------------------------------------- relocatable run.yaml


def test_run_yaml_is_relocatable(tmp_path):
    """run.yaml says `run_dir: .` and gives data.root relative to the run: a moved run resolves to where it is."""
    first = RunPaths(tmp_path / "project" / "runs" / "a")
    write_run_config(first, {"data": {"root": str(tmp_path / "project" / "data")}, "models": []})
    saved = yaml.safe_load(first.config.read_text())
    assert saved["run_dir"] == "." and saved["data"]["root"] == "../../data"
    moved = tmp_path / "elsewhere" / "project"
    shutil.move(tmp_path / "project", moved)
    for cfg in (load_config(run=str(moved / "runs" / "a")), load_config(config=str(moved / "runs" / "a" / "run.yaml"))):
        assert run_paths(cfg).root == (moved / "runs" / "a").resolve()
        assert Path(cfg["data"]["root"]) == (moved / "data").resolve()
    other = tmp_path / "my.yaml"  # a config of the user's own: its relative paths stay the caller's
    other.write_text(yaml.safe_dump({"run_dir": ".", "data": {"root": "data"}}))
    assert load_config(config=str(other)) == {"run_dir": ".", "data": {"root": "data"}}


def test_a_moved_run_yaml_found_in_the_run_names_the_run(tmp_path):
    """An older run.yaml with an absolute run_dir: read from a run, the run is where it was found."""
    run = RunPaths(tmp_path / "moved")
    run.root.mkdir()
    run.config.write_text(yaml.safe_dump({"run_dir": "/old/place/run"}))
    assert load_config(run=str(run.root))["run_dir"] == str(run.root)


def test_predict_help():
    out = stacker("predict", "--help")
    assert out.returncode == 0 and "--images" in out.stdout and "--sample-submission" in out.stdout
    assert "--device {auto,cpu,cuda}" in out.stdout
