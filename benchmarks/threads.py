"""Threads that fit the machine: wall time of `slidekit train scribble` and `slidekit heatmap`
before and after ``slidekit.base.resources.configure_threads``, idle, loaded and on one CPU.

    python benchmarks/threads.py [--data DIR] [--json OUT] [--repeat 2] [--only train,heatmap]

Conditions (each command is run ``--repeat`` times per condition and mode; the minimum counts):

- ``idle``: nothing else started by the benchmark (the machine may still be shared: the 1-min
  load average before each run is recorded);
- ``loaded``: a second process spinning on every core (one busy-loop process per CPU of the
  affinity mask, started before the command and stopped after it);
- ``taskset``: the command pinned to one CPU (``taskset -c 0``), nothing else started.

Modes:

- ``before``: the thread handling before ``configure_threads`` existed: no call sets torch's or
  OpenCV's pools (torch's default intra-op threads: OpenMP's count of the CPUs in the affinity
  mask; OpenCV's default), and DataLoader workers get no ``worker_init_fn`` (torch itself sets one
  thread in each worker), and OpenMP's default (spinning) wait policy. Run through this script's
  launcher, which replaces ``resources.configure_threads`` and ``resources.worker_threads`` by
  no-ops before the CLI starts, and imports torch first, so that ``prefer_passive_waits`` finds
  torch loaded and leaves ``OMP_WAIT_POLICY`` unset; the rest of the code is today's.
- ``after``: the plain CLI with its defaults (no ``--threads``).

Workloads: a short scribble training (CLI, a folder of ``--images`` MoNuSeg images halved to
0.5 µm/px with scribbles from their instance masks, ``--epochs`` epochs, the trainer's default
``num_workers``) and the heatmap of a synthetic 8,192² slide (hematoxylin, ``--mpp 0.5
--min-tissue 0``, the default 2 workers). Wall seconds of the whole command (imports included).
Prints a table and writes JSON: seconds per condition and mode, the ratio before/after, load
averages before each run.
"""
from __future__ import annotations

import argparse
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

from slidekit.base.datapaths import add_data_argument, require_data_dir  # noqa: E402

# "before": today's CLI with the thread configuration of de18aab undone (see the docstring).
# torch is imported first on purpose: the CLI's prefer_passive_waits then sets no wait policy.
BEFORE_LAUNCHER = (
    "import torch, slidekit.base.resources as r\n"
    "r.configure_threads = lambda threads=None, workers=0, environ=False: torch.get_num_threads()\n"
    "r.worker_threads = lambda worker_id=0: None\n"
    "from slidekit.cli import main\n"
    "main()\n")
AFTER_LAUNCHER = "from slidekit.cli import main\nmain()\n"
CONDITIONS = ("idle", "loaded", "taskset")
MODES = ("before", "after")


def scribble_folder(data: Path, out: Path, n_images: int) -> Path:
    """``n_images`` MoNuSeg images halved (0.25 -> 0.5 µm/px) with scribbles (30 % of each nucleus)."""
    from PIL import Image

    from slidekit.annotations.scribbles import generate_scribbles
    from slidekit.data.datasets import list_images, load_image_folder

    src = data / "nuclei_monuseg"
    names = list_images(src / "images")[:n_images]
    _, imgs, insts = load_image_folder(src, masks="masks_instance", names=names, scale=0.5, mask_kind="instances")
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    for i, (name, img, inst) in enumerate(zip(names, imgs, insts)):
        Image.fromarray(img).save(out / "images" / f"{name}.png")
        Image.fromarray(generate_scribbles(inst, 0.3, seed=i)).save(out / "labels" / f"{name}.png")
    return out


def synthetic_slide(path: Path, size: int = 8192) -> Path:
    """A pyramidal JPEG TIFF of real tissue texture (the scikit-image IHC image tiled), 0.5 µm/px."""
    from skimage import data

    from slidekit.slides.demo import write_pyramid

    ihc = data.immunohistochemistry()
    reps = -(-size // ihc.shape[0])
    return write_pyramid(path, np.ascontiguousarray(np.tile(ihc, (reps, reps, 1))[:size, :size]), 0.5,
                         tile=256, quality=85)


def spinners() -> list[subprocess.Popen]:
    """One busy-loop process per CPU this process may use (the 'second process' loading the machine)."""
    n = len(os.sched_getaffinity(0))
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def run_once(args: list[str], mode: str, condition: str, env: dict) -> dict:
    """Wall seconds of one CLI run (``args`` after ``slidekit``) in ``mode`` under ``condition``."""
    cmd = [sys.executable, "-c", BEFORE_LAUNCHER if mode == "before" else AFTER_LAUNCHER, *args]
    if condition == "taskset":
        cmd = ["taskset", "-c", "0", *cmd]
    load = list(os.getloadavg())  # before the spinners start: the machine's own load
    procs = spinners() if condition == "loaded" else []
    try:
        time.sleep(0.5 if procs else 0)
        t = time.perf_counter()
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
        seconds = time.perf_counter() - t
    finally:
        for p in procs:
            p.kill()
            p.wait()
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(args[:2])} failed ({mode}, {condition}): {r.stderr.strip()[-800:]}")
    return {"seconds": round(seconds, 2), "load_avg_1_5_15": [round(v, 2) for v in load]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_argument(ap)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--only", default="train,heatmap", help="comma-separated workloads")
    ap.add_argument("--conditions", default=",".join(CONDITIONS))
    args = ap.parse_args()
    data = require_data_dir(args.data)
    tmp = Path(tempfile.mkdtemp(prefix="threads-bench-"))
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                                            "OPENBLAS_NUM_THREADS")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    workloads: dict[str, tuple[list[str], Path]] = {}
    only = args.only.split(",")
    if "train" in only:
        folder = scribble_folder(data, tmp / "scribbles", args.images)
        cfg = tmp / "scribble.yaml"
        cfg.write_text(f"data: {folder}\nlabels: labels\nimage_mpp: 0.5\ncrop: 128\nbatch_size: 8\n"
                       f"samples_per_image: 8\nepochs: {args.epochs}\n")
        workloads["train_scribble"] = (["train", "scribble", "--config", str(cfg), "--quiet",
                                        "--device", "cpu", "--out"], tmp / "run")
    if "heatmap" in only:
        slide = synthetic_slide(tmp / "slide.tif")
        workloads["heatmap"] = (["heatmap", str(slide), "--mpp", "0.5", "--min-tissue", "0", "--quiet",
                                 "--device", "cpu", "--out"], tmp / "hm")
    results: dict = {"cpu_count": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)),
                     "repeat": args.repeat, "images": args.images, "epochs": args.epochs,
                     "before": "no configure_threads / worker_threads (torch and OpenCV defaults)",
                     "after": "the CLI's defaults (configure_threads with available_cpus())", "runs": {}}
    for name, (cli, out) in workloads.items():
        for condition in args.conditions.split(","):
            for mode in MODES:
                runs = []
                for _ in range(args.repeat):
                    shutil.rmtree(out, ignore_errors=True)  # a rerun would skip or resume
                    runs.append(run_once([*cli, str(out)], mode, condition, env))
                    print(f"{name:15s} {condition:8s} {mode:6s} {runs[-1]['seconds']:7.2f} s  "
                          f"load {runs[-1]['load_avg_1_5_15'][0]:.2f}", flush=True)
                results["runs"].setdefault(name, {}).setdefault(condition, {})[mode] = {
                    "seconds": min(r["seconds"] for r in runs), "runs": runs}
            cell = results["runs"][name][condition]
            cell["ratio_before_to_after"] = round(cell["before"]["seconds"] / cell["after"]["seconds"], 3)
    print(f"\n{'workload':15s} {'condition':9s} {'before s':>9s} {'after s':>9s} {'before/after':>12s}")
    for name, conds in results["runs"].items():
        for condition, cell in conds.items():
            print(f"{name:15s} {condition:9s} {cell['before']['seconds']:9.2f} {cell['after']['seconds']:9.2f} "
                  f"{cell['ratio_before_to_after']:12.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
