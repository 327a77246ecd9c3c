"""`slidekit embed`: per-tile features aligned with grid coordinates, resumable, clusters as QuPath tiles."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import synthetic_slide

from slidekit.cli import main
from slidekit.models.checkpoint import save_checkpoint
from slidekit.models.networks import ResNetClassifier
from slidekit.models.spec import ModelSpec
from slidekit.regions.tiling import TileGrid, TileReader
from slidekit.regions.tissue import tissue_mask
from slidekit.slidelevel.embed import embed_slide, open_embeddings
from slidekit.slides.slide import open_slide


@pytest.fixture(scope="module")
def slide_and_model(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("embed")
    slide = synthetic_slide(root / "slide.tif", width=1024, height=768, tissue_box=(256, 128, 512, 384))
    torch.manual_seed(0)
    spec = ModelSpec(arch="resnet-encoder", task="embedding", classes=[], patch_size=32, mpp=2.0,
                     mean=(0.5,) * 3, std=(0.5,) * 3, activation="none", trainer="simclr")
    model = save_checkpoint(root / "enc.pt", ResNetClassifier("resnet18", 0), spec)
    return slide, model


def test_features_aligned_with_grid_coordinates(slide_and_model, tmp_path):
    slide_path, model_path = slide_and_model
    out = embed_slide(slide_path, tmp_path / "emb.zarr", model=model_path, chunk_rows=7, batch_size=5, device="cpu",
                      progress=False)
    emb = open_embeddings(out)
    with open_slide(slide_path) as slide:
        grid = TileGrid.from_slide(slide, mpp=2.0, size=32, mask=tissue_mask(slide), min_tissue=0.5)
        assert np.array_equal(emb.coords, grid.coords)
        assert emb.features.shape == (len(grid), 512) and emb.features.chunks[0] == 7
        from slidekit.models.checkpoint import load_checkpoint

        ckpt = load_checkpoint(model_path)
        reader = TileReader(slide, grid)
        for i in (0, len(grid) // 2, len(grid) - 1):
            x = ckpt.spec.normalize(torch.from_numpy(reader.read(i))[None])
            with torch.no_grad():
                ref = ckpt.model.features(x)[0].numpy()
            assert np.allclose(emb.features[i], ref, atol=1e-4)
    assert emb.attrs["grid"]["mpp"] == 2.0 and emb.attrs["slide"]["name"] == "slide.tif"
    assert not Path(str(out) + ".partial").exists()


def test_rerun_skips_and_partial_resumes(slide_and_model, tmp_path):
    import zarr

    slide_path, model_path = slide_and_model
    out = tmp_path / "emb.zarr"
    embed_slide(slide_path, out, model=model_path, chunk_rows=8, device="cpu", progress=False)
    full = np.asarray(open_embeddings(out).features[:])
    stamp = (out / "zarr.json").stat().st_mtime_ns
    embed_slide(slide_path, out, model=model_path, chunk_rows=8, device="cpu", progress=False)
    assert (out / "zarr.json").stat().st_mtime_ns == stamp  # finished store: nothing recomputed
    # an interrupted run: the store is still .partial, with some rows done and the rest garbage
    partial = Path(str(out) + ".partial")
    out.rename(partial)
    root = zarr.open_group(str(partial), mode="r+")
    root.attrs.update({"complete": False, "rows_done": 8})
    root["features"][8:] = -1.0
    embed_slide(slide_path, out, model=model_path, chunk_rows=8, device="cpu", progress=False)
    assert np.allclose(np.asarray(open_embeddings(out).features[:]), full, atol=1e-5)
    assert not partial.exists()


def test_cli_embed_with_clusters_geojson(slide_and_model, tmp_path):
    slide_path, model_path = slide_and_model
    out, gj = tmp_path / "e.zarr", tmp_path / "clusters.geojson"
    res = CliRunner().invoke(main, ["-q", "embed", str(slide_path), "--model", str(model_path), "--out", str(out),
                                    "--clusters", "3", "--geojson", str(gj), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    emb = open_embeddings(out)
    assert info["tiles"] == len(emb.coords) and info["dim"] == 512
    assert emb.clusters is not None and set(emb.clusters.tolist()) <= {0, 1, 2}
    feats = json.loads(gj.read_text())["features"]
    assert len(feats) == len(emb.coords)
    colours = {}
    for f, c, (x, _y) in zip(feats, emb.clusters.tolist(), emb.coords.tolist()):
        props = f["properties"]
        assert props["objectType"] == "tile" and props["classification"]["name"] == f"cluster {c}"
        colours.setdefault(c, tuple(props["classification"]["color"]))
        assert colours[c] == tuple(props["classification"]["color"])  # one colour per cluster
        xs = [p[0] for p in f["geometry"]["coordinates"][0]]
        assert min(xs) == pytest.approx(x)
    assert len(set(colours.values())) == len(colours)


def test_cli_embed_bad_input(slide_and_model, tmp_path):
    slide_path, _ = slide_and_model
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    res = CliRunner().invoke(main, ["embed", str(slide_path), "--model", str(bad), "--out", str(tmp_path / "o")])
    assert res.exit_code != 0
    assert "bad.pt" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(main, ["embed", str(slide_path), "--model", str(bad), "--out", str(tmp_path / "o"),
                                    "--geojson", "x.geojson"])
    assert res.exit_code != 0
