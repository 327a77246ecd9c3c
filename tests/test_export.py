"""Models out (issue 11): TorchScript, ONNX and QuPath WSInfer folders match slidekit's Predictor."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from slidekit.base.errors import CheckpointError
from slidekit.models.checkpoint import save_checkpoint
from slidekit.models.export import export_model
from slidekit.models.networks import build_model
from slidekit.models.spec import ModelSpec
from tests.conftest import synthetic_slide

WSINFER_TRANSFORMS = {"Resize", "ToTensor", "Normalize"}
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: the shared cores crawl otherwise


@pytest.fixture(scope="module")
def tiles_and_predict(tmp_path_factory):
    """Tiles of a synthetic slide, and a function running slidekit's Predictor over the same tiles."""
    from slidekit.infer.predictor import Predictor
    from slidekit.regions.tiling import TileGrid, read_tiles
    from slidekit.slides.slide import open_slide

    root = tmp_path_factory.mktemp("export")
    path = synthetic_slide(root / "s.tif", width=1024, height=768, tissue_box=(256, 128, 512, 384))
    slide = open_slide(path)
    grid = TileGrid.from_slide(slide, mpp=2.0, size=32, min_tissue=0)
    index = np.arange(0, len(grid), max(1, len(grid) // 12))[:12]  # glass and tissue tiles
    tiles = np.stack([t for i, (_, t) in enumerate(read_tiles(slide, grid)) if i in set(index.tolist())])

    def predict(model, spec) -> np.ndarray:
        p = Predictor(model, spec, device="cpu", batch_size=5, workers=0)
        outs = dict((int(i), o) for idx, out in p.predict(slide, grid, index) for i, o in zip(idx, out))
        return np.stack([outs[int(i)] for i in index])

    yield tiles, predict
    slide.close()


def _checkpoint(path: Path, **kw) -> tuple[Path, torch.nn.Module, ModelSpec]:
    torch.manual_seed(0)
    spec = ModelSpec(patch_size=32, mpp=2.0, mean=(0.6, 0.5, 0.7), std=(0.2, 0.25, 0.15), **kw)
    net = build_model(spec).eval()
    with torch.no_grad():  # non-trivial batch-norm statistics, so eval mode matters
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return save_checkpoint(path, net, spec), net, spec


def validate_wsinfer_config(cfg: dict) -> None:
    """The fields WSInfer's published model-config schema (spec_version 1.0) requires, checked by hand."""
    required = ("spec_version", "architecture", "num_classes", "patch_size_pixels", "spacing_um_px",
                "class_names", "transform")
    assert isinstance(cfg, dict) and all(k in cfg for k in required), sorted(cfg)
    assert cfg["spec_version"] == "1.0"
    assert isinstance(cfg["architecture"], str)
    assert isinstance(cfg["num_classes"], int) and not isinstance(cfg["num_classes"], bool)
    assert cfg["num_classes"] >= 1
    assert isinstance(cfg["patch_size_pixels"], int) and cfg["patch_size_pixels"] >= 1
    assert isinstance(cfg["spacing_um_px"], (int, float)) and cfg["spacing_um_px"] >= 0
    names = cfg["class_names"]
    assert isinstance(names, list) and all(isinstance(n, str) for n in names)
    assert len(set(names)) == len(names) == cfg["num_classes"]
    assert isinstance(cfg["transform"], list)
    for t in cfg["transform"]:
        assert isinstance(t, dict) and "name" in t and set(t) <= {"name", "arguments"}
        assert t["name"] in WSINFER_TRANSFORMS
        assert isinstance(t.get("arguments", {}), dict)


def run_like_wsinfer(folder: Path, tiles: np.ndarray) -> tuple[dict, np.ndarray]:
    """What WSInfer does with a model folder: the config's transforms, the TorchScript model, softmax."""
    cfg = json.loads((folder / "config.json").read_text())
    model = torch.jit.load(str(folder / "torchscript_model.pt"))
    x = torch.from_numpy(tiles)
    for t in cfg["transform"]:
        args = t.get("arguments", {})
        if t["name"] == "Resize":
            assert args["size"] == tiles.shape[1]  # tiles are read at the patch size already
        elif t["name"] == "ToTensor":
            x = x.permute(0, 3, 1, 2).float() / 255.0
        elif t["name"] == "Normalize":
            x = (x - torch.tensor(args["mean"]).view(1, 3, 1, 1)) / torch.tensor(args["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        return cfg, model(x).softmax(dim=1).numpy()


def test_wsinfer_folder_matches_predictor_and_schema(tmp_path, tiles_and_predict):
    tiles, predict = tiles_and_predict
    ckpt, net, spec = _checkpoint(tmp_path / "c.pt", classes=["stroma", "tumour", "fat"])
    folder = export_model(ckpt, "wsinfer", tmp_path / "wsinfer" / "my_model")
    cfg, got = run_like_wsinfer(folder, tiles)
    validate_wsinfer_config(cfg)
    assert cfg["class_names"] == ["stroma", "tumour", "fat"] and cfg["spacing_um_px"] == 2.0
    assert cfg["patch_size_pixels"] == 32 and cfg["architecture"] == "resnet18"
    want = predict(net, spec)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_wsinfer_sigmoid_classifier_becomes_two_classes(tmp_path, tiles_and_predict):
    tiles, predict = tiles_and_predict
    ckpt, net, spec = _checkpoint(tmp_path / "c.pt", classes=["tumour"], activation="sigmoid")
    cfg, got = run_like_wsinfer(export_model(ckpt, "wsinfer", tmp_path / "m"), tiles)
    validate_wsinfer_config(cfg)
    assert cfg["class_names"] == ["not tumour", "tumour"]
    np.testing.assert_allclose(got[:, 1], predict(net, spec)[:, 0], atol=1e-5, rtol=0)


def test_wsinfer_refuses_segmenters(tmp_path):
    ckpt, _, _ = _checkpoint(tmp_path / "c.pt", arch="resnet-unet", task="segmentation")
    with pytest.raises(CheckpointError, match="WSInfer runs patch classifiers"):
        export_model(ckpt, "wsinfer", tmp_path / "m")


@pytest.mark.parametrize("kw", [dict(classes=["a", "b"]),
                                dict(arch="resnet-unet", task="segmentation", classes=["bg", "nucleus"]),
                                dict(backbone="timm:convnext_atto", classes=["a", "b"])])
def test_torchscript_and_onnx_match_predictor(tmp_path, tiles_and_predict, kw):
    import onnxruntime as ort

    tiles, predict = tiles_and_predict
    ckpt, net, spec = _checkpoint(tmp_path / "c.pt", **kw)
    want = predict(net, spec)
    x = torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255.0
    ts = torch.jit.load(str(export_model(ckpt, "torchscript", tmp_path / "m.pt")))
    with torch.no_grad():
        np.testing.assert_allclose(ts(x).numpy(), want, atol=1e-5, rtol=0)
    sess = ort.InferenceSession(str(export_model(ckpt, "onnx", tmp_path / "m.onnx")),
                                providers=["CPUExecutionProvider"])
    got = sess.run(None, {"image": x.numpy()})[0]
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    meta = sess.get_modelmeta().custom_metadata_map
    assert json.loads(meta["slidekit_spec"])["classes"] == spec.classes


def test_cli_export(tmp_path):
    from click.testing import CliRunner

    from slidekit.cli import main

    ckpt, _, _ = _checkpoint(tmp_path / "c.pt")
    res = CliRunner().invoke(main, ["export", str(ckpt), "--to", "wsinfer", str(tmp_path / "m")])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "torchscript_model.pt"]
    res = CliRunner().invoke(main, ["export", str(tmp_path / "missing.pt"), "--to", "onnx", str(tmp_path / "m.onnx")])
    assert res.exit_code != 0 and "checkpoint file not found" in res.output and "Traceback" not in res.output


@pytest.mark.parametrize("to,name", [("torchscript", "m.pt"), ("onnx", "m.onnx")])
def test_export_refuses_what_slidekit_did_not_write(tmp_path, to, name):
    """A folder (or a user's own file) at the export path is refused with one line, and kept; a
    file slidekit exported there before is replaced."""
    from click.testing import CliRunner

    from slidekit.cli import main

    if to == "onnx":
        pytest.importorskip("onnx")
    ckpt, _, _ = _checkpoint(tmp_path / "c.pt")
    folder = tmp_path / name
    folder.mkdir()
    (folder / "mine.txt").write_text("user data")
    res = CliRunner().invoke(main, ["export", str(ckpt), "--to", to, str(folder)])
    assert res.exit_code != 0 and "not" in res.output and "Traceback" not in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1, res.output
    assert (folder / "mine.txt").read_text() == "user data"
    own = tmp_path / f"own.{name}"
    own.write_bytes(b"my own model")
    res = CliRunner().invoke(main, ["export", str(ckpt), "--to", to, str(own)])
    assert res.exit_code != 0 and own.read_bytes() == b"my own model", res.output
    out = tmp_path / f"ours.{name}"
    for _ in range(2):  # a rerun replaces slidekit's own export
        res = CliRunner().invoke(main, ["export", str(ckpt), "--to", to, str(out)])
        assert res.exit_code == 0, res.output


def test_wsinfer_export_keeps_a_users_files(tmp_path):
    from click.testing import CliRunner

    from slidekit.cli import main

    ckpt, _, _ = _checkpoint(tmp_path / "c.pt")
    for names in (["config.json"], ["config.json", "torchscript_model.pt"], ["torchscript_model.pt"]):
        folder = tmp_path / "-".join(names)
        folder.mkdir()
        for n in names:
            (folder / n).write_text(f"my {n}")
        res = CliRunner().invoke(main, ["export", str(ckpt), "--to", "wsinfer", str(folder)])
        assert res.exit_code != 0 and "refusing" in res.output and "Traceback" not in res.output, res.output
        assert all((folder / n).read_text() == f"my {n}" for n in names)
    out = tmp_path / "m"
    for _ in range(2):
        res = CliRunner().invoke(main, ["export", str(ckpt), "--to", "wsinfer", str(out)])
        assert res.exit_code == 0, res.output
