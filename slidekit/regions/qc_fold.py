"""Tissue folds, stain-agnostic: tissue much denser than the slide's tissue of the same colour.

A fold is the section lying on itself: two layers of the tissue (its own and a flap of the tissue
beside it), so by Beer-Lambert its optical density (OD) is about the sum of both layers' while its
*colour* — the direction of its OD vector, i.e. the share of each channel in the OD — stays that of
the tissue it doubles. Dense tissue that is not folded (epidermis, lymphocyte sheets, DAB-positive
nuclei) is dark too, but it has a colour of its own, and at that colour its density is the slide's
normal. So the rule asks, per pixel, how dense this pixel is compared with the slide's clean tissue
*of the same OD colour* (no stain is named: H&E, IHC or any other stain works alike):

1. OD per channel against the glass (``-ln(rgb / glass)``, ``regions.tissue.glass_colour``),
   averaged over the tissue with a Gaussian of ``smooth_um`` (a fold is hundreds of µm wide; single
   nuclei and holes are not what is judged), on a view of ``mpp`` µm/px (``FoldParams``).
2. Its OD colour (the red and green shares of the summed OD) falls into one of ``BINS`` x ``BINS``
   bins; the slide's clean tissue gives, per colour bin (pooled with its neighbours), the median summed
   OD: the density that is normal for that colour on this slide. A colour the clean tissue hardly
   shows is not a fold's (a fold doubles tissue, so it keeps a tissue colour).
3. A fold seeds where the summed OD is at least ``seed_ratio`` times that median, and grows into the
   connected tissue at least ``grow_ratio`` times it (hysteresis: the paler parts of the doubled tissue);
   closed by ``close_um``, opened by one pixel, kept in areas of at least ``min_um2``. A pixel whose OD
   colour is nearly neutral (channel shares within ``min_spread``: grey, as coverslip edges, bubble rims
   and dust are) is no fold: stains absorb some channels more than others.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from scipy import ndimage

from slidekit.regions.tissue import _bounding_box, _disc, _keep_large, glass_colour

#: OD-colour bins per axis (red share, green share of the summed OD; the blue share is the rest).
BINS = 40
#: Summed-OD bins (log scale) of the per-colour histogram, and their range.
_OD_BINS, _OD_LO, _OD_HI = 64, 0.02, 8.0
#: Fewest clean tissue pixels (after pooling) for a colour bin to count as a tissue colour: a fold doubles
#: tissue, so its colour is one the clean tissue shows; rarer colours (an ink stroke's blended rim) are no fold.
_MIN_COUNT = 30.0


def _smoothed_od(rgb: np.ndarray, tissue: np.ndarray, sigma_px: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Summed OD and the red and green OD shares of ``rgb``, each averaged over the tissue with a
    Gaussian of ``sigma_px`` (float32 planes; zero OD off the tissue)."""
    glass = np.maximum(glass_colour(rgb).astype(np.float32), 1.0)
    t = tissue.astype(np.float32)
    weight = np.maximum(cv2.GaussianBlur(t, (0, 0), sigma_px), np.float32(1e-3))
    levels = np.maximum(np.arange(256, dtype=np.float32), 1.0)
    total = np.zeros(tissue.shape, np.float32)
    shares = []
    for c in range(3):
        lut = np.maximum(-np.log(levels / glass[c]), 0).astype(np.float32)
        od = lut[rgb[..., c]]
        od *= t
        od = cv2.GaussianBlur(od, (0, 0), sigma_px)
        od /= weight
        total += od
        if c < 2:
            shares.append(od)
    for s in shares:
        s /= np.maximum(total, np.float32(1e-6))
    return total, shares[0], shares[1]


def _colour_median(total: np.ndarray, red: np.ndarray, green: np.ndarray, clean: np.ndarray) -> np.ndarray:
    """Per pixel: the median summed OD of the clean tissue whose OD colour falls in the pixel's colour
    bin (a histogram per bin, pooled over neighbouring bins by a Gaussian of one bin)."""
    ri = np.clip(red * BINS, 0, BINS - 1).astype(np.uint8)
    gi = np.clip(green * BINS, 0, BINS - 1).astype(np.uint8)
    lo, hi = np.log(_OD_LO), np.log(_OD_HI)
    sel = clean & (total > _OD_LO)
    if not sel.any():
        return np.full(total.shape, np.inf, np.float32)
    t = total[sel]
    li = np.clip((np.log(t) - lo) / (hi - lo) * _OD_BINS, 0, _OD_BINS - 1).astype(np.int64)
    flat = (ri[sel].astype(np.int64) * BINS + gi[sel]) * _OD_BINS + li
    hist = np.bincount(flat, minlength=BINS * BINS * _OD_BINS).reshape(BINS, BINS, _OD_BINS).astype(np.float32)
    hist = ndimage.gaussian_filter(hist, (1.0, 1.0, 0.0), mode="constant")
    cum = np.cumsum(hist, -1)
    count = cum[..., -1]
    median = np.exp(lo + (np.argmax(cum >= count[..., None] / 2, -1) + 0.5) / _OD_BINS * (hi - lo))
    median = np.where(count >= _MIN_COUNT, median, np.inf).astype(np.float32)
    return median[ri, gi]


@dataclass(frozen=True)
class FoldParams:
    """The fold rule's settings (``QcOptions.fold_*``).

    Parameters
    ----------
    mpp
        µm/px the density ratio is computed on (the view's own when that is coarser; the ratio is
        brought back to the view linearly).
    smooth_um
        Gaussian σ of the optical density averaged over the tissue.
    seed_ratio, grow_ratio
        Ratios to the slide's median density at the pixel's OD colour that seed a fold, and that it
        grows into (connected).
    close_um, min_um2
        Closing radius, and the smallest fold kept.
    min_spread
        The least spread of the OD colour (largest less smallest channel share of the OD): a stain
        absorbs some channels more than others; neutral grey (a coverslip edge, a bubble's rim) is no fold.
    """

    mpp: float = 16.0
    smooth_um: float = 16.0
    seed_ratio: float = 1.7
    grow_ratio: float = 1.5
    close_um: float = 16.0
    min_um2: float = 10_000.0
    min_spread: float = 0.04


def fold_mask(rgb: np.ndarray, mpp: float, tissue: np.ndarray, exclude: np.ndarray,
              params: FoldParams = FoldParams()) -> np.ndarray:
    """Folded tissue of an RGB view (``mpp`` µm/px): see the module's docstring.

    Parameters
    ----------
    rgb
        The view, ``(H, W, 3)`` uint8.
    mpp
        Its µm/px.
    tissue
        Its tissue mask.
    exclude
        Pixels that are neither folds nor the reference (ink, very dark pixels, debris).
    params
        The rule's settings.

    Returns
    -------
    numpy.ndarray
        Boolean fold mask of the view's shape.
    """
    p = params
    H, W = tissue.shape
    f = max(1, int(np.floor(p.mpp / mpp + 1e-6)))
    if f > 1 and min(H, W) // f >= 8:
        size = (max(1, W // f), max(1, H // f))
        small = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
        small_t = cv2.resize(tissue.astype(np.uint8), size, interpolation=cv2.INTER_AREA) > 0
        small_x = cv2.resize(exclude.astype(np.uint8), size, interpolation=cv2.INTER_AREA) > 0
    else:
        f, small, small_t, small_x = 1, rgb, tissue, exclude
    total, red, green = _smoothed_od(small, small_t, p.smooth_um / (mpp * f))
    ratio = total / _colour_median(total, red, green, small_t & ~small_x)
    # stains absorb selectively: a neutral OD (grey: a coverslip edge, a bubble's rim, dust) is no fold
    blue = 1 - red - green
    spread = np.maximum(np.maximum(red, green), blue) - np.minimum(np.minimum(red, green), blue)
    ratio[spread < p.min_spread] = 0
    del total, red, green, blue, spread
    if f > 1:
        ratio = cv2.resize(ratio, (W, H), interpolation=cv2.INTER_LINEAR)
    allowed = tissue & ~exclude
    grow = allowed & (ratio >= p.grow_ratio)
    seed = allowed & (ratio >= p.seed_ratio)
    del ratio
    min_px = max(1, round(p.min_um2 / (mpp * mpp)))
    seed = _keep_large(cv2.morphologyEx(seed.astype(np.uint8), cv2.MORPH_OPEN, _disc(1)), min_px)
    fold = np.zeros(grow.shape, bool)
    box = _bounding_box(grow)
    if box is not None:  # labelled inside the box that holds the grown tissue only (a smaller int32 plane)
        n, labels, _, _ = cv2.connectedComponentsWithStats(grow[box].astype(np.uint8), connectivity=8)
        keep = np.zeros(n, bool)
        keep[np.unique(labels[seed[box]])] = True
        keep[0] = False
        fold[box] = keep[labels]
        del labels
    fold = cv2.morphologyEx(fold.astype(np.uint8), cv2.MORPH_OPEN, _disc(1)) > 0
    fold = cv2.morphologyEx(fold.astype(np.uint8), cv2.MORPH_CLOSE, _disc(max(1, round(p.close_um / mpp)))) > 0
    return _keep_large(fold & allowed, min_px)

