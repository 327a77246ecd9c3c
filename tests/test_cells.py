"""slidekit cells: instances, ownership across seams (each nucleus once), µm measurements, resume, bad input."""
from __future__ import annotations

import csv
import gzip
import json

import numpy as np
import pytest
from click.testing import CliRunner

from slidekit.base.errors import SlidekitError
from slidekit.cli import main
from slidekit.infer.cells import cells_slide, measure_instances, split_instances
from slidekit.models.builtin import builtin_model
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
    centres = [(y + rng.integers(-3, 4), x + rng.integers(-3, 4)) for y in range(20, 300, 28) for x in range(20, 300, 28)]
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
    with gzip.open(tmp_path / "o" / "cells.geojson.gz", "rt") as f:
        gj = json.load(f)
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
    (part / f"{s['config_key']}.key").touch()
    (part / "band-000000.csv").write_text("")  # band 0 'finished' with no nuclei
    resumed = cells_slide(path, tmp_path / "o", **kw)
    assert resumed["bands_resumed"] == 1 and resumed["nuclei"] < n


def test_bad_input_one_line(tmp_path, disc_slide):
    with pytest.raises(SlidekitError):
        cells_slide(tmp_path / "missing.tif", tmp_path / "o", progress=False, loaded=_loaded())
    res = CliRunner().invoke(main, ["cells", str(tmp_path / "missing.tif"), "--model", "hematoxylin",
                                    "--out", str(tmp_path / "o")])
    assert res.exit_code != 0 and "missing.tif" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(main, ["cells", str(disc_slide[0]), "--model", str(tmp_path / "nope.pt"),
                                    "--out", str(tmp_path / "o2")])
    assert res.exit_code != 0 and len(res.output.strip().splitlines()) == 1
