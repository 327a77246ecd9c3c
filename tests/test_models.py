"""Checkpoints describe themselves; bad checkpoints are rejected; encoders transfer."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import slidekit as sk
from slidekit.models.checkpoint import CHECKPOINT_FORMAT, load_checkpoint, save_checkpoint, transfer_encoder
from slidekit.models.networks import ResNetClassifier, ResNetUNet, build_model
from slidekit.models.spec import ModelSpec


def test_networks_shapes():
    x = torch.randn(2, 3, 64, 64)
    assert ResNetClassifier("resnet18", 3)(x).shape == (2, 3)
    assert ResNetUNet("resnet18", 2)(x).shape == (2, 2, 64, 64)
    assert ResNetUNet("resnet18", 2)(torch.randn(1, 3, 72, 88)).shape == (1, 2, 72, 88)
    assert ResNetClassifier("resnet18", 2).features(x).shape == (2, 512)


def test_checkpoint_roundtrip_keeps_spec_and_weights(tmp_path):
    spec = ModelSpec(arch="resnet-unet", task="segmentation", classes=["background", "tumour"],
                     colors=[(0, 0, 0), (200, 0, 0)], patch_size=128, mpp=1.0, mean=(0.5,) * 3, std=(0.5,) * 3)
    model = build_model(spec)
    path = save_checkpoint(tmp_path / "m.pt", model, spec, extra={"epoch": 3})
    ckpt = sk.load_checkpoint(path)
    assert dataclasses.asdict(ckpt.spec) == dataclasses.asdict(spec)
    assert ckpt.extra == {"epoch": 3} and not ckpt.model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, ckpt.model.state_dict()[k])
    assert ckpt.spec.slidekit_version == sk.__version__


def test_spec_normalize_and_activate():
    spec = ModelSpec(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    x = torch.tensor([[[[0, 255, 0]]]], dtype=torch.uint8)  # (1, 1, 1, 3) HWC
    out = spec.normalize(x)
    assert out.shape == (1, 3, 1, 1) and out.flatten().tolist() == [-1.0, 1.0, -1.0]
    probs = spec.activate(torch.tensor([[1.0, 1.0]]))
    assert probs.tolist() == [[0.5, 0.5]]


def test_bad_checkpoints_are_rejected_with_the_file_named(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00not a checkpoint")
    with pytest.raises(sk.CheckpointError, match="junk.pt: not a readable checkpoint"):
        load_checkpoint(junk)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(sk.CheckpointError, match="not a slidekit checkpoint"):
        load_checkpoint(foreign)
    future = tmp_path / "future.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "version": 99, "spec": {}, "state_dict": {}}, future)
    with pytest.raises(sk.CheckpointError, match="version 99"):
        load_checkpoint(future)
    spec = ModelSpec(classes=["a", "b", "c"])
    mismatched = tmp_path / "mismatch.pt"
    save_checkpoint(mismatched, build_model(ModelSpec(classes=["a", "b"])), spec)
    with pytest.raises(sk.CheckpointError, match="do not match"):
        load_checkpoint(mismatched)
    with pytest.raises(sk.CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_transfer_encoder_copies_weights_between_architectures(tmp_path):
    seg = ResNetUNet("resnet18", 2)
    path = save_checkpoint(tmp_path / "seg.pt", seg, ModelSpec(arch="resnet-unet", task="segmentation"))
    clf = ResNetClassifier("resnet18", 5)
    names = transfer_encoder(path, clf)
    assert "conv1.weight" in names and len(names) > 100
    for k, v in seg.encoder.state_dict().items():
        assert torch.equal(v, clf.encoder.state_dict()[k])
    with pytest.raises(sk.CheckpointError, match="encoders differ"):
        transfer_encoder(seg, ResNetClassifier("resnet34", 2))


def test_unknown_architecture_is_a_checkpoint_error():
    with pytest.raises(sk.CheckpointError, match="unknown architecture"):
        ModelSpec(arch="vit-huge")


@pytest.mark.parametrize("field, value, match", [
    ("patch_size", "big", "'patch_size' must be an integer between 1 and 8192"),
    ("patch_size", 0, "'patch_size' must be an integer between 1 and 8192"),
    ("patch_size", 100_000, "'patch_size' must be an integer between 1 and 8192"),  # allocator crash before
    ("mpp", -0.5, "'mpp' must be a finite number >= 0.01"),
    ("mpp", [0.5], "'mpp' must be a finite number >= 0.01"),
    ("mpp", 1e-6, "'mpp' must be a finite number >= 0.01"),  # a million-fold upsampling before
    ("classes", "tumour", "'classes' must be a list of class names"),
    ("colors", [[300, 0, 0], [0, 0, 0]], "'colors' must be one"),
    ("mean", [0.5, 0.5], "'mean' must be three numbers"),
    ("std", [0, 1, 1], "'std' must be > 0"),
    ("task", "regression", "unknown task"),
    ("output_stride", 0.5, "'output_stride' must be an integer"),
    ("extra", [], "'extra' must be a mapping"),
])
def test_hand_edited_spec_is_one_line(tmp_path, field, value, match):
    path = save_checkpoint(tmp_path / "ok.pt", build_model(ModelSpec()), ModelSpec())
    payload = torch.load(path, weights_only=True)
    payload["spec"][field] = value
    edited = tmp_path / "edited.pt"
    torch.save(payload, edited)
    with pytest.raises(sk.CheckpointError, match=match) as err:
        load_checkpoint(edited)
    assert str(err.value).startswith(str(edited)) and "\n" not in str(err.value)


def test_spec_that_is_not_a_mapping_is_one_line(tmp_path):
    path = save_checkpoint(tmp_path / "ok.pt", build_model(ModelSpec()), ModelSpec())
    payload = torch.load(path, weights_only=True)
    payload["spec"] = "resnet18"
    torch.save(payload, tmp_path / "edited.pt")
    with pytest.raises(sk.CheckpointError, match="edited.pt: the model spec is a str, not a mapping"):
        load_checkpoint(tmp_path / "edited.pt")
