"""Slide QC through the pipeline: `slidekit qc` over a cohort (qc.csv, resumable, right after a rerun that
redoes some slides), the label map as zarr and OME-Zarr, per-tile artefact fractions and --exclude-qc/--qc-max
on the tile cohort, heatmap and embed (counts removed per class, tiles.csv, features.h5)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

from slidekit.base.errors import ConfigError, OutputWarning
from slidekit.cli import main
from slidekit.cohort.run import run_cohort
from slidekit.regions.qc import ARTEFACTS, LABELS, qc_slide, read_qc_labels
from slidekit.regions.qc_tiles import DEFAULT_QC_MAX, TileQc, fraction_columns, qc_max_of, tile_fractions
from slidekit.regions.qc_zarr import read_label_zarr
from slidekit.regions.tiling import TileGrid
from slidekit.slides.demo import write_pyramid
from slidekit.slides.slide import open_slide

MPP = 2.0  # level-0 µm/px of the small synthetic slides (2048 x 1536 px: 4.1 x 3.1 mm)
W, H = 2048, 1536


def small_slide(path: Path, seed: int, *, ink: bool = True, fold: bool = True) -> Path:
    """Textured H&E-like tissue on glass with (optionally) a wide blue pen band and a dark fold band."""
    rng = np.random.default_rng(seed)
    rgb = np.full((H, W, 3), 242, np.uint8)
    tissue = np.zeros((H, W), np.uint8)
    cv2.ellipse(tissue, (W // 2, H // 2), (int(W * 0.42), int(H * 0.42)), 0, 0, 360, 1, -1)
    noise = cv2.GaussianBlur(rng.normal(0, 1, (H, W)).astype(np.float32), (0, 0), 1.0)
    noise /= noise.std()
    tex = np.array([215, 140, 185], np.float32) + noise[..., None] * np.array([12, 20, 14], np.float32)
    for _ in range(2500):
        cv2.circle(tex, (int(rng.integers(0, W)), int(rng.integers(0, H))), int(rng.integers(1, 3)),
                   (110, 70, 160), -1)
    rgb[tissue > 0] = np.clip(tex, 0, 255).astype(np.uint8)[tissue > 0]
    if fold:
        band = np.zeros((H, W), np.uint8)
        cv2.line(band, (1200, 300), (1500, 1200), 1, 70)
        band &= tissue
        rgb[band > 0] = np.clip(rgb.astype(np.float32) * [0.55, 0.3, 0.5], 0, 255).astype(np.uint8)[band > 0]
    if ink:
        pen = np.zeros((H, W), np.uint8)
        cv2.line(pen, (250, 400 + 100 * seed), (1000, 700 + 100 * seed), 1, 200)
        rgb[pen > 0] = (30, 60, 200)
    return write_pyramid(path, rgb, MPP)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("qc_cohort")
    slides = [small_slide(root / "a.tif", 0), small_slide(root / "b.tif", 1), small_slide(root / "c.tif", 2, ink=False)]
    out = root / "qc"
    r = CliRunner().invoke(main, ["qc", *map(str, slides), "--out", str(out), "--ome-zarr", "-q"])
    assert r.exit_code == 0, r.output
    return {"root": root, "slides": slides, "out": out}


def _table(path: Path) -> dict[str, dict]:
    with open(path, newline="") as f:
        return {r["id"]: r for r in csv.DictReader(f)}


def _check_rows(out: Path, ids: list[str]) -> dict[str, dict]:
    """qc.csv has a row per slide and each row is that slide's qc.json."""
    rows = _table(out / "qc.csv")
    assert sorted(rows) == sorted(ids)
    for sid, row in rows.items():
        report = json.loads((out / sid / "qc.json").read_text())
        assert row["status"] == "done" and row["verdict"] == report["verdict"]
        assert row["reasons"] == "; ".join(report["reasons"])
        assert float(row["tissue µm²"]) == pytest.approx(report["tissue_area_um2"], abs=0.1)
        for n in ARTEFACTS:
            assert float(row[f"{n} fraction"]) == pytest.approx(report["classes"][n]["fraction_of_tissue"], abs=1e-6)
            assert float(row[f"{n} µm²"]) == pytest.approx(report["classes"][n]["area_um2"], abs=0.1)
    return rows


def test_cohort_qc_csv_one_row_per_slide(cohort: dict) -> None:
    out = cohort["out"]
    rows = _check_rows(out, ["a", "b", "c"])
    assert float(rows["a"]["Pen ink fraction"]) > 0.05 and float(rows["c"]["Pen ink fraction"]) == 0.0
    assert rows["a"]["verdict"] == "fail" and "Pen ink" in rows["a"]["reasons"]
    assert rows["c"]["verdict"] == "pass" or "Pen ink" not in rows["c"]["reasons"]
    assert {r["status"] for r in _table(out / "cohort.csv").values()} == {"done"}
    assert "Pen ink fraction" in next(iter(_table(out / "cohort.csv").values()))  # the figures too


def test_cohort_rerun_skips_and_redoes_some(cohort: dict, tmp_path: Path) -> None:
    out, slides = cohort["out"], cohort["slides"]
    before = (out / "qc.csv").read_text()
    table = run_cohort("qc", slides, out, ome_zarr=True, progress=False)
    assert [r["status"] for r in table] == ["skipped"] * 3
    assert (out / "qc.csv").read_text() == before
    (out / "b" / "qc.json").write_text("{}")  # a damaged folder: that slide alone is redone
    with pytest.warns(OutputWarning, match="redoing qc"):
        again = run_cohort("qc", slides, out, ome_zarr=True, progress=False)
    assert [r["status"] for r in again] == ["skipped", "done", "skipped"]
    _check_rows(out, ["a", "b", "c"])
    assert (out / "qc.csv").read_text() == before  # b redone: its row is what it was
    # other limits: every slide redone, the verdicts follow them
    loose = run_cohort("qc", slides, out, max_pen=1.0, progress=False)
    assert [r["status"] for r in loose] == ["done"] * 3
    rows = _check_rows(out, ["a", "b", "c"])
    assert rows["a"]["verdict"] == "pass" or "Pen ink" not in rows["a"]["reasons"]
    assert not (out / "a" / "qc_labels.ome.zarr").exists()  # not asked for this time: not left behind


def test_label_map_zarr_and_ome_zarr(cohort: dict, tmp_path: Path) -> None:
    folder = tmp_path / "a"
    qc_slide(cohort["slides"][0], folder, ome_zarr=True, progress=False)
    labels, attrs = read_label_zarr(folder / "qc_labels.zarr")
    assert attrs["mpp"] == 8.0 and attrs["shape"] == list(labels.shape)
    assert {n: c["value"] for n, c in attrs["labels"].items()} == LABELS
    report = json.loads((folder / "qc.json").read_text())
    assert (labels == LABELS["Pen ink"]).sum() == report["classes"]["Pen ink"]["pixels"] > 0
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    nodes = list(Reader(parse_url(str(folder / "qc_labels.ome.zarr")))())
    assert nodes and nodes[0].metadata["axes"][0]["name"] == "y"
    root = zarr.open_group(str(folder / "qc_labels.ome.zarr"), mode="r")
    np.testing.assert_array_equal(root["0"][:], labels)
    np.testing.assert_array_equal(root["1"][:], labels[::2, ::2])  # a class, never a mean
    props = {p["class"]: p["label-value"] for p in root.attrs["image-label"]["properties"]}
    assert props == LABELS
    scale = root.attrs["multiscales"][0]["datasets"][1]["coordinateTransformations"][0]["scale"]
    assert scale == [16.0, 16.0]


def test_qc_max_values() -> None:
    assert qc_max_of(None) == dict.fromkeys(ARTEFACTS, DEFAULT_QC_MAX)
    assert qc_max_of(0.3) == dict.fromkeys(ARTEFACTS, 0.3)
    both = qc_max_of(["pen ink=0.1", "0.3"])  # numbers first, then the named classes (any case)
    assert both["Pen ink"] == 0.1 and both["Fold"] == 0.3
    with pytest.raises(ConfigError, match="unknown QC class 'Smudge'"):
        qc_max_of("Smudge=0.1")
    with pytest.raises(ConfigError, match="between 0 and 1"):
        qc_max_of("1.5")
    with pytest.raises(ConfigError, match="needs --exclude-qc"):
        TileQc.of(None, 0.2)


def test_tile_fractions_are_the_label_shares() -> None:
    labels = np.full((40, 60), LABELS["Tissue"], np.uint8)
    labels[0:10, 0:5] = LABELS["Pen ink"]  # 8 µm label pixels
    labels[10:20, 20:40] = LABELS["Fold"]
    # tiles of 20 level-0 px at 2 µm/px = 40 µm = 5 label px; the last one half on ink, half on tissue
    grid = TileGrid(np.array([[0, 0], [40, 0], [80, 40], [0, 120], [10, 0]]), 2.0, 20, 0, (240, 160), (2.0, 2.0))
    f = tile_fractions(labels, 8.0, (2.0, 2.0), grid)
    ink, fold = ARTEFACTS.index("Pen ink"), ARTEFACTS.index("Fold")
    assert f[0, ink] == pytest.approx(1.0) and f[1, ink] == pytest.approx(0.0)
    assert f[2, fold] == pytest.approx(1.0) and f[3].sum() == pytest.approx(0.0)
    assert f[4, ink] == pytest.approx(0.5)
    assert len(fraction_columns()) == len(ARTEFACTS) and fraction_columns()[ink] == "qc_pen_ink"


def test_tile_cohort_excludes_and_writes_tiles_csv(cohort: dict, tmp_path: Path) -> None:
    slides, qc = cohort["slides"][:2], cohort["out"]
    plain = run_cohort("tile", slides, tmp_path / "plain", mpp=8.0, size=16, progress=False)
    kept = run_cohort("tile", slides, tmp_path / "kept", mpp=8.0, size=16, exclude_qc=qc,
                      qc_max=["0.5", "Pen ink=0.2"], progress=False)
    ink = ARTEFACTS.index("Pen ink")
    for p, k in zip(plain, kept):
        summary = json.loads((tmp_path / "kept" / k["id"] / "summary.json").read_text())
        counts = summary["qc"]
        assert counts["tiles_before"] == p["tiles"] and k["tiles"] == p["tiles"] - counts["tiles_removed"]
        assert counts["removed_by_class"]["Pen ink"] > 0 and counts["max_fraction"]["Pen ink"] == 0.2
        assert k["qc removed Pen ink"] == counts["removed_by_class"]["Pen ink"]
        assert "-qc" in summary["config"]
        with open(tmp_path / "kept" / k["id"] / "tiles.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        grid = TileGrid.load(tmp_path / "kept" / k["id"] / "grid.npz")
        assert len(rows) == len(grid) and [int(rows[0]["x"]), int(rows[0]["y"])] == grid.coords[0].tolist()
        assert max(float(r["qc_pen_ink"]) for r in rows) <= 0.2
        assert max(float(r[c]) for r in rows for c in fraction_columns()) <= 0.5
        with open_slide(slides[0] if k["id"] == "a" else slides[1]) as slide:  # the fractions are the map's
            labels, mpp = read_qc_labels(qc / k["id"], slide)
            again = tile_fractions(labels, mpp, slide.mpp, grid)
        np.testing.assert_allclose([float(r["qc_pen_ink"]) for r in rows], again[:, ink], atol=1e-4)


def test_qc_of_another_slide_is_refused_in_a_cohort(cohort: dict, tmp_path: Path) -> None:
    slides, qc = cohort["slides"], cohort["out"]
    # the QC cohort's folders named after other slides: b's QC for a, a's for b
    swapped = tmp_path / "swapped"
    for src, dst in (("a", "b"), ("b", "a")):
        (swapped / dst).parent.mkdir(parents=True, exist_ok=True)
        (swapped / dst).symlink_to(qc / src)
    table = run_cohort("tile", slides[:2], tmp_path / "t", mpp=8.0, size=16, exclude_qc=swapped, progress=False)
    assert [r["status"] for r in table] == ["failed", "failed"]
    assert all("QC of another slide file" in r["error"] for r in table)
    assert not (tmp_path / "t" / "a" / "grid.npz").exists()


def test_heatmap_cli_cohort_with_exclude_qc(cohort: dict, tmp_path: Path) -> None:
    slides, qc = cohort["slides"][:2], cohort["out"]
    r = CliRunner().invoke(main, ["heatmap", *map(str, slides), "--model", "tissue", "--mpp", "8", "--size", "32",
                                  "--device", "cpu", "--min-tissue", "0.5", "-q", "--out", str(tmp_path / "hm"),
                                  "--exclude-qc", str(qc), "--qc-max", "Pen ink=0"])
    assert r.exit_code == 0, r.output
    hm = _table(tmp_path / "hm" / "cohort.csv")
    for sid in ("a", "b"):  # each slide's own QC folder, QC_OUT/<id>/
        counts = json.loads((tmp_path / "hm" / sid / "summary.json").read_text())["qc"]
        assert counts["max_fraction"]["Pen ink"] == 0.0 and counts["max_fraction"]["Fold"] == DEFAULT_QC_MAX
        assert int(hm[sid]["qc removed Pen ink"]) == counts["removed_by_class"]["Pen ink"] > 0
        assert hm[sid]["qc verdict"] == json.loads((qc / sid / "qc.json").read_text())["verdict"]
        assert int(hm[sid]["tiles"]) == counts["tiles_before"] - int(hm[sid]["qc removed"]) > 0


def test_embed_with_exclude_qc_carries_fractions(cohort: dict, tmp_path: Path) -> None:
    from slidekit.models.checkpoint import save_checkpoint
    from slidekit.models.networks import ResNetClassifier
    from slidekit.models.spec import ModelSpec
    from slidekit.slidelevel.embed import embed_slide, open_embeddings

    torch.manual_seed(0)
    spec = ModelSpec(arch="resnet-encoder", task="embedding", classes=[], patch_size=16, mpp=16.0,
                     mean=(0.5,) * 3, std=(0.5,) * 3, activation="none", trainer="simclr")
    model = save_checkpoint(tmp_path / "enc.pt", ResNetClassifier("resnet18", 0), spec)
    slide, qc = cohort["slides"][0], cohort["out"] / "a"
    plain = open_embeddings(embed_slide(slide, tmp_path / "plain.zarr", model=model, device="cpu", progress=False))
    store = embed_slide(slide, tmp_path / "e.zarr", model=model, device="cpu", progress=False, exclude_qc=qc,
                        qc_max="Pen ink=0.1", features_h5=tmp_path / "f.h5")
    emb = open_embeddings(store)
    counts = emb.attrs["qc"]
    assert counts["removed_by_class"]["Pen ink"] > 0
    assert len(emb.coords) == len(plain.coords) - counts["tiles_removed"]
    fractions = zarr.open_group(str(store), mode="r")["qc_fractions"][:]
    assert fractions.shape == (len(emb.coords), len(ARTEFACTS))
    assert fractions[:, ARTEFACTS.index("Pen ink")].max() <= 0.1
    with h5py.File(tmp_path / "f.h5", "r") as f:
        np.testing.assert_array_equal(f["qc_fractions"][:], fractions)
        assert json.loads(f["qc_fractions"].attrs["classes"]) == list(ARTEFACTS)
        assert len(f["coords"]) == len(emb.coords)


def test_viewer_shows_qc_columns_and_overlay(cohort: dict) -> None:
    pytest.importorskip("starlette", reason="starlette is not installed (pip install -e .[dev])")
    pytest.importorskip("httpx", reason="httpx (starlette's TestClient) is not installed")
    from io import BytesIO

    from PIL import Image
    from starlette.testclient import TestClient

    from slidekit.view.app import build_app

    client = TestClient(build_app(cohort["out"]), base_url="http://127.0.0.1")
    table = client.get("/api/cohort").json()
    assert {"verdict", "reasons", "Pen ink fraction"} <= set(table["columns"])
    assert {r["id"] for r in table["rows"]} == {"a", "b", "c"} and all(r["verdict"] for r in table["rows"])
    name = cohort["out"].name
    item = client.get(f"/api/item/{name}/a").json()
    assert "qc.geojson" in [g["name"] for g in item["geojson"]]  # the classed QC annotations over the slide
    meta = item["overlay_meta"]  # and the label map as the page's overlay, placed on the slide, with a legend
    labels, attrs = read_label_zarr(cohort["out"] / "a" / "qc_labels.zarr")
    assert meta["place"]["width"] == pytest.approx(labels.shape[1] * attrs["mpp"] / MPP)
    assert [c["name"] for c in meta["legend"]["classes"]] == list(ARTEFACTS)
    png = np.asarray(Image.open(BytesIO(client.get(f"/overlay/{name}/a.png").content)))
    ink = labels == LABELS["Pen ink"]
    assert png.shape == (*labels.shape, 4) and (png[ink, 3] == 255).all() and (png[~(labels >= 2), 3] == 0).all()
    assert tuple(png[ink][0, :3]) == tuple(attrs["labels"]["Pen ink"]["color"])


@pytest.mark.parametrize("args, said", [
    (["--exclude-qc", "{qc}", "--qc-max", "2"], "--qc-max '2': a fraction between 0 and 1"),
    (["--exclude-qc", "{qc}", "--qc-max", "Smudge=0.1"], "unknown QC class 'Smudge'"),
    (["--qc-max", "0.2"], "--qc-max needs --exclude-qc"),
    (["--exclude-qc", "{missing}"], "not a folder"),
])
def test_bad_qc_options_are_one_line_before_a_cohort_starts(cohort: dict, tmp_path: Path, args: list[str],
                                                            said: str) -> None:
    args = [a.format(qc=cohort["out"], missing=tmp_path / "none") for a in args]
    for command in (["heatmap", "--model", "tissue"], ["cells"], ["tile"]):
        r = CliRunner().invoke(main, [command[0], *map(str, cohort["slides"][:2]), *command[1:],
                                      "--out", str(tmp_path / command[0]), *args, "-q"])
        assert r.exit_code != 0 and said in r.output and "Traceback" not in r.output, (command, r.output)
        assert not (tmp_path / command[0]).exists()


def test_exclude_qc_auto_runs_qc_first(cohort: dict, tmp_path: Path) -> None:
    """`--exclude-qc auto`: each slide's QC is made first in OUT/qc/ (a cohort: OUT/<id>/qc/), found
    finished by a rerun, and the tiles are filtered by it as by a given QC folder."""
    slides = cohort["slides"][:2]
    table = run_cohort("tile", slides, tmp_path / "t", mpp=8.0, size=16, exclude_qc="auto", qc_max="Pen ink=0.2",
                       progress=False)
    assert [r["status"] for r in table] == ["done", "done"]
    for sid in ("a", "b"):
        own = json.loads((tmp_path / "t" / sid / "qc" / "qc.json").read_text())
        given = json.loads((cohort["out"] / sid / "qc.json").read_text())
        assert own["classes"]["Pen ink"]["pixels"] == given["classes"]["Pen ink"]["pixels"]
        assert json.loads((tmp_path / "t" / sid / "summary.json").read_text())["qc"]["removed_by_class"]["Pen ink"] > 0
    again = run_cohort("tile", slides, tmp_path / "t", mpp=8.0, size=16, exclude_qc="auto", qc_max="Pen ink=0.2",
                       progress=False)
    assert [r["status"] for r in again] == ["skipped", "skipped"]
    r = CliRunner().invoke(main, ["heatmap", str(slides[0]), "--model", "tissue", "--mpp", "8", "--size", "32",
                                  "--device", "cpu", "--out", str(tmp_path / "hm"), "--exclude-qc", "auto",
                                  "--tiles-geojson", "-q"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "hm" / "qc" / "qc_labels.zarr").is_dir()
    summary = json.loads((tmp_path / "hm" / "summary.json").read_text())
    assert "-qc" in summary["config"]
    tiles = json.loads((tmp_path / "hm" / "tiles.geojson").read_text())["features"]
    assert len(tiles) == summary["tiles"]  # each tile with its artefact fractions, all within --qc-max
    fractions = [t["properties"]["measurements"][f"QC {n}"] for t in tiles for n in ARTEFACTS]
    assert max(fractions) <= DEFAULT_QC_MAX and len(fractions) == len(tiles) * len(ARTEFACTS)


def test_qc_classes_at_nucleus_centroids() -> None:
    from slidekit.infer.cells import qc_classes_at

    labels = np.full((10, 10), LABELS["Tissue"], np.uint8)
    labels[0:2, 0:2] = LABELS["Pen ink"]
    labels[5, 5] = LABELS["Fold"]
    labels[9, 9] = LABELS["Glass"]
    # a label pixel is 8 µm, a level-0 pixel 2 µm: four level-0 px per label px
    xy = np.array([[1.0, 1.0], [7.9, 7.9], [21.0, 22.0], [30.0, 10.0], [39.0, 39.0], [-5.0, 500.0]])
    got = qc_classes_at((labels, 8.0), (2.0, 2.0), xy)
    assert list(got) == ["Pen ink", "Pen ink", "Fold", "", "", ""]  # clean tissue and glass: ""; clipped at the edge


def test_cells_with_exclude_qc_name_each_nucleus_qc_class(cohort: dict, tmp_path: Path) -> None:
    from slidekit.infer.cells import cells_slide, qc_classes_at

    slide, qc = cohort["slides"][0], cohort["out"] / "a"
    kw = dict(mpp=2.0, size=64, threshold=0.3, progress=False)
    s = cells_slide(slide, tmp_path / "c", exclude_qc=qc, qc_max="1", **kw)  # every tile kept
    rows = list(csv.DictReader(open(tmp_path / "c" / "cells.csv", newline="")))
    assert rows and list(rows[0])[-1] == "qc"
    with open_slide(slide) as sl:
        labels, mpp = read_qc_labels(qc, sl)
        xy = np.array([[float(r["x"]), float(r["y"])] for r in rows])
        expected = qc_classes_at((labels, mpp), sl.mpp, xy)
    assert [r["qc"] for r in rows] == list(expected)
    named = {n: sum(r["qc"] == n for r in rows) for n in ARTEFACTS}
    assert named["Pen ink"] > 0 and s["nuclei_on_artefact"] == named  # the blue band holds dark "nuclei"
    plain = cells_slide(slide, tmp_path / "p", **kw)  # without --exclude-qc: no column, no count
    assert "nuclei_on_artefact" not in plain
    assert "qc" not in next(csv.DictReader(open(tmp_path / "p" / "cells.csv", newline="")))
