"""A small real demo slide built from the IHC image that scikit-image ships in its wheel.

``skimage.data.immunohistochemistry()`` is a 512x512 crop of colonic glands (DAB + haematoxylin)
with no known copyright restrictions. The demo places an enlarged, irregularly outlined piece
of it on white glass and writes a tiled JPEG pyramid with MPP metadata, so every command has a
real slide to run on with no download.
"""
from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from slidekit.base.io import atomic_path

DEMO_MPP = 0.5


def demo_image(scale: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """(rgb, tissue) of the demo slide at level 0: tissue on white glass, and where the tissue is."""
    from skimage import data

    ihc = data.immunohistochemistry()
    tissue = cv2.resize(ihc, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
    th, tw = tissue.shape[:2]
    pad = 256 * scale // 4
    H, W = th + 2 * pad, tw + 3 * pad
    canvas = np.full((H, W, 3), 244, np.uint8)  # glass is slightly off-white, as scanned
    # An irregular section outline: an ellipse whose radius wobbles with angle (seeded, fixed).
    yy, xx = np.mgrid[0:th, 0:tw]
    cy, cx = th / 2, tw / 2
    ang = np.arctan2(yy - cy, xx - cx)
    radius = 0.46 + 0.04 * np.sin(3 * ang + 0.7) + 0.03 * np.cos(5 * ang + 1.3)
    inside = np.hypot((xx - cx) / tw, (yy - cy) / th) < radius
    region = canvas[pad:pad + th, pad:pad + tw]
    region[inside] = tissue[inside]
    mask = np.zeros((H, W), bool)
    mask[pad:pad + th, pad:pad + tw] = inside
    return canvas, mask


def write_pyramid(path: str | os.PathLike, rgb: np.ndarray, mpp: float, tile: int = 256,
                  quality: int = 90, min_size: int = 512, compression: str = "jpeg") -> Path:
    """Write ``rgb`` as a tiled pyramidal TIFF (one page per level, 2x steps) with MPP in the
    resolution tags, readable by OpenSlide (generic TIFF), tiffslide and tifffile."""
    import tifffile

    path = Path(path)
    levels = [rgb]
    while max(levels[-1].shape[:2]) // 2 >= min_size:
        prev = levels[-1]
        levels.append(cv2.resize(prev, (prev.shape[1] // 2, prev.shape[0] // 2), interpolation=cv2.INTER_AREA))
    res = 1e4 / mpp  # pixels per centimetre
    with atomic_path(path) as tmp:
        with tifffile.TiffWriter(tmp, bigtiff=rgb.nbytes > 2**31) as tw:
            for i, lvl in enumerate(levels):
                ds = rgb.shape[1] / lvl.shape[1]
                tw.write(lvl, tile=(tile, tile), photometric="rgb", compression=compression,
                         compressionargs={"level": quality} if compression == "jpeg" else None,
                         resolution=(res / ds, res / ds), resolutionunit="CENTIMETER",
                         subfiletype=0 if i == 0 else 1, metadata=None)
    return path


def write_demo_slide(path: str | os.PathLike) -> Path:
    """Write the demo slide (about 2.8k x 2.6k px at 0.5 µm/px, 3 levels) to ``path``."""
    rgb, _ = demo_image()
    return write_pyramid(path, rgb, DEMO_MPP)
