"""The run directory: one place that names every file a stage reads or writes.

    <run>/run.yaml                      resolved config
    <run>/folds.parquet                 id, label, fold (+ K, seed, classes, sha256)
    <run>/targets.parquet               id + the train CSV's other columns (extra targets, weights)
    <run>/cache/                        decoded uint8 images + index
    <run>/models/<model>/fold<k>.*      weights, history, resume checkpoint
    <run>/preds/<model>/oof.parquet     OOF probabilities
    <run>/preds/<model>/test.parquet    test probabilities, mean over fold models
    <run>/preds/<model>/test_fold<k>.parquet
    <run>/stack/                        decision.json, meta-models, report
    <run>/submission.csv
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import StackerError

# Model names become directory names and feature-name prefixes (`<model>:<class>`).
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


def check_model_name(name: str) -> str:
    if not isinstance(name, str) or not _MODEL_NAME.match(name):
        raise StackerError(
            f"model name {name!r} is not allowed: use letters, digits, '_', '.', '-' "
            "(it becomes a directory name)")
    return name


@dataclass(frozen=True)
class RunPaths:
    root: Path

    def __init__(self, root: str | os.PathLike):
        object.__setattr__(self, "root", Path(root))

    @property
    def config(self) -> Path:
        return self.root / "run.yaml"

    @property
    def folds(self) -> Path:
        return self.root / "folds.parquet"

    @property
    def targets(self) -> Path:
        """Extra train columns (extra targets, weight columns) by id, beside folds.parquet."""
        return self.root / "targets.parquet"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def stack(self) -> Path:
        return self.root / "stack"

    @property
    def decision(self) -> Path:
        return self.stack / "decision.json"

    @property
    def submission(self) -> Path:
        return self.root / "submission.csv"

    def model_dir(self, model: str) -> Path:
        return self.root / "models" / check_model_name(model)

    def weights(self, model: str, fold: int) -> Path:
        return self.model_dir(model) / f"fold{fold}.safetensors"

    def history(self, model: str, fold: int) -> Path:
        return self.model_dir(model) / f"fold{fold}.history.json"

    def checkpoint(self, model: str, fold: int) -> Path:
        return self.model_dir(model) / f"fold{fold}.checkpoint.pt"

    def preds_dir(self, model: str) -> Path:
        return self.root / "preds" / check_model_name(model)

    def oof(self, model: str, target: str | None = None) -> Path:
        return self.preds_dir(model) / f"oof{_suffix(target)}.parquet"

    def test(self, model: str, target: str | None = None) -> Path:
        return self.preds_dir(model) / f"test{_suffix(target)}.parquet"

    def test_fold(self, model: str, fold: int, target: str | None = None) -> Path:
        return self.preds_dir(model) / f"test_fold{fold}{_suffix(target)}.parquet"

    def predicted_models(self) -> list[str]:
        """Models with an OOF table (parquet, or CSV from another tool) under preds/, sorted by name."""
        preds = self.root / "preds"
        if not preds.is_dir():
            return []
        return sorted(p.name for p in preds.iterdir()
                      if (p / "oof.parquet").is_file() or (p / "oof.csv").is_file())


def _suffix(target: str | None) -> str:
    # The main target's tables keep the contract's plain names; extra targets sit beside them.
    return "" if target is None else f".{target}"
