"""Tile grids: geometry, exact-MPP resampling, the native fast path, workers, save/load."""
from __future__ import annotations

import numpy as np
import pytest

import slidekit as sk
from slidekit.regions.tiling import TileReader, native_tiles_for
from slidekit.slides.demo import write_pyramid
from tests.conftest import synthetic_slide


def _gradient_slide(tmp_path, w=1024, h=768, compression="zlib", tile=256, pyramid=True):
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([(xx * 7 + yy) % 251, (yy * 3) % 253, (xx + yy * 5) % 247], axis=-1).astype(np.uint8)
    path = write_pyramid(tmp_path / "g.tif", rgb, 0.5, tile=tile, compression=compression,
                         min_size=10**9 if not pyramid else 512)
    return path, rgb


def test_grid_keeps_tiles_with_enough_tissue(tmp_path):
    box = (512, 256, 1024, 768)
    slide = sk.open_slide(synthetic_slide(tmp_path / "s.tif", tissue_box=box))
    mask = sk.tissue_mask(slide)
    grid = sk.TileGrid.from_slide(slide, mpp=0.5, size=256, overlap=0, mask=mask, min_tissue=0.5)
    assert grid.coords.dtype == np.int64 and grid.coords.shape == (12, 2)  # 4 x 3 tiles inside the box
    assert set(map(tuple, grid.coords)) == {(x, y) for x in range(512, 1536, 256) for y in range(256, 1024, 256)}
    assert (grid.tissue > 0.9).all()
    whole = sk.TileGrid.from_slide(slide, mpp=0.5, size=256, mask=None, min_tissue=0)
    assert len(whole) == 8 * 6
    with pytest.raises(sk.GridError):
        sk.TileGrid.from_slide(slide, mpp=0.5, size=256, mask=None, min_tissue=0.5)


def test_grid_at_coarser_mpp_and_overlap_covers_the_slide(tmp_path):
    slide = sk.open_slide(synthetic_slide(tmp_path / "s.tif", width=2000, height=1000, tissue_box=(100, 100, 800, 600)))
    grid = sk.TileGrid.from_slide(slide, mpp=1.0, size=128, overlap=32, min_tissue=0)
    assert grid.extent == (256.0, 256.0) and grid.stride == 96
    xs, ys = np.unique(grid.coords[:, 0]), np.unique(grid.coords[:, 1])
    assert xs[0] == 0 and np.all(np.diff(xs) == 192)
    assert xs[-1] + 256 >= 2000 and xs[-1] < 2000 and ys[-1] + 256 >= 1000
    assert grid.shape == (len(ys), len(xs))
    assert np.array_equal(grid.indices[:, 0] * 192, grid.coords[:, 0])


def test_tile_at_double_mpp_equals_the_2x_downsample(tmp_path):
    path, rgb = _gradient_slide(tmp_path, pyramid=False)
    slide = sk.open_slide(path)
    assert slide.level_count == 1
    grid = sk.TileGrid.from_slide(slide, mpp=1.0, size=64, min_tissue=0)
    tiles = dict(sk.read_tiles(slide, grid))
    x, y = 128, 256
    expected = rgb[y:y + 128, x:x + 128].reshape(64, 2, 64, 2, 3).mean(axis=(1, 3))
    assert np.abs(tiles[(x, y)].astype(float) - expected).max() <= 1.0


def test_fast_path_decodes_stored_tiles_and_matches_read_region(tmp_path):
    path, rgb = _gradient_slide(tmp_path, w=1100, h=700)  # edge tiles hang over the image
    slide = sk.open_slide(path)
    grid = sk.TileGrid.from_slide(slide, mpp=0.5, size=256, min_tissue=0)
    reader = TileReader(slide, grid)
    assert reader.fast
    for (x, y), tile in sk.read_tiles(slide, grid):
        ref = slide.read_region((x, y), 0, (256, 256))
        assert np.array_equal(tile, ref), (x, y)
    # Level 1 (1 µm/px) also lines up with its stored tiles.
    grid1 = sk.TileGrid.from_slide(slide, mpp=1.0, size=256, min_tissue=0)
    assert TileReader(slide, grid1).fast


def test_non_aligned_grids_are_cut_from_stored_tiles_and_stay_correct(tmp_path):
    path, rgb = _gradient_slide(tmp_path)
    slide = sk.open_slide(path)
    grid = sk.TileGrid.from_slide(slide, mpp=0.5, size=200, overlap=40, min_tissue=0)
    assert native_tiles_for(slide, grid) is not None  # same pixels as level 0: no resampling
    assert native_tiles_for(slide, sk.TileGrid.from_slide(slide, mpp=0.6, size=200, min_tissue=0)) is None
    for (x, y), tile in sk.read_tiles(slide, grid):
        h, w = min(200, 768 - y), min(200, 1024 - x)
        assert np.array_equal(tile[:h, :w], rgb[y:y + h, x:x + w])
        assert (tile[h:] == 255).all() and (tile[:, w:] == 255).all()


def test_workers_give_the_same_tiles_in_the_same_order(tmp_path):
    path, _ = _gradient_slide(tmp_path)
    slide = sk.open_slide(path)
    for size, overlap in ((256, 0), (100, 10)):
        grid = sk.TileGrid.from_slide(slide, mpp=0.5, size=size, overlap=overlap, min_tissue=0)
        serial = list(sk.read_tiles(slide, grid, workers=0, chunk=5))
        parallel = list(sk.read_tiles(slide, grid, workers=2, chunk=5))
        assert [c for c, _ in serial] == [c for c, _ in parallel] == [tuple(c) for c in grid.coords]
        assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(serial, parallel))


def test_fast_path_on_real_svs_tiles(shared_data):
    slide = sk.open_slide(shared_data / "wsi" / "CMU-1-Small-Region.svs")
    grid = sk.TileGrid.from_slide(slide, mpp=slide.mpp[0], size=240, min_tissue=0)
    reader = TileReader(slide, grid)
    assert reader.fast
    for i in (0, len(grid) // 2, len(grid) - 1):
        x, y = grid.coords[i]
        diff = np.abs(reader.read(i).astype(int) - slide.read_region((x, y), 0, (240, 240)).astype(int))
        assert diff.mean() < 1.5


def test_grid_save_load_roundtrip_and_identity(tmp_path):
    slide = sk.open_slide(synthetic_slide(tmp_path / "s.tif"))
    grid = sk.TileGrid.from_slide(slide, mpp=0.5, size=256, mask=sk.tissue_mask(slide), min_tissue=0.25)
    path = grid.save(tmp_path / "grid.npz")
    back = sk.TileGrid.load(path)
    assert np.array_equal(back.coords, grid.coords) and np.allclose(back.tissue, grid.tissue)
    assert (back.mpp, back.size, back.overlap, back.slide_id) == (grid.mpp, grid.size, grid.overlap, grid.slide_id)
    back.check_slide(slide)
    other = sk.open_slide(synthetic_slide(tmp_path / "o.tif", seed=5))
    with pytest.raises(sk.GridError, match="another slide"):
        back.check_slide(other)
    (tmp_path / "junk.npz").write_text("nope")
    with pytest.raises(sk.GridError, match="junk.npz"):
        sk.TileGrid.load(tmp_path / "junk.npz")


def test_magnification_maps_to_mpp(tmp_path):
    slide = sk.open_slide(synthetic_slide(tmp_path / "s.tif"))
    grid = sk.TileGrid.from_slide(slide, magnification=10, size=128, min_tissue=0)
    assert grid.mpp == pytest.approx(1.0)
    assert sk.mpp_to_magnification(0.25) == pytest.approx(40)


def test_tile_reader_in_dataloader_workers(tmp_path):
    import torch

    path, _ = _gradient_slide(tmp_path)
    slide = sk.open_slide(path)
    grid = sk.TileGrid.from_slide(slide, mpp=0.5, size=256, min_tissue=0)
    reader = TileReader(slide, grid)
    _ = reader.read(0)  # the parent has open handles before the workers start

    class Tiles(torch.utils.data.Dataset):
        def __len__(self):
            return len(grid)

        def __getitem__(self, i):
            return torch.from_numpy(reader.read(i))

    loader = torch.utils.data.DataLoader(Tiles(), batch_size=4, num_workers=2)
    got = torch.cat(list(loader)).numpy()
    expected = np.stack([reader.read(i) for i in range(len(grid))])
    assert np.array_equal(got, expected)
