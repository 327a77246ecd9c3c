"""Networks on torchvision backbones and the self-describing checkpoint format.

A checkpoint holds the weights and a ``ModelSpec``: architecture, task, classes and colours,
patch size, input MPP, normalisation, activation, output stride, trainer name and config, and
the slidekit version. ``slidekit heatmap --model CKPT`` needs nothing else.

Every network has an ``.encoder`` (a torchvision ResNet without its classifier, same parameter
names everywhere), so an encoder trained by one trainer initialises another
(``transfer_encoder``).
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slidekit.errors import CheckpointError
from slidekit.io import atomic_path

CHECKPOINT_FORMAT = "slidekit.checkpoint"
CHECKPOINT_VERSION = 1


class _Backbones(tuple):
    """The torchvision ResNets, and any ``timm:NAME`` (``"timm:convnext_tiny" in BACKBONES``)."""

    def __contains__(self, name: object) -> bool:
        from slidekit.encoders import is_backbone

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
        _check_int(self.patch_size, "patch_size", 1)
        _check_int(self.output_stride, "output_stride", 1)
        if not _is_number(self.mpp) or not self.mpp > 0:
            raise CheckpointError(f"spec 'mpp' must be a finite number > 0, got {self.mpp!r}")
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
            from slidekit.annotations import default_color

            self.colors = [default_color(c) for c in self.classes]
        if (not isinstance(self.colors, (list, tuple)) or len(self.colors) != len(self.classes)
                or not all(isinstance(c, (list, tuple)) and len(c) == 3
                           and all(_is_int(v) and 0 <= v <= 255 for v in c)
                           for c in self.colors)):
            raise CheckpointError(f"spec 'colors' must be one (R, G, B) of integers 0-255 per class, "
                                  f"got {self.colors!r}")
        self.colors = [tuple(int(v) for v in c) for c in self.colors]
        self.mean, self.std = tuple(float(v) for v in self.mean), tuple(float(v) for v in self.std)
        if not self.slidekit_version:
            from slidekit import __version__

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
    from slidekit.errors import ConfigError

    if not isinstance(d, dict):
        raise CheckpointError(f"spec 'stain' must be a stain normaliser's mapping or None, got {d!r:.80}")
    from slidekit.stain import StainNormalizer

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


def _check_int(v: Any, key: str, minimum: int) -> None:
    if not _is_int(v) or v < minimum:
        raise CheckpointError(f"spec {key!r} must be an integer >= {minimum}, got {v!r}")


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


class ResNetClassifier(nn.Module):
    """Patch classifier: encoder (a ResNet, or any ``timm:NAME``), global average pooling, linear head."""

    def __init__(self, backbone: str = "resnet18", num_outputs: int = 2) -> None:
        super().__init__()
        from slidekit.encoders import make_encoder

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
        from slidekit.encoders import make_encoder

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
    from slidekit.encoders import is_timm

    if spec.arch == "resnet-classifier":
        return ResNetClassifier(spec.backbone, spec.num_outputs)
    if spec.arch == "resnet-unet":
        if is_timm(spec.backbone):
            return PyramidUNet(spec.backbone, spec.num_outputs)
        return ResNetUNet(spec.backbone, spec.num_outputs)
    return ResNetClassifier(spec.backbone, 0)  # "resnet-encoder": features only


@dataclass
class Checkpoint:
    """A loaded checkpoint: the spec, the network (eval mode) and any trainer extras."""

    spec: ModelSpec
    model: nn.Module
    extra: dict
    path: Path | None = None


def save_checkpoint(path: str | os.PathLike, model: nn.Module, spec: ModelSpec,
                    extra: dict[str, Any] | None = None) -> Path:
    """Write weights + spec atomically; ``extra`` holds trainer-specific, torch-serialisable data."""
    path = Path(path)
    payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "spec": asdict(spec),
               "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
               "extra": extra or {}}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """The raw checkpoint dict after format and version checks (CheckpointError otherwise)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError("checkpoint file not found", path)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # pickle/zip errors of every kind
        raise CheckpointError(f"not a readable checkpoint ({type(e).__name__}: {str(e)[:200]})", path) from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError("not a slidekit checkpoint (no slidekit format marker)", path)
    if payload.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"checkpoint format version {payload.get('version')} is not supported "
                              f"by this slidekit (reads version {CHECKPOINT_VERSION})", path)
    return payload


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Load a slidekit checkpoint: rebuild the network from its spec and load the weights."""
    payload = read_checkpoint(path, map_location)
    try:
        spec = ModelSpec.from_dict(payload["spec"])
        model = build_model(spec)
        model.load_state_dict(payload["state_dict"])
    except CheckpointError as e:
        raise CheckpointError(str(e), path) from None
    except TypeError as e:  # e.g. a spec field hand-edited to a list where a number belongs
        raise CheckpointError(f"malformed model spec or weights ({' '.join(str(e).split())[:200]})", path) from None
    except (KeyError, RuntimeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"weights do not match the described network "
                              f"({' '.join(str(e).split())[:200]})", path) from None
    model.eval()
    return Checkpoint(spec=spec, model=model, extra=payload.get("extra", {}), path=Path(path))


def available_devices() -> list[str]:
    """The devices torch can use here, e.g. ``["cpu", "cuda:0 (NVIDIA H200)"]``."""
    names = ["cpu"]
    if torch.cuda.is_available():
        names += [f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(torch.cuda.device_count())]
    return names


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cpu``, ``cuda`` or ``cuda:N``.

    A device that does not exist here (CUDA without a GPU, ``cuda:3`` on a two-GPU machine, a
    misspelt name) is a ConfigError naming the devices that do exist.
    """
    from slidekit.errors import ConfigError

    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"unknown device {str(device)!r}; use auto, cpu, cuda or cuda:N "
                          f"(devices here: {', '.join(available_devices())})")
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (dev.index is not None and dev.index >= count):
            raise ConfigError(f"device {str(device)!r} was asked for but does not exist here "
                              f"(devices here: {', '.join(available_devices())})")
    return dev


def transfer_encoder(src: nn.Module | Checkpoint | str | os.PathLike, dst: nn.Module) -> list[str]:
    """Copy the ``.encoder`` weights of ``src`` (network, checkpoint or checkpoint path) into ``dst``.

    Returns the names of the copied tensors. Raises CheckpointError when the encoders differ.
    """
    if isinstance(src, (str, os.PathLike)):
        src = load_checkpoint(src)
    src_model = src.model if isinstance(src, Checkpoint) else src
    if not hasattr(src_model, "encoder") or not hasattr(dst, "encoder"):
        raise CheckpointError("both networks need an .encoder to transfer weights")
    state = src_model.encoder.state_dict()
    try:
        dst.encoder.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"encoders differ (different backbones?): {str(e)[:200]}") from None
    return list(state)
