"""The feature store: per-slide tile features in HDF5 that TRIDENT, CLAM and slidekit all read.

One file per slide (h5py)::

    features  (N, D) float32   one row per tile, the encoder's feature
    coords    (N, 2) int64     level-0 (x, y) top-left corner of each tile, same row order

The attributes of ``coords`` are those TRIDENT and CLAM write (``patch_size``, ``patch_size_level0``,
``level0_magnification``, ``target_magnification``, ``overlap``, ``name`` / ``patch_level``,
``downsample``, ``level_dim``, ``downsampled_level_dim``), so their MIL and heatmap code reads the file
unchanged. CLAM's attributes describe the tile at level 0 (``patch_level`` 0, ``patch_size`` = the
tile's level-0 extent), which is what CLAM needs to draw a tile's footprint. slidekit adds to the
file's root attributes ``format``, ``encoder`` (JSON: name, weights file identity, feature width,
µm/px, ``tokens``: ``cls`` / ``cls+mean`` as the registry entry makes the feature, ``pooled`` for a
global-average-pooled CNN or ViT; ``registry``: the named encoder), ``slide`` (name, fingerprint)
and ``complete``.

Writing is atomic and resumable: ``FeatureWriter`` appends row chunks to ``OUT.partial`` (its
``rows_done`` attribute counts the rows written), a rerun with the same identity continues there,
and the file is renamed to ``OUT`` only when complete. ``read_features`` reads slidekit, TRIDENT,
CLAM and STAMP files (``feats``/``coords``); ``iter_feature_chunks`` streams a bag row chunk by
row chunk for bags bigger than memory.

Every malformed file is one ``FeatureError`` naming the file and the problem (a dataset that is a
group, text or compound values, a tile size that is not a number, a link that cannot be resolved,
a bag declared larger than the free memory). HDF5 storage outside the file (external links,
virtual datasets, external raw storage) is refused unless the reader is given
``allow_external=True``; even then a virtual dataset whose source file is missing is refused
(HDF5 would read its rows as zeros).
"""
from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from slidekit.base.errors import FeatureError, SlidekitWarning
from slidekit.base.outputs import claim_path
from slidekit.slidelevel import spatialdata_read
from slidekit.slides.identity import same_slide, slide_fingerprint

FEATURES_FORMAT = "slidekit.features/1"
FEATURE_SUFFIXES = (".h5", ".hdf5")


@dataclass
class FeatureBag:
    """One slide's bag of tile features as read from a feature file.

    ``patch_size_level0`` is the tile's side in level-0 pixels (0 when the file does not say);
    ``encoder`` what the file says about its encoder (empty when nothing); ``slide`` the slide name.
    """

    features: np.ndarray
    coords: np.ndarray
    patch_size_level0: int
    encoder: dict = field(default_factory=dict)
    slide: str | None = None
    path: Path | None = None
    source: str = "slidekit"  # which tool's layout: slidekit, trident, clam, stamp
    slide_record: dict = field(default_factory=dict)  # slidekit files: name, fingerprint, dimensions, mpp

    def __len__(self) -> int:
        return int(self.features.shape[0])


# -- reading --------------------------------------------------------------------------------------

def _open(path: Path):
    if not path.is_file():
        raise FeatureError("feature file not found", path)
    try:
        return h5py.File(path, "r")
    except Exception as e:  # not HDF5, truncated, locked
        raise FeatureError(f"not a readable HDF5 feature file ({type(e).__name__}: {' '.join(str(e).split())[:120]})",
                        path) from None


def _free_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (None where it cannot be read)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _has(f, name: str) -> bool:
    """Whether ``f`` has a link ``name`` (a dangling or looping link counts: it is opened, and refused, later)."""
    try:
        return f.get(name, getlink=True) is not None
    except Exception:
        return False


def _dataset(f, name: str, path: Path, allow_external: bool):
    """The dataset ``name`` of an open file: FeatureError for a group, a link that cannot be resolved,
    values that are not numbers, or (unless ``allow_external``) storage outside the file."""
    link = f.get(name, getlink=True)
    if isinstance(link, h5py.ExternalLink):
        if not allow_external:
            raise FeatureError(f"'{name}' is an external link to {link.filename}:{link.path} (storage outside the "
                               "file is refused; pass allow_external=True to follow it)", path)
        target = Path(link.filename)
        target = target if target.is_absolute() else path.parent / target
        if not target.is_file():
            raise FeatureError(f"'{name}' is an external link to {link.filename}, which is not found", path)
    try:
        ds = f[name]
    except Exception as e:
        raise FeatureError(f"'{name}' cannot be opened ({type(e).__name__}: {' '.join(str(e).split())[:120]}; "
                           "a dangling or looping link?)", path) from None
    if not isinstance(ds, h5py.Dataset):
        raise FeatureError(f"'{name}' is a {'group' if isinstance(ds, h5py.Group) else type(ds).__name__}, not a "
                           "dataset", path)
    kind = ds.dtype.kind
    if kind not in "fiu":
        what = {"S": "bytes", "U": "text", "O": "text or objects", "V": "compound or opaque records",
                "b": "booleans"}.get(kind, f"{ds.dtype} values")
        if ds.dtype.names:
            what = "compound records"
        raise FeatureError(f"'{name}' holds {what} ({ds.dtype}), not numbers", path)
    if ds.is_virtual:
        if not allow_external:
            raise FeatureError(f"'{name}' is a virtual dataset (its rows are stored in other files; pass "
                               "allow_external=True to read them)", path)
        for src in ds.virtual_sources():
            if src.file_name in (".", ""):
                continue
            target = Path(src.file_name)
            target = target if target.is_absolute() else path.parent / target
            if not target.is_file():
                raise FeatureError(f"'{name}' is a virtual dataset whose source {src.file_name} is not found "
                                   "(HDF5 would read its rows as zeros)", path)
    if ds.external:
        if not allow_external:
            raise FeatureError(f"'{name}' is stored outside the file (external raw storage in "
                               f"{ds.external[0][0]}; pass allow_external=True to read it)", path)
        for target, _offset, _size in ds.external:
            t = Path(target if isinstance(target, str) else target.decode())
            if not (t if t.is_absolute() else path.parent / t).is_file():
                raise FeatureError(f"'{name}' is stored outside the file in {t}, which is not found", path)
    return ds


def _check_memory(rows: int, dim: int, path: Path) -> None:
    """FeatureError when ``rows`` x ``dim`` float32 features (``dim`` 0: the coords alone, 16 bytes a
    tile) would not fit the free memory: the declared size decides, not what the file holds on disk."""
    need = rows * (dim * 4 + 16)
    free = _free_bytes()
    if free is not None and need > free:
        what = f"{rows} x {dim} features" if dim else f"{rows} tile corners"
        raise FeatureError(f"declares {what} ({need / 2**30:.1f} GiB to read), more than the free memory "
                           f"({free / 2**30:.1f} GiB)" + ("; read it in chunks (iter_feature_chunks, mil-deploy)"
                                                          if dim else ""), path)


def _guarded(path: Path, action: str):
    """A context that turns anything but a FeatureError into one FeatureError line naming ``path``."""
    import contextlib

    @contextlib.contextmanager
    def guard():
        try:
            yield
        except FeatureError:
            raise
        except MemoryError:
            raise FeatureError(f"too large to {action} in memory", path) from None
        except Exception as e:
            raise FeatureError(f"cannot {action} ({type(e).__name__}: {' '.join(str(e).split())[:160]})",
                               path) from None

    return guard()


def _layout(f, path: Path, allow_external: bool = False) -> tuple[str, str]:
    """(features dataset name, source) of an open file; FeatureError for anything else (and for
    ``features``/``coords`` that are not numeric datasets inside the file, ``_dataset``)."""
    name, source = _layout_names(f, path)
    for key in (name, "coords"):
        _check_written(_dataset(f, key, path, allow_external), key, path)
    return name, source


def _check_written(ds, name: str, path: Path) -> None:
    """FeatureError for a dataset declared with rows that were never written (HDF5 reads them as
    its fill value, zeros, without a word): storage short of a contiguous dataset's size, or chunks
    missing from a chunked one. Storage outside the file is checked by ``_dataset``."""
    if ds.size == 0 or ds.is_virtual or ds.external:
        return
    shape = " x ".join(str(int(v)) for v in ds.shape)
    try:
        if ds.chunks is None:
            stored, whole = int(ds.id.get_storage_size()), int(ds.size) * ds.dtype.itemsize
            short = stored < whole
            what = f"stores {stored} of its {whole} bytes"
        else:
            want = int(np.prod([-(-int(n) // int(c)) for n, c in zip(ds.shape, ds.chunks)]))
            have = int(ds.id.get_num_chunks())
            short = have < want
            what = f"stores {have} of its {want} chunks"
    except Exception:  # an HDF5 build without these queries: nothing to check with
        return
    if short:
        raise FeatureError(f"'{name}' declares {shape} {'features' if name != 'coords' else 'coords'} but {what} "
                           "(rows never written read as zeros): an unfinished or damaged file", path)


def _layout_names(f, path: Path) -> tuple[str, str]:
    fmt = f.attrs.get("format")
    if fmt is not None and str(fmt).startswith("slidekit.features"):
        if str(fmt) != FEATURES_FORMAT:
            raise FeatureError(f"feature file format {fmt} is not {FEATURES_FORMAT} (written by another slidekit)",
                               path)
        if not bool(f.attrs.get("complete", False)):
            raise FeatureError("unfinished slidekit feature file (rerun the embed)", path)
        return "features", "slidekit"
    if not _has(f, "coords"):
        raise FeatureError(f"not a feature file: no 'coords' dataset (has {sorted(f.keys())[:6]})", path)
    if _has(f, "features"):
        try:
            trident = "patch_size_level0" in f["coords"].attrs
        except Exception:  # an unresolvable coords link: _dataset says what it is
            trident = False
        return "features", ("trident" if trident else "clam")
    if _has(f, "feats"):
        return "feats", "stamp"
    raise FeatureError(f"not a feature file: no 'features' or 'feats' dataset (has {sorted(f.keys())[:6]})", path)


def _check_shapes(f, name: str, path: Path) -> tuple[int, int]:
    feats, coords = f[name], f["coords"]
    if feats.ndim != 2:
        raise FeatureError(f"'{name}' has shape {feats.shape}, not (N, D)", path)
    if coords.ndim != 2 or coords.shape[1] != 2 or coords.shape[0] != feats.shape[0]:
        raise FeatureError(f"'coords' has shape {coords.shape}; '{name}' has {feats.shape[0]} rows", path)
    if feats.shape[1] == 0 and feats.shape[0] > 0:
        raise FeatureError(f"'{name}' has shape {feats.shape}: features 0 wide", path)
    return int(feats.shape[0]), int(feats.shape[1])


def _attr(attrs, key: str):
    v = attrs.get(key)
    if isinstance(v, np.ndarray) and v.size == 1:
        v = v.item()
    if isinstance(v, bytes):
        v = v.decode()
    return v


def _coords_level0(f, source: str, path: Path, slide_mpp: float | None,
                   allow_external: bool = False) -> tuple[np.ndarray, int]:
    """Level-0 integer corners and the tile's level-0 side of any supported layout."""
    ds = _dataset(f, "coords", path, allow_external)
    a = ds.attrs
    _check_memory(int(ds.shape[0]) if ds.ndim else 0, 0, path)
    coords = np.asarray(ds[:])
    if source == "stamp" and str(_attr(a, "unit") or "").lower() in ("um", "µm", "micron", "microns"):
        # STAMP 2 stores corners and tile size in µm: level 0 needs the slide's µm/px.
        if slide_mpp is None:
            raise FeatureError("STAMP coords are in µm: give the slide's µm/px (slide_mpp=)", path)
        tile_um = _attr(a, "tile_size_um") or _attr(f.attrs, "tile_size_um")
        side = int(round(_size_attr(tile_um, "tile_size_um", path) / slide_mpp)) if tile_um else 0
        return np.rint(coords / slide_mpp).astype(np.int64), side
    if source == "stamp":
        warnings.warn(f"{path}: STAMP file without a coords unit: its coords are taken as level-0 pixels",
                      SlidekitWarning, stacklevel=3)
    if np.issubdtype(coords.dtype, np.floating):
        if not np.all(np.isfinite(coords)) or np.any(np.abs(coords - np.rint(coords)) > 1e-3):
            raise FeatureError("coords are not whole level-0 pixels", path)
        coords = np.rint(coords)
    raw = _attr(a, "patch_size_level0")
    tile: float | None = None
    if raw is not None:
        tile = _size_attr(raw, "patch_size_level0", path)
    elif source == "clam":
        size, level = _attr(a, "patch_size"), _attr(a, "patch_level")
        down = a.get("downsample")
        if size is not None and down is not None:
            tile = _size_attr(size, "patch_size", path) * _size_attr(
                down if np.size(down) < 2 else np.asarray(down).reshape(-1)[0], "downsample", path)
        elif size is not None and level in (0, None):
            tile = _size_attr(size, "patch_size", path) if level == 0 else None
    return coords.astype(np.int64), int(round(float(tile))) if tile is not None else 0


def _size_attr(value, key: str, path: Path) -> float:
    """A tile-size attribute as a finite, non-negative number; FeatureError naming it otherwise."""
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    try:
        v = float(np.asarray(value).reshape(-1)[0]) if np.size(value) == 1 else float("nan")
    except (TypeError, ValueError, IndexError):
        v = float("nan")
    if not np.isfinite(v) or v < 0 or v > 2**31:
        shown = value.item() if isinstance(value, np.generic) else value
        raise FeatureError(f"{key} {shown if isinstance(shown, (int, float)) else repr(shown)} is not a tile size "
                           "(a number of level-0 pixels)", path)
    return v


def _json_attr(f, key: str, path: Path) -> dict:
    """A slidekit file's JSON root attribute ``key`` as a dict; FeatureError when missing or garbled."""
    raw = _attr(f.attrs, key)
    try:
        value = json.loads(raw) if isinstance(raw, str) else None
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise FeatureError(f"slidekit feature file whose '{key}' record is {'missing' if raw is None else 'garbled'}",
                        path)
    return value


def _slide_record(f, source: str, path: Path) -> dict:
    return _json_attr(f, "slide", path) if source == "slidekit" else {}


def _encoder_info(f, source: str, path: Path) -> dict:
    if source == "slidekit":
        return _json_attr(f, "encoder", path)
    info = {}
    for key in ("encoder", "extractor", "feat_extractor", "model"):  # what other tools record, if anything
        v = _attr(f.attrs, key) or _attr(f[("feats" if source == "stamp" else "features")].attrs, key)
        if v is not None:
            info["name"] = str(v)
            break
    return info


def read_features(path: str | os.PathLike, slide_mpp: float | None = None,
                  allow_external: bool = False) -> FeatureBag:
    """Read one slide's features: a slidekit, TRIDENT or CLAM file (``features``/``coords``) or a
    STAMP file (``feats``/``coords``). ``slide_mpp`` converts STAMP's µm coords to level-0 pixels.
    A SpatialData store (``STORE.zarr`` or ``STORE.zarr/tables/NAME``: a wsidata/LazySlide
    ``{model}_{tile_key}`` or sopa ``{model}_embeddings`` table) is read by ``spatialdata_read``.

    Anything else (not HDF5, other datasets, groups or text where numbers belong, mismatched rows,
    non-finite features, a tile size that is not a number, a bag declared larger than the free
    memory) is one FeatureError line naming the file. HDF5 storage outside the file (external
    links, virtual datasets, external raw storage) is refused unless ``allow_external``. A file
    that does not give the tile size leaves ``patch_size_level0`` 0 and says so.
    """
    path = Path(path)
    if spatialdata_read.is_spatialdata_path(path):
        with _guarded(path, "read the store's features"):
            sb = spatialdata_read.open_store_bag(path, read=False)
            _check_memory(len(sb.coords), sb.dim, sb.store)
            sb = spatialdata_read.open_store_bag(path)
        assert sb.features is not None
        return FeatureBag(sb.features, sb.coords, sb.patch_size_level0, sb.encoder, sb.slide, sb.path, sb.source,
                          sb.slide_record)
    with _open(path) as f, _guarded(path, "read the features"):
        name, source = _layout(f, path, allow_external)
        rows, dim = _check_shapes(f, name, path)
        _check_memory(rows, dim, path)
        coords, side = _coords_level0(f, source, path, slide_mpp, allow_external)
        encoder = _encoder_info(f, source, path)
        record = _slide_record(f, source, path)
        slide = _attr(f.attrs, "slide_name") if source == "slidekit" else _attr(f["coords"].attrs, "name")
        feats = np.asarray(f[name][:], dtype=np.float32)
    if not np.all(np.isfinite(feats)):
        raise FeatureError(f"{int((~np.isfinite(feats)).any(axis=1).sum())} feature rows are not finite", path)
    if side == 0:
        warnings.warn(f"{path}: the file does not say the tile size; patch_size_level0 is 0 (unknown)",
                      SlidekitWarning, stacklevel=2)
    return FeatureBag(feats, coords, side, encoder, None if slide is None else str(slide), path, source, record)


@dataclass
class FeatureInfo:
    """What a feature file holds, read without its features: rows, width, tile size, encoder, slide."""

    rows: int
    dim: int
    patch_size_level0: int
    encoder: dict
    slide: str | None
    path: Path
    source: str
    slide_record: dict = field(default_factory=dict)
    #: The tiles' level-0 corners (N, 2) int64 (read anyway: 16 bytes a tile), for checks against a slide.
    coords: np.ndarray | None = field(default=None, repr=False)

    @property
    def nbytes(self) -> int:
        """Bytes of the features as float32 (what a bag takes in memory)."""
        return self.rows * self.dim * 4


def feature_info(path: str | os.PathLike, slide_mpp: float | None = None,
                 allow_external: bool = False) -> FeatureInfo:
    """The layout checks of ``read_features`` and what the file says, without reading the features
    (the coords are read: 16 bytes a tile): to plan memory, or to name a bag before streaming it."""
    path = Path(path)
    if spatialdata_read.is_spatialdata_path(path):
        with _guarded(path, "read the store"):
            sb = spatialdata_read.open_store_bag(path, read=False)
        return FeatureInfo(len(sb.coords), sb.dim, sb.patch_size_level0, sb.encoder, sb.slide, sb.path, sb.source,
                           sb.slide_record, np.asarray(sb.coords, np.int64))
    with _open(path) as f, _guarded(path, "read the feature file"):
        name, source = _layout(f, path, allow_external)
        rows, dim = _check_shapes(f, name, path)
        coords, side = _coords_level0(f, source, path, slide_mpp, allow_external)
        encoder = _encoder_info(f, source, path)
        record = _slide_record(f, source, path)
        slide = _attr(f.attrs, "slide_name") if source == "slidekit" else _attr(f["coords"].attrs, "name")
    return FeatureInfo(rows, dim, side, encoder, None if slide is None else str(slide), path, source, record, coords)


def iter_feature_chunks(path: str | os.PathLike, rows: int = 65536, slide_mpp: float | None = None,
                        allow_external: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (features (n, D) float32, coords (n, 2) int64) of at most ``rows`` rows at a time.

    Only one chunk is in memory: for bags bigger than memory. The same layouts and checks as
    ``read_features`` (coords are read whole: 16 bytes a tile).
    """
    path = Path(path)
    if rows < 1:
        raise ValueError("rows must be >= 1")
    if spatialdata_read.is_spatialdata_path(path):
        yield from spatialdata_read.iter_store_chunks(path, rows)
        return
    with _open(path) as f:
        with _guarded(path, "read the features"):
            name, source = _layout(f, path, allow_external)
            n, _ = _check_shapes(f, name, path)
            coords, _side = _coords_level0(f, source, path, slide_mpp, allow_external)
            ds = f[name]
        for begin in range(0, n, rows):
            with _guarded(path, f"read feature rows {begin}-{min(begin + rows, n) - 1}"):
                x = np.asarray(ds[begin:begin + rows], dtype=np.float32)
            if not np.all(np.isfinite(x)):
                raise FeatureError(f"feature rows {begin}-{begin + len(x) - 1} hold non-finite values", path)
            yield x, coords[begin:begin + rows]


# -- a cohort's feature files ----------------------------------------------------------------------

COHORT_TABLE = "cohort.csv"  # slidekit.cohort.table.CSV_NAME (the cohort layer sits above this one)
COHORT_FEATURES = "features.h5"  # what `slidekit embed` over a cohort writes into OUT/<id>/


def cohort_feature_files(cohort: str | os.PathLike) -> tuple[list[dict], list[str]]:
    """The slides of an ``embed`` cohort folder (``OUT/cohort.csv``) with their feature files.

    Returns ``(rows, not_done)``: each row of a slide whose embed row is ``done`` (every column of
    ``cohort.csv``, the manifest's ``label``/``patient`` among them) plus ``features``: the absolute
    path of ``OUT/<id>/features.h5``; and one line for each other slide (its status and error, or its missing
    feature file). FeatureError naming the folder when it holds no ``cohort.csv``."""
    import csv

    root = Path(cohort)
    table = root / COHORT_TABLE
    if not table.is_file():
        raise FeatureError(f"no {COHORT_TABLE}: not the --out folder of a cohort `slidekit embed`", root)
    try:
        with open(table, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            fieldnames, records = list(reader.fieldnames or []), list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        why = "not UTF-8 text" if isinstance(e, UnicodeDecodeError) else f"unreadable ({type(e).__name__}: {e})"
        raise FeatureError(f"{why}: not a cohort table", table) from None
    if "id" not in fieldnames or "status" not in fieldnames:
        raise FeatureError("has no 'id' and 'status' columns: not a cohort table", table)
    rows, not_done = [], []
    for row in records:
        row = {k: (v or "").strip() for k, v in row.items() if k}
        sid, status = row["id"], row["status"]
        feats = root.resolve() / sid / COHORT_FEATURES  # absolute: tables elsewhere refer to it
        if status != "done":
            why = row.get("error") or row.get("note") or ""
            not_done.append(f"{sid}: its embed row is {status or 'empty'}{f' ({why})' if why else ''}")
        elif not feats.is_file():
            not_done.append(f"{sid}: its embed row is done but {feats} is missing (rerun the embed)")
        else:
            rows.append({**row, "features": str(feats)})
    return rows, not_done


# -- provenance ---------------------------------------------------------------------------------

#: what a feature file's ``encoder`` record and a model's must agree on: (key, what the user calls it)
PROVENANCE_FIELDS = (("name", "encoder"), ("weights", "encoder weights"), ("mpp", "µm/px"),
                     ("patch_size", "patch size"), ("tokens", "token rule"))


def _weights_match(a, b) -> bool:
    """Weights identities (``path:size:mtime``) match when equal, or for a copy of the same file
    elsewhere (same file name and size; a copy need not keep the path or the mtime)."""
    if a == b:
        return True
    if not (isinstance(a, str) and isinstance(b, str)):
        return False
    pa, pb = a.rsplit(":", 2), b.rsplit(":", 2)
    return len(pa) == 3 and len(pb) == 3 and Path(pa[0]).name == Path(pb[0]).name and pa[1] == pb[1]


def _same(key: str, a, b) -> bool:
    if key == "weights":
        return _weights_match(a, b)
    if key == "mpp":
        try:
            return bool(np.allclose(np.asarray(a, dtype=float), np.asarray(b, dtype=float), rtol=1e-3, atol=0))
        except (TypeError, ValueError):
            return a == b
    if key == "patch_size":
        try:
            return int(a) == int(b)
        except (TypeError, ValueError):
            return a == b
    return str(a) == str(b)


def _known(value) -> bool:
    return value not in (None, "", "unrecorded")


def compare_provenance(recorded: dict, expected: dict, against: str = "the model's") -> tuple[list[str], list[str]]:
    """A feature file's ``encoder`` record against what a model was trained on (its checkpoint's
    ``encoder``): ``(mismatches, unchecked)``. A mismatch reads ``µm/px 2.0 (the model's: 0.5)``;
    ``unchecked`` names the fields either side does not record (a TRIDENT, CLAM or STAMP file; a
    model trained on such files)."""
    mismatches, unchecked = [], []
    for key, label in PROVENANCE_FIELDS:
        a, b = (recorded or {}).get(key), (expected or {}).get(key)
        if not (_known(a) and _known(b)):
            unchecked.append(label)
        elif not _same(key, a, b):
            show = (lambda v: Path(str(v).rsplit(":", 2)[0]).name) if key == "weights" else repr
            mismatches.append(f"{label} {show(a)} ({against}: {show(b)})")
    return mismatches, unchecked


def check_features_for_model(info: FeatureInfo, in_dim: int, encoder: dict) -> list[str]:
    """Check one feature file (``feature_info``) against a model taking ``in_dim`` features from
    ``encoder``: FeatureError naming the file for another width or another encoder identity; returns
    what could not be checked (empty for a slidekit file scored by a model trained on slidekit files)."""
    if int(info.dim) != int(in_dim):
        raise FeatureError(f"features are {info.dim} wide; the model takes {in_dim} (features of another encoder?)",
                        info.path)
    mismatches, unchecked = compare_provenance(info.encoder, encoder)
    if mismatches:
        raise FeatureError(f"features from another encoder or tile geometry than the model's: {'; '.join(mismatches)}",
                        info.path)
    return unchecked


def check_features_for_slide(info: FeatureInfo, slide_path: str | os.PathLike) -> list[str]:
    """FeatureError when the file records another slide's fingerprint than that of ``slide_path``
    (either fingerprint form, ``slides.identity.same_slide``); returns ``["slide fingerprint"]``
    when the file records none."""
    recorded = (info.slide_record or {}).get("fingerprint")
    if not recorded:
        return ["slide fingerprint"]
    if not same_slide(str(recorded), slide_path):
        raise FeatureError(f"features of slide {info.slide_record.get('name') or info.slide!r} (fingerprint "
                           f"{recorded}), not of {slide_path} (fingerprint {slide_fingerprint(slide_path)})",
                           info.path)
    return []


# -- writing --------------------------------------------------------------------------------------

def tool_attrs(patch_size: int, patch_size_level0: int, slide_mpp: float, tile_mpp: float,
               slide_dimensions: tuple[int, int], name: str, overlap: int = 0) -> dict:
    """The ``coords`` attributes TRIDENT and CLAM write, for a tile grid at level 0.

    Magnifications follow the usual 10 / (µm/px) rule (0.25 µm/px = 40x), as TRIDENT records them.
    """
    w, h = (int(v) for v in slide_dimensions)
    return {"patch_size": int(patch_size), "patch_size_level0": int(patch_size_level0),
            "level0_magnification": float(round(10.0 / slide_mpp, 3)),
            "target_magnification": float(round(10.0 / tile_mpp, 3)), "overlap": int(overlap), "name": str(name),
            "savetodir": "", "patch_level": 0, "downsample": np.array([1.0, 1.0]),
            "level_dim": np.array([w, h], dtype=np.int64), "downsampled_level_dim": np.array([w, h], dtype=np.int64)}


class FeatureWriter:
    """Append a slide's features chunk by chunk into ``OUT.partial``; ``close()`` renames it to ``OUT``.

    ``identity`` (JSON-able: encoder, slide, grid) is stored; a ``.partial`` left by an interrupted
    run with the same identity and rows is continued (``rows_done`` says where), any other is
    replaced. ``coords`` are written whole at the start (all tiles are known up front).
    """

    def __init__(self, out: str | os.PathLike, coords: np.ndarray, dim: int, encoder: dict, slide: dict,
                 coords_attrs: dict, identity: dict | None = None, chunk_rows: int = 4096) -> None:
        self.out = Path(out)
        self.partial = self.out.with_name(self.out.name + ".partial")
        self.n, self.dim = int(len(coords)), int(dim)
        key = json.dumps({"encoder": encoder, "slide": slide, "identity": identity or {}, "n": self.n,
                          "dim": self.dim}, sort_keys=True, default=str)
        self.f: Any = None  # the open h5py.File
        if self.partial.exists():
            try:
                f = h5py.File(self.partial, "r+")
                if f.attrs.get("identity_key") == key and f["features"].shape == (self.n, self.dim):
                    self.f = f
                else:
                    f.close()
            except Exception:
                self.f = None
            if self.f is None:
                self.partial.unlink()
        if self.f is None:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            f = h5py.File(self.partial, "w")
            f.attrs.update({"format": FEATURES_FORMAT, "complete": False, "rows_done": 0, "identity_key": key,
                            "encoder": json.dumps(encoder, default=str), "slide": json.dumps(slide, default=str),
                            "slide_name": str(slide.get("name", ""))})
            chunk = (max(1, min(chunk_rows, max(self.n, 1))), self.dim)
            f.create_dataset("features", shape=(self.n, self.dim), dtype="float32", chunks=chunk if self.n else None)
            c = f.create_dataset("coords", data=np.asarray(coords, dtype=np.int64).reshape(self.n, 2))
            c.attrs.update(coords_attrs)
            f.flush()
            self.f = f

    @property
    def rows_done(self) -> int:
        """Rows already written (an interrupted run's rows count)."""
        return int(self.f.attrs["rows_done"])

    def write(self, begin: int, rows: np.ndarray) -> None:
        """Write rows ``begin:begin+len(rows)`` (the next rows: appends only)."""
        rows = np.asarray(rows, dtype=np.float32)
        if begin != self.rows_done or rows.shape[1:] != (self.dim,) or begin + len(rows) > self.n:
            raise ValueError(f"rows {begin}+{len(rows)} do not follow {self.rows_done} of {self.n}")
        if not np.all(np.isfinite(rows)):
            raise FeatureError(f"the encoder gave non-finite features for rows {begin}-{begin + len(rows) - 1}",
                            self.out)
        self.f["features"][begin:begin + len(rows)] = rows
        self.f.attrs["rows_done"] = begin + len(rows)
        self.f.flush()  # rows_done never runs ahead of the rows on disk

    def close(self) -> Path:
        """Mark complete and rename into place (all rows must be written)."""
        if self.rows_done != self.n:
            self.f.close()
            raise ValueError(f"only {self.rows_done} of {self.n} rows written")
        self.f.attrs["complete"] = True
        self.f.close()
        os.replace(self.partial, self.out)
        return self.out

    def abort(self) -> None:
        """Close without finishing (the .partial stays for a rerun to continue)."""
        if self.f:
            self.f.close()


def is_complete_store(path: str | os.PathLike, identity_of: dict | None = None) -> bool:
    """Whether ``path`` is a finished slidekit feature file (with the same encoder/slide when given)."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != FEATURES_FORMAT or not bool(f.attrs.get("complete")):
                return False
            if identity_of is not None:
                key = json.loads(f.attrs["identity_key"])
                return all(json.loads(json.dumps(key.get(k), sort_keys=True, default=str))
                           == json.loads(json.dumps(v, sort_keys=True, default=str)) for k, v in identity_of.items())
            return True
    except Exception:
        return False


def _is_slidekit_h5(path: Path) -> bool:
    try:
        with h5py.File(path, "r") as f:
            return str(f.attrs.get("format", "")).startswith("slidekit.features")
    except Exception:
        return False


def write_feature_store(emb, out: str | os.PathLike, encoder: dict | None = None,
                        chunk_rows: int | None = None) -> Path:
    """Write an embeddings store (``slidekit.slidelevel.embed.open_embeddings``) as an HDF5 feature
    file, chunk by chunk (flat in memory), atomically and resumably; an existing file for the
    same slide, grid and encoder is kept. Returns the path."""
    out = Path(out)
    if out.suffix.lower() not in FEATURE_SUFFIXES:
        raise FeatureError(f"a feature file is .h5 or .hdf5, not '{out.suffix}'", out)
    a = emb.attrs
    g, s, spec = a["grid"], a["slide"], a["spec"]
    side = int(round(float(g["extent"][0])))
    # The token rule embed recorded. A store made before it did: a ResNet/checkpoint encoder was pooled;
    # for a timm ViT it cannot be told (a named encoder's class token or a pooled timm:NAME): rerun embed.
    made = a.get("encoder") or {"tokens": "unrecorded" if str(spec.get("backbone")).startswith("timm:") else "pooled"}
    enc = {"name": spec.get("backbone"), "weights": a.get("model"), "dim": int(emb.features.shape[1]),
           "mpp": spec.get("mpp"), "patch_size": spec.get("patch_size"), "mean": spec.get("mean"),
           "std": spec.get("std"), "tokens": made.get("tokens", "pooled"),
           **({"registry": made["registry"]} if made.get("registry") else {}), **(encoder or {})}
    slide = {"name": s["name"], "fingerprint": s["id"], "dimensions": s["dimensions"], "mpp": s["mpp"]}
    identity = {"grid": g, "stain": a.get("stain")}
    claim_path(out, _is_slidekit_h5(out), "a slidekit feature file")
    if is_complete_store(out, {"encoder": enc, "slide": slide, "identity": identity}):
        return out
    attrs = tool_attrs(g["size"], side, float(s["mpp"][0]), float(g["mpp"]), tuple(s["dimensions"]),
                       Path(str(s["name"])).stem, overlap=int(g.get("overlap") or 0))
    step = int(chunk_rows or emb.features.chunks[0])
    w = FeatureWriter(out, emb.coords, emb.features.shape[1], enc, slide, attrs, identity, chunk_rows=step)
    try:
        for begin in range(w.rows_done, w.n, step):
            w.write(begin, np.asarray(emb.features[begin:begin + step]))
        _copy_qc_fractions(emb, w.f)
    except BaseException:
        w.abort()
        raise
    return w.close()


def _copy_qc_fractions(emb: Any, f: Any) -> None:
    """The store's per-tile artefact fractions (``embed --exclude-qc``), rows as ``coords``, as the HDF5
    dataset ``qc_fractions`` (its ``classes`` attribute names the columns; the file's ``qc`` attribute
    holds the QC counts) so a user can filter the tiles again without recomputing."""
    import zarr

    qc = emb.attrs.get("qc")
    if not isinstance(qc, dict):
        return
    stored = zarr.open_array(str(Path(emb.path) / "qc_fractions"), mode="r")
    fractions = np.asarray(stored[:], np.float32)
    if "qc_fractions" in f:
        del f["qc_fractions"]
    ds = f.create_dataset("qc_fractions", data=fractions)
    ds.attrs["classes"] = json.dumps(qc.get("classes") or [])
    f.attrs["qc"] = json.dumps(qc)
