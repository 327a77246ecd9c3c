"""Damaged slides: corrupt tiles, truncated copies, decompression bombs, huge single-level reads."""
from __future__ import annotations

import json
import struct
import warnings

import numpy as np
import pytest
import tifffile

import slidekit as sk
from slidekit.regions.tiling import TileReader
from tests.conftest import synthetic_slide

TILE = (512, 256)  # level-0 (x, y) of the damaged tile: tile row 1, column 2


def damaged_slide(tmp_path, kind: str = "junk"):
    """A synthetic pyramid whose level-0 tile at TILE has bytes overwritten mid-stream."""
    path = synthetic_slide(tmp_path / f"damaged-{kind}.tif", tissue_box=(0, 0, 2048, 1536))
    good = tifffile.imread(path, level=0)[TILE[1]:TILE[1] + 256, TILE[0]:TILE[0] + 256]
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        index = (TILE[1] // 256) * -(-page.imagewidth // 256) + TILE[0] // 256
        offset, count = page.dataoffsets[index], page.databytecounts[index]
    data = bytearray(path.read_bytes())
    mid = offset + count // 2
    if kind == "junk":
        data[mid:mid + 64] = bytes(np.random.default_rng(1).integers(0, 255, 64, dtype=np.uint8))
    else:
        data[mid:mid + 200] = b"\0" * 200
    path.write_bytes(bytes(data))
    return path, good


@pytest.mark.parametrize("kind", ["junk", "zeros"])
@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_damaged_jpeg_tile_is_an_error_on_both_backends_and_the_fast_path(tmp_path, kind, backend):
    path, good = damaged_slide(tmp_path, kind)
    with sk.open_slide(path, backend=backend) as slide:
        # The decoders return garbage without a word: the damage is real and silent underneath.
        raw = slide.read_region(TILE, 0, (256, 256), verify=False)
        assert np.abs(raw.astype(int) - good[..., :3].astype(int)).mean() > 5
        with pytest.raises(sk.CorruptTileError, match=r"damaged-.*\.tif: damaged tile at level-0 \(512, 256\)"):
            slide.read_region((500, 300), 0, (64, 64))
        grid = sk.TileGrid.from_slide(slide, mpp=0.5, size=256, min_tissue=0)
        reader = TileReader(slide, grid)
        assert reader.fast  # the native path decodes stored tiles directly
        i = int(np.flatnonzero((grid.coords == TILE).all(axis=1))[0])
        with pytest.raises(sk.CorruptTileError, match=r"\(512, 256\)") as err:
            reader.read(i)
        assert err.value.location == TILE
        # The general path (tiles that do not line up with stored tiles) refuses it too.
        odd = sk.TileGrid.from_slide(slide, mpp=0.75, size=100, min_tissue=0)
        with pytest.raises(sk.CorruptTileError):
            list(sk.read_tiles(slide, odd))
        # Undamaged tiles still read, and match tifffile.
        assert reader.read(0).shape == (256, 256, 3)


def test_skipping_bad_tiles_is_explicit_warned_and_listed(tmp_path):
    path, _ = damaged_slide(tmp_path)
    with sk.open_slide(path) as slide:
        grid = sk.TileGrid.from_slide(slide, mpp=0.5, size=256, min_tissue=0)
        with pytest.raises(sk.CorruptTileError):
            list(sk.read_tiles(slide, grid))
        with pytest.warns(sk.BadTileWarning, match=r"skipped 1 damaged tile.*\(512, 256\)"):
            got = dict(sk.read_tiles(slide, grid, on_bad_tile="skip", workers=2, chunk=5))
        assert len(got) == len(grid) - 1 and TILE not in got
    with pytest.raises(sk.CorruptTileError):
        sk.heatmap_slide(path, tmp_path / "fail", workers=0, progress=False, device="cpu", min_tissue=0)
    assert not (tmp_path / "fail" / "summary.json").exists()
    with pytest.warns(sk.BadTileWarning):
        s = sk.heatmap_slide(path, tmp_path / "skip", workers=1, progress=False, device="cpu", min_tissue=0,
                             on_bad_tile="skip")
    # Every heatmap tile that needs the damaged stored tile (256 px at TILE) is skipped, and only those.
    ext = s["config"]["size"] * s["config"]["mpp"] / 0.5
    assert s["bad_tiles"] and all(x < TILE[0] + 256 and x + ext > TILE[0] and y < TILE[1] + 256
                                  and y + ext > TILE[1] for x, y in s["bad_tiles"])
    assert json.loads((tmp_path / "skip" / "summary.json").read_text())["bad_tiles"] == s["bad_tiles"]


def test_sound_slides_pass_the_tile_check(demo_slide, tmp_path):
    with sk.open_slide(demo_slide) as slide:
        grid = sk.TileGrid.from_slide(slide, mpp=0.5, size=256, min_tissue=0)
        assert len(list(sk.read_tiles(slide, grid))) == len(grid)


def test_every_truncation_is_refused_or_fully_readable(tmp_path, shared_data):
    """Cutting a copy anywhere, including just after level 0's data (which opened before with only a
    log line), must either be refused or give a slide whose every level reads."""
    src = (shared_data / "wsi" / "CMU-1-Small-Region.svs").read_bytes()
    with tifffile.TiffFile(shared_data / "wsi" / "CMU-1-Small-Region.svs") as tif:
        p0 = tif.pages[0]
        level0_end = max(o + c for o, c in zip(p0.dataoffsets, p0.databytecounts))
    cuts = sorted(set(np.linspace(8, len(src) - 1, 60).astype(int).tolist()
                      + [level0_end + 2000, level0_end + 50_000, len(src) - 10]))
    dst = tmp_path / "cut.svs"
    for cut in cuts:
        dst.write_bytes(src[:cut])
        try:
            slide = sk.open_slide(dst)
        except sk.SlideError as e:
            assert "cut.svs" in str(e) and "\n" not in str(e)
            continue
        with slide:  # opened: every level must read completely
            for level, (w, h) in enumerate(slide.level_dimensions):
                slide.read_region((0, 0), level, (w, h))
    dst.write_bytes(src[:level0_end + 50_000])
    with pytest.raises(sk.SlideError, match="truncated"):
        sk.open_slide(dst)


def test_truncated_ome_subifd_pyramid_is_refused(tmp_path):
    rgb = np.full((1024, 1024, 3), 200, np.uint8)
    path = tmp_path / "sub.ome.tif"
    with tifffile.TiffWriter(path) as tw:
        tw.write(rgb, tile=(256, 256), subifds=1, compression="jpeg", photometric="rgb")
        tw.write(rgb[::2, ::2], tile=(256, 256), subfiletype=1, compression="jpeg", photometric="rgb")
    with tifffile.TiffFile(path) as tif:
        sub = tif.pages[0].pages[0]
        sub_end = max(o + c for o, c in zip(sub.dataoffsets, sub.databytecounts))
    data = path.read_bytes()
    cut = tmp_path / "cut.ome.tif"
    cut.write_bytes(data[:sub_end - 10])
    with pytest.raises(sk.SlideError, match="cut.ome.tif: truncated"):
        sk.open_slide(cut, mpp=0.5)


def _huge_header_tiff(path, width: int, height: int):
    """A hand-made TIFF header claiming width x height RGB pixels in one tiny strip."""
    entries = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 2),
               (273, 4, 1, 0), (277, 3, 1, 3), (278, 4, 1, height), (279, 4, 1, 3)]
    data_off = 8 + 2 + 12 * len(entries) + 4
    out = bytearray(b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", len(entries)))
    for tag, typ, cnt, val in entries:
        val = data_off if tag == 273 else val
        out += struct.pack("<HHIHH", tag, typ, cnt, val, 0) if typ == 3 else struct.pack("<HHII", tag, typ, cnt, val)
    out += struct.pack("<I", 0) + b"\xff\xff\xff"
    path.write_bytes(bytes(out))
    return path


def test_level0_of_2_31_pixels_is_one_clear_error(tmp_path):
    path = _huge_header_tiff(tmp_path / "huge.tif", 2**31 - 1, 2**31 - 1)
    with pytest.raises(sk.SlideError, match=r"huge.tif: image is 2147483647 x 2147483647 .* over the limit"):
        sk.open_slide(path, mpp=0.5)


def test_png_bomb_is_refused_and_the_limit_can_be_raised(tmp_path):
    from PIL import Image

    import slidekit.slides.slide as slide_mod

    png = tmp_path / "bomb.png"
    Image.new("RGB", (3000, 2000), (250, 250, 250)).save(png)
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(sk.SlideError, match=r"bomb.png: image is 3000 x 2000 .* limit of 1,000,000"):
        sk.open_slide(png, mpp=1.0, max_image_pixels=1_000_000)
    with sk.open_slide(png, mpp=1.0, max_image_pixels=10_000_000) as s:
        assert s.dimensions == (3000, 2000)
    assert Image.MAX_IMAGE_PIXELS == before  # Pillow's own guard is not switched off for everyone
    assert slide_mod.MAX_IMAGE_PIXELS == 1 << 30


def test_read_whole_of_a_single_level_slide_reads_stored_tiles_with_progress(tmp_path, capsys):
    rgb = np.random.default_rng(0).integers(120, 255, size=(2048, 3072, 3), dtype=np.uint8)
    path = tmp_path / "flat.tif"
    tifffile.imwrite(path, rgb, tile=(256, 256), photometric="rgb", compression="jpeg",
                     resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")
    with sk.open_slide(path) as slide:
        assert slide.level_count == 1
        view = slide.read_whole(8.0, progress=True)
        ref = slide._read_downsampled(view.shape[1], view.shape[0], 16.0, progress=False)
        import slidekit.slides.whole as whole

        direct = whole._from_regions(slide, 0, 3072, 2048, view.shape[1], view.shape[0], 1 << 24, None)
        assert view.shape == (128, 192, 3)
        assert np.abs(view.astype(int) - direct.astype(int)).max() <= 3  # same picture both ways
        assert np.array_equal(view, ref)
        assert "overview flat.tif" in capsys.readouterr().err
        with pytest.raises(sk.SlideError, match=r"flat.tif: .* over the limit of 1,000,000; pass max_read_pixels"):
            slide.read_whole(8.0, max_read_pixels=1_000_000)


def test_slide_without_mpp_can_be_opened_for_inspection(shared_data):
    path = shared_data / "wsi" / "TCGA-CR-7395-01A-01-TS1.svs"
    with sk.open_slide(path, require_mpp=False) as s:
        assert s.mpp is None and s.mpp_source is None and s.metadata_mpp is None
        assert s.thumbnail(256).shape[1] == 256  # a thumbnail needs no pixel size
        for call in (lambda: s.read_whole(8.0), lambda: s.level_mpp(0), lambda: s.best_level_for_mpp(1.0),
                     lambda: s.read_scaled((0, 0), (8, 8), 1.0),
                     lambda: sk.TileGrid.from_slide(s, mpp=1.0, min_tissue=0)):
            with pytest.raises(sk.MissingMPPError, match="TCGA-CR-7395"):
                call()


def test_fallback_mpp_never_replaces_metadata_and_override_warns(shared_data):
    path = shared_data / "wsi" / "CMU-1-Small-Region.svs"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with sk.open_slide(path, mpp=0.25) as s:
            assert s.mpp == pytest.approx((0.499, 0.499), abs=1e-3) and s.mpp_source == "metadata"
    with pytest.warns(sk.MPPOverrideWarning, match=r"CMU-1-Small-Region.svs: .*0.499.*0.25"):
        with sk.open_slide(path, override_mpp=0.25) as s:
            assert s.mpp == (0.25, 0.25) and s.mpp_source == "override"
            assert s.metadata_mpp == pytest.approx((0.499, 0.499), abs=1e-3)
    no_mpp = shared_data / "wsi" / "TCGA-CR-7395-01A-01-TS1.svs"
    with sk.open_slide(no_mpp, mpp=0.25) as s:
        assert s.mpp == (0.25, 0.25) and s.mpp_source == "fallback"


def test_tiffslide_decode_error_is_one_line_without_asyncio_noise(tmp_path):
    import subprocess
    import sys

    path = synthetic_slide(tmp_path / "broken.tif", tissue_box=(0, 0, 2048, 1536))
    with tifffile.TiffFile(path) as tif:
        offset, count = tif.pages[0].dataoffsets[10], tif.pages[0].databytecounts[10]
    data = bytearray(path.read_bytes())
    data[offset + count // 2:offset + count // 2 + 2] = b"\xff\xa6"  # a marker libjpeg refuses
    path.write_bytes(bytes(data))
    script = ("import slidekit as sk\n"
              f"s = sk.open_slide({str(path)!r}, backend='tiffslide')\n"
              "try:\n    s.read_region((0, 0), 0, (2048, 1536))\n"
              "except sk.CorruptTileError as e:\n    print('refused', e.location)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "refused (512, 256)" in proc.stdout
    assert "Task was destroyed" not in proc.stderr and "never awaited" not in proc.stderr, proc.stderr[:500]


def _random_bytes_ome(tmp_path):
    """An OME-TIFF (SubIFD pyramid, JPEG tiles) whose level-0 tile at (768, 256) is random bytes."""
    from skimage import data as skdata

    rgb = np.tile(skdata.immunohistochemistry(), (3, 3, 1))[:1536, :1536]
    path = tmp_path / "rnd.ome.tif"
    with tifffile.TiffWriter(path, ome=True) as tw:
        tw.write(rgb, tile=(256, 256), subifds=1, compression="jpeg", photometric="rgb",
                 resolution=(20000, 20000), resolutionunit="CENTIMETER",
                 metadata={"PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5})
        tw.write(rgb[::2, ::2], tile=(256, 256), subfiletype=1, compression="jpeg", photometric="rgb")
    with tifffile.TiffFile(path) as tif:
        off, cnt = tif.pages[0].dataoffsets[9], tif.pages[0].databytecounts[9]
    data = bytearray(path.read_bytes())
    data[off + 20:off + cnt - 2] = np.random.default_rng(3).integers(0, 256, cnt - 22, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
    return path


def test_random_bytes_in_an_ome_tile_are_one_line_and_skipped_into_a_damage_record(tmp_path):
    import subprocess
    import sys

    path = _random_bytes_ome(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "slidekit", "heatmap", str(path), "--out", str(tmp_path / "a"),
                           "--workers", "0", "-q", "--device", "cpu", "--min-tissue", "0"],
                          capture_output=True, text=True)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and "rnd.ome.tif: damaged tile at level-0 (768, 256)" in proc.stderr
    with pytest.warns(sk.BadTileWarning):
        s = sk.heatmap_slide(path, tmp_path / "b", workers=0, device="cpu", progress=False,
                             min_tissue=0, on_bad_tile="skip")
    boxes = [r["box"] for r in s["bad_tile_records"]]
    assert boxes and all(x0 < 1024 and x1 > 768 and y0 < 512 and y1 > 256 for x0, y0, x1, y1 in boxes)  # each meets it
    assert [b[:2] for b in boxes] == s["bad_tiles"]
    assert all("(768, 256)" in r["reason"] for r in s["bad_tile_records"])
    feats = json.loads((tmp_path / "b" / "bad_tiles.geojson").read_text())["features"]
    assert len(feats) == len(boxes) and feats[0]["properties"]["objectType"] == "tile"
    assert "bad_tiles.geojson" in s["outputs"]
