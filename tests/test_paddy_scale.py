"""bench/paddy_scale.py: the Paddy-shaped data, the recipe extrapolation, and one tiny end-to-end run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.paddy_scale import extrapolate  # noqa: E402
from bench.photos import PADDY_CLASSES  # noqa: E402


def epoch(phase: int, seconds: float, size=(128, 128), frozen: bool = False, rate: float = 100.0) -> dict:
    return {"phase": phase, "frozen": frozen, "size": list(size), "seconds": seconds, "images_per_second": rate}


def test_the_recipe_is_extrapolated_from_each_phase_s_first_and_last_epochs():
    epochs = [epoch(0, 9.0, frozen=True), epoch(0, 30.0), epoch(0, 10.0), epoch(1, 50.0, (224, 224)),
              epoch(1, 20.0, (224, 224), rate=40.0)]
    rows = extrapolate(epochs, [{"size": 128, "epochs": 6}, {"size": 224, "epochs": 3}], freeze_epochs=1)
    assert [r["group"] for r in rows] == ["freeze 128x128", "phase 0 128x128", "phase 1 224x224"]
    # the first epoch once (compile, autotuning), the last for each further one
    assert [r["recipe_s_per_fold"] for r in rows] == [9.0, 30.0 + 5 * 10.0, 50.0 + 2 * 20.0]
    assert rows[2]["train_images_per_s"] == 40.0 and rows[2]["measured_epochs"] == 2


def test_a_recipe_freeze_epoch_a_random_init_run_skipped_counts_as_a_phase_0_epoch():
    rows = extrapolate([epoch(0, 30.0), epoch(0, 10.0)], [{"size": 128, "epochs": 6}], freeze_epochs=2)
    assert rows[0]["group"] == "freeze (as phase 0) 128x128" and rows[0]["recipe_s_per_fold"] == 20.0


def test_a_tiny_paddy_rehearsal_runs_the_four_stages_and_reports_them(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "bench/paddy_scale.py", "--smoke", "--sizes", "100", "--models",
                             "test_resnet", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    train = pd.read_csv(out / "data" / "train.csv", dtype=str)
    assert list(train.columns) == ["image_id", "label", "variety"] and set(train["label"]) == set(PADDY_CLASSES)
    assert (out / "data" / "train_images" / train["label"][0] / train["image_id"][0]).is_file()
    (run,) = json.loads((out / "paddy_scale.json").read_text())["runs"]
    assert (run["n_train"], run["n_test"]) == (100, 33)
    assert list(run["stages"]) == ["train-base", "predict-oof", "fit-stack", "submit"]
    for stage in run["stages"].values():
        assert stage["wall_s"] > 0 and stage["peak_rss_mib"] > 50 and stage["run_dir_mib"] > 0
    assert run["cache_mib"] > 0 and 0 <= run["test_accuracy"] <= 1 and set(run["oof_accuracy"]) == {"test_resnet"}
    assert "ms/image" in result.stdout and "peak RSS MiB" in result.stdout
