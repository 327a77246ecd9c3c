"""Encoders in (issue 11): timm models by name with local weights, torchvision state dicts, --init."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from slidekit.base.errors import CheckpointError, ConfigError, GridError
from slidekit.models.backbones import TimmEncoder
from slidekit.models.checkpoint import load_checkpoint, save_checkpoint
from slidekit.models.encoders import load_embedding_encoder
from slidekit.models.networks import build_model
from slidekit.models.spec import ModelSpec
from slidekit.models.weights import init_from, read_state_dict

CNN, VIT = "convnext_atto", "vit_tiny_patch16_224"


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: the shared cores crawl otherwise


def timm_weights(path: Path, name: str, seed: int = 1) -> Path:
    """A randomly initialised timm model (classifier included) saved as .safetensors or .pth."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    sd = {k: v.contiguous() for k, v in timm.create_model(name, pretrained=False).state_dict().items()}
    if path.suffix == ".safetensors":
        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    return path


@pytest.mark.parametrize("name,suffix", [(CNN, ".safetensors"), (VIT, ".pth")])
def test_timm_weights_initialise_classifier_and_unet(tmp_path, name, suffix):
    w = timm_weights(tmp_path / f"w{suffix}", name)
    sd = read_state_dict(w)
    for arch in ("resnet-classifier", "resnet-unet"):
        spec = ModelSpec(arch=arch, backbone=f"timm:{name}", patch_size=64,
                         task="segmentation" if arch == "resnet-unet" else "classification")
        net = build_model(spec).eval()
        assert isinstance(net.encoder, TimmEncoder)
        loaded = init_from(net, w)
        own = net.encoder.model.state_dict()
        assert loaded and all(torch.equal(own[k], sd[k]) for k in loaded)
        out = net(torch.rand(2, 3, 64, 64))
        assert out.shape == ((2, 2, 64, 64) if arch == "resnet-unet" else (2, 2))


def test_timm_checkpoint_round_trip(tmp_path):
    spec = ModelSpec(arch="resnet-unet", backbone=f"timm:{CNN}", task="segmentation", patch_size=64)
    torch.manual_seed(0)
    net = build_model(spec).eval()
    path = save_checkpoint(tmp_path / "c.pt", net, spec)
    ck = load_checkpoint(path)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(ck.model(x), net(x))
    assert ck.spec.backbone == f"timm:{CNN}"


def test_torchvision_state_dict_and_wrong_backbone(tmp_path):
    import torchvision

    torch.manual_seed(2)
    tv = torchvision.models.resnet18(weights=None)
    torch.save(tv.state_dict(), tmp_path / "resnet18.pth")
    net = build_model(ModelSpec(backbone="resnet18"))
    init_from(net, tmp_path / "resnet18.pth")
    assert torch.equal(net.encoder.layer4[1].conv2.weight, tv.layer4[1].conv2.weight)
    with pytest.raises(CheckpointError, match="resnet18 weights but the network's backbone is resnet34"):
        init_from(build_model(ModelSpec(backbone="resnet34")), tmp_path / "resnet18.pth")
    # a timm file given for a ResNet network is named as what it is not
    timm_weights(tmp_path / "t.safetensors", CNN)
    with pytest.raises(CheckpointError, match="nor a torchvision ResNet"):
        init_from(net, tmp_path / "t.safetensors")


def test_missing_and_mismatched_weights_are_one_line(tmp_path):
    net = build_model(ModelSpec(backbone=f"timm:{CNN}"))
    with pytest.raises(CheckpointError, match="weights file not found") as e:
        init_from(net, tmp_path / "nope.safetensors")
    assert "\n" not in str(e.value) and "nope.safetensors" in str(e.value)
    timm_weights(tmp_path / "vit.safetensors", VIT)
    with pytest.raises(CheckpointError, match="weights do not fit timm:convnext_atto"):
        init_from(net, tmp_path / "vit.safetensors")
    with pytest.raises(ConfigError, match="unknown timm model"):
        build_model(ModelSpec(backbone="timm:no_such_net"))


def test_cli_train_with_timm_init(tmp_path):
    from click.testing import CliRunner

    from slidekit.cli import main
    from tests.test_scribble_trainer import make_nuclei_folder

    root = make_nuclei_folder(tmp_path / "d", n_images=1, size=48)
    w = timm_weights(tmp_path / "w.safetensors", CNN)
    base = ["train", "scribble", "--out", str(tmp_path / "run"), "--device", "cpu", "--quiet",
            "--set", f"data={root}", "--set", "crop=32", "--set", "batch_size=2", "--set", "samples_per_image=2",
            "--set", "epochs=1", "--init", f"timm:{CNN}"]
    res = CliRunner().invoke(main, base)
    assert res.exit_code != 0 and "needs --weights FILE" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(main, base + ["--weights", str(tmp_path / "missing.safetensors")])
    assert res.exit_code != 0 and "weights file not found" in res.output
    res = CliRunner().invoke(main, base + ["--weights", str(w)])
    assert res.exit_code == 0, res.output
    ck = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert ck.spec.backbone == f"timm:{CNN}" and ck.spec.trainer_config["init"] == str(w)
    # the stem saw one epoch at lr 1e-3 from the file's weights: close to them, far from a fresh draw
    stem = read_state_dict(w)["stem.0.weight"]
    got = ck.model.encoder.model.state_dict()["stem.0.weight"]
    assert (got - stem).abs().mean() < 0.2 * stem.abs().mean()


def test_embed_with_timm_encoder(tmp_path):
    from slidekit.slidelevel.embed import embed_slide, open_embeddings
    from tests.conftest import synthetic_slide

    slide = synthetic_slide(tmp_path / "s.tif", width=1024, height=768, tissue_box=(256, 128, 512, 384))
    w = timm_weights(tmp_path / "w.safetensors", CNN)
    with pytest.raises(ConfigError, match="--tile-mpp"):
        load_embedding_encoder(f"timm:{CNN}", w)
    out = embed_slide(slide, tmp_path / "e.zarr", model=f"timm:{CNN}", weights=w, tile_mpp=2.0, patch_size=32,
                      device="cpu", progress=False)
    emb = open_embeddings(out)
    assert emb.features.shape[1] == 320 and emb.coords.shape[0] > 0
    assert np.isfinite(np.asarray(emb.features[:])).all()


def test_fine_tune_keeps_a_timm_backbone():
    from slidekit.slidelevel.linear_eval import fine_tune

    torch.manual_seed(0)
    net = build_model(ModelSpec(arch="resnet-encoder", backbone=f"timm:{CNN}", task="embedding", classes=[],
                                patch_size=32, activation="none"))
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(8)]
    labels = ["a", "b"] * 4
    out = fine_tune(net, imgs, labels, imgs[:4], labels[:4], epochs=1, batch_size=4, size=32)
    assert len(out["predictions"]) == 4


def _nan_weights(path: Path, value: float = float("nan")) -> Path:
    """``timm_weights`` with one value of the stem made non-finite."""
    import timm
    from safetensors.torch import save_file

    sd = {k: v.contiguous() for k, v in timm.create_model(CNN, pretrained=False).state_dict().items()}
    sd["stem.0.weight"].view(-1)[3] = value
    save_file(sd, str(path)) if path.suffix == ".safetensors" else torch.save(sd, path)
    return path


@pytest.mark.parametrize("suffix,value", [(".safetensors", float("nan")), (".pth", float("inf"))])
def test_non_finite_weights_are_refused_on_load(tmp_path, suffix, value):
    w = _nan_weights(tmp_path / f"w{suffix}", value)
    with pytest.raises(CheckpointError, match=r"stem\.0\.weight.*non-finite") as e:
        read_state_dict(w)
    assert str(w) in str(e.value) and "\n" not in str(e.value)
    model = build_model(ModelSpec(task="classification", backbone=f"timm:{CNN}", classes=["a", "b"]))
    with pytest.raises(CheckpointError, match="non-finite"):
        init_from(model, w)
    with torch.no_grad():  # a slidekit checkpoint holding NaN is refused the same way
        next(model.parameters()).view(-1)[0] = float("nan")
    save_checkpoint(tmp_path / "c.pt", model, ModelSpec(task="classification", backbone=f"timm:{CNN}",
                                                         classes=["a", "b"]))
    with pytest.raises(CheckpointError, match="non-finite") as e:
        load_checkpoint(tmp_path / "c.pt")
    assert "c.pt" in str(e.value)


def test_non_finite_features_are_never_written(tmp_path, monkeypatch):
    """Past the loaders (here: their check switched off), NaN outputs stop the run with an error and the
    store stays incomplete."""
    import slidekit.models.weights as weights
    from slidekit.slidelevel.embed import embed_slide, open_embeddings
    from tests.conftest import synthetic_slide

    slide = synthetic_slide(tmp_path / "s.tif", width=1024, height=768, tissue_box=(256, 128, 512, 384))
    w = _nan_weights(tmp_path / "w.safetensors")
    monkeypatch.setattr(weights, "check_finite", lambda sd, path: None)
    with pytest.raises(CheckpointError, match="non-finite outputs"):
        embed_slide(slide, tmp_path / "e.zarr", model=f"timm:{CNN}", weights=w, tile_mpp=2.0, patch_size=32,
                    device="cpu", progress=False)
    with pytest.raises(GridError):  # no store was written
        open_embeddings(tmp_path / "e.zarr")
