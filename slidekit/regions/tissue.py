"""Tissue detection on a coarse view of the slide.

The slide is read whole at a coarse pixel size (default 8 µm/px, a few megapixels even for a
large resection). Tissue is what is coloured (HSV saturation above an Otsu threshold) and absorbs
light, or absorbs clearly (optical density above its Otsu threshold), or absorbs more than the
slide's own glass (optical density relative to the glass colour above ``min_contrast``: this finds
faint haematoxylin-only counterstain, which is nearly grey and nearly as bright as the glass).
Pen ink (blue, green, black) is removed by its colour, then the mask is closed, holes enclosed by
tissue are filled up to a size and small regions dropped, with every area given in µm² so the
result does not depend on the working resolution.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

import cv2
import numpy as np
from shapely.affinity import affine_transform
from shapely.geometry import Polygon
from skimage import morphology
from skimage.filters import threshold_otsu

from slidekit.base.errors import ConfigError, TissueError
from slidekit.slides.slide import Slide


@dataclass
class TissueMask:
    """A boolean tissue mask at a coarse pixel size ``mpp``, with level-0 polygons.

    ``array[r, c]`` covers level-0 pixels ``[c*s, (c+1)*s) x [r*s, (r+1)*s)`` with
    ``s = mpp / slide_mpp``.
    """

    array: np.ndarray
    mpp: float
    slide_mpp: tuple[float, float]
    _polygons: list[Polygon] | None = field(default=None, repr=False)

    @property
    def scale(self) -> tuple[float, float]:
        """Level-0 pixels per mask pixel along x and y."""
        return self.mpp / self.slide_mpp[0], self.mpp / self.slide_mpp[1]

    @property
    def polygons(self) -> list[Polygon]:
        """Tissue regions as shapely polygons in level-0 pixels, holes kept."""
        if self._polygons is None:
            sx, sy = self.scale
            polys = mask_to_polygons(self.array)
            self._polygons = [affine_transform(p, [sx, 0, 0, sy, 0, 0]) for p in polys]
        return self._polygons

    @property
    def area_um2(self) -> float:
        """Tissue area in µm²."""
        return float(self.array.sum()) * self.mpp * self.mpp

    def fraction(self, box: tuple[float, float, float, float]) -> float:
        """Fraction of a level-0 box ``(x, y, w, h)`` that is tissue (area-weighted)."""
        return float(self.fractions(np.array([box], dtype=np.float64))[0])

    def fractions(self, boxes: np.ndarray) -> np.ndarray:
        """Tissue fraction of many level-0 boxes (N, 4) at once, via a summed-area table."""
        sx, sy = self.scale
        integral = cv2.integral(self.array.astype(np.uint8)).astype(np.float64)
        H, W = self.array.shape

        def area_upto(xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
            # Sum of the mask over [0, xs) x [0, ys) in fractional mask pixels (bilinear on the SAT).
            xs, ys = np.clip(xs, 0, W), np.clip(ys, 0, H)
            x0, y0 = np.floor(xs).astype(int), np.floor(ys).astype(int)
            x1, y1 = np.minimum(x0 + 1, W), np.minimum(y0 + 1, H)
            fx, fy = xs - x0, ys - y0
            return ((1 - fx) * (1 - fy) * integral[y0, x0] + fx * (1 - fy) * integral[y0, x1]
                    + (1 - fx) * fy * integral[y1, x0] + fx * fy * integral[y1, x1])

        x, y, w, h = (boxes[:, i] for i in range(4))
        mx0, my0, mx1, my1 = x / sx, y / sy, (x + w) / sx, (y + h) / sy
        total = (area_upto(mx1, my1) - area_upto(mx0, my1) - area_upto(mx1, my0) + area_upto(mx0, my0))
        return np.clip(total / np.maximum((mx1 - mx0) * (my1 - my0), 1e-12), 0.0, 1.0)

    def to_png(self, path: str) -> None:
        """Save the mask as an 8-bit PNG (255 = tissue)."""
        cv2.imwrite(str(path), self.array.astype(np.uint8) * 255)


def mask_to_polygons(mask: np.ndarray) -> list[Polygon]:
    """Exact pixel-edge outlines of a boolean mask, in mask-pixel coordinates.

    Pixel ``(r, c)`` is the square ``[c, c+1) x [r, r+1)``; polygons keep their holes, their
    areas equal the pixel counts, and pixels touching only at a corner stay apart. Row runs are
    merged into rectangles and unioned (GEOS).
    """
    import shapely

    m = np.asarray(mask, bool)
    if not m.any():
        return []
    H, W = m.shape
    p = np.zeros((H, W + 2), np.int8)
    p[:, 1:-1] = m
    d = np.diff(p, axis=1)
    rows, c0 = np.nonzero(d == 1)
    _, c1 = np.nonzero(d == -1)
    # Stack identical runs of consecutive rows into one rectangle (blocky maps become a few boxes).
    key = c0 * (W + 1) + c1
    order = np.lexsort((rows, key))
    rows, c0, c1, key = rows[order], c0[order], c1[order], key[order]
    new = np.ones(len(rows), bool)
    new[1:] = (key[1:] != key[:-1]) | (rows[1:] != rows[:-1] + 1)
    start = np.flatnonzero(new)
    end = np.append(start[1:], len(rows)) - 1
    boxes = shapely.box(c0[start], rows[start], c1[start], rows[end] + 1)
    union = shapely.simplify(shapely.union_all(boxes), 0)
    return [g for g in getattr(union, "geoms", [union]) if g.area > 0]


#: Optical density -log10(v / 255) of each 8-bit value (0 read as 1).
_OD_LUT = -np.log10(np.maximum(np.arange(256, dtype=np.float32), 1.0) / np.float32(255.0))


def mean_od(rgb: np.ndarray) -> np.ndarray:
    """Mean optical density (log10) of the three channels of ``rgb`` (uint8), float32.

    Summed in place: one float32 plane and one temporary, not four (this runs on whole-slide
    overviews, where every plane is megabytes)."""
    od = _OD_LUT[rgb[..., 0]]
    od += _OD_LUT[rgb[..., 1]]
    od += _OD_LUT[rgb[..., 2]]
    od /= np.float32(3)
    return od


def _disc(r: int) -> np.ndarray:
    """A disc (elliptical structuring element) of radius ``r`` px."""
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))


def _keep_large(mask: np.ndarray, min_px: int) -> np.ndarray:
    """The 8-connected areas of ``mask`` (bool or uint8) of at least ``min_px`` pixels (bool)."""
    out = np.zeros(mask.shape, bool)
    box = _bounding_box(mask)
    if box is None:
        return out
    # labelled inside the mask's bounding box only: the int32 label plane is the size of what is there
    crop = mask[box]
    _, labels, stats, _ = cv2.connectedComponentsWithStats(crop.astype(np.uint8), connectivity=8)
    keep = stats[:, 4] >= max(1, min_px)
    keep[0] = False
    out[box] = keep[labels]
    return out


def _bounding_box(mask: np.ndarray) -> tuple[slice, slice] | None:
    """The slices of the smallest box holding every nonzero pixel of ``mask`` (None when it has none)."""
    rows = np.flatnonzero(mask.any(axis=1))
    if len(rows) == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1)


def _otsu(values: np.ndarray) -> float:
    try:
        return float(threshold_otsu(values)) if values.max() > values.min() else float(values.max())
    except ValueError:
        return float(values.max())


#: Width (µm) of the rim around a pen stroke that is dropped with the ink; smallest stroke (µm²).
PEN_HALO_UM = 24.0
PEN_MIN_UM2 = 2_000.0


def _pen_mask(rgb: np.ndarray, hsv: np.ndarray) -> np.ndarray:
    """Pen ink: strongly saturated blue/green/cyan, or near-black marker."""
    h = hsv[..., 0].astype(np.int16) * 2  # OpenCV hue is 0..179
    s = hsv[..., 1]
    v = hsv[..., 2]
    green = (h >= 70) & (h < 180) & (s > 60)
    blue = (h >= 180) & (h < 250) & (s > 110) & (v > 40)
    black = np.maximum(np.maximum(rgb[..., 0], rgb[..., 1]), rgb[..., 2]) < 40
    return green | blue | black


@dataclass(frozen=True)
class TissueParams:
    """Tissue detection's parameters (``detect_tissue``, ``tissue_mask``).

    Parameters
    ----------
    mpp
        µm/px of the view the slide is read whole at (``tissue_mask`` only).
    min_area_um2
        Regions under this area (µm²) are dropped.
    min_hole_um2
        Holes enclosed by tissue under this area (µm²) are filled.
    closing_um
        Diameter of the closing disc (µm).
    remove_pen
        Remove pen ink and its rim.
    min_saturation
        Saturation above its Otsu threshold counts only above this (0–255).
    min_od
        ... and only with optical density above this.
    min_contrast
        Optical density relative to the glass colour above which a pixel is tissue.
    """

    mpp: float = 8.0
    min_area_um2: float = 20_000.0
    min_hole_um2: float = 20_000.0
    closing_um: float = 32.0
    remove_pen: bool = True
    min_saturation: int = 20
    min_od: float = 0.05
    min_contrast: float = 0.02

    @classmethod
    def of(cls, params: "TissueParams | None" = None, **flat: Any) -> "TissueParams":
        """``params`` (or the defaults) with single fields replaced; an unknown name is one ConfigError."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(flat) - known)
        if unknown:
            raise ConfigError(f"unknown tissue option(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        return replace(params or cls(), **flat)


def tissue_mask(slide: Slide, params: TissueParams | None = None, *, progress: bool | None = None,
                **flat: Any) -> TissueMask:
    """Detect tissue on the slide read whole at ``params.mpp`` µm/px.

    Tissue = saturation above its Otsu threshold (at least ``min_saturation``) with optical density
    above ``min_od``, or optical density above its own Otsu threshold, or optical density relative
    to the glass colour (``glass_colour``) above ``min_contrast``; minus pen ink; closed with a disc
    of ``closing_um``; holes enclosed by tissue under ``min_hole_um2`` filled; regions under
    ``min_area_um2`` dropped. Raises TissueError when nothing is left.

    Parameters
    ----------
    slide
        The open slide.
    params
        :class:`TissueParams` (None: the defaults).
    progress
        A progress bar for the whole-slide read (None: only for huge single-level reads).
    **flat
        Single fields of :class:`TissueParams` by name (``mpp=16``, ``min_area_um2=0``).
    """
    p = TissueParams.of(params, **flat)
    view = slide.read_whole(p.mpp, progress=progress)
    mask = detect_tissue(view, p.mpp, p)
    if not mask.any():
        raise TissueError("no tissue found (the slide looks blank at this threshold)", slide.path)
    return TissueMask(array=mask, mpp=p.mpp, slide_mpp=slide._need_mpp())  # read_whole needed it too


def glass_colour(rgb: np.ndarray, min_share: float = 0.02) -> np.ndarray:
    """The glass's RGB colour in a coarse view: the brightest common colour.

    The brightest grey level holding at least ``min_share`` of the scanned pixels within ±3 levels
    (glass transmits the most light, and it is common on any slide that shows an edge of the
    section); its per-channel median. Scanner fill (every channel >= 254: painted outside the
    scanned area, not glass seen by the camera) is left out. On a view with no glass at all this
    is the palest common tissue, so the relative-density rule only adds what is darker than that.
    """
    # two passes over bands of rows (a histogram each), so that no plane of the whole view is made:
    # QC and tissue detection call this on whole-slide overviews, where a plane is megabytes
    rows = max(1, (1 << 18) // max(1, rgb.shape[1]))
    bands = [rgb[y:y + rows] for y in range(0, rgb.shape[0], rows)]

    def grey_of(band: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        grey = (band[..., 0].astype(np.uint16) + band[..., 1] + band[..., 2] + 1) // 3  # rounded mean, 0..255
        return grey, band.min(-1) < 254

    hist = np.zeros(256, np.int64)
    for band in bands:
        grey, scanned = grey_of(band)
        hist += np.bincount(grey[scanned], minlength=256)
    total = int(hist.sum())
    if total == 0:
        return np.full(3, 255.0, np.float32)
    near = np.convolve(hist, np.ones(7), mode="same")
    common = np.flatnonzero(near >= min_share * total)
    level = int(common.max()) if common.size else int(np.argmax(near))
    per_channel = np.zeros((3, 256), np.int64)
    for band in bands:
        grey, scanned = grey_of(band)
        sel = scanned & (np.abs(grey.astype(np.int16) - level) <= 3)
        for c in range(3):
            per_channel[c] += np.bincount(band[..., c][sel], minlength=256)
    return np.array([_median_of_histogram(h) for h in per_channel], np.float32)


def _median_of_histogram(hist: np.ndarray) -> float:
    """The (lower) median of the values a 256-bin histogram counts."""
    cum = np.cumsum(hist)
    return float(np.searchsorted(cum, (cum[-1] + 1) // 2))


def _fill_enclosed_holes(mask: np.ndarray, max_px: int) -> np.ndarray:
    """Fill background regions of at most ``max_px`` pixels that tissue encloses.

    Glass touching the view's edge is not enclosed (on a crop it is the glass beside the section),
    so it is never filled, whatever its size.
    """
    n, labels, stats, _ = cv2.connectedComponentsWithStats((~mask).astype(np.uint8), connectivity=4)
    H, W = mask.shape
    x, y, w, h, area = (stats[:, i] for i in range(5))
    fill = (area <= max_px) & (x > 0) & (y > 0) & (x + w < W) & (y + h < H)
    fill[0] = False  # label 0 is the tissue itself
    return mask | fill[labels]


def detect_tissue(rgb: np.ndarray, mpp: float, params: TissueParams | None = None, **flat: Any) -> np.ndarray:
    """Tissue mask (bool) of an RGB image whose pixels are ``mpp`` µm wide.

    Parameters
    ----------
    rgb
        The view (H, W, 3) uint8.
    mpp
        Its µm/px (``params.mpp`` is not used here).
    params
        :class:`TissueParams` (None: the defaults).
    **flat
        Single fields of :class:`TissueParams` by name.
    """
    p = TissueParams.of(params, **flat)
    min_area_um2, min_hole_um2, closing_um = p.min_area_um2, p.min_hole_um2, p.closing_um
    remove_pen, min_saturation, min_od, min_contrast = p.remove_pen, p.min_saturation, p.min_od, p.min_contrast
    px_area = mpp * mpp
    blur = min(rgb.shape[:2]) >= 5
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    sat = cv2.medianBlur(hsv[..., 1], 5) if blur else hsv[..., 1].copy()
    if not remove_pen:
        del hsv  # only the pen rule needs hue and value
    od = mean_od(rgb)
    od = cv2.medianBlur(od, 5) if blur else od
    # Optical density against the glass instead of against 255 (the glass of one scanner is 215,
    # of another 244, and faint counterstain is only ~0.03-0.06 darker than its glass): the mean
    # log ratio to the glass colour is the OD above the glass's own OD.
    od_glass = float(_OD_LUT[np.round(glass_colour(rgb)).astype(np.intp)].mean())
    # Coloured (H&E), clearly absorbing (IHC), or darker than the glass (faint counterstain) counts
    # as tissue. Otsu picks the first two thresholds; the bounds keep it sane on views that are
    # nearly all tissue or nearly all glass, where Otsu would split the majority class in two.
    sat_t = float(np.clip(_otsu(sat), min_saturation, 60))
    od_t = float(np.clip(_otsu(od), min_od + 0.05, 0.3))
    mask = ((sat > sat_t) & (od > min_od)) | (od > od_t) | (od > od_glass + min_contrast)
    del sat, od
    pen = np.zeros(mask.shape, bool)
    if remove_pen:
        ink = _pen_mask(rgb, hsv)
        mask &= ~ink
        # The rim of a pen stroke is paler than the ink and not saturated enough to be called pen,
        # but darker than the glass: a halo of PEN_HALO_UM around each stroke goes with it, and
        # stays out after closing. Specks under PEN_MIN_UM2 (a dark nucleus, a stray pixel) only
        # lose their own pixels, which closing may give back.
        strokes = morphology.remove_small_objects(ink, max_size=max(1, round(PEN_MIN_UM2 / px_area)))
        if strokes.any():
            halo = max(1, round(PEN_HALO_UM / mpp))
            disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * halo + 1, 2 * halo + 1))
            pen = cv2.dilate(strokes.astype(np.uint8), disc) > 0
            mask &= ~pen
    radius = max(1, round(closing_um / mpp / 2))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    # Pad before closing so tissue touching the border is not eroded by the implicit background.
    padded = np.pad(mask.astype(np.uint8), radius, mode="edge")
    mask = cv2.morphologyEx(padded, cv2.MORPH_CLOSE, kernel)[radius:-radius, radius:-radius] > 0
    mask = _fill_enclosed_holes(mask, max(1, round(min_hole_um2 / px_area)))
    mask &= ~pen  # closing and hole filling must not bring the ink back
    mask = morphology.remove_small_objects(mask, max_size=max(1, round(min_area_um2 / px_area)))
    return mask.astype(bool)
