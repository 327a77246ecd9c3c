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
from collections.abc import Iterable
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from slidekit.base.errors import CheckpointError, ConfigError
from slidekit.models.backbones import TimmEncoder, is_timm
from slidekit.models.checkpoint import CHECKPOINT_FORMAT, check_finite, transfer_encoder

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


def reestimate_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Re-estimate every BatchNorm layer's running statistics of ``model`` on ``batches``.

    What ``--init-bn reestimate`` does after ``--init``: the running means and variances copied
    with the encoder (fitted on the source images) are reset and replaced by the plain average of
    the batch statistics over ``batches`` (model inputs, prepared as for training), computed in
    train mode without gradients. Weights, biases and the affine BatchNorm parameters are left
    untouched; each layer's momentum and the model's train/eval mode are restored. Batches of one
    sample are skipped (a BatchNorm1d cannot normalise them).

    Parameters
    ----------
    model : nn.Module
        The network (encoder and head); every ``_BatchNorm`` in it is re-estimated.
    batches : iterable of torch.Tensor
        Input batches (B, C, H, W) on the model's device.

    Returns
    -------
    int
        The number of samples the statistics were estimated on.

    Raises
    ------
    ConfigError
        When ``batches`` hold no batch of two or more samples (nothing to estimate on).
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return 0
    saved = [(m, m.momentum, m.running_mean.clone() if m.running_mean is not None else None,
              m.running_var.clone() if m.running_var is not None else None) for m in norms]
    was_training = model.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative (plain) average over the batches
    seen = 0
    model.train()
    try:
        with torch.no_grad():
            for x in batches:
                if len(x) < 2:
                    continue
                model(x)
                seen += len(x)
    finally:
        for m, momentum, mean, var in saved:
            m.momentum = momentum
            if not seen and mean is not None and var is not None:  # nothing seen: the old statistics stay
                m.running_mean.copy_(mean)  # type: ignore[union-attr]
                m.running_var.copy_(var)  # type: ignore[union-attr]
        model.train(was_training)
    if not seen:
        raise ConfigError("init_bn=reestimate: no training batch of two or more samples to re-estimate the "
                          "BatchNorm statistics on")
    return seen


def _is_slidekit_checkpoint(path: Path) -> bool:
    """Whether a weights file is a slidekit checkpoint (else a plain state dict or not weights at all)."""
    if path.suffix.lower() == ".safetensors":
        return False
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return False  # read_state_dict names the problem in one line
    return isinstance(payload, dict) and payload.get("format") == CHECKPOINT_FORMAT


def init_overrides(init: str | None, weights: str | None, init_bn: str | None = None) -> list[str]:
    """``--init``/``--weights``/``--init-bn`` of ``slidekit train`` as config overrides.

    ``--init timm:NAME --weights FILE`` sets ``backbone=timm:NAME`` and ``init=FILE``; any other
    ``--init`` is a weights file (slidekit checkpoint or torchvision state dict). ``--init-bn``
    sets ``init_bn`` (the config refuses ``reestimate`` without ``init``).
    """
    if init_bn is not None:
        return init_overrides(init, weights) + [f"init_bn={init_bn}"]
    if init and is_timm(init):
        if not weights:
            raise ConfigError(f"--init {init} needs --weights FILE (slidekit never downloads weights)")
        check_weights_file(weights)
        return [f"backbone={init}", f"init={weights}"]
    if weights:
        raise ConfigError("--weights belongs with --init timm:NAME (other --init values are the weights file)")
    return [f"init={init}"] if init else []


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
