"""Slide QC detectors: classical artefact rules on overviews of the slide, one label map per slide.

The job (outputs, cohort, region) is :mod:`slidekit.regions.qc`.

Every detector works on a coarse view of the slide at the resolution it needs: colour and darkness
rules (pen ink, folds, dark debris, bubbles and coverslip edges) on the ``mpp`` view (default 8 µm/px,
read whole with ``Slide.read_whole``), the focus measure on a finer grey view (``blur_mpp``, default
2 µm/px, made coarser when it would exceed ``blur_max_pixels``) that is read from the slide block by block
(``Slide.read_scaled``) and never held whole. The result is one label map on the ``mpp`` raster
(``LABELS``: 0 glass, 1 clean tissue, 2.. one value per artefact class). Where classes overlap, the first
in ``ARTEFACTS`` wins (ink over debris over fold over edge over blur). Trained pixel classifiers (QC by
example, :mod:`slidekit.regions.qc_model`) add to the class they name.

The rules (thresholds in :class:`QcOptions`; docs/qc.md says why):

- **Pen ink**: blue/green/cyan by hue and saturation (the tissue detector's own rule,
  ``regions.tissue._pen_mask`` without its black part), red marker on eosin (hue within 15° of pure
  red, saturation above ``red_min_saturation``: eosin is pink-magenta and paler), and black marker:
  very dark connected areas that are stroke-shaped (long or sparse for their bounding box, or
  elongated: area over the area of the widest inscribed disc ≥ ``black_pen_min_elongation``) or
  larger than ``black_pen_min_um2``.
- **Dark debris**: very dark (max channel < ``dark_max_value``), nearly grey (chroma under
  ``debris_max_chroma``) blobs that are not stroke-shaped, of at least ``debris_min_um2``.
- **Fold**: stain-agnostic (:mod:`slidekit.regions.qc_fold`): tissue whose optical density (averaged
  over ``fold_smooth_um``) is ``fold_seed_ratio`` times the median density of the slide's clean
  tissue *of the same OD colour* (the share of each channel in the OD), grown into the connected
  tissue at least ``fold_grow_ratio`` times it, in areas of at least ``fold_min_um2``. A fold doubles
  the tissue it lies on (its colour stays, its density about doubles); dense nuclei, epidermis or
  DAB-positive cells are dark too but have a colour of their own, at which their density is normal.
- **Air bubble / edge**: air bubbles are round thin *grey* rims (Hough circles on the map of thin dark
  grey lines, refined, kept when ``bubble_min_rim`` of the circle is rim and clearly more than on the
  circles 15 % smaller and larger), filled with their interior. Coverslip edges are the other thin dark
  lines (black top-hat of the grey view above ``edge_contrast``) whose connected component is long
  (``edge_min_length_um``), thin for its length (``edge_max_width_um``) and sparse (bounding-box fill
  under ``edge_max_fill`` or aspect above 5), widened by one pixel; and a very dark stroke that the
  black-pen rule would take but that crosses the whole view (both ends on its border) and is straight
  (``edge_max_bend``): a hand-drawn marker line ends on the slide, the coverslip's edge runs off it.
- **Out of focus**: inside tissue only. Sharpness = local Laplacian energy divided by the local
  energy of the grey image's detail (the grey less its Gaussian blur of ``blur_band_um``; both
  box-averaged over ``blur_window_um``): a blurred image loses its finest frequencies faster than its
  detail, while pale but sharp stroma keeps the ratio (HistoQC's raw Laplacian calls pale stroma
  blurry). The detail, not the plain grey variance: holes and clefts in loose stroma are contrast at a
  scale far above focus, and against the plain variance they read as blur. Out of focus = sharpness
  below ``blur_ratio`` times the tissue's own median sharpness, in areas of at least
  ``blur_min_um2``. Relative to the slide: a slide blurred everywhere is not flagged; tissue with
  almost no contrast (variance under ``blur_min_variance``) is never called blurred.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Iterator, Sequence

import cv2
import numpy as np
from scipy import ndimage

from slidekit.base.io import file_identity
from slidekit.regions.qc_fold import FoldParams, fold_mask
from slidekit.regions.tissue import (
    PEN_HALO_UM,
    _disc,
    _keep_large,
    _pen_mask,
    detect_tissue,
    glass_colour,
)

#: Label map values: glass, clean tissue, then one per artefact class (the legend's order).
GLASS, TISSUE = 0, 1
ARTEFACTS = ("Pen ink", "Dark debris", "Fold", "Air bubble / edge", "Out of focus")
LABELS = {"Glass": GLASS, "Tissue": TISSUE, **{name: i + 2 for i, name in enumerate(ARTEFACTS)}}
COLORS = {"Glass": (255, 255, 255), "Tissue": (80, 200, 120), "Pen ink": (0, 90, 255),
          "Dark debris": (60, 60, 60), "Fold": (200, 0, 200), "Air bubble / edge": (0, 200, 220),
          "Out of focus": (255, 160, 0)}
#: The verdict's threshold field of each class.
THRESHOLD_OF = {"Pen ink": "max_pen", "Dark debris": "max_debris", "Fold": "max_fold",
                "Air bubble / edge": "max_bubble", "Out of focus": "max_blur"}


@dataclass(frozen=True)
class QcOptions:
    """QC detector thresholds and the verdict's limits (fractions of the tissue area).

    Parameters
    ----------
    mpp
        µm/px of the label map and of the colour rules (the slide's own when coarser).
    blur_mpp, blur_max_pixels, blur_max_mpp
        µm/px of the focus measure's grey view, made coarser when it would exceed this many pixels;
        no focus call at all (class "not measured") when that is coarser than ``blur_max_mpp``.
    blur_window_um, blur_ratio, blur_min_um2, blur_min_variance
        Focus measure window, the fraction of the tissue's median sharpness below which tissue is out
        of focus, the smallest area kept, the grey variance under which no focus call is made.
    blur_band_um
        σ of the Gaussian whose residual (the grey less its blur) is the detail the Laplacian's energy
        is divided by: contrast coarser than this (holes, clefts, the tissue's edge) does not count.
    red_min_saturation
        Saturation (0-255) above which red hues are red marker rather than eosin.
    pen_rim_contrast
        Pixels within ``regions.tissue.PEN_HALO_UM`` of ink that are this many grey levels darker
        than the glass (and not H&E-coloured) are the stroke's rim: ink too.
    dark_max_value, black_pen_min_um2, black_pen_min_elongation, debris_min_um2, debris_max_chroma
        "Very dark" (max channel below this), dark areas at least this large are black pen whatever
        their shape, or at least this elongated (area over the area of the widest inscribed disc), the
        smallest debris blob, debris' largest chroma (max - min of RGB).
    fold_mpp, fold_smooth_um, fold_seed_ratio, fold_grow_ratio, fold_close_um, fold_min_um2, fold_min_spread
        Fold (:func:`slidekit.regions.qc_fold.fold_mask`): µm/px of the density ratio, Gaussian σ of the
        optical density averaged over the tissue, the ratio to the slide's median density at that OD
        colour that seeds a fold and the one it grows into, the closing radius, the smallest fold, and
        the least spread of the OD colour's channel shares (neutral grey is no stain, so no fold).
    edge_contrast, edge_min_length_um, edge_max_fill, edge_max_width_um
        Edge lines: black top-hat depth (grey levels), shortest line, largest bounding-box fill, largest
        mean width (area over length: a line, not a network of dark tissue texture).
    edge_max_bend
        A very dark stroke that crosses the view (both its ends on the view's border) is a coverslip
        edge, not black pen, when it is this straight: the spread of its pixels across its axis (sd)
        over its length.
    bubble_min_radius_um, bubble_max_radius_um, bubble_min_rim, bubble_max_chroma
        Air bubbles: radius range, the share of the circle that must be a thin dark rim, the largest
        chroma (max - min of RGB) of rim pixels (rims are grey, not stained).
    max_pen, max_blur, max_fold, max_debris, max_bubble
        The verdict fails when a class covers more than this fraction of the tissue.
    models
        QC-by-example model files (``slidekit.regions.qc_model.QcModel.save``; ``slidekit qc-train``):
        each adds what it finds to the QC class it was trained for.
    """

    mpp: float = 8.0
    blur_mpp: float = 2.0
    blur_max_pixels: int = 40_000_000
    blur_max_mpp: float = 8.0
    blur_window_um: float = 48.0
    blur_ratio: float = 0.4
    blur_min_um2: float = 40_000.0
    blur_min_variance: float = 4.0
    blur_band_um: float = 16.0
    red_min_saturation: int = 170
    pen_rim_contrast: float = 30.0
    dark_max_value: int = 60
    black_pen_min_um2: float = 200_000.0
    black_pen_min_elongation: float = 4.0
    debris_min_um2: float = 500.0
    debris_max_chroma: int = 40
    fold_mpp: float = 16.0
    fold_smooth_um: float = 16.0
    fold_seed_ratio: float = 1.7
    fold_grow_ratio: float = 1.5
    fold_close_um: float = 16.0
    fold_min_um2: float = 10_000.0
    fold_min_spread: float = 0.04
    edge_contrast: float = 25.0
    edge_min_length_um: float = 800.0
    edge_max_fill: float = 0.25
    edge_max_width_um: float = 40.0
    edge_max_bend: float = 0.03
    bubble_min_radius_um: float = 80.0
    bubble_max_radius_um: float = 3000.0
    bubble_min_rim: float = 0.6
    bubble_max_chroma: int = 60
    bubble_hough_roundness: float = 0.4
    max_pen: float = 0.05
    max_blur: float = 0.1
    max_fold: float = 0.1
    max_debris: float = 0.05
    max_bubble: float = 0.1
    models: tuple[str, ...] = ()

    def fold_params(self) -> FoldParams:
        """The fold rule's settings: each ``fold_<name>`` field as ``FoldParams.<name>``."""
        return FoldParams(**{f.name: getattr(self, "fold_" + f.name) for f in fields(FoldParams)})

    def as_dict(self) -> dict:
        """The configuration a run records: every threshold, and each QC-by-example model file by its
        identity (path, size, time), only when there are models (so earlier runs keep their key)."""
        d = asdict(self)
        models = d.pop("models")
        if models:
            d["models"] = [file_identity(m) for m in models]
        return d


def _components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    return labels, stats


def _stroke_like(stats: np.ndarray, min_px: int, *, max_fill: float = 0.35, min_aspect: float = 3.0) -> np.ndarray:
    """Per component: long and thin (aspect of its bounding box, or a low bounding-box fill)."""
    w, h, area = stats[:, 2].astype(float), stats[:, 3].astype(float), stats[:, 4].astype(float)
    aspect = np.maximum(w, h) / np.maximum(np.minimum(w, h), 1)
    fill = area / np.maximum(w * h, 1)
    return (area >= min_px) & ((aspect >= min_aspect) | (fill <= max_fill))


def tissue_like(hsv: np.ndarray, rgb: np.ndarray) -> np.ndarray:
    """H&E-coloured pixels (pink to purple hues, clearly saturated): never taken as an ink rim."""
    hue = hsv[..., 0]  # OpenCV's 8-bit hue, degrees / 2: 260° <= hue < 345°
    return ((hue >= 130) & (hue < 173)) & (hsv[..., 1] > 40)


def _ring_coverage(grey: np.ndarray, neutral: np.ndarray, x: np.ndarray, y: np.ndarray, r: np.ndarray,
                   contrast: float) -> np.ndarray:
    """Per circle (x, y, r) (arrays): the share of it (inside the image) on a thin grey dark line: the
    darkest of the circle's pixels within one pixel radially is ``neutral`` (unstained) and
    ``contrast`` darker than both the grey 20 % inside and 20 % outside the circle."""
    x, y, r = (np.atleast_1d(np.asarray(v, np.float32))[:, None] for v in (x, y, r))
    n = max(32, int(2 * np.pi * float(r.max())))
    th = np.linspace(0, 2 * np.pi, n, endpoint=False, dtype=np.float32)
    c, s = np.cos(th)[None], np.sin(th)[None]
    H, W = grey.shape

    def at(rr: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        xs, ys = np.round(x + rr * c).astype(np.int32), np.round(y + rr * s).astype(np.int32)
        ok = (xs >= 0) & (xs < W) & (ys >= 0) & (ys < H)
        xs, ys = np.clip(xs, 0, W - 1), np.clip(ys, 0, H - 1)
        return grey[ys, xs].astype(np.float32), neutral[ys, xs], ok

    rims = [at(r + d) for d in (-1.0, 0.0, 1.0)]
    pick = np.argmin(np.stack([g for g, _, _ in rims]), axis=0)
    rim = np.choose(pick, [g for g, _, _ in rims])
    grey_rim = np.choose(pick, [nn for _, nn, _ in rims])
    inner, _, ok_in = at(np.maximum(1.0, 0.8 * r - 1))
    outer, _, ok_out = at(1.2 * r + 1)
    # the circle's own samples: as many as its circumference (a small circle is not over-counted)
    own = np.arange(n)[None] * np.maximum(1.0, 2 * np.pi * r) / n
    own = np.floor(own) != np.floor(np.roll(own, 1, axis=1))
    ok = rims[1][2] & ok_in & ok_out & own
    dark = (rim < inner - contrast) & (rim < outer - contrast) & grey_rim & ok
    total = own.sum(1)
    cov = dark.sum(1) / np.maximum(ok.sum(1), 1)
    return np.where(ok.sum(1) * 3 >= total, cov, 0.0)


def _specific_coverage(grey: np.ndarray, neutral: np.ndarray, x: np.ndarray, y: np.ndarray, r: np.ndarray,
                       contrast: float) -> tuple[np.ndarray, np.ndarray]:
    """(coverage of each circle, its coverage less that of the circles 15 % smaller and larger): a real
    rim lies on one circle; dark texture covers every circle about equally."""
    cov = _ring_coverage(grey, neutral, x, y, r, contrast)
    near = np.maximum(_ring_coverage(grey, neutral, x, y, 0.85 * np.asarray(r), contrast),
                      _ring_coverage(grey, neutral, x, y, 1.15 * np.asarray(r), contrast))
    return cov, cov - near


def air_bubbles(rgb: np.ndarray, grey: np.ndarray, lines: np.ndarray, mpp: float, o: QcOptions) -> np.ndarray:
    """Air bubbles: round thin grey rims, filled (the bubble is its rim and interior).

    Candidate circles come from OpenCV's Hough transform (``HOUGH_GRADIENT_ALT``) on the map of dark
    grey lines; each is refined over centres and radii within 12 px to the circle with the most rim,
    and kept when at least ``bubble_min_rim`` of it is a thin grey line darker than both sides and at
    least ``bubble_min_rim / 2`` more than the circles 15 % smaller and larger."""
    out = np.zeros(grey.shape, np.uint8)
    rmin, rmax = max(3, int(o.bubble_min_radius_um / mpp)), max(4, int(o.bubble_max_radius_um / mpp))
    img = cv2.GaussianBlur(lines.astype(np.uint8) * 255, (0, 0), 1.0)
    del lines  # (a temporary of the caller's: freed before the transform's own buffers, QC's largest)
    found = cv2.HoughCircles(img, cv2.HOUGH_GRADIENT_ALT, dp=1.5, minDist=rmin, param1=150,
                             param2=o.bubble_hough_roundness, minRadius=rmin, maxRadius=rmax)
    del img
    if found is None:
        return out > 0
    neutral = np.subtract(rgb.max(-1), rgb.min(-1)) <= o.bubble_max_chroma  # chroma (uint8: max >= min)
    coarse, fine = (np.meshgrid(d, d, d, indexing="ij") for d in (np.arange(-12, 13, 3.0), np.arange(-2, 3.0)))
    for x, y, r in found[0][:200]:
        for grid in (coarse, fine):  # refine: coarse steps of 3 px over +-12 px, then 1 px steps
            tx, ty, tr = x + grid[0].ravel(), y + grid[1].ravel(), np.maximum(rmin, r + grid[2].ravel())
            cov = _ring_coverage(grey, neutral, tx, ty, tr, o.edge_contrast)
            top = np.argsort(cov)[::-1][:8]
            x, y, r = tx[top[0]], ty[top[0]], tr[top[0]]
        if cov[top[0]] < o.bubble_min_rim:
            continue
        cov_t, specific = _specific_coverage(grey, neutral, tx[top], ty[top], tr[top], o.edge_contrast)
        ok = (cov_t >= o.bubble_min_rim) & (specific >= o.bubble_min_rim / 2)
        if ok.any():
            i = top[int(np.argmax(np.where(ok, specific, -1)))]
            cv2.circle(out, (int(round(float(tx[i]))), int(round(float(ty[i])))), int(round(float(tr[i]))) + 1, 1, -1)
    return out > 0


def _crossing_lines(labels: np.ndarray, stats: np.ndarray, candidates: np.ndarray, max_bend: float) -> np.ndarray:
    """Which ``candidates`` (component numbers of ``labels``) cross the view: both ends of the component
    (its pixels within one width of either extreme along its main axis) touch the view's border, and
    it is straight (sd of its pixels across the axis at most ``max_bend`` times its length)."""
    H, W = labels.shape
    out = np.zeros(len(stats), bool)
    for i in np.flatnonzero(candidates):
        x, y, w, h = (int(v) for v in stats[i, :4])
        if x > 0 and y > 0 and x + w < W and y + h < H:
            continue  # touches no border at all
        ys, xs = np.nonzero(labels[y:y + h, x:x + w] == i)
        pts = np.stack([xs + x, ys + y], 1).astype(np.float64)
        centred = pts - pts.mean(0)
        values, vectors = np.linalg.eigh(np.cov(centred.T))
        along, across = centred @ vectors[:, 1], centred @ vectors[:, 0]
        length = float(np.ptp(along))
        if length <= 0 or float(np.sqrt(max(values[0], 0.0))) > max_bend * length:
            continue
        reach = max(2.0, float(np.ptp(across)))  # an end: the pixels within one width of the extreme
        on_border = (pts[:, 0] <= 0) | (pts[:, 1] <= 0) | (pts[:, 0] >= W - 1) | (pts[:, 1] >= H - 1)
        out[i] = bool(on_border[along <= along.min() + reach].any() and on_border[along >= along.max() - reach].any())
    return out


def _ink_and_debris(rgb: np.ndarray, hsv: np.ndarray, chroma: np.ndarray, mpp: float,
                    o: QcOptions) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Pen ink (with its rim), dark pixels, dark debris and very dark straight lines crossing the view
    (coverslip edges: ``_crossing_lines``) of an RGB view (its HSV and chroma given). A function of its
    own so that its planes (labels, distances, halo) are freed before the folds."""
    px = mpp * mpp
    hue, sat, val = hsv[..., 0], hsv[..., 1], hsv[..., 2]  # OpenCV's 8-bit hue: degrees / 2
    # colour ink: the tissue detector's blue/green rule (its black part is judged by shape below)
    coloured = _pen_mask(rgb, hsv) & ~(val < 40)
    # red: hue >= 345° or <= 15°, compared in half degrees (no int16 planes of the whole view)
    red = ((hue >= 173) | (hue <= 7)) & (sat > o.red_min_saturation) & (val > 80)
    ink = cv2.medianBlur((coloured | red).astype(np.uint8), 3) > 0
    dark = (val < o.dark_max_value)
    not_he = ~tissue_like(hsv, rgb)  # (where an ink rim may be: the HSV planes are not held past here)
    del hsv, hue, sat, val
    labels, stats = _components(dark)
    stroke = _stroke_like(stats, max(1, round(o.debris_min_um2 / px))) | (stats[:, 4] >= o.black_pen_min_um2 / px)
    # elongated for its thickness (area over the area of its widest inscribed disc): a bent stroke whose
    # bounding box is full is still a stroke; a blob of debris is about one disc
    if len(stats) > 1:
        half_width = ndimage.maximum(cv2.distanceTransform(dark.astype(np.uint8), cv2.DIST_L2, 3), labels,
                                     np.arange(len(stats)))
        elongation = stats[:, 4] / (np.pi * np.maximum(np.asarray(half_width), 0.5) ** 2)
        stroke |= (elongation >= o.black_pen_min_elongation) & (stats[:, 4] >= o.debris_min_um2 / px)
    stroke[0] = False
    # a stroke-shaped dark line that runs straight off the view at both ends is the coverslip's edge
    crossing = _crossing_lines(labels, stats, stroke, o.edge_max_bend)
    black = (stroke & ~crossing)[labels]
    ink |= black
    # the rim of a stroke is paler than its ink but still darker than the glass: it goes with the
    # ink (within ``PEN_HALO_UM``), so it is not read as a fold or an edge
    if ink.any():
        halo = cv2.dilate(ink.astype(np.uint8), _disc(max(1, round(PEN_HALO_UM / mpp)))) > 0
        glass_grey = float(glass_colour(rgb).mean())
        # (the mean grey compared as a sum of three uint8s: no float plane of the whole view)
        ink |= halo & (rgb.sum(-1, dtype=np.uint16) < 3 * (glass_grey - o.pen_rim_contrast)) \
            & not_he
    debris_ok = (stats[:, 4] >= max(1, round(o.debris_min_um2 / px))) & ~stroke
    debris_ok[0] = False
    debris = debris_ok[labels] & (chroma <= o.debris_max_chroma)
    edge = crossing[labels]
    del labels  # (int32, the raster's largest plane here: not held beside _keep_large's own labels)
    debris = _keep_large(debris, round(o.debris_min_um2 / px)) & ~ink
    return ink, dark, debris, edge


def colour_artefacts(rgb: np.ndarray, mpp: float, tissue: np.ndarray, o: QcOptions) -> dict[str, np.ndarray]:
    """Pen ink, dark debris, folds and edges of an RGB view whose pixels are ``mpp`` µm wide."""
    # chroma (max - min), not HSV saturation, which blows up on near-black (and JPEG-tinted) pixels
    chroma = np.subtract(rgb.max(-1), rgb.min(-1))  # uint8: max >= min
    # thin dark lines (rims of bubbles, coverslip edges) and the bubbles' round rims come first, while
    # little else is held: the Hough transform's own buffers are QC's largest (~15 bytes a pixel)
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    hat = cv2.morphologyEx(grey, cv2.MORPH_BLACKHAT, _disc(max(1, round(16.0 / mpp)))) > o.edge_contrast
    round_rims = air_bubbles(rgb, grey, hat & (chroma <= o.bubble_max_chroma), mpp, o)
    del grey
    ink, dark, debris, crossing = _ink_and_debris(rgb, cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV), chroma, mpp, o)
    del chroma
    # folds: tissue much denser than the slide's tissue of the same OD colour (regions.qc_fold), where
    # there is no ink and nothing very dark (debris is very dark: one plane for the three)
    dark |= ink
    fold = fold_mask(rgb, mpp, tissue, dark, o.fold_params())
    del dark
    # air bubbles: round grey rims, filled; edges: the other thin dark lines, long for their area
    # (the Hough transform saw every grey line: cutting ink and folds out of the map breaks its circles)
    bubble = round_rims & ~ink & ~debris
    hat &= ~ink & ~fold & ~debris
    labels, stats = _components(hat & ~cv2.dilate(bubble.astype(np.uint8), _disc(2)).astype(bool))
    long = np.maximum(stats[:, 2], stats[:, 3]) * mpp >= o.edge_min_length_um
    # thin: its area over its length is a line's width, not a network's (dark tissue texture)
    thin = stats[:, 4] <= np.maximum(stats[:, 2], stats[:, 3]) * max(1.0, o.edge_max_width_um / mpp)
    edge_ok = long & thin & _stroke_like(stats, 1, max_fill=o.edge_max_fill, min_aspect=5.0)
    edge_ok[0] = False
    edge = cv2.dilate(edge_ok[labels].astype(np.uint8), _disc(1)) > 0
    edge = (edge | bubble | crossing) & ~ink & ~debris
    fold &= ~bubble
    return {"Pen ink": ink, "Dark debris": debris, "Fold": fold, "Air bubble / edge": edge}


def sharpness(grey: np.ndarray, mpp: float, window_um: float, min_variance: float, *,
              band_um: float = 16.0) -> np.ndarray:
    """Local Laplacian energy over the local energy of the detail (the grey less its Gaussian blur of
    σ ``band_um``), both box-averaged over ``window_um`` (float32, NaN where the grey variance is under
    ``min_variance``).

    Parameters
    ----------
    grey
        Grey view, ``(H, W)``.
    mpp
        Its µm/px.
    window_um
        Width of the box both energies are averaged over.
    min_variance
        Grey variance (over the window) under which no value is given: too little contrast to judge.
    band_um
        σ of the blur that the detail is the residual of. Contrast at coarser scales (holes, clefts in
        loose stroma) raises the plain variance but not the Laplacian's energy: it would read as blur.

    Returns
    -------
    numpy.ndarray
        The sharpness, float32 of ``grey``'s shape.
    """
    # in place wherever it can be: at most four float planes of the band at once
    g = grey.astype(np.float32)
    k = _window_px(window_um, mpp)
    energy = cv2.Laplacian(g, cv2.CV_32F, ksize=1)
    np.multiply(energy, energy, out=energy)
    cv2.boxFilter(energy, -1, (k, k), dst=energy)
    mean = cv2.boxFilter(g, -1, (k, k))
    var = np.multiply(g, g)
    cv2.boxFilter(var, -1, (k, k), dst=var)
    np.multiply(mean, mean, out=mean)
    low_contrast = (var - mean) < min_variance
    del mean, var
    r = _detail_reach(band_um, mpp)
    detail = cv2.GaussianBlur(g, (2 * r + 1, 2 * r + 1), max(band_um / mpp, 0.5))
    np.subtract(detail, g, out=detail)
    del g
    np.multiply(detail, detail, out=detail)
    cv2.boxFilter(detail, -1, (k, k), dst=detail)
    np.maximum(detail, np.float32(1e-6), out=detail)
    np.divide(energy, detail, out=energy)
    energy[low_contrast] = np.nan
    return energy


def _window_px(window_um: float, mpp: float) -> int:
    """Width in pixels (odd, at least 3) of the box ``sharpness`` averages over: ``focus_on_raster``'s
    margin is half of it (and the detail's reach)."""
    return max(3, int(round(window_um / mpp)) | 1)


def _detail_reach(band_um: float, mpp: float) -> int:
    """Half-width in pixels of the detail's Gaussian kernel (cut at 3 sigma): ``sharpness`` blurs with
    it, and ``focus_on_raster`` adds it to its bands' margin."""
    return int(np.ceil(3 * max(band_um / mpp, 0.5)))


def focus_artefact(slide: Any, shape: tuple[int, int], mpp: float, tissue: np.ndarray, o: QcOptions,
                   progress: bool | None) -> np.ndarray | None:
    """Out-of-focus tissue on the ``shape`` raster of ``mpp`` µm/px (the grey view at ``blur_mpp``), or
    None when the slide is too coarse for it (its µm/px above ``blur_max_mpp``)."""
    W, H = slide.dimensions
    mx, my = slide.mpp
    bmpp = max(o.blur_mpp, mx, my)
    n = (W * mx / bmpp) * (H * my / bmpp)
    if n > o.blur_max_pixels:
        bmpp *= float(np.sqrt(n / o.blur_max_pixels))
    if bmpp > o.blur_max_mpp:
        return None  # too coarse to see focus: not measured (an overview image)
    # a whole number of grey pixels per label pixel, so that blocks of label pixels map onto grey ones
    f = max(1, int(np.floor(mpp / min(bmpp, mpp) + 1e-6)))
    bmpp = mpp / f
    pixels = _block_pixels(slide, bmpp)
    read_size = _Blocks.of(shape, f, _margin(o, bmpp), pixels).read_size  # (the blocks focus_on_raster reads)
    with slide.tile_cache(_tile_cache_bytes(slide, bmpp, *read_size)):
        s = focus_on_raster(_grey_reader(slide, bmpp), f, shape, bmpp, o, block_pixels=pixels)
    inside = tissue & np.isfinite(s)
    if inside.sum() < 10:
        return np.zeros(shape, bool)
    ref = float(np.median(s[inside], overwrite_input=True))  # (a copy of its own already: no second one)
    blur = inside & (s < o.blur_ratio * ref)
    blur = cv2.morphologyEx(blur.astype(np.uint8), cv2.MORPH_OPEN, _disc(1)) > 0
    return _keep_large(blur, round(o.blur_min_um2 / (mpp * mpp))) & tissue


def _grey_reader(slide: Any, bmpp: float) -> Callable[[int, int, int, int], np.ndarray]:
    """Rows ``g0:g1`` and columns ``x0:x1`` of the slide's grey view at ``bmpp`` µm/px, read from the
    slide (``Slide.read_scaled``) and edge-padded where the raster runs past the slide."""
    W, H = slide.dimensions
    mx, my = slide.mpp
    gw, gh = max(1, int(W * mx / bmpp)), max(1, int(H * my / bmpp))

    def block(g0: int, g1: int, x0: int, x1: int) -> np.ndarray:
        a, b = min(g0, gh - 1), max(min(g1, gh), min(g0, gh - 1) + 1)
        left, right = min(x0, gw - 1), max(min(x1, gw), min(x0, gw - 1) + 1)
        y, x = min(H - 1, int(round(a * bmpp / my))), min(W - 1, int(round(left * bmpp / mx)))
        rgb = slide.read_scaled((x, y), (right - left, b - a), bmpp)
        grey = cv2.cvtColor(np.ascontiguousarray(rgb[..., :3]), cv2.COLOR_RGB2GRAY)
        rows = np.clip(np.arange(g0, g1) - a, 0, grey.shape[0] - 1)
        cols = np.clip(np.arange(x0, x1) - left, 0, grey.shape[1] - 1)
        return grey[rows[:, None], cols[None, :]]

    return block


def _tile_cache_bytes(slide: Any, bmpp: float, width: int | None = None, height: int | None = None) -> int | None:
    """Decoded-tile cache (bytes of RGBA tiles) for reads that go down the slide, each starting where the
    last one ended less its margin: without ``width``/``height``, two rows of stored tiles across the
    level. With a read's ``width`` and ``height`` in grey pixels at ``bmpp``: every tile such a read
    touches and one more row of them. The next read's first rows are then still cached however
    OpenSlide orders a read's tiles (with two rows, reading a tile row twice made the TCGA section's
    reads twice as slow), while the cache does not grow with the slide. None (the backend's default)
    where the level's tile size is not known."""
    level = slide.best_level_for_mpp(bmpp)
    tile = slide.tile_size(level)
    if tile is None:
        return None
    lw, lh = slide.level_dimensions[level]
    across, rows = -(-lw // tile[0]), 2
    ds = float(slide.level_downsamples[level])
    if width is not None:  # the read's width on the level, and one tile more where it starts inside one
        across = min(across, -(-int(np.ceil(width * bmpp / (slide.mpp[0] * ds))) // tile[0]) + 1)
    if height is not None:
        rows = min(-(-lh // tile[1]), -(-int(np.ceil(height * bmpp / (slide.mpp[1] * ds))) // tile[1]) + 2)
    return rows * across * tile[0] * tile[1] * 4


def _block_pixels(slide: Any, bmpp: float, max_level_pixels: int = 1 << 22) -> int:
    """Grey pixels in a block's core: at most 2^18, and such that its read decodes at most
    ``max_level_pixels`` pixels of the pyramid level it comes from (a single-level slide is read at
    full resolution)."""
    level = slide.best_level_for_mpp(bmpp)
    ds = float(slide.level_downsamples[level])
    mx, my = slide.mpp
    per_pixel = max(1.0, bmpp / (mx * ds)) * max(1.0, bmpp / (my * ds))
    return int(min(1 << 18, max(1 << 12, max_level_pixels / per_pixel)))


def _margin(o: QcOptions, bmpp: float) -> int:
    """Grey pixels read around a block (half the focus window, the detail's kernel, two to spare): a
    block's sharpness is then that of the whole view."""
    return _window_px(o.blur_window_um, bmpp) // 2 + 2 + _detail_reach(o.blur_band_um, bmpp)


@dataclass(frozen=True)
class _Blocks:
    """How ``focus_on_raster`` tiles the ``shape`` label raster: blocks of ``rows`` x ``cols`` label pixels
    (each ``f`` x ``f`` grey pixels), read with ``margin`` grey pixels around them, down one strip of
    ``cols`` columns after the other. Neither a block nor its tile rows grow with the slide's width."""

    shape: tuple[int, int]
    f: int
    rows: int
    cols: int
    margin: int

    @classmethod
    def of(cls, shape: tuple[int, int], f: int, margin: int, block_pixels: int) -> _Blocks:
        # strips twice as wide as a square block: fewer margins read twice, a block still of bounded size
        cols = max(1, min(shape[1], 2 * int(np.sqrt(block_pixels)) // f))
        return cls(shape, f, max(1, block_pixels // (cols * f * f)), cols, margin)

    @property
    def read_size(self) -> tuple[int, int]:
        """Grey pixels (across, down) of a block's read, its margins included."""
        return self.cols * self.f + 2 * self.margin, self.rows * self.f + 2 * self.margin

    def __iter__(self) -> Iterator[tuple[int, int, int, int]]:
        H, W = self.shape
        for c0 in range(0, W, self.cols):
            for r0 in range(0, H, self.rows):
                yield r0, min(H, r0 + self.rows), c0, min(W, c0 + self.cols)


def focus_on_raster(grey: np.ndarray | Callable[[int, int, int, int], np.ndarray], f: int, shape: tuple[int, int],
                    bmpp: float, o: QcOptions, block_pixels: int = 1 << 18) -> np.ndarray:
    """Sharpness (``sharpness``) of a grey view averaged over each ``f`` x ``f`` block, on the label
    raster ``shape`` (NaN where a block has no valid value). Computed in blocks of about
    ``block_pixels`` grey pixels, read with a margin of half a window and the detail's kernel, so the
    float temporaries stay the same whatever the slide's size. ``grey``: the whole grey view, or a
    reader ``(g0, g1, x0, x1) -> rows g0:g1, columns x0:x1`` of it (``_grey_reader``: the view is never
    held whole)."""
    H, W = shape
    read: Callable[[int, int, int, int], np.ndarray]
    if isinstance(grey, np.ndarray):
        # the grey view cropped or edge-padded to exactly f x shape
        view = grey[:H * f, :W * f]
        view = np.pad(view, ((0, H * f - view.shape[0]), (0, W * f - view.shape[1])), mode="edge")
        read = lambda g0, g1, x0, x1: view[g0:g1, x0:x1]  # noqa: E731
    else:
        read = grey
    blocks = _Blocks.of(shape, f, _margin(o, bmpp), block_pixels)
    m = blocks.margin
    out = np.full(shape, np.nan, np.float32)
    for r0, r1, c0, c1 in blocks:
        g0, g1 = max(0, r0 * f - m), min(H * f, r1 * f + m)
        x0, x1 = max(0, c0 * f - m), min(W * f, c1 * f + m)
        sharp = sharpness(read(g0, g1, x0, x1), bmpp, o.blur_window_um, o.blur_min_variance,
                          band_um=o.blur_band_um)
        sharp = sharp[r0 * f - g0:r0 * f - g0 + (r1 - r0) * f,
                      c0 * f - x0:c0 * f - x0 + (c1 - c0) * f].reshape(r1 - r0, f, c1 - c0, f)
        valid = np.isfinite(sharp)
        num = np.where(valid, sharp, 0).sum(axis=(1, 3))
        den = valid.sum(axis=(1, 3))
        out[r0:r1, c0:c1] = np.where(den * 2 > f * f, num / np.maximum(den, 1), np.nan)
    return out


def qc_labels(slide: Any, options: QcOptions = QcOptions(), progress: bool | None = None, *,
              models: Sequence[Any] = ()) -> tuple[np.ndarray, float, list[str]]:
    """The QC label map of an open slide (``LABELS`` values, uint8), its µm/px and the classes not
    measured (``Out of focus`` on a view coarser than ``blur_max_mpp``).

    ``models``: trained pixel classifiers (:class:`slidekit.regions.qc_model.QcModel`, QC by example);
    what each finds joins its class (``model.label``), on glass too."""
    o = options
    mpp = max(o.mpp, *slide.mpp)
    # read under a cache of two tile rows: OpenSlide's default would keep the whole view's decoded tiles
    # (RGBA, more than the view itself) through every rule below
    with slide.tile_cache(_tile_cache_bytes(slide, mpp)):
        rgb = slide.read_whole(mpp, max_pixels_per_read=1 << 22, progress=progress)
    tissue = detect_tissue(rgb, mpp, remove_pen=False)
    masks = colour_artefacts(rgb, mpp, tissue, o)
    masks["Out of focus"] = np.zeros_like(tissue)  # the focus rule's own calls join below
    covered = tissue | masks["Pen ink"] | masks["Dark debris"] | masks["Air bubble / edge"]
    for model in models:
        found = model.predict(rgb, mpp)
        masks[model.label] |= found
        covered |= found
    del rgb
    # the focus reference: the tissue that no colour rule (nor a model) called ink, fold or debris
    clean = tissue & ~masks["Pen ink"] & ~masks["Fold"] & ~masks["Dark debris"]
    labels = np.where(covered, np.uint8(TISSUE), np.uint8(GLASS))  # uint8 scalars: no int64 plane
    for name in reversed(ARTEFACTS):  # the first class wins where classes overlap
        labels[masks[name]] = LABELS[name]
    # the focus rule last, with only the label map and its reference held: its blocks' buffers and tile
    # cache do not add up with the colour rules' planes
    del masks, covered, tissue
    blur = focus_artefact(slide, labels.shape, mpp, clean, o, progress)
    if blur is not None:  # the last class: it only takes tissue that no other class has
        labels[blur & (labels == TISSUE)] = LABELS["Out of focus"]
    return labels, mpp, [] if blur is not None else ["Out of focus"]


def qc_report(labels: np.ndarray, mpp: float, options: QcOptions = QcOptions(),
              not_measured: Sequence[str] = ()) -> dict:
    """Per class its area (µm²) and fraction of the tissue, the tissue area and the verdict (a class
    not measured is listed as such and passes)."""
    px = mpp * mpp
    counts = np.bincount(labels.ravel(), minlength=len(LABELS))
    tissue_px = int(counts[TISSUE:].sum())
    classes, reasons = {}, []
    for name in ARTEFACTS:
        n = int(counts[LABELS[name]])
        frac = n / tissue_px if tissue_px else 0.0
        limit = float(getattr(options, THRESHOLD_OF[name]))
        ok = frac <= limit
        classes[name] = {"value": LABELS[name], "pixels": n, "area_um2": n * px, "fraction_of_tissue": frac,
                         "max_fraction": limit, "pass": ok, "measured": name not in not_measured}
        if not ok:
            reasons.append(f"{name}: {frac:.1%} of the tissue > {THRESHOLD_OF[name].replace('_', '-')} {limit:g}")
    return {"mpp": mpp, "tissue_area_um2": tissue_px * px, "glass_area_um2": int(counts[GLASS]) * px,
            "classes": classes, "verdict": "fail" if reasons else "pass", "reasons": reasons,
            "not_measured": list(not_measured)}
