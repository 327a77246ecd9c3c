"""Slide-level heatmaps on disk: stitched from per-tile model outputs, blended, chunked in zarr.

A heatmap is a zarr group ``heatmap.zarr`` holding ``prob`` (C, H, W) float32 and ``coverage``
(H, W) bool, both chunked, plus the per-tile table ``tiles/coords`` and ``tiles/values``
(a tile's class probabilities, or its mean map for segmentation). Heatmap pixel ``(r, c)``
covers level-0 ``[ox + c*sx, ox + (c+1)*sx) x [oy + r*sy, ...)`` with ``origin = (ox, oy)`` and
``scale = (sx, sy)`` in the attributes.

- classification: one pixel per tile of the grid lattice (the tile's central stride x stride
  square when tiles overlap).
- segmentation: tile output maps at ``mpp`` (default: the model's output resolution) blended
  where tiles overlap with constant or gaussian weights. Float32 weight sums; pixels no tile
  covered have ``coverage`` False and value 0 (never NaN).

Memory stays flat as slides grow: ``HeatmapWriter`` holds only the chunks still receiving tiles
(those touched by the current band of tiles, capped by ``max_open_bytes``; colder partial
chunks spill to ``partial/`` in the store) and divides each chunk as soon as its last tile
arrives. Finished chunks are flagged in the store, so an interrupted run resumes.

Damage is found, not read as data (stores marked ``store_checks``, written since slidekit checks
them): every chunk of ``prob`` and ``coverage`` carries a checksum (zstd frame checksum), every
finished chunk is on disk (empty ones too), so ``Heatmap`` compares the finished-chunk record with a
listing of the store (cheap: no chunk is read) and refuses a store with chunks missing; a chunk
whose bytes changed, a NaN in ``prob``, or metadata that cannot be parsed or declares a shape the
slide cannot have is a ``HeatmapError`` naming the store and the problem.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import shutil
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import cv2
import numpy as np
import zarr
from shapely.affinity import affine_transform
from shapely.ops import unary_union
from zarr.codecs import ZstdCodec

from slidekit.annotations.geometry import clip_geometry, rasterize
from slidekit.annotations.objects import Annotation
from slidekit.base.errors import HeatmapError
from slidekit.infer.legend import draw_legend, legend_info, save_png
from slidekit.regions.tiling import TileGrid
from slidekit.regions.tissue import mask_to_polygons

if TYPE_CHECKING:
    from zarr.core.array_spec import ArrayConfigParams

HEATMAP_FORMAT = "slidekit.heatmap/1"
# attrs["store_checks"] of stores whose chunks carry checksums and whose finished chunks are all on disk
STORE_CHECKS = 1
CHECKED = [ZstdCodec(level=0, checksum=True)]  # a changed chunk fails its checksum instead of decoding


def _arr(group: zarr.Group, name: str) -> zarr.Array:
    """``group[name]``, an array this module created (zarr types a member as ``Array | Group``)."""
    return cast(zarr.Array, group[name])


def blend_window(h: int, w: int, blend: str = "gaussian", sigma_scale: float = 0.125) -> np.ndarray:
    """Blending weights (h, w) float32: all ones, or a gaussian peaking at 1 in the centre
    (sigma = ``sigma_scale`` x size, as in nnU-Net) floored at 1e-4 so every pixel counts."""
    if blend == "constant":
        return np.ones((h, w), np.float32)
    if blend != "gaussian":
        raise ValueError(f"unknown blend {blend!r}: use 'constant' or 'gaussian'")
    y = np.arange(h) - (h - 1) / 2
    x = np.arange(w) - (w - 1) / 2
    gy = np.exp(-(y ** 2) / (2 * (sigma_scale * h) ** 2))
    gx = np.exp(-(x ** 2) / (2 * (sigma_scale * w) ** 2))
    return np.maximum(np.outer(gy, gx), 1e-4).astype(np.float32)


def heatmap_geometry(grid: TileGrid, task: str, mpp: float | None = None) -> dict:
    """Where heatmap pixels lie for ``grid``: shape, mpp, scale, origin, tile footprint."""
    sx, sy = grid.scale
    W0, H0 = grid.slide_dimensions
    if task == "classification":
        rows, cols = grid.shape
        return {"shape": (rows, cols), "mpp": grid.mpp * grid.stride, "factor": float(grid.stride),
                "scale": (grid.stride * sx, grid.stride * sy),
                "origin": (grid.overlap / 2 * sx, grid.overlap / 2 * sy), "footprint": (1, 1)}
    mpp = float(mpp or grid.mpp)
    f = mpp / grid.mpp  # target pixels per heatmap pixel
    fp = max(1, round(grid.size / f))
    return {"shape": (math.ceil(H0 / (f * sy)), math.ceil(W0 / (f * sx))), "mpp": mpp, "factor": f,
            "scale": (f * sx, f * sy), "origin": (0.0, 0.0), "footprint": (fp, fp)}



# The opacity ramp of a one-channel map drawn over a slide: values up to OVERLAY_FLOOR (0, and the few
# per cent a model gives bare glass, e.g. the hematoxylin channel's 0.035 on white) are transparent,
# so glass inside covered tiles keeps its colour; full strength from OVERLAY_FULL up.
OVERLAY_FLOOR = 0.05
OVERLAY_FULL = 0.25


def value_alpha(v: np.ndarray) -> np.ndarray:
    """Opacity in [0, 1] of one-channel map values in [0, 1] (see OVERLAY_FLOOR / OVERLAY_FULL)."""
    return np.clip((np.asarray(v, np.float32) - OVERLAY_FLOOR) / (OVERLAY_FULL - OVERLAY_FLOOR), 0, 1)


@dataclass(frozen=True)
class HeatmapLayout:
    """How a ``HeatmapWriter`` lays out its map and accumulates tile outputs.

    Parameters
    ----------
    mpp
        µm/px of a segmentation heatmap (None: the grid's); a classification heatmap has a pixel per tile.
    blend
        How overlapping segmentation outputs are weighted: ``"gaussian"`` or ``"constant"``.
    chunk
        Chunk side of the stored arrays in pixels.
    max_open_bytes
        Memory for partial chunks held open; colder ones are spilled to disk beyond it.
    """

    mpp: float | None = None
    blend: str = "gaussian"
    chunk: int = 256
    max_open_bytes: int = 256 << 20


class HeatmapWriter:
    """Accumulates tile outputs into a zarr heatmap; creates ``path`` or resumes it.

    ``add(idx, outputs)`` takes (k, C) class probabilities (classification) or (k, C, fh, fw)
    maps at the footprint size (segmentation); ``todo()`` lists tiles still to predict;
    ``finish()`` completes the store and returns the ``Heatmap``.

    ``layout`` is a :class:`HeatmapLayout` (None: its defaults); its fields may also be given by
    name (``mpp=4.0``, ``blend="constant"``, ``chunk=64``), replacing the layout's. ``attrs`` are
    extra metadata stored with the map (a resumed store must have the same).
    """

    def __init__(self, path: str | os.PathLike, grid: TileGrid, task: str, classes: list[str],
                 colors: list[tuple[int, int, int]] | None = None, *, layout: HeatmapLayout | None = None,
                 attrs: dict | None = None, **flat: Any) -> None:
        lay = dataclasses.replace(layout or HeatmapLayout(), **flat) if flat else (layout or HeatmapLayout())
        mpp, blend, chunk, max_open_bytes = lay.mpp, lay.blend, lay.chunk, lay.max_open_bytes
        if task not in ("classification", "segmentation"):
            raise ValueError(f"task must be 'classification' or 'segmentation', not {task!r}")
        self.path, self.grid, self.task = Path(path), grid, task
        self.C = len(classes)
        geo = heatmap_geometry(grid, task, mpp)
        self.H, self.W = geo["shape"]
        self.fh, self.fw = geo["footprint"]
        self.cs = int(chunk)
        self.max_open_bytes = max_open_bytes
        self.window = blend_window(self.fh, self.fw, blend)
        cols_rows = grid.indices
        f = geo["factor"]
        if task == "classification":
            self.offsets = cols_rows[:, ::-1].astype(np.int64)  # (row, col) lattice cell
        else:
            self.offsets = np.rint(cols_rows[:, ::-1] * grid.stride / f).astype(np.int64)
        meta = {"format": HEATMAP_FORMAT, "task": task, "classes": list(classes),
                "colors": [list(map(int, c)) for c in (colors or [])], "mpp": geo["mpp"],
                "scale": list(geo["scale"]), "origin": list(geo["origin"]), "shape": [self.H, self.W],
                "blend": blend, "slide": {"name": grid.slide_name, "id": grid.slide_id,
                                          "dimensions": list(grid.slide_dimensions),
                                          "mpp": list(grid.slide_mpp)},
                "grid": {"mpp": grid.mpp, "size": grid.size, "overlap": grid.overlap, "tiles": len(grid),
                         "coords_sha1": hashlib.sha1(np.ascontiguousarray(grid.coords).tobytes()).hexdigest()},
                **(attrs or {})}
        self.root = self._open(meta)
        # every finished chunk is written, empty ones too: a chunk missing on disk is then damage
        # zarr declares ArrayConfigParams' keys NotRequired through typing.NotRequired, which mypy cannot resolve
        # for Python 3.10, so it reads "order" as required; it is optional (the global config fills it in)
        write_empty: ArrayConfigParams = {"write_empty_chunks": True}  # type: ignore[typeddict-item]
        self.prob = _arr(self.root, "prob").with_config(write_empty)
        self.coverage = _arr(self.root, "coverage").with_config(write_empty)
        self.values = _arr(self.root, "tiles/values")
        self.done: np.ndarray = np.asarray(_arr(self.root, "chunk_done")[:])
        self._open_chunks: OrderedDict = OrderedDict()
        self._open_bytes = 0
        self.spills = 0  # partial chunks written to disk because max_open_bytes was reached
        self._todo = self._plan()

    def _open(self, meta: dict) -> zarr.Group:
        if self.path.exists():
            try:
                root = zarr.open_group(str(self.path), mode="r+")
                old = dict(root.attrs)
            except Exception:
                old = {}
            same = {k: old.get(k) for k in meta} == {k: _jsonable(v) for k, v in meta.items()}
            if same:  # resume (a finished store just has nothing left to do)
                if "partial" in root:  # partial sums of unfinished chunks are recomputed
                    del root["partial"]
                return root
            shutil.rmtree(self.path)
        root = zarr.open_group(str(self.path), mode="w")
        cs, C = self.cs, self.C
        root.create_array("prob", shape=(C, self.H, self.W), chunks=(C, cs, cs), dtype="float32", fill_value=0.0,
                          compressors=CHECKED)
        root.create_array("coverage", shape=(self.H, self.W), chunks=(cs, cs), dtype="bool", fill_value=False,
                          compressors=CHECKED)
        n = len(self.grid)
        root.create_array("tiles/coords", shape=(n, 2), chunks=(max(1, min(n, 65536)), 2), dtype="int64",
                          compressors=CHECKED)
        if n:
            _arr(root, "tiles/coords")[:] = self.grid.coords
        root.create_array("tiles/values", shape=(n, C), chunks=(max(1, min(n, 4096)), C), dtype="float32",
                          fill_value=float("nan"), compressors=CHECKED)
        nr, nc = -(-self.H // cs), -(-self.W // cs)
        root.create_array("chunk_done", shape=(nr, nc), chunks=(nr, nc), dtype="bool", fill_value=False)
        root.attrs.update({**_jsonable(meta), "complete": False, "store_checks": STORE_CHECKS})
        return root

    # -- planning -------------------------------------------------------------------------
    def _chunk_span(self, i: int) -> tuple[int, int, int, int]:
        r, c = self.offsets[i]
        r0, c0 = max(r, 0), max(c, 0)
        r1, c1 = min(r + self.fh, self.H), min(c + self.fw, self.W)
        return r0 // self.cs, (r1 - 1) // self.cs, c0 // self.cs, (c1 - 1) // self.cs

    def _plan(self) -> np.ndarray:
        n = len(self.grid)
        have: np.ndarray = ~np.isnan(np.asarray(self.values[:])).any(axis=1) if n else np.zeros(0, bool)
        self.remaining: np.ndarray | None
        if self.task == "classification":
            self.remaining = None
            return np.flatnonzero(~have)
        need = ~have
        spans = [self._chunk_span(i) for i in range(n)]
        for i, (a, b, c, d) in enumerate(spans):
            if not self.done[a:b + 1, c:d + 1].all():
                need[i] = True
        remaining = self.remaining = np.zeros_like(self.done, dtype=np.int64)
        for t in np.flatnonzero(need):
            a, b, c, d = spans[t]
            remaining[a:b + 1, c:d + 1] += 1
        remaining[self.done] = 0
        return np.flatnonzero(need)

    def todo(self) -> np.ndarray:
        """Indices of tiles whose outputs are still needed (all of them on a fresh store)."""
        return self._todo

    @property
    def footprint(self) -> tuple[int, int]:
        """(h, w) of one tile's output map in heatmap pixels (segmentation)."""
        return self.fh, self.fw

    # -- accumulation ---------------------------------------------------------------------
    def add(self, idx: np.ndarray, outputs: np.ndarray) -> None:
        """Accumulate outputs of tiles ``idx`` (classification (k, C); segmentation (k, C, fh, fw))."""
        idx = np.asarray(idx, dtype=np.int64)
        outputs = np.asarray(outputs, dtype=np.float32)
        if len(idx) == 0:
            return
        if self.task == "classification":
            self._write_values(idx, outputs.reshape(len(idx), self.C))
            return
        if outputs.shape[1:] != (self.C, self.fh, self.fw):
            raise ValueError(f"expected outputs (k, {self.C}, {self.fh}, {self.fw}), got {outputs.shape}")
        self._write_values(idx, outputs.mean(axis=(2, 3)))
        for i, out in zip(idx, outputs):
            self._accumulate(int(i), out)

    def skip(self, idx: np.ndarray) -> None:
        """Record tiles ``idx`` as deliberately left out (damaged, ``on_bad_tile="skip"``): they get
        no coverage and their values stay NaN; ``finish`` accepts them as not missing."""
        old = set(cast("list[int]", self.root.attrs.get("skipped_tiles", [])))
        self.root.attrs["skipped_tiles"] = sorted(old | {int(i) for i in np.asarray(idx).ravel()})

    def _write_values(self, idx: np.ndarray, vals: np.ndarray) -> None:
        order = np.argsort(idx)
        idx, vals = idx[order], vals[order]
        if np.all(np.diff(idx) == 1):
            self.values[int(idx[0]):int(idx[-1]) + 1] = vals
        else:
            self.values.oindex[idx, :] = vals

    def _accumulate(self, i: int, out: np.ndarray) -> None:
        r, c = (int(v) for v in self.offsets[i])
        a, b, cc0, cc1 = self._chunk_span(i)
        cs = self.cs
        remaining = self.remaining
        assert remaining is not None  # set by _plan for segmentation, the only task that accumulates
        for cr in range(a, b + 1):
            for ccol in range(cc0, cc1 + 1):
                if self.done[cr, ccol]:
                    continue
                s, wsum = self._chunk(cr, ccol)
                y0, x0 = cr * cs, ccol * cs
                ys, ye = max(r, y0), min(r + self.fh, y0 + s.shape[1])
                xs, xe = max(c, x0), min(c + self.fw, x0 + s.shape[2])
                if ye <= ys or xe <= xs:
                    continue
                w = self.window[ys - r:ye - r, xs - c:xe - c]
                s[:, ys - y0:ye - y0, xs - x0:xe - x0] += out[:, ys - r:ye - r, xs - c:xe - c] * w
                wsum[ys - y0:ye - y0, xs - x0:xe - x0] += w
                remaining[cr, ccol] -= 1
                if remaining[cr, ccol] <= 0:
                    self._flush(cr, ccol)

    def _chunk_bounds(self, cr: int, cc: int) -> tuple[slice, slice]:
        cs = self.cs
        return slice(cr * cs, min((cr + 1) * cs, self.H)), slice(cc * cs, min((cc + 1) * cs, self.W))

    def _chunk(self, cr: int, cc: int) -> tuple[np.ndarray, np.ndarray]:
        key = (cr, cc)
        if key in self._open_chunks:
            self._open_chunks.move_to_end(key)
            return self._open_chunks[key]
        ys, xs = self._chunk_bounds(cr, cc)
        h, w = ys.stop - ys.start, xs.stop - xs.start
        part = cast("zarr.Group | None", self.root.get("partial"))
        if part is not None and _arr(part, "flags")[cr, cc]:
            s, wsum = np.asarray(_arr(part, "sum")[:, ys, xs]), np.asarray(_arr(part, "weight")[ys, xs])
        else:
            s, wsum = np.zeros((self.C, h, w), np.float32), np.zeros((h, w), np.float32)
        self._open_chunks[key] = (s, wsum)
        self._open_bytes += s.nbytes + wsum.nbytes
        while self._open_bytes > self.max_open_bytes and len(self._open_chunks) > 1:
            self._spill()
        return s, wsum

    def _spill(self) -> None:
        # The coldest partial chunk goes to disk; it is reloaded if a later tile touches it.
        (cr, cc), (s, wsum) = self._open_chunks.popitem(last=False)
        self.spills += 1
        self._open_bytes -= s.nbytes + wsum.nbytes
        part = cast("zarr.Group | None", self.root.get("partial"))
        if part is None:
            part = self.root.create_group("partial")
            cs = self.cs
            part.create_array("sum", shape=(self.C, self.H, self.W), chunks=(self.C, cs, cs), dtype="float32",
                              fill_value=0.0)
            part.create_array("weight", shape=(self.H, self.W), chunks=(cs, cs), dtype="float32", fill_value=0.0)
            part.create_array("flags", shape=self.done.shape, chunks=self.done.shape, dtype="bool",
                              fill_value=False)
        ys, xs = self._chunk_bounds(cr, cc)
        _arr(part, "sum")[:, ys, xs] = s
        _arr(part, "weight")[ys, xs] = wsum
        _arr(part, "flags")[cr, cc] = True

    def _flush(self, cr: int, cc: int) -> None:
        s, wsum = self._open_chunks.pop((cr, cc), (None, None))
        ys, xs = self._chunk_bounds(cr, cc)
        if s is None:  # spilled earlier and never reopened
            part = cast(zarr.Group, self.root["partial"])
            s, wsum = np.asarray(_arr(part, "sum")[:, ys, xs]), np.asarray(_arr(part, "weight")[ys, xs])
        else:
            self._open_bytes -= s.nbytes + wsum.nbytes
        covered = wsum > 0
        self.prob[:, ys, xs] = np.divide(s, wsum, out=np.zeros_like(s), where=covered[None])
        self.coverage[ys, xs] = covered
        self.done[cr, cc] = True
        _arr(self.root, "chunk_done")[cr, cc] = True

    def finish(self) -> "Heatmap":
        """Write what is left, mark the store complete and return it as a Heatmap."""
        if self.task == "classification":
            vals = np.asarray(self.values[:])
            rows, cols = self.offsets[:, 0], self.offsets[:, 1]
            ok = ~np.isnan(vals).any(axis=1)
            lattice = np.zeros((self.C, self.H, self.W), np.float32)
            cov = np.zeros((self.H, self.W), bool)
            lattice[:, rows[ok], cols[ok]] = vals[ok].T
            cov[rows[ok], cols[ok]] = True
            self.prob[:] = lattice
            self.coverage[:] = cov
            self.done[:] = True
            _arr(self.root, "chunk_done")[:] = True
        else:
            for cr, cc in list(self._open_chunks):
                self._flush(cr, cc)
            if "partial" in self.root:
                part = cast(zarr.Group, self.root["partial"])
                for cr, cc in zip(*np.nonzero(np.asarray(_arr(part, "flags")[:]) & ~self.done)):
                    self._flush(int(cr), int(cc))
                del self.root["partial"]
        nan = np.isnan(np.asarray(self.values[:])).any(axis=1) if len(self.grid) else np.zeros(0, bool)
        skipped = np.asarray(self.root.attrs.get("skipped_tiles", []), dtype=np.int64)
        nan[skipped] = False
        missing = int(nan.sum())
        if missing:
            raise HeatmapError(f"{missing} tiles have no outputs; the heatmap is incomplete", self.path)
        self.root.attrs["complete"] = True
        return Heatmap(self.path)


def _jsonable(v):
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    return v


def _why(e: BaseException) -> str:
    """``Type: first 160 characters of the message`` on one line."""
    return f"{type(e).__name__}: {' '.join(str(e).split())[:160]}".rstrip(": ")


# a heatmap may reach past its slide by edge tiles, never by more than this (level-0 px, factor)
_SLACK_PX, _SLACK_FACTOR = 65536, 2.0
MAX_HEATMAP_PIXELS = 1 << 34  # 16 Gpx per class: more than any slide at any heatmap MPP


class CheckedArray:
    """A zarr array of a heatmap store, read through checks: a chunk that cannot be read (its
    checksum fails, it does not decompress) or NaN values (``finite=True``) are a ``HeatmapError``
    naming the store and the array, never garbage or a raw zarr error. Slices like the array;
    other attributes (``shape``, ``chunks``, ``dtype``, ...) are the array's."""

    def __init__(self, arr, name: str, store: Path, finite: bool = False) -> None:
        self._arr, self._name, self._store, self._finite = arr, name, store, finite

    def __getattr__(self, attr: str):
        return getattr(self._arr, attr)

    def __len__(self) -> int:
        return int(self._arr.shape[0])

    def __getitem__(self, key) -> np.ndarray:
        try:
            out = np.asarray(self._arr[key])
        except Exception as e:  # zarr/numcodecs raise RuntimeError, ValueError, ... for a damaged chunk
            raise HeatmapError(f"{self._name} cannot be read: a chunk is damaged ({_why(e)})", self._store) from None
        if self._finite and out.dtype.kind == "f" and not np.isfinite(out).all():
            raise HeatmapError(f"{self._name} holds NaN or infinite values; the store is damaged", self._store)
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        a = self[...]
        return a if dtype is None else a.astype(dtype)


class Heatmap:
    """A finished heatmap store (read-only): ``prob`` (C, H, W), ``coverage`` (H, W), tile table.

    Opening checks what is cheap to check (metadata readable, shapes consistent with each other and
    with the slide, finished chunks all on disk); reads check each chunk as it is read (checksum,
    no NaN). ``verify()`` reads the whole store once. Each problem is a ``HeatmapError`` naming the
    store and the problem."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise HeatmapError("heatmap store not found" if not self.path.exists()
                               else "not a heatmap store (a file, not a zarr folder)", self.path)
        try:
            self.root = zarr.open_group(str(self.path), mode="r")
            self.attrs: dict[str, Any] = dict(self.root.attrs)
        except Exception as e:
            raise HeatmapError(f"not a heatmap store, or its zarr.json is damaged ({_why(e)})", self.path) from None
        if self.attrs.get("format") != HEATMAP_FORMAT:
            raise HeatmapError("not a slidekit heatmap (no format marker)", self.path)
        if not self.attrs.get("complete"):
            raise HeatmapError("heatmap is incomplete (interrupted run?)", self.path)
        self.prob = CheckedArray(self._array("prob"), "prob", self.path, finite=True)
        self.coverage = CheckedArray(self._array("coverage"), "coverage", self.path)
        self._check_shapes()
        if self.attrs.get("store_checks"):
            self._check_chunks()

    def _array(self, name: str):
        try:
            arr = self.root[name]
        except KeyError:
            raise HeatmapError(f"incomplete: array {name} is missing", self.path) from None
        except Exception as e:  # a truncated or edited zarr.json of the array
            raise HeatmapError(f"array {name} has damaged metadata ({name}/zarr.json: {_why(e)})",
                               self.path) from None
        if not isinstance(arr, zarr.Array):
            raise HeatmapError(f"{name} is not an array", self.path)
        return arr

    def _check_shapes(self) -> None:
        """Shapes agree with the attributes and fit the slide; a damaged or edited declaration
        would otherwise allocate terabytes."""
        bad = lambda why: HeatmapError(f"damaged metadata: {why}", self.path)  # noqa: E731
        try:
            H, W = (int(v) for v in self.attrs["shape"])
            C = len(self.attrs["classes"])
            (sx, sy), (ox, oy) = (tuple(float(v) for v in self.attrs[k]) for k in ("scale", "origin"))
            mpp = float(self.attrs["mpp"])
        except (KeyError, TypeError, ValueError):
            raise bad("the attributes lack shape, classes, scale, origin or mpp") from None
        if not (math.isfinite(sx * sy * mpp) and sx > 0 and sy > 0 and mpp > 0):
            raise bad(f"scale {sx, sy} and mpp {mpp} must be positive numbers")
        if tuple(self.prob.shape) != (C, H, W):
            raise bad(f"prob is declared {tuple(self.prob.shape)}, the heatmap is ({C}, {H}, {W})")
        if tuple(self.coverage.shape) != (H, W):
            raise bad(f"coverage is declared {tuple(self.coverage.shape)}, the heatmap is ({H}, {W})")
        if H * W > MAX_HEATMAP_PIXELS:
            raise bad(f"shape {H} x {W} is larger than any slide's heatmap")
        dims = (self.attrs.get("slide") or {}).get("dimensions")
        if dims:
            W0, H0 = (float(v) for v in dims)
            if (ox + W * sx > _SLACK_FACTOR * W0 + _SLACK_PX) or (oy + H * sy > _SLACK_FACTOR * H0 + _SLACK_PX):
                raise bad(f"shape {H} x {W} at scale {sx:g} x {sy:g} reaches far past the "
                          f"{int(W0)} x {int(H0)} slide")

    def _check_chunks(self) -> None:
        """Every chunk the writer recorded as finished is on disk (a listing, no chunk is read)."""
        try:
            done = np.asarray(_arr(self.root, "chunk_done")[:], bool)
        except Exception as e:
            raise HeatmapError(f"its record of finished chunks (chunk_done) cannot be read ({_why(e)})",
                               self.path) from None
        ch, cw = self.prob.chunks[1:]
        H, W = self.shape
        want = (-(-H // ch), -(-W // cw))
        if done.shape != want:
            raise HeatmapError(f"damaged metadata: chunk_done is {done.shape}, the heatmap has {want} chunks",
                               self.path)
        missing = []
        for name, lead in (("prob", (0,)), ("coverage", ())):
            arr = self.prob._arr if name == "prob" else self.coverage._arr
            present = _listing(self.path / name)
            enc = arr.metadata.encode_chunk_key
            missing += [(name, int(r), int(c)) for r, c in zip(*np.nonzero(done))
                        if enc((*lead, int(r), int(c))) not in present]
        if missing:  # (chunks no tile touched were never finished: they hold the fill value by design)
            n = len({(r, c) for _, r, c in missing})
            first = ", ".join(f"{name} chunk ({r}, {c})" for name, r, c in missing[:3])
            raise HeatmapError(f"incomplete: {n} chunks missing ({first}; a partial copy or deleted files?)",
                               self.path)

    def verify(self) -> "Heatmap":
        """Read the whole store once, chunk row by chunk row (checksums, NaN); returns self."""
        for r0, r1 in self._bands():
            self.prob[:, r0:r1, :]
            self.coverage[r0:r1, :]
        _ = self.tiles  # reading the tile table checks it
        return self

    task = property(lambda self: self.attrs["task"])
    classes = property(lambda self: list(self.attrs["classes"]))
    colors = property(lambda self: [tuple(c) for c in self.attrs.get("colors", [])])
    mpp = property(lambda self: float(self.attrs["mpp"]), doc="Heatmap pixel size in µm.")
    scale = property(lambda self: tuple(self.attrs["scale"]), doc="Level-0 px per heatmap px (x, y).")
    origin = property(lambda self: tuple(self.attrs["origin"]), doc="Level-0 (x, y) of pixel (0, 0)'s corner.")
    shape = property(lambda self: tuple(self.prob.shape[1:]))

    @property
    def tiles(self) -> tuple[np.ndarray, np.ndarray]:
        """(coords (N, 2) level-0, values (N, C)) of every predicted tile."""
        return (CheckedArray(self._array("tiles/coords"), "tiles/coords", self.path)[:],
                CheckedArray(self._array("tiles/values"), "tiles/values", self.path)[:])

    def to_level0(self, geom):
        """Map a shapely geometry from heatmap pixel to level-0 coordinates."""
        (sx, sy), (ox, oy) = self.scale, self.origin
        return affine_transform(geom, [sx, 0, 0, sy, ox, oy])

    def _bands(self):
        """(r0, r1) row bands one chunk high, for chunk-by-chunk passes."""
        ch = self.prob.chunks[1]
        H = self.shape[0]
        return [(r, min(H, r + ch)) for r in range(0, H, ch)]

    def view(self, factor: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Downsampled (C, h, w) values and (h, w) coverage fraction, block-averaging ``factor``
        x ``factor`` pixels over covered pixels only; read band by band."""
        factor = max(1, int(factor))
        H, W = self.shape
        C = self.prob.shape[0]
        h, w = -(-H // factor), -(-W // factor)
        out = np.zeros((C, h, w), np.float32)
        cov_out = np.zeros((h, w), np.float32)
        band = factor * max(1, self.prob.chunks[1] // factor)
        for r0 in range(0, H, band):
            r1 = min(H, r0 + band)
            p = np.asarray(self.prob[:, r0:r1, :])
            cv = np.asarray(self.coverage[r0:r1, :]).astype(np.float32)
            ph, pw = -(-(r1 - r0) // factor) * factor, w * factor
            pp = np.zeros((C, ph, pw), np.float32)
            pp[:, :r1 - r0, :W] = p * cv
            cc = np.zeros((ph, pw), np.float32)
            cc[:r1 - r0, :W] = cv
            s = pp.reshape(C, ph // factor, factor, w, factor).sum(axis=(2, 4))
            n = cc.reshape(ph // factor, factor, w, factor).sum(axis=(1, 3))
            o0 = r0 // factor
            out[:, o0:o0 + s.shape[1]] = np.divide(s, n, out=np.zeros_like(s), where=n[None] > 0)
            cov_out[o0:o0 + n.shape[0]] = n / (factor * factor)
        return out, cov_out

    def overlay(self, slide, path: str | os.PathLike | None = None, max_size: int = 2048,
                alpha: float = 0.5, legend: bool = True) -> np.ndarray:
        """RGB overlay of the heatmap on the slide thumbnail (colour map for one class, class
        colours by argmax for several); saved as PNG when ``path`` is given. ``legend`` adds a
        panel below it (``slidekit.infer.legend``: slide name, scale bar, colour key), also stored as
        the PNG's ``slidekit.infer.legend`` text."""
        H, W = self.shape
        factor = max(1, math.ceil(max(H, W) / max_size))
        vals, cov = self.view(factor)
        # The thumbnail: at most max_size px, never finer than level 0.
        W0, H0 = slide.dimensions
        thumb_mpp = max(slide.mpp[0], max(W0 * slide.mpp[0], H0 * slide.mpp[1]) / max_size)
        thumb = slide.read_whole(thumb_mpp)
        th, tw = thumb.shape[:2]
        (sx, sy), (ox, oy) = self.scale, self.origin
        # Affine from view pixels to thumbnail pixels (classification lattices may be offset).
        kx, ky = slide.mpp[0] / thumb_mpp, slide.mpp[1] / thumb_mpp
        m = np.array([[sx * factor * kx, 0, ox * kx], [0, sy * factor * ky, oy * ky]], np.float32)
        interp = cv2.INTER_NEAREST if self.task == "classification" else cv2.INTER_LINEAR
        palette = np.array(self.colors or [(255, 0, 0)] * len(vals), np.uint8)
        cov = cov.astype(np.float32)
        out = thumb  # blended in place, band by band, so the float temporaries stay small
        for r0 in range(0, th, 256):
            r1 = min(th, r0 + 256)
            mb = m.copy()
            mb[1, 2] -= r0
            def warp(a: np.ndarray, mb: np.ndarray = mb, h: int = r1 - r0) -> np.ndarray:
                return cv2.warpAffine(a, mb, (tw, h), flags=interp, borderValue=0)
            covered = warp(cov) > 0.5
            if vals.shape[0] == 1:
                v = np.clip(warp(vals[0]), 0, 1)
                color = cv2.applyColorMap(np.rint(v * 255).astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1]
                a = alpha * covered * value_alpha(v)  # 0 and glass-level values leave the slide as it is
            else:
                probs = np.stack([warp(c) for c in vals])
                lab = probs.argmax(0)
                color = palette[lab]
                a = alpha * probs.max(0) * covered * (lab != 0)  # class 0 is background
            a = a.astype(np.float32)[..., None]
            band = out[r0:r1]
            band[:] = np.rint(band * (1 - a) + color * a).astype(np.uint8)
        info = None
        if legend:
            seen = vals[:, cov > 0]
            info = legend_info(self, slide.name, thumb_mpp, tw, (0.0, 1.0))
            if info["kind"] == "colorbar" and seen.size:
                info["observed"] = [round(float(seen.min()), 4), round(float(seen.max()), 4)]
                info["label"] += f" (this slide {info['observed'][0]:.2f}-{info['observed'][1]:.2f})"
            out = draw_legend(out, info)
        if path is not None:
            save_png(out, path, info)
        return out

    def vectorize(self, threshold: float = 0.5, min_area_um2: float = 0.0, classes: list[str] | None = None,
                  kind: str = "annotation") -> list[Annotation]:
        """Polygons (holes kept, level-0 coordinates) of thresholded (one class, or each class of a
        multi-label sigmoid model) or argmax (several softmax classes; class 0 is background; the
        winner must also reach ``threshold``) regions, each at least ``min_area_um2``, with area µm²
        and mean/max probability.

        Chunk by chunk: pieces from each chunk are merged along chunk edges with a union. Polygons
        are clipped to the slide (edge tiles reach past it) and to the heatmap's extent, so
        areas and statistics count only pixels on the slide (``bounds``).
        """
        C = self.prob.shape[0]
        names = self.classes
        multilabel = C > 1 and self.attrs.get("activation") == "sigmoid"
        wanted = [0] if C == 1 else list(range(0 if multilabel else 1, C))
        if classes is not None:
            wanted = [k for k in wanted if names[k] in classes]
        pieces: dict[int, list] = {k: [] for k in wanted}
        for r0, r1 in self._bands():
            p = np.asarray(self.prob[:, r0:r1, :])
            cov = np.asarray(self.coverage[r0:r1, :])
            labels = None if multilabel else self._labels(p, cov, threshold)
            for k in wanted:
                hit = (p[k] >= threshold) & cov if labels is None else labels == k
                for poly in _polygons_by_chunk(hit, self.prob.chunks[2]):
                    pieces[k].append(affine_transform(poly, [1, 0, 0, 1, 0, r0]))
        px_um2 = self.mpp * self.mpp
        (sx, sy), (ox, oy) = self.scale, self.origin
        area_scale = sx * sy
        region = self.bounds
        out = []
        for k in wanted:
            merged = unary_union(pieces[k]) if pieces[k] else None
            polys = [] if merged is None or merged.is_empty else getattr(merged, "geoms", [merged])
            for poly in polys:
                geom, clipped = clip_geometry(self.to_level0(poly), region)
                if geom.is_empty:
                    continue
                if clipped:  # back to heatmap pixels for the area and the statistics
                    poly = affine_transform(geom, [1 / sx, 0, 0, 1 / sy, -ox / sx, -oy / sy])
                area = poly.area * px_um2
                if area < min_area_um2:
                    continue
                mean, mx = self._stats(poly, k)
                out.append(Annotation(geom, label=names[k], kind=kind,
                                      color=tuple(self.colors[k]) if self.colors else None,
                                      measurements={"Area µm^2": area, "Mean probability": mean,
                                                    "Max probability": mx,
                                                    "Area px (level 0)": poly.area * area_scale}))
        return out

    @property
    def bounds(self):
        """The level-0 box holding this heatmap's pixels that lie on the slide (shapely)."""
        from shapely.geometry import box

        (sx, sy), (ox, oy) = self.scale, self.origin
        H, W = self.shape
        x1, y1 = ox + W * sx, oy + H * sy
        dims = (self.attrs.get("slide") or {}).get("dimensions")
        if dims:
            x1, y1 = min(x1, float(dims[0])), min(y1, float(dims[1]))
        return box(max(0.0, ox), max(0.0, oy), x1, y1)

    @staticmethod
    def _labels(p: np.ndarray, cov: np.ndarray, threshold: float) -> np.ndarray:
        if p.shape[0] == 1:
            lab = np.where(p[0] >= threshold, 0, -1).astype(np.int16)
        else:
            lab = p.argmax(0).astype(np.int16)
            lab[p.max(0) < threshold] = -1
        lab[~cov] = -1
        return lab

    def _stats(self, poly, k: int) -> tuple[float, float]:
        """Mean and max of class ``k`` over the pixels of ``poly`` (heatmap px), chunk by chunk."""
        x0, y0, x1, y1 = (int(math.floor(v)) for v in poly.bounds)
        x1, y1 = int(math.ceil(poly.bounds[2])), int(math.ceil(poly.bounds[3]))
        ch, cw = self.prob.chunks[1:]
        total, n, mx = 0.0, 0, -np.inf
        ann = [Annotation(poly)]
        for r in range(y0 - y0 % ch, y1, ch):
            for c in range(x0 - x0 % cw, x1, cw):
                ys, ye, xs, xe = max(r, y0), min(r + ch, y1), max(c, x0), min(c + cw, x1)
                if ye <= ys or xe <= xs:
                    continue
                m = rasterize(ann, (xs, ys, xe - xs, ye - ys), mpp=1.0).astype(bool)
                v = np.asarray(self.prob[k, ys:ye, xs:xe])[m]
                if v.size:
                    total += float(v.sum())
                    n += v.size
                    mx = max(mx, float(v.max()))
        return (total / n if n else 0.0), (mx if n else 0.0)


def _listing(folder: Path) -> set[str]:
    """The chunk keys present under an array's folder (``c/0/1/2``), from one directory walk."""
    keys = set()
    for dirpath, _dirs, files in os.walk(folder):
        rel = os.path.relpath(dirpath, folder)
        for f in files:
            if f != "zarr.json":
                keys.add(f if rel == "." else f"{rel}/{f}".replace(os.sep, "/"))
    return keys


def _polygons_by_chunk(mask: np.ndarray, cw: int) -> list:
    out: list = []
    for c0 in range(0, mask.shape[1], cw):
        sub = mask[:, c0:c0 + cw]
        if sub.any():
            out.extend(affine_transform(p, [1, 0, 0, 1, c0, 0]) for p in mask_to_polygons(sub))
    return out
