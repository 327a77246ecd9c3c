"""Cohort benchmark: slides/hour of `run_cohort` serially, on a local process pool and on Ray.

    python benchmarks/cohort.py [--work DIR] [--sizes 16384 14336 ...] [--order largest-first|shuffled]
                                [--modes serial local ray] [--json OUT.json]

Slides: 12 synthetic pyramidal JPEG TIFFs at 0.5 µm/px (``slidekit.slides.demo.write_pyramid``) of mixed
sizes, 4,096² to 16,384² px by default (2 x 2 mm to 8 x 8 mm of glass), each holding one
section with a wobbling outline (about half the slide) filled with scikit-image's IHC image
(colonic glands), mirrored and tiled, so tissue detection and the haematoxylin map find real
structure. They are written once into ``--work`` (default: a temporary folder) and reused when
present. The manifest lists the largest slides first (``--order``; see docs/cohorts.md).

Runs: the built-in ``heatmap`` task (model ``hematoxylin``, DataLoader ``workers=0`` as the CLI
sets in cohort mode) over all slides, each mode in a fresh child process into a fresh OUT:

- ``serial``: engine local, jobs 1 (the slides one after another in the child itself, with torch
  and BLAS threads set to all available CPUs);
- ``local``: engine local, jobs 2 (two spawned worker processes, one CPU's threads each);
- ``ray``: engine ray, jobs 2 (a local Ray runtime of 2 CPUs started inside ``run_cohort``).

Figures per mode, from the child's clock and ``OUT/cohort.jsonl``:

- ``wall_s``: the ``run_cohort`` call (engine start, every slide, the table; not the interpreter
  start and ``import slidekit``, ``process_s`` includes those);
- ``slides_per_hour`` = slides / wall_s * 3600; ``speedup_vs_serial``;
- ``compute_s``: the sum over slides of the ledger's ``seconds`` (one slide's task call in its
  worker);
- ``overhead_s_per_slide`` = (wall_s - compute_s / workers) / slides, with workers = jobs. This
  is the mean idle time of a worker, per slide: engine start (spawning workers or Ray, imports in
  the workers), per-slide bookkeeping (lock, ledger, scheduling), and the tail when one worker
  finishes before the other (load imbalance). ``overhead_parts`` splits it (each averaged over
  the workers, in seconds): ``startup`` (run start to the worker's first ``running`` record),
  ``between`` (a worker's ``done`` record to its next ``running`` record, summed), ``in_slide``
  (``running`` to ``done`` record minus ``seconds``: lock and ledger work), ``tail`` (a worker's
  last ``done`` record to the end of the run), and ``missing`` (when Ray started more or fewer
  worker processes than jobs);
- ``cpu_s`` / ``cores_used``: CPU time of the child and all its descendants (workers, Ray's own
  processes; sampled from /proc every 0.2 s), and that over ``process_s``; ``others_cores``: the
  cores every other process on the machine kept busy meanwhile (/proc/stat busy time minus
  ours), i.e. how shared the machine was;
- ``workers``: per worker process (host:pid) the slides it did, its RSS and peak RSS (MiB) after
  its first and after its last slide (the ledger's ``rss_mb`` / ``peak_rss_mb``), and the ratios
  last/first; ``rss_growth_max`` / ``peak_rss_growth_max`` are the largest ratios over workers;
  the checks ``rss_growth`` / ``peak_rss_growth`` take the largest over every mode.

Targets on a 2-core machine: local >= 1.6x serial, Ray >= 0.9x local, overhead < 0.5 s per slide,
RSS after the last slide <= 1.1x after the first. The machine's load average before and after
each run is recorded (other processes on a shared machine slow every mode).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SLIDE_MPP = 0.5
DEFAULT_SIZES = [16384, 14336, 12288, 10240, 10240, 8192, 8192, 6144, 6144, 4096, 4096, 4096]
TARGETS = {"local_vs_serial": 1.6, "ray_vs_local": 0.9, "overhead_s_per_slide": 0.5, "rss_growth": 1.1,
           "peak_rss_growth": 1.1}


# -- slides ------------------------------------------------------------------------------------

def tissue_texture() -> np.ndarray:
    """The IHC image mirrored into a seamless 1024 x 1024 tile."""
    from skimage import data

    ihc = data.immunohistochemistry()
    row = np.concatenate([ihc, ihc[:, ::-1]], axis=1)
    return np.concatenate([row, row[::-1]], axis=0)


def synthetic_slide(size: int, seed: int) -> np.ndarray:
    """size x size RGB: off-white glass and one section of tiled IHC tissue with a wobbling outline."""
    rng = np.random.default_rng(seed)
    tex = tissue_texture()
    reps = -(-size // tex.shape[0])
    oy, ox = rng.integers(0, tex.shape[0], 2)
    tiled = np.tile(tex, (reps + 1, reps + 1, 1))[oy:oy + size, ox:ox + size]
    rgb = np.full((size, size, 3), 244, np.uint8)
    step = 64  # the outline on a coarse grid, upsampled: cheap for 16k² slides
    n = size // step
    yy, xx = np.mgrid[0:n, 0:n] + 0.5
    cy, cx = n / 2 * rng.uniform(0.95, 1.05), n / 2 * rng.uniform(0.95, 1.05)
    ang = np.arctan2(yy - cy, xx - cx)
    ph = rng.uniform(0, 2 * np.pi, 3)
    radius = 0.40 + 0.05 * np.sin(3 * ang + ph[0]) + 0.03 * np.cos(5 * ang + ph[1]) + 0.02 * np.sin(7 * ang + ph[2])
    coarse = np.hypot((xx - cx) / n, (yy - cy) / n) < radius
    for y in range(n):  # row bands of the full-resolution image
        band = np.repeat(coarse[y], step)
        ys = slice(y * step, (y + 1) * step)
        rgb[ys][:, band] = tiled[ys][:, band]
    return rgb


def make_slides(work: Path, sizes: list[int]) -> tuple[list[Path], float]:
    """Write (or reuse) one slide per size; returns the paths and the seconds spent writing."""
    from slidekit.slides.demo import write_pyramid

    work.mkdir(parents=True, exist_ok=True)
    paths, t0 = [], time.time()
    for i, size in enumerate(sizes):
        path = work / f"slide{i:02d}_{size}.tif"
        if not path.exists():
            write_pyramid(path, synthetic_slide(size, seed=i), SLIDE_MPP)
        paths.append(path)
    return paths, time.time() - t0


def write_manifest(path: Path, slides: list[Path], sizes: list[int], order: str) -> None:
    idx = list(range(len(slides)))
    if order == "largest-first":
        idx.sort(key=lambda i: -sizes[i])
    else:
        np.random.default_rng(0).shuffle(idx)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slide", "id", "size_px"])
        for i in idx:
            w.writerow([str(slides[i]), slides[i].stem, sizes[i]])


# -- one mode, in a child process ------------------------------------------------------------------

MODES = {"serial": ("local", 1), "local": ("local", 2), "ray": ("ray", 2)}


def child(mode: str, manifest: str, out: str) -> None:
    """Run one mode; print one JSON line (start, end, counts)."""
    from slidekit.cohort.run import run_cohort

    engine, jobs = MODES[mode]
    if mode == "serial":  # in this process: give torch and BLAS every available CPU
        from slidekit.base.resources import available_cpus
        from slidekit.cohort.engines import _configure_threads

        _configure_threads(available_cpus())
    t0 = time.time()
    table = run_cohort("heatmap", [manifest], out, engine=engine, jobs=jobs, progress=False,
                       model="hematoxylin", workers=0)
    t1 = time.time()
    print(json.dumps({"t0": t0, "t1": t1, "counts": table.counts,
                      "failed": [r for r in table if r["status"] != "done"]}))


def analyse(out: Path, t0: float, t1: float, jobs: int, n_slides: int) -> dict:
    """Figures of one run from its ledger (see the module docstring)."""
    from slidekit.cohort.ledger import Ledger

    recs = Ledger(out).records()
    by_worker: dict[str, list[dict]] = {}
    for r in recs:
        by_worker.setdefault(f"{r['host']}:{r['pid']}", []).append(r)
    wall = t1 - t0
    done = [r for r in recs if r["status"] == "done"]
    compute = sum(r["seconds"] for r in done)
    parts = {"startup": 0.0, "between": 0.0, "in_slide": 0.0, "tail": 0.0}
    workers = {}
    for name, rs in by_worker.items():
        rs.sort(key=lambda r: r["time"])
        starts = [r for r in rs if r["status"] == "running"]
        ends = [r for r in rs if r["status"] == "done"]
        if not ends:
            continue
        parts["startup"] += starts[0]["time"] - t0
        parts["tail"] += t1 - ends[-1]["time"]
        for s, e in zip(starts, ends):
            parts["in_slide"] += (e["time"] - s["time"]) - e["seconds"]
        for e, s in zip(ends, starts[1:]):
            parts["between"] += s["time"] - e["time"]
        first, last = ends[0], ends[-1]
        workers[name] = {
            "slides": len(ends), "compute_s": round(sum(e["seconds"] for e in ends), 2),
            "rss_mb_first": first["rss_mb"], "rss_mb_last": last["rss_mb"],
            "peak_rss_mb_first": first["peak_rss_mb"], "peak_rss_mb_last": last["peak_rss_mb"],
            "rss_ratio": round(last["rss_mb"] / first["rss_mb"], 3),
            "peak_rss_ratio": round(last["peak_rss_mb"] / first["peak_rss_mb"], 3),
            # glibc raises its mmap threshold after the first large free, so the peak steps up
            # once during the second slide; growth after that is last / second.
            "peak_rss_ratio_vs_second": (round(last["peak_rss_mb"] / ends[1]["peak_rss_mb"], 3)
                                         if len(ends) > 1 else None),
        }
    overhead_total = wall - compute / jobs
    parts = {k: v / jobs for k, v in parts.items()}
    parts["missing"] = overhead_total - sum(parts.values())  # worker-count mismatch (0 when pids == jobs)
    return {
        "slides_done": len(done), "wall_s": round(wall, 2),
        "slides_per_hour": round(len(done) / wall * 3600, 1),
        "compute_s": round(compute, 2), "jobs": jobs, "worker_processes": len(workers),
        "overhead_s_per_slide": round(overhead_total / n_slides, 3),
        "overhead_parts_s_per_slide": {k: round(v / n_slides, 3) for k, v in parts.items()},
        "workers": workers,
        "rss_growth_max": max(w["rss_ratio"] for w in workers.values()) if workers else None,
        "peak_rss_growth_max": max(w["peak_rss_ratio"] for w in workers.values()) if workers else None,
        "peak_rss_growth_after_second_max": max((w["peak_rss_ratio_vs_second"] or 0) for w in workers.values())
        if workers else None,
    }


def cpu_busy_s() -> float | None:
    """CPU seconds every process of the machine has used (busy time in /proc/stat), or None."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class TreeCPU:
    """CPU seconds of a process and all its descendants (Ray's raylet and workers included, which
    a parent's rusage misses), sampled from /proc every 0.2 s while it runs."""

    def __init__(self, root: int) -> None:
        import threading

        self.root, self.seen, self.stop = root, {}, threading.Event()
        self.tck = os.sysconf("SC_CLK_TCK")
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        procs = {}
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            f = stat[stat.rindex(")") + 2:].split()  # fields after the command name
            procs[int(d)] = (int(f[1]), (int(f[11]) + int(f[12])) / self.tck, f[19])  # ppid, cpu, start time
        tree, grew = {self.root}, True
        while grew:
            more = {p for p, (pp, _, _) in procs.items() if pp in tree and p not in tree}
            tree |= more
            grew = bool(more)
        for p in tree & set(procs):
            key = (p, procs[p][2])
            self.seen[key] = max(self.seen.get(key, 0.0), procs[p][1])

    def _loop(self) -> None:
        while not self.stop.wait(0.2):
            self._sample()

    def total(self) -> float:
        self.stop.set()
        self.thread.join()
        return sum(self.seen.values())


def run_mode(mode: str, manifest: Path, out: Path, n_slides: int) -> dict:
    if out.exists():
        shutil.rmtree(out)
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    load_before = os.getloadavg()
    busy0, p0 = cpu_busy_s(), time.time()
    proc = subprocess.Popen([sys.executable, __file__, "--child", mode, str(manifest), str(out)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    tree = TreeCPU(proc.pid)
    stdout, stderr = proc.communicate()
    ours = tree.total()
    busy1, p1 = cpu_busy_s(), time.time()
    proc = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    cpu = {"cpu_s": round(ours, 1), "cores_used": round(ours / (p1 - p0), 2)}
    if busy0 is not None and busy1 is not None:  # what everything else on the machine used meanwhile
        cpu["others_cores"] = round(max(0.0, (busy1 - busy0) - ours) / (p1 - p0), 2)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} run failed:\n{proc.stderr[-3000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    if res["failed"]:
        raise SystemExit(f"{mode}: slides not done: {res['failed']}")
    fig = analyse(out, res["t0"], res["t1"], MODES[mode][1], n_slides)
    return {"engine": MODES[mode][0], **fig, "process_s": round(p1 - p0, 2), **cpu,
            "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in os.getloadavg()]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=None, help="Folder for the slides and outputs (kept; slides reused).")
    ap.add_argument("--sizes", type=int, nargs="+", default=DEFAULT_SIZES, help="Slide sizes in px (square).")
    ap.add_argument("--order", choices=["largest-first", "shuffled"], default="largest-first")
    ap.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    ap.add_argument("--json", type=Path, default=None, help="Write the figures here.")
    ap.add_argument("--child", nargs=3, metavar=("MODE", "MANIFEST", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return

    tmp = None
    if args.work is None:
        tmp = tempfile.TemporaryDirectory(prefix="slidekit_cohort_bench_")
        args.work = Path(tmp.name)
    work = args.work.resolve()
    result: dict = {"load_before": [round(x, 2) for x in os.getloadavg()], "cpus": os.cpu_count()}
    from slidekit.base.resources import available_cpus

    result["available_cpus"] = available_cpus()
    slides, write_s = make_slides(work / "slides", args.sizes)
    manifest = work / "manifest.csv"
    write_manifest(manifest, slides, args.sizes, args.order)
    result["slides"] = {"count": len(slides), "sizes_px": args.sizes, "mpp": SLIDE_MPP, "order": args.order,
                        "megapixels": round(sum(s * s for s in args.sizes) / 1e6, 1),
                        "write_s": round(write_s, 1)}
    result["task"] = {"name": "heatmap", "model": "hematoxylin", "dataloader_workers": 0}
    modes: dict = {}
    for mode in args.modes:
        print(f"[cohort bench] {mode} ...", file=sys.stderr, flush=True)
        modes[mode] = run_mode(mode, manifest, work / f"out_{mode}", len(slides))
        m = modes[mode]
        print(f"{mode:7s} {m['slides_per_hour']:8.1f} slides/h  wall {m['wall_s']:7.1f} s  compute "
              f"{m['compute_s']:7.1f} s  overhead {m['overhead_s_per_slide']:.3f} s/slide  "
              f"RSS growth {m['rss_growth_max']}/{m['peak_rss_growth_max']}  cores used {m['cores_used']}, "
              f"by others {m.get('others_cores')}  (load {m['load_before'][0]} -> {m['load_after'][0]})", flush=True)
    if "serial" in modes:
        for m in modes.values():
            m["speedup_vs_serial"] = round(m["slides_per_hour"] / modes["serial"]["slides_per_hour"], 3)
    result["modes"] = modes
    checks = {}
    if "serial" in modes and "local" in modes:
        checks["local_vs_serial"] = modes["local"]["speedup_vs_serial"]
    if "local" in modes and "ray" in modes:
        checks["ray_vs_local"] = round(modes["ray"]["slides_per_hour"] / modes["local"]["slides_per_hour"], 3)
    checks["overhead_s_per_slide"] = max(m["overhead_s_per_slide"] for m in modes.values())
    checks["rss_growth"] = max(m["rss_growth_max"] for m in modes.values())
    checks["peak_rss_growth"] = max(m["peak_rss_growth_max"] for m in modes.values())
    result["targets"] = TARGETS
    result["checks"] = checks
    result["met"] = {
        k: (checks[k] >= t if k in ("local_vs_serial", "ray_vs_local") else checks[k] <= t if "rss" in k
            else checks[k] < t)
        for k, t in TARGETS.items() if k in checks}
    result["load_after"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps({"checks": checks, "met": result["met"]}))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
