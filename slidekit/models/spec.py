"""The checkpoint's self-description: what a network is and how to feed it (architecture, task,
classes and colours, patch size, input MPP, normalisation, activation, stain reference)."""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

import torch

from slidekit.annotations.objects import default_color
from slidekit.base.errors import CheckpointError, ConfigError
from slidekit.base.version import __version__
from slidekit.models.backbones import is_backbone
from slidekit.stain.normalize import StainNormalizer


class _Backbones(tuple):
    """The torchvision ResNets, and any ``timm:NAME`` (``"timm:convnext_tiny" in BACKBONES``)."""

    def __contains__(self, name: object) -> bool:
        return is_backbone(name)


# Trainers check ``backbone in BACKBONES``; listing it names the choices, "timm:NAME" included.
BACKBONES = _Backbones(("resnet18", "resnet34", "resnet50", "timm:NAME"))

ARCHS = ("resnet-classifier", "resnet-unet", "resnet-encoder")

TASKS = ("classification", "segmentation", "embedding")


@dataclass
class ModelSpec:
    """What a network is and how to feed it: everything inference needs besides weights."""

    arch: str = "resnet-classifier"
    backbone: str = "resnet18"
    task: str = "classification"  # "classification" | "segmentation" | "embedding"
    classes: list[str] = field(default_factory=lambda: ["negative", "positive"])
    colors: list[tuple[int, int, int]] = field(default_factory=list)
    patch_size: int = 224
    mpp: float = 0.5
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    activation: str = "softmax"  # "softmax" | "sigmoid" | "none"
    output_stride: int = 1  # segmentation: one output pixel per `output_stride` input pixels
    trainer: str | None = None
    trainer_config: dict = field(default_factory=dict)
    slidekit_version: str = ""
    extra: dict = field(default_factory=dict)
    # The stain normaliser the model was trained behind (``StainNormalizer.to_dict()``): inference
    # applies the same one by default. None: none (every checkpoint written before it existed).
    stain: dict | None = None

    def __post_init__(self) -> None:
        # A spec may come from a hand-edited checkpoint: every field is checked, so a bad one is a
        # one-line CheckpointError here rather than a traceback deep inside inference.
        if self.arch not in ARCHS:
            raise CheckpointError(f"unknown architecture {self.arch!r}; known: {', '.join(ARCHS)}")
        if self.backbone not in BACKBONES:
            raise CheckpointError(f"unknown backbone {self.backbone!r}; known: {', '.join(BACKBONES)}")
        if self.backbone == "timm:NAME":
            raise CheckpointError("backbone 'timm:NAME' is a placeholder: name a timm model, e.g. timm:convnext_tiny")
        if self.activation not in ("softmax", "sigmoid", "none"):
            raise CheckpointError(f"unknown activation {self.activation!r}")
        if self.task not in TASKS:
            raise CheckpointError(f"unknown task {self.task!r}; known: {', '.join(TASKS)}")
        if not isinstance(self.classes, (list, tuple)) or not all(isinstance(c, str) for c in self.classes):
            raise CheckpointError(f"spec 'classes' must be a list of class names, got {self.classes!r}")
        if len(set(self.classes)) != len(self.classes):
            raise CheckpointError(f"spec 'classes' names a class twice: {self.classes!r}")
        if self.task != "embedding" and not self.classes:
            raise CheckpointError(f"a {self.task} spec needs at least one class")
        self.classes = list(self.classes)
        _check_int(self.patch_size, "patch_size", 1, MAX_PATCH_SIZE)
        _check_int(self.output_stride, "output_stride", 1)
        if not _is_number(self.mpp) or not self.mpp >= MIN_MPP:
            raise CheckpointError(f"spec 'mpp' must be a finite number >= {MIN_MPP} (µm/px), got {self.mpp!r}")
        for key in ("mean", "std"):
            v = getattr(self, key)
            if not isinstance(v, (list, tuple)) or len(v) != 3 or not all(_is_number(x) for x in v):
                raise CheckpointError(f"spec {key!r} must be three numbers (R, G, B), got {v!r}")
        if min(self.std) <= 0:
            raise CheckpointError(f"spec 'std' must be > 0, got {self.std!r}")
        for key in ("trainer_config", "extra"):
            if not isinstance(getattr(self, key), dict):
                raise CheckpointError(f"spec {key!r} must be a mapping, got {getattr(self, key)!r}")
        if self.stain is not None:
            self.stain = _check_stain(self.stain)
        if not self.colors:
            self.colors = [default_color(c) for c in self.classes]
        if (not isinstance(self.colors, (list, tuple)) or len(self.colors) != len(self.classes)
                or not all(isinstance(c, (list, tuple)) and len(c) == 3
                           and all(_is_int(v) and 0 <= v <= 255 for v in c)
                           for c in self.colors)):
            raise CheckpointError(f"spec 'colors' must be one (R, G, B) of integers 0-255 per class, "
                                  f"got {self.colors!r}")
        self.colors = [(int(c[0]), int(c[1]), int(c[2])) for c in self.colors]  # three each, checked above
        self.mean = (float(self.mean[0]), float(self.mean[1]), float(self.mean[2]))
        self.std = (float(self.std[0]), float(self.std[1]), float(self.std[2]))
        if not self.slidekit_version:
            self.slidekit_version = __version__

    @property
    def num_outputs(self) -> int:
        """Output channels: one per class (sigmoid with one class gives one channel)."""
        return len(self.classes)

    def activate(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits -> probabilities along the channel axis (dim 1)."""
        if self.activation == "softmax":
            return logits.softmax(dim=1)
        if self.activation == "sigmoid":
            return logits.sigmoid()
        return logits

    def normalize(self, batch_uint8: torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) or (B, 3, H, W) uint8 -> normalised float (B, 3, H, W)."""
        x = batch_uint8
        if x.ndim == 4 and x.shape[-1] == 3:
            x = x.permute(0, 3, 1, 2)
        x = x.float().div_(255.0)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        """Build from a dict, ignoring keys this version does not know (CheckpointError when bad)."""
        if not isinstance(d, dict):
            raise CheckpointError(f"the model spec is a {type(d).__name__}, not a mapping")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _check_stain(d: Any) -> dict:
    """A checkpoint's stain reference, checked by rebuilding its normaliser (CheckpointError when bad)."""
    if not isinstance(d, dict):
        raise CheckpointError(f"spec 'stain' must be a stain normaliser's mapping or None, got {d!r:.80}")

    try:
        StainNormalizer.from_dict(d)
    except (CheckpointError, ConfigError, KeyError, TypeError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"spec 'stain' is not a valid stain reference ({msg[:200]})") from None
    return d


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


# Sizes past these are typos, not models: refused up front, where they would otherwise end in the
# allocator (a 100000 px crop, a 1e-6 µm/px spec that upsamples a slide a million times).
MAX_PATCH_SIZE = 8192
MIN_MPP = 0.01


def _check_int(v: Any, key: str, minimum: int, maximum: int | None = None) -> None:
    if not _is_int(v) or v < minimum or (maximum is not None and v > maximum):
        bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
        raise CheckpointError(f"spec {key!r} must be an integer {bound}, got {v!r}")
