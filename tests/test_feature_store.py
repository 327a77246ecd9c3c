"""The HDF5 feature store: slidekit writes what TRIDENT/CLAM read; the reader takes their files and STAMP's."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import synthetic_slide

from slidekit.base.errors import GridError, SlidekitWarning
from slidekit.cli import main
from slidekit.models.checkpoint import save_checkpoint
from slidekit.models.networks import ResNetClassifier
from slidekit.models.spec import ModelSpec
from slidekit.slidelevel.embed import embed_slide, open_embeddings
from slidekit.slidelevel.feature_store import FeatureWriter, iter_feature_chunks, read_features, tool_attrs


@pytest.fixture(scope="module")
def embedded(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("fs")
    slide = synthetic_slide(root / "slide.tif", width=1024, height=768, tissue_box=(256, 128, 512, 384))
    torch.manual_seed(0)
    spec = ModelSpec(arch="resnet-encoder", task="embedding", classes=[], patch_size=32, mpp=2.0,
                     mean=(0.5,) * 3, std=(0.5,) * 3, activation="none", trainer="simclr")
    model = save_checkpoint(root / "enc.pt", ResNetClassifier("resnet18", 0), spec)
    store = embed_slide(slide, model, root / "e.zarr", chunk_rows=7, device="cpu", progress=False,
                        features_h5=root / "e.h5")
    return slide, store, root / "e.h5"


def test_written_file_matches_zarr_and_tool_layouts(embedded):
    slide, store, h5 = embedded
    emb = open_embeddings(store)
    bag = read_features(h5)
    assert bag.source == "slidekit" and bag.slide == "slide.tif"
    assert np.array_equal(bag.features, np.asarray(emb.features[:])) and bag.features.dtype == np.float32
    assert np.array_equal(bag.coords, emb.coords) and bag.coords.dtype == np.int64
    # synthetic slide: 0.5 µm/px, tiles 32 px at 2 µm/px -> 128 level-0 pixels
    assert bag.patch_size_level0 == round(emb.tile_extent[0]) == 128
    assert bag.encoder["dim"] == 512 and bag.encoder["mpp"] == 2.0 and bag.encoder["weights"].startswith(
        str(Path(embedded[0]).parent / "enc.pt"))
    with h5py.File(h5, "r") as f:  # what TRIDENT and CLAM look up
        a = f["coords"].attrs
        assert a["patch_size_level0"] == 128 and a["patch_size"] == 32 and a["patch_level"] == 0
        assert a["target_magnification"] == 5.0 and a["level0_magnification"] == 20.0
        assert list(a["level_dim"]) == [1024, 768]
        assert json.loads(f.attrs["slide"])["fingerprint"] == emb.attrs["slide"]["id"]
    chunks = list(iter_feature_chunks(h5, rows=5))
    assert [len(c[0]) for c in chunks][:-1] == [5] * (len(chunks) - 1)
    assert np.array_equal(np.concatenate([c[0] for c in chunks]), bag.features)
    assert np.array_equal(np.concatenate([c[1] for c in chunks]), bag.coords)


def test_rerun_keeps_file_and_partial_resumes(embedded, tmp_path):
    slide, store, h5 = embedded
    emb = open_embeddings(store)
    out = tmp_path / "f.h5"
    from slidekit.slidelevel.feature_store import write_feature_store

    write_feature_store(emb, out, chunk_rows=4)
    mtime = out.stat().st_mtime_ns
    write_feature_store(emb, out, chunk_rows=4)
    assert out.stat().st_mtime_ns == mtime  # same slide, grid, encoder: kept
    # an interrupted write: 4 rows done, then the rest continues from row 4
    out.unlink()
    coords = emb.coords
    w = FeatureWriter(out, coords, 512, {"name": "x"}, {"name": "s"}, {}, chunk_rows=4)
    w.write(0, np.ones((4, 512), np.float32))
    w.abort()
    assert not out.exists() and out.with_name("f.h5.partial").exists()
    w = FeatureWriter(out, coords, 512, {"name": "x"}, {"name": "s"}, {}, chunk_rows=4)
    assert w.rows_done == 4
    with pytest.raises(ValueError, match="do not follow"):
        w.write(0, np.ones((4, 512), np.float32))
    w.write(4, np.zeros((len(coords) - 4, 512), np.float32))
    w.close()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        bag = read_features(out)
    assert bag.features[:4].sum() == 4 * 512 and bag.features[4:].sum() == 0
    assert bag.patch_size_level0 == 0 and any(issubclass(r.category, SlidekitWarning) for r in rec)


def test_reads_trident_clam_stamp(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.random((6, 8), dtype=np.float32)
    c = np.arange(12).reshape(6, 2) * 256
    with h5py.File(tmp_path / "trident.h5", "w") as f:
        f["features"] = x
        f["coords"] = c
        f["coords"].attrs.update(tool_attrs(224, 448, 0.25, 0.5, (4000, 3000), "s1"))
    bag = read_features(tmp_path / "trident.h5")
    assert bag.source == "trident" and bag.patch_size_level0 == 448 and bag.slide == "s1"
    assert np.array_equal(bag.coords, c)
    with h5py.File(tmp_path / "clam.h5", "w") as f:
        f["features"] = x
        f["coords"] = c
        f["coords"].attrs.update({"patch_size": 256, "patch_level": 1, "downsample": np.array([4.0, 4.0])})
    assert read_features(tmp_path / "clam.h5").patch_size_level0 == 1024
    with h5py.File(tmp_path / "stamp.h5", "w") as f:
        f["feats"] = x
        f["coords"] = c.astype(np.float64) * 0.5  # µm
        f["coords"].attrs.update({"unit": "um", "tile_size_um": 256.0})
    with pytest.raises(GridError, match="µm"):
        read_features(tmp_path / "stamp.h5")
    bag = read_features(tmp_path / "stamp.h5", slide_mpp=0.5)
    assert bag.source == "stamp" and np.array_equal(bag.coords, c) and bag.patch_size_level0 == 512


def test_bad_files_are_one_line(tmp_path):
    (tmp_path / "text.h5").write_text("hello")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["images"] = np.zeros((2, 2))
    with h5py.File(tmp_path / "rows.h5", "w") as f:
        f["features"] = np.zeros((3, 4), np.float32)
        f["coords"] = np.zeros((2, 2))
    with h5py.File(tmp_path / "nan.h5", "w") as f:
        f["features"] = np.full((2, 4), np.nan, np.float32)
        f["coords"] = np.zeros((2, 2))
        f["coords"].attrs["patch_size_level0"] = 256
    for name, msg in [("missing.h5", "not found"), ("text.h5", "not a readable HDF5"), ("other.h5", "no 'coords'"),
                      ("rows.h5", "rows"), ("nan.h5", "not finite")]:
        with pytest.raises(GridError, match=msg) as e:
            read_features(tmp_path / name)
        assert "\n" not in str(e.value) and name in str(e.value)


def test_cli_h5(embedded, tmp_path):
    slide, store, _ = embedded
    res = CliRunner().invoke(main, ["embed", str(slide), "--model", str(Path(slide).parent / "enc.pt"),
                                    "--out", str(tmp_path / "e.zarr"), "--h5", str(tmp_path / "e.h5"),
                                    "--device", "cpu", "--quiet"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["h5"] == str(tmp_path / "e.h5")
    assert len(read_features(tmp_path / "e.h5")) == open_embeddings(store).coords.shape[0]
