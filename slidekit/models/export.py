"""Models out: a slidekit checkpoint as TorchScript, ONNX, or a QuPath WSInfer model folder.

Two input conventions, because the runtimes differ:

- ``torchscript`` / ``onnx`` (any runtime): the file is self-contained. Input float32
  (B, 3, H, W) RGB scaled to [0, 1]; the model normalises with the checkpoint's mean/std and
  applies its activation, so the output is what slidekit's ``Predictor`` gives (probabilities,
  (B, C) per patch or (B, C, H, W) maps). The spec travels with the file (TorchScript extra file
  ``slidekit_spec.json``, ONNX metadata ``slidekit_spec``).
- ``wsinfer`` (QuPath's WSInfer extension, WSInfer model-config spec 1.0): a folder with
  ``torchscript_model.pt`` and ``config.json``. WSInfer applies the transforms in the config
  (Resize, ToTensor, Normalize) and a softmax to the model's logits, so that model takes the
  normalised tensor and returns logits. Only patch classifiers fit (WSInfer scores patches); a
  sigmoid classifier becomes two logits ``[0, z]`` for classes ``["not C", "C"]`` (softmax of
  those is exactly ``[1 - sigmoid(z), sigmoid(z)]``).

A checkpoint trained on stain-normalised tiles (``ModelSpec.stain``) exports as well, but no
runtime here applies the normalisation: the reference is written next to the export
(``stain_reference.json`` in a WSInfer folder, ``FILE.stain_reference.json`` beside a file; a
``slidekit.stain.normalize.StainNormalizer.load``-able JSON) and a ``StainWarning`` says the exported model
expects normalised tiles.
"""
from __future__ import annotations

import json
import os
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slidekit.base.errors import CheckpointError, ConfigError, StainWarning
from slidekit.base.io import atomic_path
from slidekit.base.outputs import claim_path
from slidekit.models.checkpoint import load_checkpoint, read_checkpoint
from slidekit.stain.normalize import StainNormalizer

FORMATS = ("wsinfer", "torchscript", "onnx")
WSINFER_MODEL = "torchscript_model.pt"
WSINFER_CONFIG = "config.json"
WSINFER_SPEC_VERSION = "1.0"


class _Standalone(nn.Module):
    """[0, 1] float RGB -> the checkpoint's activated outputs (normalisation inside)."""

    mean: torch.Tensor  # buffers, registered in __init__
    std: torch.Tensor

    def __init__(self, model: nn.Module, spec: Any) -> None:
        super().__init__()
        self.model = model
        self.activation = spec.activation
        self.register_buffer("mean", torch.tensor(spec.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(spec.std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.model((x - self.mean) / self.std)
        if self.activation == "softmax":
            return y.softmax(dim=1)
        if self.activation == "sigmoid":
            return y.sigmoid()
        return y


class _SigmoidAsTwoLogits(nn.Module):
    """One sigmoid logit z -> logits [0, z]: their softmax is [1 - sigmoid(z), sigmoid(z)]."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.model(x)
        return torch.cat([torch.zeros_like(z), z], dim=1)


def _load(ckpt: str | os.PathLike) -> Any:
    return load_checkpoint(ckpt)


def _example(spec: Any, batch: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(batch, 3, spec.patch_size, spec.patch_size, generator=g)


def _trace(module: nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    import warnings

    with warnings.catch_warnings():  # torch.jit.trace's deprecation notice; tracing is what WSInfer loads
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        with torch.no_grad():
            return torch.jit.trace(module.eval(), example, check_trace=False)


def _save_ts(traced: torch.jit.ScriptModule, path: Path, spec: Any) -> None:
    import warnings

    with warnings.catch_warnings():  # torch.jit.save's deprecation notice; TorchScript is what WSInfer loads
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(traced, str(path), _extra_files={"slidekit_spec.json": _spec_json(spec)})


def _spec_json(spec: Any) -> str:
    return json.dumps(asdict(spec), default=list)


def _is_our_torchscript(path: Path) -> bool:
    """Whether ``path`` is a TorchScript file slidekit's export wrote (it carries ``slidekit_spec.json``)."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("/extra/slidekit_spec.json") for n in z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def _is_our_onnx(path: Path) -> bool:
    """Whether ``path`` is an ONNX file slidekit's export wrote (metadata ``slidekit_spec``)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # not an ONNX file at all (a folder, text, another format): not ours
        return False
    return any(e.key == "slidekit_spec" for e in model.metadata_props)


def export_torchscript(ckpt: str | os.PathLike, out: str | os.PathLike) -> Path:
    """A standalone TorchScript file: [0, 1] float RGB (B, 3, S, S) in, the Predictor's outputs out."""
    out = Path(out)
    claim_path(out, _is_our_torchscript(out), "a TorchScript file slidekit exported")
    c = _load(ckpt)
    traced = _trace(_Standalone(c.model, c.spec), _example(c.spec))
    with atomic_path(out) as tmp:
        _save_ts(traced, tmp, c.spec)
    return out


def export_onnx(ckpt: str | os.PathLike, out: str | os.PathLike, opset: int = 18) -> Path:
    """A standalone ONNX file (dynamic batch): same input and outputs as ``export_torchscript``."""
    try:
        import onnx
    except ImportError:
        raise ConfigError("ONNX export needs the onnx extra: pip install 'slidekit[onnx]'") from None
    out = Path(out)
    claim_path(out, _is_our_onnx(out), "an ONNX file slidekit exported")
    c = _load(ckpt)
    module = _Standalone(c.model, c.spec).eval()
    with atomic_path(out) as tmp:
        import warnings

        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the exporter's deprecation and tracing notices
            torch.onnx.export(module, (_example(c.spec),), str(tmp), input_names=["image"], output_names=["output"],
                              dynamic_axes={"image": {0: "batch"}, "output": {0: "batch"}}, opset_version=opset,
                              dynamo=False)
        model = onnx.load(str(tmp))
        entry = model.metadata_props.add()
        entry.key, entry.value = "slidekit_spec", _spec_json(c.spec)
        onnx.save(model, str(tmp))
    return out


def wsinfer_config(spec: Any) -> dict:
    """The WSInfer model config (spec 1.0) of a patch classifier's spec."""
    classes = list(spec.classes)
    if spec.activation == "sigmoid" and len(classes) == 1:
        classes = [f"not {classes[0]}", classes[0]]
    arch = spec.backbone[len("timm:"):] if spec.backbone.startswith("timm:") else spec.backbone
    return {
        "spec_version": WSINFER_SPEC_VERSION,
        "architecture": arch,
        "num_classes": len(classes),
        "class_names": classes,
        "patch_size_pixels": int(spec.patch_size),
        "spacing_um_px": float(spec.mpp),
        "transform": [
            {"name": "Resize", "arguments": {"size": int(spec.patch_size)}},
            {"name": "ToTensor"},
            {"name": "Normalize", "arguments": {"mean": list(spec.mean), "std": list(spec.std)}},
        ],
    }


def export_wsinfer(ckpt: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """A QuPath WSInfer model folder: ``torchscript_model.pt`` (normalised input, logits) + ``config.json``."""
    c = _load(ckpt)
    spec = c.spec
    if spec.task != "classification":
        raise CheckpointError(f"WSInfer runs patch classifiers; this is a {spec.task} model "
                              f"(export it with --to torchscript or --to onnx)", ckpt)
    if spec.activation == "sigmoid" and len(spec.classes) == 1:
        model: nn.Module = _SigmoidAsTwoLogits(c.model)
    elif spec.activation == "softmax":
        model = c.model
    else:
        raise CheckpointError(f"WSInfer applies a softmax; a {spec.activation} model with "
                              f"{len(spec.classes)} classes has no exact softmax form", ckpt)
    example = spec.normalize((_example(spec) * 255).round().to(torch.uint8))
    traced = _trace(model, example)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError("the WSInfer output must be a folder", out_dir)
    # The config is ours only beside a model slidekit wrote (the model is written first); a user's
    # own WSInfer folder is refused before anything in it is replaced.
    ours = _is_our_torchscript(out_dir / WSINFER_MODEL)
    claim_path(out_dir / WSINFER_MODEL, ours, "a WSInfer model slidekit exported")
    claim_path(out_dir / WSINFER_CONFIG, ours, "the config of a WSInfer model slidekit exported")
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / WSINFER_MODEL) as tmp:
        _save_ts(traced, tmp, spec)
    with atomic_path(out_dir / WSINFER_CONFIG) as tmp:
        Path(tmp).write_text(json.dumps(wsinfer_config(spec), indent=2) + "\n")
    return out_dir


STAIN_REFERENCE = "stain_reference.json"


def export_model(ckpt: str | os.PathLike, to: str, out: str | os.PathLike) -> Path:
    """Export checkpoint ``ckpt`` as ``to`` (wsinfer | torchscript | onnx) to ``out`` (and its stain
    reference beside it, with a ``StainWarning``, when the checkpoint has one)."""
    if to not in FORMATS:
        raise ConfigError(f"unknown export format {to!r}; known: {', '.join(FORMATS)}")
    path = {"wsinfer": export_wsinfer, "torchscript": export_torchscript, "onnx": export_onnx}[to](ckpt, out)
    export_stain_reference(ckpt, to, path)
    return path


def stain_reference_path(to: str, out: str | os.PathLike) -> Path:
    """Where the stain reference of an export to ``out`` goes."""
    out = Path(out)
    return out / STAIN_REFERENCE if to == "wsinfer" else out.with_name(f"{out.name}.{STAIN_REFERENCE}")


def export_stain_reference(ckpt: str | os.PathLike, to: str, out: str | os.PathLike) -> Path | None:
    """Write the checkpoint's stain reference beside the export ``out`` and warn that the exported
    model expects tiles normalised to it; None (and nothing written) without one."""
    import warnings


    stain = read_checkpoint(ckpt).get("spec", {}).get("stain")
    if not stain:
        return None

    ref = StainNormalizer.from_dict(stain, path=ckpt, error=CheckpointError).save(stain_reference_path(to, out))
    warnings.warn(f"{ckpt}: the model was trained on {stain.get('method')}-normalised tiles, which {to} cannot "
                  f"apply: normalise tiles to {ref} before they reach the exported model", StainWarning,
                  stacklevel=2)
    return ref
