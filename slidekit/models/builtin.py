"""Built-in models that need no training: tissue probability and haematoxylin density.

They are ordinary torch modules with a spec shaped like a checkpoint's ``ModelSpec``, so the
Predictor runs them through the same batched DataLoader path as trained networks (and on the
GPU when one is used). Input is RGB in [0, 1] (mean 0, std 1), output is one map per tile at
``output_stride``.

- ``hematoxylin`` (the default of ``slidekit heatmap``): haematoxylin optical density by colour
  deconvolution with scikit-image's ``hed_from_rgb`` matrix, exactly ``skimage.color.rgb2hed``'s
  H channel, scaled by 10 and clipped to [0, 1] so that 0.5 marks nuclear-dense tissue.
- ``tissue``: a soft version of slidekit's tissue rule (coloured and absorbing, or strongly
  absorbing) per pixel: a probability in [0, 1].
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from slidekit.base.errors import CheckpointError


@dataclass
class BuiltinSpec:
    """The same fields the Predictor reads from a checkpoint's ModelSpec."""

    name: str
    classes: list[str]
    colors: list[tuple[int, int, int]]
    task: str = "segmentation"
    patch_size: int = 256
    mpp: float = 0.5
    output_stride: int = 8
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    activation: str = "none"
    arch: str = "builtin"
    extra: dict = field(default_factory=dict)

    def activate(self, logits: torch.Tensor) -> torch.Tensor:
        """Built-ins output values directly."""
        return logits

    def normalize(self, batch_uint8: torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) uint8 -> (B, 3, H, W) float in [0, 1]."""
        x = batch_uint8.permute(0, 3, 1, 2) if batch_uint8.shape[-1] == 3 else batch_uint8
        return x.float().div_(255.0)


class Hematoxylin(nn.Module):
    """H channel of ``skimage.color.rgb2hed`` (x10, clipped to [0, 1]), average-pooled by ``stride``."""

    def __init__(self, stride: int = 8, scale: float = 10.0) -> None:
        super().__init__()
        from skimage.color import hed_from_rgb

        self.stride, self.scale = stride, scale
        self.register_buffer("h_from_rgb", torch.tensor(np.asarray(hed_from_rgb)[:, 0], dtype=torch.float32))

    def density(self, x: torch.Tensor) -> torch.Tensor:
        """Unscaled H optical density (B, 1, H, W) of RGB in [0, 1], as rgb2hed computes it."""
        od = torch.log(x.clamp_min(1e-6)) / float(np.log(1e-6))
        h = torch.einsum("bchw,c->bhw", od, self.h_from_rgb.to(od.dtype))
        return h.clamp_min(0).unsqueeze(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = (self.density(x.float()) * self.scale).clamp_(0, 1)
        return F.avg_pool2d(y, self.stride) if self.stride > 1 else y


class Tissue(nn.Module):
    """Soft per-pixel tissue probability: (saturated and absorbing) or strongly absorbing."""

    def __init__(self, stride: int = 8) -> None:
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        mx, mn = x.amax(dim=1, keepdim=True), x.amin(dim=1, keepdim=True)
        sat = (mx - mn) / mx.clamp_min(1e-3)
        od = -torch.log10(x.clamp_min(1 / 255)).mean(dim=1, keepdim=True)
        # Glass scans near (244, 244, 244): saturation ~0, optical density ~0.02.
        coloured = torch.sigmoid((sat - 0.05) / 0.015) * torch.sigmoid((od - 0.035) / 0.008)
        dark = torch.sigmoid((od - 0.2) / 0.03)
        y = torch.maximum(coloured, dark)
        return F.avg_pool2d(y, self.stride) if self.stride > 1 else y


BUILTINS: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {
    "hematoxylin": (Hematoxylin, dict(classes=["Hematoxylin"], colors=[(64, 64, 200)], mpp=0.5)),
    "tissue": (Tissue, dict(classes=["Tissue"], colors=[(80, 200, 120)], mpp=2.0)),
}
DEFAULT_MODEL = "hematoxylin"


def builtin_model(name: str, stride: int = 8, patch_size: int = 256) -> tuple[nn.Module, BuiltinSpec]:
    """A built-in model and its spec by name (``hematoxylin`` or ``tissue``)."""
    if name not in BUILTINS:
        raise CheckpointError(f"unknown built-in model {name!r}; built-ins: {', '.join(BUILTINS)}")
    cls, kw = BUILTINS[name]
    spec = BuiltinSpec(name=name, patch_size=patch_size, output_stride=stride, **kw)
    return cls(stride=stride).eval(), spec
