"""Encoder weights from outside slidekit: plain weight files for torchvision and timm backbones.

A backbone is named ``resnet18``/``resnet34``/``resnet50`` (torchvision) or ``timm:NAME`` (any timm
model). Networks are always built with random weights (``pretrained=False``: nothing is ever
downloaded); weights come from a local file given by the user:

- a slidekit checkpoint (its ``.encoder``),
- a plain torchvision state dict (``resnet50-*.pth``: ``conv1.*``, ``layer1.*``, ``fc.*``),
- a timm state dict (``.safetensors`` or ``.pth``) for a ``timm:NAME`` backbone.

``TimmEncoder`` returns a feature pyramid (list of NCHW maps, finest first) like ``ResNetEncoder``:
every stage of a CNN (through timm's ``forward_intermediates``), or the last block's patch-token
grid of a ViT (one map at the patch stride). Its parameter names are timm's own, so a timm
weights file loads into it unchanged (the classifier head is left out).
"""
from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from slidekit.base.errors import CheckpointError, ConfigError
from slidekit.models.backbones import TimmEncoder, is_timm
from slidekit.models.checkpoint import CHECKPOINT_FORMAT, check_finite, load_checkpoint, transfer_encoder
from slidekit.models.networks import ResNetClassifier
from slidekit.models.spec import ModelSpec

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


# -- weight files ---------------------------------------------------------------------------------

def check_weights_file(path: str | os.PathLike, what: str = "weights file") -> Path:
    """``path`` as a Path when it is a regular file (a symlink to one counts); else CheckpointError naming
    it: "not found", or "not a regular file" for a folder, a device (a link to ``/dev/zero``), a pipe."""
    path = Path(path)
    try:
        mode = path.stat().st_mode  # follows symlinks: a link is what it points to
    except OSError:  # missing, a dangling or looping link, no permission to look
        raise CheckpointError(f"{what} not found", path) from None
    if not stat.S_ISREG(mode):
        kind = ("a folder" if stat.S_ISDIR(mode) else "a character device" if stat.S_ISCHR(mode)
                else "a block device" if stat.S_ISBLK(mode) else "a pipe" if stat.S_ISFIFO(mode)
                else "a socket" if stat.S_ISSOCK(mode) else "not a file")
        link = f" (a link to {os.path.realpath(path)})" if path.is_symlink() else ""
        raise CheckpointError(f"{what} is not a regular file: {kind}{link}", path)
    return path


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a plain weights file (.safetensors, or a torch file read with weights_only=True).

    A dict wrapping the weights under ``state_dict`` or ``model`` is unwrapped and a DataParallel
    ``module.`` prefix removed. CheckpointError (one line naming the file) when missing or unreadable.
    """
    path = check_weights_file(path)
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            sd: Any = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # zip/pickle/header errors of every kind
        raise CheckpointError(f"not a readable weights file: {_unreadable_reason(e)}", path) from None
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict) and "format" not in sd:
            sd = sd[key]
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError("not a state dict of tensors", path)
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    check_floating(sd, path)
    check_finite(sd, path)
    return sd


# integer or bool tensors a network legitimately holds (counters, index tables, masks)
INTEGER_BUFFERS = ("num_batches_tracked", "relative_position_index", "position_ids", "index", "indices", "mask")


def check_floating(sd: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """CheckpointError naming the file and the first weight tensor that is not floating point: a
    network's weights are floats, and integer ones with the right keys and shapes would load (cast)
    into a network that gives all-zero or meaningless features without a word."""
    bad = [k for k, v in sd.items() if not (v.is_floating_point() or v.is_complex())
           and not k.rsplit(".", 1)[-1].endswith(INTEGER_BUFFERS)]
    if bad:
        raise CheckpointError(f"tensor {bad[0]!r} is {str(sd[bad[0]].dtype).removeprefix('torch.')}, not floating "
                              f"point ({len(bad)} such tensors): not network weights (refusing weights that would "
                              "give all-zero features)", path)


def detect_torchvision_resnet(sd: dict[str, torch.Tensor]) -> str | None:
    """The torchvision ResNet a state dict belongs to (by block counts), or None."""
    if "conv1.weight" not in sd or "layer4.0.conv1.weight" not in sd:
        return None
    bottleneck = "layer1.0.conv3.weight" in sd
    blocks = len({k.split(".")[1] for k in sd if k.startswith("layer3.")})
    if bottleneck:
        return "resnet50" if blocks == 6 else None  # resnet101/152 are not among slidekit's backbones
    return {2: "resnet18", 6: "resnet34"}.get(blocks)


def load_encoder_weights(encoder: nn.Module, sd: dict[str, torch.Tensor], path: str | os.PathLike) -> list[str]:
    """Load a plain state dict into ``encoder``: every encoder tensor must be present and fit.

    Classifier tensors (``fc.*`` of torchvision, timm's classifier) are left out; any other key
    the encoder lacks, or a missing or misshapen tensor, is a CheckpointError naming the file.
    """
    backbone = encoder.backbone
    if isinstance(encoder, TimmEncoder):
        target, drop = encoder.model, _timm_classifier_prefixes(encoder.model)
    else:
        found = detect_torchvision_resnet(sd)
        if found is None:
            raise CheckpointError("not a slidekit checkpoint, nor a torchvision ResNet state dict "
                                  "(for timm weights use --init timm:NAME --weights FILE)", path)
        if found != backbone:
            raise CheckpointError(f"these are {found} weights but the network's backbone is {backbone} "
                                  f"(set backbone={found})", path)
        target, drop = encoder, ("fc.",)
    sd = {k: v for k, v in sd.items() if not k.startswith(drop)}
    mismatch = key_mismatch(target.state_dict(), sd)
    if mismatch:
        raise CheckpointError(f"weights do not fit {backbone}: {mismatch}", path)
    target.load_state_dict(sd)
    return list(sd)


def key_mismatch(own: dict, sd: dict) -> str | None:
    """How a state dict ``sd`` differs from a network's own ``own`` (missing, unexpected and
    misshapen tensors, each with an example), or None when every tensor fits."""
    missing = [k for k in own if k not in sd]
    extra = [k for k in sd if k not in own]
    bad = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    parts = [f"{len(missing)} missing (e.g. {missing[0]})" if missing else "",
             f"{len(extra)} unexpected (e.g. {extra[0]})" if extra else "",
             f"{len(bad)} of another shape (e.g. {bad[0]})" if bad else ""]
    return ", ".join(p for p in parts if p) or None


def _timm_classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    cfg = getattr(model, "pretrained_cfg", None)
    cls = cfg.get("classifier") if isinstance(cfg, dict) else None
    names = [cls] if isinstance(cls, str) else list(cls or [])
    return tuple(f"{n}." for n in names) or ("head.", "fc.", "classifier.")


def init_from(model: nn.Module, source: str | os.PathLike) -> list[str]:
    """Initialise ``model.encoder`` from a slidekit checkpoint or a plain weights file.

    The network's own backbone decides how a plain file is read (torchvision or timm names).
    Returns the names of the loaded tensors.
    """
    if not hasattr(model, "encoder"):
        raise CheckpointError("the network has no .encoder to initialise")
    path = Path(source)
    if is_timm(str(source)):
        raise CheckpointError(f"{source} names a model, not a weights file: give the weights as a file "
                              f"(--weights FILE); slidekit never downloads weights")
    check_weights_file(path)
    if _is_slidekit_checkpoint(path):
        return transfer_encoder(path, model)
    return load_encoder_weights(cast(nn.Module, model.encoder), read_state_dict(path), path)


def _is_slidekit_checkpoint(path: Path) -> bool:
    """Whether a weights file is a slidekit checkpoint (else a plain state dict or not weights at all)."""
    if path.suffix.lower() == ".safetensors":
        return False
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return False  # read_state_dict names the problem in one line
    return isinstance(payload, dict) and payload.get("format") == CHECKPOINT_FORMAT


def init_overrides(init: str | None, weights: str | None) -> list[str]:
    """``--init``/``--weights`` of ``slidekit train`` as config overrides.

    ``--init timm:NAME --weights FILE`` sets ``backbone=timm:NAME`` and ``init=FILE``; any other
    ``--init`` is a weights file (slidekit checkpoint or torchvision state dict).
    """
    if init and is_timm(init):
        if not weights:
            raise ConfigError(f"--init {init} needs --weights FILE (slidekit never downloads weights)")
        check_weights_file(weights)
        return [f"backbone={init}", f"init={weights}"]
    if weights:
        raise ConfigError("--weights belongs with --init timm:NAME (other --init values are the weights file)")
    return [f"init={init}"] if init else []


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
    from slidekit.models import registry  # registry builds on this module

    text = str(model)
    if tokens is not None and tokens not in TOKEN_RULES:
        raise ConfigError(f"tokens must be one of {', '.join(TOKEN_RULES)}, not {tokens!r}")
    if tokens is not None and not is_timm(text):
        raise ConfigError(f"--tokens belongs with a timm:NAME model ({text} makes its feature its own way)")
    name = None if is_timm(text) else registry.registry_name(text)
    if name is not None:  # a registry name is never read as a file of that name
        net, spec, path = registry.load_registered_encoder(name, weights)
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
            raise ConfigError(registry.unknown_model_message(text))
        path = check_weights_file(text, "model file")
        if weights is not None:
            raise ConfigError(f"--weights belongs with a named encoder ({', '.join(registry.ENCODERS)}) or "
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
    from dataclasses import asdict

    return asdict(spec)


_TRUNCATED_SIGNS = ("central directory", "not fully covered", "unexpected eof", "ran out of input",
                    "incomplete metadata", "truncated", "file size")


def _unreadable_reason(e: BaseException) -> str:
    """Why a weights file could not be read, as whole words: a cut-short file says so; otherwise the
    library's first sentence (never a message cut in the middle)."""
    text = " ".join(str(e).split())
    first = text.split(". ")[0].rstrip(".")
    if len(first) > 200:
        first = first[:200].rsplit(" ", 1)[0] + " …"
    what = f"{type(e).__name__}: {first}" if first else type(e).__name__
    if any(sign in text.lower() for sign in _TRUNCATED_SIGNS):
        return f"the file is truncated or damaged (an interrupted download or copy?) ({what})"
    return what
