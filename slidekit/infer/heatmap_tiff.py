"""A heatmap as a pyramidal TIFF at the heatmap's own pixel size, to open beside the slide in QuPath
or any viewer (``slidekit heatmap --tiff``).

The TIFF is tiled, one page per level (2x steps, as OpenSlide's generic TIFF and tiffslide read it),
with the physical pixel size in the resolution tags (pixels per centimetre = 10^4 / MPP) and a JSON
ImageDescription naming the classes, the heatmap MPP and the level-0 origin of pixel (0, 0).
``mode="rgb"`` colours it as the overlay does (one class: jet colour map of the value in [0, 1];
several: each class's colour, the first class, background, white); uncovered pixels are white.
``mode="values"`` writes the float32 values, one sample per class, NaN where nothing was predicted.

Memory stays flat: level 0 is rendered band by band from the zarr store, and each smaller level is
built band by band from the previous one, held in a temporary zarr store beside the output.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import cv2
import numpy as np

from slidekit.base.io import atomic_path

TIFF_MODES = ("rgb", "values")


def _render(heatmap: Any, r0: int, r1: int, mode: str) -> np.ndarray:
    """Rows r0..r1 of level 0: (h, W, 3) uint8 or (h, W, C) float32."""
    p = np.asarray(heatmap.prob[:, r0:r1, :], np.float32)
    cov = np.asarray(heatmap.coverage[r0:r1, :]).astype(bool)
    if mode == "values":
        out = np.moveaxis(p, 0, -1).copy()
        out[~cov] = np.nan
        return out
    if p.shape[0] == 1:
        v = np.rint(np.clip(p[0], 0, 1) * 255).astype(np.uint8)
        rgb = cv2.applyColorMap(v, cv2.COLORMAP_JET)[..., ::-1].copy()
        lab = None
    else:
        lab = p.argmax(0)
        palette = np.array(heatmap.colors or [(255, 0, 0)] * p.shape[0], np.uint8)
        rgb = palette[lab]
    rgb[~cov] = 255
    if lab is not None:
        rgb[lab == 0] = 255  # background, left uncoloured as in the overlay
    return rgb


def _halve(a: np.ndarray) -> np.ndarray:
    """2x2 mean (NaN-aware for float values), odd edges padded by repetition."""
    h, w = a.shape[:2]
    a = np.pad(a, ((0, h % 2), (0, w % 2)) + ((0, 0),) * (a.ndim - 2), mode="edge")
    blocks = a.reshape(a.shape[0] // 2, 2, a.shape[1] // 2, 2, *a.shape[2:])
    if a.dtype == np.uint8:
        return np.rint(blocks.astype(np.float32).mean(axis=(1, 3))).astype(np.uint8)
    with np.errstate(invalid="ignore"), __import__("warnings").catch_warnings():
        __import__("warnings").simplefilter("ignore", RuntimeWarning)  # all-NaN blocks stay NaN
        return np.nanmean(blocks, axis=(1, 3)).astype(np.float32)


def _tiles(level: Any, tile: int) -> Iterator[np.ndarray]:
    """Tiles of a (H, W, S) array-like in row-major order, padded to ``tile`` x ``tile``."""
    H, W = level.shape[:2]
    for r in range(0, H, tile):
        band = np.asarray(level[r:r + tile])
        for c in range(0, W, tile):
            t = band[:, c:c + tile]
            if t.shape[:2] != (tile, tile):
                t = np.pad(t, ((0, tile - t.shape[0]), (0, tile - t.shape[1]), (0, 0)))
            yield np.ascontiguousarray(t)


def write_heatmap_tiff(heatmap: Any, path: str | os.PathLike, mode: str = "rgb", tile: int = 256,
                       min_size: int = 256, band: int = 1024) -> Path:
    """Write ``heatmap`` (a ``slidekit.infer.heatmap.Heatmap``) as a pyramidal TIFF at its MPP; atomic."""
    import tifffile
    import zarr

    if mode not in TIFF_MODES:
        raise ValueError(f"TIFF mode must be one of {TIFF_MODES}, not {mode!r}")
    path = Path(path)
    H, W = heatmap.shape
    C = heatmap.prob.shape[0]
    S, dtype = (3, np.uint8) if mode == "rgb" else (C, np.float32)
    band = max(2, band // 2 * 2)  # even, so halving a band lines up with the next level's rows
    mpp = heatmap.mpp
    description = json.dumps({"slidekit": "heatmap", "mode": mode, "classes": heatmap.classes, "mpp": mpp,
                              "origin_level0": list(heatmap.origin), "level0_px_per_pixel": list(heatmap.scale)})
    path.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        levels = [zarr.open_array(str(work / "0"), mode="w", shape=(H, W, S), chunks=(band, W, S), dtype=dtype)]
        for r0 in range(0, H, band):
            levels[0][r0:min(H, r0 + band)] = _render(heatmap, r0, min(H, r0 + band), mode)
        while max(levels[-1].shape[:2]) // 2 >= min_size:
            prev = levels[-1]
            h, w = -(-prev.shape[0] // 2), -(-prev.shape[1] // 2)
            nxt = zarr.open_array(str(work / str(len(levels))), mode="w", shape=(h, w, S),
                                  chunks=(band // 2, w, S), dtype=dtype)
            for r0 in range(0, prev.shape[0], band):
                half = _halve(np.asarray(prev[r0:r0 + band]))
                nxt[r0 // 2:r0 // 2 + half.shape[0]] = half
            levels.append(nxt)
        with atomic_path(path) as tmp:
            big = H * W * S * np.dtype(dtype).itemsize > 2 ** 31
            with tifffile.TiffWriter(tmp, bigtiff=big) as tw:
                for i, lvl in enumerate(levels):
                    ds = W / lvl.shape[1]
                    res = 1e4 / (mpp * ds)  # pixels per centimetre
                    tiles, shape = _tiles(lvl, tile), lvl.shape
                    if S == 1:  # one value per pixel: a plain grey page
                        tiles, shape = (t[..., 0] for t in tiles), shape[:2]
                    tw.write(tiles, shape=shape, dtype=dtype, tile=(tile, tile),
                             photometric="rgb" if mode == "rgb" else "minisblack",
                             planarconfig="contig" if S > 1 else None, compression="zlib",
                             resolution=(res, res), resolutionunit="CENTIMETER",
                             subfiletype=0 if i == 0 else 1, metadata=None,
                             description=description if i == 0 else None)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return path
