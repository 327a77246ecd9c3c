"""Stop means stop: Ctrl-C (SIGINT to the whole process group, as a terminal sends it) or SIGTERM on a
cohort run starts no new slide, interrupts the running ones (recorded ``interrupted``, resumable),
writes ``cohort.csv`` and exits 130 within seconds; a second Ctrl-C ends at once."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import synthetic_slide

from slidekit.cohort.ledger import Ledger

SLIDEKIT = [sys.executable, "-m", "slidekit"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> list[Path]:
    """Five slides each taking a worker several seconds (so a run lasts well past the signal)."""
    root = tmp_path_factory.mktemp("stop")
    return [synthetic_slide(root / f"s{i}.tif", width=3072, height=3072, tissue_box=(256, 256, 2560, 2560), seed=i)
            for i in range(5)]


def _records(out: Path) -> list[dict]:
    p = out / "cohort.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines()] if p.exists() else []


def _start(slides: list[Path], out: Path, jobs: int, *extra: str) -> tuple[subprocess.Popen, float]:
    """Start the run in its own process group; return once ``jobs`` slides are running (plus a second)."""
    cmd = SLIDEKIT + ["heatmap", *map(str, slides), "--out", str(out), "--device", "cpu", "--jobs", str(jobs), "-q",
                      *extra]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 180
    while time.time() < deadline:
        if sum(r["status"] == "running" for r in _records(out)) >= jobs:
            time.sleep(1.0)
            return proc, time.time()
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("the slides never started")


def _check_stopped(out: Path, slides: list[Path], t_signal: float) -> None:
    recs = _records(out)
    started = {r["id"] for r in recs if r["status"] == "running"}
    finished = {r["id"] for r in recs if r["status"] == "done"}
    late = [r for r in recs if r["status"] == "running" and r["time"] > t_signal]
    assert not late, f"a slide started after the signal: {late}"
    state = Ledger(out).state()
    assert "running" not in {r["status"] for r in state.values()}, state
    interrupted = [k for k, r in state.items() if r["status"] == "interrupted"]
    assert set(interrupted) == started - finished and interrupted, state
    for k in interrupted:  # a rerun takes them again: nothing of theirs looks finished (no summary)
        assert not (out / k / "summary.json").exists()
        # kept for the rerun: the unfinished store's chunks, or the store it had published before the
        # signal came while it wrote the overlay and GeoJSON (the rerun reuses it and writes the rest)
        assert (out / k / "heatmap.zarr.part").is_dir() or (out / k / "heatmap.zarr").is_dir()
        assert not (out / k / ".slidekit.lock").exists()
    with open(out / "cohort.csv", newline="") as f:
        rows = {r["id"]: r for r in csv.DictReader(f)}
    assert len(rows) == len(slides)
    for k in interrupted:
        assert rows[k]["status"] == "skipped" and rows[k]["note"].startswith("interrupted"), rows[k]
    assert all(r["status"] in ("done", "skipped") for r in rows.values())


@pytest.mark.parametrize("jobs", [2, 1])
def test_ctrl_c_stops_the_cohort_and_a_rerun_finishes_it(slides, tmp_path, jobs):
    out = tmp_path / "OUT"
    proc, t_signal = _start(slides, out, jobs)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the driver and its workers
    _, err = proc.communicate(timeout=60)
    took = time.time() - t_signal
    assert proc.returncode == 130, err
    assert took < 12, f"took {took:.1f} s to stop"
    assert "Traceback" not in err and "stopping" in err, err
    _check_stopped(out, slides, t_signal)
    # The rerun takes the interrupted slides and those never started, and finishes everything.
    rerun = subprocess.run(SLIDEKIT + ["heatmap", *map(str, slides), "--out", str(out), "--device", "cpu",
                                       "--jobs", "2", "-q"], env=ENV, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    with open(out / "cohort.csv", newline="") as f:
        assert [r["status"] for r in csv.DictReader(f)] == ["done"] * len(slides)


def test_sigterm_stops_too_and_a_second_ctrl_c_ends_at_once(slides, tmp_path):
    out = tmp_path / "OUT"
    proc, t_signal = _start(slides, out, 2)
    os.kill(proc.pid, signal.SIGTERM)  # the driver alone (scancel, a time limit)
    time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGINT)  # impatient: the second signal ends the run at once
    _, err = proc.communicate(timeout=60)
    assert proc.returncode in (130, -signal.SIGINT), err  # a shell shows both as 130
    assert time.time() - t_signal < 5
    assert not [r for r in _records(out) if r["status"] == "running" and r["time"] > t_signal]
    # No worker is left behind.
    time.sleep(0.5)
    ps = subprocess.run(["ps", "-o", "pgid=,stat=,pid=,args=", "-e"], capture_output=True, text=True).stdout
    left = [line for line in ps.splitlines() if line.split()[0] == str(proc.pid) and "Z" not in line.split()[1]]
    assert not left, left


def test_ctrl_c_stops_a_ray_cohort(slides, tmp_path):
    pytest.importorskip("ray")
    out = tmp_path / "OUT"
    proc, t_signal = _start(slides, out, 2, "--engine", "ray")
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert time.time() - t_signal < 20, "Ray's own shutdown included"
    assert "Traceback" not in err, err
    _check_stopped(out, slides, t_signal)
