"""Named encoders: each architecture built on the meta device matches its published size; weights
files in the published key layout load; wrong files are one line."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from slidekit.base.errors import CheckpointError, ConfigError
from slidekit.models import registry
from slidekit.models.registry import ENCODERS, FoundationEncoder, build_encoder, load_registered_encoder


@pytest.mark.parametrize("name", list(ENCODERS))
def test_meta_build_matches_published_parameter_count(name):
    e = ENCODERS[name]
    with torch.device("meta"):
        net = build_encoder(name)
    assert all(p.is_meta for p in net.parameters())
    n = sum(p.numel() for p in net.parameters())
    assert abs(n / e.params - 1) <= e.params_tolerance, (name, n, e.params)
    if isinstance(net, FoundationEncoder):
        with torch.device("meta"):
            y = net(torch.empty(2, 3, e.input_size, e.input_size))
        assert tuple(y.shape) == (2, e.dim)


def _tiny_file(name, tmp_path, monkeypatch, **change):
    """A randomly initialised 1-block variant's state dict, written as the published file would be."""
    e = ENCODERS[name]
    monkeypatch.setitem(ENCODERS, name, registry.EncoderEntry(**{**e.__dict__, "kwargs": {**e.kwargs, "depth": 1}}))
    torch.manual_seed(0)
    sd = build_encoder(name).model.state_dict()
    sd.update(change)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path, sd


@pytest.mark.parametrize("name", ["uni", "virchow2"])
def test_published_layout_loads_and_embeds(name, tmp_path, monkeypatch):
    path, sd = _tiny_file(name, tmp_path, monkeypatch)
    net, spec, got = load_registered_encoder(name, path)
    assert got == path and spec.mpp == 0.5 and spec.patch_size == 224 and spec.extra["encoder"] == name
    assert torch.equal(net.model.state_dict()["cls_token"], sd["cls_token"])
    with torch.no_grad():
        y = net(torch.rand(1, 3, 224, 224))
    assert y.shape == (1, ENCODERS[name].dim) and torch.isfinite(y).all()
    monkeypatch.setenv("SLIDEKIT_MODELS", str(tmp_path))  # found by its published name
    assert load_registered_encoder(name)[2] == path


def test_wrong_files_are_one_line(tmp_path, monkeypatch):
    path, sd = _tiny_file("uni", tmp_path, monkeypatch)
    with pytest.raises(CheckpointError, match="not found"):
        load_registered_encoder("uni", tmp_path / "nope.safetensors")
    bad = {k: v for k, v in sd.items() if k != "cls_token"}
    bad["blocks.9.extra"] = torch.zeros(1)
    save_file({k: v.contiguous() for k, v in bad.items()}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match=r"1 missing \(e.g. cls_token\), 1 unexpected") as e:
        load_registered_encoder("uni", tmp_path / "other.safetensors")
    assert "\n" not in str(e.value) and "other.safetensors" in str(e.value)
    nan = dict(sd, cls_token=torch.full_like(sd["cls_token"], float("nan")))
    save_file({k: v.contiguous() for k, v in nan.items()}, str(tmp_path / "nan.safetensors"))
    with pytest.raises(CheckpointError, match="NaN"):
        load_registered_encoder("uni", tmp_path / "nan.safetensors")
    monkeypatch.delenv("SLIDEKIT_MODELS", raising=False)
    with pytest.raises(ConfigError, match="never downloads"):
        load_registered_encoder("uni")
    with pytest.raises(ConfigError, match="unknown encoder"):
        build_encoder("gpt")


def test_feature_file_records_the_entry_token_rule(tmp_path, monkeypatch):
    """The HDF5 feature file says which tokens made the feature: virchow2's class + mean patch
    tokens, resnet18's pooling (not 'pooled' for everything)."""
    import torchvision
    from conftest import synthetic_slide

    from slidekit.slidelevel.embed import embed_slide
    from slidekit.slidelevel.feature_store import read_features

    slide = synthetic_slide(tmp_path / "s.tif", width=1024, height=768, tissue_box=(256, 128, 768, 512))
    path, _ = _tiny_file("virchow2", tmp_path, monkeypatch)
    embed_slide(slide, tmp_path / "v.zarr", model="virchow2", weights=path, device="cpu", progress=False,
                features_h5=tmp_path / "v.h5")
    bag = read_features(tmp_path / "v.h5")
    assert bag.encoder["tokens"] == "cls+mean" and bag.encoder["registry"] == "virchow2"
    assert bag.features.shape[1] == 2560  # class token (1280) + mean of the patch tokens (1280)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "resnet18-f37072fd.pth")
    embed_slide(slide, tmp_path / "r.zarr", model="resnet18", weights=tmp_path / "resnet18-f37072fd.pth",
                tile_mpp=4.0, patch_size=32, device="cpu", progress=False, features_h5=tmp_path / "r.h5")
    enc = read_features(tmp_path / "r.h5").encoder
    assert enc["tokens"] == "pooled" and enc["registry"] == "resnet18"
