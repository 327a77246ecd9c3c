"""Models: the checkpoint's self-description (``spec``), backbones by name (``backbones``), networks
(``networks``), the checkpoint file (``checkpoint``), encoder weights from files (``weights``),
named foundation-model encoders (``registry``), MIL networks over feature bags (``mil``),
built-in models that need no training (``builtin``), export to TorchScript/ONNX/WSInfer (``export``).

Imports: ``slidekit.base``, ``slidekit.annotations`` (class colours), ``slidekit.stain`` (the
normaliser a checkpoint records). Loads torch.
"""
from slidekit.base.devices import available_devices, resolve_device
from slidekit.models.backbones import ResNetEncoder, TimmEncoder, is_timm, make_encoder
from slidekit.models.builtin import BUILTINS, DEFAULT_MODEL, BuiltinSpec, builtin_model
from slidekit.models.checkpoint import Checkpoint, load_checkpoint, read_checkpoint, save_checkpoint, transfer_encoder
from slidekit.models.encoders import load_embedding_encoder
from slidekit.models.export import FORMATS, export_model, export_onnx, export_torchscript, export_wsinfer
from slidekit.models.mil import (
    ABMIL,
    MIL_ARCHS,
    MILOutput,
    PoolMIL,
    TopKMeanMIL,
    TransMIL,
    build_mil,
    load_mil_checkpoint,
    save_mil_checkpoint,
    score_bag,
)
from slidekit.models.networks import PyramidUNet, ResNetClassifier, ResNetUNet, build_model
from slidekit.models.registry import (
    ENCODERS,
    EncoderEntry,
    FoundationEncoder,
    build_encoder,
    find_weights,
    load_registered_encoder,
)
from slidekit.models.spec import ARCHS, BACKBONES, TASKS, ModelSpec
from slidekit.models.weights import init_from, load_encoder_weights, read_state_dict

__all__ = [
    # the checkpoint's self-description and the networks it builds
    "ModelSpec", "ARCHS", "BACKBONES", "TASKS", "build_model", "ResNetClassifier", "ResNetUNet", "PyramidUNet",
    "ResNetEncoder", "TimmEncoder", "make_encoder", "is_timm",
    # checkpoints and encoder weights
    "Checkpoint", "save_checkpoint", "read_checkpoint", "load_checkpoint", "transfer_encoder", "init_from",
    "load_embedding_encoder", "load_encoder_weights", "read_state_dict",
    # named foundation-model encoders
    "ENCODERS", "EncoderEntry", "FoundationEncoder", "build_encoder", "find_weights", "load_registered_encoder",
    # MIL networks and checkpoints
    "MIL_ARCHS", "MILOutput", "PoolMIL", "TopKMeanMIL", "ABMIL", "TransMIL", "build_mil", "score_bag",
    "save_mil_checkpoint", "load_mil_checkpoint",
    # built-in models, export, devices
    "builtin_model", "BUILTINS", "BuiltinSpec", "DEFAULT_MODEL", "export_model", "export_torchscript", "export_onnx",
    "export_wsinfer", "FORMATS", "resolve_device", "available_devices",
]
