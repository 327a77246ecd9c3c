"""Regions a job works on, as masks that compose: ``Tissue() & Roi("roi.geojson") - Artefacts(...)``.

A :class:`Region` is a recipe, built against an open slide into a ``TissueMask`` (a boolean raster
at a coarse µm/px with level-0 polygons). Every source of regions is one small class with two
methods — ``build`` (the raster, on another mask's raster when given, so that ``&`` and ``-`` work
pixel by pixel) and ``config`` (what a rerun compares) — and every job honours every source through
the shared runner (``regions.job``), which builds the job's region before tiling.

``&`` keeps the pixels in both, ``-`` removes the right-hand side's pixels from the left. The left
operand sets the raster (its µm/px and shape); the right is drawn onto it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import cv2
import numpy as np

from slidekit.base.errors import ConfigError, TissueError
from slidekit.base.io import file_identity
from slidekit.regions.options import TissueOptions
from slidekit.regions.roi import read_roi, roi_identity, roi_raster
from slidekit.regions.tissue import TissueMask, tissue_mask


class Region:
    """A source of regions: ``build(slide, like=None) -> TissueMask`` and ``config() -> dict``."""

    def build(self, slide: Any, like: TissueMask | None = None, progress: bool | None = None) -> TissueMask:
        """The region as a mask on ``slide`` (on ``like``'s raster when given).

        Parameters
        ----------
        slide
            The open slide.
        like
            A mask whose raster (µm/px, shape) the result must share; None: the region's own.
        progress
            Progress bar for slow reads (None: the reader decides).
        """
        raise NotImplementedError

    def config(self) -> dict:
        """What identifies this region in a job's configuration (JSON-able; empty for the defaults)."""
        raise NotImplementedError

    def __and__(self, other: "Region") -> "Region":
        return Intersect(self, other)

    def __sub__(self, other: "Region") -> "Region":
        return Subtract(self, other)


def _onto(mask: TissueMask, like: TissueMask | None) -> TissueMask:
    """``mask`` resampled (nearest) onto ``like``'s raster."""
    if like is None or (mask.array.shape == like.array.shape and np.isclose(mask.mpp, like.mpp)):
        return mask
    H, W = like.array.shape
    sx, sy = like.mpp / mask.mpp, like.mpp / mask.mpp
    # sample each target pixel's centre in the source raster
    cols = np.clip(((np.arange(W) + 0.5) * sx).astype(np.int64), 0, mask.array.shape[1] - 1)
    rows = np.clip(((np.arange(H) + 0.5) * sy).astype(np.int64), 0, mask.array.shape[0] - 1)
    return TissueMask(array=mask.array[np.ix_(rows, cols)], mpp=like.mpp, slide_mpp=like.slide_mpp)


@dataclass(frozen=True)
class Tissue(Region):
    """The slide's tissue (``regions.tissue.tissue_mask`` with ``options``)."""

    options: TissueOptions = TissueOptions()

    def build(self, slide: Any, like: TissueMask | None = None, progress: bool | None = None) -> TissueMask:
        opts = self.options.as_dict()
        if like is not None and "mpp" not in opts:
            opts["mpp"] = like.mpp
        return _onto(tissue_mask(slide, progress=progress, **opts), like)

    def config(self) -> dict:
        return {"tissue": self.options.as_dict()} if self.options.as_dict() else {}


@dataclass(frozen=True)
class WholeSlide(Region):
    """Every pixel of the slide (no tissue detection), at ``mpp`` µm/px."""

    mpp: float = 8.0

    def build(self, slide: Any, like: TissueMask | None = None, progress: bool | None = None) -> TissueMask:
        if like is not None:
            return TissueMask(array=np.ones_like(like.array, bool), mpp=like.mpp, slide_mpp=like.slide_mpp)
        mx, my = slide.mpp
        W, H = slide.dimensions
        shape = (max(1, int(np.ceil(H * my / self.mpp))), max(1, int(np.ceil(W * mx / self.mpp))))
        return TissueMask(array=np.ones(shape, bool), mpp=self.mpp, slide_mpp=tuple(slide.mpp))

    def config(self) -> dict:
        return {}


@dataclass(frozen=True)
class Roi(Region):
    """The polygons of a QuPath GeoJSON or ASAP/ImageScope XML file (only ``classes`` when given)."""

    path: str | os.PathLike
    classes: Sequence[str] | str | None = None
    mpp: float = 8.0  # the raster when the ROI is the left operand

    def annotations(self) -> list:
        """The file's polygonal objects of the asked classes (``regions.roi.read_roi``)."""
        return read_roi(self.path, self.classes)

    def build(self, slide: Any, like: TissueMask | None = None, progress: bool | None = None) -> TissueMask:
        base = like if like is not None else WholeSlide(self.mpp).build(slide)
        return TissueMask(array=roi_raster(self.annotations(), base), mpp=base.mpp, slide_mpp=base.slide_mpp)

    def config(self) -> dict:
        return {"roi": roi_identity(self.path, self.classes)}


@dataclass(frozen=True)
class MaskImage(Region):
    """A binary mask image (PNG/TIFF; non-zero = inside) covering the whole slide, any size: e.g. a
    QC artefact map or a mask from another tool. Stretched to the slide's extent."""

    path: str | os.PathLike

    def build(self, slide: Any, like: TissueMask | None = None, progress: bool | None = None) -> TissueMask:
        img = cv2.imread(str(self.path), cv2.IMREAD_GRAYSCALE)
        if img is None:
            raise ConfigError(f"{self.path}: not a readable mask image")
        W, H = slide.dimensions
        mpp = float(W * slide.mpp[0] / img.shape[1])
        mask = TissueMask(array=img > 0, mpp=mpp, slide_mpp=tuple(slide.mpp))
        return _onto(mask, like)

    def config(self) -> dict:
        return {"mask": file_identity(self.path)}


@dataclass(frozen=True)
class Intersect(Region):
    """Pixels in both regions (``a & b``)."""

    a: Region
    b: Region

    def build(self, slide: Any, like: TissueMask | None = None, progress: bool | None = None) -> TissueMask:
        left = self.a.build(slide, like, progress)
        right = self.b.build(slide, left, progress)
        return TissueMask(array=left.array & right.array, mpp=left.mpp, slide_mpp=left.slide_mpp)

    def config(self) -> dict:
        return {**self.a.config(), **self.b.config()}


@dataclass(frozen=True)
class Subtract(Region):
    """Pixels of ``a`` not in ``b`` (``a - b``)."""

    a: Region
    b: Region

    def build(self, slide: Any, like: TissueMask | None = None, progress: bool | None = None) -> TissueMask:
        left = self.a.build(slide, like, progress)
        right = self.b.build(slide, left, progress)
        return TissueMask(array=left.array & ~right.array, mpp=left.mpp, slide_mpp=left.slide_mpp)

    def config(self) -> dict:
        # a subtracted source is recorded under its own keys with a minus sign, so `a - b` and `a & b` differ
        return {**self.a.config(), **{f"-{k}": v for k, v in self.b.config().items()}}


def build_region(region: Region, slide: Any, progress: bool | None = None) -> TissueMask:
    """Build ``region`` on ``slide``; TissueError naming the slide when nothing is left."""
    mask = region.build(slide, None, progress)
    if not mask.array.any():
        what = "inside the region of interest" if region.config() else "in the region"
        raise TissueError(f"no tissue {what}", slide.path)
    return mask
