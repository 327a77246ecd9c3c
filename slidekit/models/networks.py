"""Networks: the patch classifier and the U-Net segmenters on any backbone, built from a ``ModelSpec``.

Every network has an ``.encoder`` (a torchvision ResNet without its classifier, same parameter
names everywhere, or a timm model), so an encoder trained by one trainer initialises another
(``slidekit.models.checkpoint.transfer_encoder``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from slidekit.models.backbones import ResNetEncoder, is_timm, make_encoder
from slidekit.models.spec import ModelSpec


class ResNetClassifier(nn.Module):
    """Patch classifier: encoder (a ResNet, or any ``timm:NAME``), global average pooling, linear head."""

    def __init__(self, backbone: str = "resnet18", num_outputs: int = 2) -> None:
        super().__init__()

        self.encoder = make_encoder(backbone)
        self.head = nn.Linear(self.encoder.out_features, num_outputs) if num_outputs else nn.Identity()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled pre-classifier features (B, C)."""
        return F.adaptive_avg_pool2d(self.encoder(x)[-1], 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class _UpBlock(nn.Module):
    def __init__(self, in_ch: int, skip_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(in_ch + skip_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True),
            nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        size = skip.shape[-2:] if skip is not None else (x.shape[-2] * 2, x.shape[-1] * 2)
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.conv(x)


class ResNetUNet(nn.Module):
    """U-Net style segmenter: ResNet encoder, decoder with skip connections, logits at input size."""

    def __init__(self, backbone: str = "resnet18", num_outputs: int = 2,
                 decoder_channels: tuple[int, ...] = (256, 128, 64, 32, 16)) -> None:
        super().__init__()
        self.encoder = ResNetEncoder(backbone)
        ch = self.encoder.channels  # strides 2, 4, 8, 16, 32
        d = decoder_channels
        self.up4 = _UpBlock(ch[4], ch[3], d[0])
        self.up3 = _UpBlock(d[0], ch[2], d[1])
        self.up2 = _UpBlock(d[1], ch[1], d[2])
        self.up1 = _UpBlock(d[2], ch[0], d[3])
        self.up0 = _UpBlock(d[3], 0, d[4])
        self.head = nn.Conv2d(d[4], num_outputs, 1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled encoder features (B, C), as for the classifier."""
        return F.adaptive_avg_pool2d(self.encoder(x)[-1], 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s2, s4, s8, s16, s32 = self.encoder(x)
        y = self.up4(s32, s16)
        y = self.up3(y, s8)
        y = self.up2(y, s4)
        y = self.up1(y, s2)
        y = self.up0(y, None)
        if y.shape[-2:] != x.shape[-2:]:
            y = F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.head(y)


class PyramidUNet(nn.Module):
    """U-Net decoder over any encoder's feature pyramid (timm CNN stages, or a ViT's one token grid).

    Skip connections join each finer stage; below the finest stage plain 2x upsampling blocks
    reach the input size (for a ViT that is the whole decoder: a simple upsampling head).
    """

    def __init__(self, backbone: str, num_outputs: int = 2,
                 decoder_channels: tuple[int, ...] = (256, 128, 64, 32, 16)) -> None:
        super().__init__()

        self.encoder = make_encoder(backbone)
        ch, red = list(self.encoder.channels), list(self.encoder.reductions)
        n_plain = max(int(round(math.log2(red[0]))), 0)  # 2x steps from the finest stage to stride 1
        widths = list(decoder_channels) + [decoder_channels[-1]] * (len(ch) - 1 + n_plain)
        blocks, prev = [], ch[-1]
        for i, skip in enumerate(reversed(ch[:-1])):
            blocks.append(_UpBlock(prev, skip, widths[i]))
            prev = widths[i]
        for j in range(n_plain):
            w = widths[len(ch) - 1 + j]
            blocks.append(_UpBlock(prev, 0, w))
            prev = w
        self.n_skips = len(ch) - 1
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Conv2d(prev, num_outputs, 1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled encoder features (B, C), as for the classifier."""
        return F.adaptive_avg_pool2d(self.encoder(x)[-1], 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.encoder(x)
        y = feats[-1]
        skips = list(reversed(feats[:-1]))
        for i, block in enumerate(self.blocks):
            y = block(y, skips[i] if i < self.n_skips else None)
        if y.shape[-2:] != x.shape[-2:]:
            y = F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.head(y)


def build_model(spec: ModelSpec) -> nn.Module:
    """A freshly initialised network for ``spec`` (no pretrained weights are ever downloaded).

    The architecture names are historical: ``resnet-*`` heads sit on any backbone (``timm:NAME``
    included); a U-Net on a timm backbone is a ``PyramidUNet``.
    """
    if spec.arch == "resnet-classifier":
        return ResNetClassifier(spec.backbone, spec.num_outputs)
    if spec.arch == "resnet-unet":
        if is_timm(spec.backbone):
            return PyramidUNet(spec.backbone, spec.num_outputs)
        return ResNetUNet(spec.backbone, spec.num_outputs)
    return ResNetClassifier(spec.backbone, 0)  # "resnet-encoder": features only
