"""Predictor, built-in models, the heatmap job and `slidekit heatmap`: geometry, resume, bad input."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner
from conftest import synthetic_slide
from shapely.geometry import box

from slidekit.annotations.formats import read_annotations
from slidekit.cli import main
from slidekit.infer.heatmap import Heatmap, HeatmapWriter
from slidekit.infer.predictor import Predictor, heatmap_slide
from slidekit.models.builtin import Hematoxylin, builtin_model
from slidekit.models.checkpoint import save_checkpoint
from slidekit.models.networks import ResNetClassifier, ResNetUNet
from slidekit.models.spec import ModelSpec
from slidekit.regions.tiling import TileGrid, TileReader
from slidekit.slides.slide import open_slide

TISSUE_BOX = (512, 256, 1024, 768)  # level-0 x, y, w, h of the synthetic slide's tissue


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic_slide(tmp_path_factory.mktemp("slide") / "s.tif", tissue_box=TISSUE_BOX)


def cli(*args: str):
    return CliRunner().invoke(main, list(args))


def test_hematoxylin_is_rgb2hed() -> None:
    from skimage.color import rgb2hed
    from skimage.data import immunohistochemistry

    rgb = immunohistochemistry()[:128, :128]
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255
    h = Hematoxylin(stride=1).density(x)[0, 0].numpy()
    np.testing.assert_allclose(h, rgb2hed(rgb)[..., 0], atol=1e-5)
    net, spec = builtin_model("hematoxylin")
    y = net(spec.normalize(torch.from_numpy(rgb)[None]))
    assert y.shape == (1, 1, 16, 16) and float(y.min()) >= 0 and float(y.max()) <= 1


class MeanColour(torch.nn.Module):
    """A 'classifier' whose logits are the mean of each input channel: a known function of the tile."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


def test_predictor_batches_match_tiles_with_and_without_workers(slide_path: Path) -> None:
    spec = ModelSpec(classes=["r", "g", "b"], patch_size=64, mpp=2.0, mean=(0, 0, 0), std=(1, 1, 1),
                     activation="none")
    with open_slide(slide_path) as slide:
        grid = TileGrid.from_slide(slide, mpp=2.0, size=64, min_tissue=0)
        reader = TileReader(slide, grid)
        expected = np.stack([reader.read(i).reshape(-1, 3).mean(0) / 255 for i in range(len(grid))])
        for workers in (0, 1):
            pred = Predictor(MeanColour(), spec, device="cpu", batch_size=5, workers=workers)
            got = list(pred.predict(slide, grid))
            idx = np.concatenate([i for i, _ in got])
            assert np.array_equal(idx, np.arange(len(grid)))  # grid order, every tile once
            np.testing.assert_allclose(np.concatenate([y for _, y in got]), expected, atol=1e-5)


def test_heatmap_polygons_line_up_with_the_tissue(tmp_path: Path, slide_path: Path) -> None:
    s = heatmap_slide(slide_path, tmp_path / "out", model="tissue", mpp=2.0, size=64, workers=0,
                      min_tissue=0.05, min_area_um2=500, tiles_geojson=True, progress=False)
    out = tmp_path / "out"
    assert {"heatmap.zarr", "overlay.png", "predictions.geojson", "tiles.geojson", "summary.json"} <= \
        {p.name for p in out.iterdir()}
    assert s["task"] == "segmentation" and s["heatmap_mpp"] == 16.0
    hm = Heatmap(out / "heatmap.zarr")
    anns = read_annotations(out / "predictions.geojson")
    assert len(anns) == 1 and anns[0].label == "Tissue"
    x, y, w, h = TISSUE_BOX
    truth = box(x, y, x + w, y + h)
    geom = anns[0].geometry
    assert geom.intersection(truth).area / geom.union(truth).area > 0.95
    assert np.allclose(geom.bounds, truth.bounds, atol=hm.scale[0])  # within one heatmap pixel
    m = anns[0].measurements
    assert m["Mean probability"] > 0.9 and m["Area µm^2"] == pytest.approx(truth.area * 0.25, rel=0.1)
    tiles = read_annotations(out / "tiles.geojson")
    assert len(tiles) == s["tiles"] and {t.kind for t in tiles} == {"tile"}
    assert "Tissue" in tiles[0].measurements


def test_interrupt_leaves_no_summary_and_resumes(tmp_path: Path, slide_path: Path, monkeypatch) -> None:
    kw = dict(model="hematoxylin", mpp=2.0, size=64, overlap=16, batch_size=4, workers=0,
              min_tissue=0.05, progress=False, chunk=16)  # 64 x 48 px heatmap in 4 x 3 chunks
    out = tmp_path / "run"
    original = HeatmapWriter.add
    calls = {"n": 0}

    def flaky(self, idx, outputs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return original(self, idx, outputs)

    monkeypatch.setattr(HeatmapWriter, "add", flaky)
    with pytest.raises(KeyboardInterrupt):
        heatmap_slide(slide_path, out, **kw)
    assert not (out / "summary.json").exists() and not (out / "heatmap.zarr").exists()
    assert (out / "heatmap.zarr.part").is_dir()
    monkeypatch.setattr(HeatmapWriter, "add", original)
    s = heatmap_slide(slide_path, out, **kw)
    assert 0 < s["tiles_resumed"] < s["tiles"]
    clean = heatmap_slide(slide_path, tmp_path / "clean", **kw)
    a = np.asarray(zarr.open_group(str(out / "heatmap.zarr"), mode="r")["prob"][:])
    b = np.asarray(zarr.open_group(str(tmp_path / "clean" / "heatmap.zarr"), mode="r")["prob"][:])
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert clean["tiles_resumed"] == 0
    again = heatmap_slide(slide_path, out, **kw)
    assert again["skipped"] is True
    # A different threshold reuses the heatmap and only redoes the outputs.
    redo = heatmap_slide(slide_path, out, **{**kw, "threshold": 0.9})
    assert not redo.get("skipped") and redo["tiles_resumed"] == redo["tiles"]


def test_cli_ctrl_c_is_one_line(tmp_path: Path, slide_path: Path, monkeypatch) -> None:
    def interrupted(self, idx, outputs):
        raise KeyboardInterrupt

    monkeypatch.setattr(HeatmapWriter, "add", interrupted)
    r = cli("heatmap", str(slide_path), "--out", str(tmp_path / "o"), "--workers", "0", "-q")
    assert r.exit_code == 130 and "interrupted" in r.output
    assert not (tmp_path / "o" / "summary.json").exists()


def make_checkpoint(path: Path, task: str) -> Path:
    torch.manual_seed(0)
    arch = "resnet-classifier" if task == "classification" else "resnet-unet"
    spec = ModelSpec(arch=arch, task=task, classes=["normal", "tumor"], colors=[(0, 200, 0), (220, 0, 0)],
                     patch_size=64, mpp=2.0)
    net = ResNetClassifier("resnet18", 2) if task == "classification" else ResNetUNet("resnet18", 2)
    return save_checkpoint(path, net, spec)


@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_cli_with_checkpoints_and_several_slides(tmp_path: Path, slide_path: Path, task: str) -> None:
    ckpt = make_checkpoint(tmp_path / f"{task}.pt", task)
    second = synthetic_slide(tmp_path / "t.tif", width=1024, height=1024, tissue_box=(256, 256, 512, 512), seed=1)
    out = tmp_path / "out"
    r = cli("heatmap", str(slide_path), str(second), "--out", str(out), "--model", str(ckpt),
            "--workers", "0", "--min-tissue", "0.05", "--heatmap-mpp", "8", "-q")
    assert r.exit_code == 0, r.output
    for stem in ("s", "t"):
        s = json.loads((out / stem / "summary.json").read_text())
        assert s["task"] == task and s["classes"] == ["normal", "tumor"]
        hm = Heatmap(out / stem / "heatmap.zarr")
        assert hm.prob.shape[0] == 2
        cov = np.asarray(hm.coverage[:])
        p = np.asarray(hm.prob[:])
        assert cov.any() and np.allclose(p.sum(0)[cov], 1.0, atol=1e-4)  # softmax per pixel/tile
        if task == "classification":
            assert hm.scale == (256.0, 256.0)  # one pixel per 64-px tile at 2 µm on a 0.5 µm slide
        else:
            assert hm.mpp == 8.0


def test_cli_bad_inputs_fail_cleanly(tmp_path: Path, slide_path: Path) -> None:
    out = tmp_path / "o"
    r = cli("heatmap", str(tmp_path / "missing.svs"), "--out", str(out))
    assert r.exit_code != 0 and "missing.svs: file not found" in r.output and "Traceback" not in r.output
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    r = cli("heatmap", str(slide_path), "--out", str(out), "--model", str(junk))
    assert r.exit_code != 0 and "junk.pt" in r.output and len(r.output.strip().splitlines()) == 1
    r = cli("heatmap", str(slide_path), "--out", str(out), "--model", "nosuchmodel")
    assert r.exit_code != 0 and "nosuchmodel" in r.output
    blank = synthetic_slide(tmp_path / "blank.tif", width=1024, height=768, tissue_box=None)
    r = cli("heatmap", str(blank), "--out", str(out), "--workers", "0", "-q")
    assert r.exit_code != 0 and "no tissue" in r.output
    r = cli("heatmap", "--out", str(out))
    assert r.exit_code != 0
    assert not out.exists() or not any(out.rglob("summary.json"))


def test_cli_demo_main_job(tmp_path: Path) -> None:
    out = tmp_path / "OUT"
    r = cli("heatmap", "--demo", "--out", str(out), "--model", "tissue", "--workers", "0", "-q")
    assert r.exit_code == 0, r.output
    assert {"demo.tif", "heatmap.zarr", "overlay.png", "predictions.geojson", "summary.json"} <= \
        {p.name for p in out.iterdir()}
    assert json.loads((out / "summary.json").read_text())["regions"] >= 1
    r = cli("heatmap", "--demo", "--out", str(out), "--model", "tissue", "--workers", "0")
    assert r.exit_code == 0 and "skipped" in r.output


class RedChannel(torch.nn.Module):
    """A 'segmentation model' whose output is the red channel, average-pooled by 4."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.avg_pool2d(x[:, :1], 4)


def test_end_to_end_stitching_recovers_position_encoded_in_the_slide(tmp_path: Path) -> None:
    from slidekit.models.builtin import BuiltinSpec
    from slidekit.slides.demo import write_pyramid

    # Red encodes level-0 x (constant over 8-px columns), so every tile sees its own position.
    W, H = 2048, 1024
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[..., 0] = (np.arange(W) // 8).astype(np.uint8)[None, :]
    rgb[..., 1] = 128
    path = write_pyramid(tmp_path / "pos.tif", rgb, 0.5, compression="zlib")
    spec = BuiltinSpec(name="red", classes=["red"], colors=[(255, 0, 0)], patch_size=64, mpp=1.0, output_stride=4)
    with open_slide(path) as slide:
        grid = TileGrid.from_slide(slide, mpp=1.0, size=64, overlap=16, min_tissue=0)
        writer = HeatmapWriter(tmp_path / "h.zarr", grid, "segmentation", ["red"], mpp=4.0, chunk=64)
        pred = Predictor(RedChannel(), spec, device="cpu", batch_size=7, workers=1)
        for idx, y in pred.predict(slide, grid, writer.todo(), output_size=writer.footprint):
            writer.add(idx, y)
        hm = writer.finish()
    assert hm.shape == (128, 256) and np.asarray(hm.coverage[:]).all()
    expected = np.broadcast_to(np.arange(256, dtype=np.float32) / 255, (128, 256))
    np.testing.assert_allclose(np.asarray(hm.prob[0]), expected, atol=1e-5)


def test_unreadable_tile_in_a_worker_is_one_clean_error(slide_path: Path, monkeypatch) -> None:
    from slidekit.base.errors import SlideError

    original = TileReader.read

    def broken(self, i, *args):
        if i == 3:
            raise SlideError("cannot read tile at (1, 2): corrupt JPEG data", self.slide.path)
        return original(self, i, *args)

    monkeypatch.setattr(TileReader, "read", broken)  # forked workers inherit the patch
    spec = ModelSpec(classes=["r", "g", "b"], patch_size=64, mpp=2.0, activation="none")
    with open_slide(slide_path) as slide:
        grid = TileGrid.from_slide(slide, mpp=2.0, size=64, min_tissue=0)
        pred = Predictor(MeanColour(), spec, device="cpu", batch_size=4, workers=1)
        with pytest.raises(SlideError) as e:
            list(pred.predict(slide, grid))
    assert str(e.value) == f"{slide_path}: cannot read tile at (1, 2): corrupt JPEG data"
