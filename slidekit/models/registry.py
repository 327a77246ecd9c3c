"""Named patch encoders, built offline the way their published weights expect.

``ENCODERS`` maps a name (``uni``, ``uni2-h``, ``virchow2``, ``h-optimus-0``, ``h-optimus-1``,
``prov-gigapath``, ``resnet18``/``34``/``50``) to an ``EncoderEntry``: the timm architecture and
keyword arguments (LayerScale ``init_values``, SwiGLU MLP, register tokens, patch size), input size
and µm/px, mean/std, which tokens form the feature, the feature width, licence, where a user obtains
the weights and the published parameter count, each figure with where it was read
(``params_source``, ``licence_source``; "not verified" where it could not be checked). ``build_encoder(name)``
returns the network with random weights (``pretrained=False``; under ``torch.device("meta")`` nothing is allocated;
names match case-insensitively: ``UNI`` is ``uni``);
``load_registered_encoder`` loads a local weights file into it (``--model NAME --weights FILE``,
or the file found under ``$SLIDEKIT_MODELS``). Nothing is ever downloaded.

Not here: CONCH (an open_clip CoCa model; its vision tower cannot be built from timm alone) and
Phikon-v2 (published as a Hugging Face ``Dinov2Model``, whose key layout is not timm's).
SimCLR checkpoints from ``slidekit train simclr`` are slidekit checkpoints: give their path.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slidekit.base.errors import CheckpointError, ConfigError
from slidekit.models.networks import ResNetClassifier
from slidekit.models.spec import ModelSpec
from slidekit.models.weights import (
    check_weights_file,
    detect_torchvision_resnet,
    key_mismatch,
    load_encoder_weights,
    read_state_dict,
)

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
HOPTIMUS_MEAN, HOPTIMUS_STD = (0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517)
MODELS_ENV = "SLIDEKIT_MODELS"


@dataclass(frozen=True)
class EncoderEntry:
    """What a named encoder's published weights need."""

    arch: str  # timm model name, or a torchvision ResNet name
    kwargs: dict = field(default_factory=dict)
    input_size: int = 224
    mpp: float = 0.5
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    tokens: str = "cls"  # cls | cls+mean (class token and mean of patch tokens) | pooled (CNN)
    dim: int = 1024
    params: int = 0  # published parameter count (without a classification head)
    params_tolerance: float = 0.01  # how exactly the count is published (1.1B: two digits)
    params_source: str = ""  # where the count is published, or why it is not a published figure
    licence: str = ""
    licence_source: str = ""  # where the licence was read, or "not verified"
    source: str = ""  # where a user obtains the weights
    files: tuple = ("pytorch_model.bin", "model.safetensors")  # names the weights file is published under


def _swiglu(**kw) -> dict:
    from timm.layers import SwiGLUPacked

    return {"mlp_layer": SwiGLUPacked, "act_layer": nn.SiLU, **kw}


def _hoptimus(**kw) -> EncoderEntry:
    """H-optimus-0 and -1: one ViT-g/14 with 4 registers, Bioptimus's mean/std (their cards' timm kwargs)."""
    return EncoderEntry("vit_giant_patch14_reg4_dinov2", dict(img_size=224, init_values=1e-5, num_classes=0,
                                                              dynamic_img_size=False),
                        mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD, dim=1536, **kw)


ENCODERS: dict[str, EncoderEntry] = {
    "uni": EncoderEntry("vit_large_patch16_224", dict(img_size=224, patch_size=16, init_values=1e-5,
                                                      num_classes=0, dynamic_img_size=True),
                        dim=1024, params=300_000_000, params_tolerance=0.02,
                        params_source="UNI paper (Chen et al., Nature Medicine 2024): ViT-L/16, 0.3B parameters",
                        licence="CC-BY-NC-ND-4.0 (gated, non-commercial academic use)",
                        licence_source="not verified here against the model card",
                        source="https://huggingface.co/MahmoodLab/UNI"),
    "uni2-h": EncoderEntry("vit_giant_patch14_224", dict(img_size=224, patch_size=14, depth=24, num_heads=24,
                                                         init_values=1e-5, embed_dim=1536, mlp_ratio=2.66667 * 2,
                                                         num_classes=0, no_embed_class=True, reg_tokens=8,
                                                         dynamic_img_size=True, swiglu=True),
                           dim=1536, params=681_394_176,
                           params_source="not published (MahmoodLab's README names the architecture, ViT-h/14-reg8, "
                                         "without a count): the count of the model card's timm kwargs",
                           licence="CC-BY-NC-ND-4.0 (gated)", licence_source="not verified here against the model card",
                           source="https://huggingface.co/MahmoodLab/UNI2-h"),
    "virchow2": EncoderEntry("vit_huge_patch14_224", dict(img_size=224, init_values=1e-5, num_classes=0,
                                                          mlp_ratio=5.3375, global_pool="", reg_tokens=4,
                                                          dynamic_img_size=True, swiglu=True),
                             tokens="cls+mean", dim=2560, params=632_000_000,
                             params_source="Virchow2 paper (arXiv 2408.00738): a 632 million parameter ViT",
                             licence="CC-BY-NC-ND-4.0 (gated)",
                             licence_source="huggingface.co/paige-ai/Virchow2 (License: cc-by-nc-nd-4.0)",
                             source="https://huggingface.co/paige-ai/Virchow2"),
    "h-optimus-0": _hoptimus(params=1_135_000_000, params_tolerance=0.005,
                             params_source="huggingface.co/bioptimus/H-optimus-0: pytorch_model.bin of 4.54 GB "
                                           "(float32: 1.135 B parameters)",
                             licence="Apache-2.0",
                             licence_source="huggingface.co/bioptimus/H-optimus-0 (License: apache-2.0)",
                             source="https://huggingface.co/bioptimus/H-optimus-0"),
    "h-optimus-1": _hoptimus(params=1_100_000_000, params_tolerance=0.05,
                             params_source="not verified here: Hugging Face lists it at 1B; H-optimus-0's "
                                           "architecture (the card's timm kwargs)",
                             licence="non-commercial Bioptimus licence (gated; see the model card)",
                             licence_source="not verified here against the model card",
                             source="https://huggingface.co/bioptimus/H-optimus-1"),
    "prov-gigapath": EncoderEntry("vit_giant_patch14_dinov2", dict(img_size=224, in_chans=3, patch_size=16,
                                                                   embed_dim=1536, depth=40, num_heads=24,
                                                                   init_values=1e-5, mlp_ratio=5.33334,
                                                                   num_classes=0),
                                  dim=1536, params=1_130_000_000, params_tolerance=0.01,
                                  params_source="tile encoder ViT-g/14 of about 1.13 B parameters (Prov-GigaPath, "
                                                "Xu et al., Nature 2024, as summarised by bio.rodeo; not the card)",
                                  licence="Apache-2.0 (gated)",
                                  licence_source="not verified here against the model card",
                                  source="https://huggingface.co/prov-gigapath/prov-gigapath"),
    "resnet18": EncoderEntry("resnet18", tokens="pooled", dim=512, params=11_176_512,
                             params_source="torchvision docs: num_params 11,689,512, less the 513,000 of the "
                                           "1000-class fc", licence="BSD-3-Clause",
                             licence_source="torchvision (timm's resnet18.tv_in1k card: bsd-3-clause)",
                             source="torchvision ResNet18_Weights.IMAGENET1K_V1 (resnet18-f37072fd.pth)",
                             files=("resnet18-f37072fd.pth",)),
    "resnet34": EncoderEntry("resnet34", tokens="pooled", dim=512, params=21_284_672,
                             params_source="torchvision docs: num_params 21,797,672, less the 1000-class fc "
                                           "(not re-read here)", licence="BSD-3-Clause",
                             licence_source="torchvision (not re-read here)",
                             source="torchvision ResNet34_Weights.IMAGENET1K_V1 (resnet34-b627a593.pth)",
                             files=("resnet34-b627a593.pth",)),
    "resnet50": EncoderEntry("resnet50", tokens="pooled", dim=2048, params=23_508_032,
                             params_source="torchvision docs: num_params 25,557,032, less the 2,049,000 of the "
                                           "1000-class fc (not re-read here)", licence="BSD-3-Clause",
                             licence_source="torchvision (not re-read here)",
                             source="torchvision ResNet50_Weights.IMAGENET1K_V2 (resnet50-11ad3fa6.pth)",
                             files=("resnet50-11ad3fa6.pth", "resnet50-0676ba61.pth")),
}


class FoundationEncoder(nn.Module):
    """A timm ViT whose output is the registry's feature: class token, or class + mean patch tokens."""

    def __init__(self, model: nn.Module, tokens: str, dim: int) -> None:
        super().__init__()
        self.model: Any = model  # a timm model: forward_features, num_prefix_tokens
        self.tokens, self.out_features = tokens, dim

    @property
    def encoder(self) -> "FoundationEncoder":  # what embed reads .out_features from (not a submodule)
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, dim) features of a normalised batch."""
        t = self.model.forward_features(x)  # (B, prefix + patches, C)
        cls = t[:, 0]
        if self.tokens == "cls+mean":
            return torch.cat([cls, t[:, self.model.num_prefix_tokens:].mean(1)], dim=-1)
        return cls

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def registry_name(model: str | os.PathLike) -> str | None:
    """The registry's own spelling of ``model`` when it names an entry (case-insensitive: ``UNI`` is
    ``uni``), else None."""
    text = str(model).strip().lower()
    return text if text in ENCODERS else None


def unknown_model_message(model: str | os.PathLike) -> str:
    """One line for a model that is neither a file nor a registry name: the names that are known."""
    return (f"unknown encoder {str(model)!r}: not a file, nor a named encoder (known: {', '.join(ENCODERS)}); "
            "a slidekit checkpoint or weights file path, or timm:NAME with --weights FILE, is also accepted")


def _entry(name: str) -> EncoderEntry:
    key = registry_name(name)
    if key is None:
        raise ConfigError(unknown_model_message(name))
    return ENCODERS[key]


def build_encoder(name: str, **overrides) -> ResNetClassifier | FoundationEncoder:
    """The named encoder with random weights (timm ``pretrained=False``; ResNets ``weights=None``).

    ``overrides`` change timm keyword arguments (e.g. ``depth=2`` for a small test variant).
    """
    e = _entry(name)
    name = registry_name(name) or name
    if e.arch.startswith("resnet"):
        return ResNetClassifier(e.arch, 0)
    import timm

    kw = {**e.kwargs, **overrides}
    if kw.pop("swiglu", False):
        kw = _swiglu(**kw)
    return FoundationEncoder(timm.create_model(e.arch, pretrained=False, **kw), e.tokens, e.dim)


def find_weights(name: str, weights: str | os.PathLike | None = None) -> Path:
    """The weights file of encoder ``name``: ``weights``, else the first file found in
    ``$SLIDEKIT_MODELS/NAME/`` or ``$SLIDEKIT_MODELS`` under a published file name (or ``NAME.*``)."""
    e = _entry(name)
    name = registry_name(name) or name
    if weights is not None:
        return check_weights_file(weights)
    root = os.environ.get(MODELS_ENV)
    if not root:
        raise ConfigError(f"the named encoder {name} needs its weights file: give --weights FILE, or put it in "
                          f"${MODELS_ENV}/{name}/ (get it from {e.source}; slidekit never downloads weights)")
    names = [*e.files, *(f"{name}{s}" for s in (".safetensors", ".pth", ".bin", ".pt"))]
    for folder in (Path(root) / name, Path(root)):
        for n in names:
            if (folder / n).is_file():
                return folder / n
    raise CheckpointError(f"no {name} weights ({' or '.join(names[:3])}) in {root}/{name} or {root} "
                          f"(get them from {e.source})")


def load_registered_encoder(name: str, weights: str | os.PathLike | None = None,
                            device: str | torch.device = "cpu") -> tuple[nn.Module, ModelSpec, Path]:
    """(network, ModelSpec, weights path) of a named encoder with its weights loaded.

    A file of another model names its missing/unexpected keys; non-finite weights are refused.
    """
    e = _entry(name)
    name = registry_name(name) or name
    path = find_weights(name, weights)
    sd = read_state_dict(path)
    bad = [k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"{len(bad)} tensors hold NaN/Inf (e.g. {bad[0]}): broken weights file", path)
    with torch.device("meta"):
        net = build_encoder(name)
    if isinstance(net, FoundationEncoder):
        _load_exact(net.model, sd, path, name)
    else:
        found = detect_torchvision_resnet(sd)
        if found is not None and found != e.arch:
            raise CheckpointError(f"these are {found} weights, not {name}'s: use --model {found}", path)
        net = net.to_empty(device="cpu")
        load_encoder_weights(net.encoder, sd, path)
    backbone = e.arch if e.arch.startswith("resnet") else f"timm:{e.arch}"  # the name is in extra
    spec = ModelSpec(arch="resnet-encoder", backbone=backbone, task="embedding", classes=[],
                     patch_size=e.input_size, mpp=e.mpp, mean=tuple(e.mean), std=tuple(e.std), activation="none",
                     extra={"encoder": name, "weights": path.name, "tokens": e.tokens, "dim": e.dim})
    return net.to(device).eval(), spec, path


def _load_exact(model: nn.Module, sd: dict, path: Path, name: str) -> None:
    """Every tensor present with its shape, no other keys (the head, if any, is left out); assign=True
    materialises the meta-built model from the file's tensors without a second copy."""
    sd = {k: v for k, v in sd.items() if not k.startswith(("head.", "fc."))}
    mismatch = key_mismatch(model.state_dict(), sd)
    if mismatch:
        raise CheckpointError(f"not {name} weights: {mismatch}", path)
    model.load_state_dict(sd, assign=True)
    for n, b in model.named_buffers():  # non-persistent buffers (none in these ViTs) would stay meta
        if b.is_meta:
            raise CheckpointError(f"buffer {n} not in the file", path)
