"""Slide maps as OME-Zarr (NGFF 0.4) multiscale images, read back with ome-zarr-py's reader."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import synthetic_slide

from slidekit.infer.heatmap import HeatmapWriter
from slidekit.infer.ome_zarr import MapMetadata, ZarrLayout, write_heatmap_ome_zarr, write_ome_zarr
from slidekit.regions.tiling import TileGrid
from slidekit.slides.slide import open_slide

ome_zarr = pytest.importorskip("ome_zarr", reason="ome-zarr (ome-zarr-py) is not installed")
from ome_zarr.io import parse_url  # noqa: E402
from ome_zarr.reader import Multiscales, Reader  # noqa: E402

CLASSES = ["background", "Tumor", "Stroma"]
COLORS = [(255, 255, 255), (220, 20, 60), (30, 144, 255)]


def read_back(path):
    """(pyramid arrays, multiscales metadata) through ome-zarr-py's Reader."""
    nodes = list(Reader(parse_url(str(path)))())
    node = nodes[0]
    assert node.load(Multiscales) is not None
    return [np.asarray(d) for d in node.data], node.metadata


def test_generic_map_round_trips_with_physical_pixel_sizes(tmp_path):
    rng = np.random.default_rng(0)
    vals = rng.random((2, 600, 1100)).astype(np.float32)
    path = write_ome_zarr(vals, tmp_path / "m.ome.zarr", mpp=4.0, meta=MapMetadata(channels=["a", "b"],
                          origin_um=(10.0, 20.0)), layout=ZarrLayout(chunk=128, band=256, min_size=200))
    levels, meta = read_back(path)
    assert [lv.shape for lv in levels] == [(2, 600, 1100), (2, 300, 550), (2, 150, 275)]
    np.testing.assert_array_equal(levels[0], vals)
    # each level is the 2x2 mean of the one above it
    np.testing.assert_allclose(levels[1], vals.reshape(2, 300, 2, 550, 2).mean((2, 4)), rtol=1e-6)
    scales = [t[0]["scale"] for t in meta["coordinateTransformations"]]
    assert scales == [[1.0, 4.0, 4.0], [1.0, 8.0, 8.0], [1.0, 16.0, 16.0]]
    assert meta["coordinateTransformations"][0][1]["translation"] == [0.0, 20.0, 10.0]
    assert [a["name"] for a in meta["axes"]] == ["c", "y", "x"]
    assert meta["axes"][1]["unit"] == "micrometer"
    assert meta["channel_names"] == ["a", "b"]  # channel labels from omero


def test_heatmap_as_ome_zarr_has_class_channels_and_nan_outside_tissue(tmp_path):
    slide = synthetic_slide(tmp_path / "s.tif")
    with open_slide(slide) as s:
        grid = TileGrid.from_slide(s, mpp=1.0, size=16, min_tissue=0)
        slide_mpp = s.mpp[0]
    grid = grid.subset(grid.coords[:, 1] < grid.coords[:, 1].max() / 2)  # top half predicted only
    w = HeatmapWriter(tmp_path / "hm.zarr", grid, "classification", CLASSES, COLORS)
    w.add(np.arange(len(grid)), np.tile(np.float32([[0.1, 0.7, 0.2]]), (len(grid), 1)))
    hm = w.finish()
    path = write_heatmap_ome_zarr(hm, tmp_path / "heatmap.ome.zarr", layout=ZarrLayout(min_size=8))
    levels, meta = read_back(path)
    assert levels[0].shape == (3, *hm.shape) and len(levels) >= 2
    cov = np.asarray(hm.coverage[:]).astype(bool)
    assert cov.any() and not cov.all()
    np.testing.assert_allclose(levels[0][:, cov], np.asarray(hm.prob[:])[:, cov])
    assert np.isnan(levels[0][:, ~cov]).all()
    assert meta["coordinateTransformations"][0][0]["scale"][1:] == [hm.mpp, hm.mpp]
    ox, oy = hm.origin
    assert meta["coordinateTransformations"][0][1]["translation"] == pytest.approx([0, oy * slide_mpp, ox * slide_mpp])
    assert meta["channel_names"] == CLASSES and meta["name"] == "slidekit heatmap (classification)"
    assert not list(tmp_path.glob(".heatmap.ome.zarr*"))  # no temporary left behind


def test_bad_pixel_size_is_refused(tmp_path):
    with pytest.raises(ValueError, match="pixel size"):
        write_ome_zarr(np.zeros((1, 4, 4), np.float32), tmp_path / "x.ome.zarr", mpp=0)
    assert not (tmp_path / "x.ome.zarr").exists()


def test_heatmap_cli_writes_ome_zarr_on_request(tmp_path, one_torch_thread):
    from click.testing import CliRunner

    from slidekit.cli import main

    slide = synthetic_slide(tmp_path / "s.tif")
    res = CliRunner().invoke(main, ["heatmap", str(slide), "--out", str(tmp_path / "hm"), "--workers", "0", "-q",
                                    "--ome-zarr"])
    assert res.exit_code == 0, res.output
    levels, meta = read_back(tmp_path / "hm" / "heatmap.ome.zarr")
    from slidekit.infer.heatmap import Heatmap
    assert meta["channel_names"] == Heatmap(tmp_path / "hm" / "heatmap.zarr").classes
    assert np.nanmax(levels[0]) <= 1.0 and np.isfinite(levels[0]).any()
