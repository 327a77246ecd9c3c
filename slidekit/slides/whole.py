"""Whole-slide overviews (``Slide.read_whole`` / ``thumbnail``) with bounded memory.

The overview is read from the nearest pyramid level at or below the asked pixel size, in
row bands, and shrunk with area averaging. When that level is much finer than the overview (a
single-level slide), the stored tiles are decoded directly in threads, one tile row at a time,
instead of through the slide reader's RGBA regions, and a progress bar shows the decode. A read
that would decode more than a stated number of pixels is refused with one line.

A thumbnail (``Slide.thumbnail``, at most ``SAMPLED_MAX_SIDE`` px a side) of such a level that would
decode more than ``SAMPLE_BUDGET_PIXELS`` answers from a strided sample of the stored tiles instead
(one tile per cell of s x s tiles, stretched over its cell), with a warning saying so: a 100,000² px
single-level slide's thumbnail takes about a second instead of minutes.
"""
from __future__ import annotations

import math
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import cv2
import numpy as np

from slidekit.base.errors import BadTileWarning, CorruptTileError, SlideError, SlidekitWarning
from slidekit.base.resources import cpu_budget

# ``read_whole`` shows a progress bar (progress=None) when it decodes more than this many pixels.
PROGRESS_PIXELS = 1 << 28
# A thumbnail-sized overview of a level finer than this many pixels samples its stored tiles.
SAMPLE_BUDGET_PIXELS = 1 << 28
SAMPLED_MAX_SIDE = 2048


class SampledOverviewWarning(SlidekitWarning):
    """An overview was made from a strided sample of a single-level slide's stored tiles."""


def read_downsampled(slide: Any, out_w: int, out_h: int, scale: float, max_pixels_per_read: int,
                     progress: bool | None, max_read_pixels: int, sample: bool = False) -> np.ndarray:
    """The whole slide as (out_h, out_w, 3) uint8; ``scale`` = level-0 pixels per output pixel.
    ``sample``: a preview may come from a strided sample of stored tiles (see the module's notes):
    ``Slide.thumbnail`` asks for it; tissue detection's views (``read_whole``) never do."""
    level = slide._best_level_for_downsample(scale)
    lw, lh = slide.level_dimensions[level]
    total = lw * lh
    if sample and total > SAMPLE_BUDGET_PIXELS and max(out_w, out_h) <= SAMPLED_MAX_SIDE \
            and lw / out_w >= 2 and lh / out_h >= 2:
        st = slide.stored_tiles(level)
        if st is not None and _native_agrees(slide, st, level):
            return _sampled_stored_tiles(st, lw, lh, out_w, out_h, slide, level)
    if total > max_read_pixels:
        raise SlideError(
            f"a {out_w} x {out_h} overview would decode all {lw} x {lh} = {total:,} pixels of level {level} "
            f"(no pyramid level is close to that size), over the limit of {max_read_pixels:,}; "
            "pass max_read_pixels= to allow it", slide.path)
    show = progress if progress is not None else total > PROGRESS_PIXELS
    bar = None
    if show:
        from tqdm.auto import tqdm

        bar = tqdm(total=lh, unit="row", unit_scale=True, desc=f"overview {slide.name}", leave=False)
    try:
        st = slide.stored_tiles(level) if lw / out_w >= 2 and lh / out_h >= 2 else None
        if st is not None and _native_agrees(slide, st, level):
            return _from_stored_tiles(st, lw, lh, out_w, out_h, bar, slide, level)
        try:
            return _from_regions(slide, level, lw, lh, out_w, out_h, max_pixels_per_read, bar)
        except SlideError:
            # The backend fails on a damaged tile: where bad tiles are skipped, decode the stored
            # tiles instead (the damaged one grey, warned), else the one-line error stands.
            st = slide.stored_tiles(level) if getattr(slide, "skip_bad_tiles", False) else None
            if st is None:
                raise
            if bar is not None:
                bar.reset()
            return _from_stored_tiles(st, lw, lh, out_w, out_h, bar, slide, level)
    finally:
        if bar is not None:
            bar.close()


def _from_regions(slide: Any, level: int, lw: int, lh: int, out_w: int, out_h: int,
                  max_pixels_per_read: int, bar) -> np.ndarray:
    ds = slide.level_downsamples[level]
    out = np.empty((out_h, out_w, 3), np.uint8)
    rows_per_band = max(1, int(max_pixels_per_read / max(lw, 1) * out_h / max(lh, 1)))
    for r0 in range(0, out_h, rows_per_band):
        r1 = min(out_h, r0 + rows_per_band)
        ly0, ly1 = round(r0 * lh / out_h), max(round(r1 * lh / out_h), round(r0 * lh / out_h) + 1)
        # The overview only steers tissue detection and previews; tiles fed to models are verified.
        band = slide.read_region((0, int(ly0 * ds)), level, (lw, ly1 - ly0), verify=False)
        out[r0:r1] = cv2.resize(band, (out_w, r1 - r0), interpolation=cv2.INTER_AREA)
        if bar is not None:
            bar.update(ly1 - ly0)
    return out


def _native_agrees(slide: Any, st, level: int) -> bool:
    """Trust but verify: the first stored tile decodes as the slide reader reads it."""
    try:
        tile = st.decode(0)
        w, h = min(st.tile_w, st.width), min(st.tile_h, st.height)
        ref = slide.read_region((0, 0), level, (w, h), verify=False)
        return float(np.abs(tile[:h, :w].astype(np.int16) - ref.astype(np.int16)).mean()) <= 2.0
    except Exception:
        return False


def _overview_tile(st, col: int, row: int, slide: Any, level: int) -> np.ndarray:
    """Stored tile (col, row) for an overview. One that cannot be decoded is a CorruptTileError,
    or, where the caller skips bad tiles (``slide.skip_bad_tiles``), mid-grey with a warning: grey
    counts as tissue, so the grid keeps the tile and the tile read reports and records it."""
    try:
        return st.decode(st.index(col, row))
    except Exception as e:  # decoder errors of a damaged stored tile
        ds = slide.level_downsamples[level]
        x0, y0 = round(col * st.tile_w * ds), round(row * st.tile_h * ds)
        msg = f"damaged tile at level-0 ({x0}, {y0}), level {level}: {type(e).__name__}: {e}"
        if not getattr(slide, "skip_bad_tiles", False):
            raise CorruptTileError(msg, slide.path, location=(x0, y0), level=level) from e
        warnings.warn(f"{slide.path}: overview: {msg} (shown grey)", BadTileWarning, stacklevel=2)
        return np.full((st.tile_h, st.tile_w, 3), 128, np.uint8)


def _from_stored_tiles(st, lw: int, lh: int, out_w: int, out_h: int, bar, slide: Any, level: int) -> np.ndarray:
    out = np.empty((out_h, out_w, 3), np.uint8)
    # Output row r averages level rows [edges[r], edges[r + 1]), the same split as _from_regions.
    edges = np.round(np.arange(out_h + 1) * lh / out_h).astype(np.int64)
    buf, buf_y0, r_next = None, 0, 0

    workers = max(1, min(8, cpu_budget()))  # the CPUs this process may use, not the machine's
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for trow in range(st.down):
            y0, y1 = trow * st.tile_h, min((trow + 1) * st.tile_h, lh)
            tiles = list(pool.map(lambda c, trow=trow: _overview_tile(st, c, trow, slide, level), range(st.across)))
            band = np.concatenate(tiles, axis=1)[: y1 - y0, :lw]
            buf = band if buf is None else np.concatenate([buf, band], axis=0)
            r_stop = int(np.searchsorted(edges, y1, side="right")) - 1
            if r_stop > r_next:
                a, b = edges[r_next] - buf_y0, edges[r_stop] - buf_y0
                out[r_next:r_stop] = cv2.resize(buf[a:b], (out_w, r_stop - r_next), interpolation=cv2.INTER_AREA)
                buf, buf_y0, r_next = buf[b:], int(edges[r_stop]), r_stop
            if bar is not None:
                bar.update(y1 - y0)
    if r_next < out_h:  # cannot happen when the tiles cover the level; keep the contract anyway
        raise SlideError(f"stored tiles cover only {buf_y0} of {lh} rows", st.path)
    return out


def _sampled_stored_tiles(st, lw: int, lh: int, out_w: int, out_h: int, slide: Any, level: int) -> np.ndarray:
    """The overview from one stored tile per cell of s x s tiles (the cell's middle tile, stretched
    over the cell's part of the output), s chosen so that at most ``SAMPLE_BUDGET_PIXELS`` level
    pixels are decoded. Warns once, naming the slide and the sampling."""
    s = max(1, math.ceil(math.sqrt(st.across * st.down * st.tile_w * st.tile_h / SAMPLE_BUDGET_PIXELS)))
    cols, rows = math.ceil(st.across / s), math.ceil(st.down / s)
    warnings.warn(f"{slide.path}: overview of {lw} x {lh} px made from {cols * rows} of {st.across * st.down} "
                  f"stored tiles (one per {s} x {s}; a single-level slide has no coarser level to read)",
                  SampledOverviewWarning, stacklevel=4)
    fx, fy = out_w / lw, out_h / lh
    cells = [(ci, ri) for ri in range(rows) for ci in range(cols)]

    def one(cell: tuple[int, int]) -> tuple[tuple[int, int], np.ndarray]:
        ci, ri = cell
        c, r = min(ci * s + s // 2, st.across - 1), min(ri * s + s // 2, st.down - 1)
        tile = _overview_tile(st, c, r, slide, level)
        tw, th = min(st.tile_w, lw - c * st.tile_w), min(st.tile_h, lh - r * st.tile_h)
        return cell, tile[:th, :tw]

    out = np.empty((out_h, out_w, 3), np.uint8)
    workers = max(1, min(8, cpu_budget()))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for (ci, ri), tile in pool.map(one, cells):
            x0, x1 = ci * s * st.tile_w, min((ci + 1) * s * st.tile_w, lw)
            y0, y1 = ri * s * st.tile_h, min((ri + 1) * s * st.tile_h, lh)
            ox0, ox1, oy0, oy1 = round(x0 * fx), round(x1 * fx), round(y0 * fy), round(y1 * fy)
            if ox1 > ox0 and oy1 > oy0:
                out[oy0:oy1, ox0:ox1] = cv2.resize(tile, (ox1 - ox0, oy1 - oy0), interpolation=cv2.INTER_AREA)
    return out
