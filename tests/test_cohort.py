"""Cohorts: manifests, the ledger, reruns, bad slides among good ones, killed workers, concurrent
runners and shards, on the local engine and on a local Ray runtime."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner
from conftest import synthetic_slide

from slidekit.base.errors import ManifestError
from slidekit.cli import main
from slidekit.cohort.ledger import Ledger
from slidekit.cohort.manifest import read_slides, shard, unique_ids
from slidekit.cohort.run import run_cohort

FAST = dict(workers=0, device="cpu")
SLIDEKIT = [sys.executable, "-m", "slidekit"]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> list[Path]:
    """Four small slides (two share a file stem) of different sizes."""
    root = tmp_path_factory.mktemp("cohort")
    return [synthetic_slide(root / "a" / "slide.tif", width=1024, height=768, tissue_box=(256, 128, 512, 384)),
            synthetic_slide(root / "b" / "slide.tif", width=1024, height=768, tissue_box=(128, 128, 640, 512), seed=1),
            synthetic_slide(root / "c.tif", width=1536, height=1024, tissue_box=(256, 256, 1024, 512), seed=2),
            synthetic_slide(root / "d.tif", width=1024, height=1024, tissue_box=(128, 256, 768, 512), seed=3)]


def _csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _heatmaps(out: Path) -> dict[str, dict[str, np.ndarray]]:
    res = {}
    for store in sorted(out.glob("*/heatmap.zarr")):
        g = zarr.open_group(str(store), mode="r")
        res[store.parent.name] = {k: np.asarray(g[k][:]) for k in ("prob", "coverage")}
    return res


def _done_counts(out: Path) -> Counter:
    return Counter(r["id"] for r in Ledger(out).records() if r["status"] == "done")


# -- manifests ------------------------------------------------------------------------------------

def test_ids_unique_for_colliding_stems_and_stable_shards(cohort):
    ids = [s.id for s in read_slides([str(p) for p in cohort])]
    assert ids == ["a_slide", "b_slide", "c", "d"]
    assert unique_ids([Path("x/a/s.svs"), Path("y/a/s.svs")]) == ["x_a_s", "y_a_s"]
    slides = read_slides([str(p) for p in cohort])
    parts = [shard(slides, f"{i}/3") for i in range(3)]
    assert sorted(s.id for p in parts for s in p) == sorted(ids)  # a partition
    assert [s.id for s in shard(slides, "1/3")] == [s.id for s in parts[1]]  # deterministic
    with pytest.raises(ManifestError, match="i/N"):
        shard(slides, "3/3")


def test_manifest_columns_relative_paths_and_extra_columns(cohort, tmp_path):
    m = tmp_path / "m.csv"
    rel = os.path.relpath(cohort[2], tmp_path)
    m.write_text(f"slide,id,slide_mpp,diagnosis\n{rel},case-7,0.25,LUAD\n{cohort[3]},,,LUSC\n")
    s = read_slides(m)
    assert [x.id for x in s] == ["case-7", "d"]
    assert s[0].slide.resolve() == cohort[2].resolve() and s[0].slide_mpp == 0.25 and s[1].slide_mpp is None
    assert s[0].extra == {"diagnosis": "LUAD"}


@pytest.mark.parametrize("text,message", [
    ("path,id\nx.svs,a\n", "no 'slide' column"),
    ("", "empty"),
    ("slide\n", "lists no slides"),
    ("slide,id\n{a},same\n{b},same\n", "duplicate output id"),
    ("slide\n{a}\nmissing_1.svs\nmissing_2.svs\n", "2 slide path\\(s\\) do not exist: missing_1.svs"),
    ("slide,slide_mpp\n{a},zero\n", "not a positive number"),
    ("slide,status\n{a},tumour\n", "column\\(s\\) status would collide"),
    ("slide,regions,error,diagnosis\n{a},3,none,LUAD\n", "regions, error would collide"),
])
def test_bad_manifest_is_one_line_before_any_work(cohort, tmp_path, text, message):
    m = tmp_path / "m.csv"
    m.write_text(text.format(a=cohort[0], b=cohort[1]))
    out = tmp_path / "OUT"
    r = CliRunner().invoke(main, ["heatmap", "--manifest", str(m), "--out", str(out), "--quiet"])
    assert r.exit_code != 0
    assert len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output
    assert ManifestError.__name__ and __import__("re").search(message, r.output), r.output
    assert not out.exists()  # nothing started


def test_skip_missing_fails_the_missing_slides_own_row(cohort, tmp_path):
    """--skip-missing: a manifest row whose slide is gone fails as that slide (so every Slurm array
    task still runs its share); without it the manifest is refused before any work (test above)."""
    m = tmp_path / "m.csv"
    m.write_text(f"slide\n{cohort[0]}\ngone.svs\n")
    out = tmp_path / "OUT"
    r = CliRunner().invoke(main, ["tissue", "--manifest", str(m), "--out", str(out), "--skip-missing", "--quiet"])
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    rows = {row["id"]: row for row in _csv(out / "cohort.csv")}
    assert rows["slide"]["status"] == "done"
    assert rows["gone"]["status"] == "failed" and "not found" in rows["gone"]["error"]
    assert "slidekit: failed: gone:" in r.output


# -- runs, reruns, bad slides ---------------------------------------------------------------------

def test_bad_slides_among_good_ones_and_reruns(cohort, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "notaslide.svs").write_text("hello")
    truncated = bad / "truncated.tif"
    truncated.write_bytes(cohort[2].read_bytes()[:5000])
    missing = bad / "missing.svs"
    items = [str(p) for p in cohort[:2]] + [str(bad / "notaslide.svs"), str(truncated), str(missing)]
    out = tmp_path / "OUT"
    r = CliRunner().invoke(main, ["heatmap", *items, "--out", str(out), "--device", "cpu", "--quiet"])
    assert r.exit_code == 1 and "Traceback" not in r.output
    for i in ("notaslide", "truncated", "missing"):  # --quiet still names each failed slide, one line each
        assert sum(line.startswith(f"slidekit: failed: {i}:") for line in r.output.splitlines()) == 1
    rows = {row["id"]: row for row in _csv(out / "cohort.csv")}
    assert [rows[i]["status"] for i in ("a_slide", "b_slide")] == ["done", "done"]
    for i, word in (("notaslide", "notaslide.svs"), ("truncated", "truncated"), ("missing", "not found")):
        assert rows[i]["status"] == "failed" and word in rows[i]["error"] and "\n" not in rows[i]["error"]
        assert rows[i]["attempts"] == "1"
    assert int(rows["a_slide"]["tiles"]) > 0 and rows["a_slide"]["seconds"]
    summary = json.loads((out / "a_slide" / "summary.json").read_text())
    assert summary["tiles"] == int(rows["a_slide"]["tiles"])

    # A rerun does nothing new: done slides are skipped, failed ones stay failed (exit 1).
    again = run_cohort("heatmap", items, out, progress=False, **FAST)
    assert {r["id"]: r["status"] for r in again} == {"a_slide": "skipped", "b_slide": "skipped",
                                                     "notaslide": "failed", "truncated": "failed", "missing": "failed"}
    assert _done_counts(out) == Counter({"a_slide": 1, "b_slide": 1})
    # --retry-failed tries them again (a repaired slide now succeeds).
    missing.write_bytes(cohort[3].read_bytes())
    third = run_cohort("heatmap", items, out, retry_failed=True, progress=False, **FAST)
    st = {r["id"]: (r["status"], r.get("attempts")) for r in third}
    assert st["missing"] == ("done", 2) and st["truncated"] == ("failed", 2) and st["a_slide"][0] == "skipped"
    assert _done_counts(out)["a_slide"] == 1


def test_changed_configuration_redoes_slides(cohort, tmp_path):
    out = tmp_path / "OUT"
    run_cohort("heatmap", [str(cohort[2])], out, progress=False, **FAST)
    t = run_cohort("heatmap", [str(cohort[2])], out, threshold=0.3, progress=False, **FAST)
    assert t[0]["status"] == "done" and t[0]["attempts"] == 2
    assert json.loads((out / "c" / "summary.json").read_text())["config"]["threshold"] == 0.3


def test_other_tasks_write_per_slide_folders(cohort, tmp_path):
    t = run_cohort("tissue", [str(p) for p in cohort[2:]], tmp_path / "T", progress=False)
    assert [r["status"] for r in t] == ["done", "done"]
    assert (tmp_path / "T" / "c" / "tissue.geojson").exists() and float(t[0]["area_mm2"]) > 0
    g = run_cohort("tile", [str(cohort[2])], tmp_path / "G", mpp=1.0, size=128, progress=False)
    assert g[0]["tiles"] > 0 and (tmp_path / "G" / "c" / "grid.npz").exists()
    h = run_cohort("heatmap", [str(cohort[2])], tmp_path / "H", progress=False, **FAST)
    f = run_cohort("features", [str(tmp_path / "H")], tmp_path / "F", progress=False)
    assert f[0]["id"] == "c" and f[0]["status"] == "done" and "size_class" in f[0]
    assert h[0]["tiles"] > 0
    # The heatmap cohort's OUT is a cohort by itself: no cohort option needed.
    r = CliRunner().invoke(main, ["features", str(tmp_path / "H"), "--out", str(tmp_path / "F2"), "--quiet"])
    assert r.exit_code == 0, r.output
    assert [row["id"] for row in _csv(tmp_path / "F2" / "cohort.csv")] == ["c"]


# -- faults: killed workers, concurrent runners ---------------------------------------------------

def _wait_for_lock(out: Path, exclude_pid: int, timeout: float = 120) -> int:
    """The pid of a worker in the middle of a slide: it holds the slide's lock and its `running`
    record is in the ledger (not ``exclude_pid``)."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        for lock in out.glob("*/.slidekit.lock"):
            try:
                pid = json.loads(lock.read_text())["pid"]
            except (OSError, ValueError, KeyError):
                continue
            started = {(r["id"], r["pid"]) for r in Ledger(out).records() if r["status"] == "running"}
            if pid != exclude_pid and (lock.parent.name, pid) in started:
                return pid
        time.sleep(0.01)
    raise AssertionError("no worker took a slide")


def test_kill_minus_9_of_a_local_worker(cohort, tmp_path):
    serial = tmp_path / "serial"
    run_cohort("heatmap", [str(p) for p in cohort], serial, progress=False, **FAST)
    out = tmp_path / "OUT"
    cmd = SLIDEKIT + ["heatmap", *map(str, cohort), "--out", str(out), "--device", "cpu", "--jobs", "2", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    driver = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    victim = _wait_for_lock(out, driver.pid)
    os.kill(victim, signal.SIGKILL)
    _, err = driver.communicate(timeout=300)
    assert "Traceback" not in err
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    rows = _csv(out / "cohort.csv")
    assert [r["status"] for r in rows] == ["done"] * 4
    assert set(_done_counts(out).values()) == {1}  # no slide done twice
    assert any(int(r["attempts"]) == 2 for r in rows)  # the killed attempt was counted
    a, b = _heatmaps(serial), _heatmaps(out)
    assert a.keys() == b.keys() and len(a) == 4
    for k in a:
        for name in ("prob", "coverage"):
            np.testing.assert_array_equal(a[k][name], b[k][name])


def test_two_runners_with_overlapping_shards_process_each_slide_once(cohort, tmp_path):
    out = tmp_path / "OUT"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    base = SLIDEKIT + ["heatmap", *map(str, cohort), "--out", str(out), "--device", "cpu", "--quiet"]
    procs = [subprocess.Popen(base + extra, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for extra in (["--shard", "0/2"], [])]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert "Traceback" not in err
    assert _done_counts(out) == Counter({"a_slide": 1, "b_slide": 1, "c": 1, "d": 1})
    # A final no-op rerun sees every slide done.
    assert all(r["status"] == "skipped" for r in run_cohort("heatmap", [str(p) for p in cohort], out,
                                                            progress=False, **FAST))


def test_ray_engine_survives_a_killed_worker(cohort, tmp_path):
    pytest.importorskip("ray")
    serial = tmp_path / "serial"
    run_cohort("heatmap", [str(p) for p in cohort], serial, progress=False, **FAST)
    out = tmp_path / "OUT"
    result = {}

    def go():
        result["table"] = run_cohort("heatmap", [str(p) for p in cohort], out, engine="ray", jobs=2,
                                     progress=False, **FAST)

    t = threading.Thread(target=go)
    t.start()
    victim = _wait_for_lock(out, os.getpid(), timeout=180)
    os.kill(victim, signal.SIGKILL)
    t.join(timeout=300)
    assert not t.is_alive()
    assert [r["status"] for r in result["table"]] == ["done"] * 4
    assert set(_done_counts(out).values()) == {1}
    assert any(r["pid"] == victim for r in Ledger(out).records() if r["status"] == "running")
    a, b = _heatmaps(serial), _heatmaps(out)
    for k in a:
        np.testing.assert_array_equal(a[k]["prob"], b[k]["prob"])


def test_ray_missing_gives_one_line(monkeypatch, cohort, tmp_path):
    import builtins

    real = builtins.__import__

    def no_ray(name, *a, **k):
        if name == "ray":
            raise ImportError("no ray")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    r = CliRunner().invoke(main, ["heatmap", str(cohort[0]), "--out", str(tmp_path / "O"), "--engine", "ray"])
    assert r.exit_code != 0 and "pip install 'slidekit[ray]'" in r.output and "Traceback" not in r.output


def test_every_per_slide_command_takes_a_cohort(cohort, tmp_path):
    folder = cohort[2].parent  # holds c.tif and d.tif (and the a/, b/ subfolders, not scanned)

    def run(*args):
        r = CliRunner().invoke(main, [*args, "--quiet"])
        assert r.exit_code == 0, r.output
        return _csv(Path(args[args.index("--out") + 1]) / "cohort.csv")

    rows = run("tissue", str(folder), "--out", str(tmp_path / "T"))
    assert [r["id"] for r in rows] == ["c", "d"] and all(float(r["area_mm2"]) > 0 for r in rows)
    rows = run("tile", str(cohort[2]), str(cohort[3]), "--out", str(tmp_path / "G"), "--tile-mpp", "2",
               "--tile-size", "64")
    assert all(int(r["tiles"]) > 0 for r in rows) and (tmp_path / "G" / "d" / "grid.npz").exists()
    run("heatmap", str(folder / "*.tif"), "--out", str(tmp_path / "H"), "--device", "cpu")
    rows = run("features", str(tmp_path / "H"), "--out", str(tmp_path / "F"), "--jobs", "1")
    assert [r["id"] for r in rows] == ["c", "d"] and "size_class" in rows[0]
    assert (tmp_path / "F" / "c" / "features.csv").exists()


def test_cohort_embed_writes_one_store_per_slide(cohort, tmp_path):
    import torch

    from slidekit.models.checkpoint import save_checkpoint
    from slidekit.models.networks import ResNetClassifier
    from slidekit.models.spec import ModelSpec

    torch.manual_seed(0)
    spec = ModelSpec(arch="resnet-encoder", task="embedding", classes=[], patch_size=32, mpp=4.0,
                     mean=(0.5,) * 3, std=(0.5,) * 3, activation="none", trainer="simclr")
    model = save_checkpoint(tmp_path / "enc.pt", ResNetClassifier("resnet18", 0), spec)
    r = CliRunner().invoke(main, ["embed", str(cohort[2]), str(cohort[3]), "--model", str(model), "--out",
                                  str(tmp_path / "E"), "--device", "cpu", "--clusters", "2", "--geojson", "yes",
                                  "--quiet"])
    assert r.exit_code == 0, r.output
    rows = _csv(tmp_path / "E" / "cohort.csv")
    assert [int(x["dim"]) for x in rows] == [512, 512]
    assert (tmp_path / "E" / "d" / "embeddings.zarr").is_dir() and (tmp_path / "E" / "d" / "clusters.geojson").exists()
    from slidekit.slidelevel.embed import open_embeddings
    from slidekit.slidelevel.feature_store import read_features

    for sid in ("c", "d"):  # the cohort path writes each slide's HDF5 feature file
        bag = read_features(tmp_path / "E" / sid / "features.h5")
        emb = open_embeddings(tmp_path / "E" / sid / "embeddings.zarr")
        assert np.array_equal(bag.coords, emb.coords) and np.array_equal(bag.features, emb.features[:])
    # d as a version before the feature store left it: done, its outputs listed without features.h5
    ledger = Ledger(tmp_path / "E")
    rec = ledger.state(only="d")["d"]
    (tmp_path / "E" / "d" / "features.h5").unlink()
    ledger.append(**{k: v for k, v in rec.items() if k not in ("time", "host", "pid", "attempts", "outputs")},
                  outputs={k: v for k, v in rec["outputs"].items() if k != "features.h5"})
    zarr_rows = (tmp_path / "E" / "d" / "embeddings.zarr" / "zarr.json").stat().st_mtime_ns
    r = CliRunner().invoke(main, ["embed", str(cohort[2]), str(cohort[3]), "--model", str(model), "--out",
                                  str(tmp_path / "E"), "--device", "cpu", "--clusters", "2", "--geojson", "yes",
                                  "--quiet"])
    assert r.exit_code == 0, r.output
    rows = {x["id"]: x for x in _csv(tmp_path / "E" / "cohort.csv")}
    assert rows["c"]["note"] == "done earlier"
    assert rows["d"]["status"] == "done" and "features.h5 missing" in rows["d"]["note"]
    assert np.array_equal(read_features(tmp_path / "E" / "d" / "features.h5").coords, emb.coords)
    assert (tmp_path / "E" / "d" / "embeddings.zarr" / "zarr.json").stat().st_mtime_ns == zarr_rows  # kept


def test_one_worker_per_listed_gpu_each_seeing_only_its_gpu(cohort, tmp_path, monkeypatch):
    # device="cpu": no GPU is needed to check that each worker was given exactly one of the listed ids.
    monkeypatch.setattr("slidekit.cohort.run.cuda_device_count", lambda: 8)
    t = run_cohort("heatmap", [str(p) for p in cohort], tmp_path / "OUT", gpus="3,5", progress=False, **FAST)
    assert [r["status"] for r in t] == ["done"] * 4
    running = [r for r in Ledger(tmp_path / "OUT").records() if r["status"] == "running"]
    by_pid = {}
    for r in running:
        by_pid.setdefault(r["pid"], set()).add(r["gpu"])
    assert all(len(g) == 1 for g in by_pid.values())  # a worker keeps its GPU
    assert set().union(*by_pid.values()) <= {"3", "5"} and len(by_pid) <= 2


def test_gpus_without_cuda_is_one_line(cohort, tmp_path, monkeypatch):
    monkeypatch.setattr("slidekit.cohort.run.cuda_device_count", lambda: 0)
    r = CliRunner().invoke(main, ["tissue", str(cohort[2]), str(cohort[3]), "--out", str(tmp_path / "O"),
                                  "--gpus", "0", "--quiet"])
    assert r.exit_code != 0 and "no CUDA GPU" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "O" / "cohort.jsonl").exists()
    monkeypatch.setattr("slidekit.cohort.run.cuda_device_count", lambda: 2)
    with pytest.raises(Exception, match="sees only 2 GPU"):
        run_cohort("tissue", [str(cohort[2])], tmp_path / "P", gpus="2", progress=False)


def test_gpu_indices_count_among_the_visible_gpus(monkeypatch):
    from slidekit.base.errors import ConfigError
    from slidekit.cohort.engines import physical_gpus

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert physical_gpus([0, 1]) == ["0", "1"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")  # e.g. what Slurm gave this job
    assert physical_gpus([0, 1]) == ["4", "6"]
    with pytest.raises(ConfigError, match="sees only 2 GPU"):
        physical_gpus([2])


# -- what "done" means on a rerun: the outputs and the slide that run saw (issues 19.3, 25.1) ------

def test_rerun_checks_outputs_and_the_slide_file(cohort, tmp_path):
    src = tmp_path / "slides"
    src.mkdir()
    c, d = src / "c.tif", src / "d.tif"
    c.write_bytes(cohort[2].read_bytes())
    d.write_bytes(cohort[3].read_bytes())
    out = tmp_path / "OUT"
    first = run_cohort("tissue", [str(c), str(d)], out, progress=False)
    assert [r["status"] for r in first] == ["done", "done"]
    again = run_cohort("tissue", [str(c), str(d)], out, progress=False)
    assert [r["note"] for r in again] == ["done earlier"] * 2
    # An output deleted and another truncated: both slides are redone, and the table says why.
    (out / "c" / "tissue.geojson").unlink()
    (out / "d" / "tissue.json").write_text("{}")
    third = {r["id"]: r for r in run_cohort("tissue", [str(c), str(d)], out, progress=False)}
    assert third["c"]["status"] == "done" and "tissue.geojson missing" in third["c"]["note"]
    assert third["d"]["status"] == "done" and "tissue.json changed" in third["d"]["note"]
    assert (out / "c" / "tissue.geojson").exists()
    # A replaced slide file (same path, another scan) is redone.
    c.write_bytes(cohort[0].read_bytes())
    fourth = {r["id"]: r for r in run_cohort("tissue", [str(c), str(d)], out, progress=False)}
    assert fourth["c"]["status"] == "done" and "slide file changed" in fourth["c"]["note"]
    assert fourth["d"]["note"] == "done earlier"
    rows = {r["id"]: r for r in _csv(out / "cohort.csv")}
    assert "slide file changed" in rows["c"]["note"]


def test_a_done_record_written_by_hand_is_not_done(cohort, tmp_path):
    out = tmp_path / "OUT"
    run_cohort("tissue", [str(cohort[2])], out, progress=False)
    key = Ledger(out).state()["c"]["config"]
    Ledger(out).append(id="d", slide=str(cohort[3]), status="done", attempt=1, config=key,
                       figures={"area_mm2": 123.0})
    t = {r["id"]: r for r in run_cohort("tissue", [str(cohort[2]), str(cohort[3])], out, progress=False)}
    assert t["d"]["status"] == "done" and "lists no outputs" in t["d"]["note"]
    assert float(t["d"]["area_mm2"]) != 123.0 and t["c"]["note"] == "done earlier"


# -- malformed ledger records and locks (issue 19.5, 19.7) -----------------------------------------

def test_malformed_ledger_record_and_locks_fail_or_retake_one_slide(cohort, tmp_path):
    items = [str(p) for p in cohort]
    out = tmp_path / "OUT"
    run_cohort("tissue", items, out, progress=False)
    key = Ledger(out).state()["c"]["config"]
    Ledger(out).append(id="a_slide", slide=items[0], status="done", config=key, figures=[1, 2])
    (out / "b_slide" / ".slidekit.lock").write_text("[1, 2]")
    (out / "c" / ".slidekit.lock").write_text(json.dumps({"host": os.uname().nodename, "pid": 0, "token": "x"}))
    (out / "d" / ".slidekit.lock").mkdir()
    (out / "d" / "tissue.geojson").unlink()  # so that d is redone and must take its lock
    (out / "c" / "tissue.geojson").unlink()
    (out / "b_slide" / "tissue.geojson").unlink()
    with pytest.warns(Warning, match="cohort.jsonl"):
        t = {r["id"]: r for r in run_cohort("tissue", items, out, progress=False, retry_failed=True)}
    assert t["a_slide"]["status"] in ("done", "skipped")
    assert t["d"]["status"] == "failed" and ".slidekit.lock" in t["d"]["error"] and "directory" in t["d"]["error"]
    # b's lock of the wrong shape is judged by its age (fresh: not taken over); c's pid 0 is taken over.
    assert t["b_slide"]["status"] == "skipped" and "being processed" in t["b_slide"]["note"]
    assert t["c"]["status"] in ("done", "skipped") and not (out / "c" / ".slidekit.lock").exists()


def test_locks_naming_no_process_are_taken_over(tmp_path):
    from slidekit.base.locks import OutputLock, is_stale, read_lock
    for pid in (0, -1, -12345):
        folder = tmp_path / f"p{pid}"
        folder.mkdir()
        (folder / ".slidekit.lock").write_text(json.dumps({"host": os.uname().nodename, "pid": pid, "token": "t"}))
        assert is_stale(read_lock(folder / ".slidekit.lock"))
        with OutputLock(folder) as lock:
            assert lock.took_over is not None


def test_ledger_path_that_is_a_directory_is_one_line(cohort, tmp_path):
    out = tmp_path / "OUT"
    (out / "cohort.jsonl").mkdir(parents=True)
    r = CliRunner().invoke(main, ["tissue", str(cohort[2]), str(cohort[3]), "--out", str(out), "--quiet"])
    assert r.exit_code != 0 and "cohort.jsonl" in r.output and "directory" in r.output
    assert "Traceback" not in r.output


# -- kill -9 of the driver (issue 19.6) -------------------------------------------------------------

def test_kill_minus_9_of_the_driver_ends_its_workers(cohort, tmp_path):
    out = tmp_path / "OUT"
    cmd = SLIDEKIT + ["heatmap", *map(str, cohort), "--out", str(out), "--device", "cpu", "--jobs", "2", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    driver = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    worker = _wait_for_lock(out, driver.pid)
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait(timeout=30)
    t0 = time.time()
    while time.time() - t0 < 10:
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            break
        with open(f"/proc/{worker}/stat") as f:  # a zombie (reaped by init soon) is gone too
            if f.read().split(")")[-1].split()[0] == "Z":
                break
        time.sleep(0.1)
    else:
        os.kill(worker, signal.SIGKILL)
        raise AssertionError("a worker outlived its killed driver by 10 s")


def test_unprocessed_slides_are_a_note_not_an_error_and_demo_takes_q(cohort, tmp_path):
    run_cohort("tissue", [str(p) for p in cohort], tmp_path / "OUT", shard="0/2", progress=False)
    rows = _csv(tmp_path / "OUT" / "cohort.csv")
    waiting = [r for r in rows if r["note"] == "not processed yet"]
    assert waiting and all(r["status"] == "skipped" and r["error"] == "" for r in waiting)
    r = CliRunner().invoke(main, ["demo", str(tmp_path / "demo.tif"), "-q"])
    assert r.exit_code == 0 and (tmp_path / "demo.tif").exists()
