"""Slide maps as OME-Zarr (NGFF 0.4) multiscale images, readable by ``ome-zarr`` (ome-zarr-py),
napari and vizarr (``slidekit heatmap --ome-zarr``).

``write_ome_zarr`` takes any (C, H, W) array-like map (a heatmap's ``prob``, a cell-density or MIL
attention map) with its pixel size in µm and the µm position of pixel (0, 0) on the slide, and
writes a zarr v2 group (NGFF 0.4 is defined on zarr v2) with axes ``c, y, x``, one array per level
(2x steps) and a ``scale``/``translation`` transform per level in micrometres, so a viewer lays it
over the slide at the slide's scale. ``omero`` names the channels and colours them.

Memory stays flat: level 0 is copied band by band, and each smaller level is built band by band
from the level above it. The store is written under a temporary name and renamed when complete.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import zarr

from slidekit.base.io import atomic_path

NGFF_VERSION = "0.4"


def _halve(a: np.ndarray) -> np.ndarray:
    """2x2 NaN-aware mean over the last two axes of (C, h, w); odd edges padded by repetition."""
    c, h, w = a.shape
    a = np.pad(a, ((0, 0), (0, h % 2), (0, w % 2)), mode="edge")
    blocks = a.reshape(c, a.shape[1] // 2, 2, a.shape[2] // 2, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN blocks (nothing predicted) stay NaN
        return np.nanmean(blocks, axis=(2, 4)).astype(np.float32)


@dataclass(frozen=True)
class MapMetadata:
    """What the NGFF metadata says about a map.

    Parameters
    ----------
    channels
        Channel names (None: ``channel 0``, ``channel 1``, ...).
    colors
        RGB colour per channel for the ``omero`` rendering (None: red).
    name
        The image's name.
    origin_um
        (x, y) µm position of pixel (0, 0)'s corner on the slide.
    """

    channels: Sequence[str] | None = None
    colors: Sequence[Sequence[int]] | None = None
    name: str = "slidekit map"
    origin_um: tuple[float, float] = (0.0, 0.0)


@dataclass(frozen=True)
class ZarrLayout:
    """How the multiscale store is laid out and written.

    Parameters
    ----------
    chunk
        Chunk side in pixels.
    min_size
        Levels are halved while the next one's longer side is at least this.
    band
        Rows read and written at a time (rounded down to whole chunks, at least one).
    """

    chunk: int = 256
    min_size: int = 256
    band: int = 1024


def write_ome_zarr(values: Any, path: str | os.PathLike, mpp: float, *, meta: MapMetadata | None = None,
                   layout: ZarrLayout | None = None,
                   band_fn: Callable[[int, int], np.ndarray] | None = None) -> Path:
    """Write a (C, H, W) map as an NGFF 0.4 multiscale image at ``mpp`` µm/px; atomic.

    ``values`` is any array-like with ``.shape`` and slicing (zarr arrays are read band by band);
    ``band_fn(r0, r1)``, when given, returns rows r0..r1 of level 0 as float32 (C, h, W) instead
    (e.g. with NaN where nothing was predicted). ``meta`` (a :class:`MapMetadata`) names the
    channels, colours them and places pixel (0, 0) on the slide; ``layout`` (a :class:`ZarrLayout`)
    sets chunks, levels and bands (None: their defaults).
    """
    meta = meta or MapMetadata()
    layout = layout or ZarrLayout()
    channels, colors, name, origin_um = meta.channels, meta.colors, meta.name, meta.origin_um
    chunk, min_size, band = layout.chunk, layout.min_size, layout.band
    if mpp <= 0:
        raise ValueError(f"pixel size must be positive, not {mpp}")
    path = Path(path)
    C, H, W = (int(s) for s in values.shape)
    channels = list(channels) if channels is not None else [f"channel {i}" for i in range(C)]
    if len(channels) != C:
        raise ValueError(f"{len(channels)} channel names for {C} channels")
    band = max(chunk, band // chunk * chunk)  # whole chunks, even, so halving lines up
    read = band_fn or (lambda r0, r1: np.asarray(values[:, r0:r1, :], np.float32))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=2)
        opts: dict[str, Any] = dict(dtype="float32", fill_value=np.nan)
        shapes = [(C, H, W)]
        while max(shapes[-1][1:]) // 2 >= min_size:
            _, h, w = shapes[-1]
            shapes.append((C, -(-h // 2), -(-w // 2)))
        arrays = [root.create_array(str(i), shape=s, chunks=(1, min(chunk, s[1]), min(chunk, s[2])), **opts)
                  for i, s in enumerate(shapes)]
        lo, hi = np.inf, -np.inf
        for r0 in range(0, H, band):
            r1 = min(H, r0 + band)
            b = read(r0, r1)
            arrays[0][:, r0:r1, :] = b
            if np.isfinite(b).any():
                lo, hi = min(lo, float(np.nanmin(b))), max(hi, float(np.nanmax(b)))
        for prev, nxt in zip(arrays, arrays[1:]):
            for r0 in range(0, prev.shape[1], band):
                half = _halve(np.asarray(prev[:, r0:r0 + band, :]))
                nxt[:, r0 // 2:r0 // 2 + half.shape[1], :] = half
        ox, oy = origin_um
        datasets: list[dict[str, Any]] = []
        for i in range(len(shapes)):
            ds = 2.0 ** i  # each pixel of level i covers 2^i x 2^i map pixels (odd edges padded)
            datasets.append({"path": str(i), "coordinateTransformations": [
                {"type": "scale", "scale": [1.0, mpp * ds, mpp * ds]},
                {"type": "translation", "translation": [0.0, float(oy), float(ox)]}]})
        if not np.isfinite(lo):
            lo, hi = 0.0, 1.0
        palette = list(colors) if colors else [(255, 0, 0)] * C
        root.attrs.update({
            "multiscales": [{
                "version": NGFF_VERSION, "name": name,
                "axes": [{"name": "c", "type": "channel"},
                         {"name": "y", "type": "space", "unit": "micrometer"},
                         {"name": "x", "type": "space", "unit": "micrometer"}],
                "datasets": datasets,
                "type": "mean", "metadata": {"method": "2x2 mean over predicted pixels (NaN-aware)"},
            }],
            "omero": {"name": name, "version": NGFF_VERSION, "channels": [
                {"label": str(n), "color": "%02X%02X%02X" % tuple(int(v) for v in palette[i % len(palette)][:3]),
                 "active": True, "window": {"min": min(lo, 0.0), "max": max(hi, 1.0), "start": lo, "end": hi}}
                for i, n in enumerate(channels)]},
        })
    return path


def write_heatmap_ome_zarr(heatmap: Any, path: str | os.PathLike, *, layout: ZarrLayout | None = None) -> Path:
    """A ``slidekit.infer.heatmap.Heatmap`` as OME-Zarr: float32 values per class, NaN where
    nothing was predicted, at the heatmap MPP, placed at its level-0 origin in µm."""
    (sx, _), (ox, oy) = heatmap.scale, heatmap.origin
    slide_mpp = heatmap.mpp / sx  # µm per level-0 pixel

    def band_fn(r0: int, r1: int) -> np.ndarray:
        p = np.asarray(heatmap.prob[:, r0:r1, :], np.float32)
        cov = np.asarray(heatmap.coverage[r0:r1, :]).astype(bool)
        p[:, ~cov] = np.nan
        return p

    meta = MapMetadata(channels=heatmap.classes, colors=heatmap.colors or None,
                       origin_um=(ox * slide_mpp, oy * slide_mpp), name=f"slidekit heatmap ({heatmap.task})")
    return write_ome_zarr(heatmap.prob, path, heatmap.mpp, meta=meta, layout=layout, band_fn=band_fn)
