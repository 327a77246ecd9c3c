"""slidekit cells: instances, ownership across seams (each nucleus once), µm measurements, resume, bad input."""
from __future__ import annotations

import csv
import gzip
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import slidekit.infer.cells as cells_mod
from slidekit.base.errors import ConfigError, SlidekitError
from slidekit.cli import main
from slidekit.cohort.run import run_cohort
from slidekit.infer.cells import cells_slide, measure_instances, nucleus_channels, split_instances
from slidekit.models.builtin import BuiltinSpec, builtin_model
from slidekit.slides.demo import write_pyramid

MPP = 0.5


def _discs(shape, centres, r):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    img = np.full(shape + (3,), 235, np.uint8)
    for cy, cx in centres:
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = (60, 30, 140)  # haematoxylin-blue
    return img


@pytest.fixture(scope="module")
def disc_slide(tmp_path_factory):
    d = tmp_path_factory.mktemp("cells")
    rng = np.random.default_rng(0)
    # a lattice of separate discs, many of them lying across tile seams (tile stride 48 px)
    centres = [(y + rng.integers(-3, 4), x + rng.integers(-3, 4))
               for y in range(20, 300, 28) for x in range(20, 300, 28)]
    write_pyramid(d / "discs.tif", _discs((320, 320), centres, 8), MPP, tile=64, compression="zlib")
    return d / "discs.tif", len(centres)


def _loaded():
    net, spec = builtin_model("hematoxylin", stride=1, patch_size=64)
    return net, spec, "builtin:hematoxylin-stride1"


def test_disc_measurements_in_um():
    r = 10
    labels = np.zeros((40, 40), np.int32)
    yy, xx = np.mgrid[:40, :40]
    labels[(yy - 20) ** 2 + (xx - 20) ** 2 <= r * r] = 1
    rgb = _discs((40, 40), [(20, 20)], r)
    (n,) = list(measure_instances(labels, rgb, mpp=0.25))
    assert n["area_um2"] == pytest.approx(np.pi * (r * 0.25) ** 2, rel=0.03)
    assert n["perimeter_um"] == pytest.approx(2 * np.pi * r * 0.25, rel=0.08)
    assert n["circularity"] > 0.85 and n["solidity"] > 0.9 and n["eccentricity"] < 0.2
    assert n["hematoxylin_od"] > 0.05 and n["centroid"] == pytest.approx((20.5, 20.5), abs=0.01)


def test_watershed_splits_touching_nuclei():
    prob = np.zeros((40, 60), np.float32)
    yy, xx = np.mgrid[:40, :60]
    prob[((yy - 20) ** 2 + (xx - 20) ** 2 <= 81) | ((yy - 20) ** 2 + (xx - 36) ** 2 <= 81)] = 1
    assert split_instances(prob, 0.5, min_distance=4).max() == 2


def test_each_nucleus_once_across_seams_and_resume(disc_slide, tmp_path):
    path, n = disc_slide
    kw = dict(mpp=MPP, size=64, overlap=16, threshold=0.3, min_tissue=0.0, progress=False, loaded=_loaded(),
              min_distance_um=3.0)
    s = cells_slide(path, tmp_path / "o", **kw)
    assert s["nuclei"] == n  # exactly once: none lost on a seam, none doubled in an overlap
    rows = list(csv.DictReader(open(tmp_path / "o" / "cells.csv")))
    assert len(rows) == n
    area = np.pi * (8 * MPP) ** 2
    assert np.median([float(r["area_um2"]) for r in rows]) == pytest.approx(area, rel=0.15)
    assert s["geojson"] == "cells.geojson"  # a few nuclei: plain GeoJSON
    gj = json.loads((tmp_path / "o" / "cells.geojson").read_text(encoding="utf-8"))
    assert len(gj["features"]) == n
    assert gj["features"][0]["properties"]["objectType"] == "detection"
    assert "Area µm^2" in gj["features"][0]["properties"]["measurements"]
    assert set(s["stages"]) >= {"read", "model", "stitch", "write"}
    again = cells_slide(path, tmp_path / "o", **kw)
    assert again.get("skipped")
    # an interrupted run: a finished band is kept, the rest redone
    (tmp_path / "o" / "summary.json").unlink()
    part = tmp_path / "o" / "cells.part"
    part.mkdir()
    (part / f"{s['config_key']}.{cells_mod.BAND_FORMAT}.key").touch()
    (part / "band-000000.csv").write_text("")  # band 0 'finished' with no nuclei
    resumed = cells_slide(path, tmp_path / "o", **kw)
    assert resumed["bands_resumed"] == 1 and resumed["nuclei"] < n


def test_roi_counts_per_region(disc_slide, tmp_path):
    path, n = disc_slide
    kw = dict(mpp=MPP, size=64, overlap=16, threshold=0.3, min_tissue=0.0, progress=False, loaded=_loaded(),
              min_distance_um=3.0)
    whole = cells_slide(path, tmp_path / "all", **kw)
    rows = list(csv.DictReader(open(tmp_path / "all" / "cells.csv")))
    ring = [[0, 0], [160, 0], [160, 320], [0, 320], [0, 0]]  # the left half, level-0 px
    roi = tmp_path / "roi.geojson"
    roi.write_text(json.dumps({"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": {
        "type": "Polygon", "coordinates": [ring]}, "properties": {"objectType": "annotation", "name": "left"}}]}))
    s = cells_slide(path, tmp_path / "roi", roi=roi, **{**kw, "min_tissue": 0.01, "tissue": {"min_area_um2": 1.0}})
    inside = sum(float(r["x"]) < 160 for r in rows)
    assert whole["nuclei"] == n and s["regions"][0]["nuclei"] == inside == s["nuclei"]
    (region,) = list(csv.DictReader(open(tmp_path / "roi" / "regions.csv")))
    assert int(region["nuclei"]) == inside and float(region["area_mm2"]) == pytest.approx(160 * 320 * MPP ** 2 / 1e6)
    gj = json.loads((tmp_path / "roi" / "cells.geojson").read_text(encoding="utf-8"))
    ring0 = gj["features"][0]["geometry"]["coordinates"][0]
    assert ring0[0] == ring0[-1] and len(gj["features"]) == inside  # closed rings, one per nucleus


def test_bad_input_one_line(tmp_path, disc_slide):
    with pytest.raises(SlidekitError):
        cells_slide(tmp_path / "missing.tif", tmp_path / "o", progress=False, loaded=_loaded())
    res = CliRunner().invoke(main, ["cells", str(tmp_path / "missing.tif"), "--model", "hematoxylin",
                                    "--out", str(tmp_path / "o")])
    assert res.exit_code != 0 and "missing.tif" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(main, ["cells", str(disc_slide[0]), "--model", str(tmp_path / "nope.pt"),
                                    "--out", str(tmp_path / "o2")])
    assert res.exit_code != 0 and len(res.output.strip().splitlines()) == 1


# -- touching nuclei: the outline class, else the distance transform --------------------------------

def _two_overlapping_discs(shape=(40, 60), c1=(20, 22), c2=(20, 34), r=9):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    d1 = (yy - c1[0]) ** 2 + (xx - c1[1]) ** 2 <= r * r
    d2 = (yy - c2[0]) ** 2 + (xx - c2[1]) ** 2 <= r * r
    return d1, d2


def test_boundary_class_splits_what_the_distance_transform_cannot():
    d1, d2 = _two_overlapping_discs()
    fg = (d1 | d2).astype(np.float32)
    # centres 12 px apart: seeds at least 14 px apart leave the pair as one distance-transform nucleus
    assert split_instances(fg, 0.5, min_distance=14).max() == 1
    outline = np.zeros_like(fg)
    outline[:, 27:29] = 1  # the outline class marks the seam between the two nuclei
    outline *= fg
    lab = split_instances(fg, 0.5, min_distance=14, boundary=outline)
    assert len(np.unique(lab[lab > 0])) == 2
    # the two instances are the two discs (the seam pixels go to one side or the other)
    assert (lab[d1 & ~d2 & (outline == 0)] == lab[20, 20]).all() and lab[20, 20] != lab[20, 36]
    # and without any outline, a peanut the distance transform splits stays one nucleus
    assert split_instances(fg, 0.5, min_distance=3).max() == 2
    assert len(np.unique(split_instances(fg, 0.5, min_distance=3, boundary=np.zeros_like(fg)))) == 2  # 0 + one


def test_nucleus_channels_choose_the_split():
    assert nucleus_channels(["background", "nucleus", "boundary"]) == (1, 2)
    assert nucleus_channels(["background", "Contour", "nucleus"]) == (2, 1)
    assert nucleus_channels(["background", "nucleus", "boundary"], split="distance") == (2, None)
    assert nucleus_channels(["background", "nucleus"]) == (1, None)
    with pytest.raises(ConfigError, match="outline class"):
        nucleus_channels(["background", "nucleus"], split="boundary")
    with pytest.raises(ConfigError, match="not a nucleus class"):
        nucleus_channels(["background", "nucleus", "boundary"], channel=2)


class _ThreeClass(torch.nn.Module):
    """background / nucleus / boundary from colour: blue interiors, red outlines (test images)."""

    def forward(self, x):
        r, b = x[:, 0:1], x[:, 2:3]
        boundary = ((r > 0.6) & (b < 0.4)).float()
        nucleus = ((b > 0.4) & (r < 0.4)).float() * (1 - boundary)
        return torch.cat([1 - nucleus - boundary, nucleus, boundary], 1)


def test_cells_slide_uses_the_models_boundary_class(tmp_path):
    # pairs of strongly overlapping discs, outlined in red with the seam between them: one nucleus per disc
    img = np.full((256, 256, 3), 235, np.uint8)
    yy, xx = np.mgrid[:256, :256]
    pairs = [(40 + 60 * i, 40 + 60 * j) for i in range(4) for j in range(3)]
    for cy, cx in pairs:
        union = ((yy - cy) ** 2 + (xx - cx) ** 2 <= 81) | ((yy - cy) ** 2 + (xx - cx - 12) ** 2 <= 81)
        img[union] = (200, 30, 30)
        inner = ((yy - cy) ** 2 + (xx - cx) ** 2 <= 49) | ((yy - cy) ** 2 + (xx - cx - 12) ** 2 <= 49)
        img[inner & (np.abs(xx - cx - 6) > 1)] = (60, 30, 140)
    path = write_pyramid(tmp_path / "pairs.tif", img, MPP, tile=64, compression="zlib")
    spec = BuiltinSpec(name="three", classes=["background", "nucleus", "boundary"], colors=[(0, 0, 0)] * 3,
                       patch_size=64, output_stride=1)
    loaded = (_ThreeClass().eval(), spec, "test:three-class")
    kw = dict(mpp=MPP, size=64, overlap=24, threshold=0.5, min_tissue=0.0, progress=False, loaded=loaded,
              min_distance_um=7.0, min_area_um2=5.0)
    s = cells_slide(path, tmp_path / "b", **kw)
    assert s["nuclei"] == 2 * len(pairs) and "outline class 'boundary'" in s["instances"]
    d = cells_slide(path, tmp_path / "d", split="distance", **kw)
    assert d["nuclei"] == len(pairs) and d["instances"].startswith("distance-transform")


# -- GeoJSON: plain, or gzip when large (or asked) --------------------------------------------------

def test_geojson_gzip_by_size_or_option(disc_slide, tmp_path, monkeypatch):
    path, n = disc_slide
    kw = dict(mpp=MPP, size=64, overlap=16, threshold=0.3, min_tissue=0.0, progress=False, loaded=_loaded(),
              min_distance_um=3.0)
    s = cells_slide(path, tmp_path / "o", **kw)
    assert s["geojson"] == "cells.geojson" and n < cells_mod.GZIP_ABOVE_NUCLEI
    plain = json.loads((tmp_path / "o" / "cells.geojson").read_text(encoding="utf-8"))
    z = cells_slide(path, tmp_path / "o", gzip=True, **kw)  # another configuration: redone, gzip
    assert z["geojson"] == "cells.geojson.gz" and not (tmp_path / "o" / "cells.geojson").exists()
    with gzip.open(tmp_path / "o" / "cells.geojson.gz", "rt", encoding="utf-8") as f:
        assert json.load(f) == plain
    monkeypatch.setattr(cells_mod, "GZIP_ABOVE_NUCLEI", n - 1)  # auto: more nuclei than the threshold
    assert cells_slide(path, tmp_path / "a", **kw)["geojson"] == "cells.geojson.gz"
    monkeypatch.setattr(cells_mod, "GZIP_ABOVE_NUCLEI", n)
    assert cells_slide(path, tmp_path / "b", **kw)["geojson"] == "cells.geojson"
    res = CliRunner().invoke(main, ["cells", str(path), "--model", "hematoxylin", "--out", str(tmp_path / "c"),
                                    "--tile-mpp", "0.5", "--tile-size", "64", "--overlap", "16", "--min-tissue", "0",
                                    "--gzip", "--quiet"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "c" / "cells.geojson.gz").exists() and not (tmp_path / "c" / "cells.geojson").exists()


# -- a cohort of slides ------------------------------------------------------------------------------

def test_cells_cohort_rows_per_slide_outputs_and_rerun(disc_slide, tmp_path):
    path, n = disc_slide
    (tmp_path / "in").mkdir()
    a, b = tmp_path / "in" / "a.tif", tmp_path / "in" / "b.tif"
    a.write_bytes(path.read_bytes())
    write_pyramid(b, _discs((192, 256), [(40, 40), (40, 120), (120, 200)], 8), MPP, tile=64, compression="zlib")
    opts = dict(model="hematoxylin", mpp=MPP, size=64, overlap=16, threshold=0.3, min_tissue=0.0,
                min_distance_um=3.0, device="cpu", workers=0)
    out = tmp_path / "OUT"
    t = run_cohort("cells", [str(a), str(b)], out, progress=False, **opts)
    assert {r["id"]: (r["status"], r["nuclei"]) for r in t} == {"a": ("done", n), "b": ("done", 3)}
    rows = {r["id"]: r for r in csv.DictReader(open(out / "cohort.csv"))}
    assert set(rows) == {"a", "b"} and rows["a"]["nuclei"] == str(n) and rows["b"]["status"] == "done"
    for sid, count in (("a", n), ("b", 3)):
        assert len(list(csv.DictReader(open(out / sid / "cells.csv")))) == count
        assert json.loads((out / sid / "summary.json").read_text())["nuclei"] == count
        assert (out / sid / "cells.geojson").exists()
    again = run_cohort("cells", [str(a), str(b)], out, progress=False, **opts)
    assert [r["status"] for r in again] == ["skipped", "skipped"]
    # the CLI takes the same cohort (and skips it too)
    res = CliRunner().invoke(main, ["cells", str(a), str(b), "--model", "hematoxylin", "--out", str(out),
                                    "--tile-mpp", "0.5", "--tile-size", "64", "--overlap", "16", "--threshold", "0.3",
                                    "--min-distance", "3", "--min-tissue", "0", "--device", "cpu", "--quiet"])
    assert res.exit_code == 0, res.output
    assert "2 skipped" in res.output
    reruns = [(r["status"], r["note"]) for r in csv.DictReader(open(out / "cohort.csv"))]
    assert reruns == [("done", "done earlier")] * 2


def test_chunked_bands_give_the_same_nuclei(disc_slide, tmp_path, monkeypatch):
    path, n = disc_slide
    kw = dict(mpp=MPP, size=64, overlap=16, threshold=0.3, min_tissue=0.0, progress=False, loaded=_loaded(),
              min_distance_um=3.0)
    cells_slide(path, tmp_path / "one", **kw)
    monkeypatch.setattr(cells_mod, "CHUNK_TILES", 2)  # a band of 7 tiles in 4 chunks, each its own sub-grid
    s = cells_slide(path, tmp_path / "chunks", **kw)
    assert s["nuclei"] == n
    assert (tmp_path / "one" / "cells.csv").read_text() == (tmp_path / "chunks" / "cells.csv").read_text()


def test_nucleus_ids_are_stable_uuids_shared_by_csv_and_geojson(disc_slide, tmp_path):
    """QuPath object ids are UUIDs (docs/qupath.md); the same slide and options give the same ids on a
    rerun into another folder, cells.csv's uuid column joins a QuPath export back to its row, and
    other options (another run) give other ids."""
    import uuid

    path, n = disc_slide
    kw = dict(mpp=MPP, size=64, overlap=16, min_tissue=0.0, progress=False, loaded=_loaded(), min_distance_um=3.0)
    cells_slide(path, tmp_path / "a", threshold=0.3, **kw)
    cells_slide(path, tmp_path / "b", threshold=0.3, **kw)
    cells_slide(path, tmp_path / "c", threshold=0.31, **kw)

    def ids(d):
        gj = json.loads((tmp_path / d / "cells.geojson").read_text(encoding="utf-8"))
        return [f["id"] for f in gj["features"]]

    a = ids("a")
    assert len(a) == n == len(set(a))
    assert all(str(uuid.UUID(i)) == i for i in a)  # canonical UUID strings, as QuPath writes them
    assert [r["uuid"] for r in csv.DictReader(open(tmp_path / "a" / "cells.csv"))] == a
    assert ids("b") == a
    assert not set(ids("c")) & set(a)
