"""Backbones: the torchvision ResNets and any timm model by name, built with random weights (nothing
is ever downloaded), each returning a feature pyramid (finest first) and its pooled width."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from slidekit.base.errors import ConfigError

TIMM_PREFIX = "timm:"

TORCHVISION_RESNETS = ("resnet18", "resnet34", "resnet50")


def is_timm(backbone: str) -> bool:
    """Whether ``backbone`` names a timm model (``timm:NAME``)."""
    return isinstance(backbone, str) and backbone.startswith(TIMM_PREFIX) and len(backbone) > len(TIMM_PREFIX)


def is_backbone(backbone: Any) -> bool:
    """Whether ``backbone`` is a name slidekit can build (torchvision ResNet or ``timm:NAME``)."""
    return backbone in TORCHVISION_RESNETS or is_timm(backbone)


class TimmEncoder(nn.Module):
    """A timm model without its classifier, returning its feature pyramid (finest first)."""

    def __init__(self, backbone: str) -> None:
        super().__init__()
        if not is_timm(backbone):
            raise ConfigError(f"not a timm backbone name (expected timm:NAME): {backbone!r}")
        self.backbone, self.name = backbone, backbone[len(TIMM_PREFIX):]
        self.model = _create_timm(self.name)
        info = list(self.model.feature_info)
        reductions = [int(f["reduction"]) for f in info]
        if len(set(reductions)) == 1:  # a ViT: every block at the patch stride; use the last one
            self.indices = [len(info) - 1]
        else:  # a CNN: the last entry of each stride
            self.indices = [i for i, r in enumerate(reductions) if i == len(info) - 1 or reductions[i + 1] != r]
        self.channels = [int(info[i]["num_chs"]) for i in self.indices]
        self.reductions = [reductions[i] for i in self.indices]

    @property
    def out_features(self) -> int:
        """Width of the pooled feature vector."""
        return self.channels[-1]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps (B, C, H/r, W/r), one per entry of ``self.reductions``."""
        return list(self.model.forward_intermediates(x, indices=self.indices, intermediates_only=True))


def _create_timm(name: str) -> Any:  # a timm model: feature_info, forward_intermediates
    import timm

    if not timm.is_model(name):
        raise ConfigError(f"unknown timm model {name!r} (see timm.list_models())")
    try:  # ViTs accept any multiple of the patch size only with dynamic_img_size
        return timm.create_model(name, pretrained=False, num_classes=0, dynamic_img_size=True)
    except TypeError as e:
        if "dynamic_img_size" not in str(e):
            raise
        return timm.create_model(name, pretrained=False, num_classes=0)


def make_encoder(backbone: str) -> TimmEncoder | ResNetEncoder:
    """A randomly initialised encoder for a backbone name (``resnet*`` or ``timm:NAME``)."""
    if is_timm(backbone):
        return TimmEncoder(backbone)
    if backbone not in TORCHVISION_RESNETS:
        raise ConfigError(f"unknown backbone {backbone!r}; known: {', '.join(TORCHVISION_RESNETS)}, timm:NAME")

    return ResNetEncoder(backbone)


class ResNetEncoder(nn.Module):
    """A torchvision ResNet without avgpool/fc; returns the feature maps of every stage."""

    def __init__(self, backbone: str = "resnet18") -> None:
        super().__init__()
        import torchvision

        net = getattr(torchvision.models, backbone)(weights=None)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        expansion = 4 if backbone == "resnet50" else 1
        self.backbone = backbone
        self.channels = [64, 64 * expansion, 128 * expansion, 256 * expansion, 512 * expansion]
        self.reductions = [2, 4, 8, 16, 32]

    @property
    def out_features(self) -> int:
        """Width of the pooled feature vector."""
        return self.channels[-1]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps at strides 2, 4, 8, 16, 32."""
        s2 = self.relu(self.bn1(self.conv1(x)))
        s4 = self.layer1(self.maxpool(s2))
        s8 = self.layer2(s4)
        s16 = self.layer3(s8)
        s32 = self.layer4(s16)
        return [s2, s4, s8, s16, s32]
