"""Morphology features in µm against shapes of known size, chunk-wise views, heatmaps on disk, CLI."""
from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from slidekit.cli import main
from slidekit.slidelevel.features import (
    HeatmapView,
    downsample,
    feature_names,
    features_from_view,
    features_table,
    heatmap_features,
    open_heatmap_view,
    predicted_size_class,
    read_table,
    size_class,
)


def disc_map(diameter_um: float, mpp: float, field_um: float = 4000.0, p_in: float = 0.95,
             p_out: float = 0.05) -> np.ndarray:
    n = int(round(field_um / mpp))
    yy, xx = np.mgrid[0:n, 0:n]
    c = (n - 1) / 2
    return np.where(np.hypot(yy - c, xx - c) * mpp <= diameter_um / 2, p_in, p_out).astype(np.float32)


@pytest.mark.parametrize("mpp", [2.0, 8.0])
@pytest.mark.parametrize("diameter_um,expected", [(2500, "macro"), (1000, "micro"), (100, "itc")])
def test_disc_sizes_in_micrometres(mpp, diameter_um, expected):
    f = heatmap_features(disc_map(diameter_um, mpp), mpp)
    assert predicted_size_class(f) == expected
    tol = 2.5 * mpp  # a pixel or two of discretisation either way
    assert f["t50_n_regions"] == 1
    assert f["t50_max_diameter_um"] == pytest.approx(diameter_um, abs=tol)
    assert f["t50_largest_major_axis_um"] == pytest.approx(diameter_um, abs=tol)
    assert f["t50_largest_minor_axis_um"] == pytest.approx(diameter_um, abs=tol)
    area = np.pi * diameter_um ** 2 / 4
    assert f["t50_largest_area_um2"] == pytest.approx(area, rel=0.02, abs=4 * mpp * mpp * diameter_um / mpp)
    assert f["t50_largest_perimeter_um"] == pytest.approx(np.pi * diameter_um, rel=0.12, abs=4 * mpp)
    assert f["t50_tumour_fraction"] == pytest.approx(area / 4000.0 ** 2, rel=0.05, abs=0.001)
    assert f["t50_largest_mean_prob"] == pytest.approx(0.95)
    assert f["max_prob"] == pytest.approx(0.95)


def test_size_class_boundaries():
    assert [size_class(d) for d in (0, float("nan"), 150, 200, 201, 2000, 2001)] == \
        ["negative", "negative", "itc", "itc", "micro", "micro", "macro"]


def test_features_independent_of_resolution():
    a = heatmap_features(disc_map(1500, 2.0), 2.0)
    b = heatmap_features(disc_map(1500, 5.0), 5.0)
    for k in ("t50_largest_area_um2", "t50_largest_major_axis_um", "tissue_area_um2"):
        assert a[k] == pytest.approx(b[k], rel=0.03)


def test_two_thresholds_and_regions():
    p = disc_map(1000, 4.0, p_in=0.7)             # above 0.5, below 0.9
    p[10:20, 10:20] = 0.99                       # a small confident spot
    f = heatmap_features(p, 4.0, thresholds=(0.5, 0.9))
    assert list(f) == feature_names((0.5, 0.9))
    assert f["t50_n_regions"] == 2 and f["t90_n_regions"] == 1
    assert f["t90_largest_area_um2"] == pytest.approx(100 * 16.0)
    assert predicted_size_class(f, 0.9) == "itc" and predicted_size_class(f, 0.5) == "micro"


def test_empty_heatmap_is_negative():
    f = heatmap_features(np.zeros((50, 50), np.float32), 8.0)
    assert predicted_size_class(f) == "negative" and f["t50_n_regions"] == 0


def test_tissue_mask_sets_denominator():
    p = disc_map(1000, 8.0)
    tissue = np.zeros(p.shape, bool)
    tissue[: p.shape[0] // 2] = True
    f = heatmap_features(p, 8.0, tissue=tissue)
    assert f["tissue_area_um2"] == pytest.approx(tissue.sum() * 64.0)


def test_downsample_band_wise_matches_whole():
    rng = np.random.default_rng(0)
    a = rng.random((301, 203)).astype(np.float32)
    a[5, 7] = np.nan
    mean, cover, vmax = downsample(a, 4, band_rows=8)
    whole, _, _ = downsample(a, 4, band_rows=1000)
    np.testing.assert_allclose(mean, whole)
    assert mean.shape == (76, 51) and vmax == pytest.approx(np.nanmax(a))
    np.testing.assert_allclose(mean[0, 0], a[:4, :4].mean())
    assert cover[1, 1] == pytest.approx(15 / 16)


def test_view_features_match_in_memory():
    p = disc_map(2500, 2.0)
    f = features_from_view(HeatmapView(p, 2.0), work_mpp=8.0)
    assert predicted_size_class(f) == "macro"
    assert f["t50_max_diameter_um"] == pytest.approx(2500, abs=20)


def _write_heatmap(path, p, mpp=4.0, tile=100):
    from slidekit.infer.heatmap import HeatmapWriter
    from slidekit.regions.tiling import TileGrid

    n = p.shape[0] // tile
    cs, rs = np.meshgrid(np.arange(n), np.arange(n))
    coords = np.column_stack([cs.ravel(), rs.ravel()]) * tile * 2  # slide at mpp/2
    g = TileGrid(coords=coords, mpp=mpp, size=tile, overlap=0, slide_dimensions=(p.shape[1] * 2, p.shape[0] * 2),
                 slide_mpp=(mpp / 2, mpp / 2))
    w = HeatmapWriter(path, g, "segmentation", ["normal", "tumour"], blend="constant")
    r, c = coords[:, 1] // 2, coords[:, 0] // 2
    outs = np.stack([np.stack([1 - p[a:a + tile, b:b + tile], p[a:a + tile, b:b + tile]]) for a, b in zip(r, c)])
    w.add(np.arange(len(g)), outs)
    return w.finish()


def test_heatmap_on_disk_and_cli(tmp_path):
    _write_heatmap(tmp_path / "a" / "heatmap.zarr", disc_map(2500, 4.0))
    _write_heatmap(tmp_path / "b" / "heatmap.zarr", disc_map(100, 4.0))
    v = open_heatmap_view(tmp_path / "a")
    assert v.mpp == 4.0
    rows = features_table([tmp_path / "a", tmp_path / "b"], work_mpp=4.0)
    assert [r["size_class"] for r in rows] == ["macro", "itc"]
    out = tmp_path / "features.csv"
    res = CliRunner().invoke(main, ["features", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out),
                                    "--work-mpp", "4", "-q"])
    assert res.exit_code == 0, res.output
    table = read_table(out)
    assert [r["size_class"] for r in table] == ["macro", "itc"]
    assert float(table[0]["t50_largest_area_um2"]) == pytest.approx(np.pi * 1250 ** 2, rel=0.02)


def test_cli_features_missing_heatmap(tmp_path):
    res = CliRunner().invoke(main, ["features", str(tmp_path / "nope"), "--out", str(tmp_path / "f.csv")])
    assert res.exit_code != 0 and "not found" in res.output
    assert not (tmp_path / "f.csv").exists()
