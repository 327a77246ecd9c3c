"""From QuPath scribbles on a slide to a heatmap back in QuPath.

    python examples/qupath_scribbles_to_heatmap.py [--slide SLIDE --scribbles GEOJSON] \\
        [--classes Negative,DAB] [--out DIR] [--epochs 3]

1. Scribbles: in QuPath, draw a few lines (Polyline tool) or thin polygons per class, set their
   classification (e.g. "Negative" and "DAB"), and export them with *File > Export objects as
   GeoJSON*. Without --slide the script writes the embedded demo slide (real IHC tissue) and
   draws such scribbles itself, from a colour rule, into ``scribbles.geojson``.
2. Training: the ``scribble`` trainer rasterises the lines ``line_width_um`` wide, patch by
   patch, and trains a U-Net with partial cross-entropy (unscribbled pixels are ignored).
   Same as ``slidekit train scribble --config OUT/scribble.yaml --out OUT/model``.
3. Heatmap: the checkpoint describes itself, so ``slidekit heatmap SLIDE --model
   OUT/model/checkpoint.pt --out OUT/heatmap`` needs no other option. Import
   ``OUT/heatmap/predictions.geojson`` into QuPath (drag and drop onto the open slide).

Runs in a few minutes on a laptop CPU.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def demo_scribbles(slide_path: Path, out: Path, classes: tuple[str, str], n_per_class: int = 12,
                   seed: int = 0) -> Path:
    """Draw QuPath-like scribbles on the demo slide: short lines inside strongly DAB-stained
    tissue (``classes[1]``) and inside haematoxylin-only tissue (``classes[0]``)."""
    from scipy import ndimage as ndi
    from shapely.geometry import LineString, Point
    from skimage.color import rgb2hed

    import slidekit as sk
    from slidekit.annotations.formats import write_geojson
    from slidekit.annotations.objects import Annotation

    rng = np.random.default_rng(seed)
    mpp = 4.0
    with sk.open_slide(slide_path) as slide:
        rgb = slide.read_whole(mpp)
        tissue = sk.tissue_mask(slide, mpp=mpp).array
        scale = mpp / slide.mpp[0]  # level-0 px per px of rgb
    h, w = min(rgb.shape[0], tissue.shape[0]), min(rgb.shape[1], tissue.shape[1])
    rgb, tissue = rgb[:h, :w], tissue[:h, :w]
    dab = rgb2hed(rgb)[..., 2]
    hi, lo = np.quantile(dab[tissue], [0.85, 0.4])
    regions = {classes[1]: ndi.binary_erosion(tissue & (dab > hi), iterations=1),
               classes[0]: ndi.binary_erosion(tissue & (dab < lo), iterations=2)}
    anns = []
    for label, mask in regions.items():
        rows, cols = np.nonzero(mask)
        for k in rng.choice(len(rows), size=min(n_per_class, len(rows)), replace=False):
            # A short stroke through a random point of the region, clipped where it leaves it.
            angle = rng.uniform(0, np.pi)
            t = np.linspace(-6, 6, 25)
            ys, xs = rows[k] + t * np.sin(angle), cols[k] + t * np.cos(angle)
            inside = mask[np.clip(ys.round().astype(int), 0, h - 1), np.clip(xs.round().astype(int), 0, w - 1)]
            mid = len(t) // 2
            a = mid - np.argmin(inside[mid::-1]) + 1 if not inside[mid::-1].all() else 0
            b = mid + np.argmin(inside[mid:]) - 1 if not inside[mid:].all() else len(t) - 1
            pts = [((x + 0.5) * scale, (y + 0.5) * scale) for x, y in zip(xs[a:b + 1], ys[a:b + 1])]
            geom = LineString(pts) if len(pts) >= 2 else Point(pts[0]).buffer(scale)
            anns.append(Annotation(geom, label=label))
    return write_geojson(anns, out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slide", type=Path, default=None)
    ap.add_argument("--scribbles", type=Path, default=None, help="QuPath GeoJSON export with the scribbles")
    ap.add_argument("--classes", default="Negative,DAB", help="class names, background class first")
    ap.add_argument("--out", type=Path, default=Path("scribbles_out"))
    ap.add_argument("--mpp", type=float, default=2.0, help="µm/px the network sees")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    classes = tuple(c.strip() for c in args.classes.split(","))
    args.out.mkdir(parents=True, exist_ok=True)

    import yaml

    import trainers
    from slidekit.infer.predictor import heatmap_slide

    if args.slide is None:
        from slidekit.slides.demo import write_demo_slide

        args.slide = args.out / "demo.tif"
        if not args.slide.exists():
            write_demo_slide(args.slide)
        args.scribbles = demo_scribbles(args.slide, args.out / "scribbles.geojson", classes[:2])
        print(f"demo slide {args.slide} with scribbles {args.scribbles}")
    elif args.scribbles is None:
        ap.error("--slide needs --scribbles (the QuPath GeoJSON export)")

    config = {"slides": [str(args.slide)], "annotations": [str(args.scribbles)], "classes": list(classes),
              "mpp": args.mpp, "crop": 64, "line_width_um": 3 * args.mpp, "epochs": args.epochs,
              "batch_size": 8, "patches_per_epoch": 64, "lr": 2e-3, "seed": 0}
    cfg_path = args.out / "scribble.yaml"
    cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))
    ckpt = trainers.train("scribble", cfg_path, args.out / "model", device=args.device)
    print(f"checkpoint: {ckpt}")

    summary = heatmap_slide(args.slide, args.out / "heatmap", model=ckpt, workers=0, device=args.device,
                            min_area_um2=200.0)
    print(f"heatmap: {summary['tiles']} tiles, {summary['regions']} regions")
    print(f"import into QuPath: {args.out / 'heatmap' / 'predictions.geojson'} "
          f"(and {args.scribbles} to see the scribbles); overlay: {args.out / 'heatmap' / 'overlay.png'}")


if __name__ == "__main__":
    main()
