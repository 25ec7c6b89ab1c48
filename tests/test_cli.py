"""The command line end to end: stages, reruns, and one-line errors.

`stacker(...)` runs `stacker_cli.main` in this process (`tiny.run_cli`); `stacker_process(...)` starts a real
one, for what only a process shows: output on a terminal, a stage that prints nothing at all, the exit of an
error, and modules never imported.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pandas as pd
import pytest
import yaml
from pathlib import Path

from tiny import run_cli as stacker
from tiny import write_config

STAGES = ("train-base", "predict-oof", "fit-stack", "submit", "predict", "demo")


def stacker_process(*args, cwd=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "stacker_cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=600)


@pytest.mark.parametrize("stage", ["train-base", "predict-oof", "fit-stack", "submit"])
def test_each_stage_succeeds(trained_run, stage):
    results = trained_run.results
    assert results[stage].returncode == 0, results[stage].stderr


def test_pipeline_writes_the_run_directory_and_a_valid_submission(trained_run, small_digits_dir):
    run, results = trained_run.run, trained_run.results
    for path in ("run.yaml", "folds.parquet", "cache/train.u8", "models/test_resnet/fold2.safetensors",
                 "preds/test_efficientnet/oof.parquet", "preds/test_efficientnet/test_fold0.parquet",
                 "stack/decision.json", "submission.csv"):
        assert (run / path).is_file(), path
    sample = pd.read_csv(small_digits_dir / "sample_submission.csv", dtype=str)
    sub = pd.read_csv(run / "submission.csv", dtype=str)
    assert list(sub.columns) == list(sample.columns)
    assert list(sub["image_id"]) == list(sample["image_id"])
    truth = pd.read_csv(small_digits_dir / "test_labels.csv", dtype=str)
    assert (sub["label"] == truth.set_index("image_id").loc[sub["image_id"], "label"].to_numpy()).mean() > 0.4
    assert "OOF accuracy" in results["predict-oof"].stdout


def test_rerun_skips_finished_work(trained_copy):
    run, config = trained_copy.run, trained_copy.config
    again = stacker("train-base", "--config", config)
    assert again.returncode == 0 and "6 already done, 0 to run" in again.stdout
    again = stacker("predict-oof", "--run", run)
    assert again.returncode == 0 and "already predicted" in again.stdout
    again = stacker("fit-stack", "--run", run)
    assert again.returncode == 0 and "is current" in again.stdout
    again = stacker("submit", "--run", run)
    assert again.returncode == 0 and "is current" in again.stdout
    assert stacker("submit", "--run", run, "--force").returncode == 0


def test_each_stage_logs_to_its_file_and_quiet_prints_nothing(trained_copy):
    results = trained_copy.results
    logs = trained_copy.run / "logs"
    assert {p.name for p in logs.iterdir()} >= {"train-base.log", "predict-oof.log", "fit-stack.log", "submit.log"}
    assert "OOF accuracy" in (logs / "predict-oof.log").read_text()
    quiet = stacker_process("fit-stack", "--run", trained_copy.run, "--force", "-q")  # nothing from C code either
    assert quiet.returncode == 0 and quiet.stdout == "" and quiet.stderr == ""
    assert (logs / "fit-stack.log").read_text().count("fit-stack:") > results["fit-stack"].stdout.count("fit-stack:")


def test_progress_is_plain_lines_in_a_pipe_and_bars_on_a_terminal(trained_copy):
    run = trained_copy.run
    piped = stacker("predict-oof", "--run", run, "--force", "--models", "test_resnet")
    assert piped.returncode == 0 and "\r" not in piped.stdout + piped.stderr  # no bar control characters
    assert re.search(r"^job 3/3, .* so far \(test_resnet fold 2\)$", piped.stdout, re.M)  # the grid's progress
    terminal = on_a_terminal("predict-oof", "--run", run, "--force", "--models", "test_resnet")
    assert re.search(r"predict \d view\(s\): +\d+%\|.*\| \d+/\d+ \[.*batch/s\]", terminal)  # a tqdm bar and its rate
    assert "\r" in terminal and "job 3/3" in terminal


def on_a_terminal(*args) -> str:
    """A stage's output (stdout and stderr) when both are a pseudo-terminal, as a user's shell gives."""
    import fcntl
    import pty
    import struct
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # 40 x 120, as a window has
    proc = subprocess.Popen([sys.executable, "-m", "stacker_cli", *map(str, args)], stdout=follower, stderr=follower,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert proc.wait(timeout=600) == 0
    return b"".join(chunks).decode(errors="replace")


def test_fit_stack_and_submit_never_import_torch(trained_copy):
    code = ("import sys, stacker_cli as cli; rc = cli.main(['fit-stack', '--run', sys.argv[1], '--force']); "
            "rc |= cli.main(['submit', '--run', sys.argv[1], '--force']); "
            "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code, str(trained_copy.run)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("change, args, message", [
    ({"run_dir": None}, [], "no run directory: pass --run DIR"),
    ({"colour": "blue"}, [], r"config: unknown section\(s\) \['colour'\]"),
    ({"train": {"size": 16, "epoks": 3}}, [], r"models\[0\]: unknown key\(s\) \['epoks'\]"),
    ({"data": {"root": "/nonexistent/data"}}, [], "data.root: folder /nonexistent/data not found"),
    ({"tta": {"n": 40}}, [], r"tta\.n: expected an integer in \[0, 11\], got 40"),
    ({"models": [{"arch": "no_such_net"}]}, [], "model arch 'no_such_net': not a timm model"),
    ({}, ["--set", "train.epochs"], "--set 'train.epochs': expected KEY=VALUE"),
    ({}, ["--set", "folds.k=1"], "folds.k: expected an integer >= 2, got 1"),
    ({"train": 5}, [], "train: must be a mapping of keys to values, got 5"),
    ({"models": [5]}, [], r"models\[0\]: a timm name or a mapping with `arch`, got 5"),
    ({}, ["--set", "train.epochs=1.5"], r"models\[0\] \(test_resnet\): train\.epochs: expected an integer >= 1, "
                                        "got 1.5"),
    ({}, ["--set", "train.clip_grad=abc"], r"models\[0\] \(test_resnet\): train\.clip_grad: expected a number > 0 "
                                           "or null, got 'abc'"),
    ({}, ["--set", "train.lr=.nan"], r"train\.lr: expected a number > 0, got nan"),
    ({}, ["--set", "train.weight_decay=-0.1"], r"train\.weight_decay: expected a number >= 0, got -0\.1"),
    ({}, ["--set", "train.seed=-1"], r"train\.seed: expected an integer in \[0, 4294967295\], got -1"),
    ({}, ["--set", "train.augment.min_scale=-1"], r"train\.augment\.min_scale: expected a number in \(0, 1\]"),
    ({}, ["--set", "train.augment.ratio=ab"], r"train\.augment\.ratio: expected \[low, high\]"),
    ({}, ["--set", "data.extra_targets=variety"], r"data\.extra_targets: expected a list of column names, "
                                                  "got 'variety'"),
    ({}, ["--set", "stack.min_gain=.inf"], r"stack\.min_gain: expected a number >= 0, got inf"),
    ({}, ["--set", "stack.seed=-1"], r"stack\.seed: expected an integer in \[0, 4294967295\], got -1"),
    ({}, ["--set", "stack.n_bootstrap=1000000000"], r"stack\.n_bootstrap: expected an integer in \[100, 100000\]"),
    ({}, ["--set", "stack.logreg_alpha=.nan"], r"stack\.logreg_alpha: expected a number > 0, got nan"),
    ({}, ["--set", "train.mixup_alpha=-1"], r"train\.mixup_alpha: expected a number >= 0, got -1"),
    ({}, ["--set", "train.cutmix_alpha=-1"], r"train\.cutmix_alpha: expected a number >= 0, got -1"),
    ({}, ["--set", "train.target_weights={nope: 1}"], r"train\.target_weights names \['nope'\], which are not "
                                                     r"data\.extra_targets"),
    ({}, ["--set", "train.target_weights={nope: x}"], r"train\.target_weights: expected a mapping of extra target "
                                                     "to a weight >= 0"),
    ({"run_dir": 5}, [], "run_dir: expected a folder name, got 5"),
    ({}, ["--set", "data.extra_targets=[../../x]"], r"data\.extra_targets: target name '\.\./\.\./x' is not allowed"),
])
def test_user_errors_are_one_line_and_exit_2(tmp_path, small_digits_dir, change, args, message):
    config = write_config(tmp_path / "run.yaml", small_digits_dir, tmp_path / "run", **change)
    out = stacker("train-base", "--config", config, *args)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("stacker: error: ")
    assert re.search(message, last), last


def test_a_user_error_ends_a_real_process_with_one_line_and_exit_2(tmp_path, small_digits_dir):
    config = write_config(tmp_path / "run.yaml", small_digits_dir, tmp_path / "run", tta={"n": 40})
    out = stacker_process("train-base", "--config", config)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == ["stacker: error: tta.n: expected an integer in [0, 11], got 40"]


def test_bad_yaml_and_missing_config(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    out = stacker("train-base", "--config", bad)
    assert out.returncode == 2 and f"{bad}: not valid YAML" in out.stderr
    out = stacker("predict-oof", "--config", tmp_path / "missing.yaml")
    assert out.returncode == 2 and "missing.yaml: config file not found" in out.stderr
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("run_dir: caf\xe9\n".encode("latin-1"))
    out = stacker("train-base", "--config", latin)
    assert out.returncode == 2 and f"{latin}: not a UTF-8 text file" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("stage", STAGES)
def test_help_for_every_stage(stage):
    out = stacker(stage, "--help")
    assert out.returncode == 0 and "usage: stacker" in out.stdout


def test_example_paddy_config_resolves():
    """examples/paddy.yaml is read by the same code as any run.yaml (the weights file is checked at train time)."""
    from base_models.config import base_configs
    from stacker import stack_config

    cfg = yaml.safe_load((Path(__file__).parents[1] / "examples" / "paddy.yaml").read_text())
    data, folds, (spec,), tta = base_configs(cfg)
    assert data.extra_targets == ["variety"] and folds.k == 5 and tta.n == 4
    assert [p.size for p in spec.train.schedule] == [(128, 128), (224, 224), (256, 192)]
    assert spec.train.epochs == 12 and spec.train.prediction_size == (256, 192)
    assert spec.pretrained.endswith(".safetensors")
    assert stack_config(cfg).metric == "accuracy"


def test_flags_beat_model_entries_of_a_saved_run_yaml(tmp_path):
    """run.yaml stores each model's resolved train keys; --epochs and --set train.* must still win."""
    import argparse

    import stacker_cli as cli
    from base_models.config import base_configs

    run = tmp_path / "run"
    run.mkdir()
    (run / "run.yaml").write_text(yaml.safe_dump({"run_dir": str(run), "models": [
        {"name": "a", "arch": "test_resnet", "epochs": 1, "device": "cpu"}]}))
    args = argparse.Namespace(config=None, run=str(run), epochs=3, set=["train.size=24"])
    cfg = cli.resolve_config(args)
    _, _, (spec,), _ = base_configs(cfg)
    assert spec.train.epochs == 3 and spec.train.size == (24, 24) and spec.train.device == "cpu"
