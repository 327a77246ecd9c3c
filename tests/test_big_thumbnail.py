"""A 100,000 x 100,000 px single-level slide: its thumbnail answers within seconds (a strided
sample of its stored tiles, said in a warning), not after minutes of decoding 10^10 pixels."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import tifffile

from slidekit import open_slide
from slidekit.slides.whole import SampledOverviewWarning

SIZE, TILE = 100_000, 1024
TISSUE = (200, 110, 160)


def _big_slide(path: Path) -> Path:
    """One JPEG tile each of glass and tissue, encoded once and written 9,604 times (a second, ~0.2 GB)."""
    opts = dict(tile=(TILE, TILE), compression="jpeg", photometric="rgb", resolution=(1e4 / 0.25, 1e4 / 0.25),
                resolutionunit="CENTIMETER")
    enc = {}
    for name, colour in (("glass", (245, 245, 245)), ("tissue", TISSUE)):
        one = path.with_suffix(f".{name}.tif")
        tifffile.imwrite(one, np.full((TILE, TILE, 3), colour, np.uint8), **opts)
        with tifffile.TiffFile(one) as t:
            page = t.pages[0]
            t.filehandle.seek(page.dataoffsets[0])
            enc[name] = t.filehandle.read(page.databytecounts[0])
        one.unlink()
    n = -(-SIZE // TILE)

    def tiles():
        for r in range(n):
            for c in range(n):
                yield enc["tissue" if n // 3 <= r < 2 * n // 3 and n // 3 <= c < 2 * n // 3 else "glass"]

    tifffile.imwrite(path, data=tiles(), shape=(SIZE, SIZE, 3), dtype=np.uint8, bigtiff=True, **opts)
    return path


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Path:
    return _big_slide(tmp_path_factory.mktemp("big") / "big.tif")


def test_thumbnail_of_a_100k_single_level_slide_answers_in_seconds(big):
    with open_slide(big) as s:
        assert s.dimensions == (SIZE, SIZE) and s.level_count == 1
        t0 = time.time()
        with pytest.warns(SampledOverviewWarning, match="stored tiles"):
            th = s.thumbnail(256)
        took = time.time() - t0
    assert took < 20, f"{took:.1f} s"  # was minutes (no answer in 60 s)
    assert th.shape == (256, 256, 3)
    np.testing.assert_allclose(th[128, 128], TISSUE, atol=4)  # the middle third is tissue
    np.testing.assert_allclose(th[10, 10], (245, 245, 245), atol=4)
    np.testing.assert_allclose(th[245, 245], (245, 245, 245), atol=4)


def test_small_slides_are_not_sampled(tmp_path, recwarn):
    """Below the decode budget nothing is sampled: a one-tile feature shows, without the warning."""
    from conftest import synthetic_slide

    p = synthetic_slide(tmp_path / "s.tif", width=4096, height=4096, tissue_box=(1024, 1024, 256, 256))
    with open_slide(p) as s:
        th = s.thumbnail(512)
    assert th[128:160, 128:160].mean(axis=(0, 1))[1] < 200  # the tissue square shows
    assert not [w for w in recwarn if issubclass(w.category, SampledOverviewWarning)]


def test_read_whole_is_never_sampled(big, monkeypatch):
    """Tissue detection and QC read every tile: read_whole does not take the sampled path (here it
    is refused by a small max_read_pixels instead of being read for minutes)."""
    from slidekit.base.errors import SlideError

    with open_slide(big) as s:
        with pytest.raises(SlideError, match="over the limit"):
            s.read_whole(64 * 0.25 * 100, max_read_pixels=1 << 30)


def test_the_viewer_answers_the_thumbnail_and_coarse_tiles(big):
    pytest.importorskip("starlette")
    pytest.importorskip("httpx")
    import io

    from PIL import Image
    from starlette.testclient import TestClient

    from slidekit.view.app import build_app

    c = TestClient(build_app(big), base_url="http://127.0.0.1")
    t0 = time.time()
    r = c.get(f"/thumb/{big.name}.jpg")
    assert r.status_code == 200 and time.time() - t0 < 20
    assert max(Image.open(io.BytesIO(r.content)).size) == 192
    tile = c.get(f"/dzi/{big.name}_files/8/0_0.jpeg")  # a coarse DeepZoom level: from the cached overview
    assert tile.status_code == 200 and time.time() - t0 < 40
    assert np.asarray(Image.open(io.BytesIO(tile.content))).shape[:2] == (196, 196)
