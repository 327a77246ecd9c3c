"""Tile features from SpatialData stores: what wsidata/LazySlide and sopa write, read as a slidekit bag.

A SpatialData store (a ``.zarr`` folder) holds tables (AnnData) annotating shapes. Two layouts hold
tile features:

- wsidata / LazySlide: a table ``{model}_{tile_key}`` (obs ``tile_id``, categorical ``library_id``)
  annotating the shapes ``{tile_key}``: one box per tile in level-0 pixels of the ``global``
  coordinate system, the tile spec in the store's ``tile_spec`` attribute;
- sopa: a table ``{model}_embeddings`` annotating the patch boxes it names as its region
  (``obsm["spatial"]``: the patch centroids).

Either way a row's tile is the box its region's shapes hold for its instance id; the box's level-0
top-left corner becomes the bag's ``coords`` row and its side ``patch_size_level0``. A path
``STORE.zarr`` picks the store's one feature table; ``STORE.zarr/tables/NAME`` picks table NAME.

Elements are read one by one with zarr, anndata and geopandas (never the whole store through
``spatialdata.read_zarr``, which loads every shape and table at once). Anything that cannot be
read as a bag is one ``FeatureError`` naming the store and the element: a missing table or shapes
element, tiles outside the ``global`` system (or a ``global`` in micrometres), table rows without a
tile, rows of X unlike those of obs, non-finite features, boxes that are not whole pixels.

Imports: ``slidekit.base`` only; zarr, anndata and geopandas inside the functions that read.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from slidekit.base.errors import FeatureError

#: the name slidekit's export writes its own record under in a store's attributes
SLIDEKIT_ATTR = "slidekit"
STORE_FORMAT = "slidekit.spatialdata/1"
_MICRON_UNITS = ("micrometer", "micron", "microns", "um", "µm")


@dataclass
class StoreBag:
    """One feature table of a SpatialData store, as a slidekit bag (``features`` None until read)."""

    store: Path
    table: str
    coords: np.ndarray  # (N, 2) int64 level-0 top-left corners, in the table's row order
    patch_size_level0: int
    dim: int
    encoder: dict
    slide: str | None
    source: str  # "wsidata" or "sopa"
    slide_record: dict = field(default_factory=dict)
    features: np.ndarray | None = None

    @property
    def path(self) -> Path:
        """The table's own path, ``STORE/tables/NAME`` (what a bag's ``path`` names)."""
        return self.store / "tables" / self.table


def _zarr_group(path: Path) -> bool:
    return path.is_dir() and ((path / "zarr.json").is_file() or (path / ".zgroup").is_file())


def split_store_path(path: str | os.PathLike) -> tuple[Path, str | None] | None:
    """``(store, table or None)`` when ``path`` is a SpatialData store or one of its tables
    (``STORE/tables/NAME``); None for anything else (an HDF5 file, a plain folder)."""
    p = Path(path)
    if p.parent.name == "tables" and _zarr_group(p.parent.parent) and (p.parent.parent / "tables").is_dir():
        return p.parent.parent, p.name
    if _zarr_group(p) and (p / "tables").is_dir():
        return p, None
    if _zarr_group(p) and p.suffix == ".zarr" and any((p / k).is_dir() for k in ("shapes", "images", "labels")):
        return p, None  # a SpatialData store without tables: refused below, naming what is missing
    return None


def is_spatialdata_path(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a SpatialData store (or a table of one) rather than a feature file."""
    return split_store_path(path) is not None


def _attrs(group_path: Path) -> dict:
    """The attributes of a zarr group (v3 ``zarr.json`` or v2 ``.zattrs``), read without zarr."""
    if (group_path / "zarr.json").is_file():
        return dict(json.loads((group_path / "zarr.json").read_text()).get("attributes") or {})
    if (group_path / ".zattrs").is_file():
        return dict(json.loads((group_path / ".zattrs").read_text()))
    return {}


def _store_attrs(store: Path) -> dict:
    try:
        return _attrs(store)
    except (OSError, ValueError) as e:
        raise FeatureError(f"the store's metadata cannot be read ({type(e).__name__}: {e})", store) from None


def _tables(store: Path) -> list[str]:
    root = store / "tables"
    return sorted(p.name for p in root.iterdir() if _zarr_group(p)) if root.is_dir() else []


def _pick_table(store: Path, attrs: dict) -> str:
    tables = _tables(store)
    specs = attrs.get("tile_spec") or {}
    feats = [t for t in tables if any(t.endswith(f"_{k}") for k in specs) or t.endswith("_embeddings")]
    if not feats:
        raise FeatureError(f"holds no feature table (a wsidata '{{model}}_{{tile_key}}' table or a sopa "
                           f"'{{model}}_embeddings' table); its tables: {tables or 'none'}", store)
    if len(feats) > 1:
        raise FeatureError(f"holds {len(feats)} feature tables ({', '.join(feats)}): name one as "
                           f"{store}/tables/NAME", store)
    return feats[0]


# -- coordinate transformations (NGFF, as spatialdata writes them) ------------------------------------

def _affine(t: dict, where: str, store: Path) -> np.ndarray:
    """The 3x3 (x, y) matrix of one NGFF transformation dict."""
    kind = t.get("type")
    axes = [a["name"] if isinstance(a, dict) else a for a in (t.get("input") or {}).get("axes") or
            [{"name": "x"}, {"name": "y"}]]
    m = np.eye(3)
    if kind == "identity":
        return m
    if kind in ("scale", "translation"):
        vals = dict(zip(axes, t.get(kind) or []))
        if kind == "scale":
            m[0, 0], m[1, 1] = float(vals.get("x", 1.0)), float(vals.get("y", 1.0))
        else:
            m[0, 2], m[1, 2] = float(vals.get("x", 0.0)), float(vals.get("y", 0.0))
        return m
    if kind == "sequence":
        for part in t.get("transformations") or []:
            m = _affine(part, where, store) @ m
        return m
    if kind == "affine":
        a = np.asarray(t.get("affine"), dtype=float)
        if a.shape == (3, 3) and axes[:2] == ["x", "y"]:
            return a
        if a.shape == (3, 3) and axes[:2] == ["y", "x"]:
            return a[[1, 0, 2]][:, [1, 0, 2]]
    raise FeatureError(f"{where}: its transformation to 'global' is a {kind} slidekit cannot read", store)


def _to_global(element: Path, where: str, store: Path) -> np.ndarray:
    """The 3x3 matrix taking ``element``'s intrinsic (x, y) to level-0 pixels (its ``global`` system)."""
    found = []
    for t in _attrs(element).get("coordinateTransformations") or []:
        out = t.get("output") or {}
        name = out.get("name") if isinstance(out, dict) else out
        found.append(str(name))
        if name == "global":
            units = {str(a.get("unit", "")).lower() for a in out.get("axes") or [] if isinstance(a, dict)}
            if units & set(_MICRON_UNITS):
                raise FeatureError(f"{where}: its 'global' coordinate system is in micrometres, not level-0 "
                                   "pixels (wsidata's convention)", store)
            m = _affine(t, where, store)
            if abs(m[0, 1]) > 1e-12 or abs(m[1, 0]) > 1e-12:
                raise FeatureError(f"{where}: its transformation to 'global' rotates or shears the tiles", store)
            return m
    raise FeatureError(f"{where}: has no 'global' coordinate system (level-0 pixels); its systems: "
                       f"{', '.join(found) or 'none'}", store)


# -- reading ------------------------------------------------------------------------------------------

def _read_obs(table_path: Path, where: str, store: Path) -> Any:
    import anndata
    import zarr

    try:
        g: Any = zarr.open_group(str(table_path), mode="r")
        obs = anndata.io.read_elem(g["obs"])
        obsm = {k: anndata.io.read_elem(g["obsm"][k]) for k in g["obsm"].keys()} if "obsm" in g else {}
        x = g["X"]
    except Exception as e:
        raise FeatureError(f"{where}: not a readable AnnData table ({type(e).__name__}: "
                           f"{' '.join(str(e).split())[:120]})", store) from None
    if not isinstance(x, zarr.Array):
        raise FeatureError(f"{where}: its X is sparse or not an array (slidekit reads dense features)", store)
    if x.ndim != 2 or x.dtype.kind not in "fiu":
        raise FeatureError(f"{where}: its X has shape {x.shape} and dtype {x.dtype}, not (N, D) numbers", store)
    if int(x.shape[0]) != len(obs):
        raise FeatureError(f"{where}: its X has {x.shape[0]} rows but obs has {len(obs)}", store)
    return obs, obsm, x


def _shapes(store: Path, element: str, missing: str) -> tuple[Any, np.ndarray]:
    """(GeoDataFrame, its ``global`` affine) of the shapes element ``element``; FeatureError naming the
    store and the element (``missing``: what to say when the store does not hold it)."""
    import geopandas as gpd

    path = store / "shapes" / element
    where = f"shapes '{element}'"
    if not path.is_dir():
        raise FeatureError(missing, store)
    m = _to_global(path, where, store)
    files = sorted(path.glob("*.parquet"))
    if not files:
        raise FeatureError(f"{where}: no shapes.parquet in {path.name}", store)
    try:
        return gpd.read_parquet(files[0]), m
    except Exception as e:
        raise FeatureError(f"{where}: cannot be read ({type(e).__name__}: {' '.join(str(e).split())[:120]})",
                           store) from None


def _boxes(store: Path, region: str, table_where: str) -> tuple[Any, np.ndarray]:
    """(shapes index, (M, 4) level-0 bounds) of the shapes element ``region``."""
    gdf, m = _shapes(store, region, f"{table_where} annotates shapes '{region}', which the store does not hold")
    b = np.asarray(gdf.geometry.bounds.to_numpy(), dtype=float)
    x0, x1 = b[:, 0] * m[0, 0] + m[0, 2], b[:, 2] * m[0, 0] + m[0, 2]
    y0, y1 = b[:, 1] * m[1, 1] + m[1, 2], b[:, 3] * m[1, 1] + m[1, 2]
    return gdf.index, np.stack([np.minimum(x0, x1), np.minimum(y0, y1), np.maximum(x0, x1), np.maximum(y0, y1)], 1)


def open_store_bag(path: str | os.PathLike, *, read: bool = True) -> StoreBag:
    """One feature table of a SpatialData store (``STORE`` or ``STORE/tables/NAME``) as a bag:
    its level-0 tile corners and side, and (``read``) its features as float32.

    Parameters
    ----------
    path : str or PathLike
        The store, or the path of one of its tables.
    read : bool
        Read the features too (False: only what describes them; ``iter_store_chunks`` streams them).

    Returns
    -------
    StoreBag

    Raises
    ------
    FeatureError
        One line naming the store and the element that cannot be read as a bag.
    """
    split = split_store_path(path)
    if split is None:
        raise FeatureError("not a SpatialData store (a .zarr folder with tables)", path)
    store, table = split
    attrs = _store_attrs(store)
    table = table or _pick_table(store, attrs)
    where = f"table '{table}'"
    table_path = store / "tables" / table
    if not _zarr_group(table_path):
        raise FeatureError(f"has no {where}; its tables: {_tables(store) or 'none'}", store)
    tattrs = _attrs(table_path)
    region, region_key, instance_key = (tattrs.get(k) for k in ("region", "region_key", "instance_key"))
    if isinstance(region, list):
        if len(region) != 1:
            raise FeatureError(f"{where} annotates {len(region)} elements ({', '.join(map(str, region))}), not one "
                               "set of tiles", store)
        region = region[0]
    if not region or not instance_key:
        raise FeatureError(f"{where} annotates no shapes (no region / instance_key: not a SpatialData table of "
                           "tiles)", store)
    obs, obsm, x = _read_obs(table_path, where, store)
    if instance_key not in obs.columns:
        raise FeatureError(f"{where}: obs has no '{instance_key}' column (its instance key)", store)
    if region_key and region_key in obs.columns and not (obs[region_key].astype(str) == str(region)).all():
        raise FeatureError(f"{where}: rows of other regions than '{region}' in '{region_key}'", store)
    index, bounds = _boxes(store, str(region), where)
    pos = np.asarray(index.get_indexer(obs[instance_key].to_numpy()))
    if (pos < 0).any():
        raise FeatureError(f"{where}: {int((pos < 0).sum())} of its {len(pos)} rows have no tile in shapes "
                           f"'{region}' ({len(index)} tiles): mismatched lengths or ids", store)
    b = bounds[pos]
    corners = b[:, :2]
    if len(b) and (not np.all(np.isfinite(b)) or np.abs(corners - np.rint(corners)).max() > 1e-6):
        raise FeatureError(f"shapes '{region}': tile corners are not whole level-0 pixels", store)
    sides = np.rint(np.maximum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1])).astype(np.int64) if len(b) else np.zeros(0)
    spec = (attrs.get("tile_spec") or {}).get(str(region)) or {}
    side = int(round(float(spec["height"]) * float(spec.get("base_downsample", 1.0)))) if "height" in spec else 0
    if len(sides) and not side:
        side = int(np.median(sides))
    record = attrs.get(SLIDEKIT_ATTR) or {}
    encoder = dict((record.get("features") or {}).get(table) or {})
    if not encoder:
        suffix = f"_{region}" if table.endswith(f"_{region}") else "_embeddings"
        encoder = {"name": table[: -len(suffix)] if table.endswith(suffix) else table}
    slide_record = dict(record.get("slide") or {})
    source = "sopa" if table.endswith("_embeddings") and "spatial" in obsm else "wsidata"
    bag = StoreBag(store, table, np.rint(corners).astype(np.int64).reshape(-1, 2), side, int(x.shape[1]), encoder,
                   slide_record.get("name") or store.stem, source, slide_record)
    if read:
        bag.features = _finite(np.asarray(x[:], dtype=np.float32), 0, where, store)
    return bag


def _finite(x: np.ndarray, begin: int, where: str, store: Path) -> np.ndarray:
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        rows = np.nonzero(bad)[0] + begin
        raise FeatureError(f"{where}: {int(bad.sum())} feature rows are not finite (first: row {int(rows[0])})",
                           store)
    return x


def iter_store_chunks(path: str | os.PathLike, rows: int = 65536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (features (n, D) float32, coords (n, 2) int64) of at most ``rows`` rows of a store's
    feature table at a time (the same checks as ``open_store_bag``)."""
    import zarr

    bag = open_store_bag(path, read=False)
    x = zarr.open_array(str(bag.path / "X"), mode="r")
    where = f"table '{bag.table}'"
    for begin in range(0, int(x.shape[0]), rows):
        chunk = _finite(np.asarray(x[begin:begin + rows], dtype=np.float32), begin, where, bag.store)
        yield chunk, bag.coords[begin:begin + rows]


# -- shapes for the viewer ----------------------------------------------------------------------------

def shape_elements(store: str | os.PathLike) -> list[str]:
    """The shapes of a store a slide viewer draws: ``tissues`` and the tile sets its ``tile_spec``
    names (cells and other shapes are left out: too many objects for a GeoJSON overlay)."""
    store = Path(store)
    specs = _store_attrs(store).get("tile_spec") or {}
    return [k for k in ("tissues", *sorted(specs)) if (store / "shapes" / k).is_dir()]


def shapes_geojson(store: str | os.PathLike, element: str) -> bytes:
    """A shapes element of a store as a GeoJSON FeatureCollection in level-0 pixels (its ``global``
    system): QuPath-style objects (``annotation`` for tissues, ``tile`` for tiles) classed by the
    element's name. FeatureError naming the store and the element when it cannot be read."""
    import shapely

    store = Path(store)
    gdf, m = _shapes(store, element, f"has no shapes '{element}'")
    geoms = shapely.transform(gdf.geometry.to_numpy(), lambda xy: xy * [m[0, 0], m[1, 1]] + [m[0, 2], m[1, 2]])
    kind = "annotation" if element == "tissues" else "tile"
    props = json.dumps({"objectType": kind, "classification": {"name": element}})
    parts = [f'{{"type":"Feature","geometry":{g},"properties":{props}}}' for g in shapely.to_geojson(geoms)]
    return ('{"type":"FeatureCollection","features":[' + ",".join(parts) + "]}").encode()
