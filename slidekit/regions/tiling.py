"""Tile grids at a target pixel size, and fast tile reads.

A ``TileGrid`` lists the level-0 top-left corners of square tiles of ``size`` pixels at ``mpp``
µm/px, stepping ``size - overlap`` target pixels, kept where the tissue mask covers at least
``min_tissue`` of the tile. ``read_tiles`` yields the tiles; when a grid lines up with the stored
tiles of a TIFF pyramid level it decodes them directly instead of going through ``read_region``.
"""
from __future__ import annotations

import json
import math
import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from slidekit.base.errors import BadTileWarning, ConfigError, CorruptTileError, GridError, SlideError
from slidekit.base.io import atomic_path
from slidekit.base.outputs import claim_path
from slidekit.regions.masks import Tissue, build_region
from slidekit.regions.options import GridOptions, TissueOptions
from slidekit.regions.tissue import TissueMask
from slidekit.slides.identity import same_slide, slide_fingerprint
from slidekit.slides.slide import TIFF_SUFFIXES, Slide, magnification_to_mpp

GRID_FORMAT = "slidekit.tilegrid/1"


@dataclass
class TileGrid:
    """Square tiles of ``size`` px at ``mpp`` µm/px; ``coords`` are level-0 (x, y) top-left corners."""

    coords: np.ndarray
    mpp: float
    size: int
    overlap: int
    slide_dimensions: tuple[int, int]
    slide_mpp: tuple[float, float]
    slide_name: str = ""
    slide_id: str = ""
    tissue: np.ndarray | None = None
    min_tissue: float = 0.0
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.coords = np.asarray(self.coords, dtype=np.int64).reshape(-1, 2)

    def __len__(self) -> int:
        return len(self.coords)

    @property
    def stride(self) -> int:
        """Step between tiles in target pixels."""
        return self.size - self.overlap

    @property
    def scale(self) -> tuple[float, float]:
        """Level-0 pixels per target pixel along x and y."""
        return self.mpp / self.slide_mpp[0], self.mpp / self.slide_mpp[1]

    @property
    def extent(self) -> tuple[float, float]:
        """Tile width and height in level-0 pixels."""
        sx, sy = self.scale
        return self.size * sx, self.size * sy

    @property
    def boxes(self) -> np.ndarray:
        """(N, 4) float level-0 boxes (x, y, w, h)."""
        w, h = self.extent
        n = len(self.coords)
        return np.column_stack([self.coords.astype(np.float64), np.full(n, w), np.full(n, h)])

    @property
    def indices(self) -> np.ndarray:
        """(N, 2) integer (col, row) of each tile on the stride lattice."""
        sx, sy = self.scale
        return np.rint(self.coords / np.array([self.stride * sx, self.stride * sy])).astype(np.int64)

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, cols) of the full lattice that covers the slide."""
        return _lattice(self.slide_dimensions, self.size, self.stride, self.scale)[::-1]

    @classmethod
    def from_slide(cls, slide: Slide, mpp: float | None = 0.5, size: int = 256, overlap: int = 0,
                   mask: TissueMask | None = None, min_tissue: float = 0.5,
                   magnification: float | None = None) -> "TileGrid":
        """Tile ``slide`` at ``mpp`` (or ``magnification``), keeping tiles with enough tissue.

        ``mask=None`` with ``min_tissue=0`` tiles the whole slide; ``mask=None`` with
        ``min_tissue > 0`` is an error (there is nothing to measure tissue against).
        """
        if magnification is not None:
            mpp = magnification_to_mpp(magnification)
        if mpp is None or mpp <= 0:
            raise GridError(f"target mpp must be positive, got {mpp!r}")
        if size <= 0 or not 0 <= overlap < size:
            raise GridError(f"need size > 0 and 0 <= overlap < size (size={size}, overlap={overlap})")
        if mask is None and min_tissue > 0:
            raise GridError("min_tissue > 0 needs a tissue mask (pass mask=, or min_tissue=0)")
        slide_mpp = slide._need_mpp()  # MissingMPPError for a slide opened with require_mpp=False
        check_tile_geometry(slide, float(mpp), int(size), int(overlap))
        grid = cls(coords=np.zeros((0, 2)), mpp=float(mpp), size=int(size), overlap=int(overlap),
                   slide_dimensions=(slide.dimensions[0], slide.dimensions[1]), slide_mpp=(slide_mpp[0], slide_mpp[1]),
                   slide_name=slide.name, slide_id=slide_fingerprint(slide.path),
                   min_tissue=float(min_tissue))
        cols, rows = _lattice(slide.dimensions, size, grid.stride, grid.scale)
        sx, sy = grid.scale
        cc, rr = np.meshgrid(np.arange(cols), np.arange(rows))
        xs = np.rint(cc.ravel() * grid.stride * sx)
        ys = np.rint(rr.ravel() * grid.stride * sy)
        grid.coords = np.column_stack([xs, ys]).astype(np.int64)
        if mask is not None:
            frac = mask.fractions(grid.boxes).astype(np.float32)
            keep = frac >= min_tissue if min_tissue > 0 else np.ones(len(frac), bool)
            grid.coords, grid.tissue = grid.coords[keep], frac[keep]
        return grid

    def subset(self, index: np.ndarray) -> "TileGrid":
        """A grid with only the tiles selected by ``index`` (boolean mask or integer indices)."""
        return TileGrid(self.coords[index], self.mpp, self.size, self.overlap, self.slide_dimensions,
                        self.slide_mpp, self.slide_name, self.slide_id,
                        None if self.tissue is None else self.tissue[index], self.min_tissue,
                        dict(self.meta))

    def check_slide(self, slide: Slide) -> None:
        """Raise GridError unless ``slide`` is the slide this grid was made for."""
        if tuple(slide.dimensions) != tuple(self.slide_dimensions):
            raise GridError(f"grid was made for a {self.slide_dimensions} slide "
                            f"({self.slide_name}), not {tuple(slide.dimensions)}", slide.path)
        if self.slide_id and not same_slide(self.slide_id, slide.path):
            raise GridError(f"grid was made for another slide file ({self.slide_name})", slide.path)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the grid (coordinates, tissue fractions, geometry, slide identity) as .npz, atomically."""
        path = Path(path)
        meta = {"format": GRID_FORMAT, "mpp": self.mpp, "size": self.size, "overlap": self.overlap,
                "slide_dimensions": list(self.slide_dimensions), "slide_mpp": list(self.slide_mpp),
                "slide_name": self.slide_name, "slide_id": self.slide_id,
                "min_tissue": self.min_tissue, "meta": self.meta}
        # Any: numpy's stub reads a str-keyed ** as possibly holding its allow_pickle flag
        arrays: dict[str, Any] = {"coords": self.coords, "meta": np.array(json.dumps(meta))}
        if self.tissue is not None:
            arrays["tissue"] = self.tissue
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez_compressed(f, **arrays)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TileGrid":
        """Read a grid written by ``save``; GridError if the file is not one."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                coords = z["coords"]
                tissue = z["tissue"] if "tissue" in z.files else None
        except FileNotFoundError:
            raise GridError("grid file not found", path) from None
        except Exception as e:
            raise GridError(f"not a slidekit tile grid ({type(e).__name__}: {e})", path) from None
        if meta.get("format") != GRID_FORMAT:
            raise GridError(f"unsupported grid format {meta.get('format')!r}", path)
        return cls(coords=coords, mpp=meta["mpp"], size=meta["size"], overlap=meta["overlap"],
                   slide_dimensions=tuple(meta["slide_dimensions"]), slide_mpp=tuple(meta["slide_mpp"]),
                   slide_name=meta["slide_name"], slide_id=meta["slide_id"], tissue=tissue,
                   min_tissue=meta["min_tissue"], meta=meta.get("meta", {}))


MPP_RANGE = (1e-3, 1e3)  # µm/px a tile (or a slide's pixel) can plausibly have
MAX_READ_TILE = 16384  # px on a side of one tile as read from the slide's level
MAX_GRID_TILES = 1 << 25  # tiles of one grid (a 100k² px slide has ~150k tiles of 256 px)


def check_tile_geometry(slide: Slide, mpp: float, size: int, overlap: int = 0) -> None:
    """ConfigError naming the slide when tiles of ``size`` px at ``mpp`` µm/px are absurd for it:
    an MPP outside ``MPP_RANGE``, a tile smaller than one level-0 pixel, a tile larger than
    ``MAX_READ_TILE`` px at the level it is read from, or more than ``MAX_GRID_TILES`` tiles.
    Checked before any array is sized by them (a 1e-6 µm/px tile would otherwise ask for TiBs)."""
    lo, hi = MPP_RANGE
    if not (math.isfinite(mpp) and lo <= mpp <= hi):
        raise ConfigError(f"tile pixel size {mpp:g} µm/px is outside {lo:g}-{hi:g} µm/px", slide.path)
    smx, smy = slide._need_mpp()
    level0 = min(size * mpp / smx, size * mpp / smy)  # level-0 px per tile side
    if level0 < 1:
        raise ConfigError(f"a {size} px tile at {mpp:g} µm/px covers {level0:.3g} level-0 px of this slide "
                          f"({smx:.4g} µm/px): less than one pixel (choose a larger tile MPP or size)", slide.path)
    lmx, lmy = slide.level_mpp(slide.best_level_for_mpp(mpp))
    read = max(size * mpp / lmx, size * mpp / lmy)
    if read > MAX_READ_TILE:
        raise ConfigError(f"a {size} px tile at {mpp:g} µm/px is {read:.0f} px at the level it is read from "
                          f"(more than {MAX_READ_TILE}; choose a smaller tile MPP or size)", slide.path)
    stride = size - overlap
    cols, rows = _lattice(slide.dimensions, size, stride, (mpp / smx, mpp / smy))
    if cols * rows > MAX_GRID_TILES:
        raise ConfigError(f"{size} px tiles at {mpp:g} µm/px would make {cols} x {rows} tiles of this "
                          f"{slide.dimensions[0]} x {slide.dimensions[1]} px slide (more than {MAX_GRID_TILES}; "
                          "choose a larger tile MPP or size)", slide.path)


def _lattice(dims: tuple[int, int], size: int, stride: int, scale: tuple[float, float]) -> tuple[int, int]:
    """(cols, rows) so that the tiles cover the whole slide (the last ones may hang over the edge)."""
    out = []
    for dim, s in zip(dims, scale):
        target = dim / s  # slide length in target pixels
        out.append(1 if target <= size else math.ceil((target - size) / stride) + 1)
    return out[0], out[1]


class _NativeTiles:
    """Direct decode of the stored tiles of one pyramid level (the fast path), each JPEG tile
    verified once (``tiffio.jpeg_scan_problem``) so a damaged tile is an error, not garbage.

    Grid tiles may be any size, overlap and offset on the level's pixel lattice: a grid tile is
    cut from the stored tiles it touches, kept decoded in a small LRU cache (``capacity`` stored
    tiles: one band of stored-tile rows as wide as the grid, for grid-order reads), so each
    stored tile is decoded (and verified) once. ``decodes`` counts stored-tile decodes.
    """

    def __init__(self, slide_path: Path, stored, level: int, downsample: float, size: int | None = None,
                 capacity: int = 0) -> None:
        self.path, self.stored, self.level, self.downsample = Path(slide_path), stored, level, downsample
        self.level_w, self.level_h = stored.width, stored.height
        self.tile_w, self.tile_h = stored.tile_w, stored.tile_h
        self.size = int(size or self.tile_w)
        self.capacity = int(capacity)
        self.decodes = 0
        self._cache: OrderedDict[int, tuple[np.ndarray | None, str | None]] = OrderedDict()
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        d = self.__dict__.copy()
        d["_cache"], d["_lock"], d["decodes"] = OrderedDict(), None, 0  # each process decodes its own
        return d

    def __setstate__(self, d: dict) -> None:
        self.__dict__.update(d)
        self._lock = threading.Lock()

    def _decoded(self, index: int, out: np.ndarray | None = None) -> tuple[np.ndarray | None, str | None]:
        """(stored tile ``index`` decoded, None) or (None, what is wrong with it). Without a cache,
        ``out`` (a tile-sized array) may receive the pixels: the decoder writes into the batch."""
        if self.capacity:
            with self._lock:
                hit = self._cache.get(index)
                if hit is not None:
                    self._cache.move_to_end(index)
                    return hit
        # one strict decode, or decode + variant check; a cached tile must own its pixels
        got = self.stored.decode_checked(index, None if self.capacity else out)
        self.decodes += 1
        if self.capacity:
            with self._lock:
                self._cache[index] = got
                while len(self._cache) > self.capacity:
                    self._cache.popitem(last=False)
        return got

    def _stored_tile(self, col: int, row: int, out: np.ndarray | None = None) -> np.ndarray:
        tile, problem = self._decoded(self.stored.index(col, row), out)
        if problem:
            x0 = round(col * self.tile_w * self.downsample)
            y0 = round(row * self.tile_h * self.downsample)
            raise CorruptTileError(f"damaged tile at level-0 ({x0}, {y0}), level {self.level}: {problem}",
                                   self.path, location=(x0, y0), level=self.level)
        assert tile is not None  # a decode gives the pixels or what is wrong with them
        return tile

    def read(self, x0: int, y0: int, out: np.ndarray | None = None) -> np.ndarray:
        """The grid tile (size, size, 3) whose level-0 top-left is (x0, y0); white past the image.
        ``out``: a (size, size, 3) uint8 array to cut a composed tile into (saves a copy)."""
        lx, ly = round(x0 / self.downsample), round(y0 / self.downsample)
        s, tw, th = self.size, self.tile_w, self.tile_h
        if s == tw == th and lx % tw == 0 and ly % th == 0:  # one stored tile: no copy unless at the edge
            into = out if out is not None and out.flags.c_contiguous and out.shape == (th, tw, 3) else None
            tile = self._stored_tile(lx // tw, ly // th, into)
            out_w, out_h = min(tw, self.level_w - lx), min(th, self.level_h - ly)
            if out_w < tw or out_h < th:  # padding past the image edge -> white glass
                tile = tile if tile is into else tile.copy()
                tile[out_h:] = 255
                tile[:, out_w:] = 255
            return tile
        out = np.empty((s, s, 3), np.uint8) if out is None else out
        x1, y1 = min(lx + s, self.level_w), min(ly + s, self.level_h)
        if x1 - lx < s or y1 - ly < s or lx < 0 or ly < 0:  # past the image edge -> white glass
            out[...] = 255
        for row in range(max(ly, 0) // th, (y1 - 1) // th + 1 if y1 > max(ly, 0) else 0):
            for col in range(max(lx, 0) // tw, (x1 - 1) // tw + 1 if x1 > max(lx, 0) else 0):
                tile = self._stored_tile(col, row)
                ax0, ay0 = max(lx, col * tw), max(ly, row * th)
                ax1, ay1 = min(x1, (col + 1) * tw), min(y1, (row + 1) * th)
                out[ay0 - ly:ay1 - ly, ax0 - lx:ax1 - lx] = tile[ay0 - row * th:ay1 - row * th,
                                                                 ax0 - col * tw:ax1 - col * tw]
        return out


# Most decoded stored tiles one fast-path reader keeps (per process): 64 MiB of 256² RGB tiles.
NATIVE_CACHE_BYTES = 64 << 20


def native_tiles_for(slide: Slide, grid: TileGrid, tolerance: float = 1e-3) -> _NativeTiles | None:
    """A direct tile decoder when ``grid``'s pixels are a stored TIFF (or DICOM) level's pixels (same
    MPP, integer level coordinates; any tile size, overlap or offset), else None."""
    dicom = slide.backend == "openslide" and slide.properties.get("openslide.vendor") == "dicom"
    if (slide.path.suffix.lower() not in TIFF_SUFFIXES and not dicom) or slide.backend == "image":
        return None
    level = slide.best_level_for_mpp(grid.mpp, tolerance)
    ds = slide.level_downsamples[level]
    mx, my = slide._need_mpp()  # best_level_for_mpp has already refused a slide without one
    if abs(grid.mpp / (mx * ds) - 1) > tolerance or abs(grid.mpp / (my * ds) - 1) > tolerance:
        return None
    stored = slide.stored_tiles(level)
    if stored is None:
        return None
    lxy = grid.coords / ds
    if len(grid) and (np.abs(lxy - np.rint(lxy)) > 0.01).any():
        return None
    aligned = (grid.size == stored.tile_w == stored.tile_h and not grid.overlap
               and not (np.rint(lxy) % grid.size).any())
    capacity = 0
    if not aligned and len(grid):
        # Grid order is row-major: keep the stored tiles of one band of grid rows (the rows a grid
        # tile spans, plus one) across the grid's width, so the next grid row finds them decoded.
        lx = np.rint(lxy[:, 0]).astype(np.int64)
        cols = (int(lx.max()) + grid.size - 1) // stored.tile_w - int(lx.min()) // stored.tile_w + 1
        rows = -(-grid.size // stored.tile_h) + 1
        cap = max(4, NATIVE_CACHE_BYTES // (stored.tile_w * stored.tile_h * 3))
        capacity = int(min(cols * rows + cols, cap))
    native = _NativeTiles(slide.path, stored, level, ds, grid.size, capacity)
    if len(grid):
        # Trust but verify: the first tile must match what the slide backend decodes.
        x, y = (int(v) for v in grid.coords[0])
        try:
            fast = native.read(x, y).astype(np.int16)
            ref = slide.read_region((x, y), level, (grid.size, grid.size), verify=False).astype(np.int16)
        except SlideError:
            return native  # a damaged first tile: the native path reports it when it is read
        except Exception:
            return None
        if np.abs(fast - ref).mean() > 2.0 and stored.strict:
            # simplejpeg guessed the colour space wrong (RGB-coded tiles): today's decode + check
            stored.use_variant_check("strict decode differs from the slide backend on the first tile "
                                     "(RGB-coded JPEG): decode + variant check")
            native = _NativeTiles(slide.path, stored, level, ds, grid.size, capacity)
            try:
                fast = native.read(x, y).astype(np.int16)
            except SlideError:
                return native
            except Exception:
                return None
        if np.abs(fast - ref).mean() > 2.0:
            return None
    return native


BAD_TILE_MODES = ("raise", "skip")


def read_tiles(slide: Slide, grid: TileGrid, workers: int = 0, chunk: int = 64,
               progress: bool = False, on_bad_tile: str = "raise") -> Iterator[tuple[tuple[int, int], np.ndarray]]:
    """Yield ``((x, y), tile)`` for every tile of ``grid`` in order; tiles are (size, size, 3) uint8.

    ``workers > 0`` reads chunks of tiles in that many threads (the decoders release the GIL).
    A damaged tile raises CorruptTileError; with ``on_bad_tile="skip"`` it is left out with a
    ``BadTileWarning`` naming its level-0 (x, y).
    """
    if tuple(slide.dimensions) != tuple(grid.slide_dimensions):
        raise GridError(f"grid was made for a {grid.slide_dimensions} slide, not {slide.dimensions}",
                        slide.path)
    reader = TileReader(slide, grid, on_bad_tile=on_bad_tile)
    n = len(grid)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, unit="tile", desc=slide.name)
    starts = range(0, n, chunk)

    def batch(s: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        asked = np.arange(s, min(n, s + chunk))
        return (asked, *reader.read_batch(asked))

    try:
        if workers <= 0:
            yield from _emit(slide, grid, (batch(s) for s in starts), bar)
        else:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                yield from _emit(slide, grid, pool.map(batch, starts), bar)
    finally:
        if bar is not None:
            bar.close()


def _emit(slide: Slide, grid: TileGrid, batches: Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]],
          bar) -> Iterator:
    for asked, idx, tiles in batches:
        warn_bad_tiles(slide, grid, np.setdiff1d(asked, idx))
        for i, tile in zip(idx, tiles):
            x, y = grid.coords[i]
            yield (int(x), int(y)), tile
        if bar is not None:
            bar.update(len(asked))


def warn_bad_tiles(slide: Slide | Path | str, grid: TileGrid, skipped: np.ndarray) -> None:
    """One ``BadTileWarning`` for tiles of ``grid`` that were skipped as damaged."""
    if len(skipped) == 0:
        return
    import warnings

    xy = ", ".join(f"({int(x)}, {int(y)})" for x, y in grid.coords[np.asarray(skipped)[:5]])
    more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
    path = getattr(slide, "path", slide)
    warnings.warn(BadTileWarning(f"{path}: skipped {len(skipped)} damaged tile(s) at level-0 {xy}{more}"),
                  stacklevel=3)


class TileReader:
    """Reads tiles of one grid from one slide, using the native fast path when it applies.

    ``on_bad_tile``: "raise" (default) raises CorruptTileError for a damaged tile; "skip" leaves
    it out of ``read_batch`` (the caller compares indices and reports it). Picklable: a
    DataLoader worker gets its own slide and TIFF handles.
    """

    def __init__(self, slide: Slide, grid: TileGrid, on_bad_tile: str = "raise") -> None:
        if on_bad_tile not in BAD_TILE_MODES:
            raise ValueError(f"on_bad_tile must be one of {BAD_TILE_MODES}, not {on_bad_tile!r}")
        self.slide = slide
        self.grid = grid
        self.on_bad_tile = on_bad_tile
        self.native = native_tiles_for(slide, grid)

    @property
    def fast(self) -> bool:
        """Whether stored tiles are decoded directly."""
        return self.native is not None

    def read(self, i: int, out: np.ndarray | None = None) -> np.ndarray:
        """Tile ``i`` of the grid as (size, size, 3) uint8; CorruptTileError when it is damaged.
        ``out`` may receive the tile (the fast path cuts composed tiles straight into it)."""
        x, y = (int(v) for v in self.grid.coords[i])
        try:
            if self.native is not None:
                return self.native.read(x, y, out)
            return self.slide.read_scaled((x, y), (self.grid.size, self.grid.size), self.grid.mpp)
        except CorruptTileError as e:
            if e.location == (x, y):
                raise
            # Name the grid tile that needs the damaged stored tile.
            raise CorruptTileError(f"damaged data under the tile at level-0 ({x}, {y}): "
                                   f"{str(e).split(': ', 1)[-1]}", self.slide.path, location=(x, y),
                                   level=e.level) from None
        except SlideError:
            raise
        except Exception as e:
            raise SlideError(f"cannot read tile at ({x}, {y}): {e}", self.slide.path) from e

    def read_batch(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(indices read, tiles (k, size, size, 3) uint8); damaged tiles are left out when
        ``on_bad_tile="skip"``."""
        s = self.grid.size
        idx = np.asarray(idx, dtype=np.int64)
        out = np.empty((len(idx), s, s, 3), np.uint8)
        keep = np.ones(len(idx), bool)
        for j, i in enumerate(idx):
            try:
                tile = self.read(int(i), out[j])
                if not np.may_share_memory(tile, out):  # not cut into place
                    out[j] = tile
            except CorruptTileError:
                if self.on_bad_tile != "skip":
                    raise
                keep[j] = False
        if keep.all():
            return idx, out
        return idx[keep], out[keep]


def _is_grid_file(path: str | os.PathLike) -> bool:
    try:
        TileGrid.load(path)
        return True
    except Exception:  # GridError, or not even a file
        return False


def make_grid(slide_path: str | os.PathLike, out: str | os.PathLike | None = None, *,
              options: GridOptions | None = None, mask_mpp: float = 8.0, qc: Any = None, **flat: Any) -> TileGrid:
    """Open a slide, detect tissue (when ``min_tissue > 0``), build its grid and save it to ``out``.

    Parameters
    ----------
    slide_path
        The slide file.
    out
        The grid file to write (``.npz``; None: not saved). A file slidekit did not write is never replaced.
    options
        :class:`GridOptions` (tiles, reading, ``tissue``; None: the defaults).
    mask_mpp
        µm/px of the tissue mask (a ``tissue`` option ``mpp`` wins).
    qc
        A ``regions.qc_tiles.TileQc`` (``--exclude-qc``): the tiles over its limits are left out; the
        grid's ``meta["qc"]`` holds its configuration, the counts and the kept tiles' fractions.
    **flat
        Single fields by their flat names (``mpp``, ``size``, ``overlap``, ``min_tissue``,
        ``slide_mpp``, ``override_mpp``, ``backend``, ``tissue``).
    """
    o = GridOptions.of(options, **flat)
    mpp, size, overlap, min_tissue = o.tiles.mpp, o.tiles.size, o.tiles.overlap or 0, o.tiles.min_tissue
    tissue = o.tissue.as_dict()
    with o.reading.open(slide_path) as slide:
        mask = (build_region(Tissue(TissueOptions({"mpp": mask_mpp, **(tissue or {})})), slide)
                if min_tissue > 0 else None)
        grid = TileGrid.from_slide(slide, mpp=mpp, size=int(size or 256), overlap=overlap, mask=mask,
                                   min_tissue=min_tissue)
        if qc is not None:  # --exclude-qc auto: the slide's QC beside the grid file first (GRID.qc/)
            if out is None and str(qc.path) == "auto":
                raise ConfigError("--exclude-qc auto needs --out (the slide's QC goes beside the grid file)")
            qc = qc.ready(slide, Path(out).with_suffix(".qc") if out is not None else Path(qc.path), o.reading, True)
            qc.check(slide)
            grid, fractions, counts = qc.filter(slide, grid)
            grid.meta["qc"] = {**counts, "config": qc.config(),
                               "fractions": np.round(np.asarray(fractions, np.float64), 4).tolist()}
    if out is not None:
        claim_path(out, _is_grid_file(out), "a slidekit tile grid")  # never replace a user's file
        grid.save(out)
    return grid
