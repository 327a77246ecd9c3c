"""Heatmap benchmark: end-to-end patches/s against model-only forward, and peak memory vs slide size.

    python benchmarks/heatmap.py [--device cpu|cuda] [--tiles 96] [--batch-size 16] [--workers 1]
                                 [--sizes 8192 40960] [--json OUT.json]

1. Throughput: a randomly initialised ResNet-18 classifier checkpoint (224 px at 0.5 µm/px) over a
   synthetic slide. *Model-only*: ``Predictor.forward`` on a batch already in memory (uint8 ->
   normalise -> forward -> activate), repeated. *End to end*: ``Predictor.predict`` over ``--tiles``
   grid tiles with DataLoader workers reading the slide, each output handed to a ``HeatmapWriter``
   (what ``slidekit heatmap`` does per tile). Same device, batch size and threads; model-only is
   the mean of a run before and one after the end-to-end run.
2. Peak memory: ``slidekit heatmap`` (built-in ``hematoxylin``, heatmap at 1 µm/px) on pyramidal
   TIFFs of 8,192² and 40,960² px at 0.25 µm/px with sparse tissue (five round blobs, ~4 % of the area, each
   with a haematoxylin-dense core), run in a child process; the parent samples the memory of the child and its
   DataLoader workers (the child's RSS plus each worker's private memory, so pages forked workers share count once)
   from /proc every 50 ms; the child also reports its own exact peak RSS (VmHWM).

The 40,960² slide would need 5 GB of RAM to build with ``slidekit.slides.demo.write_pyramid`` (it takes
the whole level-0 array), so the slides are streamed tile by tile into the same format (tiled
JPEG pyramid, 2x levels, MPP in the resolution tags) with tifffile.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SLIDE_MPP = 0.25


def tissue_blobs(size: int, seed: int = 0) -> list[tuple[float, float, float]]:
    """(cx, cy, r) in level-0 px of a few round tissue pieces covering ~4 % of the slide."""
    rng = np.random.default_rng(seed)
    n = 5
    r = size * np.sqrt(0.04 / (n * np.pi))
    return [(float(rng.uniform(r, size - r)), float(rng.uniform(r, size - r)), float(r)) for _ in range(n)]


def _tile(x0: int, y0: int, ds: float, tile: int, blobs, rng) -> np.ndarray:
    """Level tile at level-0 (x0, y0), downsample ds: glass, and pink noisy tissue inside blobs."""
    out = np.full((tile, tile, 3), 244, np.uint8)
    ys = y0 + (np.arange(tile) + 0.5) * ds
    xs = x0 + (np.arange(tile) + 0.5) * ds
    inside = np.zeros((tile, tile), bool)
    core = np.zeros((tile, tile), bool)
    for cx, cy, r in blobs:
        if cx + r < xs[0] or cx - r > xs[-1] or cy + r < ys[0] or cy - r > ys[-1]:
            continue
        d2 = (xs[None, :] - cx) ** 2 + (ys[:, None] - cy) ** 2
        inside |= d2 < r * r
        core |= d2 < r * r / 4
    if inside.any():
        # Pink tissue with a haematoxylin-dense (purple) core in each blob, for the H map to find.
        base = np.where(core[..., None], np.array([110, 70, 160]), np.array([190, 100, 160]))
        tissue = np.clip(base + rng.integers(-30, 30, (tile, tile, 3)), 0, 255)
        out[inside] = tissue[inside].astype(np.uint8)
    return out


def write_sparse_pyramid(path: Path, size: int, tile: int = 256, seed: int = 0) -> Path:
    """A size x size pyramidal JPEG TIFF at SLIDE_MPP, streamed tile by tile (flat memory)."""
    import tifffile

    blobs = tissue_blobs(size, seed)
    rng = np.random.default_rng(seed)
    res = 1e4 / SLIDE_MPP
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        level, dim = 0, size
        while True:
            ds = 2.0 ** level
            n = -(-dim // tile)
            tiles = (_tile(int(c * tile * ds), int(r * tile * ds), ds, tile, blobs, rng)
                     for r in range(n) for c in range(n))
            tw.write(tiles, shape=(dim, dim, 3), dtype=np.uint8, tile=(tile, tile), photometric="rgb",
                     compression="jpeg", compressionargs={"level": 85}, resolution=(res / ds, res / ds),
                     resolutionunit="CENTIMETER", subfiletype=0 if level == 0 else 1, metadata=None)
            if dim // 2 < 512:
                break
            level, dim = level + 1, dim // 2
    return path


# -- 1. throughput ------------------------------------------------------------------------------


def throughput(device: str, n_tiles: int, batch_size: int, workers: int, tmp: Path) -> dict:
    import torch

    from slidekit.infer.heatmap import HeatmapWriter
    from slidekit.infer.predictor import Predictor
    from slidekit.models.checkpoint import load_checkpoint, save_checkpoint
    from slidekit.models.networks import ResNetClassifier
    from slidekit.models.spec import ModelSpec
    from slidekit.regions.tiling import TileGrid
    from slidekit.slides.demo import write_pyramid
    from slidekit.slides.slide import open_slide

    torch.manual_seed(0)
    spec = ModelSpec(arch="resnet-classifier", classes=["normal", "tumor"], patch_size=224, mpp=0.5)
    ckpt = save_checkpoint(tmp / "resnet18.pt", ResNetClassifier("resnet18", 2), spec)
    loaded = load_checkpoint(ckpt)
    side = int(np.ceil(np.sqrt(n_tiles))) * 224
    rng = np.random.default_rng(0)
    rgb = np.clip(np.array([190, 100, 160]) + rng.integers(-40, 40, (side, side, 3)), 0, 255).astype(np.uint8)
    slide_path = write_pyramid(tmp / "dense.tif", rgb, 0.5, tile=256)  # 224-px tiles: read_region path
    pred = Predictor(loaded.model, loaded.spec, device=device, batch_size=batch_size, workers=workers)
    batch = torch.from_numpy(rgb[:224, :224][None].repeat(batch_size, 0).copy())
    if pred.cuda:
        batch = batch.pin_memory()
    sync = torch.cuda.synchronize if pred.cuda else (lambda: None)
    for _ in range(2):
        pred.forward(batch).cpu()
    reps = max(2, n_tiles // batch_size)

    def model_only_rate() -> float:
        sync()
        t = time.perf_counter()
        for _ in range(reps):
            pred.forward(batch).cpu()
        sync()
        return reps * batch_size / (time.perf_counter() - t)

    before = model_only_rate()
    with open_slide(slide_path) as slide:
        grid = TileGrid.from_slide(slide, mpp=0.5, size=224, min_tissue=0)
        grid = grid.subset(np.arange(min(n_tiles, len(grid))))
        writer = HeatmapWriter(tmp / "tp.zarr", grid, "classification", spec.classes)
        list(pred.predict(slide, grid, np.arange(min(len(grid), batch_size))))  # warm-up (workers, caches)
        t = time.perf_counter()
        for idx, y in pred.predict(slide, grid):
            writer.add(idx, y)
        end_to_end = len(grid) / (time.perf_counter() - t)
        writer.finish()
    # Model-only runs before and after the end-to-end run, so drifting machine load hits both.
    model_only = (before + model_only_rate()) / 2
    return {"device": str(pred.device), "batch_size": batch_size, "workers": workers, "tiles": len(grid),
            "torch_threads": torch.get_num_threads(), "model_only_patches_per_s": round(model_only, 2),
            "end_to_end_patches_per_s": round(end_to_end, 2), "ratio": round(end_to_end / model_only, 3)}


# -- 2. peak memory -----------------------------------------------------------------------------


def _tree_rss(pid: int) -> int:
    """Memory in bytes of the job: RSS of ``pid`` plus the private memory (USS) of each of its
    descendants (DataLoader workers are forked: pages they share with the main process count once)."""
    total, stack = 0, [(pid, True)]
    while stack:
        p, root = stack.pop()
        try:
            if root:
                with open(f"/proc/{p}/status") as f:
                    total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) * 1024
            else:
                with open(f"/proc/{p}/smaps_rollup") as f:
                    total += sum(int(line.split()[1]) * 1024 for line in f
                                 if line.startswith(("Private_Clean:", "Private_Dirty:")))
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    stack.extend((int(c), False) for c in f.read().split())
        except (FileNotFoundError, ProcessLookupError, PermissionError, StopIteration):
            continue
    return total


def peak_memory(slide: Path, out: Path, workers: int) -> dict:
    cmd = [sys.executable, __file__, "--child", str(slide), str(out), "--workers", str(workers)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    peak = {"tree": 0}

    def sample() -> None:
        while proc.poll() is None:
            peak["tree"] = max(peak["tree"], _tree_rss(proc.pid))
            time.sleep(0.05)

    th = threading.Thread(target=sample, daemon=True)
    t = time.perf_counter()
    th.start()
    stdout, _ = proc.communicate()
    th.join()
    if proc.returncode != 0:
        raise RuntimeError(f"child failed on {slide}")
    child = json.loads(stdout.strip().splitlines()[-1])
    return {"slide": slide.name, "seconds": round(time.perf_counter() - t, 1),
            "peak_rss_tree_mib": round(peak["tree"] / 2**20, 1), **child}


def _hwm_mib() -> float:
    """This process's peak RSS (VmHWM; unlike ru_maxrss it does not inherit the parent's peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def child(slide: str, out: str, workers: int) -> None:
    from slidekit.infer.predictor import heatmap_slide

    # Threads: slidekit's default (the CPUs this process may use, less one per worker).
    s = heatmap_slide(slide, out, model="hematoxylin", heatmap_mpp=1.0, workers=workers, progress=False)
    print(json.dumps({"tiles": s["tiles"], "heatmap_shape": s["heatmap_shape"], "regions": s["regions"],
                      "peak_rss_main_mib": _hwm_mib(), "seconds": s["seconds"], "stages": s.get("stages"),
                      "tiles_per_s": s.get("tiles_per_s")}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tiles", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sizes", type=int, nargs="*", default=[8192, 40960])
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--json", default="benchmarks/heatmap.json")
    ap.add_argument("--child", nargs=2, metavar=("SLIDE", "OUT"))
    args = ap.parse_args()
    if args.child:
        return child(*args.child, workers=args.workers)
    import torch

    torch.set_num_threads(args.threads)
    result: dict = {"load_before": os.getloadavg()}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if not args.skip_throughput:
            result["throughput"] = throughput(args.device, args.tiles, args.batch_size, args.workers, tmp)
            print(json.dumps(result["throughput"]), flush=True)
        result["memory"] = []
        for size in args.sizes:
            t = time.perf_counter()
            slide = write_sparse_pyramid(tmp / f"sparse_{size}.tif", size)
            r = peak_memory(slide, tmp / f"out_{size}", args.workers)
            r["write_slide_seconds"] = round(time.perf_counter() - t - r["seconds"], 1)
            result["memory"].append(r)
            print(json.dumps(r), flush=True)
    mem = result["memory"]
    if len(mem) >= 2:
        result["peak_ratio_largest_vs_smallest"] = round(mem[-1]["peak_rss_tree_mib"] / mem[0]["peak_rss_tree_mib"], 3)
    result["load_after"] = os.getloadavg()
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k not in ("memory", "throughput")}))


if __name__ == "__main__":
    main()
