"""Nuclei at slide scale (issue 23): seams and accuracy of `slidekit cells` on MoNuSeg images.

Each MoNuSeg image (``images/*.png`` + ``masks_instance/*.png``) is written as a pyramidal slide at
0.25 µm/px and run through ``cells_slide`` with overlapping tiles. The model is the built-in
``hematoxylin`` (stride 1) with ``--threshold``: no training, so the numbers measure the
seam handling and the instance splitting, not a learnt model.

- ``seam_object_dice``: object Dice between the tiled slide-scale nuclei (their polygons
  rasterised) and the same model's instances on the whole image at once (goal >= 0.98);
- ``object_dice`` / ``aji``: the tiled nuclei against the ground-truth instances;
- ``nuclei_per_s`` / ``peak_rss_mib``: throughput and peak memory of ``cells_slide`` on synthetic
  slides of ``--sizes`` px squared (default 8k² and 40k², 0.25 µm/px, the built-in model at its
  0.5 µm/px): square tissue islands (a MoNuSeg image repeated) on glass, a quarter of the area.
  Each size runs in a fresh process, so its peak RSS is its own; memory is flat when the 40k²
  peak is at most 1.2x the 8k² peak (``peak_rss_ratio``). The top-level figures are the largest
  slide's.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image
from skimage.draw import polygon as draw_polygon

from slidekit.annotations.scribbles import object_dice
from slidekit.base.datapaths import data_dir
from slidekit.infer.cells import cells_slide, split_instances
from slidekit.models.builtin import builtin_model
from slidekit.slides.demo import write_pyramid

MPP = 0.25
SYNTH_TILE, SYNTH_PERIOD, SYNTH_ISLAND = 256, 4096, 2048  # level-0 px: islands of 512 µm every 1024 µm


def aji(pred: np.ndarray, gt: np.ndarray) -> float:
    """Aggregated Jaccard Index (Kumar et al. 2017): each ground-truth nucleus with the predicted
    one of highest IoU (intersection and union summed over them), plus every predicted nucleus
    never chosen in the union. Counted from the overlap table of the two label images at once."""
    g, p = gt.ravel().astype(np.int64), pred.ravel().astype(np.int64)
    ga, pa = np.bincount(g), np.bincount(p)
    both = (g > 0) & (p > 0)
    pairs, inter = np.unique(g[both] * (p.max() + 1) + p[both], return_counts=True)
    pg, pp = pairs // (p.max() + 1), pairs % (p.max() + 1)
    iou = inter / (ga[pg] + pa[pp] - inter)
    best = {}  # gt label -> (iou, pred label, intersection)
    for a, b, i, j in zip(pg.tolist(), pp.tolist(), inter.tolist(), iou.tolist()):
        if a not in best or j > best[a][0]:
            best[a] = (j, b, i)
    gts = np.nonzero(ga[1:])[0] + 1
    total_i = sum(v[2] for v in best.values())
    total_u = sum(ga[a] + pa[v[1]] - v[2] for a, v in best.items())
    total_u += sum(int(ga[a]) for a in gts.tolist() if a not in best)
    used = {v[1] for v in best.values()}
    total_u += sum(int(pa[b]) for b in (np.nonzero(pa[1:])[0] + 1).tolist() if b not in used)
    return float(total_i / total_u) if total_u else 0.0


def rasterise(gj: Path, shape: tuple[int, int]) -> np.ndarray:
    """cells.geojson[.gz] polygons (level-0 px) as a label image."""
    lab = np.zeros(shape, np.int32)
    with (gzip.open(gj, "rt") if gj.suffix == ".gz" else open(gj)) as f:
        feats = json.load(f)["features"]
    for k, ft in enumerate(feats, 1):
        ring = np.asarray(ft["geometry"]["coordinates"][0])
        rr, cc = draw_polygon(ring[:, 1] - 0.5, ring[:, 0] - 0.5, shape)
        lab[rr, cc] = k
    return lab


def write_synthetic(path: Path, size: int, texture: np.ndarray) -> Path:
    """A ``size`` x ``size`` pyramidal TIFF at 0.25 µm/px written tile by tile (a 40k² RGB never
    sits in memory): square islands of ``texture`` (repeated) on glass, a quarter of the area."""
    import tifffile

    res = 1e4 / MPP
    levels, d = [], 1
    while size // d >= 512:
        levels.append(d)
        d *= 2
    glass = np.full((SYNTH_TILE, SYNTH_TILE, 3), 240, np.uint8)

    def tiles(d: int):
        n = -(-size // d)
        tex = cv2.resize(texture, (texture.shape[1] // d, texture.shape[0] // d), interpolation=cv2.INTER_AREA)
        period, island = SYNTH_PERIOD // d, SYNTH_ISLAND // d
        ar = np.arange(SYNTH_TILE)
        for y0 in range(0, n, SYNTH_TILE):
            ys = y0 + ar
            iy = (ys % period) < island
            for x0 in range(0, n, SYNTH_TILE):
                xs = x0 + ar
                ix = (xs % period) < island
                if not iy.any() or not ix.any():
                    yield glass
                    continue
                t = tex[(ys % tex.shape[0])[:, None], (xs % tex.shape[1])[None, :]]
                t[~(iy[:, None] & ix[None, :])] = 240
                yield t

    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for i, d in enumerate(levels):
            n = -(-size // d)
            tw.write(tiles(d), shape=(n, n, 3), dtype=np.uint8, tile=(SYNTH_TILE, SYNTH_TILE), photometric="rgb",
                     compression="jpeg", compressionargs={"level": 90}, resolution=(res / d, res / d),
                     resolutionunit="CENTIMETER", subfiletype=0 if i == 0 else 1, metadata=None)
    return path


def _rss_mib() -> float:
    """This process's resident size now (Linux /proc), MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _synthetic_child(slide: str, out: str, result: str) -> None:
    """One cells_slide run in this (fresh) process: its figures, its own peak RSS and its RSS
    sampled every 5 s (where memory goes if it grows)."""
    import threading

    samples, stop = [], threading.Event()
    t0 = time.time()

    def sample() -> None:
        while not stop.wait(5.0):
            samples.append((round(time.time() - t0), round(_rss_mib(), 1)))

    samples.append((0, round(_rss_mib(), 1)))  # after the imports
    th = threading.Thread(target=sample, daemon=True)
    th.start()
    s = cells_slide(slide, out, threshold=0.3, progress=False, threads=1)
    stop.set()
    th.join()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    fig = {"nuclei": s["nuclei"], "tiles": s["tiles"], "seconds": s["seconds"], "stages": s["stages"],
           "nuclei_per_s": round(s["nuclei"] / s["seconds"], 1), "peak_rss_mib": round(peak, 1),
           "geojson": s["geojson"], "geojson_mib": round((Path(out) / s["geojson"]).stat().st_size / 2**20, 1),
           "rss_mib_at_start": samples[0][1], "rss_mib_samples": samples[::max(1, len(samples) // 40)]}
    Path(result).write_text(json.dumps(fig))


def synthetic_runs(sizes: list[int], texture: np.ndarray, tmp: Path) -> dict:
    """Throughput and peak RSS per synthetic slide size, each in a fresh process."""
    out = {}
    for size in sizes:
        t = time.time()
        slide = write_synthetic(tmp / f"synthetic_{size}.tif", size, texture)
        print(f"synthetic {size}^2 written in {time.time() - t:.0f} s ({slide.stat().st_size / 2**20:.0f} MiB)",
              flush=True)
        res = tmp / f"synthetic_{size}.json"
        subprocess.run([sys.executable, __file__, "--json", str(res), "--child", str(slide), str(tmp / f"cells_{size}"),
                        str(res)],
                       check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        out[str(size)] = json.loads(res.read_text())
        print(size, out[str(size)], flush=True)
        slide.unlink()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", required=True)
    ap.add_argument("--eval-data", default=None, help="a MoNuSeg-style folder [default: the real-data nuclei_monuseg]")
    ap.add_argument("--images", type=int, default=3, help="how many images (default run: CPU-sized)")
    ap.add_argument("--threshold", type=float, default=0.3)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--overlap", type=int, default=64)
    ap.add_argument("--sizes", type=int, nargs="*", default=[8000, 40000],
                    help="synthetic slide sizes (px) for nuclei_per_s / peak_rss_mib; none: skip")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)  # internal: one synthetic run
    args = ap.parse_args()
    if args.child:
        return _synthetic_child(*args.child)
    root = Path(args.eval_data) if args.eval_data else data_dir() / "nuclei_monuseg"
    net, spec = builtin_model("hematoxylin", stride=1, patch_size=args.size)
    loaded = (net, spec, "builtin:hematoxylin-stride1")
    rows = []
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for img in sorted((root / "images").glob("*.png"))[:args.images]:
            rgb = np.asarray(Image.open(img).convert("RGB"))
            gt = np.asarray(Image.open(root / "masks_instance" / img.name)).astype(np.int64)
            slide = write_pyramid(Path(tmp) / f"{img.stem}.tif", rgb, MPP, compression="zlib")
            s = cells_slide(slide, Path(tmp) / img.stem, mpp=MPP, size=args.size, overlap=args.overlap,
                            threshold=args.threshold, min_tissue=0.0, progress=False, loaded=loaded)
            tiled = rasterise(Path(tmp) / img.stem / s["geojson"], rgb.shape[:2])
            with torch.inference_mode():
                x = spec.normalize(torch.from_numpy(rgb[None]))
                prob = spec.activate(net(x)).numpy()[0, -1]
            whole = split_instances(prob, args.threshold, max(1, round(2.0 / MPP)), max(1, round(10.0 / MPP ** 2)))
            rows.append({"image": img.stem, "nuclei": s["nuclei"], "whole_image_nuclei": int(len(np.unique(whole)) - 1),
                         "seam_object_dice": float(object_dice(tiled, whole)),
                         "object_dice": float(object_dice(tiled, gt)),
                         "aji": aji(tiled, gt)})
            print(rows[-1], flush=True)
        texture = np.asarray(Image.open(sorted((root / "images").glob("*.png"))[0]).convert("RGB"))
        synth = synthetic_runs(sorted(args.sizes), texture, Path(tmp)) if args.sizes else {}
    big = synth[str(max(args.sizes))] if synth else {}
    res = {"model": "builtin hematoxylin (stride 1), threshold %.2f, no training" % args.threshold,
           "images": rows, "seconds": round(time.time() - t0, 1),
           **{k: float(np.mean([r[k] for r in rows])) for k in ("seam_object_dice", "object_dice", "aji")},
           "nuclei_per_s": big.get("nuclei_per_s"), "peak_rss_mib": big.get("peak_rss_mib"),
           "not_measured": None if synth else "synthetic slide throughput/memory (--sizes given none)",
           "synthetic": {"mpp": MPP, "model_mpp": 0.5, "tissue_fraction": (SYNTH_ISLAND / SYNTH_PERIOD) ** 2,
                         "runs": synth},
           "peak_rss_ratio": (round(big["peak_rss_mib"] / synth[str(min(args.sizes))]["peak_rss_mib"], 3)
                              if len(synth) > 1 else None),
           "load_average": os.getloadavg()}
    Path(args.json).write_text(json.dumps(res, indent=2))
    print(json.dumps({k: v for k, v in res.items() if k != "images"}, indent=2))


if __name__ == "__main__":
    main()
