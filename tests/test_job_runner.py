"""The shared per-slide job runner: "finished" means every declared output still verifies.

Each output of each job is deleted, emptied and corrupted (same size, same modification time) in
turn; a single-slide rerun and a cohort rerun must redo the slide, and an untouched one must be
skipped. Also: output records, and regions that compose (tissue & ROI - mask).
"""
from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import synthetic_slide

from slidekit.base.errors import OutputWarning, TissueError
from slidekit.base.verify import check_output, output_record
from slidekit.cohort.run import run_cohort
from slidekit.regions.masks import MaskImage, Roi, Tissue, WholeSlide, build_region
from slidekit.regions.options import TissueOptions
from slidekit.slides.slide import open_slide

FAST = dict(workers=0, device="cpu", batch_size=16)


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("job_slides")
    return [synthetic_slide(root / f"{n}.tif", width=1024, height=768, tissue_box=box, seed=s)
            for n, box, s in (("a", (256, 128, 512, 384), 0), ("b", (128, 128, 384, 256), 3))]


def _files(path: Path) -> list[Path]:
    return [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())


def damage(path: Path, how: str) -> None:
    """Delete, empty, or flip one byte of ``path`` (its largest file for a folder) keeping size and mtime."""
    if how == "delete":
        shutil.rmtree(path) if path.is_dir() else path.unlink()
        return
    target = max(_files(path), key=lambda p: p.stat().st_size)
    st = target.stat()
    if how == "empty":
        target.write_bytes(b"")
    else:
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))  # as `cp -p` or `rsync -t` leave it


# --- output records -------------------------------------------------------------------------

def test_a_record_verifies_untouched_and_copied_outputs_and_catches_same_size_changes(tmp_path):
    store = tmp_path / "store"
    (store / "c" / "0").mkdir(parents=True)
    (store / "c" / "0" / "0").write_bytes(os.urandom(5000))
    (store / "zarr.json").write_text('{"shape": [4, 4]}')
    rec = output_record(store)
    assert rec["files"] == 2 and rec["bytes"] == 5000 + len('{"shape": [4, 4]}')
    assert check_output(store, rec) is None
    copy = tmp_path / "copy"
    shutil.copytree(store, copy)  # other inode times: the stamp differs, the contents do not
    assert check_output(copy, rec) is None
    damage(store, "corrupt")
    assert "changed since it was written" in check_output(store, rec)
    damage(copy, "empty")
    assert "bytes" in check_output(copy, rec)
    assert "missing" in check_output(tmp_path / "gone", rec)


# --- regions ---------------------------------------------------------------------------------

def test_regions_compose_tissue_and_roi_minus_a_mask(slides, tmp_path):
    roi = tmp_path / "roi.geojson"
    # the left half of slide a's tissue box (256..768 x 128..512)
    ring = [[256, 128], [512, 128], [512, 512], [256, 512], [256, 128]]
    roi.write_text(json.dumps({"type": "FeatureCollection", "features": [{
        "type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
        "properties": {"objectType": "annotation"}}]}))
    with open_slide(slides[0]) as slide:
        tissue = build_region(Tissue(TissueOptions({"mpp": 8.0})), slide)
        both = build_region(Tissue(TissueOptions({"mpp": 8.0})) & Roi(roi), slide)
        assert 0 < both.array.sum() < tissue.array.sum()
        # every kept pixel lies in the ROI's box (pixel centres; 8 µm = 16 level-0 px per mask pixel)
        rows, cols = np.nonzero(both.array)
        sx, _ = both.scale
        assert ((cols + 0.5) * sx).min() >= 256 and ((cols + 0.5) * sx).max() <= 512
        # subtracting a mask image of the ROI's half leaves the other half of the tissue
        img = np.zeros((768 // 16, 1024 // 16), np.uint8)
        img[128 // 16:512 // 16, 256 // 16:512 // 16] = 255
        import cv2

        cv2.imwrite(str(tmp_path / "artefacts.png"), img)
        rest = build_region(Tissue(TissueOptions({"mpp": 8.0})) - MaskImage(tmp_path / "artefacts.png"), slide)
        assert not (rest.array & both.array).any()
        assert rest.array.sum() + both.array.sum() == tissue.array.sum()
        whole = build_region(WholeSlide(8.0), slide)
        assert whole.array.all()
        with pytest.raises(TissueError, match="region of interest"):
            build_region(WholeSlide(8.0) & Roi(roi) - Roi(roi), slide)
    assert "roi" in (Tissue() & Roi(roi)).config() and "-roi" in (Tissue() - Roi(roi)).config()


# --- every output of every job, single slide and cohort --------------------------------------

def _heatmap(slide, out):
    from slidekit.infer.predictor import heatmap_slide

    return heatmap_slide(slide, out, model="tissue", mpp=4.0, size=64, progress=False, **FAST)


def _cells(slide, out):
    from slidekit.infer.cells import cells_slide

    return cells_slide(slide, out, mpp=1.0, size=128, progress=False, gzip=False, **FAST)


def _tissue(slide, out):
    from slidekit.regions.tissue_job import save_tissue

    return save_tissue(slide, out, progress=False)


def _tile(slide, out):
    from slidekit.regions.grid_job import save_grid

    return save_grid(slide, out, mpp=2.0, size=64, min_tissue=0.2, progress=False)


def _export(slide, out):
    from slidekit.regions.patches import export_patches

    return export_patches(slide, out, mpp=2.0, size=64, min_tissue=0.2, progress=False)


JOBS = {"heatmap": (_heatmap, ["heatmap.zarr", "overlay.png", "predictions.geojson"]),
        "cells": (_cells, ["cells.geojson", "cells.csv"]),
        "tissue": (_tissue, ["mask.png", "tissue.geojson", "tissue.json"]),
        "tile": (_tile, ["grid.npz"]),
        "export": (_export, ["tiles", "patches.csv", "patches.json"])}
CASES = [(job, name, how) for job, (_, names) in JOBS.items() for name in names
         for how in ("delete", "empty", "corrupt")]


@pytest.mark.parametrize("job,name,how", CASES)
def test_a_single_slide_rerun_redoes_any_damaged_output(slides, tmp_path, job, name, how):
    run, _ = JOBS[job]
    out = tmp_path / "out"
    first = run(slides[0], out)
    assert name in first["outputs"] and name in first["records"]
    assert run(slides[0], out).get("skipped") is True  # untouched: skipped
    damage(out / name, how)
    with pytest.warns(OutputWarning, match=f"redoing {job}: {name}"):
        again = run(slides[0], out)
    assert not again.get("skipped") and name in again["redone"]
    assert check_output(out / name, again["records"][name]) is None
    # made again byte for byte, except GeoJSON objects (fresh UUIDs) and patches.json (its seconds)
    if not name.endswith(".geojson") and name != "patches.json":
        assert again["records"][name]["digest"] == first["records"][name]["digest"]
    assert run(slides[0], out).get("skipped") is True


def test_an_old_summary_without_records_is_redone_once(slides, tmp_path):
    out = tmp_path / "out"
    first = _heatmap(slides[0], out)
    summary = json.loads((out / "summary.json").read_text())
    del summary["records"]
    (out / "summary.json").write_text(json.dumps(summary))
    with pytest.warns(OutputWarning, match="records no outputs"):
        again = _heatmap(slides[0], out)
    assert not again.get("skipped") and again["records"].keys() == first["records"].keys()


@pytest.mark.parametrize("task", ["heatmap", "cells"])
def test_a_cohort_rerun_redoes_slides_whose_outputs_were_lost(slides, tmp_path, task):
    """The issue's reproduction: one output deleted in slide a's folder, one emptied in b's, one
    corrupted at the same size and time in a third run; every rerun redoes exactly those slides."""
    out = tmp_path / "CO"
    opts = (dict(model="tissue", mpp=4.0, size=64) if task == "heatmap" else dict(mpp=1.0, size=128, gzip=False))
    first = run_cohort(task, [str(s) for s in slides], out, progress=False, **opts, **FAST)
    assert sorted(r["status"] for r in first) == ["done", "done"]
    main_out = "heatmap.zarr" if task == "heatmap" else "cells.geojson"
    side_out = "predictions.geojson" if task == "heatmap" else "cells.csv"
    damage(out / "a" / main_out, "delete")
    damage(out / "b" / side_out, "empty")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OutputWarning)
        again = run_cohort(task, [str(s) for s in slides], out, progress=False, **opts, **FAST)
    rows = {r["id"]: r for r in again}
    assert rows["a"]["status"] == "done" and main_out in rows["a"]["note"]
    assert rows["b"]["status"] == "done" and side_out in rows["b"]["note"]
    assert (out / "a" / main_out).exists() and (out / "b" / side_out).stat().st_size > 0
    damage(out / "a" / side_out, "corrupt")  # same size, same time: only the digest tells
    third = {r["id"]: r for r in run_cohort(task, [str(s) for s in slides], out, progress=False, **opts,
                                             **FAST)}
    assert third["a"]["status"] == "done" and "changed since it was written" in third["a"]["note"]
    assert third["b"]["status"] == "skipped"  # untouched: done earlier


def test_a_cohort_embed_rerun_redoes_a_slide_whose_feature_file_changed(slides, tmp_path):
    import torch

    from slidekit.models.checkpoint import save_checkpoint
    from slidekit.models.networks import ResNetClassifier
    from slidekit.models.spec import ModelSpec
    from slidekit.slidelevel.feature_store import read_features

    torch.manual_seed(0)
    spec = ModelSpec(arch="resnet-encoder", task="embedding", classes=[], patch_size=32, mpp=4.0,
                     mean=(0.5,) * 3, std=(0.5,) * 3, activation="none", trainer="simclr")
    model = save_checkpoint(tmp_path / "enc.pt", ResNetClassifier("resnet18", 0), spec)
    out = tmp_path / "E"
    run = lambda: {r["id"]: r for r in run_cohort("embed", [str(s) for s in slides], out, progress=False,  # noqa: E731
                                                  model=str(model), device="cpu", workers=0, min_tissue=0.1)}
    assert [r["status"] for r in run().values()] == ["done", "done"]
    before = read_features(out / "a" / "features.h5").features.copy()
    for name in ("features.h5", "embeddings.zarr"):
        damage(out / "a" / name, "corrupt")  # same size, same time: caught by the digest
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", OutputWarning)
            rows = run()
        assert rows["a"]["status"] == "done" and f"{name} changed since it was written" in rows["a"]["note"]
        assert rows["b"]["status"] == "skipped"
        assert np.array_equal(read_features(out / "a" / "features.h5").features, before)
