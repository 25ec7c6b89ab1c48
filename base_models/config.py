"""Configuration of the base models: one dataclass per concern, defaults live here only.

Each dataclass is one YAML section (`data:`, `folds:`, `train:` and its nested
`augment:`/`sampling:`/`phases:`, `tta:`, an entry of `models:`). Its values are
checked once, in `__post_init__`, against its `RULES` table (`oof.check_fields`,
errors name the key); cross-field rules follow. Nothing here imports torch, so a
config is built and checked before any heavy import.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd

from oof import (BOOL, NULL, SEED, STRING, ConfigSection, Rule, StackerError, build_config, check_fields,
                 check_groups_whole, check_model_name, each, group_folds, instance, make_folds, merge_groups, number,
                 one_of, preview, read_fold_file)
from oof.folds import group_values

from .engines import ENGINES
from .images import RESIZE_MODES

TTA_COMBINE = ("lerp", "mean")
DEVICES = ("auto", "cpu", "cuda")
AMP = ("auto", "bf16", "fp16", "off")
KEEP = ("last", "best")
KEEP_METRICS = ("valid_loss", "error_rate")
DUPLICATES = ("group", "warn", "off")
SAMPLING_BUILTIN = ("uniform", "class_balanced")
# TTA crops as (side fraction, centre x, centre y): the whole image, then 85% crops at the
# centre and the corners. Every crop is a view plain and mirrored, less the plain view itself.
TTA_CROPS = ((1.0, 0, 0), (0.85, 0, 0), (0.85, -1, -1), (0.85, 1, 1), (0.85, -1, 1), (0.85, 1, -1))
MAX_TTA_VIEWS = 2 * len(TTA_CROPS) - 1

# A row id or label as YAML gives it: a string, or a number YAML read as one (ids like 100330).
ROW_ID = Rule(lambda v: (isinstance(v, str) and v.strip() != "") or (isinstance(v, int) and not isinstance(v, bool)),
              "an id (a string or an integer)")
POSITIVE = number(0, open_low=True)
NON_NEGATIVE = number(0)
FRACTION = number(0, 1, open_high=True)  # [0, 1)
COUNT = number(1, integer=True)


def _is_size(v) -> bool:
    return isinstance(v, tuple) and len(v) == 2 and all(number(8, integer=True)(s) for s in v)


SIZE = Rule(_is_size, "an integer or [height, width] of integers >= 8")


def as_size(value, key: str) -> tuple[int, int]:
    """An image size from YAML: 224 or [H, W]."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    size = tuple(value) if isinstance(value, (list, tuple)) else value
    if not _is_size(size):
        raise StackerError(f"{key}: expected {SIZE.text}, got {value!r}")
    return size


@dataclass
class AugmentConfig:
    """Train-time augmentation, fastai's `aug_transforms` defaults where they exist.

    Attributes:
        min_scale: smallest crop area fraction of RandomResizedCrop (fastai's Paddy notebooks: 0.75).
        ratio: crop aspect-ratio range relative to the image.
        flip: random horizontal flip.
        max_rotate: largest rotation in degrees (fastai: 10).
        max_zoom: largest extra zoom-in on top of the crop (fastai: 1.1).
        max_lighting: brightness and contrast change (fastai: 0.2).
    """

    SECTION: ClassVar[str] = "train.augment"
    RULES: ClassVar[dict] = {
        "min_scale": (number(0, 1, open_low=True),),
        "ratio": (Rule(lambda v: isinstance(v, tuple) and len(v) == 2 and all(POSITIVE(r) for r in v)
                       and v[0] <= v[1], "[low, high] with 0 < low <= high"),),
        "flip": (BOOL,),
        "max_rotate": (number(0, 180),),
        "max_zoom": (number(1),),
        "max_lighting": (FRACTION,),
    }

    min_scale: float = 0.75
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    max_rotate: float = 10.0
    max_zoom: float = 1.1
    max_lighting: float = 0.2

    def __post_init__(self):
        if isinstance(self.ratio, list):
            self.ratio = tuple(self.ratio)
        check_fields(self)


@dataclass
class Phase:
    """One progressive-resizing phase: its own one-cycle at its own size, same model.

    Attributes:
        size: image size of the phase, int or [H, W].
        epochs: epochs of the phase.
        lr_factor: the phase's peak learning rate is lr * lr_factor.
    """

    SECTION: ClassVar[str] = "train.phases[]"
    RULES: ClassVar[dict] = {"size": (SIZE,), "epochs": (COUNT,), "lr_factor": (NON_NEGATIVE,)}

    size: tuple[int, int]
    epochs: int
    lr_factor: float = 1.0

    def __post_init__(self):
        self.size = as_size(self.size, "train.phases[].size")
        check_fields(self)


@dataclass
class SamplingConfig(ConfigSection):
    """Which training rows an epoch draws (fastai's WeightedDL).

    Attributes:
        weights: `uniform` (each row once per epoch, the default), `class_balanced`
            (a row weighs its class count ** -power), or the name of a weight
            column of the train CSV. Non-uniform epochs draw with replacement, as
            many rows as the training fold has; validation and OOF rows are never
            reweighted.
        power: p of class_balanced: 0 is uniform, 1 fully balanced.
    """

    SECTION: ClassVar[str] = "train.sampling"
    RULES: ClassVar[dict] = {"weights": (STRING,), "power": (NON_NEGATIVE,)}

    weights: str = "uniform"
    power: float = 1.0


def _is_target_weights(v) -> bool:
    return isinstance(v, dict) and all(isinstance(k, str) and NON_NEGATIVE(w) for k, w in v.items())


@dataclass
class TrainConfig:
    """How one (model, fold) job trains; the `train:` section, overridable per model.

    With a `pretrained` file the job is a fine-tune, as fastai's `fine_tune`:
    `freeze_epochs` of the new heads alone (one-cycle, pct_start 0.99), then
    everything, the backbone at lr / lr_mult. From scratch there is nothing to
    freeze and one learning rate for all.

    Attributes:
        size: training image size, int or [H, W] (one phase of `epochs`).
        epochs: epochs of one-cycle training (one phase of `size`).
        phases: progressive resizing, e.g. [{size: 128, epochs: 6}, {size: [256, 192], epochs: 3}];
            replaces size/epochs. The same model continues through the phases, each
            with its own one-cycle.
        predict_size: size for validation-free prediction (TTA); default the last phase's
            size. Larger than the training size often helps (train/test resolution discrepancy).
        batch_size: images per step (per micro-step with accum_steps).
        accum_steps: gradient accumulation: optimizer steps every accum_steps batches.
        lr: peak learning rate (of the heads, when fine-tuning).
        lr_mult: the backbone's peak is lr / lr_mult when fine-tuning (fastai's slice(lr/100, lr)).
        freeze_epochs: epochs training only the new heads before unfreezing (fine-tune only).
        weight_decay: AdamW's decoupled weight decay (fastai's default 0.01).
        pct_start: fraction of a phase's steps warming up (fastai's default 0.25).
        div: a phase starts at lr / div; div_final: it ends at lr / div / div_final.
        label_smoothing: cross-entropy label smoothing.
        clip_grad: max gradient norm, None for no clipping.
        keep: `last` (default) or `best`. Keep the last: a one-cycle schedule's best
            weights come at its end, and picking the best epoch on the validation
            fold makes that fold's OOF predictions optimistic, which the stack then trusts.
        keep_metric: the metric `keep: best` minimises, valid_loss or error_rate.
        ema_decay: keep an exponential moving average of the weights (timm's ModelEmaV3)
            and save it instead of the raw weights; None turns it off.
        mixup_alpha, cutmix_alpha: timm's Mixup/CutMix on the main target; 0 turns off.
        sampling: see `SamplingConfig`.
        target_weights: loss weight of each extra target (default 1 each).
        compile: torch.compile the model on CUDA (ignored, with a note, on CPU).
        amp: mixed precision of training and prediction: `auto` (bf16 on CUDA cards of compute
            capability >= 8.0, fp16 with a GradScaler below, as a T4 or P100; off on CPU), `bf16`,
            `fp16` (loss scaling: overflowing steps are skipped) or `off` (float32). Part of the
            recipe: changing it makes trained weights stale; the precision it resolved to and the
            device are recorded in each job's history.
        gpu_cache_gb: GPU memory the image caches may take: `auto` (the card's free memory when a job
            starts, less `gpu_reserve_gb`) or a number of GB (refused above the free memory). Train and
            test share it, train placed first; a split that does not fit is read from the cache file
            through pinned host memory, the next batch prefetched. A job with a fraction of a GPU
            (`engine.num_gpus` < 1) gets that fraction of the card.
        gpu_reserve_gb: what `gpu_cache_gb: auto` leaves free for the model, its optimizer state and
            activations.
        seed: seed of weights init, sampling and augmentation; a fold's seed is seed + fold.
        device: auto (CUDA when present), cpu or cuda.
        augment: batch augmentation, see `AugmentConfig`.
    """

    SECTION: ClassVar[str] = "train"
    RULES: ClassVar[dict] = {
        "size": (SIZE,), "epochs": (COUNT,), "phases": (each(instance(Phase, "a phase"), "a list of phases"), NULL),
        "predict_size": (SIZE, NULL), "batch_size": (COUNT,), "accum_steps": (COUNT,), "lr": (POSITIVE,),
        "lr_mult": (POSITIVE,), "freeze_epochs": (number(0, integer=True),), "weight_decay": (NON_NEGATIVE,),
        "pct_start": (FRACTION,), "div": (POSITIVE,), "div_final": (POSITIVE,), "label_smoothing": (FRACTION,),
        "clip_grad": (POSITIVE, NULL), "keep": (one_of(*KEEP),), "keep_metric": (one_of(*KEEP_METRICS),),
        "ema_decay": (number(0, 1, open_low=True, open_high=True), NULL), "mixup_alpha": (NON_NEGATIVE,),
        "cutmix_alpha": (NON_NEGATIVE,), "sampling": (instance(SamplingConfig, "a sampling section"),),
        "target_weights": (Rule(_is_target_weights, "a mapping of extra target to a weight >= 0"),),
        "compile": (BOOL,), "gpu_cache_gb": (one_of("auto"), NON_NEGATIVE), "gpu_reserve_gb": (NON_NEGATIVE,),
        "seed": (SEED,), "device": (one_of(*DEVICES),),
        "amp": (one_of(*AMP),), "augment": (instance(AugmentConfig, "an augment section"),),
    }

    size: tuple[int, int] = (224, 224)
    epochs: int = 12
    phases: list[Phase] | None = None
    predict_size: tuple[int, int] | None = None
    batch_size: int = 64
    accum_steps: int = 1
    lr: float = 2e-3
    lr_mult: float = 100.0
    freeze_epochs: int = 1
    weight_decay: float = 0.01
    pct_start: float = 0.25
    div: float = 25.0
    div_final: float = 1e5
    label_smoothing: float = 0.0
    clip_grad: float | None = None
    keep: str = "last"
    keep_metric: str = "valid_loss"
    ema_decay: float | None = None
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    target_weights: dict[str, float] = field(default_factory=dict)
    compile: bool = False
    gpu_cache_gb: float | str = "auto"
    gpu_reserve_gb: float = 6.0
    seed: int = 42
    device: str = "auto"
    amp: str = "auto"
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self):
        self.size = as_size(self.size, "train.size")
        if self.predict_size is not None:
            self.predict_size = as_size(self.predict_size, "train.predict_size")
        self._build_sections()
        check_fields(self)
        if (self.mixup_alpha or self.cutmix_alpha) and self.batch_size % 2:
            raise StackerError(f"train.batch_size: mixup/cutmix pair images, so it must be even, got {self.batch_size}")

    def _build_sections(self):
        """Nested YAML mappings become their dataclasses; phases replace size and epochs."""
        if isinstance(self.phases, list) and self.phases:
            self.phases = [p if isinstance(p, Phase) else build_config(Phase, p, f"train.phases[{i}]")
                           for i, p in enumerate(self.phases)]
            self.size, self.epochs = self.phases[-1].size, sum(p.epochs for p in self.phases)
        elif not self.phases:
            self.phases = None
        if isinstance(self.augment, dict):
            self.augment = build_config(AugmentConfig, self.augment, "train.augment")
        if isinstance(self.sampling, dict):
            self.sampling = build_config(SamplingConfig, self.sampling, "train.sampling")

    @property
    def schedule(self) -> list[Phase]:
        """The phases to train, one per one-cycle (a single phase without `phases`)."""
        return self.phases or [Phase(self.size, self.epochs)]

    @property
    def prediction_size(self) -> tuple[int, int]:
        return self.predict_size or self.schedule[-1].size


@dataclass
class TTAConfig(ConfigSection):
    """Test-time augmentation; the `tta:` section.

    Attributes:
        n: augmented views besides the plain one (0 turns TTA off).
        combine: `lerp` (fastai's default: (1 - beta) * mean(augmented) + beta * plain)
            or `mean` (plain mean of all views).
        beta: weight of the plain view for `lerp`.
        batch_size: images per prediction step.
    """

    SECTION: ClassVar[str] = "tta"
    RULES: ClassVar[dict] = {"n": (number(0, MAX_TTA_VIEWS, integer=True),), "combine": (one_of(*TTA_COMBINE),),
                             "beta": (number(0, 1),), "batch_size": (COUNT,)}

    n: int = 4
    combine: str = "lerp"
    beta: float = 0.25
    batch_size: int = 128


@dataclass
class FoldsConfig(ConfigSection):
    """The `folds:` section: the fold assignment, drawn (or read) once per run.

    Attributes:
        k: number of folds (5, as the Paddy notebooks' cross-validation).
        seed: seed of the assignment (repeat r > 0 draws with `oof.folds.repeat_seed(seed, r)`).
        repeats: assignments drawn; the base and meta levels use each. 1 is the single
            assignment of a run without repeats, bit for bit.
        group_column: a column of the train CSV (a patient, plant or field id): stratified group
            K-fold, so a group's images never straddle folds.
        file: a fold assignment made elsewhere (CSV or parquet: id, fold[, repeat][, group]); a
            relative name is resolved when the config is built, as `data.root` is. The file decides
            the folds, so `k` and `repeats` must say what it holds (the job grid and `--only` read
            them before the file is); `seed` is unused, and with `group_column` the file's folds are
            checked to keep every group whole.
        duplicates: near-duplicate train images (`base_models.duplicates`, found in the decoded
            cache when the folds are first made). `group` (the default): each cluster becomes a group,
            joined with `group_column`'s (rows sharing either are one group, transitively), so no
            copy of an image is OOF for a model that trained on another; with `file`, a file that
            splits a cluster is refused (`warn` accepts it as it is). `warn`: list them
            (`RunPaths.duplicates`) and say how many clusters the folds split, folds as without.
            `off`: do not look. Folds without a cluster and without `group_column` are the plain
            stratified ones. An existing folds.parquet is never regrouped (its recorded groups stand
            for the clusters), and a run saved before this key existed reads as `off`.
        duplicate_distance: the finder's max Hamming distance between two images' hashes; null
            is its default (`DuplicateOptions.max_distance`).
    """

    SECTION: ClassVar[str] = "folds"
    RULES: ClassVar[dict] = {"k": (number(2, integer=True),), "seed": (SEED,),
                             "repeats": (number(1, integer=True),), "group_column": (STRING, NULL),
                             "file": (STRING, NULL), "duplicates": (one_of(*DUPLICATES),),
                             "duplicate_distance": (number(0, integer=True), NULL)}

    k: int = 5
    seed: int = 42
    repeats: int = 1
    group_column: str | None = None
    file: str | None = None
    duplicates: str = "group"
    duplicate_distance: int | None = None

    def __post_init__(self):
        check_fields(self)
        if self.file is not None:
            self.file = str(Path(self.file).resolve())

    def assign(self, train: pd.DataFrame, classes, clusters: np.ndarray | None = None):
        """The run's fold assignment (`oof.Folds`, carrying the groups it kept whole) for a train table.

        Args:
            train: `id`, `label` and the train CSV's other columns.
            classes: the class order.
            clusters: (N,) int64 near-duplicate cluster of each train row (-1: none), from
                `base_models.duplicates.find_duplicates`; used with `duplicates: group` only.

        Raises:
            StackerError: the maker's or the file's one-line error, a file whose K or number of
                repeats differs from `k` and `repeats`, or a file that splits a cluster.
        """
        clusters = None if clusters is None or self.duplicates != "group" else np.asarray(clusters, dtype=np.int64)
        if clusters is not None and clusters.shape != (len(train),):
            raise StackerError(f"folds.duplicates: {clusters.shape} clusters for {len(train)} train rows")
        column = None if self.group_column is None else group_values(train, self.group_column)
        if self.file is not None:
            return self._from_file(train, classes, column, clusters)
        groups = merge_groups(train["id"], column, clusters)
        if groups is None:
            return make_folds(train["id"], train["label"], self.k, self.seed, classes, self.repeats)
        rows = pd.DataFrame({"id": train["id"], "label": train["label"], "group": groups})
        return group_folds(rows, self.k, self.seed, classes, self.repeats, self._groups_source(clusters))

    def remade(self, train: pd.DataFrame, classes, groups: np.ndarray | None):
        """The assignment an existing folds file holding `groups` ((N,) train order, None for none) must be.

        Clusters are found once, when the folds are first made: the file's groups stand for them, so a
        rerun never regroups. Without recorded groups (or with `file`) this is `assign` without clusters.
        """
        if groups is None or self.file is not None:
            return self.assign(train, classes)
        column = None if self.group_column is None else group_values(train, self.group_column)
        rows = pd.DataFrame({"id": train["id"], "label": train["label"],
                             "group": merge_groups(train["id"], groups, column)})
        return group_folds(rows, self.k, self.seed, classes, self.repeats, "folds")

    def _from_file(self, train: pd.DataFrame, classes, column, clusters):
        folds = read_fold_file(self.file, train["id"], train["label"], classes)
        if (folds.k, folds.repeats) != (self.k, self.repeats):
            raise StackerError(f"folds.file: {self.file} holds k={folds.k} folds in {folds.repeats} repeat(s), but "
                               f"folds.k is {self.k} and folds.repeats {self.repeats}; set them to the file's")
        source = f"folds.file: {self.file}"
        if column is not None:
            check_groups_whole(folds, column, source)
        split = [] if clusters is None else split_clusters(folds, clusters)
        if len(split):
            rows = np.flatnonzero(clusters == split[0])
            raise StackerError(f"{source}: splits {len(split)} near-duplicate cluster(s) over folds, first the images "
                               f"{preview(train['id'].to_numpy()[rows])}; set folds.duplicates: warn to accept the "
                               "file as it is")
        groups = merge_groups(train["id"], folds.groups, column, clusters)
        return folds if groups is None else folds.with_groups(groups, source)

    def _groups_source(self, clusters) -> str:
        """What grouped folds are grouped by, the start of the maker's errors."""
        column = None if self.group_column is None else f"folds.group_column {self.group_column!r}"
        if clusters is None or not (clusters >= 0).any():
            return column
        return "folds.duplicates" if column is None else f"{column} joined with folds.duplicates"


def split_clusters(folds, clusters: np.ndarray) -> np.ndarray:
    """Cluster numbers (sorted) whose rows sit in more than one fold of any repeat of `folds` (`oof.Folds`).

    Args:
        folds: the assignment.
        clusters: (N,) int64 cluster of each row in `folds.ids` order, -1 for none.
    """
    clusters = np.asarray(clusters, dtype=np.int64)
    member = clusters >= 0
    split = set()
    for fold in folds.fold_matrix:
        spread = pd.Series(fold[member]).groupby(clusters[member]).nunique()
        split |= {int(c) for c in spread.index[spread > 1]}
    return np.array(sorted(split), dtype=np.int64)


@dataclass
class EngineConfig(ConfigSection):
    """The `engine:` section: where train-base's (model, fold) jobs run.

    Attributes:
        name: a name of the engine registry (`base_models.engines.ENGINES`): `local` (one worker
            process per visible GPU, or `--parallel` on CPU, fed from one shared queue) or `ray` (one
            Ray task per job, on a Ray cluster), or an engine registered there.
        address: the Ray cluster to join; None reads RAY_ADDRESS, or starts a local cluster.
        num_gpus: GPUs per Ray job (a fraction shares a card, and the job's image cache takes that
            share of the card's budget); None is 1 where the cluster has GPUs, else 0. A local cluster
            stacker starts has CPUs for a job on every GPU slot.
        num_cpus: CPUs per Ray job.
        max_retries: times Ray reruns a job whose worker died (a killed or lost node); a job that
            raises is never rerun. A rerun job resumes from its last epoch checkpoint.
    """

    SECTION: ClassVar[str] = "engine"
    RULES: ClassVar[dict] = {"name": (STRING,), "address": (STRING, NULL),
                             "num_gpus": (NON_NEGATIVE, NULL), "num_cpus": (POSITIVE,),
                             "max_retries": (number(0, integer=True),)}

    name: str = "local"
    address: str | None = None
    num_gpus: float | None = None
    num_cpus: float = 1
    max_retries: int = 2

    def __post_init__(self):
        registered = one_of(*ENGINES)  # read at each check: an engine registered after import counts
        if not registered(self.name):
            raise StackerError(f"{self.SECTION}.name: expected {registered.text}, got {self.name!r}")
        check_fields(self)


def engine_config(cfg: dict) -> EngineConfig:
    """The `engine:` section of a raw config (`oof.load_config`), built and checked."""
    return build_config(EngineConfig, cfg.get("engine"), "engine")


@dataclass
class DataConfig:
    """The `data:` section of run.yaml.

    Attributes:
        root: dataset folder; relative names below are under it.
        train_dir: train image folder (label sub-folders in the folder layout).
        test_dir: test image folder.
        train_csv: CSV of train rows; when set the CSV layout is used.
        id_column: id column of train_csv (default: its first column).
        label_column: label column of train_csv.
        path_column: column of image paths relative to train_dir, if the ids are not file names.
        extra_targets: further label columns, trained as extra heads (Paddy's `variety`).
        sample_submission: Kaggle's sample submission; gives test ids and order.
        resize: how images become the cache size: squish, crop or pad (fastai's names).
        check_all_images: decode every image before failing, and list all bad files.
        decode_workers: processes decoding the cache (0: all cores).
        exclude: train ids to leave out of training (an audit's label issues, a bad image): a list of
            ids, or the path of a CSV with an `id` column (other columns ignored, so a copy of
            `audit/label_issues.csv` reads as it is) or of a text file of one id per line (blank lines ignored). A relative path is
            resolved when the config is built, as `folds.file` is. The folds are made from every row first
            and the excluded rows dropped after (`oof.edits`), so every other row keeps its fold and a
            model that never trained on an excluded row stays current; the image cache keeps every row.
        relabel: new labels of train rows: the path of a CSV with `id` and `label` (the new label; other
            columns ignored) or a mapping {id: label}. The label must be a class of the dataset; the row
            keeps its fold, and the models that trained on it turn stale. An id is excluded or relabelled,
            never both.
    """

    SECTION: ClassVar[str] = "data"
    RULES: ClassVar[dict] = {
        "root": (STRING,), "train_dir": (STRING,), "test_dir": (STRING,), "train_csv": (STRING, NULL),
        "id_column": (STRING, NULL), "label_column": (STRING,), "path_column": (STRING, NULL),
        "extra_targets": (each(STRING, "a list of column names"),), "sample_submission": (STRING, NULL),
        "resize": (one_of(*RESIZE_MODES),), "check_all_images": (BOOL,),
        "decode_workers": (number(0, integer=True),),
        "exclude": (each(ROW_ID, "a list of ids"), STRING, NULL),
        "relabel": (Rule(lambda v: isinstance(v, dict) and all(ROW_ID(i) and ROW_ID(y) for i, y in v.items()),
                         "a mapping {id: label}"), STRING, NULL),
    }

    root: str = "."
    train_dir: str = "train_images"
    test_dir: str = "test_images"
    train_csv: str | None = None
    id_column: str | None = None
    label_column: str = "label"
    path_column: str | None = None
    extra_targets: list[str] = field(default_factory=list)
    sample_submission: str | None = "sample_submission.csv"
    resize: str = "squish"
    check_all_images: bool = False
    decode_workers: int = 0
    exclude: list[str] | str | None = None
    relabel: dict[str, str] | str | None = None

    def __post_init__(self):
        check_fields(self)
        self.extra_targets = list(self.extra_targets)
        if isinstance(self.exclude, str):
            self.exclude = str(Path(self.exclude).resolve())
        elif self.exclude is not None:
            self.exclude = [str(i) for i in self.exclude]
        if isinstance(self.relabel, str):
            self.relabel = str(Path(self.relabel).resolve())
        elif self.relabel is not None:
            self.relabel = {str(i): str(y) for i, y in self.relabel.items()}
        for name in self.extra_targets:  # each names files (oof.<target>.parquet)
            check_model_name(name, "data.extra_targets: target name")
        if self.extra_targets and not self.train_csv:
            raise StackerError("data.extra_targets: extra targets are columns of a train CSV; set data.train_csv")

    def path(self, name: str | None) -> Path | None:
        return None if name is None else Path(self.root) / name


@dataclass
class ModelSpec:
    """One base model of the run: an entry of `models:`.

    Attributes:
        name: the model's name in the run (folder and feature prefix).
        arch: any timm architecture name.
        pretrained: local weights file (never downloaded); None trains from scratch.
        model_kwargs: passed to timm.create_model (drop_path_rate, img_size, dynamic_img_size...).
        train: its training config: the `train:` section with this entry's overrides.
    """

    SECTION: ClassVar[str] = "models[]"
    RULES: ClassVar[dict] = {"name": (STRING,), "arch": (STRING,), "pretrained": (STRING, NULL),
                             "model_kwargs": (instance(dict, "a mapping"),),
                             "train": (instance(TrainConfig, "a train section"),)}

    name: str
    arch: str
    pretrained: str | None = None
    model_kwargs: dict = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        check_fields(self)
        check_model_name(self.name)


def model_specs(entries, train: dict) -> list[ModelSpec]:
    """Build the `models:` list; keys other than name/arch/pretrained/model_kwargs override `train:`."""
    if not entries:
        raise StackerError("models: the config lists no models")
    if not isinstance(entries, list):
        raise StackerError(f"models: must be a list of model entries, got {entries!r}")
    if not isinstance(train, dict):
        raise StackerError(f"train: must be a mapping of keys to values, got {train!r}")
    specs = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, (str, dict)):
            raise StackerError(f"models[{i}]: a timm name or a mapping with `arch`, got {entry!r}")
        entry = {"arch": entry} if isinstance(entry, str) else dict(entry)
        if not isinstance(entry.get("arch"), str):
            raise StackerError(f"models[{i}]: needs an `arch` (a timm model name)")
        if not isinstance(entry.get("model_kwargs", {}), dict):
            raise StackerError(f"models[{i}].model_kwargs: must be a mapping, got {entry['model_kwargs']!r}")
        own = {k: entry.pop(k) for k in ("name", "arch", "pretrained", "model_kwargs") if k in entry}
        own.setdefault("name", own["arch"].split(".")[0])
        merged = {**train, **entry}
        for nested in ("augment", "sampling"):
            if nested in train and nested in entry:
                merged[nested] = {**train[nested], **entry[nested]}
        try:
            specs.append(ModelSpec(**own, train=build_config(TrainConfig, merged, f"models[{i}]")))
        except StackerError as e:  # name the model whose keys broke the rule
            raise StackerError(f"models[{i}] ({own['name']}): {e}" if not str(e).startswith("models[") else str(e)) \
                from None
    names = [s.name for s in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise StackerError(f"models: names must be unique, {dup} repeated (set `name:`)")
    return specs


def base_configs(cfg: dict) -> tuple[DataConfig, FoldsConfig, list[ModelSpec], TTAConfig]:
    """The data, folds, models and tta sections of a raw config (`oof.load_config`), built and checked."""
    data = _section(cfg, "data")
    if isinstance(data.get("root"), str):
        data["root"] = str(Path(data["root"]).resolve())
    data = build_config(DataConfig, data, "data")
    specs = model_specs(cfg.get("models"), _section(cfg, "train"))
    for spec in specs:
        unknown = sorted(set(spec.train.target_weights) - set(data.extra_targets))
        if unknown:
            raise StackerError(f"{spec.name}: train.target_weights names {unknown}, which are not "
                               f"data.extra_targets {data.extra_targets}")
    return (data, build_config(FoldsConfig, cfg.get("folds"), "folds"), specs,
            build_config(TTAConfig, cfg.get("tta"), "tta"))


def resolved_sections(data: DataConfig, folds: FoldsConfig, specs: list[ModelSpec], tta: TTAConfig) -> dict:
    """The base-model sections as plain YAML values, for run.yaml (each model with its full train keys)."""
    models = [{"name": s.name, "arch": s.arch, "pretrained": s.pretrained, "model_kwargs": s.model_kwargs,
               **asdict(s.train)} for s in specs]
    return {"data": asdict(data), "folds": asdict(folds), "models": models, "tta": asdict(tta)}


def _section(cfg: dict, name: str) -> dict:
    value = cfg.get(name) or {}
    if not isinstance(value, dict):
        raise StackerError(f"{name}: must be a mapping of keys to values, got {value!r}")
    return dict(value)


def sample_submission_path(cfg: dict) -> Path:
    """The sample submission a raw config's `data:` section names (submit's default)."""
    data = build_config(DataConfig, _section(cfg, "data"), "data")
    if "root" not in _section(cfg, "data") or data.sample_submission is None:
        raise StackerError("submit: pass --sample-submission (the run's config names no dataset "
                           "or no data.sample_submission)")
    return data.path(data.sample_submission)
