"""The QC label map as zarr: ``write_label_zarr``/``read_label_zarr`` (one uint8 array, its legend and
pixel size in the attributes) and ``write_label_ome_zarr`` (an NGFF 0.4 multiscale *label* image in µm,
for napari, vizarr or QuPath's OME-Zarr reader).

A label map is classes, not values: its smaller levels take every other pixel (nearest), never a
mean, and the NGFF ``image-label`` metadata names and colours each value. Both stores are written
under a temporary name and renamed when complete (``base.io.atomic_path``). The label map is the
coarse QC raster (8 µm/px: 3,000 px across a 25 mm slide), so it is written whole.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from slidekit.base.io import atomic_path

NGFF_VERSION = "0.4"
CHUNK = 1024


def write_label_zarr(labels: np.ndarray, path: str | os.PathLike, *, attrs: dict[str, Any]) -> Path:
    """Write ``labels`` (2-D uint8) as a zarr array at ``path`` with ``attrs``; atomic."""
    path = Path(path)
    with atomic_path(path) as tmp:
        h, w = labels.shape
        arr = zarr.create_array(str(tmp), shape=(h, w), chunks=(min(CHUNK, h), min(CHUNK, w)), dtype="uint8",
                                fill_value=0)
        arr[:] = labels
        arr.attrs.update(attrs)
    return path


def read_label_zarr(path: str | os.PathLike) -> tuple[np.ndarray, dict]:
    """The label array and attributes of a store ``write_label_zarr`` wrote.

    Raises OSError when there is no store at ``path``, ValueError when it is not a 2-D uint8 array."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no zarr store at {path}")
    try:
        arr = zarr.open_array(str(path), mode="r")
    except Exception as e:  # zarr raises several kinds for a store that is not an array
        raise ValueError(f"not a zarr array ({type(e).__name__})") from None
    if arr.ndim != 2 or arr.dtype != np.uint8:
        raise ValueError(f"not a 2-D uint8 label map (shape {arr.shape}, {arr.dtype})")
    return np.asarray(arr[:]), dict(arr.attrs)


def write_label_ome_zarr(labels: np.ndarray, path: str | os.PathLike, mpp: float, legend: dict[str, dict], *,
                         name: str = "slidekit labels", min_size: int = 256) -> Path:
    """Write ``labels`` (2-D uint8 at ``mpp`` µm/px, pixel (0, 0) at the slide's corner) as an NGFF 0.4
    multiscale label image; atomic.

    Parameters
    ----------
    labels
        The label map.
    path
        The store to write (``*.ome.zarr``).
    mpp
        µm per label pixel.
    legend
        Class name -> {"value": int, "color": [r, g, b]}: the ``image-label`` colours and properties.
    name
        The image's name.
    min_size
        Levels are halved while the next one's longer side is at least this.
    """
    if mpp <= 0:
        raise ValueError(f"pixel size must be positive, not {mpp}")
    path = Path(path)
    levels = [np.ascontiguousarray(labels, dtype=np.uint8)]
    while max(levels[-1].shape) // 2 >= min_size:
        levels.append(np.ascontiguousarray(levels[-1][::2, ::2]))  # nearest: a class, never a mean
    with atomic_path(path) as tmp:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=2)
        datasets = []
        for i, level in enumerate(levels):
            h, w = level.shape
            arr = root.create_array(str(i), shape=(h, w), chunks=(min(CHUNK, h), min(CHUNK, w)), dtype="uint8",
                                    fill_value=0)
            arr[:] = level
            ds = 2.0 ** i
            datasets.append({"path": str(i), "coordinateTransformations": [
                {"type": "scale", "scale": [mpp * ds, mpp * ds]}]})
        meta: dict[str, Any] = {
            "multiscales": [{
                "version": NGFF_VERSION, "name": name,
                "axes": [{"name": "y", "type": "space", "unit": "micrometer"},
                         {"name": "x", "type": "space", "unit": "micrometer"}],
                "datasets": datasets, "type": "nearest",
                "metadata": {"method": "every other pixel (labels are classes: no averaging)"},
            }],
            "image-label": {
                "version": NGFF_VERSION,
                "colors": [{"label-value": int(c["value"]), "rgba": [*map(int, c["color"][:3]), 255]}
                           for c in legend.values()],
                "properties": [{"label-value": int(c["value"]), "class": n} for n, c in legend.items()],
            },
            "labels": {n: c for n, c in legend.items()},
        }
        root.attrs.update(meta)
    return path
