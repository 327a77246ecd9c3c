"""Tile grids at a target pixel size, and fast tile reads.

A ``TileGrid`` lists the level-0 top-left corners of square tiles of ``size`` pixels at ``mpp``
µm/px, stepping ``size - overlap`` target pixels, kept where the tissue mask covers at least
``min_tissue`` of the tile. ``read_tiles`` yields the tiles; when a grid lines up with the stored
tiles of a TIFF pyramid level it decodes them directly instead of going through ``read_region``.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from slidekit.errors import GridError, SlideError
from slidekit.io import atomic_path
from slidekit.slide import TIFF_SUFFIXES, Slide, magnification_to_mpp
from slidekit.tissue import TissueMask

GRID_FORMAT = "slidekit.tilegrid/1"


def slide_fingerprint(path: str | os.PathLike) -> str:
    """A cheap identity for a slide file: size plus hashes of its first and last 64 KiB."""
    p = Path(path)
    size = p.stat().st_size
    h = hashlib.sha1(str(size).encode())
    with open(p, "rb") as f:
        h.update(f.read(65536))
        f.seek(max(0, size - 65536))
        h.update(f.read(65536))
    return h.hexdigest()[:16]


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
        grid = cls(coords=np.zeros((0, 2)), mpp=float(mpp), size=int(size), overlap=int(overlap),
                   slide_dimensions=tuple(slide.dimensions), slide_mpp=tuple(slide.mpp),
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
        if self.slide_id and slide_fingerprint(slide.path) != self.slide_id:
            raise GridError(f"grid was made for another slide file ({self.slide_name})", slide.path)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the grid (coordinates, tissue fractions, geometry, slide identity) as .npz, atomically."""
        path = Path(path)
        meta = {"format": GRID_FORMAT, "mpp": self.mpp, "size": self.size, "overlap": self.overlap,
                "slide_dimensions": list(self.slide_dimensions), "slide_mpp": list(self.slide_mpp),
                "slide_name": self.slide_name, "slide_id": self.slide_id,
                "min_tissue": self.min_tissue, "meta": self.meta}
        arrays = {"coords": self.coords, "meta": np.array(json.dumps(meta))}
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


def _lattice(dims: tuple[int, int], size: int, stride: int, scale: tuple[float, float]) -> tuple[int, int]:
    """(cols, rows) so that the tiles cover the whole slide (the last ones may hang over the edge)."""
    out = []
    for dim, s in zip(dims, scale):
        target = dim / s  # slide length in target pixels
        out.append(1 if target <= size else math.ceil((target - size) / stride) + 1)
    return out[0], out[1]


class _NativeTiles:
    """Direct decode of the stored tiles of one TIFF page (the fast path)."""

    def __init__(self, path: Path, page_index: int, level_size: tuple[int, int], downsample: float) -> None:
        import tifffile

        self.path = path
        self.page_index = page_index
        self.level_w, self.level_h = level_size
        self.downsample = downsample
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[page_index]
            self.tile_w, self.tile_h = page.tilewidth, page.tilelength
            self.offsets = np.asarray(page.dataoffsets, dtype=np.int64)
            self.counts = np.asarray(page.databytecounts, dtype=np.int64)
            self.tiles_across = math.ceil(page.imagewidth / page.tilewidth)
        self._local: dict[int, tuple] = {}

    def _state(self) -> tuple:
        # One tifffile handle and decoder per process; pread keeps the fd safe across threads.
        pid = os.getpid()
        if pid not in self._local:
            import tifffile

            tif = tifffile.TiffFile(self.path)
            page = tif.pages[self.page_index]
            self._local = {pid: (tif, page.decode, page.jpegtables, os.open(self.path, os.O_RDONLY))}
        return self._local[pid]

    def __getstate__(self) -> dict:
        d = self.__dict__.copy()
        d["_local"] = {}
        return d

    def read(self, x0: int, y0: int) -> np.ndarray:
        """Decode the stored tile whose level-0 top-left is (x0, y0)."""
        _, decode, jpegtables, fd = self._state()
        lx, ly = round(x0 / self.downsample), round(y0 / self.downsample)
        col, row = lx // self.tile_w, ly // self.tile_h
        index = row * self.tiles_across + col
        out_w = min(self.tile_w, self.level_w - lx)
        out_h = min(self.tile_h, self.level_h - ly)
        count = int(self.counts[index])
        if count == 0:
            return np.full((self.tile_h, self.tile_w, 3), 255, np.uint8)
        data = os.pread(fd, count, int(self.offsets[index]))
        segment = decode(data, index, jpegtables=jpegtables)[0]
        tile = np.asarray(segment).reshape(self.tile_h, self.tile_w, -1)[..., :3]
        if out_w < self.tile_w or out_h < self.tile_h:  # padding past the image edge -> white glass
            tile = tile.copy()
            tile[out_h:] = 255
            tile[:, out_w:] = 255
        return tile


def native_tiles_for(slide: Slide, grid: TileGrid, tolerance: float = 1e-3) -> _NativeTiles | None:
    """A direct tile decoder when ``grid`` lines up with a stored TIFF tile grid, else None."""
    if grid.overlap or slide.path.suffix.lower() not in TIFF_SUFFIXES or slide.backend == "image":
        return None
    level = slide.best_level_for_mpp(grid.mpp, tolerance)
    ds = slide.level_downsamples[level]
    if abs(grid.mpp / (slide.mpp[0] * ds) - 1) > tolerance:
        return None
    page_index = _page_for_level(slide.path, slide.level_dimensions[level], grid.size)
    if page_index is None:
        return None
    native = _NativeTiles(slide.path, page_index, slide.level_dimensions[level], ds)
    if len(grid):
        lxy = grid.coords / ds
        if (np.abs(lxy - np.rint(lxy)) > 0.01).any() or (np.rint(lxy) % grid.size != 0).any():
            return None
        # Trust but verify: the first tile must match what the slide backend decodes.
        x, y = (int(v) for v in grid.coords[0])
        try:
            fast = native.read(x, y).astype(np.int16)
        except Exception:
            return None
        ref = slide.read_region((x, y), level, (grid.size, grid.size)).astype(np.int16)
        if np.abs(fast - ref).mean() > 2.0:
            return None
    return native


def _page_for_level(path: Path, level_dims: tuple[int, int], tile_size: int) -> int | None:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            for i, page in enumerate(tif.pages):
                if (page.is_tiled and (page.imagewidth, page.imagelength) == tuple(level_dims)
                        and page.tilewidth == tile_size and page.tilelength == tile_size
                        and page.dtype == np.uint8 and page.samplesperpixel in (3, 4)
                        and page.planarconfig == 1 and page.imagedepth == 1):
                    return i
    except Exception:
        return None
    return None


def read_tiles(slide: Slide, grid: TileGrid, workers: int = 0, chunk: int = 64,
               progress: bool = False) -> Iterator[tuple[tuple[int, int], np.ndarray]]:
    """Yield ``((x, y), tile)`` for every tile of ``grid`` in order; tiles are (size, size, 3) uint8.

    ``workers > 0`` reads chunks of tiles in that many threads (the decoders release the GIL).
    """
    if tuple(slide.dimensions) != tuple(grid.slide_dimensions):
        raise GridError(f"grid was made for a {grid.slide_dimensions} slide, not {slide.dimensions}",
                        slide.path)
    reader = TileReader(slide, grid)
    n = len(grid)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, unit="tile", desc=slide.name)
    starts = range(0, n, chunk)
    try:
        if workers <= 0:
            batches = (reader.read_batch(np.arange(s, min(n, s + chunk))) for s in starts)
            yield from _emit(grid, batches, bar)
        else:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                batches = pool.map(lambda s: reader.read_batch(np.arange(s, min(n, s + chunk))), starts)
                yield from _emit(grid, batches, bar)
    finally:
        if bar is not None:
            bar.close()


def _emit(grid: TileGrid, batches: Iterator[tuple[np.ndarray, np.ndarray]], bar) -> Iterator:
    for idx, tiles in batches:
        for i, tile in zip(idx, tiles):
            x, y = grid.coords[i]
            yield (int(x), int(y)), tile
        if bar is not None:
            bar.update(len(idx))


class TileReader:
    """Reads tiles of one grid from one slide, using the native fast path when it applies.

    Picklable: a DataLoader worker gets its own slide and TIFF handles.
    """

    def __init__(self, slide: Slide, grid: TileGrid) -> None:
        self.slide = slide
        self.grid = grid
        self.native = native_tiles_for(slide, grid)

    @property
    def fast(self) -> bool:
        """Whether stored tiles are decoded directly."""
        return self.native is not None

    def read(self, i: int) -> np.ndarray:
        """Tile ``i`` of the grid as (size, size, 3) uint8."""
        x, y = (int(v) for v in self.grid.coords[i])
        try:
            if self.native is not None:
                return self.native.read(x, y)
            return self.slide.read_scaled((x, y), (self.grid.size, self.grid.size), self.grid.mpp)
        except SlideError:
            raise
        except Exception as e:
            raise SlideError(f"cannot read tile at ({x}, {y}): {e}", self.slide.path) from e

    def read_batch(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Tiles ``idx`` stacked as (k, size, size, 3) uint8."""
        s = self.grid.size
        out = np.empty((len(idx), s, s, 3), np.uint8)
        for j, i in enumerate(idx):
            out[j] = self.read(int(i))
        return idx, out


def make_grid(slide_path: str | os.PathLike, mpp: float = 0.5, size: int = 256, overlap: int = 0,
              min_tissue: float = 0.5, out: str | os.PathLike | None = None,
              slide_mpp: float | None = None, backend: str | None = None,
              mask_mpp: float = 8.0) -> TileGrid:
    """Open a slide, detect tissue (when ``min_tissue > 0``), build its grid and save it to ``out``."""
    from slidekit.slide import open_slide
    from slidekit.tissue import tissue_mask

    with open_slide(slide_path, mpp=slide_mpp, backend=backend) as slide:
        mask = tissue_mask(slide, mpp=mask_mpp) if min_tissue > 0 else None
        grid = TileGrid.from_slide(slide, mpp=mpp, size=size, overlap=overlap, mask=mask,
                                   min_tissue=min_tissue)
    if out is not None:
        grid.save(out)
    return grid
