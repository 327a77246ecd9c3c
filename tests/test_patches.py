"""Patch export (`slidekit tile SLIDE --export DIR|FILE.zip`): tiles equal read_tiles', table, labels,
resume, atomic zip, QuPath tile GeoJSON, ownership of outputs."""
from __future__ import annotations

import csv
import io
import json
import zipfile

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import synthetic_slide
from shapely.geometry import box

import slidekit.regions.patches as patches
from slidekit.annotations.formats import write_geojson
from slidekit.annotations.objects import Annotation
from slidekit.base.errors import OutputError
from slidekit.cli import main
from slidekit.regions.patches import export_patches
from slidekit.regions.tiling import make_grid, read_tiles
from slidekit.slides.slide import open_slide

OPTS = dict(mpp=0.5, size=256, min_tissue=0.5, progress=False)


@pytest.fixture
def slide(tmp_path):
    return synthetic_slide(tmp_path / "s.tif")  # tissue at level-0 (512, 256, 1024, 768), 0.5 µm/px


def _decode(data: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)[..., ::-1]


def _expected(slide):
    grid = make_grid(slide, mpp=0.5, size=256, min_tissue=0.5)
    with open_slide(slide) as s:
        return grid, dict(read_tiles(s, grid))


def test_folder_export_tiles_equal_read_tiles_and_table(tmp_path, slide):
    summary = export_patches(slide, tmp_path / "out", **OPTS)
    grid, tiles = _expected(slide)
    assert summary["tiles"] == len(grid) == len(tiles) > 0
    rows = list(csv.DictReader(open(tmp_path / "out" / "patches.csv")))
    assert list(rows[0]) == ["file", "x", "y", "mpp", "size", "tissue_fraction"]
    assert [(int(r["x"]), int(r["y"])) for r in rows] == [tuple(c) for c in grid.coords.tolist()]
    np.testing.assert_allclose([float(r["tissue_fraction"]) for r in rows], grid.tissue, atol=1e-4)
    for r in rows:
        x, y = int(r["x"]), int(r["y"])
        assert r["file"] == f"tiles/x{x}_y{y}.png" and float(r["mpp"]) == 0.5 and int(r["size"]) == 256
        np.testing.assert_array_equal(_decode((tmp_path / "out" / r["file"]).read_bytes()), tiles[(x, y)])
    again = export_patches(slide, tmp_path / "out", **OPTS)
    assert again["skipped"] is True


def test_zip_export_resumes_after_interruption_and_is_atomic(tmp_path, slide, monkeypatch):
    dest = tmp_path / "p.zip"
    real, calls = patches.encode_tile, []

    def flaky(tile, fmt, q):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt  # the user pressed Ctrl-C during the fifth tile
        return real(tile, fmt, q)

    monkeypatch.setattr(patches, "encode_tile", flaky)
    monkeypatch.setattr(patches, "FLUSH_SECONDS", -1.0)  # make progress durable after every tile
    with pytest.raises(KeyboardInterrupt):
        export_patches(slide, dest, **OPTS)
    assert not dest.exists() and (tmp_path / "p.zip.part").exists()  # never a half archive under the name
    monkeypatch.setattr(patches, "encode_tile", real)
    summary = export_patches(slide, dest, **OPTS)
    assert summary["tiles_resumed"] == 4
    grid, tiles = _expected(slide)
    with zipfile.ZipFile(dest) as zf:
        names = [n for n in zf.namelist() if n.startswith("tiles/")]
        assert sorted(names) == sorted(f"tiles/x{x}_y{y}.png" for x, y in grid.coords.tolist())
        for (x, y), t in tiles.items():
            np.testing.assert_array_equal(_decode(zf.read(f"tiles/x{x}_y{y}.png")), t)
        assert len(list(csv.DictReader(io.StringIO(zf.read("patches.csv").decode())))) == len(grid)
    assert not (tmp_path / "p.zip.part").exists() and not (tmp_path / "p.zip.part.json").exists()


def test_folder_export_resumes_and_changed_config_starts_over(tmp_path, slide, monkeypatch):
    real, calls = patches.encode_tile, []

    def flaky(tile, fmt, q):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(tile, fmt, q)

    monkeypatch.setattr(patches, "encode_tile", flaky)
    with pytest.raises(KeyboardInterrupt):
        export_patches(slide, tmp_path / "out", **OPTS)
    monkeypatch.setattr(patches, "encode_tile", real)
    assert export_patches(slide, tmp_path / "out", **OPTS)["tiles_resumed"] == 2
    jpeg = export_patches(slide, tmp_path / "out", **{**OPTS, "image_format": "jpeg"})
    assert jpeg["tiles_resumed"] == 0
    files = sorted(p.suffix for p in (tmp_path / "out" / "tiles").iterdir())
    assert set(files) == {".jpg"}  # the PNGs of the other configuration are gone


def _ann_file(tmp_path, anns):
    return write_geojson(anns, tmp_path / "labels.geojson")


def test_labels_by_majority_and_centre_rule(tmp_path, slide):
    # Tile (768, 256)-(1024, 512): "Tumor" covers 78% of it but not its centre (896, 384);
    # tile (1024, 256): a small "Stroma" square over its centre only.
    anns = [Annotation(box(768, 256, 1024, 356), label="Tumor"), Annotation(box(768, 412, 1024, 512), label="Tumor"),
            Annotation(box(1136, 368, 1168, 400), label="Stroma")]
    path = _ann_file(tmp_path, anns)
    lab = {}
    for rule in ("majority", "centre"):
        export_patches(slide, tmp_path / rule, annotations=path, label_rule=rule, **OPTS)
        rows = list(csv.DictReader(open(tmp_path / rule / "patches.csv")))
        lab[rule] = {(int(r["x"]), int(r["y"])): (r["label"], float(r["label_fraction"])) for r in rows}
    assert lab["majority"][(768, 256)] == ("Tumor", pytest.approx(200 / 256, abs=0.02))
    assert lab["centre"][(768, 256)][0] == ""
    assert lab["majority"][(1024, 256)][0] == ""
    assert lab["centre"][(1024, 256)][0] == "Stroma"
    assert lab["majority"][(512, 512)][0] == lab["centre"][(512, 512)][0] == ""


def test_grid_geojson_is_qupath_tiles_inside_the_slide(tmp_path):
    # a slide whose tissue reaches its right edge: the last column of tiles overhangs it
    s = synthetic_slide(tmp_path / "edge.tif", width=1000, height=800, tissue_box=(500, 0, 500, 800))
    anns = [Annotation(box(500, 0, 1000, 400), label="Tumor")]
    path = _ann_file(tmp_path, anns)
    res = CliRunner().invoke(main, ["tile", str(s), "--tile-mpp", "0.5", "--tile-size", "256", "--geojson",
                                    str(tmp_path / "grid.geojson"), "--annotations", str(path), "-q"])
    assert res.exit_code == 0, res.output
    feats = json.loads((tmp_path / "grid.geojson").read_text())["features"]
    grid = make_grid(s, mpp=0.5, size=256, min_tissue=0.5)
    assert len(feats) == len(grid) > 0
    xs = [x for f in feats for x, _ in f["geometry"]["coordinates"][0]]
    assert max(xs) <= 1000 and all(f["properties"]["objectType"] == "tile" for f in feats)
    assert any(f["properties"].get("classification", {}).get("name") == "Tumor" for f in feats)


def test_user_files_are_never_replaced(tmp_path, slide):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "patches.csv").write_text("my own table\n")
    with pytest.raises(OutputError, match="patches.csv"):
        export_patches(slide, tmp_path / "mine", **OPTS)
    assert (tmp_path / "mine" / "patches.csv").read_text() == "my own table\n"
    (tmp_path / "user.zip").write_bytes(b"not slidekit's")
    with pytest.raises(OutputError):
        export_patches(slide, tmp_path / "user.zip", **OPTS)


def test_cli_export_quiet_and_cohort_refusal(tmp_path, slide):
    res = CliRunner().invoke(main, ["tile", str(slide), "--export", str(tmp_path / "p.zip"), "-q"])
    assert res.exit_code == 0 and res.output == ""
    assert zipfile.ZipFile(tmp_path / "p.zip").comment == patches.FORMAT.encode()
    res = CliRunner().invoke(main, ["tile", str(slide), str(slide), "--out", str(tmp_path / "c"),
                                    "--export", str(tmp_path / "x")])
    assert res.exit_code != 0 and "one slide" in res.output


def test_export_options_without_export_are_refused_not_ignored(tmp_path, slide):
    grid = str(tmp_path / "g.npz")
    res = CliRunner().invoke(main, ["tile", str(slide), "--out", grid, "--format", "jpeg", "--quality", "80"])
    assert res.exit_code != 0 and "--format, --quality apply only with --export" in res.output
    res = CliRunner().invoke(main, ["tile", str(slide), "--out", grid, "--annotations", "a.geojson"])
    assert res.exit_code != 0 and "--annotations applies only with --export or --geojson" in res.output
    assert not (tmp_path / "g.npz").exists()
    res = CliRunner().invoke(main, ["tile", str(slide), "--out", grid, "-q"])
    assert res.exit_code == 0 and (tmp_path / "g.npz").exists()


def test_rerun_refuses_a_tiles_link_out_of_the_export_folder(tmp_path, slide):
    """After a first export, ``tiles`` swapped for a link to a folder elsewhere: a rerun (changed
    configuration, so it would clear and rewrite the tiles) is refused with one line, and the linked
    folder is left as it was."""
    out = tmp_path / "out"
    export_patches(slide, out, **OPTS)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("user data")
    import shutil

    shutil.rmtree(out / "tiles")
    (out / "tiles").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(OutputError, match="link to outside"):
        export_patches(slide, out, **{**OPTS, "size": 128})
    res = CliRunner().invoke(main, ["tile", str(slide), "--export", str(out), "--tile-size", "128", "-q"])
    assert res.exit_code != 0 and "link to outside" in res.output and "Traceback" not in res.output, res.output
    assert sorted(p.name for p in elsewhere.iterdir()) == ["keep.txt"]
