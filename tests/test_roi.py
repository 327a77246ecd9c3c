"""Region-limited heatmaps (`slidekit heatmap --roi/--roi-class`) and tissue-detection options on
heatmap, tile and embed."""
from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import synthetic_slide
from shapely.geometry import box

from slidekit.annotations.formats import write_geojson
from slidekit.annotations.objects import Annotation
from slidekit.cli import main
from slidekit.infer.heatmap import Heatmap

ROI = (600, 300, 1000, 700)  # level-0 box inside the synthetic tissue (512, 256)-(1536, 1024)


@pytest.fixture
def slide(tmp_path):
    return synthetic_slide(tmp_path / "s.tif")


@pytest.fixture
def roi_file(tmp_path):
    return write_geojson([Annotation(box(*ROI), label="Tumor"),
                          Annotation(box(1300, 700, 1500, 1000), label="Other")], tmp_path / "roi.geojson")


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _centres(hm):
    (sx, sy), (ox, oy) = hm.scale, hm.origin
    H, W = hm.shape
    return ox + (np.arange(W) + 0.5) * sx, oy + (np.arange(H) + 0.5) * sy


@pytest.mark.parametrize("model", ["hematoxylin", "tissue"])
def test_roi_heatmap_is_empty_outside_the_roi(tmp_path, slide, roi_file, model, one_torch_thread):
    res = run("heatmap", slide, "--out", tmp_path / "hm", "--model", model, "--roi", roi_file,
              "--roi-class", "Tumor", "--workers", "0", "-q")
    assert res.exit_code == 0, res.output
    hm = Heatmap(tmp_path / "hm" / "heatmap.zarr")
    cov = np.asarray(hm.coverage[:])
    xs, ys = _centres(hm)
    # pixel centres inside the ROI (an edge through a centre counts as inside on the top/left, as rasterize fills)
    inside = ((xs >= ROI[0]) & (xs < ROI[2]))[None, :] & ((ys >= ROI[1]) & (ys < ROI[3]))[:, None]
    assert cov[inside].all()  # the ROI is all tissue: predicted everywhere in it
    assert not cov[~inside].any()
    assert np.all(np.asarray(hm.prob[:])[:, ~inside] == 0)
    # without --roi the same slide is predicted well beyond it
    res = run("heatmap", slide, "--out", tmp_path / "full", "--model", model, "--workers", "0", "-q")
    full = np.asarray(Heatmap(tmp_path / "full" / "heatmap.zarr").coverage[:])
    assert full[~inside].sum() > 4 * full[inside].sum() / 10


def test_roi_class_matching_nothing_is_one_clear_error(tmp_path, slide, roi_file):
    res = run("heatmap", slide, "--out", tmp_path / "hm", "--roi", roi_file, "--roi-class", "Nope", "-q")
    assert res.exit_code != 0
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and "'Nope'" in lines[0] and "Other, Tumor" in lines[0] and "roi.geojson" in lines[0]
    assert not (tmp_path / "hm" / "heatmap.zarr").exists()
    res = run("heatmap", slide, "--out", tmp_path / "hm", "--roi-class", "Tumor", "-q")
    assert res.exit_code != 0 and "--roi-class needs --roi" in res.output


def test_tissue_options_reach_the_detector(tmp_path, slide):
    # the synthetic tissue is 0.2 mm²: a smallest region of 1 mm² leaves none
    res = run("tile", slide, "--out", tmp_path / "g.npz", "--tissue-min-area", "1000000")
    assert res.exit_code != 0 and "no tissue" in res.output
    assert run("tile", slide, "--out", tmp_path / "g.npz", "--tissue-mpp", "4").exit_code == 0
    res = run("heatmap", slide, "--out", tmp_path / "hm", "--tissue-min-area", "1000000", "--workers", "0", "-q")
    assert res.exit_code != 0 and "no tissue" in res.output
    from slidekit.models.checkpoint import save_checkpoint
    from slidekit.models.networks import ResNetClassifier
    from slidekit.models.spec import ModelSpec

    spec = ModelSpec(arch="resnet-encoder", task="embedding", classes=[], patch_size=32, mpp=2.0,
                     mean=(0.5,) * 3, std=(0.5,) * 3, activation="none", trainer="simclr")
    model = save_checkpoint(tmp_path / "enc.pt", ResNetClassifier("resnet18", 0), spec)
    res = run("embed", slide, "--model", model, "--out", tmp_path / "e.zarr", "--tissue-min-area", "1000000")
    assert res.exit_code != 0 and "no tissue" in res.output
