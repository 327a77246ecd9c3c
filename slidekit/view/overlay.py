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

GEOJSON_SUFFIXES = (".geojson", ".geojson.gz")
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
