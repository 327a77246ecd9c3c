"""CLI: info, demo, tissue, tile; one-line errors and non-zero exits."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

import slidekit as sk
from slidekit.cli import main


def run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_info_json(demo_slide):
    res = run("info", str(demo_slide), "--json")
    assert res.exit_code == 0
    info = json.loads(res.output)
    assert info["mpp"] == [0.5, 0.5] and info["backend"] == "openslide"


def test_tissue_writes_mask_and_geojson(tmp_path, demo_slide):
    out = tmp_path / "tissue"
    res = run("tissue", str(demo_slide), "--out", str(out))
    assert res.exit_code == 0, res.output
    assert (out / "mask.png").exists() and (out / "tissue.json").exists()
    fc = json.loads((out / "tissue.geojson").read_text())
    feat = fc["features"][0]
    assert feat["properties"]["objectType"] == "annotation"
    assert feat["properties"]["classification"]["name"] == "Tissue"
    assert len(feat["properties"]["classification"]["color"]) == 3
    summary = json.loads((out / "tissue.json").read_text())
    assert 0.1 < summary["fraction"] < 0.6


def test_tile_writes_a_grid_that_loads(tmp_path, demo_slide):
    out = tmp_path / "grid.npz"
    res = run("tile", str(demo_slide), "--tile-mpp", "1.0", "--tile-size", "128", "--min-tissue", "0.5",
              "--out", str(out), "--quiet")
    assert res.exit_code == 0, res.output
    grid = sk.TileGrid.load(out)
    assert grid.mpp == 1.0 and grid.size == 128 and len(grid) > 10
    assert np.all(grid.tissue >= 0.5)


def test_errors_are_one_line_with_nonzero_exit(tmp_path, shared_data):
    missing = tmp_path / "nope.svs"
    proc = subprocess.run([sys.executable, "-m", "slidekit", "info", str(missing)],
                          capture_output=True, text=True)
    assert proc.returncode != 0
    assert proc.stderr.strip().count("\n") == 0 and "nope.svs: file not found" in proc.stderr
    assert "Traceback" not in proc.stderr
    no_mpp = shared_data / "wsi" / "TCGA-CR-7395-01A-01-TS1.svs"
    grid = tmp_path / "g.npz"
    proc = subprocess.run([sys.executable, "-m", "slidekit", "tile", str(no_mpp), "--out", str(grid)],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "--slide-mpp" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "slidekit", "info", str(no_mpp), "--slide-mpp", "0.25"],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and "(fallback)" in proc.stdout, proc.stderr
    proc = subprocess.run([sys.executable, "-m", "slidekit", "--debug", "info", str(missing)],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_failed_tissue_run_leaves_no_output(tmp_path):
    from slidekit.slides.demo import write_pyramid

    blank = write_pyramid(tmp_path / "blank.tif", np.full((600, 600, 3), 240, np.uint8), 0.5)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "slidekit", "tissue", str(blank), "--out", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "no tissue" in proc.stderr
    assert not (out / "tissue.json").exists()


def test_info_of_a_slide_without_mpp_shows_geometry_and_unknown_mpp(shared_data):
    path = shared_data / "wsi" / "TCGA-CR-7395-01A-01-TS1.svs"
    res = run("info", str(path))
    assert res.exit_code == 0, res.output
    assert "MPP: unknown" in res.output and "4443 x 3567 px" in res.output and "level 1" in res.output
    info = json.loads(run("info", str(path), "--json").output)
    assert info["mpp"] is None and info["level_count"] == 2 and info["dimensions"] == [4443, 3567]


def test_slide_mpp_is_a_fallback_and_override_mpp_is_said_and_recorded(tmp_path, shared_data):
    """CMU-1 has 0.499 µm/px in its metadata: --slide-mpp must not change it; --override-mpp does, loudly."""
    path = str(shared_data / "wsi" / "CMU-1-Small-Region.svs")
    plain = sk.heatmap_slide(path, tmp_path / "plain", workers=0, progress=False, device="cpu")
    fallback = sk.heatmap_slide(path, tmp_path / "fallback", slide_mpp=0.25, workers=0, progress=False,
                                device="cpu")
    assert fallback["tiles"] == plain["tiles"] > 0
    assert fallback["slide_mpp"]["source"] == "metadata"
    assert fallback["slide_mpp"]["used"] == pytest.approx([0.499, 0.499], abs=1e-3)
    with pytest.warns(sk.MPPOverrideWarning, match="CMU-1-Small-Region.svs.*0.499.*0.25"):
        forced = sk.heatmap_slide(path, tmp_path / "forced", override_mpp=0.25, workers=0, progress=False,
                                  device="cpu")
    assert forced["slide_mpp"] == {"used": [0.25, 0.25], "source": "override",
                                   "metadata": pytest.approx([0.499, 0.499], abs=1e-3)}
    assert forced["tiles"] < plain["tiles"]  # read at twice the magnification: fewer, smaller tiles
    saved = json.loads((tmp_path / "forced" / "summary.json").read_text())
    assert saved["slide_mpp"]["source"] == "override"
    proc = subprocess.run([sys.executable, "-m", "slidekit", "tile", path, "--out", str(tmp_path / "g.npz"),
                           "--override-mpp", "0.25", "--quiet"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "overridden" in lines[0] and "0.499" in lines[0] and "0.25" in lines[0]
    assert sk.TileGrid.load(tmp_path / "g.npz").slide_mpp == (0.25, 0.25)
    proc = subprocess.run([sys.executable, "-m", "slidekit", "tile", path, "--out", str(tmp_path / "h.npz"),
                           "--slide-mpp", "0.25", "--quiet"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stderr.strip() == "", proc.stderr
    assert sk.TileGrid.load(tmp_path / "h.npz").slide_mpp == pytest.approx((0.499, 0.499), abs=1e-3)
