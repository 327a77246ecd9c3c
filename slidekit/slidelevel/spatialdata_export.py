"""slidekit's per-slide results as a SpatialData store that wsidata, LazySlide and sopa open.

``export_spatialdata(out_dir, store)`` reads what slidekit wrote in one slide's output folder and
writes one SpatialData zarr store (``wsidata.open_wsi(slide, store=...)`` opens it unchanged; a
store named ``<slide stem>.zarr`` beside the slide is found without ``store=``):

- ``tissue.geojson`` -> shapes ``tissues`` (``tissue_id``; wsidata's ``tissues``);
- ``features.h5`` coords -> shapes ``tiles`` (level-0 boxes; ``tile_id``, ``x``, ``y``, ``tissue_id``)
  and attrs ``tile_spec["tiles"]``; its features -> table ``{model}_tiles`` (obs ``tile_id``,
  categorical ``library_id``), wsidata's ``{feature_key}_{tile_key}``;
- ``cells.csv`` -> shapes ``cells`` (circles of the nucleus area, index ``cell_id``) and table
  ``cells_table`` (measurements; obs ``cell_id``, ``region``, ``slide``; obsm ``spatial``), as sopa's;
- ``heatmap.zarr`` / ``attention.zarr`` -> images ``heatmap`` / ``attention`` (classes as channels);
- ``qc_labels.zarr`` (the folder's own, or its ``qc/`` from ``--exclude-qc auto``; checked to be a QC of
  the same slide file) -> labels ``qc_labels`` (+ attrs ``qc_classes``: the legend).

Coordinate systems: ``global`` is level-0 pixels (wsidata's convention), ``microns`` the same
place in micrometres (a ``Scale`` by the slide's µm/px); maps carry their own scale and origin. The
store's attributes hold wsidata's ``slide_properties`` and ``tile_spec`` and slidekit's own record
(``slidekit``: format, slide name and fingerprint, each feature table's encoder identity), so
``read_features(STORE)`` hands the same provenance to ``train mil`` and ``mil-deploy`` as the HDF5
file does.

Memory: features go from HDF5 to zarr chunk by chunk (dask over the HDF5 dataset, one chunk at a
time); heatmaps chunk by chunk from their zarr; the cells' shapes row group by row group from
``cells.csv``, after everything else, and their table last. What SpatialData holds in memory is the
tiles' boxes and the tables' obs (``benchmarks/spatialdata_export.py`` measures it).
The store is written beside its final path and renamed into place (``base.io.atomic_path``).

Imports: spatialdata at module level (the CLI loads this module inside the command); the stages
below for reading slides, annotations and heatmaps.
"""
from __future__ import annotations

import csv
import json
import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, fields as dataclass_fields, replace
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import spatialdata

from slidekit.annotations.formats import read_annotations
from slidekit.base.errors import ConfigError, FeatureError, HeatmapError, SlideError, SlidekitError
from slidekit.base.io import atomic_path
from slidekit.base.outputs import MARKER, OutputDir, claim_path
from slidekit.base.version import __version__
from slidekit.infer.heatmap import Heatmap
from slidekit.regions.options import ReadOptions
from slidekit.regions.qc import read_qc_labels
from slidekit.regions.qc_zarr import read_label_zarr
from slidekit.slidelevel.feature_store import check_features_for_slide, feature_info
from slidekit.slidelevel.spatialdata_read import SLIDEKIT_ATTR, STORE_FORMAT
from slidekit.slides.identity import same_slide, slide_fingerprint
from slidekit.slides.slide import open_slide

MEASUREMENTS = ("area_um2", "perimeter_um", "circularity", "solidity", "eccentricity", "hematoxylin_od", "eosin_od")
MAPS = {"heatmap": "heatmap.zarr", "attention": "attention.zarr"}
CELL_ROWS = 65536  # cells.csv is read this many rows at a time


def _model_name(encoder: dict) -> str:
    """The ``{model}`` of a feature table's name: the registry name, else the encoder's, made safe."""
    raw = str(encoder.get("registry") or encoder.get("name") or "features")
    name = re.sub(r"[^A-Za-z0-9.-]+", "-", raw.removeprefix("timm:")).strip("-").lower()
    return name or "features"


def _slide_of(folder: Path, slide: str | os.PathLike | None) -> Path:
    if slide is not None:
        return Path(slide)
    for name, key in ((MARKER, "slide"), ("summary.json", "slide")):
        try:
            recorded = json.loads((folder / name).read_text()).get(key)
        except (OSError, ValueError, AttributeError):
            continue
        # as recorded (relative to where the command ran), else beside the folder or its cohort folder;
        # the folder's recorded fingerprint is checked against the slide found (OutputDir)
        for candidate in ((Path(recorded), folder.parent / recorded, folder.parent.parent / recorded)
                          if recorded else ()):
            if candidate.exists():
                return candidate
    raise ConfigError("records no slide that exists here (pass slide= / --slide)", folder)


def _transforms(mpp: float, scale: tuple[float, float] = (1.0, 1.0),
                origin: tuple[float, float] = (0.0, 0.0)) -> dict:
    """``global`` (level-0 pixels) and ``microns`` for an element whose intrinsic pixel is ``scale``
    level-0 pixels, its (0, 0) at level-0 ``origin``."""
    from spatialdata.transformations import Identity, Scale, Sequence, Translation

    if scale == (1.0, 1.0) and origin == (0.0, 0.0):
        to_l0: Any = Identity()
    else:
        to_l0 = Sequence([Scale(list(scale), axes=("x", "y")), Translation(list(origin), axes=("x", "y"))])
    micro = Scale([mpp, mpp], axes=("x", "y"))
    return {"global": to_l0, "microns": micro if isinstance(to_l0, Identity) else Sequence([to_l0, micro])}


def tile_spec(patch_size: int, side_level0: int, tile_mpp: float | None, overlap: int = 0,
              tissue_name: str | None = "tissues") -> dict:
    """wsidata's ``TileSpec`` (as its ``to_dict``) of a slidekit grid: tiles ``patch_size`` pixels at
    ``tile_mpp``, ``side_level0`` level-0 pixels, read at level 0 and resized (``ops_level`` 0)."""
    size = max(1, int(patch_size))
    down = side_level0 / size
    while int(size * down) < side_level0:  # wsidata's base size is int(size * down): never one short
        down = float(np.nextafter(down, np.inf))
    stride = size - int(overlap)
    return {"height": size, "width": size, "stride_height": stride, "stride_width": stride,
            "mpp": None if tile_mpp is None else float(tile_mpp), "ops_level": 0, "ops_downsample": down,
            "base_level": 0, "base_downsample": down, "tissue_name": tissue_name}


def _tissues(folder: Path, mpp: float):
    import geopandas as gpd
    from shapely.geometry import MultiPolygon, Polygon
    from spatialdata.models import ShapesModel

    path = folder / "tissue.geojson"
    if not path.is_file():
        return None
    polys: list[Any] = []
    for a in read_annotations(path):
        g = a.geometry
        polys.extend(g.geoms if isinstance(g, MultiPolygon) else [g] if isinstance(g, Polygon) else [])
    if not polys:
        return None
    gdf = gpd.GeoDataFrame({"tissue_id": np.arange(len(polys), dtype=np.int64)}, geometry=polys)
    return ShapesModel.parse(gdf, transformations=_transforms(mpp))


def _tiles(coords: np.ndarray, side: int, tissues, mpp: float):
    import geopandas as gpd
    import shapely
    from spatialdata.models import ShapesModel

    x, y = coords[:, 0], coords[:, 1]
    tissue_id = np.full(len(coords), -1, np.int64)
    if tissues is not None and len(coords):
        tree = shapely.STRtree(tissues.geometry.values)
        centres = shapely.points(x + side / 2, y + side / 2)
        hit_point, hit_tissue = tree.query(centres, predicate="intersects")
        tissue_id[hit_point[::-1]] = tissues["tissue_id"].to_numpy()[hit_tissue[::-1]]  # the first tissue wins
    gdf = gpd.GeoDataFrame({"tile_id": np.arange(len(coords), dtype=np.int64), "x": x, "y": y,
                            "tissue_id": tissue_id}, geometry=shapely.box(x, y, x + side, y + side))
    return ShapesModel.parse(gdf, transformations=_transforms(mpp))


def _feature_table(h5: Path, tile_key: str, chunk_rows: int):
    import anndata
    import dask.array as da
    import pandas as pd
    from spatialdata.models import TableModel

    f = h5py.File(h5, "r")  # kept open while the store is written (dask reads chunks from it)
    ds = f["features"]
    n, dim = (int(v) for v in ds.shape)
    x = da.from_array(ds, chunks=(max(1, min(chunk_rows, n)), dim), lock=True, asarray=True)
    ids = np.arange(n, dtype=np.int64)
    obs = pd.DataFrame({"tile_id": ids, "library_id": pd.Categorical([tile_key] * n)}, index=ids.astype(str))
    table = anndata.AnnData(X=x, obs=obs, var=pd.DataFrame(index=[str(i) for i in range(dim)]))
    return TableModel.parse(table, region=tile_key, region_key="library_id", instance_key="tile_id"), f


def _cell_rows(path: Path) -> Iterator[Any]:
    import pandas as pd

    dtypes = {"id": "int64", "x": "float64", "y": "float64", **{m: "float32" for m in MEASUREMENTS}}
    try:
        header = pd.read_csv(path, nrows=0).columns
        missing = [c for c in dtypes if c not in header]
        if missing:
            raise ConfigError(f"has no column {missing[0]!r}: not slidekit's cells table", path)
        # the nucleus class and (cells --exclude-qc) the QC class under it, when the table has them
        labels = [c for c in ("class", "qc") if c in header]
        yield from pd.read_csv(path, usecols=[*dtypes, *labels], dtype={**dtypes, **dict.fromkeys(labels, str)},
                               keep_default_na=False, na_values=dict.fromkeys(dtypes, ["", "nan", "NaN"]),
                               chunksize=CELL_ROWS)
    except (ValueError, pd.errors.ParserError) as e:
        raise ConfigError(f"not a readable cells table ({' '.join(str(e).split())[:120]})", path) from None


def _has_cells(path: Path) -> bool:
    """Whether ``path`` is a cells table with at least one cell (ConfigError for another table)."""
    if not path.is_file():
        return False
    return any(len(chunk) for chunk in _cell_rows(path))


def _cell_arrays(folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray]] | None:
    """(ids, level-0 centroids, measurements, label columns) of ``cells.csv``, read in row chunks (the
    needed columns only, as arrays); the label columns are ``class`` and ``qc`` where the table has them."""
    path = folder / "cells.csv"
    if not path.is_file():
        return None
    ids, xy, meas = [], [], []
    labels: dict[str, list] = {}
    for chunk in _cell_rows(path):
        ids.append(chunk["id"].to_numpy(np.int64))
        xy.append(chunk[["x", "y"]].to_numpy(np.float64))
        meas.append(chunk[list(MEASUREMENTS)].to_numpy(np.float32))
        for c in ("class", "qc"):
            if c in chunk.columns:
                labels.setdefault(c, []).append(chunk[c].astype(str).to_numpy())
    if not ids:
        return None
    return (np.concatenate(ids), np.concatenate(xy), np.concatenate(meas),
            {c: np.concatenate(v) for c, v in labels.items()})


def _circles(chunk: Any, mpp: float):
    """A GeoDataFrame of circles of one chunk of ``cells.csv``: the centroid, with the radius of the
    nucleus area (level-0 pixels), indexed by cell id."""
    import geopandas as gpd
    import pandas as pd

    radius = np.sqrt(np.maximum(chunk["area_um2"].to_numpy(np.float64), 0) / np.pi) / mpp
    return gpd.GeoDataFrame({"radius": radius}, geometry=gpd.points_from_xy(chunk["x"], chunk["y"]),
                            index=pd.Index(chunk["id"].to_numpy(np.int64), name="cell_id"))


def _write_cell_shapes(sdata, store: Path, csv_path: Path, mpp: float) -> None:
    """The ``cells`` shapes element, streamed: spatialdata writes the element from the first cell
    (its metadata and transformations), then its ``shapes.parquet`` is rewritten row group by row
    group from ``cells.csv``, so no GeoDataFrame of all cells is ever in memory."""
    import pyarrow.parquet as pq
    from geopandas.io.arrow import _geopandas_to_arrow
    from spatialdata.models import ShapesModel

    rows = _cell_rows(csv_path)
    first = next(rows)
    sdata.shapes["cells"] = ShapesModel.parse(_circles(first.iloc[:1], mpp), transformations=_transforms(mpp))
    sdata.write_element("cells")
    del sdata.shapes["cells"]
    target = store / "shapes" / "cells" / "shapes.parquet"
    partial = target.with_name("shapes.parquet.partial")
    writer = None
    try:
        for chunk in _chain(first, rows):
            table = _geopandas_to_arrow(_circles(chunk, mpp), geometry_encoding="WKB")
            if writer is None:
                meta = dict(table.schema.metadata or {})
                geo = json.loads(meta[b"geo"])
                for column in geo.get("columns", {}).values():
                    column.pop("bbox", None)  # the first chunk's: optional in GeoParquet, left out
                meta[b"geo"] = json.dumps(geo).encode()
                schema = table.schema.with_metadata(meta)
                writer = pq.ParquetWriter(partial, schema)
            writer.write_table(table.cast(schema))
    finally:
        if writer is not None:
            writer.close()
    os.replace(partial, target)


def _chain(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
    yield first
    yield from rest


def _cell_table(folder: Path, slide_name: str):
    """The measurements of ``cells.csv`` as an AnnData table annotating the ``cells`` shapes (sopa's columns)."""
    import anndata
    import pandas as pd
    from spatialdata.models import TableModel

    cells = _cell_arrays(folder)
    if cells is None:
        raise ConfigError("holds no cells", folder / "cells.csv")
    cid, pts, m, labels = cells
    n = len(cid)
    obs = pd.DataFrame({"cell_id": cid, "region": pd.Categorical.from_codes(np.zeros(n, np.int8), ["cells"]),
                        "slide": pd.Categorical.from_codes(np.zeros(n, np.int8), [slide_name])},
                       index=cid.astype(str))
    for column, values in labels.items():  # ``class``; ``qc``: the QC class under the nucleus ("" where clean)
        obs[column] = pd.Categorical(values)
    table = anndata.AnnData(X=m, obs=obs, var=pd.DataFrame(index=list(MEASUREMENTS)), obsm={"spatial": pts})
    return TableModel.parse(table, region="cells", region_key="region", instance_key="cell_id")


def _map_image(path: Path, mpp: float, slide_path: Path):
    import dask.array as da
    from spatialdata.models import Image2DModel

    hm = Heatmap(path)
    recorded = (hm.attrs.get("slide") or {}).get("id")
    if recorded and not same_slide(str(recorded), slide_path):
        raise HeatmapError(f"a map of slide {(hm.attrs.get('slide') or {}).get('name')!r}, not of {slide_path}", path)
    prob = da.from_zarr(hm._array("prob"))
    (sx, sy), (ox, oy) = hm.scale, hm.origin
    classes = [str(c) for c in (hm.classes or [])] or [f"channel {i}" for i in range(prob.shape[0])]
    return Image2DModel.parse(prob, dims=("c", "y", "x"), c_coords=classes,
                              transformations=_transforms(mpp, (float(sx), float(sy)), (float(ox), float(oy))))


def _qc_labels(folder: Path, slide: Path, slide_mpp: tuple[float, float]) -> tuple[Any, Any, str | None]:
    """The QC label map of the folder (a `slidekit qc` folder itself, or its ``qc/`` from ``--exclude-qc
    auto``) as a labels element, its legend and its source; checked to be a QC of the ``slide`` file."""
    from spatialdata.models import Labels2DModel

    for qc_dir in (folder, folder / "qc"):
        if (qc_dir / "qc_labels.zarr").is_dir():
            labels, qc_mpp = read_qc_labels(qc_dir, slide)
            _, zattrs = read_label_zarr(qc_dir / "qc_labels.zarr")
            scale = (qc_mpp / float(slide_mpp[0]), qc_mpp / float(slide_mpp[1]))
            element = Labels2DModel.parse(labels, dims=("y", "x"),
                                          transformations=_transforms(float(slide_mpp[0]), scale))
            return element, zattrs.get("labels"), (qc_dir / "qc_labels.zarr").relative_to(folder).as_posix()
    return None, None, None


def _slide_properties(slide) -> dict:
    w, h = slide.dimensions
    mpp = float(slide.mpp[0])
    return {"shape": [int(h), int(w)], "n_level": len(slide.level_dimensions),
            "level_shape": [[int(lh), int(lw)] for lw, lh in slide.level_dimensions],
            "level_downsample": [float(d) for d in slide.level_downsamples], "mpp": mpp,
            "magnification": round(10.0 / mpp, 3), "bounds": [0, 0, int(w), int(h)], "scene": 0, "n_scenes": 1,
            "scene_names": ["Image 0"], "raw": None}


def _is_ours(store: Path) -> bool:
    try:
        attrs = json.loads((store / "zarr.json").read_text()).get("attributes") or {}
        return (attrs.get(SLIDEKIT_ATTR) or {}).get("format") == STORE_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


@dataclass(frozen=True)
class SpatialDataOptions:
    """What ``export_spatialdata`` writes.

    Parameters
    ----------
    model
        The ``{model}`` of the feature table's name ``{model}_{tile_key}`` (None: the encoder's name).
    tile_key
        The tiles' shapes element (wsidata's ``tile_key``).
    cells, maps
        Also export the cells, and the heatmap / attention / QC maps, when the folder has them.
    chunk_rows
        Feature rows copied at a time.
    """

    model: str | None = None
    tile_key: str = "tiles"
    cells: bool = True
    maps: bool = True
    chunk_rows: int = 1024


def export_spatialdata(out_dir: str | os.PathLike, store: str | os.PathLike | None = None, *,
                       slide: str | os.PathLike | None = None, options: SpatialDataOptions | None = None,
                       reading: ReadOptions | None = None, **fields: Any) -> Path:
    """Write one slide's slidekit results as a SpatialData store that ``wsidata.open_wsi`` opens.

    Parameters
    ----------
    out_dir : str or PathLike
        The slide's slidekit output folder: any of ``features.h5`` (``embed``), ``tissue.geojson``
        (``tissue``), ``cells.csv`` (``cells``), ``heatmap.zarr`` (``heatmap``), ``attention.zarr``
        (``mil-attention``), ``qc_labels.zarr`` (``qc``, here or in ``qc/``).
    store : str or PathLike, optional
        The store to write (a ``.zarr`` folder; None: ``out_dir/<slide stem>.zarr``). A store named
        ``<slide stem>.zarr`` beside the slide is what ``wsidata.open_wsi(slide)`` finds by itself.
    slide : str or PathLike, optional
        The slide (None: the one the folder records). Its size and µm/px go into the store, and
        the feature file's slide fingerprint is checked against it.
    options : SpatialDataOptions, optional
        What to write (table names, which elements).
    reading : ReadOptions, optional
        How the slide is opened (µm/px fallback or override, reader).
    **fields
        Single ``SpatialDataOptions`` fields by name (``model="uni"``).

    Returns
    -------
    Path
        The store written.

    Raises
    ------
    ConfigError
        The folder holds nothing to export, or records no slide that exists; an unknown field.
    FeatureError, HeatmapError, AnnotationError, SlideError
        An input that cannot be read, or features of another slide; nothing is written.
    OutputError
        ``store`` exists and is not a store slidekit wrote.
    """
    known = {f.name for f in dataclass_fields(SpatialDataOptions)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ConfigError(f"unknown export option {unknown[0]!r} (known: {', '.join(sorted(known))})")
    o = replace(options or SpatialDataOptions(), **fields)
    tile_key = o.tile_key
    folder = Path(out_dir)
    if not folder.is_dir():
        raise ConfigError("is not a slidekit output folder", folder)
    slide_path = _slide_of(folder, slide)
    r = reading or ReadOptions()
    with open_slide(slide_path, mpp=r.slide_mpp, override_mpp=r.override_mpp, backend=r.backend) as s:
        if s.mpp is None:
            raise SlideError("has no µm/px: the store's microns system needs one", slide_path)
        mpp, props, name = float(s.mpp[0]), _slide_properties(s), s.name
        dims = (int(s.dimensions[0]), int(s.dimensions[1]))
        slide_mpp = (float(s.mpp[0]), float(s.mpp[1]))
    fingerprint = slide_fingerprint(slide_path)
    stem = Path(name).stem
    target = Path(store) if store is not None else folder / f"{stem}.zarr"
    owner = OutputDir(folder, slide_path, fingerprint)  # a folder of another slide's results is refused here
    if target.resolve().parent == folder.resolve():
        owner.claim(target.name)
    else:
        claim_path(target, _is_ours(target), "a SpatialData store slidekit wrote")

    elements: dict[str, dict[str, Any]] = {"shapes": {}, "tables": {}, "images": {}, "labels": {}}
    attrs: dict[str, Any] = {"slide_properties": props}
    record: dict[str, Any] = {"format": STORE_FORMAT, "version": __version__,
                              "slide": {"name": name, "fingerprint": fingerprint, "dimensions": list(dims),
                                        "mpp": [mpp, mpp]}, "features": {}, "sources": []}
    tissues = _tissues(folder, mpp)
    if tissues is not None:
        elements["shapes"]["tissues"] = tissues
        record["sources"].append("tissue.geojson")
    h5 = folder / "features.h5"
    handle = None
    try:
        if h5.is_file():
            info = feature_info(h5)
            check_features_for_slide(info, slide_path)
            recorded_mpp = (info.slide_record or {}).get("mpp")
            if recorded_mpp and not np.isclose(float(np.ravel(recorded_mpp)[0]), mpp, rtol=1e-3):
                raise FeatureError(f"features made at a slide µm/px of {float(np.ravel(recorded_mpp)[0]):g}; the "
                                   f"slide now reads {mpp:g} µm/px (an --override-mpp on one side only?)", h5)
            if not info.patch_size_level0:
                raise FeatureError("does not say the tile size: tiles cannot be drawn", h5)
            with h5py.File(h5, "r") as f:
                coords = np.asarray(f["coords"][:], dtype=np.int64)
                ca = f["coords"].attrs
                patch = int(ca.get("patch_size", info.patch_size_level0))
                overlap = int(ca.get("overlap", 0))
            tile_mpp = info.encoder.get("mpp")
            spec = tile_spec(patch, info.patch_size_level0, None if tile_mpp is None else float(tile_mpp), overlap,
                             "tissues" if tissues is not None else None)
            elements["shapes"][tile_key] = _tiles(coords, info.patch_size_level0, tissues, mpp)
            attrs["tile_spec"] = {tile_key: spec}
            table_name = f"{o.model or _model_name(info.encoder)}_{tile_key}"
            elements["tables"][table_name], handle = _feature_table(h5, tile_key, o.chunk_rows)
            record["features"][table_name] = dict(info.encoder)
            record["sources"].append("features.h5")
        with_cells = o.cells and _has_cells(folder / "cells.csv")  # its columns checked before anything is written
        if with_cells:
            record["sources"].append("cells.csv")
        if o.maps:
            for key, fname in MAPS.items():
                if (folder / fname).is_dir():
                    elements["images"][key] = _map_image(folder / fname, mpp, slide_path)
                    record["sources"].append(fname)
            qc_labels, qc_legend, qc_source = _qc_labels(folder, slide_path, slide_mpp)
            if qc_labels is not None:
                elements["labels"]["qc_labels"] = qc_labels
                attrs["qc_classes"] = qc_legend
                record["sources"].append(qc_source)
        if not record["sources"]:
            raise ConfigError("holds none of the results export-spatialdata writes (features.h5, tissue.geojson, "
                              "cells.csv, heatmap.zarr, attention.zarr, qc_labels.zarr)", folder)
        attrs[SLIDEKIT_ATTR] = record
        # the cells go in after the rest, one element at a time: their shapes and table (which
        # SpatialData holds in memory) are never in memory with each other or with a feature chunk
        later = [] if not with_cells else [
            lambda sd, tmp: _write_cell_shapes(sd, tmp, folder / "cells.csv", mpp),
            lambda sd, tmp: _write_table(sd, "cells_table", _cell_table(folder, stem))]
        _write(spatialdata.SpatialData(**elements, attrs=attrs), target, later)
    finally:
        if handle is not None:
            handle.close()
    return target


def _write(sdata, target: Path, later: list) -> None:
    """Write ``sdata`` to ``target`` atomically, then run each step of ``later`` (``step(sdata, tmp)``:
    an element made, written and dropped) before the store is renamed into place."""
    import dask

    with atomic_path(target) as tmp, warnings.catch_warnings(), dask.config.set(scheduler="synchronous"):
        warnings.filterwarnings("ignore", message=".*autosharding.*")
        sdata.write(tmp)
        for step in later:
            step(sdata, tmp)


def _write_table(sdata, name: str, table) -> None:
    sdata.tables[name] = table
    sdata.write_element(name)
    del sdata.tables[name]


def export_cohort_spatialdata(cohort: str | os.PathLike, *, store_dir: str | os.PathLike | None = None,
                              **options: Any) -> tuple[list[Path], list[str]]:
    """``export_spatialdata`` for each done slide of a cohort folder (``OUT/cohort.csv``).

    Parameters
    ----------
    cohort : str or PathLike
        The ``--out`` folder of a cohort command (``cohort.csv``, one folder per slide id).
    store_dir : str or PathLike, optional
        Where the stores go, ``<slide stem>.zarr`` each (None: into each slide's folder).
    **options
        ``export_spatialdata``'s keyword options.

    Returns
    -------
    (stores, problems)
        The stores written, and one line for each slide that was not exported and why.
    """
    root = Path(cohort)
    table = root / "cohort.csv"
    if not table.is_file():
        raise ConfigError("no cohort.csv: not the --out folder of a cohort command", root)
    written, problems = [], []
    with open(table, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        sid, status, slide = ((row.get(k) or "").strip() for k in ("id", "status", "slide"))
        if status != "done":
            problems.append(f"{sid}: its row is {status or 'empty'}")
            continue
        store = None if store_dir is None else Path(store_dir) / f"{Path(slide).stem}.zarr"
        try:
            given = slide if slide and Path(slide).exists() else None  # else the one the folder records
            written.append(export_spatialdata(root / sid, store, slide=given, **options))
        except SlidekitError as e:
            problems.append(f"{sid}: {e}")
    return written, problems
