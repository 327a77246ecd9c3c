"""Geometry rules shared by every consumer of annotations: the fill rule of self-intersecting
outlines (rasterising, areas, repairs), clipping exported objects to the slide, and the rasteriser.

**Fill rule: non-zero winding.** Hand-drawn outlines cross themselves (3 of CAMELYON16
tumor_076's lesions and 10 of tumor_036's). slidekit fills them the way the tools that drew and
used them do:

- QuPath: ``PolygonROI.contains`` is ``WindingTest.getWindingNumber(vertices, x, y) != 0``
  (qupath/qupath, qupath-core/src/main/java/qupath/lib/roi/PolygonROI.java and WindingTest.java,
  Dan Sunday's winding-number test), and the ``java.awt.geom.Path2D`` it draws with defaults to
  ``WIND_NON_ZERO`` (Java SE API docs, ``Path2D.Double()``: "with a default winding rule of
  Path2D.WIND_NON_ZERO").
- ASAP: ``AnnotationToMask::convert``, which made the CAMELYON ground-truth masks, paints a pixel
  when ``wn_PnPoly(point, coords) != 0`` (computationalpathologygroup/ASAP,
  annotation/AnnotationToMask.cpp). (ASAP's viewer leaves polygons unfilled by default; its
  optional fill uses Qt's odd-even rule, but the masks used for training and evaluation are
  non-zero.)

So a pixel lies in a polygon when the winding number of its centre around the shell is non-zero
and its winding number around every hole is zero. For valid polygons this is the ordinary
inside; it only matters for self-intersecting rings (a loop drawn twice counts once, a
figure-eight keeps both lobes). ``rasterize``, ``filled_geometry``/``filled_area`` and
``slidekit convert --make-valid`` all follow it; ``fill_rule="evenodd"`` is available for
comparison.
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping

import cv2
import numpy as np
import shapely
from shapely.geometry import LineString, Polygon, box as shapely_box
from shapely.geometry.base import BaseGeometry

from slidekit.annotations.objects import Annotation
from slidekit.base.errors import AnnotationError, AnnotationWarning

FILL_RULES = ("nonzero", "evenodd")


# ---------------------------------------------------------------------------------------------
# Fill rule: winding numbers, filled regions, areas


def winding_numbers(ring: Any, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Winding number of the closed ``ring`` (N, 2) around each point ``(x, y)`` (Sunday's test,
    as in QuPath's WindingTest and ASAP's wn_PnPoly)."""
    r = np.asarray(ring, np.float64)[:, :2]
    if len(r) and np.array_equal(r[0], r[-1]):
        r = r[:-1]
    x = np.asarray(x, np.float64).ravel()[:, None]
    y = np.asarray(y, np.float64).ravel()[:, None]
    if len(r) < 3:
        return np.zeros(x.shape[0], np.int64)
    p0, p1 = r, np.roll(r, -1, axis=0)
    cross = (p1[:, 0] - p0[:, 0]) * (y - p0[:, 1]) - (x - p0[:, 0]) * (p1[:, 1] - p0[:, 1])
    up = (p0[:, 1] <= y) & (p1[:, 1] > y) & (cross > 0)
    down = (p0[:, 1] > y) & (p1[:, 1] <= y) & (cross < 0)
    return up.sum(axis=1) - down.sum(axis=1)


def _ring_region(coords: Any, rule: str) -> BaseGeometry:
    """The region a single (possibly self-intersecting) ring encloses under ``rule``."""
    c = np.asarray(coords, np.float64)[:, :2]
    if len(c) < 3:
        return Polygon()
    if not np.array_equal(c[0], c[-1]):
        c = np.vstack([c, c[:1]])
    lines = shapely.node(LineString(c))  # split at every self-crossing
    faces = [f for f in shapely.get_parts(shapely.polygonize(shapely.get_parts(lines))) if f.area > 0]
    if not faces:
        return Polygon()
    pts = shapely.get_coordinates(shapely.point_on_surface(faces))
    w = winding_numbers(c, pts[:, 0], pts[:, 1])
    inside = w != 0 if rule == "nonzero" else (w % 2) != 0
    kept = [f for f, k in zip(faces, inside) if k]
    return shapely.union_all(kept) if kept else Polygon()


def _polygonal(g: BaseGeometry) -> BaseGeometry:
    """Only the polygonal parts of ``g`` (overlay results can carry stray lines and points)."""
    if g.geom_type in ("Polygon", "MultiPolygon"):
        return g
    polys = [p for p in shapely.get_parts(g) if p.geom_type in ("Polygon", "MultiPolygon") and not p.is_empty]
    return shapely.union_all(polys) if polys else Polygon()


def filled_geometry(g: BaseGeometry, rule: str = "nonzero") -> BaseGeometry:
    """The valid geometry covering what a viewer fills for ``g`` under ``rule`` (default non-zero,
    as QuPath and ASAP): shell region minus hole regions, parts unioned. Valid polygons, lines and
    points come back unchanged."""
    _check_rule(rule)
    gt = g.geom_type
    if gt in ("Polygon", "MultiPolygon") and g.is_valid:
        return g
    if gt == "Polygon":
        if g.is_empty:
            return g
        region = _ring_region(g.exterior.coords, rule)
        holes = [_ring_region(h.coords, rule) for h in g.interiors]
        holes = [h for h in holes if not h.is_empty]
        if holes:
            region = region.difference(shapely.union_all(holes))
        return _polygonal(region)
    if gt == "MultiPolygon":
        return _polygonal(shapely.union_all([filled_geometry(p, rule) for p in g.geoms]))
    if gt == "GeometryCollection":
        parts = [filled_geometry(p, rule) for p in g.geoms]
        return shapely.GeometryCollection([p for p in parts if not p.is_empty])
    return g


def filled_area(g: BaseGeometry, rule: str = "nonzero") -> float:
    """Area (level-0 px²) of what ``g`` fills under ``rule``; differs from ``g.area`` (the signed
    shoelace sum, in which the lobes of a figure-eight cancel) only for invalid polygons."""
    return float(filled_geometry(g, rule).area)


def make_valid(g: BaseGeometry) -> tuple[BaseGeometry, bool]:
    """``(repaired, changed)``: an invalid polygonal ``g`` replaced by the valid geometry of what
    it fills under the non-zero rule (so rasterising it before and after gives the same pixels)."""
    if g.geom_type not in ("Polygon", "MultiPolygon", "GeometryCollection") or g.is_empty or g.is_valid:
        return g, False
    return filled_geometry(g, "nonzero"), True


def _check_rule(rule: str) -> None:
    if rule not in FILL_RULES:
        raise ValueError(f"fill_rule must be one of {FILL_RULES}, not {rule!r}")


# ---------------------------------------------------------------------------------------------
# Clipping exported objects to the slide


def bounds_geometry(bounds: Any) -> BaseGeometry:
    """A clip region from a level-0 ``(width, height)`` or a shapely geometry."""
    if isinstance(bounds, BaseGeometry):
        return bounds
    try:
        w, h = (float(v) for v in bounds)
    except (TypeError, ValueError):
        raise ValueError(f"bounds must be (width, height) or a shapely geometry, not {bounds!r}") from None
    if not (w > 0 and h > 0 and np.isfinite(w) and np.isfinite(h)):
        raise ValueError(f"bounds (width, height) must be positive and finite, not {bounds!r}")
    return shapely_box(0.0, 0.0, w, h)


def clip_geometry(g: BaseGeometry, region: BaseGeometry) -> tuple[BaseGeometry, bool]:
    """``(clipped, changed)``: ``g`` cut to ``region``, keeping only parts of ``g``'s dimension
    (a polygon touching the edge does not gain a stray line). Invalid polygons are clipped as
    they are filled (non-zero rule)."""
    if g.is_empty or region.covers(g):
        return g, False
    try:
        cut = g.intersection(region)
    except shapely.errors.GEOSException:  # self-intersecting outline: clip what it fills
        cut = filled_geometry(g).intersection(region)
    dim = shapely.get_dimensions(g)
    parts = [p for p in shapely.get_parts(cut) if not p.is_empty and shapely.get_dimensions(p) == dim]
    if not parts:
        return shapely.GeometryCollection(), True
    if len(parts) == 1:
        return parts[0], True
    if dim == 2:
        return shapely.union_all(parts), True
    return (shapely.multilinestrings(parts) if dim == 1 else shapely.multipoints(parts)), True


def clip_annotations(annotations: Iterable[Annotation], bounds: Any,
                     counts: dict[str, int] | None = None) -> Iterator[Annotation]:
    """Yield ``annotations`` clipped to ``bounds`` (see ``bounds_geometry``); objects left empty
    are dropped. ``counts`` (if given) receives ``clipped`` and ``dropped``."""
    from dataclasses import replace

    region = bounds_geometry(bounds)
    shapely.prepare(region)
    counts = counts if counts is not None else {}
    counts.setdefault("clipped", 0)
    counts.setdefault("dropped", 0)
    for ann in annotations:
        g, changed = clip_geometry(ann.geometry, region)
        if g.is_empty and not ann.geometry.is_empty:
            counts["dropped"] += 1
            continue
        if changed:
            counts["clipped"] += 1
            ann = replace(ann, geometry=g)
        yield ann


# ---------------------------------------------------------------------------------------------
# Rasterising


@dataclass(frozen=True)
class RasterStyle:
    """How ``rasterize`` paints objects into a label map.

    Parameters
    ----------
    fill
        Value of the pixels no object covers (e.g. 255 = ignore).
    line_width_um
        Width of lines (scribbles) in µm; at least one pixel.
    point_radius_um
        Radius of the discs points are drawn as, in µm (None: half ``line_width_um``); at least one pixel.
    dtype
        Data type of the map (None: uint8 when ``fill`` and every label value fit, else int32).
    fill_rule
        ``"nonzero"`` (QuPath's and ASAP's winding rule) or ``"evenodd"``.
    """

    fill: int = 0
    line_width_um: float = 4.0
    point_radius_um: float | None = None
    dtype: Any = None
    fill_rule: str = "nonzero"


def rasterize(annotations: Iterable[Annotation], box: tuple[float, float, float, float], mpp: float, *,
              labels: Mapping[str | None, int] | None = None, slide_mpp: float | tuple[float, float] | None = None,
              style: RasterStyle | None = None, **flat: Any) -> np.ndarray:
    """A label map of the level-0 ``box`` ``(x, y, w, h)`` at ``mpp`` µm/px.

    ``labels`` maps class names (``None`` for unclassified) to values; objects of other classes
    are skipped; ``labels=None`` paints every object 1 (a binary mask). Classes are painted in the
    order of ``labels``, so later entries win (``{"metastasis": 1, "negative": 0}`` carves
    CAMELYON exclusions out of lesions). Polygons keep their holes; a pixel is inside when its
    centre is, by the non-zero winding rule (QuPath's and ASAP's; see the module docstring) unless
    ``fill_rule="evenodd"``. Lines (scribbles) are drawn ``line_width_um`` wide and points as
    discs, both at least one pixel. ``slide_mpp`` is the pixel size of level 0 (default: ``mpp``,
    i.e. the map is at level-0 resolution). Pixels no object covers get ``fill`` (e.g. 255 = ignore).

    ``style`` (a :class:`RasterStyle`) says how objects are painted; its fields may also be given
    by name (``fill=255``, ``line_width_um=2``, ``fill_rule="evenodd"``), replacing the style's.

    Raises AnnotationError when ``labels`` names none of the objects' classes (the map would be
    all ``fill``) or an object has non-finite coordinates; warns (AnnotationWarning) about labels
    that match no object while others do.
    """
    st = dataclasses.replace(style or RasterStyle(), **flat) if flat else (style or RasterStyle())
    fill, line_width_um, point_radius_um, dtype, fill_rule = (st.fill, st.line_width_um, st.point_radius_um,
                                                              st.dtype, st.fill_rule)
    _check_rule(fill_rule)
    x0, y0, bw, bh = (float(v) for v in box)
    if slide_mpp is None:
        smx, smy = mpp, mpp
    elif isinstance(slide_mpp, (tuple, list, np.ndarray)):
        smx, smy = slide_mpp
    else:
        smx = smy = slide_mpp
    sx, sy = mpp / smx, mpp / smy  # level-0 px per output px
    W, H = max(1, round(bw / sx)), max(1, round(bh / sy))
    values = [fill] + (list(labels.values()) if labels else [1])
    if dtype is None:
        dtype = np.uint8 if min(values) >= 0 and max(values) < 256 else np.int32
    out = np.full((H, W), fill, dtype)
    order = list(labels) if labels is not None else [...]
    anns = list(annotations)
    width_px = max(1, round(line_width_um / mpp))
    radius_px = max(1, round((point_radius_um if point_radius_um is not None else line_width_um / 2) / mpp))
    if not anns:
        return out
    if labels is not None:
        _check_labels(anns, labels)
    # Drop objects outside the box in one vectorised pass (slides can carry 1e5 cells).
    geoms = np.array([a.geometry for a in anns], dtype=object)
    b = shapely.bounds(geoms)
    empty = shapely.is_empty(geoms)
    bad = np.flatnonzero(~empty & ~np.isfinite(b).all(axis=1))
    if len(bad):
        raise AnnotationError(f"rasterize: object {int(bad[0])} ({anns[bad[0]].label}) has non-finite coordinates")
    pad = max(width_px, radius_px) * max(sx, sy)
    near = ~(empty | (b[:, 2] + pad < x0) | (b[:, 3] + pad < y0)
             | (b[:, 0] - pad > x0 + bw) | (b[:, 1] - pad > y0 + bh))
    idx = np.flatnonzero(near)
    if len(idx):
        # GEOS bounds skip NaN vertices, so check the coordinates of what will be painted.
        finite = np.isfinite(shapely.get_coordinates(geoms[idx], return_index=False)).all()
        if not finite:
            for i in idx:
                if not np.isfinite(shapely.get_coordinates(geoms[i])).all():
                    raise AnnotationError(f"rasterize: object {int(i)} ({anns[i].label}) has non-finite coordinates")
    anns = [anns[i] for i in idx]
    for key in order:
        value = 1 if key is ... else labels[key]  # type: ignore[index]
        for ann in anns:
            if key is ... or ann.label == key:
                _paint(out, ann.geometry, value, (x0, y0, sx, sy), width_px, radius_px, fill_rule)
    return out


def _check_labels(anns: list, labels: Mapping[str | None, int]) -> None:
    present = {a.label for a in anns}
    unmatched = [k for k in labels if k not in present]
    if not unmatched:
        return
    classes = ", ".join(repr(c) for c in sorted(present, key=str))
    if len(unmatched) == len(labels):
        raise AnnotationError(f"rasterize: labels {', '.join(repr(k) for k in labels)} match none of the "
                              f"{len(anns)} objects (their classes: {classes}); the mask would be empty")
    warnings.warn(AnnotationWarning(f"rasterize: labels {', '.join(repr(k) for k in unmatched)} match no object "
                                    f"(classes present: {classes})"), stacklevel=3)


_SHIFT = 4  # sub-pixel bits for OpenCV drawing


def _to_px(coords: Any, x0: float, y0: float, sx: float, sy: float) -> np.ndarray:
    a = np.asarray(coords, dtype=np.float64)[:, :2]
    # Output pixel centres sit at integer positions after the -0.5 shift.
    px = np.column_stack([(a[:, 0] - x0) / sx - 0.5, (a[:, 1] - y0) / sy - 0.5])
    return np.rint(px * (1 << _SHIFT)).astype(np.int32)


def _paint(out: np.ndarray, g: BaseGeometry, value: int, xform: tuple[float, float, float, float],
           width_px: int, radius_px: int, rule: str) -> None:
    """Paint ``g`` into ``out``; ``xform`` is ``(x0, y0, sx, sy)``: pixel (r, c) covers level-0
    ``[x0 + c sx, x0 + (c+1) sx) x [y0 + r sy, ...)``."""
    gt = g.geom_type
    if gt in ("MultiPolygon", "MultiLineString", "MultiPoint", "GeometryCollection"):
        for part in g.geoms:
            _paint(out, part, value, xform, width_px, radius_px, rule)
        return
    x0, y0, sx, sy = xform
    H, W = out.shape
    if gt == "Polygon":
        if g.is_empty:
            return
        # Paint shell minus holes into a scratch mask over the polygon's own window, so a hole
        # shows what was underneath rather than the background value.
        gx0, gy0, gx1, gy1 = g.bounds
        c0 = max(0, int(np.floor((gx0 - x0) / sx)) - 1)
        r0 = max(0, int(np.floor((gy0 - y0) / sy)) - 1)
        c1 = min(W, int(np.ceil((gx1 - x0) / sx)) + 1)
        r1 = min(H, int(np.ceil((gy1 - y0) / sy)) + 1)
        if c1 <= c0 or r1 <= r0:
            return
        ox, oy = x0 + c0 * sx, y0 + r0 * sy
        rings = [np.asarray(r.coords, np.float64)[:, :2] for r in (g.exterior, *g.interiors)]
        rings = [np.column_stack([(r[:, 0] - ox) / sx, (r[:, 1] - oy) / sy]) for r in rings]
        out[r0:r1, c0:c1][fill_rings(rings, r1 - r0, c1 - c0, rule)] = value
    elif gt in ("LineString", "LinearRing"):
        if g.is_empty:
            return
        pts = _to_px(g.coords, x0, y0, sx, sy)
        _draw(out, lambda m: cv2.polylines(m, [pts], False, 1, thickness=width_px, lineType=cv2.LINE_8,
                                           shift=_SHIFT), value)
    elif gt == "Point":
        if g.is_empty:
            return
        c = _to_px([g.coords[0]], x0, y0, sx, sy)[0]
        _draw(out, lambda m: cv2.circle(m, (int(c[0]), int(c[1])), radius_px << _SHIFT, 1, thickness=-1,
                                        lineType=cv2.LINE_8, shift=_SHIFT), value)


def fill_rings(rings: list[np.ndarray], H: int, W: int, rule: str = "nonzero") -> np.ndarray:
    """Scanline fill of a polygon's closed rings, the shell first and then its holes (x, y in
    pixel-edge units: pixel (r, c) is the square [c, c+1) x [r, r+1)); a pixel is inside when its
    centre is. Exact and vectorised.

    ``nonzero``: inside the shell by the non-zero winding rule and outside every hole by the same
    rule (QuPath, ASAP). ``evenodd``: an odd number of crossings over all rings together.
    """
    _check_rule(rule)
    rows_l, xs_l, dir_l, grp_l = [], [], [], []
    for k, ring in enumerate(rings):
        ring = np.asarray(ring, np.float64)
        if len(ring) < 3:
            continue
        p0, p1 = ring[:-1], ring[1:]
        if not np.array_equal(ring[0], ring[-1]):
            p0, p1 = ring, np.roll(ring, -1, axis=0)
        y0, y1 = p0[:, 1], p1[:, 1]
        # Row r's centre (r + 0.5) crosses an edge when it lies in [min(y), max(y)): every row
        # then meets a closed ring an even number of times, with directions summing to zero.
        start = np.clip(np.ceil(np.minimum(y0, y1) - 0.5), 0, H).astype(np.int64)
        stop = np.clip(np.ceil(np.maximum(y0, y1) - 0.5), 0, H).astype(np.int64)
        n = np.maximum(stop - start, 0)
        if not n.any():
            continue
        e = np.repeat(np.arange(len(n)), n)
        rows = start[e] + np.arange(len(e)) - np.repeat(np.cumsum(n) - n, n)
        t = (rows + 0.5 - y0[e]) / (y1[e] - y0[e])
        rows_l.append(rows)
        xs_l.append(p0[e, 0] + t * (p1[e, 0] - p0[e, 0]))
        dir_l.append(np.where(y1[e] > y0[e], 1, -1))
        grp_l.append(np.full(len(e), k if rule == "nonzero" else 0))
    mask = np.zeros((H, W), bool)
    if not rows_l:
        return mask
    rows, xs = np.concatenate(rows_l), np.concatenate(xs_l)
    dirs, grp = np.concatenate(dir_l), np.concatenate(grp_l)
    order = np.lexsort((xs, rows, grp))
    rows, xs, dirs, grp = rows[order], xs[order], dirs[order], grp[order]
    # Each (ring group, row) run sums to zero, so a running total over the whole sorted array is
    # the winding number (or crossing count) just right of each crossing.
    wind = np.cumsum(dirs) if rule == "nonzero" else np.cumsum(np.ones_like(dirs)) % 2
    same = (rows[1:] == rows[:-1]) & (grp[1:] == grp[:-1]) & (wind[:-1] != 0)
    i = np.flatnonzero(same)
    r, xa, xb, g = rows[i], xs[i], xs[i + 1], grp[i]
    c0 = np.clip(np.ceil(xa - 0.5), 0, W).astype(np.int64)
    c1 = np.clip(np.ceil(xb - 0.5), 0, W).astype(np.int64)
    keep = c1 > c0
    shell = np.zeros((H, W + 1), np.int32)
    hole = np.zeros((H, W + 1), np.int32)
    for target, sel in ((shell, keep & (g == 0)), (hole, keep & (g != 0))):
        np.add.at(target, (r[sel], c0[sel]), 1)
        np.add.at(target, (r[sel], c1[sel]), -1)
    mask = np.cumsum(shell, axis=1)[:, :W] > 0
    if (g != 0).any():
        mask &= ~(np.cumsum(hole, axis=1)[:, :W] > 0)
    return mask


def _draw(out: np.ndarray, fn: Any, value: int) -> None:
    scratch = np.zeros(out.shape, np.uint8)
    fn(scratch)
    out[scratch.astype(bool)] = value


def is_invalid_polygon(g: BaseGeometry) -> bool:
    """Whether ``g`` is a polygonal geometry that GEOS calls invalid (e.g. a self-intersecting
    outline), i.e. one whose filled region depends on the fill rule."""
    return g.geom_type in ("Polygon", "MultiPolygon") and not g.is_empty and not g.is_valid
