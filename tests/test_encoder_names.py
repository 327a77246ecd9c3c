"""Encoder names and token rules through `slidekit embed` (issue 29 item 7): registry names in any case,
unknown names listing the known ones, the weights a named encoder needs, a ResNet file of another depth,
and `--tokens` for timm:NAME ViTs; a weights path that is not a regular file (issue 30 item 10)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from slidekit.cli import main
from slidekit.models import registry
from slidekit.models.registry import ENCODERS, build_encoder

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: the shared cores crawl otherwise

VIT = "vit_tiny_patch16_224"


def _embed(*args: str) -> object:
    return CliRunner().invoke(main, ["-q", "embed", *args])


def _one_line(res) -> str:
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert res.exit_code != 0 and len(lines) == 1, res.output
    return lines[0]


def _tiny_uni(tmp_path: Path, monkeypatch) -> Path:
    """A 1-block uni with the published key layout, as the published file would be written."""
    e = ENCODERS["uni"]
    monkeypatch.setitem(ENCODERS, "uni", registry.EncoderEntry(**{**e.__dict__, "kwargs": {**e.kwargs, "depth": 1}}))
    torch.manual_seed(0)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in build_encoder("uni").model.state_dict().items()}, str(path))
    return path


@pytest.fixture
def slide(tmp_path):
    from conftest import synthetic_slide

    return synthetic_slide(tmp_path / "s.tif", width=1024, height=768, tissue_box=(256, 128, 768, 512))


def test_registry_names_match_in_any_case(tmp_path, monkeypatch, slide):
    w = _tiny_uni(tmp_path, monkeypatch)
    res = _embed(str(slide), "--model", "UNI", "--weights", str(w), "--out", str(tmp_path / "e.zarr"),
                 "--h5", str(tmp_path / "e.h5"), "--device", "cpu")
    assert res.exit_code == 0, res.output
    from slidekit.slidelevel.feature_store import read_features

    enc = read_features(tmp_path / "e.h5").encoder
    assert enc["registry"] == "uni" and enc["tokens"] == "cls"


def test_named_encoder_without_weights_says_where_they_go(tmp_path, monkeypatch, slide):
    monkeypatch.delenv("SLIDEKIT_MODELS", raising=False)
    line = _one_line(_embed(str(slide), "--model", "UNI", "--out", str(tmp_path / "e.zarr")))
    assert "uni" in line and "--weights FILE" in line and "$SLIDEKIT_MODELS" in line
    assert "model file not found" not in line


def test_unknown_name_lists_the_known_ones(tmp_path, slide):
    w = tmp_path / "w.pth"
    torch.save({"a": torch.zeros(1)}, w)
    for args in (["--model", "conch", "--weights", str(w)], ["--model", "conch"]):
        line = _one_line(_embed(str(slide), *args, "--out", str(tmp_path / "e.zarr")))
        assert "conch" in line and "timm:NAME" in line and "belongs with" not in line
        assert all(name in line for name in ENCODERS), line


def test_resnet_weights_of_another_depth_name_the_model_to_use(tmp_path, slide):
    import torchvision

    w = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), w)
    line = _one_line(_embed(str(slide), "--model", "resnet50", "--weights", str(w), "--out", str(tmp_path / "e")))
    assert "these are resnet18 weights" in line and "use --model resnet18" in line and "backbone=" not in line


def test_weights_help_names_what_it_is_for():
    res = CliRunner().invoke(main, ["embed", "--help"], terminal_width=200)
    text = " ".join(res.output.split())
    assert "named encoder" in text and "torchvision ResNet" in text and "timm:NAME" in text
    assert "--tokens [cls|mean|cls+mean]" in text


def test_weights_that_are_not_a_regular_file_say_so(tmp_path, slide):
    link = tmp_path / "w.pth"
    os.symlink("/dev/zero", link)
    line = _one_line(_embed(str(slide), "--model", "resnet18", "--weights", str(link), "--out", str(tmp_path / "e")))
    assert "not a regular file" in line and "w.pth" in line and "not found" not in line
    line = _one_line(_embed(str(slide), "--model", f"timm:{VIT}", "--weights", str(link), "--tile-mpp", "2",
                            "--out", str(tmp_path / "e")))
    assert "not a regular file" in line and "w.pth" in line
    (tmp_path / "dir.pth").mkdir()  # the CLI's click.Path refuses a folder itself; the API says what it is
    from slidekit.base.errors import CheckpointError
    from slidekit.models.weights import read_state_dict

    with pytest.raises(CheckpointError, match="not a regular file: a folder"):
        read_state_dict(tmp_path / "dir.pth")


def test_tokens_choose_the_vit_feature_and_are_recorded(tmp_path, slide):
    """`--tokens cls` and `--tokens mean` of one local timm ViT give different features, each recorded
    in the feature file's encoder.tokens; no --tokens keeps today's pooled patch grid."""
    import timm

    from slidekit.slidelevel.embed import embed_slide
    from slidekit.slidelevel.feature_store import read_features

    torch.manual_seed(1)
    w = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model(VIT, pretrained=False).state_dict().items()}, str(w))
    feats, rules = {}, {}
    for tokens in ("cls", "mean", "cls+mean", None):
        tag = tokens or "default"
        args = [str(slide), "--model", f"timm:{VIT}", "--weights", str(w), "--tile-mpp", "4", "--tile-size", "32",
                "--out", str(tmp_path / f"{tag}.zarr"), "--h5", str(tmp_path / f"{tag}.h5"), "--device", "cpu"]
        res = _embed(*args, *(["--tokens", tokens] if tokens else []))
        assert res.exit_code == 0, res.output
        bag = read_features(tmp_path / f"{tag}.h5")
        feats[tag], rules[tag] = np.asarray(bag.features), bag.encoder["tokens"]
    assert rules == {"cls": "cls", "mean": "mean", "cls+mean": "cls+mean", "default": "pooled"}
    assert feats["cls"].shape[1] == feats["mean"].shape[1] == 192 and feats["cls+mean"].shape[1] == 384
    assert not np.allclose(feats["cls"], feats["mean"])
    assert np.allclose(feats["cls+mean"], np.concatenate([feats["cls"], feats["mean"]], 1), atol=1e-5)
    # the API takes it as a flat option; a rerun with another rule recomputes instead of relabelling
    embed_slide(slide, tmp_path / "cls.zarr", model=f"timm:{VIT}", weights=w, tile_mpp=4, patch_size=32,
                tokens="mean", device="cpu", progress=False, features_h5=tmp_path / "again.h5")
    again = read_features(tmp_path / "again.h5")
    assert again.encoder["tokens"] == "mean" and np.allclose(np.asarray(again.features), feats["mean"])


def test_tokens_refused_where_they_do_not_apply(tmp_path, slide):
    import torchvision

    w = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), w)
    line = _one_line(_embed(str(slide), "--model", "resnet18", "--weights", str(w), "--tokens", "cls",
                            "--out", str(tmp_path / "e")))
    assert "--tokens belongs with a timm:NAME model" in line
