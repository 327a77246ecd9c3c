"""Slide reading: real slides agree with tifffile; backends, MPP rules and bad input."""
from __future__ import annotations

import pickle
import shutil

import cv2
import numpy as np
import pytest
import tifffile

import slidekit as sk
from tests.conftest import synthetic_slide


@pytest.mark.parametrize("name", ["CMU-1-Small-Region.svs", "OS-2-ndpi.ome.tif", "OS-2-vsi.ome.tif"])
def test_real_slide_geometry_and_pixels_agree_with_tifffile(shared_data, name):
    path = shared_data / "wsi" / name
    with sk.open_slide(path) as slide, tifffile.TiffFile(path) as tif:
        level0 = tif.series[0].levels[0]
        h, w = level0.shape[:2]
        assert slide.dimensions == (w, h)
        assert slide.level_dimensions[0] == (w, h)
        ref = level0.asarray()[..., :3]
        x, y, rw, rh = w // 3, h // 4, 300, 200
        got = slide.read_region((x, y), 0, (rw, rh))
        assert got.dtype == np.uint8 and got.shape == (rh, rw, 3)
        diff = np.abs(got.astype(int) - ref[y:y + rh, x:x + rw].astype(int))
        # Both decode the same JPEG tiles; libjpeg builds may differ by a grey level or two.
        assert diff.mean() < 1.5 and np.percentile(diff, 99) <= 6


def test_real_slide_mpp_from_metadata(shared_data):
    with sk.open_slide(shared_data / "wsi" / "CMU-1-Small-Region.svs") as s:
        assert s.backend == "openslide"
        assert s.mpp == pytest.approx((0.499, 0.499), abs=1e-3)
    with sk.open_slide(shared_data / "wsi" / "OS-2-ndpi.ome.tif") as s:
        assert s.mpp[0] == pytest.approx(0.2271, abs=1e-3)


@pytest.mark.parametrize("name", ["OS-2-ndpi.ome.tif", "OS-2-vsi.ome.tif"])
def test_ome_tiff_falls_back_to_tiffslide(shared_data, name):
    with sk.open_slide(shared_data / "wsi" / name) as s:
        assert s.backend == "tiffslide"
    with pytest.raises(sk.SlideError, match="OpenSlide"):
        sk.open_slide(shared_data / "wsi" / name, backend="openslide")


def test_slide_without_mpp_is_an_error_unless_given(shared_data):
    path = shared_data / "wsi" / "TCGA-CR-7395-01A-01-TS1.svs"
    with pytest.raises(sk.MissingMPPError, match="TCGA-CR-7395.*MPP"):
        sk.open_slide(path)
    with sk.open_slide(path, mpp=0.25) as s:
        assert s.mpp == (0.25, 0.25) and s.mpp_source == "fallback"
        assert s.level_count == 2
        assert s.read_region((100, 100), 1, (64, 64)).shape == (64, 64, 3)


def test_plain_image_needs_mpp(shared_data):
    png = next((shared_data / "nuclei_monuseg" / "images").glob("*.png"))
    with pytest.raises(sk.MissingMPPError):
        sk.open_slide(png)
    with sk.open_slide(png, mpp=0.25) as s:
        assert s.backend == "image" and s.dimensions == (1000, 1000)


def test_bad_inputs_raise_slide_error_naming_the_file(tmp_path, shared_data):
    with pytest.raises(sk.SlideError, match="missing.svs: file not found"):
        sk.open_slide(tmp_path / "missing.svs")
    text = tmp_path / "notes.svs"
    text.write_text("this is not a slide\n" * 100)
    with pytest.raises(sk.SlideError, match="notes.svs"):
        sk.open_slide(text)
    empty = tmp_path / "empty.tif"
    empty.write_bytes(b"")
    with pytest.raises(sk.SlideError, match="empty"):
        sk.open_slide(empty)
    with pytest.raises(sk.SlideError, match="directory"):
        sk.open_slide(tmp_path)
    src = shared_data / "wsi" / "CMU-1-Small-Region.svs"
    truncated = tmp_path / "truncated.svs"
    truncated.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    with pytest.raises(sk.SlideError, match="truncated.svs: truncated"):
        sk.open_slide(truncated)
    with pytest.raises(sk.SlideError, match="unknown backend"):
        sk.open_slide(src, backend="bogus")


def test_errors_are_slidekit_errors():
    assert issubclass(sk.SlideError, sk.SlidekitError)
    assert issubclass(sk.MissingMPPError, sk.SlideError)
    assert issubclass(sk.AnnotationError, sk.SlidekitError)


def test_out_of_bounds_reads_are_white_for_every_backend(tmp_path):
    path = synthetic_slide(tmp_path / "s.tif", width=512, height=512, tissue_box=(0, 0, 512, 512))
    for backend in ("openslide", "tiffslide"):
        with sk.open_slide(path, backend=backend) as s:
            region = s.read_region((448, 448), 0, (128, 128))
            assert (region[64:, :] == 255).all() and (region[:, 64:] == 255).all()
            assert region[:64, :64].mean() < 230  # the tissue part is not white


def test_slide_pickles_and_reopens(tmp_path):
    path = synthetic_slide(tmp_path / "s.tif")
    slide = sk.open_slide(path)
    before = slide.read_region((600, 300), 0, (32, 32))
    clone = pickle.loads(pickle.dumps(slide))
    assert np.array_equal(clone.read_region((600, 300), 0, (32, 32)), before)
    slide.close()
    assert np.array_equal(slide.read_region((600, 300), 0, (32, 32)), before)  # reopens lazily


def test_thumbnail_and_info(demo_slide):
    with sk.open_slide(demo_slide) as s:
        thumb = s.thumbnail(max_size=300)
        assert max(thumb.shape[:2]) <= 300 and thumb.dtype == np.uint8
        info = s.info()
        assert info["mpp"] == [0.5, 0.5] and info["level_count"] == s.level_count >= 2


def test_copy_of_demo_slide_opens_with_both_tiff_backends(tmp_path, demo_slide):
    copy = tmp_path / "copy.tif"
    shutil.copy(demo_slide, copy)
    a = sk.open_slide(copy, backend="openslide").read_region((700, 700), 0, (100, 100))
    b = sk.open_slide(copy, backend="tiffslide").read_region((700, 700), 0, (100, 100))
    assert np.abs(a.astype(int) - b.astype(int)).mean() < 1.5


def test_tile_size_and_a_sized_tile_cache(tmp_path):
    """OpenSlide says each level's stored tile size; ``tile_cache`` sizes its decoded-tile cache for the
    reads inside (QC's focus blocks) and gives the default back after; reads are the same either way."""
    from slidekit.regions.qc_detect import _tile_cache_bytes

    path = synthetic_slide(tmp_path / "s.tif", width=1024, height=768, tissue_box=(128, 128, 512, 384))
    with sk.open_slide(path) as s:
        assert s.backend == "openslide"
        tw, th = s.tile_size(0)
        assert tw > 0 and th > 0
        whole = s.read_region((0, 0), 0, (512, 384))
        with s.tile_cache(0) as same:
            assert same is s
            np.testing.assert_array_equal(s.read_region((0, 0), 0, (512, 384)), whole)
        np.testing.assert_array_equal(s.read_region((0, 0), 0, (512, 384)), whole)
        level = s.best_level_for_mpp(s.mpp[0])
        width = s.level_dimensions[level][0]
        assert _tile_cache_bytes(s, s.mpp[0]) == 2 * -(-width // tw) * tw * th * 4  # two rows of RGBA tiles
    png = tmp_path / "overview.png"
    cv2.imwrite(str(png), np.full((64, 64, 3), 200, np.uint8))
    with sk.open_slide(png, mpp=16.0) as img:
        assert img.tile_size(0) is None and _tile_cache_bytes(img, 16.0) is None
        with img.tile_cache(1 << 20):  # no tile cache of its own: a no-op
            assert img.read_region((0, 0), 0, (8, 8)).shape[:2] == (8, 8)
