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
    store = embed_slide(slide, root / "e.zarr", model=model, chunk_rows=7, device="cpu", progress=False,
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


# -- malformed files (issue 29 item 14) and storage outside the file (item 16) ---------------------------------

def _good(f, n=4, d=8, side=256):
    f["features"] = np.ones((n, d), np.float32)
    f["coords"] = np.arange(2 * n).reshape(n, 2) * side
    f["coords"].attrs["patch_size_level0"] = side


def _features_group(f):
    f.create_group("features")
    f["coords"] = np.zeros((4, 2), np.int64)


def _coords_group(f):
    f["features"] = np.ones((4, 8), np.float32)
    f.create_group("coords")


def _string_features(f):
    f["features"] = np.array([[b"a", b"b"]] * 4)
    f["coords"] = np.zeros((4, 2), np.int64)


def _compound_features(f):
    f["features"] = np.zeros((4, 2), dtype=[("a", "f4"), ("b", "i4")])
    f["coords"] = np.zeros((4, 2), np.int64)


def _string_coords(f):
    f["features"] = np.ones((4, 8), np.float32)
    f["coords"] = np.array([[b"1", b"2"]] * 4)


def _side(value):
    def build(f):
        _good(f)
        f["coords"].attrs["patch_size_level0"] = value
    return build


def _clam_downsample(f):
    f["features"] = np.ones((4, 8), np.float32)
    f["coords"] = np.zeros((4, 2), np.int64)
    f["coords"].attrs.update({"patch_size": 256, "patch_level": 1, "downsample": "xyz"})


def _external_link_missing(f):
    f["coords"] = np.zeros((4, 2), np.int64)
    f["coords"].attrs["patch_size_level0"] = 256
    f["features"] = h5py.ExternalLink("gone.h5", "/features")


def _soft_loop(f):
    f["coords"] = np.zeros((4, 2), np.int64)
    f["coords"].attrs["patch_size_level0"] = 256
    f["features"] = h5py.SoftLink("/loop")
    f["loop"] = h5py.SoftLink("/features")


def _huge(f):
    f.create_dataset("features", shape=(10 ** 8, 1024), dtype="float32")
    f.create_dataset("coords", shape=(10 ** 8, 2), dtype="int64")
    f["coords"].attrs["patch_size_level0"] = 256


MALFORMED = {
    "features_group": (_features_group, "'features' is a group"),
    "coords_group": (_coords_group, "'coords' is a group"),
    "string_features": (_string_features, "'features' holds bytes"),
    "compound_features": (_compound_features, "'features' holds compound"),
    "string_coords": (_string_coords, "'coords' holds bytes"),
    "side_text": (_side("abc"), "patch_size_level0 'abc' is not a tile size"),
    "side_nan": (_side(float("nan")), "patch_size_level0 nan is not a tile size"),
    "side_negative": (_side(-256), "patch_size_level0 -256 is not a tile size"),
    "clam_downsample": (_clam_downsample, "downsample 'xyz' is not a tile size"),
    "external_link_missing": (_external_link_missing, "'features' is an external link to gone.h5"),
    "soft_link_loop": (_soft_loop, "'features' cannot be opened"),
    "huge": (_huge, "100000000 x 1024 features"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_files_are_one_feature_error_line(tmp_path, case):
    from slidekit.base.errors import FeatureError
    from slidekit.slidelevel.feature_store import feature_info

    build, msg = MALFORMED[case]
    path = tmp_path / f"{case}.h5"
    with h5py.File(path, "w") as f:
        build(f)
    for read in (read_features, lambda p: list(iter_feature_chunks(p, rows=2)), feature_info):
        with pytest.raises(FeatureError) as e:
            read(path)
        text = str(e.value)
        assert "\n" not in text and str(path) in text and msg in text, text


def test_malformed_file_is_a_failed_row_naming_it_in_mil_deploy(tmp_path):
    import csv

    from slidekit.models.mil import build_mil, save_mil_checkpoint

    ckpt = save_mil_checkpoint(tmp_path / "m.pt", build_mil("abmil", 8, 2).eval(),
                               {"arch": "abmil", "in_dim": 8, "classes": ["a", "b"], "hidden": 128})
    files = []
    for case in ("string_features", "external_link_missing", "side_text", "clam_downsample"):
        files.append(tmp_path / f"{case}.h5")
        with h5py.File(files[-1], "w") as f:
            MALFORMED[case][0](f)
    files.append(tmp_path / "virtual_missing.h5")  # storage outside the file (item 16): a failed row, not zeros
    with h5py.File(files[-1], "w") as f:
        _virtual(f, tmp_path, missing=True)
    with h5py.File(tmp_path / "good.h5", "w") as f:
        _good(f)
    res = CliRunner().invoke(main, ["mil-deploy", *map(str, files), str(tmp_path / "good.h5"), "--model", str(ckpt),
                                    "--out", str(tmp_path / "s.csv"), "--quiet"])
    assert res.exit_code == 1 and "Traceback" not in res.output
    rows = {r["features"]: r for r in csv.DictReader(open(tmp_path / "s.csv"))}
    assert rows[str(tmp_path / "good.h5")]["status"] == "done"
    for p in files:
        assert rows[str(p)]["status"] == "failed" and rows[str(p)]["error"].startswith(str(p)), rows[str(p)]


def _source(path, n=4, d=8):
    with h5py.File(path, "w") as f:
        _good(f, n, d)


def _ext_link(f, tmp):
    _source(tmp / "src.h5")
    f["features"] = h5py.ExternalLink("src.h5", "/features")
    f["coords"] = h5py.ExternalLink("src.h5", "/coords")


def _virtual(f, tmp, missing=False):
    _source(tmp / "src.h5")
    layout = h5py.VirtualLayout(shape=(4, 8), dtype="float32")
    layout[:] = h5py.VirtualSource(str(tmp / ("nowhere.h5" if missing else "src.h5")), "features", shape=(4, 8))
    f.create_virtual_dataset("features", layout)
    f["coords"] = np.arange(8).reshape(4, 2) * 256
    f["coords"].attrs["patch_size_level0"] = 256


def _external_raw(f, tmp):
    raw = tmp / "raw.bin"
    np.ones((4, 8), np.float32).tofile(raw)
    f.create_dataset("features", shape=(4, 8), dtype="float32", external=[(str(raw), 0, 4 * 8 * 4)])
    f["coords"] = np.arange(8).reshape(4, 2) * 256
    f["coords"].attrs["patch_size_level0"] = 256


EXTERNAL = {
    "external_link": (_ext_link, "an external link to src.h5"),
    "virtual": (_virtual, "a virtual dataset"),
    "virtual_missing": (lambda f, t: _virtual(f, t, missing=True), "a virtual dataset"),
    "external_raw": (_external_raw, "stored outside the file"),
}


@pytest.mark.parametrize("case", sorted(EXTERNAL))
def test_storage_outside_the_file_is_refused_unless_allowed(tmp_path, case):
    from slidekit.base.errors import FeatureError
    from slidekit.slidelevel.feature_store import feature_info

    build, msg = EXTERNAL[case]
    path = tmp_path / "f.h5"
    with h5py.File(path, "w") as f:
        build(f, tmp_path)
    for read in (read_features, feature_info, lambda p, **k: list(iter_feature_chunks(p, **k))):
        with pytest.raises(FeatureError, match="allow_external") as e:
            read(path)
        assert msg in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)
    if case == "virtual_missing":  # allowed, a missing source is still no silent zeros
        with pytest.raises(FeatureError, match="nowhere.h5 .*not found"):
            read_features(path, allow_external=True)
    else:
        assert read_features(path, allow_external=True).features.sum() == 32
        assert feature_info(path, allow_external=True).rows == 4
