"""Heatmap stitching, blending, coverage, resume, downsampled views and vectorising."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from shapely.geometry import box

from slidekit.infer.heatmap import Heatmap, HeatmapWriter, blend_window, heatmap_geometry
from slidekit.regions.tiling import TileGrid


def make_grid(dims=(1000, 700), mpp=1.0, slide_mpp=0.5, size=64, overlap=16, keep=None) -> TileGrid:
    """A full lattice over a virtual slide, optionally only some tiles."""
    g = TileGrid(coords=np.zeros((0, 2)), mpp=mpp, size=size, overlap=overlap, slide_dimensions=dims,
                 slide_mpp=(slide_mpp, slide_mpp), slide_name="virtual")
    rows, cols = g.shape
    sx, sy = g.scale
    cc, rr = np.meshgrid(np.arange(cols), np.arange(rows))
    g.coords = np.column_stack([np.rint(cc.ravel() * g.stride * sx), np.rint(rr.ravel() * g.stride * sy)])
    return g if keep is None else g.subset(keep(g))


def field(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """A known smooth function of level-0 position."""
    return 0.3 + 0.0004 * x + 0.0002 * y + 0.1 * np.sin(x / 97.0)


def fake_outputs(grid: TileGrid, writer: HeatmapWriter, idx: np.ndarray, heatmap_mpp: float) -> np.ndarray:
    """What a model whose output is ``field`` at each output pixel centre would produce."""
    fh, fw = writer.footprint
    s0 = heatmap_mpp / grid.slide_mpp[0]  # level-0 px per output px
    out = np.empty((len(idx), 1, fh, fw), np.float32)
    for j, i in enumerate(idx):
        x, y = grid.coords[i]
        xs = x + (np.arange(fw) + 0.5) * s0
        ys = y + (np.arange(fh) + 0.5) * s0
        out[j, 0] = field(xs[None, :], ys[:, None])
    return out


def expected_coverage(grid: TileGrid, shape, footprint) -> np.ndarray:
    cov = np.zeros(shape, bool)
    geo = heatmap_geometry(grid, "segmentation", 4.0)
    for c, r in grid.indices:
        r0, c0 = round(r * grid.stride / geo["factor"]), round(c * grid.stride / geo["factor"])
        cov[r0:r0 + footprint[0], c0:c0 + footprint[1]] = True
    return cov


@pytest.mark.parametrize("blend", ["gaussian", "constant"])
def test_stitched_map_equals_known_field(tmp_path: Path, blend: str) -> None:
    # Sparse tissue: drop a block of tiles so the coverage mask has holes and borders.
    grid = make_grid(keep=lambda g: ~((g.indices[:, 0] >= 3) & (g.indices[:, 0] <= 5) & (g.indices[:, 1] >= 2)))
    w = HeatmapWriter(tmp_path / "h.zarr", grid, "segmentation", ["p"], mpp=4.0, blend=blend, chunk=32)
    assert w.footprint == (16, 16)
    for s in range(0, len(grid), 7):
        idx = np.arange(s, min(len(grid), s + 7))
        w.add(idx, fake_outputs(grid, w, idx, 4.0))
    hm = w.finish()
    H, W = hm.shape
    assert (H, W) == (88, 125)  # ceil(700 * 0.5 / 4), ceil(1000 * 0.5 / 4) at 4 µm/px
    cov = np.asarray(hm.coverage[:])
    assert np.array_equal(cov, expected_coverage(grid, (H, W), (16, 16)))
    ys, xs = (np.arange(H) + 0.5) * 8, (np.arange(W) + 0.5) * 8  # heatmap px centres, level 0
    exp = field(xs[None, :], ys[:, None])
    prob = np.asarray(hm.prob[0])
    # Every overlapping tile agrees on the field, so any blend reproduces it exactly where covered.
    np.testing.assert_allclose(prob[cov], exp[cov], rtol=1e-5, atol=1e-6)
    assert (prob[~cov] == 0).all() and np.isfinite(prob).all()
    assert hm.mpp == 4.0 and hm.scale == (8.0, 8.0) and hm.origin == (0.0, 0.0)


def test_constant_blend_averages_overlaps(tmp_path: Path) -> None:
    # Two tiles side by side overlapping by 16 px; outputs 1.0 and 3.0.
    grid = make_grid(dims=(224, 128), size=64, overlap=16, keep=lambda g: g.indices[:, 1] == 0)
    grid = grid.subset(np.array([0, 1]))
    w = HeatmapWriter(tmp_path / "h.zarr", grid, "segmentation", ["p"], mpp=1.0, blend="constant", chunk=16)
    w.add(np.array([0, 1]), np.stack([np.full((1, 64, 64), 1.0), np.full((1, 64, 64), 3.0)]))
    hm = w.finish()
    p = np.asarray(hm.prob[0])
    assert np.allclose(p[:64, :48], 1.0) and np.allclose(p[:64, 48:64], 2.0) and np.allclose(p[:64, 64:112], 3.0)
    assert not np.asarray(hm.coverage[:])[:, 112:].any() and not np.asarray(hm.coverage[:])[64:].any()
    # Gaussian weights favour each tile's centre but stay a convex combination.
    g = blend_window(64, 64, "gaussian")
    assert g.max() > 0.99 and g.min() > 0 and g[32, 32] > g[0, 32] > g[0, 0]


def test_spilling_chunks_to_disk_gives_the_same_map(tmp_path: Path) -> None:
    grid = make_grid(dims=(600, 400))
    maps = {}
    for name, cap in [("big", 1 << 30), ("tiny", 3 * 16 * 16 * 8)]:  # room for 3 open chunks
        w = HeatmapWriter(tmp_path / f"{name}.zarr", grid, "segmentation", ["p"], mpp=4.0, chunk=16,
                          max_open_bytes=cap)
        order = np.arange(len(grid))  # raster order: a band of chunks 8 wide is open at once
        for s in range(0, len(grid), 5):
            idx = order[s:s + 5]
            w.add(idx, fake_outputs(grid, w, idx, 4.0))
        maps[name] = np.asarray(w.finish().prob[:])
        assert (w.spills > 0) == (name == "tiny")
    np.testing.assert_allclose(maps["tiny"], maps["big"], rtol=1e-6)


def test_interrupted_writer_resumes(tmp_path: Path) -> None:
    grid = make_grid()
    path = tmp_path / "h.zarr"
    w = HeatmapWriter(path, grid, "segmentation", ["p"], mpp=4.0, chunk=16)
    half = len(grid) // 2
    w.add(np.arange(half), fake_outputs(grid, w, np.arange(half), 4.0))
    del w  # interrupted: never finished
    with pytest.raises(Exception, match="incomplete"):
        Heatmap(path)
    w2 = HeatmapWriter(path, grid, "segmentation", ["p"], mpp=4.0, chunk=16)
    todo = w2.todo()
    assert 0 < len(todo) < len(grid) and set(range(half, len(grid))) <= set(todo.tolist())
    w2.add(todo, fake_outputs(grid, w2, todo, 4.0))
    resumed = np.asarray(w2.finish().prob[:])
    w3 = HeatmapWriter(tmp_path / "once.zarr", grid, "segmentation", ["p"], mpp=4.0, chunk=16)
    w3.add(np.arange(len(grid)), fake_outputs(grid, w3, np.arange(len(grid)), 4.0))
    np.testing.assert_allclose(resumed, np.asarray(w3.finish().prob[:]), rtol=1e-6)
    # A different configuration starts over instead of mixing results.
    w4 = HeatmapWriter(path, grid, "segmentation", ["p"], mpp=4.0, chunk=16, blend="constant")
    assert len(w4.todo()) == len(grid)


def test_classification_lattice_and_vectorised_geometry(tmp_path: Path) -> None:
    # Tiles of 64 px at 1 µm on a 0.5 µm slide: 128 level-0 px; no overlap.
    grid = make_grid(dims=(1280, 1024), size=64, overlap=0)
    w = HeatmapWriter(tmp_path / "c.zarr", grid, "classification", ["normal", "tumor"],
                      colors=[(0, 255, 0), (255, 0, 0)])
    col, row = grid.indices.T
    # Tumor in lattice cells cols 2..5, rows 1..4, except a hole at (3..4, 2..3).
    tumor = (col >= 2) & (col <= 5) & (row >= 1) & (row <= 4) & ~((col >= 3) & (col <= 4) & (row >= 2) & (row <= 3))
    p = np.where(tumor, 0.9, 0.2).astype(np.float32)
    w.add(np.arange(len(grid)), np.column_stack([1 - p, p]))
    hm = w.finish()
    assert hm.shape == (8, 10) and hm.scale == (128.0, 128.0)
    anns = hm.vectorize(threshold=0.5)
    assert len(anns) == 1
    a = anns[0]
    assert a.label == "tumor" and a.color == (255, 0, 0)
    # The polygon lines up with the level-0 region of the tiles it came from, hole included.
    assert a.geometry.equals(box(256, 128, 768, 640).difference(box(384, 256, 640, 512)))
    assert a.measurements["Area µm^2"] == pytest.approx((512 * 512 - 256 * 256) * 0.25)
    assert a.measurements["Mean probability"] == pytest.approx(0.9)
    assert a.measurements["Max probability"] == pytest.approx(0.9)
    assert hm.vectorize(threshold=0.5, min_area_um2=1e6) == []
    coords, values = hm.tiles
    assert np.array_equal(coords, grid.coords) and np.allclose(values[:, 1], p)


def test_classification_with_overlap_offsets_cells(tmp_path: Path) -> None:
    grid = make_grid(dims=(1000, 500), size=64, overlap=32)
    w = HeatmapWriter(tmp_path / "c.zarr", grid, "classification", ["p"])
    target = 7
    w.add(np.arange(len(grid)), (np.arange(len(grid)) == target).astype(np.float32)[:, None])
    hm = w.finish()
    (a,) = hm.vectorize(threshold=0.5)
    x, y = grid.coords[target]
    # The tile's central stride x stride square: 32 px at 1 µm = 64 level-0 px, inset by 32.
    assert a.geometry.equals(box(x + 32, y + 32, x + 96, y + 96))


def test_view_downsamples_over_covered_pixels(tmp_path: Path) -> None:
    grid = make_grid(keep=lambda g: g.indices[:, 0] < 4)
    w = HeatmapWriter(tmp_path / "h.zarr", grid, "segmentation", ["p"], mpp=4.0, chunk=16, blend="constant")
    w.add(np.arange(len(grid)), np.full((len(grid), 1, 16, 16), 0.8, np.float32))
    hm = w.finish()
    v, cov = hm.view(4)
    assert v.shape == (1, 22, 32)  # 88 x 125 heatmap pixels, 4 x 4 blocks
    # Tiles in lattice columns 0..3 cover heatmap columns 0..51 (offset 3 * 12 + footprint 16).
    assert (cov[:, :13] == 1).all() and (cov[:, 13:] == 0).all()
    assert np.allclose(v[0][cov > 0], 0.8) and (v[0][cov == 0] == 0).all()


def test_multiclass_argmax_vectorising(tmp_path: Path) -> None:
    grid = make_grid(dims=(512, 256), size=64, overlap=0)  # 4 x 2 lattice of 128-px tiles
    w = HeatmapWriter(tmp_path / "m.zarr", grid, "classification", ["bg", "a", "b"])
    probs = np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.2, 0.7], [0.1, 0.7, 0.2],
                      [0.8, 0.1, 0.1], [0.8, 0.1, 0.1], [0.4, 0.3, 0.3], [0.1, 0.1, 0.8]], np.float32)
    w.add(np.arange(8), probs)
    hm = w.finish()
    anns = hm.vectorize(threshold=0.5)
    by_label = {}
    for a in anns:
        by_label.setdefault(a.label, []).append(a.geometry)
    assert set(by_label) == {"a", "b"}
    assert sum(g.area for g in by_label["a"]) == 2 * 128 * 128
    assert sum(g.area for g in by_label["b"]) == 2 * 128 * 128  # tile 6 wins with 0.4 < threshold: dropped


def test_multilabel_sigmoid_thresholds_each_class(tmp_path: Path) -> None:
    grid = make_grid(dims=(512, 256), size=64, overlap=0)
    w = HeatmapWriter(tmp_path / "s.zarr", grid, "classification", ["x", "y"], attrs={"activation": "sigmoid"})
    probs = np.zeros((8, 2), np.float32)
    probs[[0, 1], 0] = 0.9  # class x on tiles 0-1, class y on tiles 1-2: they overlap on tile 1
    probs[[1, 2], 1] = 0.8
    w.add(np.arange(8), probs)
    anns = w.finish().vectorize(threshold=0.5)
    assert sorted((a.label, a.geometry.area) for a in anns) == [("x", 2 * 128 * 128), ("y", 2 * 128 * 128)]
