"""Synthetic slide-QC artefacts drawn onto real tissue, with their true masks (issue 31).

The canvas is real tissue read from a shared slide at 1 µm/px (CMU-1-Small-Region, H&E, or the
OS-2 Ki67 crop), mirrored out to ``size`` px so that it has no seams. Onto it ``draw_artefacts``
paints, at non-overlapping random places (one ``numpy`` generator per seed):

- **Out of focus**: an ellipse of tissue replaced by its Gaussian blur (σ 3-6 µm: a few depths of field).
- **Fold**: a band where the tissue lies doubled: optical densities add (Beer-Lambert), the flap
  being half the tissue itself and half the tissue 300-600 µm away (scaled by 0.8-1), so the band is
  darker and more saturated in the tissue's own colours.
- **Air bubble**: a disc with a dark neutral rim 8-16 µm thick and a paler, lower-contrast interior
  (light scattered at the air/medium boundary; the whole disc is the artefact).
- **Pen ink**: strokes 60-150 µm wide in green, blue, black or red; the ink's transmittance multiplies
  what lies under it (ink over tissue is darker than ink over glass; red over eosin stays red).

Masks are level-0 booleans; ``on_raster`` takes them to a coarser label raster for scoring.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

MPP = 1.0
#: Ink colours as seen over clean glass (their transmittance is colour / 255).
INKS = {"green": (20, 150, 80), "blue": (30, 60, 200), "black": (25, 25, 30), "red": (215, 25, 35)}
SOURCES = {"cmu1": "CMU-1-Small-Region.svs", "os2": "OS-2-ndpi.ome.tif"}
CLASSES = ("Out of focus", "Fold", "Air bubble", "Pen ink")


def real_tissue(data: Path, source: str = "cmu1", size: int = 3072) -> np.ndarray:
    """Real tissue at 1 µm/px, mirrored (no seams) to ``size`` x ``size`` px."""
    from slidekit.slides.slide import open_slide

    rgb = open_slide(Path(data) / "wsi" / SOURCES[source]).read_whole(MPP, progress=False)
    while rgb.shape[0] < size or rgb.shape[1] < size:
        rgb = np.pad(rgb, ((0, min(rgb.shape[0], max(0, size - rgb.shape[0]))),
                           (0, min(rgb.shape[1], max(0, size - rgb.shape[1]))), (0, 0)), mode="symmetric")
    return np.ascontiguousarray(rgb[:size, :size])


def tissue_of(rgb: np.ndarray) -> np.ndarray:
    """Level-0 tissue of a clean canvas (the library's detector at 8 µm/px, brought back up)."""
    from slidekit.regions.tissue import detect_tissue

    f = 8
    small = cv2.resize(rgb, (rgb.shape[1] // f, rgb.shape[0] // f), interpolation=cv2.INTER_AREA)
    t = detect_tissue(small, MPP * f, remove_pen=False).astype(np.uint8)
    return cv2.resize(t, (rgb.shape[1], rgb.shape[0]), interpolation=cv2.INTER_NEAREST) > 0


def _od(rgb: np.ndarray) -> np.ndarray:
    return -np.log(np.maximum(rgb.astype(np.float32), 1.0) / 255.0)


def _from_od(od: np.ndarray) -> np.ndarray:
    return np.clip(255.0 * np.exp(-od), 0, 255).astype(np.uint8)


def _place(rng: np.random.Generator, free: np.ndarray, tissue: np.ndarray, r: int) -> tuple[int, int] | None:
    """A centre on tissue whose r-neighbourhood is free (rejection sampling)."""
    ys, xs = np.nonzero(tissue[r:-r:8, r:-r:8])
    for _ in range(200):
        if not len(ys):
            return None
        i = int(rng.integers(len(ys)))
        y, x = int(ys[i] * 8 + r), int(xs[i] * 8 + r)
        if free[y - r:y + r, x - r:x + r].all():
            return x, y
    return None


def draw_artefacts(rgb: np.ndarray, seed: int, *, inks: tuple[str, ...] | None = None,
                   n_pen: int = 2) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``rgb`` (real tissue, 1 µm/px) with one blur, one fold, one bubble and ``n_pen`` ink strokes
    drawn at non-overlapping places; returns the image and level-0 masks per class (``CLASSES``, plus
    ``"ink <colour>"`` per stroke colour and ``"tissue"``)."""
    rng = np.random.default_rng(seed)
    out = rgb.copy()
    H, W = rgb.shape[:2]
    tissue = tissue_of(rgb)
    free = np.ones((H, W), bool)
    masks: dict[str, np.ndarray] = {"tissue": tissue}

    def claim(m: np.ndarray, gap: int = 60) -> None:
        free[cv2.dilate(m.astype(np.uint8), np.ones((2 * gap + 1, 2 * gap + 1), np.uint8)) > 0] = False

    # out of focus
    a, b = int(rng.integers(250, 450)), int(rng.integers(250, 450))
    c = _place(rng, free, tissue, max(a, b) + 10)
    m = np.zeros((H, W), np.uint8)
    if c is not None:
        cv2.ellipse(m, c, (a, b), float(rng.uniform(0, 180)), 0, 360, 1, -1)
        sigma = float(rng.uniform(3, 6)) / MPP
        x0, y0 = max(0, c[0] - max(a, b) - 40), max(0, c[1] - max(a, b) - 40)
        x1, y1 = min(W, c[0] + max(a, b) + 40), min(H, c[1] + max(a, b) + 40)
        blurred = cv2.GaussianBlur(out[y0:y1, x0:x1], (0, 0), sigma)
        sel = m[y0:y1, x0:x1] > 0
        out[y0:y1, x0:x1][sel] = blurred[sel]
    masks["Out of focus"] = (m > 0) & tissue
    claim(m > 0)
    # fold: doubled tissue along a band
    width, length = int(rng.integers(150, 300)), int(rng.integers(600, 1200))
    c = None
    while c is None and length >= 300:  # shorter when no free place holds it
        c = _place(rng, free, tissue, length // 2 + width // 2)
        length = length if c is not None else int(length * 0.75)
    m = np.zeros((H, W), np.uint8)
    if c is not None:
        ang = rng.uniform(0, np.pi)
        d = np.array([np.cos(ang), np.sin(ang)]) * length / 2
        cv2.line(m, (int(c[0] - d[0]), int(c[1] - d[1])), (int(c[0] + d[0]), int(c[1] + d[1])), 1, width)
        shift = rng.uniform(300, 600) * np.array([np.cos(ang + np.pi / 2), np.sin(ang + np.pi / 2)])
        other = np.roll(rgb, (int(shift[1]), int(shift[0])), axis=(0, 1))
        other_t = np.roll(tissue, (int(shift[1]), int(shift[0])), axis=(0, 1))
        sel = (m > 0) & tissue
        k = float(rng.uniform(0.8, 1.0))
        own = _od(out[sel])
        # the flap: the tissue folded back over itself, half its own layer and half the shifted one
        flap = 0.5 * own + 0.5 * np.where(other_t[sel][:, None], _od(other[sel]), own)
        od = own + k * flap
        out[sel] = _from_od(od)
    masks["Fold"] = (m > 0) & tissue
    claim(m > 0)
    # air bubble: dark rim, paler interior
    r = int(rng.integers(200, 450))
    c = _place(rng, free, tissue, r + 20)
    m = np.zeros((H, W), np.uint8)
    if c is not None:
        cv2.circle(m, c, r, 1, -1)
        rim = np.zeros((H, W), np.uint8)
        cv2.circle(rim, c, r - 6, 1, int(rng.integers(8, 16)))
        inside = (m > 0) & (rim == 0)
        wash = float(rng.uniform(0.3, 0.5))
        out[inside] = (out[inside] + (255 - out[inside].astype(np.float32)) * wash).astype(np.uint8)
        grey = np.float32(rng.uniform(70, 110))
        rimsel = rim > 0
        out[rimsel] = (out[rimsel] * 0.25 + grey * 0.75).astype(np.uint8)
        m |= rim
    masks["Air bubble"] = m > 0
    claim(m > 0)
    # pen strokes
    colours = inks or tuple(INKS)
    pen = np.zeros((H, W), bool)
    for i in range(n_pen):
        colour = colours[(seed * n_pen + i) % len(colours)]
        w = int(rng.integers(60, 150))
        c = _place(rng, free, np.ones_like(tissue), 500)
        if c is None:
            continue
        pts = [c]
        for _ in range(3):
            p = pts[-1]
            ang = rng.uniform(0, 2 * np.pi)
            pts.append((int(np.clip(p[0] + 350 * np.cos(ang), w, W - w)),
                        int(np.clip(p[1] + 350 * np.sin(ang), w, H - w))))
        s = np.zeros((H, W), np.uint8)
        cv2.polylines(s, [np.array(pts, np.int32)], False, 1, w)
        s = (s > 0) & free
        trans = (np.array(INKS[colour], np.float32) / 255.0) ** np.float32(rng.uniform(0.85, 1.15))
        noise = rng.normal(1.0, 0.03, (int(s.sum()), 1)).astype(np.float32)
        out[s] = np.clip(out[s] * trans * noise, 0, 255).astype(np.uint8)
        masks[f"ink {colour}"] = masks.get(f"ink {colour}", np.zeros((H, W), bool)) | s
        pen |= s
        claim(s)
    masks["Pen ink"] = pen
    return out, masks


def on_raster(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A level-0 mask on a coarser raster (a label pixel is in when at least half of it is)."""
    small = cv2.resize(mask.astype(np.float32), (shape[1], shape[0]), interpolation=cv2.INTER_AREA)
    return small >= 0.5


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    s = int(pred.sum()) + int(truth.sum())
    return 2.0 * int((pred & truth).sum()) / s if s else 1.0
