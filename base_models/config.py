"""Configuration of the base models: one dataclass per concern, defaults live here only.

The CLI builds these from run.yaml (`train:`, `tta:`, `models:`) and flags;
values are checked once, in `__post_init__`, with errors naming the key.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from oof import StackerError, build_config, check_model_name

from .augment import MAX_TTA_VIEWS, AugmentConfig

TTA_COMBINE = ("lerp", "mean")
DEVICES = ("auto", "cpu", "cuda")


def as_size(value, key: str) -> tuple[int, int]:
    """An image size from YAML: 224 or [H, W]."""
    size = (value, value) if isinstance(value, int) else tuple(value)
    if len(size) != 2 or not all(isinstance(s, int) and s >= 8 for s in size):
        raise StackerError(f"{key}: an image size is an integer or [height, width] of integers >= 8, got {value!r}")
    return size


KEEP = ("last", "best")
KEEP_METRICS = ("valid_loss", "error_rate")
SAMPLING_BUILTIN = ("uniform", "class_balanced")


@dataclass
class Phase:
    """One progressive-resizing phase: its own one-cycle at its own size, same model.

    Attributes:
        size: image size of the phase, int or [H, W].
        epochs: epochs of the phase.
        lr_factor: the phase's peak learning rate is lr * lr_factor.
    """

    size: tuple[int, int]
    epochs: int
    lr_factor: float = 1.0

    def __post_init__(self):
        self.size = as_size(self.size, "train.phases[].size")
        _positive(self, "train.phases[]", ("epochs",))
        if not isinstance(self.lr_factor, (int, float)) or self.lr_factor < 0:
            raise StackerError(f"train.phases[].lr_factor: must be a number >= 0, got {self.lr_factor!r}")


@dataclass
class SamplingConfig:
    """Which training rows an epoch draws (fastai's WeightedDL).

    Attributes:
        weights: `uniform` (each row once per epoch, the default), `class_balanced`
            (a row weighs its class count ** -power), or the name of a weight
            column of the train CSV. Non-uniform epochs draw with replacement, as
            many rows as the training fold has; validation and OOF rows are never
            reweighted.
        power: p of class_balanced: 0 is uniform, 1 fully balanced.
    """

    weights: str = "uniform"
    power: float = 1.0

    def __post_init__(self):
        if not isinstance(self.weights, str) or not self.weights:
            raise StackerError(f"train.sampling.weights: uniform, class_balanced or a CSV column, got {self.weights!r}")
        if not isinstance(self.power, (int, float)) or self.power < 0:
            raise StackerError(f"train.sampling.power: must be a number >= 0, got {self.power!r}")


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
        gpu_cache_gb: the image cache lives in GPU memory when it is at most this size,
            else in pinned host memory with the next batch prefetched.
        seed: seed of weights init, sampling and augmentation; a fold's seed is seed + fold.
        device: auto (CUDA when present), cpu or cuda.
        augment: batch augmentation, see `AugmentConfig`.
    """

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
    gpu_cache_gb: float = 8.0
    seed: int = 42
    device: str = "auto"
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self):
        self.size = as_size(self.size, "train.size")
        if self.phases:
            self.phases = [p if isinstance(p, Phase) else build_config(Phase, p, f"train.phases[{i}]")
                           for i, p in enumerate(self.phases)]
            self.size, self.epochs = self.phases[-1].size, sum(p.epochs for p in self.phases)
        else:
            self.phases = None
        if self.predict_size is not None:
            self.predict_size = as_size(self.predict_size, "train.predict_size")
        if not isinstance(self.augment, AugmentConfig):
            self.augment = build_config(AugmentConfig, self.augment, "train.augment")
        if not isinstance(self.sampling, SamplingConfig):
            self.sampling = build_config(SamplingConfig, self.sampling, "train.sampling")
        if not isinstance(self.target_weights, dict):
            raise StackerError("train.target_weights: must be a mapping of target to weight, "
                               f"got {self.target_weights!r}")
        _positive(self, "train", ("epochs", "batch_size", "accum_steps", "lr", "lr_mult", "div", "div_final"))
        self._check_ranges()

    def _check_ranges(self):
        if not 0 <= self.pct_start < 1:
            raise StackerError(f"train.pct_start: must be in [0, 1), got {self.pct_start}")
        if not 0 <= self.label_smoothing < 1:
            raise StackerError(f"train.label_smoothing: must be in [0, 1), got {self.label_smoothing}")
        if not isinstance(self.freeze_epochs, int) or self.freeze_epochs < 0:
            raise StackerError(f"train.freeze_epochs: must be an integer >= 0, got {self.freeze_epochs!r}")
        if self.keep not in KEEP:
            raise StackerError(f"train.keep: {self.keep!r} is not one of {list(KEEP)}")
        if self.keep_metric not in KEEP_METRICS:
            raise StackerError(f"train.keep_metric: {self.keep_metric!r} is not one of {list(KEEP_METRICS)}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise StackerError(f"train.ema_decay: must be in (0, 1) or null, got {self.ema_decay}")
        if (self.mixup_alpha or self.cutmix_alpha) and self.batch_size % 2:
            raise StackerError(f"train.batch_size: mixup/cutmix pair images, so it must be even, got {self.batch_size}")
        if self.device not in DEVICES:
            raise StackerError(f"train.device: {self.device!r} is not one of {list(DEVICES)}")
        if self.clip_grad is not None and self.clip_grad <= 0:
            raise StackerError(f"train.clip_grad: must be a positive number or null, got {self.clip_grad}")
        if self.gpu_cache_gb < 0:
            raise StackerError(f"train.gpu_cache_gb: must be >= 0, got {self.gpu_cache_gb}")

    @property
    def schedule(self) -> list[Phase]:
        """The phases to train, one per one-cycle (a single phase without `phases`)."""
        return self.phases or [Phase(self.size, self.epochs)]

    @property
    def prediction_size(self) -> tuple[int, int]:
        return self.predict_size or self.schedule[-1].size


@dataclass
class TTAConfig:
    """Test-time augmentation; the `tta:` section.

    Attributes:
        n: augmented views besides the plain one (0 turns TTA off).
        combine: `lerp` (fastai's default: (1 - beta) * mean(augmented) + beta * plain)
            or `mean` (plain mean of all views).
        beta: weight of the plain view for `lerp`.
        batch_size: images per prediction step.
    """

    n: int = 4
    combine: str = "lerp"
    beta: float = 0.25
    batch_size: int = 128

    def __post_init__(self):
        _positive(self, "tta", ("batch_size",))
        if not isinstance(self.n, int) or not 0 <= self.n <= MAX_TTA_VIEWS:
            raise StackerError(f"tta.n: must be an integer in [0, {MAX_TTA_VIEWS}] (distinct views), got {self.n!r}")
        if self.combine not in TTA_COMBINE:
            raise StackerError(f"tta.combine: {self.combine!r} is not one of {list(TTA_COMBINE)}")
        if not 0 <= self.beta <= 1:
            raise StackerError(f"tta.beta: must be in [0, 1], got {self.beta}")


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

    name: str
    arch: str
    pretrained: str | None = None
    model_kwargs: dict = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
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
        specs.append(ModelSpec(**own, train=build_config(TrainConfig, merged, f"models[{i}]")))
    names = [s.name for s in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise StackerError(f"models: names must be unique, {dup} repeated (set `name:`)")
    return specs


def _positive(obj, section: str, names) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise StackerError(f"{section}.{name}: must be a positive number, got {value!r}")




@dataclass
class FoldsConfig:
    """The `folds:` section: stratified K-fold drawn once per run.

    Attributes:
        k: number of folds (5, as the Paddy notebooks' cross-validation).
        seed: seed of the assignment.
    """

    k: int = 5
    seed: int = 42

    def __post_init__(self):
        if not isinstance(self.k, int) or self.k < 2:
            raise StackerError(f"folds.k: must be an integer >= 2, got {self.k!r}")


__all__ = ["AugmentConfig", "FoldsConfig", "ModelSpec", "Phase", "SamplingConfig", "TTAConfig", "TrainConfig",
           "as_size", "model_specs"]
