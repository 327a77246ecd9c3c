"""DeepZoom (DZI) tiles of a slide, read through slidekit's own ``Slide`` (any backend), and an
LRU of open slides so a browser's burst of tile requests reuses one handle per slide.

DeepZoom level ``max_level`` is the slide's level 0; each level below halves it, down to 1 x 1 px.
A tile of level ``l`` is read from the coarsest slide level at least as fine as it and shrunk
(area averaging). Levels coarser than a cached overview of the slide (its thumbnail,
``OVERVIEW_SIZE`` px) are cut from that overview, so zoomed-out views never read level 0 of a
slide without a pyramid.
"""
from __future__ import annotations

import math
import threading
from collections import OrderedDict
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable, Iterator

import cv2
import numpy as np
import simplejpeg

from slidekit.slides.slide import Slide, open_slide

TILE_SIZE = 254  # + 1 px overlap each side = 256 px tiles, the DeepZoom convention
OVERLAP = 1
OVERVIEW_SIZE = 2048
JPEG_QUALITY = 85


class DeepZoom:
    """The DeepZoom pyramid of one slide: its descriptor (``dzi_xml``) and tiles (``tile``)."""

    def __init__(self, slide: Slide, tile_size: int = TILE_SIZE, overlap: int = OVERLAP) -> None:
        self.slide = slide
        self.tile_size, self.overlap = int(tile_size), int(overlap)
        self.width, self.height = (int(v) for v in slide.dimensions)
        self.max_level = max(0, math.ceil(math.log2(max(self.width, self.height))))
        self._overview: np.ndarray | None = None
        self._lock = threading.Lock()
        # OpenSlide handles are safe to read from many threads at once; tiffslide's have not always
        # been (Bayer-Group/tiffslide#14), so its reads of one slide take turns.
        self._read_lock = threading.Lock() if slide.backend == "tiffslide" else nullcontext()

    def level_size(self, level: int) -> tuple[int, int]:
        """(w, h) of a DeepZoom level."""
        f = 2 ** (self.max_level - level)
        return max(1, math.ceil(self.width / f)), max(1, math.ceil(self.height / f))

    def tile_count(self, level: int) -> tuple[int, int]:
        """(columns, rows) of a DeepZoom level."""
        w, h = self.level_size(level)
        return math.ceil(w / self.tile_size), math.ceil(h / self.tile_size)

    def dzi_xml(self, fmt: str = "jpeg") -> str:
        """The DZI descriptor."""
        return ('<?xml version="1.0" encoding="UTF-8"?>\n'
                f'<Image xmlns="http://schemas.microsoft.com/deepzoom/2008" Format="{fmt}" '
                f'Overlap="{self.overlap}" TileSize="{self.tile_size}">'
                f'<Size Width="{self.width}" Height="{self.height}"/></Image>\n')

    def tile_box(self, level: int, col: int, row: int) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) in level pixels of a tile, overlap included; IndexError when there is none."""
        if not 0 <= level <= self.max_level:
            raise IndexError(f"no DeepZoom level {level} (0-{self.max_level})")
        cols, rows = self.tile_count(level)
        if not (0 <= col < cols and 0 <= row < rows):
            raise IndexError(f"no tile {col}_{row} at level {level} ({cols} x {rows} tiles)")
        w, h = self.level_size(level)
        t, o = self.tile_size, self.overlap
        return (max(0, col * t - o), max(0, row * t - o), min(w, (col + 1) * t + o), min(h, (row + 1) * t + o))

    def overview(self) -> np.ndarray:
        """The slide at most ``OVERVIEW_SIZE`` px on its longer side (read once, kept)."""
        with self._lock:
            if self._overview is None:
                with self._read_lock:
                    self._overview = self.slide.thumbnail(OVERVIEW_SIZE, progress=False)
            return self._overview

    def tile_rgb(self, level: int, col: int, row: int) -> np.ndarray:
        """One tile as RGB uint8 (h, w, 3)."""
        x0, y0, x1, y1 = self.tile_box(level, col, row)
        scale = 2.0 ** (self.max_level - level)  # level-0 px per tile px
        tw, th = x1 - x0, y1 - y0
        ov_scale = max(self.width, self.height) / max(OVERVIEW_SIZE, 1)
        if scale >= ov_scale > 1:
            ov = self.overview()
            oh, ow = ov.shape[:2]
            kx, ky = self.width / ow, self.height / oh  # level-0 px per overview px
            # the overview pixels under the tile, shrunk to the tile (area averaging)
            ox0, oy0 = min(ow - 1, int(x0 * scale / kx)), min(oh - 1, int(y0 * scale / ky))
            ox1, oy1 = max(ox0 + 1, min(ow, round(x1 * scale / kx))), max(oy0 + 1, min(oh, round(y1 * scale / ky)))
            return cv2.resize(np.ascontiguousarray(ov[oy0:oy1, ox0:ox1]), (tw, th), interpolation=cv2.INTER_AREA)
        downs = self.slide.level_downsamples
        level_idx = max((i for i, d in enumerate(downs) if d <= scale * 1.001), default=0)
        ds = downs[level_idx]
        rw, rh = max(1, math.ceil(tw * scale / ds)), max(1, math.ceil(th * scale / ds))
        with self._read_lock:
            region = self.slide.read_region((round(x0 * scale), round(y0 * scale)), level_idx, (rw, rh), verify=False)
        if (rw, rh) != (tw, th):
            region = cv2.resize(region, (tw, th), interpolation=cv2.INTER_AREA)
        return region

    def tile_jpeg(self, level: int, col: int, row: int, quality: int = JPEG_QUALITY) -> bytes:
        """One tile as JPEG bytes."""
        rgb = np.ascontiguousarray(self.tile_rgb(level, col, row))
        return simplejpeg.encode_jpeg(rgb, quality=quality, colorspace="RGB")


class SlideCache:
    """At most ``size`` open slides (as ``DeepZoom``s), least recently used closed first; thread-safe.
    Slides are opened without requiring a pixel size: tiles need none. ``use(path)`` lends one out;
    a slide evicted while a request still reads it is closed when that request is done."""

    def __init__(self, size: int = 8, opener: Callable[[Path], Slide] | None = None) -> None:
        self.size = max(1, int(size))
        self._open = opener or (lambda p: open_slide(p, require_mpp=False))
        self._items: OrderedDict[Path, DeepZoom] = OrderedDict()
        self._users: dict[int, int] = {}  # id(DeepZoom) -> requests reading it now
        self._evicted: dict[int, DeepZoom] = {}  # out of the cache, still being read
        self._lock = threading.Lock()
        self.opened = 0  # how many times a slide was opened (a test of the LRU counts these)

    def _take(self, path: Path) -> DeepZoom | None:
        dz = self._items.get(path)
        if dz is not None:
            self._items.move_to_end(path)
            self._users[id(dz)] = self._users.get(id(dz), 0) + 1
        return dz

    @contextmanager
    def use(self, path: Path) -> Iterator[DeepZoom]:
        """The DeepZoom of the slide at ``path``, opened when not cached (SlideError when it cannot be)."""
        with self._lock:
            dz = self._take(path)
        if dz is None:
            slide = self._open(path)  # outside the lock: opening a slide can take a while
            with self._lock:
                dz = self._take(path)
                if dz is not None:  # another request opened it meanwhile
                    slide.close()
                else:
                    dz = self._items[path] = DeepZoom(slide)
                    self._users[id(dz)] = 1
                    self.opened += 1
                    while len(self._items) > self.size:
                        _, old = self._items.popitem(last=False)
                        self._evicted[id(old)] = old
                        self._release(old, 0)
        try:
            yield dz
        finally:
            with self._lock:
                self._release(dz, 1)

    def _release(self, dz: DeepZoom, n: int) -> None:
        left = self._users.get(id(dz), 0) - n
        if left > 0:
            self._users[id(dz)] = left
            return
        self._users.pop(id(dz), None)
        if self._evicted.pop(id(dz), None) is not None:
            dz.slide.close()

    def __len__(self) -> int:
        return len(self._items)

    def close(self) -> None:
        """Close every open slide (call when no request is running)."""
        with self._lock:
            for dz in [*self._items.values(), *self._evicted.values()]:
                dz.slide.close()
            self._items.clear()
            self._evicted.clear()
            self._users.clear()
