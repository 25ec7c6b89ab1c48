"""Configuration of the base models: one dataclass per concern, defaults live here only.

The CLI builds these from run.yaml (`train:`, `tta:`, `models:`) and flags;
values are checked once, in `__post_init__`, with errors naming the key.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

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


@dataclass
class TrainConfig:
    """How one (model, fold) job trains; the `train:` section, overridable per model.

    Attributes:
        size: training image size, int or [H, W].
        epochs: epochs of one-cycle training. The last epoch is kept: early
            stopping fights a one-cycle schedule, whose best weights come at its end.
        batch_size: images per step.
        lr: peak learning rate of the one-cycle schedule (AdamW).
        weight_decay: AdamW's decoupled weight decay (fastai's default 0.01).
        pct_start: fraction of steps warming up (fastai's default 0.25).
        div: the schedule starts at lr / div; div_final: it ends at lr / div / div_final.
        seed: seed of weights init, sampling and augmentation; a fold's seed is seed + fold.
        device: auto (CUDA when present), cpu or cuda.
        augment: batch augmentation, see `AugmentConfig`.
    """

    size: tuple[int, int] = (224, 224)
    epochs: int = 12
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.01
    pct_start: float = 0.25
    div: float = 25.0
    div_final: float = 1e5
    seed: int = 42
    device: str = "auto"
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self):
        self.size = as_size(self.size, "train.size")
        if isinstance(self.augment, dict):
            self.augment = build_config(AugmentConfig, self.augment, "train.augment")
        _positive(self, "train", ("epochs", "batch_size", "lr", "div", "div_final"))
        if not 0 <= self.pct_start < 1:
            raise StackerError(f"train.pct_start: must be in [0, 1), got {self.pct_start}")
        if self.device not in DEVICES:
            raise StackerError(f"train.device: {self.device!r} is not one of {list(DEVICES)}")


@dataclass
class TTAConfig:
    """Test-time augmentation; the `tta:` section.

    Attributes:
        n: augmented views besides the plain one (0 turns TTA off).
        combine: `lerp` (fastai's default: (1 - beta) * mean(augmented) + beta * plain)
            or `mean` (plain mean of all views).
        beta: weight of the plain view for `lerp`.
        size: prediction size, default the training size.
        batch_size: images per prediction step.
    """

    n: int = 4
    combine: str = "lerp"
    beta: float = 0.25
    size: tuple[int, int] | None = None
    batch_size: int = 128

    def __post_init__(self):
        if self.size is not None:
            self.size = as_size(self.size, "tta.size")
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
        train: its training config: the `train:` section with this entry's overrides.
    """

    name: str
    arch: str
    pretrained: str | None = None
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        check_model_name(self.name)


def model_specs(entries, train: dict) -> list[ModelSpec]:
    """Build the `models:` list; keys other than name/arch/pretrained override `train:`."""
    if not entries:
        raise StackerError("models: the config lists no models")
    specs = []
    for i, entry in enumerate(entries):
        entry = {"arch": entry} if isinstance(entry, str) else dict(entry)
        if "arch" not in entry:
            raise StackerError(f"models[{i}]: needs an `arch` (a timm model name)")
        own = {k: entry.pop(k) for k in ("name", "arch", "pretrained") if k in entry}
        own.setdefault("name", own["arch"].split(".")[0])
        merged = {**train, **entry}
        if "augment" in train and "augment" in entry:
            merged["augment"] = {**train["augment"], **entry["augment"]}
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


__all__ = ["AugmentConfig", "FoldsConfig", "ModelSpec", "TTAConfig", "TrainConfig", "as_size", "model_specs", "replace"]
