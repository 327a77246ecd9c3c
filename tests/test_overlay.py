"""Readable overlays (legend: colour bar or class names, slide name, scale bar) and the pyramidal
heatmap TIFF at the heatmap MPP (`slidekit heatmap --tiff`)."""
from __future__ import annotations

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner
from conftest import synthetic_slide
from PIL import Image

from slidekit.cli import main
from slidekit.infer.heatmap import Heatmap, HeatmapWriter
from slidekit.infer.heatmap_tiff import write_heatmap_tiff
from slidekit.infer.legend import read_legend
from slidekit.regions.tiling import TileGrid
from slidekit.slides.slide import open_slide

CLASSES = ["background", "Tumor", "Stroma"]
COLORS = [(255, 255, 255), (220, 20, 60), (30, 144, 255)]


@pytest.fixture
def slide(tmp_path):
    return synthetic_slide(tmp_path / "case_17.tif")


@pytest.fixture
def three_class(tmp_path, slide):
    """A classification heatmap with known classes: left third Tumor, the rest Stroma."""
    with open_slide(slide) as s:
        grid = TileGrid.from_slide(s, mpp=1.0, size=16, min_tissue=0)  # 64 x 48 cells
    w = HeatmapWriter(tmp_path / "hm.zarr", grid, "classification", CLASSES, COLORS)
    tumor = grid.coords[:, 0] < s.dimensions[0] / 3
    probs = np.where(tumor[:, None], [0.05, 0.9, 0.05], [0.05, 0.05, 0.9]).astype(np.float32)
    w.add(np.arange(len(grid)), probs)
    return w.finish()


def test_overlay_legend_names_the_classes_with_their_colours(tmp_path, slide, three_class):
    with open_slide(slide) as s:
        thumb_h = s.read_whole(max(s.mpp[0], s.dimensions[0] * s.mpp[0] / 1024)).shape[0]
        img = three_class.overlay(s, tmp_path / "overlay.png", max_size=1024)
    info = read_legend(tmp_path / "overlay.png")
    assert info["kind"] == "classes" and [c["name"] for c in info["classes"]] == ["Tumor", "Stroma"]
    assert [tuple(c["color"]) for c in info["classes"]] == COLORS[1:]
    assert info["slide"] == "case_17.tif"
    panel = np.asarray(Image.open(tmp_path / "overlay.png"))[thumb_h:]
    assert img.shape[0] > thumb_h and panel.shape[0] > 20
    for color in COLORS[1:]:  # each class's swatch is drawn in the legend panel
        assert (panel == color).all(-1).sum() >= 25
    # the scale bar: a nice length, drawn at the overlay's pixel size
    assert info["scale_bar_um"] in {m * 10 ** k for m in (1, 2, 5) for k in range(0, 5)}
    assert info["scale_bar_px"] == round(info["scale_bar_um"] / info["overlay_um_per_px"])


def test_one_class_overlay_has_a_colour_bar_with_the_value_range(tmp_path, slide, one_torch_thread):
    res = CliRunner().invoke(main, ["heatmap", str(slide), "--out", str(tmp_path / "hm"), "--workers", "0", "-q"])
    assert res.exit_code == 0, res.output
    info = read_legend(tmp_path / "hm" / "overlay.png")
    assert info["kind"] == "colorbar" and info["range"] == [0.0, 1.0] and "Hematoxylin" in info["label"]
    hm = Heatmap(tmp_path / "hm" / "heatmap.zarr")
    cov = np.asarray(hm.coverage[:])
    vals = np.asarray(hm.prob[0])[cov]
    lo, hi = info["observed"]
    assert lo == pytest.approx(vals.min(), abs=0.05) and hi == pytest.approx(vals.max(), abs=0.05)


@pytest.mark.parametrize("mode", ["rgb", "values"])
def test_heatmap_tiff_has_the_heatmap_mpp_and_values(tmp_path, three_class, mode):
    path = write_heatmap_tiff(three_class, tmp_path / "hm.tif", mode=mode, min_size=16)
    H, W = three_class.shape
    with tifffile.TiffFile(path) as tf:
        pages = list(tf.pages)
        assert pages[0].shape[:2] == (H, W) and len(pages) >= 2
        for p in pages:
            num, den = p.tags["XResolution"].value
            assert p.tags["ResolutionUnit"].value == 3  # centimetre
            assert num / den == pytest.approx(1e4 / (three_class.mpp * W / p.shape[1]), rel=1e-3)
            assert p.is_tiled
        a = pages[0].asarray()
    cov = np.asarray(three_class.coverage[:])
    prob = np.asarray(three_class.prob[:])
    if mode == "values":
        np.testing.assert_allclose(a[cov], np.moveaxis(prob, 0, -1)[cov])
        assert np.isnan(a[~cov]).all()
    else:
        lab = prob.argmax(0)
        np.testing.assert_array_equal(a[cov & (lab == 1)], np.tile(COLORS[1], ((cov & (lab == 1)).sum(), 1)))
        np.testing.assert_array_equal(a[cov & (lab == 2)], np.tile(COLORS[2], ((cov & (lab == 2)).sum(), 1)))
    if mode == "rgb":  # a slide reader opens it with the heatmap's pixel size
        with open_slide(path) as s:
            assert s.mpp == pytest.approx((three_class.mpp, three_class.mpp))


def test_cli_tiff_is_claimed_and_never_replaces_a_users_file(tmp_path, slide, one_torch_thread):
    out = tmp_path / "hm"
    out.mkdir()
    (out / "heatmap.tif").write_bytes(b"mine")
    res = CliRunner().invoke(main, ["heatmap", str(slide), "--out", str(out), "--tiff", "rgb", "--workers", "0", "-q"])
    assert res.exit_code != 0 and "heatmap.tif" in res.output
    assert (out / "heatmap.tif").read_bytes() == b"mine"
    res = CliRunner().invoke(main, ["heatmap", str(slide), "--out", str(tmp_path / "h2"), "--tiff", "rgb",
                                    "--workers", "0", "-q"])
    assert res.exit_code == 0, res.output
    with open_slide(tmp_path / "h2" / "heatmap.tif") as s:
        hm = Heatmap(tmp_path / "h2" / "heatmap.zarr")
        assert s.mpp == pytest.approx((hm.mpp, hm.mpp)) and s.dimensions == hm.shape[::-1]
