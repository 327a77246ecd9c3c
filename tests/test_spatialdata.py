"""SpatialData interop with the real libraries (spatialdata, anndata, wsidata; no mocks).

slidekit's results exported as a SpatialData store open in ``wsidata.open_wsi`` with the same tiles
(level-0 boxes to the pixel), bit-identical features, µm/px and tile spec; a store written with
wsidata's own API (and a sopa-style one) reads back into a slidekit MIL bag; foreign stores that
cannot be read are one line naming the store and the element.
"""
from __future__ import annotations

import csv
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import synthetic_slide

from slidekit.base.errors import ConfigError, FeatureError, HeatmapError, OutputError, SlidekitWarning
from slidekit.regions.qc import LABELS, qc_slide, read_qc_labels
from slidekit.regions.tissue_job import save_tissue
from slidekit.slidelevel.feature_store import (
    FeatureWriter,
    feature_info,
    iter_feature_chunks,
    read_features,
    tool_attrs,
)
from slidekit.slides.identity import slide_fingerprint

pytest.importorskip("spatialdata")
wsidata = pytest.importorskip("wsidata")

SIDE = 128  # tiles: 64 px at 1.0 µm/px on a 0.5 µm/px slide
DIM = 24


def _features(folder: Path, slide: Path, seed: int = 0, nan_row: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A slidekit feature file for ``slide`` (as ``embed`` writes it) with known values."""
    rng = np.random.default_rng(seed)
    xs, ys = np.meshgrid(np.arange(512, 1536, SIDE), np.arange(256, 1024, SIDE))
    coords = np.stack([xs.ravel(), ys.ravel()], 1).astype(np.int64)
    feats = rng.standard_normal((len(coords), DIM)).astype(np.float32)
    enc = {"name": "resnet18", "weights": "/models/r18.pt:1:2", "dim": DIM, "mpp": 1.0, "patch_size": 64,
           "tokens": "pooled"}
    record = {"name": slide.name, "fingerprint": slide_fingerprint(slide), "dimensions": [2048, 1536],
              "mpp": [0.5, 0.5]}
    w = FeatureWriter(folder / "features.h5", coords, DIM, enc, record,
                      tool_attrs(64, SIDE, 0.5, 1.0, (2048, 1536), slide.stem), chunk_rows=7)
    w.write(0, feats)
    w.close()
    return coords, feats


def _cells(folder: Path, n: int = 50, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    cols = ["id", "x", "y", "x_um", "y_um", "area_um2", "perimeter_um", "circularity", "solidity",
            "eccentricity", "hematoxylin_od", "eosin_od", "uuid", "qc"]  # qc: as `cells --exclude-qc` writes
    rows = []
    for i in range(n):
        x, y = rng.uniform(512, 1536), rng.uniform(256, 1024)
        rows.append([i + 1, round(x, 2), round(y, 2), x * 0.5, y * 0.5, round(rng.uniform(20, 60), 3), 20.0, 0.9,
                     0.95, 0.4, 0.3, 0.2, f"u{i}", "" if i % 3 else "Fold"])
    with open(folder / "cells.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        w.writerows(rows)
    return np.array([r[5] for r in rows], np.float32)


def _maps(folder: Path, slide: Path) -> np.ndarray:
    """A heatmap (2 classes at 4 µm/px over the slide's tissue box) and a QC label map (32 level-0 px a pixel)."""

    from slidekit.infer.heatmap import HeatmapWriter
    from slidekit.regions.tiling import TileGrid

    xs, ys = np.meshgrid(np.arange(512, 1536, 256), np.arange(256, 1024, 256))
    coords = np.stack([xs.ravel(), ys.ravel()], 1)
    g = TileGrid(coords=coords, mpp=4.0, size=32, overlap=0, slide_dimensions=(2048, 1536), slide_mpp=(0.5, 0.5),
                 slide_name=slide.name, slide_id=slide_fingerprint(slide))
    w = HeatmapWriter(folder / "heatmap.zarr", g, "segmentation", ["normal", "tumour"], blend="constant")
    p = np.linspace(0, 1, len(coords) * 32 * 32, dtype=np.float32).reshape(len(coords), 32, 32)
    w.add(np.arange(len(g)), np.stack([1 - p, p], 1))
    w.finish()
    qc_slide(slide, folder / "qc", progress=False)  # where `--exclude-qc auto` puts a slide's QC
    labels, _ = read_qc_labels(folder / "qc", slide)
    return labels


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from slidekit.slidelevel.spatialdata_export import export_spatialdata

    root = tmp_path_factory.mktemp("sd")
    slide = synthetic_slide(root / "slide.tif")
    out = root / "out"
    save_tissue(slide, out, progress=False)
    coords, feats = _features(out, slide)
    areas = _cells(out)
    _maps(out, slide)
    store = export_spatialdata(out, root / "slide.zarr")  # beside the slide: what open_wsi finds itself
    return slide, out, store, coords, feats, areas


def _open(slide: Path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return wsidata.open_wsi(slide, **kw)


def test_wsidata_opens_the_store_with_our_tiles_features_and_mpp(exported):
    slide, _out, store, coords, feats, _ = exported
    wsi = _open(slide)  # finds slide.zarr beside the slide by itself
    assert Path(wsi.wsi_store) == store
    tiles = wsi.shapes["tiles"]
    assert np.array_equal(tiles[["x", "y"]].to_numpy(), coords)
    b = tiles.geometry.bounds.to_numpy()
    assert np.array_equal(b, np.concatenate([coords, coords + SIDE], 1).astype(float))  # level-0 boxes, to the pixel
    assert (tiles["tissue_id"] >= 0).all() and len(wsi.shapes["tissues"]) >= 1
    spec = wsi.tile_spec("tiles")
    assert (spec.base_width, spec.base_height, spec.width, spec.mpp) == (SIDE, SIDE, 64, 1.0)
    assert spec.tissue_name == "tissues"
    assert wsi.properties.mpp == pytest.approx(0.5)
    table = wsi.tables["resnet18_tiles"]
    assert np.asarray(table.X).dtype == np.float32
    assert np.array_equal(np.asarray(table.X), feats)  # bit-identical
    assert np.array_equal(table.obs["tile_id"].to_numpy(), np.arange(len(coords)))
    assert list(table.obs["library_id"].cat.categories) == ["tiles"]
    from spatialdata.transformations import get_transformation

    micro = get_transformation(tiles, "microns")
    assert np.allclose(micro.to_affine_matrix(("x", "y"), ("x", "y"))[:2, :2], np.diag([0.5, 0.5]))


def test_cells_are_circles_with_a_table_of_measurements(exported):
    slide, _out, store, *_rest, areas = exported
    wsi = _open(slide, store=str(store))
    cells, table = wsi.shapes["cells"], wsi.tables["cells_table"]
    assert len(cells) == len(table) == len(areas)
    assert np.allclose(cells["radius"].to_numpy(), np.sqrt(areas / np.pi) / 0.5, rtol=1e-6)
    assert np.array_equal(table[:, "area_um2"].X.ravel(), areas)
    assert set(table.obs.columns) >= {"cell_id", "region", "slide"} and "spatial" in table.obsm
    qc = table.obs["qc"].astype(str).to_numpy()  # the QC class under each nucleus ("" on clean tissue)
    assert list(qc) == ["" if i % 3 else "Fold" for i in range(len(areas))]
    assert np.array_equal(cells.index.to_numpy(), table.obs["cell_id"].to_numpy())


def test_cells_streamed_in_row_groups_are_the_same(exported, tmp_path, monkeypatch):
    import geopandas as gpd
    import pyarrow.parquet as pq

    from slidekit.slidelevel import spatialdata_export

    slide, out, store, *_ = exported
    monkeypatch.setattr(spatialdata_export, "CELL_ROWS", 16)  # 50 cells: 4 row groups
    small = spatialdata_export.export_spatialdata(out, tmp_path / "rows.zarr", maps=False)
    assert pq.ParquetFile(small / "shapes" / "cells" / "shapes.parquet").num_row_groups == 4
    a = gpd.read_parquet(small / "shapes" / "cells" / "shapes.parquet")
    b = gpd.read_parquet(store / "shapes" / "cells" / "shapes.parquet")
    assert a.index.equals(b.index) and a["radius"].equals(b["radius"]) and a.geometry.equals(b.geometry)


def test_maps_are_placed_on_the_slide_in_both_systems(exported):
    from spatialdata.transformations import get_transformation

    from slidekit.infer.heatmap import Heatmap

    slide, out, store, *_ = exported
    wsi = _open(slide, store=str(store))
    hm = Heatmap(out / "heatmap.zarr")
    img = wsi.images["heatmap"]
    assert list(img.coords["c"].values) == ["normal", "tumour"]
    assert np.array_equal(np.asarray(img.values), np.asarray(hm.prob[:]))
    to_l0 = get_transformation(img, "global").to_affine_matrix(("x", "y"), ("x", "y"))
    (sx, sy), (ox, oy) = hm.scale, hm.origin
    assert np.allclose(to_l0, [[sx, 0, ox], [0, sy, oy], [0, 0, 1]])
    to_um = get_transformation(img, "microns").to_affine_matrix(("x", "y"), ("x", "y"))
    assert np.allclose(to_um[:2, :2], np.diag([4.0, 4.0]))  # a heatmap pixel is 4 µm
    labels = wsi.labels["qc_labels"]
    qc, _ = read_qc_labels(out / "qc", slide)
    assert np.array_equal(np.asarray(labels.values), qc) and (qc == LABELS["Tissue"]).any()
    assert np.allclose(get_transformation(labels, "global").to_affine_matrix(("x", "y"), ("x", "y"))[:2, :2],
                       np.diag([16.0, 16.0]))  # 8 µm/px of QC on a 0.5 µm/px slide
    assert wsi.attrs["qc_classes"]["Fold"]["value"] == LABELS["Fold"]


def test_our_store_reads_back_as_the_same_bag(exported):
    slide, out, store, coords, feats, _ = exported
    h5 = read_features(out / "features.h5")
    bag = read_features(store)
    assert np.array_equal(bag.features, h5.features) and np.array_equal(bag.coords, h5.coords)
    assert bag.patch_size_level0 == SIDE and bag.encoder == h5.encoder
    assert bag.slide_record["fingerprint"] == slide_fingerprint(slide)
    assert feature_info(store / "tables" / "resnet18_tiles").rows == len(coords)
    chunks = list(iter_feature_chunks(store, rows=5))
    assert np.array_equal(np.concatenate([c[0] for c in chunks]), feats)
    assert np.array_equal(np.concatenate([c[1] for c in chunks]), coords)


def test_a_store_written_with_wsidata_reads_into_a_mil_bag(tmp_path):
    from shapely.geometry import box
    from wsidata.io import add_features, add_tiles, add_tissues

    slide = synthetic_slide(tmp_path / "s.tif")
    wsi = _open(slide)
    add_tissues(wsi, "tissues", [box(512, 256, 1536, 1024)])
    spec = wsidata.TileSpec(height=100, width=100, stride_height=100, stride_width=100, mpp=1.0,
                            ops_downsample=2.0, base_downsample=2.0, tissue_name="tissues")
    xy = np.array([[512, 256], [712, 256], [512, 456]])
    add_tiles(wsi, "tiles", xy, spec, np.zeros(3, int))
    feats = np.arange(3 * 5, dtype=np.float32).reshape(3, 5) / 7
    add_features(wsi, "uni_tiles", "tiles", feats)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wsi.write()
    bag = read_features(tmp_path / "s.zarr")
    assert np.array_equal(bag.coords, xy) and bag.patch_size_level0 == 200
    assert np.array_equal(bag.features, feats) and bag.encoder["name"] == "uni" and bag.source == "wsidata"


def _sopa_store(path: Path, n: int = 4, dim: int = 3, **damage) -> Path:
    """A store as sopa 2's ``compute_embeddings`` writes it: table ``{model}_embeddings`` (obs ``region``,
    ``instance``; obsm ``spatial``: patch centroids) on the patch boxes ``embeddings_patches``."""
    import anndata
    import geopandas as gpd
    import pandas as pd
    import shapely
    import spatialdata
    from spatialdata.models import ShapesModel, TableModel
    from spatialdata.transformations import Identity, Scale

    xy = np.stack([np.arange(n) * 224, np.zeros(n)], 1)
    boxes = shapely.box(xy[:, 0], xy[:, 1], xy[:, 0] + 224, xy[:, 1] + 224)
    system = damage.get("system", "global")
    patches = ShapesModel.parse(gpd.GeoDataFrame(geometry=boxes), transformations={system: Identity()}
                                if not damage.get("scaled") else {"global": Scale([2.0, 2.0], axes=("x", "y"))})
    x = np.ones((n, dim), np.float32)
    if damage.get("nan"):
        x[2, 1] = np.nan
    ids = np.arange(n - 1 if damage.get("short") else n)
    obs = pd.DataFrame({"region": pd.Categorical(["embeddings_patches"] * len(ids)),
                        "instance": ids + (10 if damage.get("ids") else 0)}, index=ids.astype(str))
    table = anndata.AnnData(X=x[: len(ids)], obs=obs, obsm={"spatial": xy[: len(ids)] + 112})
    table.uns["embedding_config"] = {"patch_width": 224, "patch_overlap": 0, "level": 0, "model_str": "dinov2"}
    table = TableModel.parse(table, region="embeddings_patches", region_key="region", instance_key="instance")
    elements: dict = {"tables": {"dinov2_embeddings": table}}
    if not damage.get("no_shapes"):
        elements["shapes"] = {"embeddings_patches": patches}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spatialdata.SpatialData(**elements).write(path)
    return path


def test_a_sopa_store_reads_into_a_bag(tmp_path):
    bag = read_features(_sopa_store(tmp_path / "p.zarr"))
    assert bag.source == "sopa" and bag.encoder["name"] == "dinov2" and bag.patch_size_level0 == 224
    assert np.array_equal(bag.coords, [[0, 0], [224, 0], [448, 0], [672, 0]])
    scaled = read_features(_sopa_store(tmp_path / "q.zarr", scaled=True))  # intrinsic px at half resolution
    assert np.array_equal(scaled.coords[:, 0], [0, 448, 896, 1344]) and scaled.patch_size_level0 == 448


@pytest.mark.parametrize("damage, words", [
    ({"no_shapes": True}, "annotates shapes 'embeddings_patches', which the store does not hold"),
    ({"system": "aligned"}, "has no 'global' coordinate system"),
    ({"ids": True}, "have no tile in shapes 'embeddings_patches'"),
    ({"nan": True}, "feature rows are not finite"),
])
def test_bad_foreign_stores_are_one_line_naming_store_and_element(tmp_path, damage, words):
    store = _sopa_store(tmp_path / "bad.zarr", **damage)
    with pytest.raises(FeatureError) as e:
        read_features(store)
    msg = str(e.value)
    assert "\n" not in msg and str(store) in msg and words in msg
    assert "embeddings_patches" in msg or "dinov2_embeddings" in msg


def test_mismatched_lengths_and_missing_tables_are_refused(exported, tmp_path):
    _slide, _out, store, *_ = exported
    copy = tmp_path / "c.zarr"
    shutil.copytree(store, copy)
    import zarr

    g = zarr.open_group(str(copy / "tables" / "resnet18_tiles"), mode="r+")
    x = np.asarray(g["X"][:])
    del g["X"]
    g.create_array("X", data=x[:-2])
    with pytest.raises(FeatureError, match=r"table 'resnet18_tiles': its X has \d+ rows but obs has \d+"):
        read_features(copy)
    with pytest.raises(FeatureError, match="has no table 'uni_tiles'; its tables"):
        read_features(copy / "tables" / "uni_tiles")


def test_export_refuses_empty_folders_and_foreign_stores(exported, tmp_path):
    from slidekit.slidelevel.spatialdata_export import export_spatialdata

    slide, out, *_ = exported
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="records no slide"):
        export_spatialdata(empty)
    with pytest.raises(ConfigError, match="holds none of the results"):
        export_spatialdata(empty, slide=slide)
    own = export_spatialdata(out)  # default: <slide stem>.zarr in the folder, claimed there; a rerun replaces it
    assert own == out / "slide.zarr" and export_spatialdata(out, tile_key="patches") == own
    assert read_features(own).coords.shape[1] == 2 and (own / "shapes" / "patches").is_dir()
    assert not (own / "shapes" / "tiles").exists()
    with pytest.raises(ConfigError, match="unknown export option 'tile_size'"):
        export_spatialdata(out, tile_size=3)
    other = synthetic_slide(tmp_path / "other.tif", seed=3)
    with pytest.raises(OutputError, match="holds the results of another slide"):
        export_spatialdata(out, tmp_path / "x.zarr", slide=other)
    from slidekit.regions.options import ReadOptions

    with pytest.raises(FeatureError, match="slide µm/px of 0.5; the slide now reads 0.25"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the override is said (MPPOverrideWarning)
        export_spatialdata(out, tmp_path / "x.zarr", reading=ReadOptions(override_mpp=0.25))
    stray = tmp_path / "stray"
    shutil.copytree(out / "heatmap.zarr", stray / "heatmap.zarr")
    with pytest.raises(HeatmapError, match="a map of slide 'slide.tif', not of"):
        export_spatialdata(stray, tmp_path / "x.zarr", slide=other)
    assert not (tmp_path / "x.zarr").exists()
    foreign = tmp_path / "theirs.zarr"
    foreign.mkdir()
    (foreign / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}}))
    with pytest.raises(OutputError, match="not a SpatialData store slidekit wrote"):
        export_spatialdata(out, foreign)
    assert (foreign / "zarr.json").is_file()


def test_cli_exports_a_folder_and_a_cohort(exported, tmp_path):
    from slidekit.cli import main

    slide, out, *_ = exported
    r = CliRunner().invoke(main, ["export-spatialdata", str(out), "--store", str(tmp_path / "one.zarr")])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["stores"] == [str(tmp_path / "one.zarr")]
    cohort = tmp_path / "cohort"
    shutil.copytree(out, cohort / "s1")
    (cohort / "cohort.csv").write_text(f"id,slide,status\ns1,{slide},done\ns2,{slide},failed\n")
    r = CliRunner().invoke(main, ["export-spatialdata", str(cohort), "--store", str(tmp_path / "stores")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "stores" / "slide.zarr" / "tables" / "resnet18_tiles").is_dir()
    assert "s2: its row is failed" in r.output
    bad = CliRunner().invoke(main, ["export-spatialdata", str(tmp_path / "nothing")])
    assert bad.exit_code != 0 and len(bad.output.strip().splitlines()) == 1


def _wsidata_layout_store(path: Path, feats: np.ndarray, side: int = 64) -> Path:
    """A store in wsidata's layout written with spatialdata's own API (no slide needed)."""
    import anndata
    import geopandas as gpd
    import pandas as pd
    import shapely
    import spatialdata
    from spatialdata.models import ShapesModel, TableModel

    n = len(feats)
    grid = int(np.ceil(np.sqrt(n)))
    xy = np.stack([np.arange(n) % grid, np.arange(n) // grid], 1) * side
    tiles = ShapesModel.parse(gpd.GeoDataFrame({"tile_id": np.arange(n), "x": xy[:, 0], "y": xy[:, 1],
                                                "tissue_id": np.zeros(n, int)},
                                               geometry=shapely.box(xy[:, 0], xy[:, 1], xy[:, 0] + side,
                                                                    xy[:, 1] + side)))
    obs = pd.DataFrame({"tile_id": np.arange(n), "library_id": pd.Categorical(["tiles"] * n)},
                       index=np.arange(n).astype(str))
    table = TableModel.parse(anndata.AnnData(X=feats, obs=obs), region="tiles", region_key="library_id",
                             instance_key="tile_id")
    spec = {"height": side, "width": side, "stride_height": side, "stride_width": side, "mpp": 0.5,
            "ops_level": 0, "ops_downsample": 1.0, "base_level": 0, "base_downsample": 1.0, "tissue_name": None}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spatialdata.SpatialData(shapes={"tiles": tiles}, tables={"uni_tiles": table},
                                attrs={"tile_spec": {"tiles": spec}}).write(path)
    return path


@pytest.mark.slow
def test_train_mil_and_mil_deploy_read_wsidata_stores(tmp_path, one_torch_thread):
    from slidekit.slidelevel.mil_deploy import deploy
    from trainers.base import train

    rng = np.random.default_rng(0)
    rows = []
    for i in range(8):
        label = "tumour" if i % 2 else "normal"
        feats = rng.normal(0, 1, (30 + i, 8)).astype(np.float32)
        feats[:5, 0] += 4.0 * (label == "tumour")
        store = _wsidata_layout_store(tmp_path / f"s{i}.zarr", feats)
        rows.append(f"s{i}.tif,{label},p{i},{store.name}")
    table = tmp_path / "slides.csv"
    table.write_text("slide,label,patient,features\n" + "\n".join(rows) + "\n")
    ckpt = train("mil", None, tmp_path / "run", {"slides": str(table), "arch": "abmil", "folds": 2, "epochs": 2,
                                                 "patience": 2, "bootstrap": 5}, device="cpu", progress=False)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["patients"] == 8 and len(metrics["folds"]) == 2
    with pytest.warns(SlidekitWarning, match="without slidekit's records"):  # a foreign store: said, not silent
        out = deploy(ckpt, [tmp_path / "s1.zarr", tmp_path / "s2.zarr"], tmp_path / "scores.csv", progress=False)
    with open(out) as f:
        scored = list(csv.DictReader(f))
    assert [r["status"] for r in scored] == ["done", "done"] and all(r["p_tumour"] for r in scored)
    from slidekit.cli import main

    r = CliRunner().invoke(main, ["mil-deploy", str(tmp_path / "s3.zarr"), str(tmp_path / "s4.zarr" / "tables" /
                                                                           "uni_tiles"),
                                  "--model", str(ckpt), "--out", str(tmp_path / "cli.csv"), "--quiet"])
    assert r.exit_code == 0, r.output
    with open(tmp_path / "cli.csv") as f:
        assert [row["status"] for row in csv.DictReader(f)] == ["done", "done"]


def test_lazyslide_aggregates_our_features(exported):
    """LazySlide's own tool on slidekit's store (where LazySlide is installed: it is not in [dev])."""
    zs = pytest.importorskip("lazyslide")
    slide, _out, store, _coords, feats, _ = exported
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wsi = zs.open_wsi(slide, store=str(store))
        zs.tl.feature_aggregation(wsi, feature_key="resnet18", tile_key="tiles")
        zs.tl.feature_aggregation(wsi, feature_key="resnet18", tile_key="tiles", agg_by="tissue_id")
    table = wsi.tables["resnet18_tiles"]
    agg = table.uns["agg_ops"]["agg_slide"]
    slide_mean = np.asarray(agg["features"] if "features" in agg else table.varm["agg_slide"].T).ravel()
    assert np.allclose(slide_mean, feats.mean(0), atol=1e-6)
    assert "agg_tissue_id" in table.uns["agg_ops"]


def test_slidekit_view_draws_a_stores_tissues_and_tiles(exported):
    pytest.importorskip("starlette")
    pytest.importorskip("httpx")
    from starlette.testclient import TestClient

    from slidekit.slidelevel.spatialdata_export import export_spatialdata
    from slidekit.view import build_app

    slide, out, store, coords, *_ = exported
    folder_store = export_spatialdata(out, maps=False, cells=False)  # the store inside the slide's folder
    client = TestClient(build_app(out), base_url="http://127.0.0.1")
    item = client.get(f"/api/item/{out.name}").json()
    drawn = {g["name"]: g["url"] for g in item["geojson"]}
    assert {"slide.zarr/tissues", "slide.zarr/tiles"} <= set(drawn), drawn
    tiles = client.get(drawn["slide.zarr/tiles"]).json()
    boxes = np.array([f["geometry"]["coordinates"][0] for f in tiles["features"]])
    assert np.array_equal(boxes.min(axis=1), coords) and np.array_equal(boxes.max(axis=1), coords + SIDE)
    assert tiles["features"][0]["properties"]["objectType"] == "tile"
    assert client.get(f"/spatialdata/{out.name}/slide.zarr/cells").status_code == 404  # not offered
    assert folder_store == out / "slide.zarr"


@pytest.mark.parametrize("size", [224, 256, 299])
def test_tile_spec_gives_wsidata_our_level0_side_exactly(size):
    from slidekit.slidelevel.spatialdata_export import tile_spec

    for side in range(1, 3 * size):  # float ratios whose product truncates one short are nudged up
        spec = wsidata.TileSpec(**tile_spec(size, side, 0.5, overlap=size // 8))
        assert (spec.base_width, spec.base_height) == (side, side)
        assert spec.overlap_x == size // 8


def test_spatialdata_flag_writes_the_store_after_a_command(tmp_path):
    """--spatialdata on a per-slide command: one slide's folder, and each done slide of a cohort, gets its
    store (what `slidekit export-spatialdata` writes); a single-slide embed (a store, not a folder) is refused."""
    import spatialdata as sd

    from slidekit.cli import main

    a = synthetic_slide(tmp_path / "a.tif")
    b = synthetic_slide(tmp_path / "b.tif", seed=2)
    r = CliRunner().invoke(main, ["tissue", str(a), "--out", str(tmp_path / "one"), "--spatialdata", "-q"])
    assert r.exit_code == 0, r.output
    one = sd.read_zarr(tmp_path / "one" / "a.zarr")
    assert "tissues" in one.shapes and len(one.shapes["tissues"]) > 0
    r = CliRunner().invoke(main, ["tissue", str(a), str(b), "--out", str(tmp_path / "co"), "--spatialdata", "-q"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "co" / "a" / "a.zarr").is_dir() and (tmp_path / "co" / "b" / "b.zarr").is_dir()
    r = CliRunner().invoke(main, ["embed", str(a), "--model", "resnet18", "--out", str(tmp_path / "e.zarr"),
                                  "--spatialdata", "-q"])
    assert r.exit_code != 0 and "--spatialdata needs an embed cohort" in r.output
