"""The run directory: the one place that names every file a stage reads or writes.

    <run>/run.yaml                          resolved config
    <run>/folds.parquet                     id, label, fold[, group] (+ K, seed, classes, sha256); folds.csv from
                                            other tools
    <run>/duplicates.csv                    the near-duplicate image pairs found when the folds were made
    <run>/targets.parquet                   id + the train CSV's other columns (extra targets, weights)
    <run>/cache/<split>.u8, <split>.json    decoded uint8 images + index, split train or test
    <run>/models/<model>/fold<k>.*          weights, history, job log, resume checkpoint, lock
    <run>/models/<model>/repeat<r>/fold<k>.*   the same for repeat r > 0 (folds.repeats)
    <run>/models/<model>/full.*             the full fit (every train row, no fold held out; `train-base
                                            --full`): full.safetensors, full.history.json, full.history.csv,
                                            full.log, full.checkpoint.pt, full.lock
    <run>/preds/<model>/oof.parquet         OOF probabilities (oof.csv from other tools)
    <run>/preds/<model>/test.parquet        test probabilities, mean over fold models (test.csv likewise)
    <run>/preds/<model>/oof_fold<k>.parquet      fold model k's held-out rows (predict-oof's per-job part)
    <run>/preds/<model>/oof_plain[_fold<k>].parquet   the same without TTA (the plain view alone)
    <run>/preds/<model>/test_fold<k>.parquet     fold model k's test probabilities
    <run>/preds/<model>/{oof,test}_views_fold<k>.parquet, oof_views.parquet   every TTA view apart (`oof.views`)
    <run>/preds/<model>/repeat<r>/{oof,test}_fold<k>.parquet   the fold tables of repeat r > 0
    <run>/preds/<model>/test_full.parquet   the full fit's test probabilities (test_full.<target>.parquet per
                                            extra target); test_views_full.parquet: its TTA views apart
    <run>/preds/<model>/metrics.json        OOF scores with and without TTA
    <run>/stack/                            decision.json, the chosen candidate, leaderboard, report, test.parquet
    <run>/logs/<stage>.log                  what each stage logged, appended (the command line's stages)
    <run>/report.html                       the run in one self-contained page (plots embedded)
    <run>/audit/label_issues.csv            likely label errors, ranked by label quality (`stacker audit`)
    <run>/audit/top_losses.csv              train rows the ensemble gets wrong, by loss
    <run>/audit/duplicates.csv              duplicates.csv's clusters, one row per image, with the models' view
    <run>/audit/audit.html                  the audit alone, one self-contained page (thumbnails embedded)
    <run>/submission.csv

`stacker predict` writes a new test set's files into its own folder OUT in the same layout
(`RunPaths(OUT)`: cache/test.*, preds/<model>/test*.parquet, stack/test.parquet,
submission.csv), plus OUT/.predict.lock while it runs; it never writes into the run.

No other module spells one of these names (a test checks it): a new file of
the run gets a property here first.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import StackerError

# Model and target names become directory names, file-name parts and feature-name prefixes.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
CACHE_SPLITS = ("train", "test")


def check_model_name(name: str, what: str = "model name") -> str:
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise StackerError(
            f"{what} {name!r} is not allowed: use letters, digits, '_', '.', '-' "
            "(it becomes part of a file name)")
    return name


def record_of(output: Path) -> Path:
    """The provenance record written beside an output that has no metadata of its own (a submission CSV)."""
    return output.with_name(f"{output.name}.provenance.json")


def table_file(path: Path) -> Path:
    """`path` (parquet) if it exists, else its `.csv` sibling (a table from another tool) if that exists."""
    csv = path.with_suffix(".csv")
    return csv if not path.is_file() and csv.is_file() else path


@dataclass(frozen=True)
class RunPaths:
    """A run's files; `repeat` r > 0 (`for_repeat`) puts one repeat's fold models and fold tables in a
    `repeat<r>` folder of each model's folders, and everything else where the run keeps it."""

    root: Path
    repeat: int = 0

    def __init__(self, root: str | os.PathLike, repeat: int = 0):
        object.__setattr__(self, "root", Path(root))
        object.__setattr__(self, "repeat", int(repeat))

    def for_repeat(self, repeat: int) -> RunPaths:
        """The paths of repeat `repeat`'s jobs (`folds.repeats`): repeat 0 is the run's own layout, so a run
        without repeats and repeat 0 of one with repeats keep the same files."""
        return RunPaths(self.root, repeat)

    def _repeat_dir(self, folder: Path) -> Path:
        return folder / f"repeat{self.repeat}" if self.repeat else folder

    # ------------------------------------------------------------ run level

    @property
    def config(self) -> Path:
        return self.root / "run.yaml"

    @property
    def config_lock(self) -> Path:
        """Held while run.yaml is read, merged and written, so two processes never lose each other's models."""
        return self.root / ".run.yaml.lock"

    @property
    def predict_lock(self) -> Path:
        """Held by `stacker predict` in its output folder, so two processes never write one OUT at once."""
        return self.root / ".predict.lock"

    def stage_log(self, stage: str) -> Path:
        """Every line a stage logged, appended run after run."""
        return self.root / "logs" / f"{stage}.log"

    @property
    def folds(self) -> Path:
        return self.root / "folds.parquet"

    @property
    def folds_csv(self) -> Path:
        """Folds brought from another tool (id, label, fold), read when folds.parquet is absent."""
        return self.root / "folds.csv"

    @property
    def duplicates(self) -> Path:
        """The near-duplicate pairs (train, train-test, test) found when the folds were made: the listing
        behind `folds.duplicates`' groups, label conflicts and train images also in test."""
        return self.root / "duplicates.csv"

    @property
    def targets(self) -> Path:
        """Extra train columns (extra targets, weight columns) by id, beside folds.parquet."""
        return self.root / "targets.parquet"

    @property
    def report(self) -> Path:
        """The run's HTML report: one self-contained page (`stacker report`, and the end of fit-stack)."""
        return self.root / "report.html"

    @property
    def submission(self) -> Path:
        return self.root / "submission.csv"

    # ------------------------------------------------------------ audit

    @property
    def audit(self) -> Path:
        """What `stacker audit` (and the report) found in the data through the models' OOF rows."""
        return self.root / "audit"

    @property
    def audit_label_issues(self) -> Path:
        """The rows flagged as likely label errors (id, label, suggested, quality...), worst first; a copy of it
        (every audit rewrites this one) is a `data.exclude` list."""
        return self.audit / "label_issues.csv"

    @property
    def audit_top_losses(self) -> Path:
        return self.audit / "top_losses.csv"

    @property
    def audit_duplicates(self) -> Path:
        """duplicates.csv's clusters one image a row (cluster, kind, id, split, label...): a view of the
        duplicate detection's file with the models' predictions, not a second detection."""
        return self.audit / "duplicates.csv"

    @property
    def audit_page(self) -> Path:
        return self.audit / "audit.html"

    @property
    def submission_record(self) -> Path:
        """Where the submission came from: the stack or model table, the decision and the sample, by digest."""
        return record_of(self.submission)

    # ------------------------------------------------------------ image cache

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    def cache_data(self, split: str) -> Path:
        """(N, H, W, 3) uint8 images of a split, raw bytes read as a memmap."""
        return self.cache / f"{_split(split)}.u8"

    def cache_lock(self, split: str) -> Path:
        """Held while a split's cache is checked and built: a second process waits, then finds it built."""
        return self.cache / f"{_split(split)}.lock"

    def cache_index(self, split: str) -> Path:
        """A split's cache index (ids, files, size, resize mode); written last, so it marks a complete cache."""
        return self.cache / f"{_split(split)}.json"

    # ------------------------------------------------------------ base models

    def model_dir(self, model: str) -> Path:
        return self._repeat_dir(self.root / "models" / check_model_name(model))

    # A job's files are named by its stem: fold k's `fold<k>.*`, the full fit's (fold None) `full.*`.

    @staticmethod
    def job_stem(fold: int | None) -> str:
        """The name every file of a job starts with: `fold<k>` for fold k, `full` for the full fit (fold None)."""
        return "full" if fold is None else f"fold{fold}"

    def weights(self, model: str, fold: int | None) -> Path:
        return self.model_dir(model) / f"{self.job_stem(fold)}.safetensors"

    def history(self, model: str, fold: int | None) -> Path:
        return self.model_dir(model) / f"{self.job_stem(fold)}.history.json"

    def history_csv(self, model: str, fold: int | None) -> Path:
        """The history's epochs as a table, rewritten after every epoch (timm's summary.csv)."""
        return self.model_dir(model) / f"{self.job_stem(fold)}.history.csv"

    def job_log(self, model: str, fold: int | None) -> Path:
        return self.model_dir(model) / f"{self.job_stem(fold)}.log"

    def checkpoint(self, model: str, fold: int | None) -> Path:
        return self.model_dir(model) / f"{self.job_stem(fold)}.checkpoint.pt"

    def job_lock(self, model: str, fold: int | None) -> Path:
        """Held by the process training a job, so two processes sharing the run never train it twice."""
        return self.model_dir(model) / f"{self.job_stem(fold)}.lock"

    # ------------------------------------------------------------ predictions

    @property
    def preds(self) -> Path:
        return self.root / "preds"

    def preds_dir(self, model: str) -> Path:
        return self._repeat_dir(self.preds / check_model_name(model))

    def oof(self, model: str, target: str | None = None) -> Path:
        return self.preds_dir(model) / f"oof{_suffix(target)}.parquet"

    def test(self, model: str, target: str | None = None) -> Path:
        return self.preds_dir(model) / f"test{_suffix(target)}.parquet"

    def oof_plain(self, model: str, target: str | None = None) -> Path:
        """The OOF table of the plain view alone (no TTA): what TTA changed, for the report."""
        return self.preds_dir(model) / f"oof_plain{_suffix(target)}.parquet"

    def oof_plain_fold(self, model: str, fold: int, target: str | None = None) -> Path:
        return self.preds_dir(model) / f"oof_plain_fold{fold}{_suffix(target)}.parquet"

    def oof_fold(self, model: str, fold: int, target: str | None = None) -> Path:
        """Fold model k's held-out rows alone: predict-oof's per-job part of the OOF table."""
        return self.preds_dir(model) / f"oof_fold{fold}{_suffix(target)}.parquet"

    def test_fold(self, model: str, fold: int, target: str | None = None) -> Path:
        return self.preds_dir(model) / f"test_fold{fold}{_suffix(target)}.parquet"

    def oof_views(self, model: str) -> Path:
        """Every TTA view of the OOF rows kept apart (`oof.views`): what a view choice under a budget is scored on."""
        return self.preds_dir(model) / "oof_views.parquet"

    def oof_views_fold(self, model: str, fold: int) -> Path:
        return self.preds_dir(model) / f"oof_views_fold{fold}.parquet"

    def test_views_fold(self, model: str, fold: int) -> Path:
        """Fold model k's test rows, every TTA view kept apart (`oof.views`)."""
        return self.preds_dir(model) / f"test_views_fold{fold}.parquet"

    def test_full(self, model: str, target: str | None = None) -> Path:
        """The full fit's test probabilities (`train-base --full`'s model), views combined."""
        return self.preds_dir(model) / f"test_full{_suffix(target)}.parquet"

    def test_views_full(self, model: str) -> Path:
        """The full fit's test rows, every TTA view kept apart (`oof.views`)."""
        return self.preds_dir(model) / "test_views_full.parquet"

    def predict_metrics(self, model: str) -> Path:
        return self.preds_dir(model) / "metrics.json"

    def predicted_models(self) -> list[str]:
        """Models with an OOF table (parquet, or CSV from another tool) under preds/, sorted by name."""
        if not self.preds.is_dir():
            return []
        return sorted(p.name for p in self.preds.iterdir()
                      if _NAME.match(p.name) and table_file(self.oof(p.name)).is_file())

    # ------------------------------------------------------------ stack

    @property
    def stack(self) -> Path:
        return self.root / "stack"

    @property
    def decision(self) -> Path:
        return self.stack / "decision.json"

    @property
    def stack_state(self) -> Path:
        """The chosen candidate's learned state (weights, coefficients) as JSON."""
        return self.stack / "combiner.json"

    @property
    def stack_booster(self) -> Path:
        """The chosen candidate's LightGBM model in text format, when it has one (repeat r > 0's meta-model:
        in stack/repeat<r>/)."""
        return self._repeat_dir(self.stack) / "combiner.lgbm.txt"

    @property
    def leaderboard(self) -> Path:
        return self.stack / "leaderboard.csv"

    @property
    def stack_report(self) -> Path:
        return self.stack / "report.txt"

    @property
    def stack_oof(self) -> Path:
        """The chosen candidate's meta-level OOF probabilities (an OOF table): what the report draws."""
        return self.stack / "oof.parquet"

    @property
    def stack_test(self) -> Path:
        """The stack's test probabilities, a contract test table: what submit writes out."""
        return self.stack / "test.parquet"


def _suffix(target: str | None) -> str:
    # The main target's tables keep the contract's plain names; extra targets sit beside them.
    return "" if target is None else f".{check_model_name(target, 'extra target name')}"


def _split(split: str) -> str:
    if split not in CACHE_SPLITS:
        raise ValueError(f"cache split {split!r} is not one of {CACHE_SPLITS}")
    return split
