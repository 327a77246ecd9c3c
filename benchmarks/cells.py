"""Nuclei at slide scale (issue 23): seams and accuracy of `slidekit cells` on MoNuSeg images.

Each MoNuSeg image (``images/*.png`` + ``masks_instance/*.png``) is written as a pyramidal slide at
0.25 µm/px and run through ``cells_slide`` with overlapping tiles. The model is the built-in
``hematoxylin`` (stride 1) with ``--threshold``: no training, so the numbers measure the
seam handling and the instance splitting, not a learnt model.

- ``seam_object_dice``: object Dice between the tiled slide-scale nuclei (their polygons
  rasterised) and the same model's instances on the whole image at once (goal >= 0.98);
- ``object_dice`` / ``aji``: the tiled nuclei against the ground-truth instances.

Not measured yet: ``nuclei_per_s`` / ``peak_rss_mib`` on a synthetic 40k² slide.
"""
from __future__ import annotations

import argparse
import gzip
import json
import tempfile
import time
from pathlib import Path

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


def aji(pred: np.ndarray, gt: np.ndarray) -> float:
    """Aggregated Jaccard Index (Kumar et al. 2017)."""
    inter = union = 0
    used = set()
    for g in np.unique(gt[gt > 0]):
        m = gt == g
        hit = pred[m]
        hit = hit[hit > 0]
        if len(hit) == 0:
            union += m.sum()
            continue
        best, bi = 0.0, 0
        for p in np.unique(hit):
            o = pred == p
            iou = (m & o).sum() / (m | o).sum()
            if iou > best:
                best, bi = iou, p
        o = pred == bi
        inter += (m & o).sum()
        union += (m | o).sum()
        used.add(int(bi))
    for p in np.unique(pred[pred > 0]):
        if int(p) not in used:
            union += (pred == p).sum()
    return float(inter / union) if union else 0.0


def rasterise(gz: Path, shape: tuple[int, int]) -> np.ndarray:
    """cells.geojson.gz polygons (level-0 px) as a label image."""
    lab = np.zeros(shape, np.int32)
    with gzip.open(gz, "rt") as f:
        feats = json.load(f)["features"]
    for k, ft in enumerate(feats, 1):
        ring = np.asarray(ft["geometry"]["coordinates"][0])
        rr, cc = draw_polygon(ring[:, 1] - 0.5, ring[:, 0] - 0.5, shape)
        lab[rr, cc] = k
    return lab


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", required=True)
    ap.add_argument("--eval-data", default=None, help="a MoNuSeg-style folder [default: the real-data nuclei_monuseg]")
    ap.add_argument("--images", type=int, default=3, help="how many images (default run: CPU-sized)")
    ap.add_argument("--threshold", type=float, default=0.3)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--overlap", type=int, default=64)
    args = ap.parse_args()
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
            tiled = rasterise(Path(tmp) / img.stem / "cells.geojson.gz", rgb.shape[:2])
            with torch.inference_mode():
                x = spec.normalize(torch.from_numpy(rgb[None]))
                prob = spec.activate(net(x)).numpy()[0, -1]
            whole = split_instances(prob, args.threshold, max(1, round(2.0 / MPP)), max(1, round(10.0 / MPP ** 2)))
            rows.append({"image": img.stem, "nuclei": s["nuclei"], "whole_image_nuclei": int(len(np.unique(whole)) - 1),
                         "seam_object_dice": float(object_dice(tiled, whole)), "object_dice": float(object_dice(tiled, gt)),
                         "aji": aji(tiled, gt)})
            print(rows[-1], flush=True)
    res = {"model": "builtin hematoxylin (stride 1), threshold %.2f, no training" % args.threshold,
           "images": rows, "seconds": round(time.time() - t0, 1),
           **{k: float(np.mean([r[k] for r in rows])) for k in ("seam_object_dice", "object_dice", "aji")},
           "nuclei_per_s": None, "peak_rss_mib": None, "not_measured": "40k^2 synthetic slide throughput/memory"}
    Path(args.json).write_text(json.dumps(res, indent=2))
    print(json.dumps({k: v for k, v in res.items() if k != "images"}, indent=2))


if __name__ == "__main__":
    main()
