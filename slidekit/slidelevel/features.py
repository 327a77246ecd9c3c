"""Morphology features of a tumour-probability heatmap, in micrometres.

For each probability threshold (default 0.5 and 0.9) the heatmap is cut into connected regions
(scikit-image ``regionprops``) and described by: number of regions; the largest region's area,
major and minor axis, perimeter, largest (Feret) diameter, mean and max probability; the largest
diameter over all regions; tumour area over tissue area; and summed probability over tissue
area. The slide's maximum and mean probability come on top. Every length is in µm and every area
in µm², from the heatmap's MPP, so features do not depend on the resolution they were computed at.

A slide-sized heatmap is never loaded whole: it is reduced band by band (``downsample``) to a
working view of ``work_mpp`` µm/px (default 8 µm/px: an isolated-tumour-cell cluster of 0.2 mm
is still 25 px across) and the features are computed on that view.

The CAMELYON17 size classes follow from the largest lesion diameter: ITC <= 0.2 mm,
micro-metastasis <= 2 mm, macro-metastasis > 2 mm (``size_class``).
"""
from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from skimage.measure import label as cc_label, regionprops

from slidekit.annotations.geometry import filled_geometry
from slidekit.base.errors import SlidekitError
from slidekit.base.io import atomic_path
from slidekit.infer.heatmap import Heatmap

SIZE_CLASSES: tuple[str, ...] = ("negative", "itc", "micro", "macro")
ITC_MAX_UM = 200.0
MICRO_MAX_UM = 2000.0
DEFAULT_THRESHOLDS: tuple[float, ...] = (0.5, 0.9)
DEFAULT_WORK_MPP = 8.0
_REGION_STATS = ("area_um2", "major_axis_um", "minor_axis_um", "perimeter_um", "diameter_um",
                 "mean_prob", "max_prob")
_MAX_FERET_REGIONS = 20  # Feret diameters only for the largest regions; the rest are too small to matter


def size_class(diameter_um: float) -> str:
    """CAMELYON17 node label from the largest lesion diameter in µm (0 or NaN: negative)."""
    if not diameter_um or not math.isfinite(diameter_um) or diameter_um <= 0:
        return "negative"
    if diameter_um <= ITC_MAX_UM:
        return "itc"
    if diameter_um <= MICRO_MAX_UM:
        return "micro"
    return "macro"


def _tag(threshold: float) -> str:
    """Column prefix for a threshold: 0.5 -> 't50', 0.95 -> 't95', 0.125 -> 't125'."""
    s = f"{threshold:.3f}".rstrip("0").rstrip(".")
    return "t" + (s.split(".", 1)[1].ljust(2, "0") if "." in s else s + "00")


def feature_names(thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> list[str]:
    """Column names of ``heatmap_features`` for these thresholds, in order."""
    names = ["max_prob", "mean_prob", "tissue_area_um2"]
    for t in thresholds:
        p = _tag(t)
        names += [f"{p}_n_regions"] + [f"{p}_largest_{s}" for s in _REGION_STATS]
        names += [f"{p}_max_diameter_um", f"{p}_tumour_fraction", f"{p}_prob_sum_fraction"]
    return names


def heatmap_features(prob: np.ndarray, mpp: float, tissue: np.ndarray | None = None,
                     thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> dict[str, float]:
    """Morphology features of an in-memory 2-D probability map of ``mpp`` µm/px.

    ``tissue`` (bool, same shape) says which pixels are tissue; by default every finite pixel is.
    NaN pixels (never predicted) count as probability 0 outside tissue.
    """
    prob = np.asarray(prob, dtype=np.float32)
    if prob.ndim != 2:
        raise ValueError(f"expected a 2-D probability map, got shape {prob.shape}")
    if tissue is None:
        tissue = np.isfinite(prob)
    else:
        tissue = np.asarray(tissue, bool)
        if tissue.shape != prob.shape:
            raise ValueError(f"tissue mask shape {tissue.shape} differs from heatmap shape {prob.shape}")
    prob = np.where(np.isfinite(prob), prob, 0.0).astype(np.float32)
    px_area = mpp * mpp
    n_tissue = int(tissue.sum())
    tissue_area = n_tissue * px_area
    out: dict[str, float] = {
        "max_prob": float(prob.max()) if prob.size else 0.0,
        "mean_prob": float(prob[tissue].mean()) if n_tissue else 0.0,
        "tissue_area_um2": tissue_area,
    }
    for t in thresholds:
        out.update(_threshold_features(prob, mpp, tissue_area, float(t)))
    return out


def _threshold_features(prob: np.ndarray, mpp: float, tissue_area: float, t: float) -> dict[str, float]:
    p = _tag(t)
    fg = prob >= t
    labels = cc_label(fg, connectivity=2)
    regions = regionprops(labels, intensity_image=prob)
    out = {f"{p}_n_regions": float(len(regions))}
    stats = dict.fromkeys(_REGION_STATS, 0.0)
    max_diameter = 0.0
    if regions:
        regions.sort(key=lambda r: r.area, reverse=True)
        big = regions[0]
        diameters = [float(r.feret_diameter_max) for r in regions[:_MAX_FERET_REGIONS]]
        stats = {
            "area_um2": float(big.area) * mpp * mpp,
            "major_axis_um": float(big.axis_major_length) * mpp,
            "minor_axis_um": float(big.axis_minor_length) * mpp,
            "perimeter_um": float(big.perimeter) * mpp,
            "diameter_um": diameters[0] * mpp,
            "mean_prob": float(big.intensity_mean),
            "max_prob": float(big.intensity_max),
        }
        max_diameter = max(diameters) * mpp
    out.update({f"{p}_largest_{k}": v for k, v in stats.items()})
    out[f"{p}_max_diameter_um"] = max_diameter
    fg_area = float(fg.sum()) * mpp * mpp
    out[f"{p}_tumour_fraction"] = fg_area / tissue_area if tissue_area else 0.0
    out[f"{p}_prob_sum_fraction"] = (float(prob[fg].sum()) * mpp * mpp / tissue_area) if tissue_area else 0.0
    return out


def predicted_size_class(features: dict[str, float], threshold: float = 0.5) -> str:
    """Rule-based node label from features: the size class of the largest lesion at ``threshold``."""
    return size_class(features.get(f"{_tag(threshold)}_max_diameter_um", 0.0))


def annotation_features(annotations: Iterable[Any], slide_mpp: float | tuple[float, float],
                        labels: Sequence[str | None] | None = None,
                        exclude: Sequence[str | None] = ()) -> dict[str, float | str]:
    """Lesion features of outlines drawn by hand (e.g. CAMELYON XML), in µm / µm²: ``n_regions``
    (connected lesions), ``area_um2`` (their union), ``largest_area_um2``, ``max_diameter_um``
    (largest Feret diameter of a lesion) and the CAMELYON17 ``size_class``.

    Polygons are filled as QuPath and ASAP fill them, by the non-zero winding rule
    (``slidekit.annotations.geometry``): a self-intersecting outline counts its overlapping loops once and
    both lobes of a figure-eight, where ``Polygon.area`` would cancel them. ``labels`` keeps only
    those classes (default: every polygon); ``exclude`` classes (e.g. CAMELYON's ``negative``)
    are cut out of the lesions.
    """
    import shapely
    from shapely.affinity import scale


    smx, smy = (slide_mpp, slide_mpp) if np.isscalar(slide_mpp) else slide_mpp  # type: ignore[misc]
    keep, cut = [], []
    for a in annotations:
        if a.geometry.geom_type not in ("Polygon", "MultiPolygon"):
            continue
        if a.label in exclude:
            cut.append(filled_geometry(a.geometry))
        elif labels is None or a.label in labels:
            keep.append(filled_geometry(a.geometry))
    region = shapely.union_all(keep) if keep else shapely.Polygon()
    if cut and not region.is_empty:
        region = region.difference(shapely.union_all(cut))
    # Feret diameters and areas in µm: scale to µm first so anisotropic pixels are right.
    region = scale(region, smx, smy, origin=(0, 0)) if not region.is_empty else region
    parts = [g for g in shapely.get_parts(region) if g.area > 0]
    diameters = []
    for g in parts:
        hull = np.asarray(g.convex_hull.exterior.coords if g.convex_hull.geom_type == "Polygon" else
                          shapely.get_coordinates(g.convex_hull))
        d = hull[:, None, :] - hull[None, :, :]
        diameters.append(float(np.sqrt((d ** 2).sum(-1)).max()))
    max_d = max(diameters, default=0.0)
    return {"n_regions": float(len(parts)), "area_um2": float(region.area),
            "largest_area_um2": max((float(g.area) for g in parts), default=0.0),
            "max_diameter_um": max_d, "size_class": size_class(max_d)}


def downsample(arr: Any, factor: int, band_rows: int | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """Block-reduce a 2-D array-like (numpy, zarr) by an integer ``factor``, band by band.

    Returns (mean view, finite-pixel fraction view, exact maximum). Each output pixel is the mean
    of the finite values in its ``factor x factor`` block (NaN where none are); only one band of
    ``band_rows`` input rows is in memory at a time.
    """
    factor = max(1, int(factor))
    h, w = int(arr.shape[0]), int(arr.shape[1])
    oh, ow = math.ceil(h / factor), math.ceil(w / factor)
    if band_rows is None:
        chunk = getattr(arr, "chunks", None)
        base = int(chunk[0]) if chunk else 1024
        band_rows = max(factor, (max(base, 512) // factor) * factor)
    band_rows = max(factor, (band_rows // factor) * factor)
    mean = np.full((oh, ow), np.nan, np.float32)
    cover = np.zeros((oh, ow), np.float32)
    vmax = -np.inf
    for r0 in range(0, h, band_rows):
        band = np.asarray(arr[r0:min(h, r0 + band_rows)], dtype=np.float32)
        if band.ndim != 2:
            raise ValueError(f"expected a 2-D heatmap channel, got a band of shape {band.shape}")
        bh = band.shape[0]
        ph, pw = math.ceil(bh / factor) * factor, ow * factor
        padded = np.full((ph, pw), np.nan, np.float32)
        padded[:bh, :w] = band
        blocks = padded.reshape(ph // factor, factor, ow, factor)
        finite = np.isfinite(blocks)
        n = finite.sum(axis=(1, 3))
        s = np.where(finite, blocks, 0).sum(axis=(1, 3))
        o0 = r0 // factor
        with np.errstate(invalid="ignore", divide="ignore"):
            mean[o0:o0 + ph // factor] = np.where(n > 0, s / np.maximum(n, 1), np.nan)
        cover[o0:o0 + ph // factor] = n / float(factor * factor)
        if finite.any():
            vmax = max(vmax, float(np.nanmax(band)))
    return mean, cover, (vmax if math.isfinite(vmax) else 0.0)


# --------------------------------------------------------------------------- heatmaps on disk

class HeatmapView:
    """A probability channel of a heatmap on disk, its MPP, and an optional tissue mask at the
    same resolution. ``prob`` may be any 2-D array-like that supports row slicing (zarr)."""

    def __init__(self, prob: Any, mpp: float, tissue: Any = None, name: str = "") -> None:
        self.prob, self.mpp, self.tissue, self.name = prob, float(mpp), tissue, name


class _Channel:
    """One channel of a (C, H, W) zarr array, sliced by rows like a 2-D array (read lazily)."""

    def __init__(self, arr: Any, channel: int) -> None:
        self.arr, self.channel = arr, channel
        self.shape = tuple(arr.shape[1:])
        self.chunks = tuple(arr.chunks[1:])

    def __getitem__(self, rows: slice) -> np.ndarray:
        return np.asarray(self.arr[self.channel, rows])


def open_heatmap_view(path: str | os.PathLike, channel: int | None = None) -> HeatmapView:
    """Open a heatmap lazily: a directory with ``heatmap.zarr`` inside, or the store itself.

    ``channel`` picks the tumour-probability channel (default: the last one, the positive class
    of a two-class model); the heatmap's coverage is the tissue mask.
    """
    path = Path(path)
    store = path / "heatmap.zarr" if (path / "heatmap.zarr").exists() else path
    hm = Heatmap(store)
    n = hm.prob.shape[0]
    c = n - 1 if channel is None else int(channel)
    if not -n <= c < n:
        raise SlidekitError(f"heatmap has {n} channel(s) ({', '.join(hm.classes)}); no channel {channel}", store)
    return HeatmapView(_Channel(hm.prob, c % n), hm.mpp, tissue=hm.coverage, name=path.name)


def features_from_view(view: HeatmapView, thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
                       work_mpp: float | None = None) -> dict[str, float]:
    """Features of a (possibly slide-sized) heatmap, on a view reduced to ``work_mpp`` µm/px."""
    work_mpp = DEFAULT_WORK_MPP if work_mpp is None else float(work_mpp)
    factor = max(1, int(round(work_mpp / view.mpp)))
    mean, cover, vmax = downsample(view.prob, factor)
    tissue = None
    if view.tissue is not None:
        t_mean, _, _ = downsample(view.tissue, factor)
        tissue = np.nan_to_num(t_mean) >= 0.5
    else:
        tissue = cover >= 0.5
    feats = heatmap_features(mean, view.mpp * factor, tissue=tissue, thresholds=thresholds)
    feats["max_prob"] = vmax  # exact, not the block mean
    return feats


def features_table(heatmaps: Iterable[str | os.PathLike], out: str | os.PathLike | None = None,
                   thresholds: Sequence[float] = DEFAULT_THRESHOLDS, channel: int | None = None,
                   work_mpp: float | None = None, progress: bool = False) -> list[dict[str, Any]]:
    """One feature row per heatmap (columns ``heatmap``, ``size_class``, then ``feature_names``);
    written as CSV to ``out`` atomically when given."""
    from tqdm.auto import tqdm

    rows = []
    paths = [Path(p) for p in heatmaps]
    for p in tqdm(paths, desc="features", unit="heatmap", disable=not progress):
        if not p.exists():
            raise SlidekitError("heatmap not found", p)
        feats = features_from_view(open_heatmap_view(p, channel), thresholds, work_mpp)
        rows.append({"heatmap": str(p), "size_class": predicted_size_class(feats, thresholds[0]), **feats})
    if out is not None:
        write_table(out, rows)
    return rows


def write_table(path: str | os.PathLike, rows: list[dict[str, Any]]) -> Path:
    """Write dict rows as CSV atomically (columns: union of keys, first-seen order)."""
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue())
    return Path(path)


def read_table(path: str | os.PathLike) -> list[dict[str, str]]:
    """Read a CSV written by ``write_table`` (values as strings)."""
    path = Path(path)
    if not path.exists():
        raise SlidekitError("feature table not found", path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            return list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        why = "not UTF-8 text" if isinstance(e, UnicodeDecodeError) else f"unreadable ({type(e).__name__}: {e})"
        raise SlidekitError(f"feature table is {why}", path) from None
