"""Models: the checkpoint's self-description (``spec``), backbones by name (``backbones``), networks
(``networks``), the checkpoint file (``checkpoint``), encoder weights from files (``weights``),
built-in models that need no training (``builtin``), export to TorchScript/ONNX/WSInfer (``export``).

Imports: ``slidekit.base``, ``slidekit.annotations`` (class colours), ``slidekit.stain`` (the
normaliser a checkpoint records). Loads torch.
"""
from slidekit.base.devices import available_devices, resolve_device
from slidekit.models.backbones import ResNetEncoder, TimmEncoder, is_timm, make_encoder
from slidekit.models.builtin import builtin_model
from slidekit.models.checkpoint import Checkpoint, load_checkpoint, read_checkpoint, save_checkpoint, transfer_encoder
from slidekit.models.export import export_model
from slidekit.models.networks import PyramidUNet, ResNetClassifier, ResNetUNet, build_model
from slidekit.models.spec import ARCHS, BACKBONES, TASKS, ModelSpec
from slidekit.models.weights import init_from, load_embedding_encoder, read_state_dict

__all__ = ["ModelSpec", "ARCHS", "BACKBONES", "TASKS", "build_model", "ResNetClassifier", "ResNetUNet",
           "PyramidUNet", "ResNetEncoder", "TimmEncoder", "make_encoder", "is_timm", "Checkpoint",
           "save_checkpoint", "read_checkpoint", "load_checkpoint", "transfer_encoder", "init_from",
           "load_embedding_encoder", "read_state_dict", "builtin_model", "export_model", "resolve_device",
           "available_devices"]
