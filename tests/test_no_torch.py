"""The stacking side runs on a machine without torch: fit-stack, submit and the Python API.

Users who only stack tables from other tools install `stacker` without the `[train]`
extra. Each test runs a real subprocess in which torch, torchvision, timm and
safetensors cannot be imported, as on such a machine.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

from stack_fixtures import strong_weak_run

ROOT = Path(__file__).resolve().parents[1]
TRAINING_ONLY = ("torch", "torchvision", "timm", "safetensors")
# Runs argv[1:] as the CLI (or, with "-c CODE", a script) in a process where the training packages are absent.
PRELUDE = f"""
import importlib.abc, sys
class NoTraining(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {TRAINING_ONLY!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, NoTraining())
if sys.argv[1] == "-c":
    exec(sys.argv[2])
    rc = 0
else:
    import stacker_cli as cli
    rc = cli.main(sys.argv[1:])
loaded = sorted(m for m in sys.modules if m.split(".")[0] in {TRAINING_ONLY!r})
assert not loaded, loaded
sys.exit(rc)
"""


def without_torch(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", PRELUDE, *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=600)


def test_fit_stack_and_submit_run_without_torch(tmp_path):
    run, _, test_ids = strong_weak_run(tmp_path / "run")
    sample = tmp_path / "sample_submission.csv"
    pd.DataFrame({"id": test_ids, "label": "0"}).to_csv(sample, index=False)
    fit = without_torch("fit-stack", "--run", run, "--set", "stack.n_bootstrap=100", "--set", "stack.nested=false")
    assert fit.returncode == 0, fit.stderr
    assert (run / "stack" / "decision.json").is_file()
    sub = without_torch("submit", "--run", run, "--sample-submission", sample)
    assert sub.returncode == 0, sub.stderr
    written = pd.read_csv(run / "submission.csv", dtype=str)
    assert list(written["id"]) == test_ids and written["label"].notna().all()


def test_the_python_stacking_api_imports_without_torch(tmp_path):
    run, _, _ = strong_weak_run(tmp_path / "run")
    code = ("import stacker, oof\n"
            f"d = stacker.fit_stack({str(run)!r}, stacker.StackConfig(n_bootstrap=100, nested=False), log=None)\n"
            "assert d['chosen']\n")
    result = without_torch("-c", code)
    assert result.returncode == 0, result.stderr


def test_a_training_stage_without_torch_says_what_to_install(tmp_path):
    result = without_torch("train-base", "--run", tmp_path / "run", "--data-root", tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "stacker[train]" in lines[0], result.stderr
