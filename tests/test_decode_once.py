"""Each stored tile decoded once: overlapping and misaligned grids are cut from cached stored tiles."""
from __future__ import annotations

import pickle

import numpy as np
import pytest

import slidekit as sk
from slidekit.regions.tiling import TileReader, native_tiles_for
from slidekit.slides.demo import write_pyramid


def _slide(tmp_path, w=1100, h=900, compression="jpeg"):
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([(xx // 3 + yy) % 251, (yy // 2) % 253, (xx + yy // 5) % 247], axis=-1).astype(np.uint8)
    kw = {"quality": 90} if compression == "jpeg" else {}
    return write_pyramid(tmp_path / "s.tif", rgb, 0.5, tile=256, compression=compression, **kw), rgb


def _touched(grid, size, tile=256, w=1100, h=900):
    """Distinct stored tiles (col, row) the grid's tiles cover inside the image."""
    out = set()
    for x, y in grid.coords:
        x1, y1 = min(x + size, w), min(y + size, h)
        out |= {(c, r) for c in range(x // tile, (x1 - 1) // tile + 1) for r in range(y // tile, (y1 - 1) // tile + 1)}
    return out


@pytest.mark.parametrize("size,overlap", [(256, 64), (224, 0), (300, 100)])
def test_overlapping_and_misaligned_grids_decode_each_stored_tile_once(tmp_path, size, overlap):
    path, _ = _slide(tmp_path)
    slide = sk.open_slide(path)
    grid = sk.TileGrid.from_slide(slide, mpp=0.5, size=size, overlap=overlap, min_tissue=0)
    reader = TileReader(slide, grid)
    assert reader.fast
    reader.native.decodes = 0
    reader.native._cache.clear()
    tiles = reader.read_batch(np.arange(len(grid)))[1]
    assert reader.native.decodes == len(_touched(grid, size))
    # Same pixels as the slide backend's read_region (white past the image edge).
    for i in (0, len(grid) // 2, len(grid) - 1):
        x, y = (int(v) for v in grid.coords[i])
        assert np.array_equal(tiles[i], slide.read_region((x, y), 0, (size, size)))


def test_offset_grid_on_a_lossless_slide_is_exact(tmp_path):
    path, rgb = _slide(tmp_path, compression="zlib")
    slide = sk.open_slide(path)
    grid = sk.TileGrid.from_slide(slide, mpp=0.5, size=256, min_tissue=0)
    grid.coords = grid.coords + 100  # lines up with nothing
    reader = TileReader(slide, grid)
    assert reader.fast
    for i, (x, y) in enumerate(grid.coords):
        h, w = max(0, min(256, 900 - y)), max(0, min(256, 1100 - x))
        t = reader.read(i)
        assert np.array_equal(t[:h, :w], rgb[y:y + h, x:x + w])
        assert (t[h:] == 255).all() and (t[:, w:] == 255).all()


def test_aligned_grid_keeps_no_cache_and_workers_get_an_empty_one(tmp_path):
    path, _ = _slide(tmp_path)
    slide = sk.open_slide(path)
    aligned = native_tiles_for(slide, sk.TileGrid.from_slide(slide, mpp=0.5, size=256, min_tissue=0))
    assert aligned.capacity == 0  # each stored tile is one grid tile: nothing to reuse
    native = native_tiles_for(slide, sk.TileGrid.from_slide(slide, mpp=0.5, size=256, overlap=64, min_tissue=0))
    assert native.capacity > 0 and len(native._cache) > 0
    clone = pickle.loads(pickle.dumps(native))
    assert len(clone._cache) == 0 and clone.decodes == 0
    assert clone.read(0, 0).shape == (256, 256, 3)


def test_a_damaged_stored_tile_names_every_grid_tile_over_it(tmp_path):
    from tests.test_slide_faults import TILE, damaged_slide

    path, _ = damaged_slide(tmp_path)
    slide = sk.open_slide(path)
    grid = sk.TileGrid.from_slide(slide, mpp=0.5, size=256, overlap=64, min_tissue=0)
    reader = TileReader(slide, grid)
    assert reader.fast
    idx, _ = TileReader(slide, grid, on_bad_tile="skip").read_batch(np.arange(len(grid)))
    bad = np.setdiff1d(np.arange(len(grid)), idx)
    over = [i for i, (x, y) in enumerate(grid.coords)
            if x < TILE[0] + 256 and x + 256 > TILE[0] and y < TILE[1] + 256 and y + 256 > TILE[1]]
    assert list(bad) == over
    with pytest.raises(sk.CorruptTileError) as err:
        reader.read(int(bad[-1]))
    assert err.value.location == tuple(int(v) for v in grid.coords[bad[-1]])


def test_first_read_is_one_strict_decode_per_stored_tile_with_the_same_pixels(tmp_path, monkeypatch):
    import imagecodecs
    import simplejpeg

    path, _ = _slide(tmp_path)
    slide = sk.open_slide(path)
    grid = sk.TileGrid.from_slide(slide, mpp=0.5, size=256, min_tissue=0)
    reader = TileReader(slide, grid)
    st = reader.native.stored
    assert st.strict and st.check == "strict"  # the first-tile check against the backend agreed
    calls = []
    real = simplejpeg.decode_jpeg
    monkeypatch.setattr(simplejpeg, "decode_jpeg", lambda *a, **k: calls.append(k.get("buffer")) or real(*a, **k))
    monkeypatch.setattr(imagecodecs, "jpeg8_decode", lambda *a, **k: pytest.fail("a second decoder ran"))
    tiles = reader.read_batch(np.arange(len(grid)))[1]
    assert len(calls) == len(grid)  # one decode per stored tile, check included
    assert all(b is not None for b in calls)  # each decoded straight into its place in the batch
    monkeypatch.undo()
    tables = st._state()[2]
    for i in range(len(grid)):
        ref = np.asarray(imagecodecs.jpeg8_decode(st.raw(i), tables=tables))[..., :3]
        h, w = min(256, 900 - 256 * (i // st.across)), min(256, 1100 - 256 * (i % st.across))
        assert np.array_equal(tiles[i][:h, :w], ref[:h, :w])


def test_strict_decode_into_a_buffer_fills_it_and_names_a_tile_of_another_size(tmp_path):
    from slidekit.slides.tiffio import StoredTiles, strict_decode

    path, _ = _slide(tmp_path)
    st = StoredTiles(path, ("page", 0))
    stream = st.stream(0)
    alone, problem = strict_decode(stream, 256, 256)
    buf = np.zeros((256, 256, 3), np.uint8)
    into, problem_into = strict_decode(stream, 256, 256, out=buf)
    assert problem is None and problem_into is None and np.shares_memory(into, buf)
    assert np.array_equal(buf, alone)
    small = np.zeros((128, 128, 3), np.uint8)
    tile, why = strict_decode(stream, 128, 128, out=small)
    assert tile is None and "256x256, not 128x128" in why


@pytest.mark.parametrize("strict", [True, False])
def test_damaged_tile_is_caught_by_the_strict_decode_and_by_the_variant_fallback(tmp_path, strict):
    from slidekit.slides.tiffio import StoredTiles

    path, _ = _slide(tmp_path)
    st = StoredTiles(path, ("page", 0))
    if not strict:
        st.use_variant_check("test: fallback")
    assert st.check == ("strict" if strict else "variants")
    data = bytearray(st.raw(5))
    mid = len(data) // 2
    data[mid:mid + 40] = bytes(np.random.default_rng(2).integers(0, 255, 40, dtype=np.uint8))
    st.raw = lambda i: bytes(data) if i == 5 else StoredTiles.raw(st, i)
    tile, problem = st.decode_checked(5)
    assert tile is None and problem
    tile, problem = st.decode_checked(4)
    assert problem is None and tile.shape == (256, 256, 3)


def test_rgb_coded_tiles_the_backend_disagrees_with_fall_back_to_the_variant_check(tmp_path, monkeypatch):
    import slidekit.slides.tiffio as tiffio

    path, _ = _slide(tmp_path)
    real = tiffio.strict_decode

    def swapped(stream, w, h, out=None):  # a decoder guessing the wrong colour space: channels come out wrong
        tile, problem = real(stream, w, h)
        return (None if tile is None else np.ascontiguousarray(tile[..., ::-1])), problem

    monkeypatch.setattr(tiffio, "strict_decode", swapped)
    slide = sk.open_slide(path)
    grid = sk.TileGrid.from_slide(slide, mpp=0.5, size=256, min_tissue=0)
    native = native_tiles_for(slide, grid)
    assert native is not None and native.stored.check == "variants"
    assert "first tile" in native.stored.check_reason
