"""`stacker demo`: the digits dataset, a config for three tiny timm models, and the score of its submission.

    <out>/data/            the dataset (base_models.demo_data), test labels kept aside
    <out>/demo.yaml        the run's config
    <out>/run/             the run directory
    <out>/demo_result.json test accuracy of the submission and the seconds it took
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import yaml

from oof import RunPaths, info, write_json, write_text

from .demo_data import write_digits_dataset


def demo_config(out: Path) -> dict:
    """The demo's run: three tiny timm architectures, 5 folds, TTA, the full stack guard."""
    return {
        "run_dir": str(out / "run"),
        "data": {"root": str(out / "data")},
        "folds": {"k": 5, "seed": 42},
        # 32 px digits: 12 epochs of a random-init test_* model reach ~0.96-0.99 OOF accuracy.
        "train": {"size": 32, "epochs": 12, "batch_size": 64, "lr": 0.002},
        "models": [{"arch": "test_resnet"}, {"arch": "test_efficientnet"}, {"arch": "test_convnext"}],
        "tta": {"n": 4},
    }


def prepare_demo(out: str | Path, log=info) -> Path:
    """Write the dataset and the config under `out`; returns the config file."""
    out = Path(out).resolve()
    data_dir = write_digits_dataset(out / "data")
    config = out / "demo.yaml"
    write_text(config, yaml.safe_dump(demo_config(out), sort_keys=False))
    log(f"demo: dataset in {data_dir}, config {config}")
    return config


def finish_demo(out: str | Path, seconds: float, log=info) -> dict:
    """Score the demo's submission against the kept test labels; save and print the result."""
    out = Path(out).resolve()
    submission = RunPaths(out / "run").submission
    sub = pd.read_csv(submission, dtype=str)
    truth = pd.read_csv(out / "data" / "test_labels.csv", dtype=str)
    merged = sub.merge(truth, on="image_id", suffixes=("", "_true"))
    result = {"test_accuracy": float((merged["label"] == merged["label_true"]).mean()), "seconds": seconds,
              "submission": str(submission)}
    write_json(out / "demo_result.json", result)
    log(f"\ndemo: test accuracy of {submission} against the kept labels: {result['test_accuracy']:.4f} "
        f"({seconds:.0f}s in all; saved in {out / 'demo_result.json'})")
    return result
