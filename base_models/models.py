"""Building timm models: local pretrained weights, extra target heads, size checks, param groups.

Nothing here touches the network: pretrained weights come from a local file
through timm's own file path (`pretrained_cfg_overlay=dict(file=...)`), which
applies the architecture's checkpoint filter and drops the classifier when the
class count differs from the pretrained one.
"""
from __future__ import annotations

from pathlib import Path

import timm
import torch
from timm.data import resolve_data_config
from timm.models import load_state_dict

from oof import StackerError, preview


class TargetHeads(torch.nn.Module):
    """A timm model plus one linear head per extra target on its pre-logits features.

    forward returns a list of logits: [(B, C_main), (B, C_extra_1), ...]. The
    main head stays timm's own classifier, so pretrained heads and head dropout
    behave as in timm.
    """

    def __init__(self, model: torch.nn.Module, extra_classes: list[int]):
        super().__init__()
        self.model = model
        self.extra = torch.nn.ModuleList(torch.nn.Linear(model.num_features, c) for c in extra_classes)

    def forward(self, x):
        features = self.model.forward_head(self.model.forward_features(x), pre_logits=True)  # (B, F)
        return [self.model.get_classifier()(features), *(head(features) for head in self.extra)]


def create_model(arch: str, num_classes: int, pretrained: str | None = None, extra_classes=(),
                 model_kwargs: dict | None = None) -> torch.nn.Module:
    """A timm model with a fresh `num_classes` head (and extra target heads).

    Args:
        arch: timm architecture name (optionally with a pretrained tag).
        num_classes: classes of the main target.
        pretrained: a local weights file (safetensors or a PyTorch state dict).
        extra_classes: class count of each extra target; adds `TargetHeads`.
        model_kwargs: passed to `timm.create_model` (e.g. drop_path_rate, img_size).

    Raises:
        StackerError: unknown architecture, missing weights file, or a file whose
            tensors do not fit the architecture.
    """
    kwargs = dict(model_kwargs or {})
    model = _timm_create(arch, num_classes, kwargs)
    if pretrained is not None:
        check_pretrained_file(model, pretrained, arch)
        # source "" keeps timm's default order, in which a given file comes before any hub id
        overlay = {"file": str(pretrained), "source": ""}
        try:
            model = timm.create_model(arch, num_classes=num_classes, pretrained=True,
                                      pretrained_cfg_overlay=overlay, **kwargs)
        except Exception as e:  # checked above, so only an unusual file gets here
            raise StackerError(f"{pretrained}: does not fit {arch} ({str(e).splitlines()[0]})") from None
    return TargetHeads(model, list(extra_classes)) if extra_classes else model


def _timm_create(arch: str, num_classes: int, kwargs: dict) -> torch.nn.Module:
    try:
        return timm.create_model(arch, num_classes=num_classes, **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise StackerError(f"model arch {arch!r}: not a timm model (timm.list_models() lists them)") from None
        raise
    except TypeError as e:
        raise StackerError(f"model {arch!r}: bad model_kwargs ({e})") from None


def check_pretrained_file(model: torch.nn.Module, path, arch: str) -> None:
    """Refuse a weights file that does not hold this architecture's backbone.

    timm loads non-strictly once it drops a classifier, which would silently keep
    random weights for every key the file lacks; this check makes that an error.
    """
    path = Path(path)
    if not path.is_file():
        raise StackerError(f"{path}: pretrained weights file not found (for {arch})")
    try:
        state = load_state_dict(str(path), weights_only=True)
    except Exception as e:
        raise StackerError(f"{path}: not a readable weights file ({type(e).__name__}: {e})") from None
    classifier = {p for p in _classifier_keys(model)}
    want = {k: v.shape for k, v in model.state_dict().items() if k not in classifier}
    missing = [k for k in want if k not in state]
    wrong = [k for k in want if k in state and tuple(state[k].shape) != tuple(want[k])]
    if missing or wrong:
        detail = f"{len(missing)} tensors missing, first {preview(missing)}" if missing else \
                 f"{len(wrong)} tensors of another shape, first {preview(wrong)}"
        raise StackerError(f"{path}: does not fit {arch}: {detail}")


def _classifier_keys(model: torch.nn.Module) -> list[str]:
    head = model.get_classifier()
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for p in head.parameters()]


def head_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The new layers of a fine-tune: timm's classifier and the extra target heads."""
    if isinstance(model, TargetHeads):
        return [*model.model.get_classifier().parameters(), *model.extra.parameters()]
    return list(model.get_classifier().parameters())


def backbone_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    head = {id(p) for p in head_parameters(model)}
    return [p for p in model.parameters() if id(p) not in head]


def logits_list(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Every target's logits, main first: one code path for single- and multi-target models."""
    out = model(x)
    return out if isinstance(out, list) else [out]


def timm_model(model: torch.nn.Module) -> torch.nn.Module:
    return model.model if isinstance(model, TargetHeads) else model


def model_norm(model: torch.nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The (mean, std) the model was trained with, from its timm pretrained config."""
    cfg = resolve_data_config({}, model=timm_model(model))
    return tuple(cfg["mean"]), tuple(cfg["std"])


@torch.no_grad()
def check_sizes(model: torch.nn.Module, sizes, name: str) -> None:
    """One forward pass at each size, so a size the architecture cannot take fails before training.

    ViT and Swin models have a fixed input size (or window constraints) unless
    built for others: `model_kwargs: {img_size: 256}` or `{dynamic_img_size: true}`.
    """
    model.eval()
    for h, w in sorted(set(map(tuple, sizes))):
        try:
            logits_list(model, torch.zeros(1, 3, h, w))
        except Exception as e:
            native = timm_model(model).pretrained_cfg.get("input_size", (3, "?", "?"))[1:]
            raise StackerError(
                f"model {name}: cannot take {h}x{w} images ({str(e).splitlines()[0]}); its native size is "
                f"{native[0]}x{native[1]}. Use a size it supports, or for vit/swin set "
                "model_kwargs: {img_size: [H, W]} or {dynamic_img_size: true}") from None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise StackerError("train.device: cuda was asked for but no CUDA device is visible")
    return torch.device(name)
