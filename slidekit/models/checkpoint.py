"""The self-describing checkpoint file: weights + ``ModelSpec`` written atomically, read with
format and version checks, loaded into the network its spec describes; encoder transfer."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slidekit.base.errors import CheckpointError
from slidekit.base.io import atomic_path
from slidekit.models.networks import build_model
from slidekit.models.spec import ModelSpec

CHECKPOINT_FORMAT = "slidekit.checkpoint"

CHECKPOINT_VERSION = 1


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


def check_finite(tensors: dict[str, Any], path: str | os.PathLike) -> None:
    """CheckpointError naming the file and the first tensor holding NaN or Inf: such weights give
    NaN features and scores without a word, so they are refused when read."""
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise CheckpointError(f"tensor {name!r} holds {bad} non-finite value(s) (NaN or Inf); "
                                  "refusing weights that would give NaN outputs", path)


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
    if isinstance(payload.get("state_dict"), dict):
        check_finite(payload["state_dict"], path)
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


def transfer_encoder(src: nn.Module | Checkpoint | str | os.PathLike, dst: nn.Module) -> list[str]:
    """Copy the ``.encoder`` weights of ``src`` (network, checkpoint or checkpoint path) into ``dst``.

    Returns the names of the copied tensors. Raises CheckpointError when the encoders differ.
    """
    if isinstance(src, (str, os.PathLike)):
        src = load_checkpoint(src)
    src_model = src.model if isinstance(src, Checkpoint) else src
    src_enc, dst_enc = getattr(src_model, "encoder", None), getattr(dst, "encoder", None)
    if not isinstance(src_enc, nn.Module) or not isinstance(dst_enc, nn.Module):
        raise CheckpointError("both networks need an .encoder to transfer weights")
    state = src_enc.state_dict()
    try:
        dst_enc.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"encoders differ (different backbones?): {str(e)[:200]}") from None
    return list(state)
