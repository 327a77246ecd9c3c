"""SpatialData export: seconds and peak memory of `export_spatialdata` as slides grow.

For each synthetic slide size (default 8,192² and 40,960² at 0.25 µm/px, written tile by tile) the
benchmark builds a slidekit output folder: ``features.h5`` of a grid of 224-px tiles at 0.5 µm/px
(448 level-0 px; 1,536-wide features, UNI2-h's width), a ``tissue.geojson`` rectangle and a
``cells.csv`` with nuclei at the same density on every size (180,000 on 40,960²), and exports it to a
SpatialData store in a fresh process, so that each size's peak RSS is its own.

Figures per size: tiles, cells, feature MiB, export seconds, peak RSS (MiB), RSS after the imports,
store MiB. ``peak_rss_ratio`` is the largest size's peak over the smallest's (goal: at most 1.5);
``extra_rss_ratio`` the same for the memory above the imports. Run it niced: the machine is shared.

    nice -n 10 python benchmarks/spatialdata_export.py --json benchmarks/spatialdata_export.json

(Not named spatialdata.py: run as a script, that name would shadow the spatialdata package.)
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MPP = 0.25
TILE_MPP, TILE = 0.5, 224
DIM = 1536
CELLS_AT_40K = 180_000
SYNTH_TILE = 512


def write_glass(path: Path, size: int) -> Path:
    """A ``size`` x ``size`` one-level tiled TIFF of glass at ``MPP``, written tile by tile."""
    import tifffile

    res = 1e4 / MPP
    glass = np.full((SYNTH_TILE, SYNTH_TILE, 3), 240, np.uint8)
    n = (-(-size // SYNTH_TILE)) ** 2
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        tw.write((glass for _ in range(n)), shape=(size, size, 3), dtype=np.uint8, tile=(SYNTH_TILE, SYNTH_TILE),
                 photometric="rgb", compression="jpeg", resolution=(res, res), resolutionunit="CENTIMETER",
                 metadata=None)
    return path


def build_folder(slide: Path, out: Path, size: int, seed: int = 0) -> dict:
    """features.h5, tissue.geojson and cells.csv for ``slide`` as slidekit's jobs write them."""
    from shapely.geometry import box

    from slidekit.annotations.formats import write_geojson
    from slidekit.annotations.objects import Annotation
    from slidekit.slidelevel.feature_store import FeatureWriter, tool_attrs
    from slidekit.slides.identity import slide_fingerprint

    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    side = int(round(TILE * TILE_MPP / MPP))
    xs = np.arange(0, size - side + 1, side)
    gx, gy = np.meshgrid(xs, xs)
    coords = np.stack([gx.ravel(), gy.ravel()], 1).astype(np.int64)
    enc = {"name": "uni2-h", "weights": "synthetic", "dim": DIM, "mpp": TILE_MPP, "patch_size": TILE,
           "tokens": "cls"}
    record = {"name": slide.name, "fingerprint": slide_fingerprint(slide), "dimensions": [size, size],
              "mpp": [MPP, MPP]}
    w = FeatureWriter(out / "features.h5", coords, DIM, enc, record,
                      tool_attrs(TILE, side, MPP, TILE_MPP, (size, size), slide.stem), chunk_rows=4096)
    for begin in range(0, len(coords), 4096):
        w.write(begin, rng.standard_normal((min(4096, len(coords) - begin), DIM)).astype(np.float32))
    w.close()
    write_geojson([Annotation(box(size * 0.05, size * 0.05, size * 0.95, size * 0.95), label="Tissue")],
                  out / "tissue.geojson")
    cells = int(round(CELLS_AT_40K * (size / 40960) ** 2))
    cols = ["id", "x", "y", "x_um", "y_um", "area_um2", "perimeter_um", "circularity", "solidity",
            "eccentricity", "hematoxylin_od", "eosin_od", "uuid"]
    with open(out / "cells.csv", "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(cols)
        for begin in range(0, cells, 50_000):
            k = min(50_000, cells - begin)
            xy = rng.uniform(0, size, (k, 2)).round(2)
            m = rng.uniform(0.1, 60, (k, 7)).round(4)
            for i in range(k):
                wr.writerow([begin + i + 1, xy[i, 0], xy[i, 1], xy[i, 0] * MPP, xy[i, 1] * MPP, *m[i],
                             f"00000000-0000-0000-0000-{begin + i:012d}"])
    return {"tiles": int(len(coords)), "cells": cells, "features_mib": round(len(coords) * DIM * 4 / 2**20, 1)}


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _child(folder: str, slide: str, store: str, result: str) -> None:
    """One export in this fresh process: seconds, peak RSS, RSS after the imports."""
    from slidekit.slidelevel.spatialdata_export import export_spatialdata

    start_rss = _rss_mib()
    t = time.perf_counter()
    export_spatialdata(folder, store, slide=slide)
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    size = sum(p.stat().st_size for p in Path(store).rglob("*") if p.is_file())
    Path(result).write_text(json.dumps({"seconds": round(seconds, 2), "peak_rss_mib": round(peak, 1),
                                        "rss_mib_after_imports": round(start_rss, 1),
                                        "store_mib": round(size / 2**20, 1)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", required=True, help="where the figures go")
    ap.add_argument("--sizes", type=int, nargs="*", default=[8192, 40960], help="synthetic slide sizes (px)")
    ap.add_argument("--tmp", default=None, help="scratch folder [default: a temporary one]")
    ap.add_argument("--child", nargs=4, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(*args.child)
        return
    tmp = Path(args.tmp or tempfile.mkdtemp(prefix="sk-sd-bench-"))
    runs = {}
    try:
        for size in sorted(args.sizes):
            t = time.time()
            slide = write_glass(tmp / f"glass_{size}.tif", size)
            folder = tmp / f"out_{size}"
            built = build_folder(slide, folder, size)
            print(f"{size}^2: slide and folder written in {time.time() - t:.0f} s {built}", flush=True)
            res = tmp / f"result_{size}.json"
            env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
            subprocess.run([sys.executable, __file__, "--json", str(res), "--child", str(folder), str(slide),
                            str(tmp / f"store_{size}.zarr"), str(res)], check=True, env=env)
            runs[str(size)] = {**built, **json.loads(res.read_text())}
            print(size, runs[str(size)], flush=True)
            shutil.rmtree(tmp / f"store_{size}.zarr", ignore_errors=True)
            slide.unlink()
    finally:
        if args.tmp is None:
            shutil.rmtree(tmp, ignore_errors=True)
    small, big = runs[str(min(args.sizes))], runs[str(max(args.sizes))]
    extra = [r["peak_rss_mib"] - r["rss_mib_after_imports"] for r in (small, big)]
    out = {"benchmark": "spatialdata_export", "slide_mpp": MPP, "tile": {"size": TILE, "mpp": TILE_MPP},
           "feature_dim": DIM, "runs": runs, "peak_rss_ratio": round(big["peak_rss_mib"] / small["peak_rss_mib"], 3),
           "extra_rss_ratio": round(extra[1] / max(extra[0], 1e-9), 3), "goal_peak_rss_ratio": 1.5,
           "cpus": os.cpu_count(), "note": "each size exported in a fresh process; OMP/BLAS threads 1"}
    Path(args.json).write_text(json.dumps(out, indent=2))
    print(json.dumps({k: out[k] for k in ("peak_rss_ratio", "extra_rss_ratio")}))


if __name__ == "__main__":
    main()
