"""Tissue-mask recall and glass leakage on every slide in DIR/wsi and on the demo slide.

    python benchmarks/tissue.py [--data DIR] [--json OUT] [--mask-mpp 8] [--overlays DIR]

For each slide: ``sk.tissue_mask`` at ``--mask-mpp`` (timed, best of ``--repeat``, slide read
included), then the mask is scored against a glass reference computed from the same coarse view
by ``glass_reference`` below, which does not call the detector:

- glass colour: the brightest grey level that holds at least 2 % of the view within ±3 levels
  (the glass is the brightest common colour of a brightfield slide), ignoring scanner fill
  (pixels with every channel >= 254, which is painted, not scanned); its per-channel median.
- glass: every channel at least (glass colour - 8 grey levels), i.e. a pixel that absorbs no more
  than ~3 % beyond the glass in any channel. Scanner fill and anything brighter than the glass count
  as glass. Everything else is non-glass: tissue, but also dust and pen ink, which the mask should
  leave out, so recall is a lower bound where a slide carries marks (none of these slides does).
- recall: share of non-glass pixels inside the mask. glass: share of glass pixels inside the mask.
  A mask fills small gaps inside tissue on purpose, so ``glass_far`` also reports the share of
  *open* glass inside the mask: glass pixels whose 50 µm neighbourhood is at least 90 % glass.

The reference shares one idea with the detector (glass is the brightest common colour), so on
real slides these figures measure thresholds and morphology; the demo slide, made by code, also
has its true tissue outline, and ``truth_recall`` / ``truth_glass`` score the mask against it.
A slide without MPP is opened with ``--fallback-mpp`` (0.25), and the table says so.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

#: Glass tolerance in grey levels per channel, and how far (µm) open glass lies from non-glass.
GLASS_TOL = 8.0
OPEN_GLASS_UM = 50.0


def glass_reference(rgb: np.ndarray, tol: float = GLASS_TOL, min_share: float = 0.02
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(glass bool map, glass RGB colour) of an RGB view; see the module docstring."""
    px = np.asarray(rgb).reshape(-1, 3).astype(np.float32)
    grey = px.mean(axis=1)
    scanned = px.min(axis=1) < 254
    g = np.round(grey[scanned]).astype(int)
    if g.size == 0:
        colour = np.full(3, 255.0, np.float32)
    else:
        hist = np.bincount(g, minlength=256).astype(np.float64)
        window = np.convolve(hist, np.ones(7), mode="same")  # pixels within ±3 levels
        common = np.flatnonzero(window >= min_share * g.size)
        level = int(common.max()) if common.size else int(np.argmax(window))
        colour = np.median(px[scanned & (np.abs(grey - level) <= 3)], axis=0)
    glass = (px >= colour - tol).all(axis=1).reshape(rgb.shape[:2])
    return glass, colour


def score_mask(mask: np.ndarray, rgb: np.ndarray, mpp: float) -> dict:
    """recall, glass, glass_far and the reference's glass colour/share for a mask over ``rgb``."""
    glass, colour = glass_reference(rgb)
    # Open glass: glass pixels whose disc of radius OPEN_GLASS_UM is at least 90 % glass (a density,
    # not a distance, so that a few noisy pixels in a wide glass area do not hide it).
    r = max(1, round(OPEN_GLASS_UM / mpp))
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1)).astype(np.float32)
    density = cv2.filter2D(glass.astype(np.float32), -1, disc / disc.sum(), borderType=cv2.BORDER_REFLECT)
    far = glass & (density >= 0.9)

    def share(sel: np.ndarray) -> float | None:
        return float(mask[sel].mean()) if sel.any() else None

    return {"recall": share(~glass), "glass": share(glass), "glass_far": share(far),
            "glass_share": float(glass.mean()), "glass_rgb": [float(c) for c in colour]}


def overlay(rgb: np.ndarray, mask: np.ndarray, glass: np.ndarray, path: Path) -> None:
    """Side by side: the view, the mask in green, the glass reference in blue (enlarged to ~500 px)."""
    tint = rgb.copy()
    tint[mask] = (0.6 * tint[mask] + 0.4 * np.array([0, 220, 0])).astype(np.uint8)
    ref = rgb.copy()
    ref[glass] = (0.5 * ref[glass] + 0.5 * np.array([0, 120, 255])).astype(np.uint8)
    f = max(1, 500 // max(rgb.shape[:2]))
    img = cv2.resize(np.hstack([rgb, tint, ref]), None, fx=f, fy=f, interpolation=cv2.INTER_NEAREST)
    cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))


def measure(path: Path, mask_mpp: float, fallback_mpp: float, repeat: int,
            truth: np.ndarray | None = None, overlays: Path | None = None) -> dict:
    import slidekit as sk

    row: dict = {"slide": path.name}
    try:
        slide = sk.open_slide(path)
    except sk.MissingMPPError:
        slide = sk.open_slide(path, mpp=fallback_mpp)
        row["mpp_note"] = f"no MPP in metadata: {fallback_mpp} assumed"
    with slide:
        row["slide_mpp"] = slide.mpp[0]
        best, mask = float("inf"), None
        try:
            for _ in range(repeat):
                t = time.perf_counter()
                mask = sk.tissue_mask(slide, mpp=mask_mpp)
                best = min(best, time.perf_counter() - t)
        except sk.TissueError as e:
            row["error"] = str(e).replace(str(path), path.name)
        view = slide.read_whole(mask_mpp)
    row["view"] = list(view.shape[:2])
    if mask is None:
        return row
    row["seconds"] = round(best, 4)
    row["tissue_fraction"] = float(mask.array.mean())
    row.update(score_mask(mask.array, view, mask_mpp))
    if truth is not None:
        t = cv2.resize(truth.astype(np.float32), view.shape[1::-1], interpolation=cv2.INTER_AREA) >= 0.5
        row["truth_recall"] = float(mask.array[t].mean())
        row["truth_glass"] = float(mask.array[~t].mean())
    if overlays is not None:
        overlays.mkdir(parents=True, exist_ok=True)
        overlay(view, mask.array, glass_reference(view)[0], overlays / f"{path.name}.png")
    return row


def fmt(v: float | None) -> str:
    return "   n/a" if v is None else f"{v:6.3f}"


def main() -> None:
    from slidekit.base.datapaths import add_data_argument, data_dir
    from slidekit.slides.demo import demo_image, write_demo_slide

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_argument(ap)
    ap.add_argument("--json", type=Path, default=None, help="write the rows here")
    ap.add_argument("--mask-mpp", type=float, default=8.0)
    ap.add_argument("--fallback-mpp", type=float, default=0.25, help="for slides without MPP metadata")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--overlays", type=Path, default=None, help="write view | mask | glass PNGs here")
    args = ap.parse_args()

    wsi = data_dir(args.data) / "wsi"
    slides = sorted(p for p in wsi.iterdir() if p.is_file()) if wsi.is_dir() else []
    if not slides:
        print(f"no slides in {wsi}: only the demo slide is measured")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        demo = write_demo_slide(Path(tmp) / "demo.tif")
        rows.append(measure(demo, args.mask_mpp, args.fallback_mpp, args.repeat,
                            truth=demo_image()[1], overlays=args.overlays))
        for p in slides:
            rows.append(measure(p, args.mask_mpp, args.fallback_mpp, args.repeat, overlays=args.overlays))

    print(f"{'slide':30s} {'recall':>6s} {'glass':>6s} {'g_far':>6s} {'tissue':>6s} {'sec':>6s}  note")
    for r in rows:
        note = r.get("error") or r.get("mpp_note") or ""
        if "truth_recall" in r:
            note = f"vs true outline: recall {r['truth_recall']:.3f}, glass {r['truth_glass']:.3f}"
        print(f"{r['slide'][:30]:30s} {fmt(r.get('recall'))} {fmt(r.get('glass'))} {fmt(r.get('glass_far'))} "
              f"{fmt(r.get('tissue_fraction'))} {fmt(r.get('seconds'))}  {note}")
    if args.json:
        args.json.write_text(json.dumps({"mask_mpp": args.mask_mpp, "glass_tol": GLASS_TOL,
                                         "open_glass_um": OPEN_GLASS_UM, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
