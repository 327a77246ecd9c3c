"""Output safety: slidekit replaces only what it wrote, one folder holds one slide, and a folder
being written is locked (who holds it is named)."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import socket
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import synthetic_slide

from slidekit.base.errors import LockedError, OutputError
from slidekit.base.locks import LOCK_NAME, OutputLock, read_lock
from slidekit.cli import main
from slidekit.infer.predictor import heatmap_slide

FAST = dict(workers=0, device="cpu", progress=False, batch_size=16)


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("out_slides")
    a = synthetic_slide(root / "a" / "slide.tif", width=1024, height=768, tissue_box=(256, 128, 512, 384))
    b = synthetic_slide(root / "b" / "slide.tif", width=1024, height=768, tissue_box=(128, 128, 384, 256), seed=3)
    return a, b


@pytest.mark.parametrize("name", ["overlay.png", "predictions.geojson", "heatmap.zarr"])
def test_heatmap_refuses_to_replace_a_users_file(slides, tmp_path, name):
    out = tmp_path / "OUT"
    user = out / name
    if name.endswith(".zarr"):
        (user / "mine").mkdir(parents=True)
        (user / "mine" / "notes.txt").write_text("keep me")
    else:
        out.mkdir()
        user.write_text("keep me")
    with pytest.raises(OutputError, match="slidekit did not write"):
        heatmap_slide(slides[0], out, **FAST)
    kept = user / "mine" / "notes.txt" if name.endswith(".zarr") else user
    assert kept.read_text() == "keep me"
    assert not (out / "summary.json").exists()


def test_heatmap_rerun_replaces_its_own_outputs(slides, tmp_path):
    out = tmp_path / "OUT"
    first = heatmap_slide(slides[0], out, **FAST)
    again = heatmap_slide(slides[0], out, threshold=0.3, **FAST)  # another output config: rewritten
    assert again["config"]["threshold"] == 0.3 and not again.get("skipped")
    assert first["tiles"] == again["tiles"]


def test_one_folder_never_mixes_two_slides(slides, tmp_path):
    out = tmp_path / "OUT"
    heatmap_slide(slides[0], out, **FAST)
    before = (out / "summary.json").read_text()
    with pytest.raises(OutputError, match="another slide"):
        heatmap_slide(slides[1], out, **FAST)
    assert (out / "summary.json").read_text() == before


def test_cli_heatmap_same_stem_slides_get_distinct_folders(slides, tmp_path):
    out = tmp_path / "OUT"
    r = CliRunner().invoke(main, ["heatmap", str(slides[0]), str(slides[1]), "--out", str(out), "--device", "cpu",
                                  "--workers", "0", "--quiet"])
    assert r.exit_code == 0, r.output
    summaries = sorted(out.glob("*/summary.json"))
    assert len(summaries) == 2
    assert {json.loads(p.read_text())["slide"] for p in summaries} == {str(slides[0]), str(slides[1])}


def test_embed_refuses_to_delete_an_existing_folder(tmp_path):
    from slidekit.models.checkpoint import save_checkpoint
    from slidekit.models.networks import ResNetClassifier
    from slidekit.models.spec import ModelSpec
    from slidekit.slidelevel.embed import embed_slide

    slide = synthetic_slide(tmp_path / "s.tif", width=1024, height=768, tissue_box=(256, 128, 512, 384))
    spec = ModelSpec(arch="resnet-encoder", task="embedding", classes=[], patch_size=32, mpp=2.0,
                     mean=(0.5,) * 3, std=(0.5,) * 3, activation="none", trainer="simclr")
    model = save_checkpoint(tmp_path / "enc.pt", ResNetClassifier("resnet18", 0), spec)
    existing = tmp_path / "my_project"
    existing.mkdir()
    (existing / "thesis.docx").write_text("years of work")
    with pytest.raises(OutputError, match="not a slidekit embeddings store"):
        embed_slide(slide, existing, model=model, device="cpu", progress=False)
    assert (existing / "thesis.docx").read_text() == "years of work"


def _hold_lock(folder: str, ready, stop) -> None:
    with OutputLock(folder):
        ready.set()
        stop.wait(30)


def test_lock_names_its_holder_and_a_dead_holder_is_taken_over(tmp_path):
    ctx = mp.get_context("spawn")
    ready, stop = ctx.Event(), ctx.Event()
    p = ctx.Process(target=_hold_lock, args=(str(tmp_path), ready, stop))
    p.start()
    try:
        assert ready.wait(30)
        with pytest.raises(LockedError, match=f"{socket.gethostname()}:{p.pid}"):
            OutputLock(tmp_path).acquire()
        p.kill()  # dies holding the lock: the lock file stays, stale
        p.join()
        assert read_lock(tmp_path / LOCK_NAME)["pid"] == p.pid
        with OutputLock(tmp_path) as lock:
            assert lock.took_over["pid"] == p.pid
            assert read_lock(tmp_path / LOCK_NAME)["pid"] == os.getpid()
        assert not (tmp_path / LOCK_NAME).exists()
    finally:
        if p.is_alive():  # Event.set() on an Event a killed process was waiting on blocks for ever
            stop.set()
        p.join()


def test_other_hosts_lock_is_stale_only_after_its_heartbeat_timeout(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": "elsewhere", "pid": 1, "token": "t"}))
    with pytest.raises(LockedError, match="elsewhere:1"):
        OutputLock(tmp_path, stale_after=60).acquire()
    old = time.time() - 120
    os.utime(tmp_path / LOCK_NAME, (old, old))
    with OutputLock(tmp_path, stale_after=60) as lock:
        assert lock.took_over["host"] == "elsewhere"


def test_lock_is_reentrant_in_one_process(tmp_path):
    with OutputLock(tmp_path):
        with OutputLock(tmp_path):
            pass
        assert (tmp_path / LOCK_NAME).exists()  # the outer hold continues
    assert not (tmp_path / LOCK_NAME).exists()


def test_second_heatmap_on_a_locked_folder_is_one_line(slides, tmp_path):
    out = tmp_path / "OUT"
    out.mkdir()
    (out / LOCK_NAME).write_text(json.dumps({"host": "node7", "pid": 4242, "token": "x"}))
    r = CliRunner().invoke(main, ["heatmap", str(slides[0]), "--out", str(out), "--device", "cpu",
                                  "--workers", "0", "--quiet"])
    assert r.exit_code != 0
    assert "node7:4242" in r.output and "Traceback" not in r.output
    assert not list(out.glob("heatmap.zarr*"))


def test_tissue_and_tile_refuse_to_replace_foreign_files(slides, tmp_path):
    from slidekit.regions.tiling import make_grid
    from slidekit.regions.tissue_job import save_tissue

    out = tmp_path / "T"
    out.mkdir()
    (out / "mask.png").write_text("my drawing")
    with pytest.raises(OutputError, match="mask.png"):
        save_tissue(str(slides[0]), out)
    assert (out / "mask.png").read_text() == "my drawing"
    notes = tmp_path / "notes.npz"
    notes.write_text("not a grid")
    with pytest.raises(OutputError, match="not a slidekit tile grid"):
        make_grid(slides[0], mpp=2.0, size=64, out=notes)
    assert notes.read_text() == "not a grid"
    make_grid(slides[0], mpp=2.0, size=64, out=tmp_path / "g.npz")
    make_grid(slides[0], mpp=4.0, size=64, out=tmp_path / "g.npz")  # its own grid: replaced


def test_tissue_regions_stay_inside_the_slide(tmp_path):
    from slidekit.annotations.formats import read_annotations
    from slidekit.regions.tissue_job import save_tissue

    # Tissue up to the right and bottom edges of a slide whose size is not a multiple of the mask pixel.
    slide = synthetic_slide(tmp_path / "edge.tif", width=1000, height=700, tissue_box=(600, 300, 400, 400))
    save_tissue(str(slide), tmp_path / "T", mask_mpp=8.0)
    for a in read_annotations(tmp_path / "T" / "tissue.geojson"):
        x0, y0, x1, y1 = a.geometry.bounds
        assert x0 >= 0 and y0 >= 0 and x1 <= 1000 and y1 <= 700
        assert a.measurements["Area µm^2"] == pytest.approx(a.geometry.area * 0.25, rel=1e-6)
