"""The fill rule of self-intersecting outlines (rasterize, areas, convert --make-valid) and
clipping exported geometry to the slide (write_geojson bounds, heatmap, tiles, embed clusters)."""
from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import shapely
from conftest import synthetic_slide
from shapely.geometry import LineString, MultiPoint, Point, Polygon, box

import slidekit as sk
from slidekit.annotations.formats import read_annotations, write_geojson
from slidekit.annotations.geometry import filled_area, filled_geometry, make_valid, rasterize
from slidekit.annotations.objects import Annotation
from slidekit.base.errors import AnnotationWarning


def winding_oracle(ring: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Winding number of each point by summing signed angles (independent of slidekit's
    crossing-based code): the total turn of the ring seen from the point, over 2 pi."""
    r = np.asarray(ring, float)[:, :2]
    px, py = x.ravel()[:, None], y.ravel()[:, None]
    a = np.arctan2(r[:, 1] - py, r[:, 0] - px)
    d = np.diff(np.concatenate([a, a[:, :1]], axis=1), axis=1)
    d = (d + np.pi) % (2 * np.pi) - np.pi
    return np.rint(d.sum(axis=1) / (2 * np.pi)).astype(int)


def centres(x0: float, y0: float, w: int, h: int) -> tuple[np.ndarray, np.ndarray]:
    return np.meshgrid(x0 + np.arange(w) + 0.5, y0 + np.arange(h) + 0.5)


# A ring that goes round a square twice (the second lap smaller): winding 2 in the inner square.
# (No edge passes through a pixel centre, where inside/outside would be a matter of convention.)
DOUBLE = [(0, 0), (40, 0), (40, 40), (0, 40), (0, 2), (10, 10), (30, 10), (30, 30), (10, 30), (10, 10), (1, 0)]
# A crossed outline (two crossings, three lobes, of winding +1, -1, +1): the shoelace area cancels them.
EIGHT = [(0, 0), (20, 21), (40, 0), (40, 21), (20, 0), (0, 21), (0, 0)]


@pytest.mark.parametrize("ring", [DOUBLE, EIGHT], ids=["double-lap", "figure-eight"])
def test_rasterize_fills_self_intersecting_rings_by_non_zero_winding(ring) -> None:
    ann = Annotation(Polygon(ring))
    assert not ann.geometry.is_valid
    m = rasterize([ann], box=(-5, -5, 50, 50), mpp=1.0).astype(bool)
    X, Y = centres(-5, -5, 50, 50)
    w = winding_oracle(np.asarray(ring), X, Y).reshape(50, 50)
    assert np.array_equal(m, w != 0)  # QuPath's and ASAP's rule, pixel for pixel
    evenodd = rasterize([ann], box=(-5, -5, 50, 50), mpp=1.0, fill_rule="evenodd").astype(bool)
    assert np.array_equal(evenodd, w % 2 != 0)
    # Area by the same rule, computed on the geometry (no pixels): matches the pixel count of a
    # finer raster (edge pixels are a small share of it).
    fine = rasterize([ann], box=(-5, -5, 50, 50), mpp=0.1, slide_mpp=1.0)
    assert filled_area(ann.geometry) == pytest.approx(fine.sum() / 100, rel=0.01)
    assert filled_geometry(ann.geometry).is_valid


def test_rule_matters_for_both_rings() -> None:
    # Non-zero keeps the inner square of the double lap (even-odd drops it) and both lobes of the
    # figure-eight (the shoelace area, Polygon.area, cancels them).
    d, e = Polygon(DOUBLE), Polygon(EIGHT)
    assert filled_area(d) - filled_area(d, "evenodd") == pytest.approx(400, rel=0.05)
    assert filled_area(e) == pytest.approx(filled_area(e, "evenodd")) and filled_area(e) > e.area + 100


def test_holes_by_non_zero_whatever_their_orientation() -> None:
    shell = [(0, 0), (30, 0), (30, 30), (0, 30)]
    for hole in ([(10, 10), (20, 10), (20, 20), (10, 20)], [(10, 10), (10, 20), (20, 20), (20, 10)]):
        m = rasterize([Annotation(Polygon(shell, [hole]))], box=(0, 0, 30, 30), mpp=1.0)
        assert m.sum() == 900 - 100 and m[15, 15] == 0


@pytest.fixture(scope="module")
def camelyon_invalid(shared_data: Path) -> dict[str, list[Annotation]]:
    out = {}
    for name in ("tumor_076", "tumor_036"):
        anns = read_annotations(shared_data / "camelyon" / "asap_xml" / f"{name}.xml")
        out[name] = [a for a in anns if not a.geometry.is_valid]
    return out


def test_real_camelyon_self_intersections(camelyon_invalid) -> None:
    assert len(camelyon_invalid["tumor_076"]) == 3 and len(camelyon_invalid["tumor_036"]) == 10
    for anns in camelyon_invalid.values():
        for a in anns:
            fg = filled_geometry(a.geometry)
            assert fg.is_valid and fg.area > 0
            # A coarse whole-outline raster (~40 px across) agrees with the oracle at every pixel
            # centre not lying exactly on the outline (there inside/outside is a convention).
            x0, y0, x1, y1 = a.geometry.bounds
            s = max(1.0, max(x1 - x0, y1 - y0) / 40)
            bx = (x0 - 2 * s, y0 - 2 * s, x1 - x0 + 4 * s, y1 - y0 + 4 * s)
            m = rasterize([a], bx, mpp=s, slide_mpp=1.0).astype(bool)
            X, Y = np.meshgrid(bx[0] + (np.arange(m.shape[1]) + 0.5) * s, bx[1] + (np.arange(m.shape[0]) + 0.5) * s)
            w = winding_oracle(np.asarray(a.geometry.exterior.coords), X, Y).reshape(m.shape)
            off = m != (w != 0)
            assert off.sum() <= 10 and a.geometry.exterior.distance(MultiPoint(np.c_[X[off], Y[off]])) < 1e-6 \
                if off.any() else True


def test_real_double_wound_outline_at_level0(camelyon_invalid) -> None:
    # tumor_076's first lesion loops over itself: ~200 level-0 px are wound twice. At full
    # resolution around that spot the raster, the oracle and the area all follow non-zero.
    a = max(camelyon_invalid["tumor_076"], key=lambda a: filled_area(a.geometry) - filled_area(a.geometry, "evenodd"))
    diff = filled_geometry(a.geometry).difference(filled_geometry(a.geometry, "evenodd"))
    twice = max(getattr(diff, "geoms", [diff]), key=lambda g: g.area)  # the loop (not rounding slivers)
    assert twice.area > 100
    x0, y0, x1, y1 = (int(v) for v in twice.bounds)
    bx = (x0 - 20, y0 - 20, x1 - x0 + 40, y1 - y0 + 40)
    m = rasterize([a], bx, mpp=1.0).astype(bool)
    X, Y = centres(*bx)
    w = winding_oracle(np.asarray(a.geometry.exterior.coords), X, Y).reshape(m.shape)
    # Compare off the outline: a centre exactly on an edge is inside or out by convention only.
    off = shapely.distance(a.geometry.exterior, shapely.points(X.ravel(), Y.ravel())).reshape(m.shape) > 1e-6
    assert (np.abs(w) >= 2).sum() > 50  # ~100 pixel centres lie inside both laps
    assert np.array_equal(m[off], w[off] != 0)
    evenodd = rasterize([a], bx, mpp=1.0, fill_rule="evenodd").astype(bool)  # what the old fill did
    assert np.array_equal((m & ~evenodd)[off], np.abs(w[off]) >= 2)
    window = box(bx[0], bx[1], bx[0] + bx[2], bx[1] + bx[3])
    assert filled_geometry(a.geometry).intersection(window).area == pytest.approx(m.sum(), rel=0.02)


def test_convert_make_valid_repairs_what_it_fills(shared_data: Path, tmp_path: Path) -> None:
    src = shared_data / "camelyon" / "asap_xml" / "tumor_076.xml"
    kept, fixed = tmp_path / "kept.geojson", tmp_path / "fixed.geojson"
    r = subprocess.run([sys.executable, "-m", "slidekit", "convert", str(src), "--out", str(kept)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["invalid"] == 3 and "--make-valid" in r.stderr  # said, not silent
    assert sum(not a.geometry.is_valid for a in read_annotations(kept)) == 3  # round trip: as drawn
    r = subprocess.run([sys.executable, "-m", "slidekit", "convert", str(src), "--out", str(fixed), "--make-valid"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["repaired"] == 3
    before, after = read_annotations(kept), read_annotations(fixed)
    assert all(a.geometry.is_valid for a in after)
    for a, b in zip(before, after):
        if not a.geometry.is_valid:
            x0, y0, x1, y1 = a.geometry.bounds
            s = max(x1 - x0, y1 - y0) / 200
            bx = (x0, y0, x1 - x0, y1 - y0)
            assert np.array_equal(rasterize([a], bx, mpp=s, slide_mpp=1.0), rasterize([b], bx, mpp=s, slide_mpp=1.0))
            assert b.geometry.area == pytest.approx(filled_area(a.geometry))
    assert make_valid(Point(1, 2)) == (Point(1, 2), False)


# -- rasterize: labels and coordinates ----------------------------------------------------------


def test_rasterize_labels_matching_no_object() -> None:
    anns = [Annotation(box(0, 0, 10, 10), label="metastasis")]
    with pytest.raises(sk.AnnotationError, match="Tumor.*match none"):
        rasterize(anns, (0, 0, 20, 20), mpp=1.0, labels={"Tumor": 1})
    with pytest.warns(AnnotationWarning, match="'negative' match no object"):
        m = rasterize(anns, (0, 0, 20, 20), mpp=1.0, labels={"metastasis": 1, "negative": 0})
    assert m.sum() == 100
    assert rasterize([], (0, 0, 20, 20), mpp=1.0, labels={"Tumor": 1}).sum() == 0  # no objects: nothing to match


def test_rasterize_refuses_nan_vertices() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # shapely's own note about the NaN
        nan = Annotation(Polygon([(0, 0), (float("nan"), 0), (10, 10)]), label="T")
    with pytest.raises(sk.AnnotationError, match="non-finite"):
        rasterize([nan], (0, 0, 20, 20), mpp=1.0)


# -- clipping exported geometry to the slide ----------------------------------------------------


def test_write_geojson_clips_to_bounds_and_says_so(tmp_path: Path) -> None:
    anns = [Annotation(box(90, 90, 120, 130), label="T"), Annotation(box(10, 10, 20, 20)),
            Annotation(Point(150, 5)), Annotation(LineString([(50, 50), (50, 200)]))]
    with pytest.warns(AnnotationWarning, match=r"1 objects entirely outside the bounds dropped \(2 clipped\)"):
        out = write_geojson(anns, tmp_path / "c.geojson", bounds=(100, 100))
    got = read_annotations(out)
    assert len(got) == 3
    assert got[0].geometry.equals(box(90, 90, 100, 100)) and got[1].geometry.equals(box(10, 10, 20, 20))
    assert got[2].geometry.equals(LineString([(50, 50), (50, 100)]))
    assert [a.id for a in got] == [anns[0].id, anns[1].id, anns[3].id]
    # A geometry bound (e.g. a heatmap's coverage box); clipping alone (edge tiles) is not warned about.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        write_geojson(anns[:2], tmp_path / "d.geojson", bounds=box(0, 0, 100, 100))


def _all_coords(path: Path) -> np.ndarray:
    def walk(c):
        if isinstance(c, (int, float)):
            return
        if c and isinstance(c[0], (int, float)):
            pts.append(c[:2])
        else:
            for x in c:
                walk(x)
    pts: list = []
    for f in json.loads(path.read_text())["features"]:
        walk(f["geometry"]["coordinates"])
    return np.asarray(pts, float)


def test_heatmap_geojson_stays_on_the_slide(tmp_path: Path) -> None:
    from slidekit.infer.predictor import heatmap_slide

    W, H = 1000, 700  # not a multiple of the 256-px tiles nor of the 32-px heatmap pixels
    slide = synthetic_slide(tmp_path / "edge.tif", width=W, height=H, tissue_box=(500, 300, 500, 400))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AnnotationWarning)
        heatmap_slide(slide, tmp_path / "out", model="tissue", mpp=2.0, size=128, workers=0, min_tissue=0.05,
                      min_area_um2=0, tiles_geojson=True, progress=False)
    for name in ("predictions.geojson", "tiles.geojson"):
        xy = _all_coords(tmp_path / "out" / name)
        assert len(xy) and xy.min() >= 0 and xy[:, 0].max() <= W and xy[:, 1].max() <= H, name
    (poly,) = read_annotations(tmp_path / "out" / "predictions.geojson")
    assert poly.geometry.bounds[3] == H  # the tissue reaches the bottom edge, and stops there
    assert poly.measurements["Area px (level 0)"] == pytest.approx(poly.geometry.area)


def test_embed_cluster_tiles_stay_on_the_slide(tmp_path: Path, one_torch_thread) -> None:
    import torch

    from slidekit.models.checkpoint import save_checkpoint
    from slidekit.models.networks import ResNetClassifier
    from slidekit.models.spec import ModelSpec
    from slidekit.slidelevel.embed import embed_slide

    W, H = 600, 500
    slide = synthetic_slide(tmp_path / "edge.tif", width=W, height=H, tissue_box=(200, 200, 400, 300))
    torch.manual_seed(0)
    spec = ModelSpec(arch="resnet-encoder", task="embedding", classes=[], patch_size=32, mpp=4.0,
                     mean=(0.5,) * 3, std=(0.5,) * 3, activation="none", trainer="simclr")
    model = save_checkpoint(tmp_path / "enc.pt", ResNetClassifier("resnet18", 0), spec)
    gj = tmp_path / "clusters.geojson"
    embed_slide(slide, tmp_path / "e.zarr", model=model, device="cpu", clusters=2, geojson=gj, progress=False,
                min_tissue=0.1)
    xy = _all_coords(gj)
    assert len(xy) and xy.min() >= 0 and xy[:, 0].max() <= W and xy[:, 1].max() <= H
    assert xy[:, 0].max() == W and xy[:, 1].max() == H  # edge tiles are there, cut at the edge


# -- areas of hand-drawn outlines ---------------------------------------------------------------


def test_annotation_areas_follow_the_fill_rule(shared_data: Path) -> None:
    import csv

    from slidekit.slidelevel.features import annotation_features

    eight = Annotation(Polygon(EIGHT), label="Tumor")
    f = annotation_features([eight], slide_mpp=0.5)
    assert Polygon(EIGHT).area == 0  # the shoelace sum cancels the lobes
    assert f["area_um2"] == pytest.approx(420 * 0.25) and f["n_regions"] == 3  # three lobes, touching at points
    # Real CAMELYON16 lesions (3 self-intersecting): the area equals the non-zero pixel count.
    anns = read_annotations(shared_data / "camelyon" / "asap_xml" / "tumor_076.xml")
    f = annotation_features(anns, slide_mpp=1.0)
    x0, y0, x1, y1 = np.array([a.geometry.bounds for a in anns]).T
    bx = (x0.min(), y0.min(), x1.max() - x0.min(), y1.max() - y0.min())
    m = rasterize(anns, bx, mpp=32.0, slide_mpp=1.0)
    assert f["area_um2"] == pytest.approx(m.sum() * 32 * 32, rel=0.01) and f["size_class"] == "macro"
    # CAMELYON17 patient_004_node_4 is an ITC node in the official labels; its outlines agree
    # (at the ~0.24 µm/px of CAMELYON17 scanners).
    node = annotation_features(read_annotations(shared_data / "camelyon" / "asap_xml" / "patient_004_node_4.xml"),
                               slide_mpp=0.243)
    rows = {r[0]: r[1] for r in csv.reader((shared_data / "camelyon" / "stage_labels.csv").open())}
    assert node["size_class"] == rows["patient_004_node_4.tif"] == "itc"
