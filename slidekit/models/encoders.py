"""Any encoder a user names for ``slidekit embed``: a registry name (in any case), a slidekit
checkpoint, a torchvision ResNet state dict or ``timm:NAME`` with a weights file, and for timm ViTs
which tokens make the feature (``cls``, ``mean``, ``cls+mean``). Builds on ``weights`` (files) and
``registry`` (named encoders), so neither has to import the other back."""
from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from slidekit.base.errors import CheckpointError, ConfigError
from slidekit.models.backbones import TimmEncoder, is_timm
from slidekit.models.checkpoint import load_checkpoint
from slidekit.models.networks import ResNetClassifier
from slidekit.models.registry import ENCODERS, load_registered_encoder, registry_name, unknown_model_message
from slidekit.models.spec import ModelSpec
from slidekit.models.weights import (
    _is_slidekit_checkpoint,
    check_weights_file,
    detect_torchvision_resnet,
    load_encoder_weights,
    read_state_dict,
)


def load_embedding_encoder(model: str | os.PathLike, weights: str | os.PathLike | None = None,
                           patch_size: int | None = None, mpp: float | None = None,
                           tokens: str | None = None) -> tuple[nn.Module, Any, Path]:
    """The feature extractor ``embed`` runs: (network with ``.features``, its ModelSpec, weights path).

    ``model`` is a registry name (``uni``, ``virchow2``, ...; any case; weights from ``weights`` or
    ``$SLIDEKIT_MODELS``; its own tile geometry unless given), a slidekit checkpoint (its encoder; its
    patch size and MPP unless given), a torchvision ResNet state dict, or ``timm:NAME`` with ``weights``.
    A plain file says nothing about tiles, so ``mpp`` is then required; ``patch_size`` defaults to 224
    and the normalisation is ImageNet's (what torchvision and most timm models were trained with).

    ``tokens`` (``timm:NAME`` ViTs only) is which tokens make the feature: ``cls`` (the class token),
    ``mean`` (the mean of the patch tokens) or ``cls+mean`` (both, concatenated), read after the model's
    final norm as the registry's encoders are; None keeps the global average of the last block's patch
    grid (recorded as ``pooled``).
    """
    text = str(model)
    if tokens is not None and tokens not in TOKEN_RULES:
        raise ConfigError(f"tokens must be one of {', '.join(TOKEN_RULES)}, not {tokens!r}")
    if tokens is not None and not is_timm(text):
        raise ConfigError(f"--tokens belongs with a timm:NAME model ({text} makes its feature its own way)")
    name = None if is_timm(text) else registry_name(text)
    if name is not None:  # a registry name is never read as a file of that name
        net, spec, path = load_registered_encoder(name, weights)
        if patch_size or mpp:
            spec = ModelSpec.from_dict({**_asdict(spec), "patch_size": patch_size or spec.patch_size,
                                        "mpp": mpp or spec.mpp})
        return net, spec, path
    text = str(model)
    if is_timm(text):
        if weights is None:
            raise ConfigError(f"{text} needs --weights FILE (slidekit never downloads weights)")
        backbone, path = text, Path(weights)
        sd = read_state_dict(path)
    else:
        if not os.path.lexists(text):
            raise ConfigError(unknown_model_message(text))
        path = check_weights_file(text, "model file")
        if weights is not None:
            raise ConfigError(f"--weights belongs with a named encoder ({', '.join(ENCODERS)}) or "
                              f"timm:NAME; {path.name} is a file that holds its own weights")
        if _is_slidekit_checkpoint(path):
            ckpt = load_checkpoint(path)
            spec, net = ckpt.spec, ckpt.model
            if not hasattr(net, "features"):
                raise CheckpointError("model has no feature extractor", path)
            if spec.arch != "resnet-encoder":  # classifiers/segmenters: embed with their encoder only
                enc = ResNetClassifier(spec.backbone, 0)
                enc.encoder.load_state_dict(cast(nn.Module, net.encoder).state_dict())
                net = enc
            if patch_size is not None or mpp is not None:
                spec = ModelSpec.from_dict({**_asdict(spec), "patch_size": patch_size or spec.patch_size,
                                            "mpp": mpp or spec.mpp})
            return net.eval(), spec, path
        sd = read_state_dict(path)
        found = detect_torchvision_resnet(sd)
        if found is None:
            raise CheckpointError("not a slidekit checkpoint, nor a torchvision ResNet state dict "
                                  "(for timm weights use timm:NAME with --weights FILE)", path)
        backbone = found
    if mpp is None:
        raise ConfigError(f"{path.name} holds weights only: give the tile size in µm/px (--tile-mpp)")
    net = ResNetClassifier(backbone, 0)
    load_encoder_weights(net.encoder, sd, path)
    extra: dict[str, Any] = {"weights": path.name}
    out: nn.Module = net
    if tokens is not None:
        out = _token_encoder(cast(TimmEncoder, net.encoder), tokens, text)
        extra["tokens"] = tokens
    spec = ModelSpec(arch="resnet-encoder", backbone=backbone, task="embedding", classes=[],
                     patch_size=int(patch_size or 224), mpp=float(mpp), activation="none", extra=extra)
    return out.eval(), spec, path


#: which tokens of a ViT make a tile's feature (``--tokens``)
TOKEN_RULES = ("cls", "mean", "cls+mean")


class TokenEncoder(nn.Module):
    """A timm ViT whose feature is its class token, the mean of its patch tokens, or both (after the
    model's final norm, as ``forward_features`` returns them)."""

    def __init__(self, model: nn.Module, tokens: str) -> None:
        super().__init__()
        vit: Any = model  # a timm ViT: forward_features, num_prefix_tokens, embed_dim
        self.model, self.tokens = vit, tokens
        self.out_features = int(vit.embed_dim) * (2 if tokens == "cls+mean" else 1)

    @property
    def encoder(self) -> "TokenEncoder":  # what embed reads .out_features from (not a submodule)
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, out_features) features of a normalised batch."""
        t = self.model.forward_features(x)  # (B, prefix + patches, C)
        mean = t[:, int(self.model.num_prefix_tokens):].mean(1)
        if self.tokens == "mean":
            return mean
        return t[:, 0] if self.tokens == "cls" else torch.cat([t[:, 0], mean], dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def _token_encoder(encoder: TimmEncoder, tokens: str, name: str) -> TokenEncoder:
    """``encoder``'s timm model as a TokenEncoder; a ConfigError when it has no such tokens (a CNN, a ViT
    without a class token)."""
    model: Any = encoder.model
    if not hasattr(model, "num_prefix_tokens") or not hasattr(model, "embed_dim"):
        raise ConfigError(f"--tokens {tokens}: {name} is not a ViT (no tokens; its feature is the pooled map)")
    if "cls" in tokens and getattr(model, "cls_token", None) is None:
        raise ConfigError(f"--tokens {tokens}: {name} has no class token (use --tokens mean)")
    return TokenEncoder(model, tokens)


def _asdict(spec: Any) -> dict:

    return asdict(spec)
