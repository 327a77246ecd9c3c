"""What the viewer lays over a slide: the heatmap as a transparent PNG with its place on the slide
and its legend, and the GeoJSON object files of an output folder.

The PNG is coloured as ``Heatmap.overlay`` colours the overview (jet for one class, transparent at
the lowest values and fading in: ``infer.heatmap.value_alpha``; class colours by argmax for several,
background uncoloured) but carries the strength in its alpha channel and no slide, so the page's
opacity slider blends it over the tiles. The legend is ``slidekit.infer.legend.legend_info`` plus
the colour ramp as CSS colours.
"""
from __future__ import annotations

import io
import math
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from slidekit.infer.heatmap import Heatmap, value_alpha
from slidekit.infer.legend import legend_info
from slidekit.regions.qc import ARTEFACTS
from slidekit.regions.qc_zarr import read_label_zarr

GEOJSON_SUFFIXES = (".geojson", ".geojson.gz")
QC_LABELS = "qc_labels.zarr"  # a `slidekit qc` folder's label map: its artefact classes are the overlay
MAX_OVERLAY_SIZE = 2048  # px on the longer side of the overlay PNG


def geojson_files(folder: Path) -> list[Path]:
    """The GeoJSON object files directly in ``folder`` (``.geojson`` and ``.geojson.gz``), by name.
    Links are followed only by the server's path check (``ServedRoot.resolve``)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(GEOJSON_SUFFIXES))


def _jet(values: np.ndarray) -> np.ndarray:
    """RGB of jet for values in [0, 1] (any shape -> shape + (3,))."""
    v = np.rint(np.clip(values, 0, 1) * 255).astype(np.uint8)
    return cv2.applyColorMap(v.reshape(-1, 1), cv2.COLORMAP_JET)[:, 0, ::-1].reshape(*values.shape, 3)


def render_overlay(hm: Heatmap, slide_name: str, max_size: int = MAX_OVERLAY_SIZE) -> tuple[bytes, dict]:
    """(RGBA PNG bytes, meta) of a heatmap. ``meta["place"]``: ``factor`` (heatmap px per PNG px) and
    ``x``, ``y``, ``width``, ``height`` of the PNG in level-0 pixels; ``meta["legend"]``: ``overlay_legend``."""
    H, W = hm.shape
    factor = max(1, math.ceil(max(H, W) / max_size))
    vals, cov = hm.view(factor)
    covered = cov > 0
    if vals.shape[0] == 1:
        v = np.clip(vals[0], 0, 1)
        rgb = _jet(v)
        alpha = covered * value_alpha(v)  # low values fade into the slide, as in overlay.png
    else:
        palette = np.array(hm.colors or [(255, 0, 0)] * len(vals), np.uint8)
        lab = vals.argmax(0)
        rgb = palette[lab % len(palette)]
        alpha = vals.max(0) * covered * (lab != 0)  # class 0 is background
    rgba = np.dstack([rgb, np.rint(np.clip(alpha, 0, 1) * 255).astype(np.uint8)])
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgba), "RGBA").save(buf, format="PNG")
    (sx, sy), (ox, oy) = hm.scale, hm.origin
    h, w = rgba.shape[:2]
    place = {"factor": factor, "x": float(ox), "y": float(oy), "width": float(w * factor * sx),
             "height": float(h * factor * sy), "png_size": [w, h]}
    return buf.getvalue(), {"place": place, "legend": overlay_legend(hm, slide_name, place, vals, cov)}


def overlay_legend(hm: Heatmap, slide_name: str, place: dict, vals: np.ndarray, cov: np.ndarray) -> dict:
    """The legend of the overlay: ``legend_info`` (kind, label/classes, range) with the observed
    range of one-class maps and ``ramp``, the colour bar's CSS colours (low to high); ``vals``,
    ``cov``: the heatmap view the PNG was made of."""
    w = place["png_size"][0]
    info = legend_info(hm, slide_name, hm.mpp * place["factor"], w, (0.0, 1.0))
    if info["kind"] == "colorbar":
        seen = vals[:, cov > 0]
        if seen.size:
            info["observed"] = [round(float(seen.min()), 4), round(float(seen.max()), 4)]
        info["ramp"] = ["#%02x%02x%02x" % tuple(int(c) for c in rgb) for rgb in _jet(np.linspace(0, 1, 11))]
    else:
        for c in info["classes"]:
            c["css"] = "#%02x%02x%02x" % tuple(c["color"][:3])
    info["classes_all"] = hm.classes
    info["task"] = hm.task
    info["heatmap_mpp"] = hm.mpp
    return info


def render_qc_overlay(store: Path, slide_mpp: tuple[float, float],
                      max_size: int = MAX_OVERLAY_SIZE) -> tuple[bytes, dict]:
    """(RGBA PNG bytes, meta) of a QC label map (``qc_labels.zarr``): each artefact class in its QuPath
    colour, opaque; glass and clean tissue transparent. ``meta`` as :func:`render_overlay`'s (``place``
    in level-0 pixels of a slide at ``slide_mpp``; ``legend`` of kind ``classes``)."""
    labels, attrs = read_label_zarr(store)
    mpp, legend = float(attrs["mpp"]), attrs["labels"]
    factor = max(1, math.ceil(max(labels.shape) / max_size))
    view = labels[::factor, ::factor]  # classes: nearest, never a mean
    rgba = np.zeros((*view.shape, 4), np.uint8)
    for name in ARTEFACTS:
        if name in legend:
            on = view == int(legend[name]["value"])
            rgba[on] = [*legend[name]["color"][:3], 255]
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG")
    h, w = view.shape
    sx, sy = mpp * factor / slide_mpp[0], mpp * factor / slide_mpp[1]
    place = {"factor": factor, "x": 0.0, "y": 0.0, "width": float(w * sx), "height": float(h * sy),
             "png_size": [w, h]}
    classes = [{"name": n, "color": list(legend[n]["color"][:3]),
                "css": "#%02x%02x%02x" % tuple(int(c) for c in legend[n]["color"][:3])}
               for n in ARTEFACTS if n in legend]
    info = {"kind": "classes", "label": "slide QC", "classes": classes, "uncoloured": "glass and clean tissue",
            "classes_all": list(legend), "task": "qc", "heatmap_mpp": mpp * factor}
    return buf.getvalue(), {"place": place, "legend": info}
