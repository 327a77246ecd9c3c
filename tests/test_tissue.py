"""Tissue masks on synthetic slides with known tissue, pen marks, and the real slides."""
from __future__ import annotations

import numpy as np
import pytest

import slidekit as sk
from slidekit.demo import write_pyramid
from slidekit.tissue import detect_tissue, mask_to_polygons
from tests.conftest import synthetic_slide


def test_mask_finds_the_known_tissue_box(tmp_path):
    box = (512, 256, 1024, 768)
    slide = sk.open_slide(synthetic_slide(tmp_path / "s.tif", tissue_box=box))
    mask = sk.tissue_mask(slide, mpp=8.0)
    assert mask.mpp == 8.0 and mask.array.dtype == bool
    x, y, w, h = box
    assert mask.fraction((x + 64, y + 64, w - 128, h - 128)) > 0.99
    assert mask.fraction((0, 0, 400, 200)) == 0.0
    assert mask.fraction((x - 64, y, 128, 64)) == pytest.approx(0.5, abs=0.1)
    (poly,) = mask.polygons
    bx0, by0, bx1, by1 = poly.bounds  # level-0 pixels
    tol = 2 * 8.0 / 0.5  # two mask pixels
    assert abs(bx0 - x) < tol and abs(by0 - y) < tol and abs(bx1 - (x + w)) < tol and abs(by1 - (y + h)) < tol
    assert mask.area_um2 == pytest.approx(w * h * 0.25, rel=0.05)


def test_pen_marks_and_glass_are_not_tissue():
    rng = np.random.default_rng(1)
    img = np.full((400, 400, 3), 240, np.uint8)
    img[100:300, 50:200] = np.clip(np.array([190, 100, 170]) + rng.integers(-20, 20, (200, 150, 3)), 0, 255)
    img[150:170, 230:390] = (30, 160, 60)  # green marker
    img[220:240, 230:390] = (40, 60, 200)  # blue marker
    img[300:320, 230:390] = (20, 20, 25)  # black marker
    mask = detect_tissue(img, mpp=8.0, min_area_um2=1000)
    assert mask[110:290, 60:190].mean() > 0.98
    assert not mask[150:170, 240:380].any()
    assert not mask[220:240, 240:380].any()
    assert not mask[300:320, 240:380].any()
    assert not mask[:80].any()  # glass


@pytest.mark.parametrize("mpp", [4.0, 8.0])
def test_min_area_is_in_square_micrometres(mpp):
    img = np.full((600, 600, 3), 240, np.uint8)
    side = round(120 / mpp)  # a 120 x 120 µm blob = 14,400 µm²
    img[100:100 + side, 100:100 + side] = (180, 90, 150)
    assert detect_tissue(img, mpp, min_area_um2=10_000).any()
    assert not detect_tissue(img, mpp, min_area_um2=20_000).any()


def test_big_holes_are_kept_small_holes_filled():
    img = np.full((300, 300, 3), 240, np.uint8)
    img[50:250, 50:250] = (180, 90, 150)
    img[80:120, 80:120] = 240  # 40 px = 320 µm square hole: kept
    img[200:203, 200:203] = 240  # tiny hole: filled
    mask = detect_tissue(img, mpp=8.0, min_hole_um2=20_000)
    assert not mask[90:110, 90:110].any()
    assert mask[200:203, 200:203].all()
    (poly,) = mask_to_polygons(mask)
    assert len(poly.interiors) == 1
    assert poly.area == pytest.approx(mask.sum(), rel=0.02)


def test_blank_slide_raises_tissue_error(tmp_path):
    path = write_pyramid(tmp_path / "blank.tif", np.full((1024, 1024, 3), 243, np.uint8), 0.5)
    with pytest.raises(sk.TissueError, match="blank.tif"):
        sk.tissue_mask(sk.open_slide(path))


@pytest.mark.parametrize("name,mpp,expected", [
    ("CMU-1-Small-Region.svs", None, (0.25, 0.5)),
    ("TCGA-CR-7395-01A-01-TS1.svs", 0.5, (0.5, 0.75)),
    ("OS-2-ndpi.ome.tif", None, (0.75, 0.97)),
    ("OS-2-vsi.ome.tif", None, (0.75, 0.97)),
])
def test_real_slides_have_plausible_tissue_fraction(shared_data, name, mpp, expected):
    # Fractions checked by eye on the mask overlays: CMU-1 is a strip of skin on mostly glass,
    # the TCGA frozen section fills most of its slide, the OS-2 crops are tissue with small gaps.
    slide = sk.open_slide(shared_data / "wsi" / name, mpp=mpp)
    mask = sk.tissue_mask(slide, mpp=4.0)
    lo, hi = expected
    assert lo < mask.array.mean() < hi
    assert mask.polygons and all(p.is_valid for p in mask.polygons)
