"""Regions of interest: limit tiling and heatmaps to annotated regions (``slidekit heatmap --roi``).

The ROI is the polygons of a QuPath GeoJSON or ASAP/ImageScope XML (optionally only those of some
classes). It is intersected with the tissue mask before tiling, so only tiles whose tissue inside
the ROI reaches ``min_tissue`` are predicted, and the finished heatmap's coverage is cleared at every
pixel whose centre lies outside the ROI: the heatmap, its overlay and its polygons are empty there.
"""
from __future__ import annotations

import os
from typing import Any, Sequence, cast

import numpy as np

from slidekit.annotations.formats import read_annotations
from slidekit.annotations.geometry import rasterize
from slidekit.base.errors import AnnotationError, TissueError
from slidekit.base.io import file_identity
from slidekit.regions.tissue import TissueMask


def read_roi(path: str | os.PathLike, classes: Sequence[str] | str | None = None) -> list:
    """The polygonal objects of ``path`` (of ``classes`` when given).

    Raises AnnotationError when the file has no polygons or no object of the asked classes.
    """
    polygonal = ("Polygon", "MultiPolygon")
    anns = [a for a in read_annotations(path)
            if a.geometry is not None and not a.geometry.is_empty and a.geometry.geom_type in polygonal]
    if not anns:
        raise AnnotationError("holds no polygons to use as a region of interest", path)
    if classes:
        wanted = [classes] if isinstance(classes, str) else list(classes)
        found = sorted({str(a.label) for a in anns})
        anns = [a for a in anns if a.label in wanted]
        if not anns:
            raise AnnotationError(f"no polygon of class {', '.join(map(repr, wanted))} (classes there: "
                                  f"{', '.join(found)})", path)
    for a in anns:  # rasterised as one region: the class only selected them
        a.label = None
    return anns


def roi_identity(path: str | os.PathLike, classes: Sequence[str] | str | None) -> str:
    """What a rerun compares: the file (path, size, time) and the classes."""
    wanted = [classes] if isinstance(classes, str) else sorted(classes or [])
    return f"{file_identity(path)}:{','.join(wanted)}"


def roi_raster(roi: list, like: TissueMask) -> np.ndarray:
    """The ROI's polygons on ``like``'s raster (bool; pixel centres inside them)."""
    H, W = like.array.shape
    sx, sy = like.scale
    inside = rasterize(roi, (0, 0, W * sx, H * sy), like.mpp,
                       slide_mpp=(float(like.slide_mpp[0]), float(like.slide_mpp[1]))).astype(bool)
    return np.pad(inside, ((0, max(0, H - inside.shape[0])), (0, max(0, W - inside.shape[1]))))[:H, :W]


def restrict_mask(mask: Any, roi: list, slide: Any) -> Any:
    """The tissue mask limited to the ROI (pixel centres inside it); TissueError when nothing is left."""
    array = mask.array & roi_raster(roi, mask)
    if not array.any():
        raise TissueError("no tissue inside the region of interest", slide.path)
    return TissueMask(array=array, mpp=mask.mpp, slide_mpp=mask.slide_mpp)


def clip_store_to_roi(store: str | os.PathLike, roi: list, slide_mpp: tuple[float, float], band: int = 512) -> None:
    """Clear coverage (and zero values) of a heatmap store's pixels whose centres lie outside the ROI,
    band by band (flat memory)."""
    import zarr


    root = zarr.open_group(str(store), mode="r+")
    prob, cov = cast(zarr.Array, root["prob"]), cast(zarr.Array, root["coverage"])  # members are Array | Group
    attrs: dict[str, Any] = dict(root.attrs)
    (sx, sy), (ox, oy) = attrs["scale"], attrs["origin"]
    mpp = float(attrs["mpp"])
    H, W = cov.shape
    for r0 in range(0, H, band):
        r1 = min(H, r0 + band)
        inside = rasterize(roi, (ox, oy + r0 * sy, W * sx, (r1 - r0) * sy), mpp,
                           slide_mpp=(slide_mpp[0], slide_mpp[1]))
        inside = np.pad(inside, ((0, max(0, r1 - r0 - inside.shape[0])), (0, max(0, W - inside.shape[1]))))
        inside = inside[:r1 - r0, :W].astype(bool)
        c = np.asarray(cov[r0:r1, :])
        if (c & ~inside).any():
            cov[r0:r1, :] = c & inside
            p = np.asarray(prob[:, r0:r1, :])
            p[:, ~inside] = 0.0
            prob[:, r0:r1, :] = p
