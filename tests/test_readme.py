"""The README's quick start, run as a newcomer runs it: its run.yaml and its four commands, on the digits.

The run.yaml and the commands are read from the README itself: the first fenced block after the marker
`<!-- quickstart:run.yaml` and the first after `<!-- quickstart:commands -->`. The digits
(`base_models.demo_data.write_digits_dataset`, Kaggle folder layout) are written where that run.yaml
expects its data: `data.root`, relative to the folder the commands run in (a fresh tmp folder). Each
command runs as a real subprocess in that folder, `python -m stacker_cli` (the module the installed
`stacker` command runs) with the README's arguments.

What the test replaces in the README's run.yaml, and why: the `models:` list (real timm architectures
whose `pretrained:` files this machine does not have, and tests never download) becomes two tiny timm
`test_*` architectures, randomly initialised; `train.size` and `train.epochs` become 16 px and 2 epochs.
That keeps the run to a minute or two on 2 CPU cores. Every other key of the README's run.yaml (run_dir,
data, folds, the rest of train, tta, stack) is used as the README gives it.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from oof import RunPaths

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
MAX_README_LINES = 200
CONFIG_MARKER = "<!-- quickstart:run.yaml"
COMMANDS_MARKER = "<!-- quickstart:commands -->"
STAGES = ("train-base", "predict-oof", "fit-stack", "submit")
TINY_MODELS = [{"arch": "test_resnet"}, {"arch": "test_efficientnet"}]  # timm's test models: random init, no download
TINY_TRAIN = {"size": 16, "epochs": 2}


def fenced_block_after(text: str, marker: str) -> str:
    """The body of the first fenced code block after `marker` in `text`."""
    at = text.find(marker)
    assert at >= 0, f"README.md: no {marker!r} marker"
    match = re.compile(r"^```[\w-]*\n(.*?)^```", re.S | re.M).search(text, at)
    assert match, f"README.md: no fenced block after {marker!r}"
    return match.group(1)


def quick_start_commands(block: str) -> list[list[str]]:
    """Each `stacker ...` line of the commands block as its arguments, comments dropped."""
    commands = [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]
    assert all(c and c[0] == "stacker" for c in commands), commands
    return [c[1:] for c in commands]


def flag(args: list[str], name: str) -> str:
    assert name in args, f"{args}: no {name}"
    return args[args.index(name) + 1]


def stacker(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "stacker_cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)


def readme_config() -> dict:
    cfg = yaml.safe_load(fenced_block_after(README.read_text(encoding="utf-8"), CONFIG_MARKER))
    assert {"size", "epochs"} <= set(cfg["train"]) and cfg["models"], "the keys this test replaces are the README's"
    assert not Path(cfg["run_dir"]).is_absolute() and not Path(cfg["data"]["root"]).is_absolute()
    return cfg


@pytest.fixture(scope="module")
def quick_start(tmp_path_factory):
    """The quick start run once in a fresh folder: (folder, the config used, the commands, each one's result)."""
    from base_models.demo_data import write_digits_dataset

    here = tmp_path_factory.mktemp("quick_start")
    cfg = readme_config()
    cfg["models"] = TINY_MODELS
    cfg["train"].update(TINY_TRAIN)
    commands = quick_start_commands(fenced_block_after(README.read_text(encoding="utf-8"), COMMANDS_MARKER))
    assert [c[0] for c in commands] == list(STAGES)
    (here / flag(commands[0], "--config")).write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    write_digits_dataset(here / cfg["data"]["root"], size=16, n_images=400)
    results = {}
    for args in commands:
        results[args[0]] = result = stacker(args, here)
        assert result.returncode == 0, f"stacker {shlex.join(args)}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return here, cfg, commands, results


def test_readme_is_short_and_its_docs_links_resolve():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= MAX_README_LINES
    links = set(re.findall(r"\bdocs/[\w./-]+\.md\b", text))
    assert links, "README.md links no page under docs/"
    missing = sorted(link for link in links if not (REPO / link).is_file())
    assert not missing, f"README.md links pages that do not exist: {missing}"


def test_docs_pages_link_only_pages_that_exist():
    missing = sorted(f"{page.name}: {link}" for page in sorted((REPO / "docs").glob("*.md"))
                     for link in set(re.findall(r"\bdocs/[\w./-]+\.md\b", page.read_text(encoding="utf-8")))
                     if not (REPO / link).is_file())
    assert not missing, f"docs pages link pages that do not exist: {missing}"


def test_the_commands_work_on_the_run_the_config_names(quick_start):
    _, cfg, commands, _ = quick_start
    assert [flag(args, "--run") for args in commands[1:]] == [cfg["run_dir"]] * 3


def test_the_submission_has_the_sample_submissions_ids_and_columns(quick_start):
    here, cfg, _, _ = quick_start
    sample = pd.read_csv(here / cfg["data"]["root"] / "sample_submission.csv", dtype=str)
    submission = pd.read_csv(RunPaths(here / cfg["run_dir"]).submission, dtype=str)
    assert list(submission.columns) == list(sample.columns)
    assert list(submission[sample.columns[0]]) == list(sample[sample.columns[0]])
    labels = {p.name for p in (here / cfg["data"]["root"] / "train_images").iterdir()}
    assert set(submission[sample.columns[1]]) <= labels


def test_the_report_and_the_decision_are_where_the_readme_says(quick_start):
    here, cfg, _, results = quick_start
    run = RunPaths(here / cfg["run_dir"])
    assert run.report.is_file() and run.report.stat().st_size > 0
    decision = json.loads(run.decision.read_text(encoding="utf-8"))
    assert decision["chosen"] in decision["candidates"] and decision["reason"]
    assert set(decision["models"]) == {m["arch"] for m in TINY_MODELS}
    printed = results["fit-stack"].stdout  # what the README's "What to look at first" points at
    assert f"chosen: {decision['chosen']}: {decision['reason']}" in printed
    assert "OOF/test z" in printed and "nested estimate of what submit uses" in printed
