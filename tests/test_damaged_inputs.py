"""Damaged stores, odd locks, integer weights and absurd sizes (issue 30): each is one clear line
naming the file through the surface a user meets (API, CLI, the viewer's HTTP answers), never a raw
traceback, a blank page or a silently different answer."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import synthetic_slide

from slidekit.base.errors import HeatmapError
from slidekit.infer.heatmap import Heatmap

W, H = 2048, 1536


def _cli(*args: str):
    from slidekit.cli import main  # imported here: the CLI loads every command module

    return CliRunner().invoke(main, list(args))


@pytest.fixture(scope="module")
def heatmap_out(tmp_path_factory) -> dict:
    from slidekit.infer.predictor import heatmap_slide

    root = tmp_path_factory.mktemp("damaged")
    slide = synthetic_slide(root / "s.tif", width=W, height=H)
    heatmap_slide(slide, root / "OUT", model="hematoxylin", workers=0, progress=False, min_tissue=0.1,
                  device="cpu")
    return {"root": root, "slide": slide, "out": root / "OUT"}


def _flip(store: Path) -> None:
    p = store / "prob" / "c" / "0" / "0" / "0"
    b = bytearray(p.read_bytes())
    for i in range(len(b) // 3, len(b) // 3 + 64):
        b[i] ^= 0xFF
    p.write_bytes(bytes(b))  # same size, other bytes


def _truncate(store: Path) -> None:
    p = store / "prob" / "zarr.json"
    p.write_text(p.read_text()[: len(p.read_text()) // 2])


def _huge(store: Path) -> None:
    p = store / "prob" / "zarr.json"
    meta = json.loads(p.read_text())
    meta["shape"] = [meta["shape"][0], 10**7, 10**7]
    p.write_text(json.dumps(meta))


def _nan(store: Path) -> None:
    import zarr

    zarr.open_group(str(store), mode="r+")["prob"][:] = np.nan


def _delete(store: Path) -> None:
    (store / "prob" / "c" / "0" / "0" / "0").unlink()


DAMAGE = {"flipped chunk": (_flip, "prob cannot be read: a chunk is damaged"),
          "truncated zarr.json": (_truncate, "array prob has damaged metadata"),
          "10^7 x 10^7 shape": (_huge, "damaged metadata: prob is declared (1, 10000000, 10000000)"),
          "all NaN": (_nan, "prob holds NaN"),
          "deleted chunk": (_delete, "incomplete: 1 chunks missing")}


@pytest.fixture(params=list(DAMAGE))
def damaged(request, heatmap_out, tmp_path) -> tuple[Path, str]:
    out = tmp_path / "OUT"
    shutil.copytree(heatmap_out["out"], out, symlinks=True)
    damage, says = DAMAGE[request.param]
    damage(out / "heatmap.zarr")
    return out, says


def test_an_intact_store_opens_and_verifies(heatmap_out):
    hm = Heatmap(heatmap_out["out"] / "heatmap.zarr").verify()
    assert hm.attrs["store_checks"] == 1 and np.asarray(hm.root["chunk_done"][:]).all()
    assert float(hm.view(1)[0].sum()) > 0


def test_api_damaged_store_is_a_heatmap_error(damaged):
    out, says = damaged
    store = out / "heatmap.zarr"
    with pytest.raises(HeatmapError) as e:
        Heatmap(store).verify()  # cheap damage at opening, the rest as chunks are read
    assert str(e.value).startswith(f"{store}: ") and says in str(e.value)
    with pytest.raises(HeatmapError, match="heatmap.zarr"):
        Heatmap(store).view(4)


@pytest.mark.parametrize("kind", ["truncated zarr.json", "10^7 x 10^7 shape", "deleted chunk"])
def test_cheap_damage_is_found_when_opening(heatmap_out, tmp_path, kind):
    out = tmp_path / "OUT"
    shutil.copytree(heatmap_out["out"], out)
    DAMAGE[kind][0](out / "heatmap.zarr")
    with pytest.raises(HeatmapError, match=DAMAGE[kind][1].replace("^", r"\^").replace("(", r"\(").replace(")", r"\)")):
        Heatmap(out / "heatmap.zarr")


def test_cli_features_on_a_damaged_store_is_one_line(damaged, tmp_path):
    out, says = damaged
    r = _cli("features", str(out), "--out", str(tmp_path / "f.csv"), "-q")
    assert r.exit_code != 0 and "Traceback" not in r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "heatmap.zarr" in lines[0] and says in lines[0], r.output
    assert not (tmp_path / "f.csv").exists()


def test_viewer_shows_the_slide_and_a_note_for_a_damaged_store(damaged, heatmap_out):
    from starlette.testclient import TestClient

    from slidekit.view import build_app

    out, says = damaged
    c = TestClient(build_app(out, slide=heatmap_out["slide"]), base_url="http://127.0.0.1")
    r = c.get("/api/item/OUT")
    assert r.status_code == 200, r.text
    item = r.json()
    assert (item["width"], item["height"]) == (W, H) and item["overlay"] is None  # the slide still shows
    note = [n for n in item["notes"] if n.startswith("no overlay: ")]
    assert len(note) == 1 and "OUT/heatmap.zarr" in note[0] and says in note[0], item["notes"]
    assert str(out.parent) not in r.text  # no server paths in the page
    ov = c.get("/overlay/OUT.png")
    assert ov.status_code == 422 and says in ov.json()["error"] and str(out.parent) not in ov.text
    assert c.get("/dzi/OUT_files/0/0_0.jpeg").status_code == 200  # tiles still served


# --------------------------------------------------------------------------- slide fingerprints (item 4)

def _zero_middle_tile(src: Path, dst: Path) -> Path:
    """A copy of ``src`` with the stored bytes of one level-0 tile in the middle of the file zeroed
    (same size, same first and last 64 KiB)."""
    import tifffile

    shutil.copyfile(src, dst)
    with tifffile.TiffFile(dst) as tf:
        page = tf.pages[0]
        offsets, counts = page.dataoffsets, page.databytecounts
    size = dst.stat().st_size
    i = min(range(len(offsets)), key=lambda k: abs(offsets[k] + counts[k] // 2 - size // 2))
    assert 65536 < offsets[i] and offsets[i] + counts[i] < size - 65536
    with open(dst, "r+b") as f:
        f.seek(offsets[i])
        f.write(bytes(counts[i]))
    return dst


def test_a_copy_with_a_zeroed_tile_has_another_fingerprint(heatmap_out, tmp_path):
    from slidekit.slides.identity import legacy_fingerprint, same_slide, slide_fingerprint

    slide = heatmap_out["slide"]
    bad = _zero_middle_tile(slide, tmp_path / "s.tif")
    assert slide_fingerprint(slide).startswith("v2:")
    assert slide_fingerprint(bad) != slide_fingerprint(slide)
    assert legacy_fingerprint(bad) == legacy_fingerprint(slide)  # what the old form could not tell
    # either form of a record is accepted for the right file; the new form tells the copy apart
    assert same_slide(slide_fingerprint(slide), slide) and same_slide(legacy_fingerprint(slide), slide)
    assert not same_slide(slide_fingerprint(slide), bad)
    assert not same_slide(None, slide) and not same_slide("v9:0123456789abcdef", slide)


def test_a_damaged_copy_is_refused_by_the_intact_slides_output_folder(heatmap_out, tmp_path):
    from slidekit.base.errors import OutputError
    from slidekit.infer.predictor import heatmap_slide

    out = tmp_path / "OUT"
    shutil.copytree(heatmap_out["out"], out)
    (tmp_path / "copy").mkdir()
    bad = _zero_middle_tile(heatmap_out["slide"], tmp_path / "copy" / "s.tif")
    with pytest.raises(OutputError, match="holds the results of another slide"):
        heatmap_slide(bad, out, model="hematoxylin", workers=0, progress=False, min_tissue=0.1, device="cpu")


def test_an_output_folder_with_an_old_fingerprint_still_belongs_to_its_slide(heatmap_out, tmp_path):
    from slidekit.base.errors import OutputError
    from slidekit.base.outputs import MARKER, OutputDir
    from slidekit.slides.identity import legacy_fingerprint, slide_fingerprint

    slide = heatmap_out["slide"]
    out = tmp_path / "OUT"
    shutil.copytree(heatmap_out["out"], out)
    marker = json.loads((out / MARKER).read_text())
    marker["slide_id"] = legacy_fingerprint(slide)  # as written before the middle was sampled
    (out / MARKER).write_text(json.dumps(marker))
    d = OutputDir(out, slide, slide_fingerprint(slide))
    d.claim("heatmap.zarr")
    assert json.loads((out / MARKER).read_text())["slide_id"] == slide_fingerprint(slide)  # brought up to date
    (out / MARKER).write_text(json.dumps(marker))
    other = synthetic_slide(tmp_path / "o.tif", width=1024, height=768, tissue_box=(256, 128, 512, 384), seed=3)
    with pytest.raises(OutputError, match="another slide"):
        OutputDir(out, other, slide_fingerprint(other))


# --------------------------------------------------------------------------- hand-edited or foreign locks (item 5)

@pytest.fixture(scope="module")
def two_slides(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("locks")
    return [synthetic_slide(root / f"{n}.tif", width=1024, height=768, tissue_box=(256, 128, 512, 384), seed=i)
            for i, n in enumerate(("a", "b"))]


def _lock(folder: Path, pid: int, host: str | None = None) -> Path:
    import socket

    folder.mkdir(parents=True, exist_ok=True)
    p = folder / ".slidekit.lock"
    p.write_text(json.dumps({"host": host or socket.gethostname(), "pid": pid, "token": "t", "created": 0}))
    return p


def test_a_lock_with_an_absurd_pid_is_taken_over_and_the_cohort_goes_on(two_slides, tmp_path):
    from slidekit.base.locks import is_stale, pid_alive, read_lock
    from slidekit.cohort.run import run_cohort

    out = tmp_path / "OUT"
    lock = _lock(out / "a", 2**40)
    assert not pid_alive(2**40) and is_stale(read_lock(lock))
    rows = {r["id"]: r for r in run_cohort("tissue", [str(s) for s in two_slides], out, progress=False)}
    assert rows["a"]["status"] == "done" and rows["b"]["status"] == "done", rows


def test_a_symlinked_lock_is_refused_in_one_line_without_reading_it(two_slides, tmp_path):
    import time

    from slidekit.base.errors import LockedError
    from slidekit.base.locks import OutputLock
    from slidekit.cohort.run import run_cohort

    out = tmp_path / "OUT"
    (out / "a").mkdir(parents=True)
    (out / "a" / ".slidekit.lock").symlink_to("/dev/zero")
    t0 = time.monotonic()
    with pytest.raises(LockedError, match="symbolic link"):
        OutputLock(out / "a").acquire()
    rows = {r["id"]: r for r in run_cohort("tissue", [str(s) for s in two_slides], out, progress=False)}
    assert time.monotonic() - t0 < 60
    assert rows["a"]["status"] == "failed" and "symbolic link" in rows["a"]["error"], rows
    assert rows["b"]["status"] == "done"  # the next slide is processed
    assert (out / "a" / ".slidekit.lock").is_symlink()  # refused, never followed or removed


def test_a_heartbeat_far_in_the_future_is_stale_and_said(two_slides, tmp_path):
    import os
    import time

    from slidekit.base.errors import SlidekitWarning
    from slidekit.base.locks import OutputLock, describe, read_lock, stale_reason
    from slidekit.cohort.run import run_cohort

    out = tmp_path / "OUT"
    lock = _lock(out / "a", 4242, host="another-node")
    future = time.time() + 3600
    os.utime(lock, (future, future))
    rec = read_lock(lock)
    assert "in the future" in stale_reason(rec) and "in the future" in describe(rec)
    rows = {r["id"]: r for r in run_cohort("tissue", [str(s) for s in two_slides], out, progress=False)}
    assert rows["a"]["status"] == "done", rows  # not "being processed" on every rerun
    os.utime(_lock(out / "c", 4242, host="another-node"), (future, future))
    with pytest.warns(SlidekitWarning, match="in the future"):
        with OutputLock(out / "c") as held:
            assert "future" in held.took_over["stale_reason"]
    near = time.time() + 60  # a small skew is not a takeover
    os.utime(_lock(out / "d", 4242, host="another-node"), (near, near))
    assert stale_reason(read_lock(out / "d" / ".slidekit.lock")) is None


def test_an_oversized_lock_file_is_read_only_in_part(tmp_path):
    from slidekit.base.locks import MAX_LOCK_BYTES, read_lock

    p = tmp_path / ".slidekit.lock"
    p.write_bytes(b"{" + b" " * (10 * MAX_LOCK_BYTES))
    rec = read_lock(p)
    assert set(rec) == {"heartbeat_age"}  # judged by its age alone


# --------------------------------------------------------------------------- integer weights (item 6)

def test_integer_weights_are_refused_in_one_line(heatmap_out, tmp_path):
    import torch
    import torchvision

    sd = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path / "r18_int64.pth"
    torch.save({k: v.to(torch.int64) for k, v in sd.items()}, path)
    r = _cli("embed", str(heatmap_out["slide"]), "--model", "resnet18", "--weights", str(path),
             "--out", str(tmp_path / "emb.zarr"), "--device", "cpu", "-q")
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code != 0 and len(lines) == 1, r.output
    assert "r18_int64.pth" in lines[0] and "not floating point" in lines[0] and "Traceback" not in r.output
    from slidekit.models.weights import read_state_dict

    ok = tmp_path / "r18.pth"
    torch.save(sd, ok)  # float weights with their int64 num_batches_tracked load as before
    assert set(read_state_dict(ok)) == set(sd)


# --------------------------------------------------------------------------- absurd sizes (item 8)

@pytest.fixture(scope="module")
def mpp_slides(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("mpp")
    box = (256, 128, 512, 384)
    return {"ok": synthetic_slide(root / "ok.tif", width=1024, height=768, tissue_box=box),
            "huge_mpp": synthetic_slide(root / "huge_mpp.tif", width=1024, height=768, tissue_box=box, mpp=9e9)}


def _one_line_naming(r, name: str, says: str) -> None:
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code != 0 and "Traceback" not in r.output, r.output
    assert len(lines) == 1 and name in lines[0] and says in lines[0], r.output


def test_a_slide_with_an_absurd_metadata_mpp_is_one_line(mpp_slides, tmp_path):
    r = _cli("tile", str(mpp_slides["huge_mpp"]), "--out", str(tmp_path / "g.npz"), "-q")
    _one_line_naming(r, "huge_mpp.tif", "implausible")
    from slidekit.base.errors import MissingMPPError
    from slidekit.slides.slide import open_slide

    with open_slide(mpp_slides["huge_mpp"], require_mpp=False) as s:  # still opens for a look (info, viewer)
        assert s.mpp is None and s.metadata_mpp[0] == pytest.approx(9e9)
        with pytest.raises(MissingMPPError, match="implausible"):
            s.read_whole(100.0)
    with open_slide(mpp_slides["huge_mpp"], override_mpp=0.5) as s:
        assert s.mpp == (0.5, 0.5)


def test_an_absurd_tile_mpp_is_one_line_before_any_allocation(mpp_slides, tmp_path):
    r = _cli("tile", str(mpp_slides["ok"]), "--tile-mpp", "1e-6", "--out", str(tmp_path / "g.npz"), "-q")
    _one_line_naming(r, "ok.tif", "outside 0.001-1000 µm/px")


@pytest.mark.parametrize("mpp, size, says", [(0.01, 16, "less than one pixel"),
                                              (500.0, 256, "at the level it is read from"),
                                              (1e4, 256, "outside 0.001-1000")])
def test_tile_geometry_is_checked_against_the_slide(mpp_slides, mpp, size, says):
    from slidekit.base.errors import ConfigError
    from slidekit.regions.tiling import TileGrid
    from slidekit.slides.slide import open_slide

    with open_slide(mpp_slides["ok"]) as s:
        with pytest.raises(ConfigError, match=says) as e:
            TileGrid.from_slide(s, mpp=mpp, size=size, min_tissue=0)
        assert "ok.tif" in str(e.value)
        assert len(TileGrid.from_slide(s, mpp=0.5, size=256, min_tissue=0)) == 12


def test_an_absurd_given_mpp_is_refused(mpp_slides):
    from slidekit.base.errors import SlideError
    from slidekit.slides.slide import open_slide

    for kw in ({"override_mpp": 1e-6}, {"mpp": 9e9}):
        with pytest.raises(SlideError, match="must lie within"):
            open_slide(mpp_slides["ok"], **kw)
